//! Golden-file tests for `render`: the exact text `nodeproxy rules` prints, for both capture
//! modes (TPROXY, the default, with and without per-pod ports, and REDIRECT, which ignores them).
//! Run with `UPDATE_GOLDEN=1` to rewrite `tests/golden/*.nft` after an intended change.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::path::PathBuf;

use pretty_assertions::assert_eq;
use redirect::{Capture, PolicyRouting, RouteTable, RuleSet, TableName, render};

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|ip| ip.parse().unwrap()).collect()
}

fn ports(list: &[(&str, u16)]) -> Vec<(IpAddr, NonZeroU16)> {
    list.iter()
        .map(|(ip, port)| (ip.parse().unwrap(), NonZeroU16::new(*port).unwrap()))
        .collect()
}

fn check_golden(name: &str, rules: &RuleSet) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.nft"));
    let got = render(rules);
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(want, got, "golden file {} differs", path.display());
}

#[test]
fn no_pods() {
    check_golden("no_pods", &RuleSet::default());
}

#[test]
fn v4_only() {
    // Out of order and duplicated on purpose: output is sorted and deduplicated.
    let rules = RuleSet::default().with_pods(ips(&["10.244.1.7", "10.244.1.3", "10.244.1.7"]));
    check_golden("v4_only", &rules);
}

#[test]
fn v4_and_v6() {
    let rules = RuleSet::default().with_pods(ips(&[
        "10.244.1.3",
        "fd00:10:244:1::3",
        "10.244.1.7",
        "fd00:10:244:1::7",
        "::ffff:10.244.1.9",
    ]));
    check_golden("v4_and_v6", &rules);
}

#[test]
fn custom_port_and_table() {
    let rules = RuleSet::new(
        TableName::new("np_custom").unwrap(),
        NonZeroU16::new(16001).unwrap(),
    )
    .with_pods(ips(&["192.168.0.2", "2001:db8::2"]));
    check_golden("custom_port_and_table", &rules);
}

#[test]
fn tproxy_pod_ports() {
    // 10.244.1.7 has no port of its own (the shared port takes it); a mapped address is IPv4.
    let rules = RuleSet::default()
        .with_pods(ips(&["10.244.1.3", "10.244.1.7", "fd00:10:244:1::3"]))
        .with_pod_ports(ports(&[
            ("fd00:10:244:1::3", 40003),
            ("::ffff:10.244.1.3", 40001),
        ]));
    check_golden("tproxy_pod_ports", &rules);
}

#[test]
fn redirect_v4_and_v6() {
    // The pod ports are ignored: REDIRECT renders no maps.
    let rules = RuleSet::default()
        .with_capture(Capture::Redirect)
        .with_pods(ips(&["10.244.1.3", "fd00:10:244:1::3"]))
        .with_pod_ports(ports(&[("10.244.1.3", 40001)]));
    check_golden("redirect_v4_and_v6", &rules);
}

#[test]
fn tproxy_custom_mark_and_table() {
    let rules = RuleSet::default()
        .with_routing(PolicyRouting {
            mark: NonZeroU32::new(0x20_0000).unwrap(),
            table: RouteTable::new(4242).unwrap(),
            priority: 80,
        })
        .with_pods(ips(&["10.244.1.3", "fd00:10:244:1::3"]));
    check_golden("tproxy_custom_mark_and_table", &rules);
}
