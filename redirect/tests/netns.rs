//! Privileged tests: real nftables inside a throwaway network namespace, never the host's ruleset.
//! Without root, `ip` or `nft` they skip, except under `CI=true`, where they fail instead.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::num::NonZeroU16;
use std::process::Command;

use redirect::{Error, Nft, RuleSet, TableName};

/// A network namespace that is deleted when dropped, also when the test panics.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Self {
        let name = format!("np-redir-test-{}-{tag}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(status.success(), "ip netns add {name} failed: {status}");
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Why these tests cannot run here, if they cannot.
fn missing_privileges() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .map(str::to_owned);
    if euid.as_deref() != Some("0") {
        return Some(format!("effective uid is {euid:?}, not 0"));
    }
    let runs = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !runs("ip", "-V") {
        return Some("`ip -V` does not run (install iproute2)".to_owned());
    }
    if Nft::new().is_err() {
        return Some("nft is not installed (install nftables)".to_owned());
    }
    None
}

/// Returns false (after saying so) when the test must skip; panics instead under CI.
fn can_run() -> bool {
    match missing_privileges() {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("privileged test cannot run under CI: {why}")
        }
        Some(why) => {
            eprintln!("skipping: needs root and nft ({why})");
            false
        }
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|ip| ip.parse().unwrap()).collect()
}

#[test]
fn apply_verify_update_remove() {
    if !can_run() {
        return;
    }
    let netns = Netns::create("life");
    let nft = Nft::new().unwrap().in_netns(&netns.0).unwrap();
    let table = TableName::new("np_test").unwrap();
    let mut rules = RuleSet::new(table.clone(), NonZeroU16::new(15001).unwrap())
        .with_pods(ips(&["10.244.0.2", "fd00::2"]));

    assert!(!nft.exists(&table).unwrap());
    let err = nft.verify(&rules).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    nft.remove(&table).unwrap(); // absent table: still fine

    nft.check(&rules).unwrap();
    assert!(
        !nft.exists(&table).unwrap(),
        "check must not change anything"
    );
    nft.apply(&rules).unwrap();
    assert!(nft.exists(&table).unwrap());
    nft.verify(&rules).unwrap();

    // Add one address per family, remove one present and one absent address.
    nft.update(
        &table,
        &ips(&["10.244.0.3", "fd00::3"]),
        &ips(&["10.244.0.2", "10.244.9.9"]),
    )
    .unwrap();
    let err = nft.verify(&rules).unwrap_err();
    let Error::Mismatch { differences, .. } = &err else {
        panic!("expected a mismatch, got {err}");
    };
    assert_eq!(
        differences,
        &[
            "set meshed_v4 lacks 10.244.0.2",
            "set meshed_v4 has unexpected 10.244.0.3",
            "set meshed_v6 has unexpected fd00::3",
        ]
    );
    for ip in ips(&["10.244.0.3", "fd00::3"]) {
        rules.add_pod(ip);
    }
    rules.remove_pod("10.244.0.2".parse().unwrap());
    nft.verify(&rules).unwrap();
    nft.update(&table, &[], &[]).unwrap();

    // Applying over the existing table replaces it (idempotent, no duplicate rules).
    nft.apply(&rules).unwrap();
    nft.apply(&rules).unwrap();
    nft.verify(&rules).unwrap();

    // A different port replaces the rules too.
    rules.redirect_port = NonZeroU16::new(16001).unwrap();
    nft.apply(&rules).unwrap();
    nft.verify(&rules).unwrap();

    nft.remove(&table).unwrap();
    assert!(!nft.exists(&table).unwrap());
    nft.remove(&table).unwrap();
}

#[test]
fn check_accepts_rendered_output_and_reports_rejections() {
    if !can_run() {
        return;
    }
    let netns = Netns::create("check");
    let nft = Nft::new().unwrap().in_netns(&netns.0).unwrap();
    for rules in [
        RuleSet::default(),
        RuleSet::default().with_pods(ips(&["10.0.0.1", "10.0.0.2", "fd00::1"])),
    ] {
        nft.check(&rules).unwrap();
    }

    // Every golden file passes `nft -c -f -` directly, as `nodeproxy rules | nft -c -f -` would.
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for entry in std::fs::read_dir(&golden).unwrap() {
        let path = entry.unwrap().path();
        let script = std::fs::read(&path).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &netns.0, "nft", "-c", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &script).unwrap();
        assert!(
            child.wait().unwrap().success(),
            "nft -c rejected {}",
            path.display()
        );
    }

    // An update against a table that does not exist is rejected, with nft's stderr in the error.
    let err = nft
        .update(&TableName::default(), &ips(&["10.0.0.1"]), &[])
        .unwrap_err();
    let Error::Rejected { stderr, .. } = &err else {
        panic!("expected a rejection, got {err}");
    };
    assert!(stderr.contains("No such file or directory"), "{err}");
}
