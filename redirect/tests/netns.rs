//! Privileged tests: real nftables inside a throwaway network namespace, never the host's ruleset.
//! Without root, `ip` or `nft` they skip, except under `CI=true`, where they fail instead.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::num::NonZeroU16;
use std::process::Command;

use redirect::{Capture, Error, Nft, RuleSet, TableName};

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
        let netns = Self(name);
        // As on a real node; the IPv6 local route of TPROXY needs it.
        ip(&netns, &["link", "set", "lo", "up"]);
        netns
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

/// `ip <family> <what> show table 15001` inside `netns`, one line per rule or route ("" if the
/// table does not exist).
fn ip_show(netns: &Netns, family: &str, what: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", &netns.0, family, what, "show", "table", "15001"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs `ip -n <netns> <args>`, which must succeed.
fn ip(netns: &Netns, args: &[&str]) {
    let status = Command::new("ip")
        .args(["-n", &netns.0])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "ip {args:?}: {status}");
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
        .with_capture(Capture::Redirect)
        .with_pods(ips(&["10.244.0.2", "fd00::2"]));

    assert!(!nft.exists(&table).unwrap());
    let err = nft.verify(&rules).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    nft.remove(&rules).unwrap(); // absent table: still fine

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

    // A different port replaces the rules too, and so does the other capture mode.
    rules.redirect_port = NonZeroU16::new(16001).unwrap();
    nft.apply(&rules).unwrap();
    nft.verify(&rules).unwrap();
    rules.capture = Capture::Tproxy;
    nft.apply(&rules).unwrap();
    nft.verify(&rules).unwrap();

    nft.remove(&rules).unwrap();
    assert!(!nft.exists(&table).unwrap());
    nft.remove(&rules).unwrap();
}

#[test]
fn tproxy_policy_routing_is_applied_verified_replaced_and_removed() {
    if !can_run() {
        return;
    }
    let netns = Netns::create("route");
    let nft = Nft::new().unwrap().in_netns(&netns.0).unwrap();
    let rules = RuleSet::default().with_pods(ips(&["10.244.0.2", "fd00::2"]));
    assert_eq!(rules.capture, Capture::Tproxy);

    nft.apply(&rules).unwrap();
    nft.verify(&rules).unwrap();
    for family in ["-4", "-6"] {
        assert_eq!(
            ip_show(&netns, family, "rule"),
            "90:\tfrom all fwmark 0x1000/0x1000 lookup 15001",
            "{family}"
        );
        assert!(
            ip_show(&netns, family, "route").starts_with("local default dev lo"),
            "{family}: {}",
            ip_show(&netns, family, "route")
        );
    }
    // Applying again changes nothing and duplicates nothing.
    nft.apply(&rules).unwrap();
    nft.verify(&rules).unwrap();
    assert_eq!(ip_show(&netns, "-4", "rule").lines().count(), 1);

    // A crashed run of another configuration left a second rule and a stray route: verify names
    // them, and the next apply replaces them.
    ip(
        &netns,
        &[
            "-4", "rule", "add", "pref", "70", "fwmark", "0x1", "lookup", "15001",
        ],
    );
    ip(
        &netns,
        &[
            "-4",
            "route",
            "add",
            "10.9.0.0/16",
            "dev",
            "lo",
            "table",
            "15001",
        ],
    );
    let err = nft.verify(&rules).unwrap_err();
    let Error::Mismatch { differences, .. } = &err else {
        panic!("expected a mismatch, got {err}");
    };
    assert_eq!(differences.len(), 2, "{differences:?}");
    assert!(
        differences[0].contains("also looks up table 15001"),
        "{err}"
    );
    assert!(differences[1].contains("10.9.0.0/16"), "{err}");
    nft.apply(&rules).unwrap();
    nft.verify(&rules).unwrap();

    // Missing policy routing is named too.
    ip(
        &netns,
        &["-6", "rule", "del", "pref", "90", "lookup", "15001"],
    );
    let err = nft.verify(&rules).unwrap_err().to_string();
    assert!(
        err.contains("ip -6 rule `pref 90 fwmark 0x1000/0x1000 lookup 15001` is missing"),
        "{err}"
    );

    // REDIRECT over a TPROXY leftover: the table is replaced and the policy routing removed.
    let redirect = rules.clone().with_capture(Capture::Redirect);
    nft.apply(&redirect).unwrap();
    nft.verify(&redirect).unwrap();
    for family in ["-4", "-6"] {
        assert_eq!(ip_show(&netns, family, "rule"), "", "{family}");
        assert_eq!(ip_show(&netns, family, "route"), "", "{family}");
    }

    // And back; then remove takes the table and the policy routing.
    nft.apply(&rules).unwrap();
    nft.verify(&rules).unwrap();
    nft.remove(&rules).unwrap();
    assert!(!nft.exists(&rules.table).unwrap());
    for family in ["-4", "-6"] {
        assert_eq!(ip_show(&netns, family, "rule"), "", "{family}");
        assert_eq!(ip_show(&netns, family, "route"), "", "{family}");
    }
    nft.remove(&rules).unwrap();
}

#[test]
fn check_accepts_rendered_output_and_reports_rejections() {
    if !can_run() {
        return;
    }
    let netns = Netns::create("check");
    let nft = Nft::new().unwrap().in_netns(&netns.0).unwrap();
    for capture in [Capture::Tproxy, Capture::Redirect] {
        for rules in [
            RuleSet::default(),
            RuleSet::default().with_pods(ips(&["10.0.0.1", "10.0.0.2", "fd00::1"])),
        ] {
            nft.check(&rules.with_capture(capture)).unwrap();
        }
    }

    // Every golden file passes `nft -c -f -` directly, as `nodeproxy rules | nft -c -f -` would.
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for entry in std::fs::read_dir(&golden).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "nft") {
            continue;
        }
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
