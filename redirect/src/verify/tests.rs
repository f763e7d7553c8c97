//! Unit tests of `verify`: samples captured from nftables 1.0.6, and edits of them.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::spec::TableName;
use std::num::{NonZeroU16, NonZeroU32};

/// Captured from nftables 1.0.6 after applying `render` of `expected()` (TPROXY, the default).
const TPROXY: &str = include_str!("../../tests/data/list_tproxy_v4_v6.json");
/// Captured from nftables 1.0.6 after applying `render` of `expected()` with REDIRECT (which
/// renders no port maps).
const REDIRECT: &str = include_str!("../../tests/data/list_redirect_v4_v6.json");

fn ip(ip: &str) -> IpAddr {
    ip.parse().unwrap()
}

fn port(port: u16) -> NonZeroU16 {
    NonZeroU16::new(port).unwrap()
}

/// Three meshed pods; 10.0.0.2 has no port of its own.
fn expected() -> RuleSet {
    RuleSet::default()
        .with_pods(["10.0.0.1", "10.0.0.2", "fd00::1"].map(ip))
        .with_pod_ports([(ip("10.0.0.1"), port(40001)), (ip("fd00::1"), port(40003))])
}

fn redirect() -> RuleSet {
    expected().with_capture(Capture::Redirect)
}

fn differences(rules: &RuleSet, json: &str) -> Vec<String> {
    match verify_listing(rules, json) {
        Ok(()) => Vec::new(),
        Err(Error::Mismatch { differences, .. }) => differences,
        Err(other) => panic!("unexpected error {other}"),
    }
}

/// The sample's objects, with `edit` applied to each.
fn edit_sample(sample: &str, edit: impl Fn(&mut Value)) -> String {
    let mut root: Value = serde_json::from_str(sample).unwrap();
    for object in root["nftables"].as_array_mut().unwrap() {
        edit(object);
    }
    root.to_string()
}

#[test]
fn samples_match() {
    verify_listing(&expected(), TPROXY).unwrap();
    verify_listing(&redirect(), REDIRECT).unwrap();
    // REDIRECT ignores the ports (`redirect()` has them): the listing has no maps and
    // matches without the ports too.
    assert!(!REDIRECT.contains("\"map\""), "{REDIRECT}");
    let mut no_ports = redirect();
    no_ports.pod_ports_v4.clear();
    no_ports.pod_ports_v6.clear();
    verify_listing(&no_ports, REDIRECT).unwrap();
}

#[test]
fn port_map_differences_are_named() {
    let mut rules = expected();
    rules.set_pod_port(ip("10.0.0.2"), port(40002));
    rules.set_pod_port(ip("10.0.0.1"), port(40009));
    rules.remove_pod_port(ip("fd00::1"));
    assert_eq!(
        differences(&rules, TPROXY),
        [
            "map pod_port_v4 lacks 10.0.0.2 : 40002",
            "map pod_port_v4 maps 10.0.0.1 to port 40001, expected 40009",
            "map pod_port_v6 has unexpected fd00::1 : 40003",
        ]
    );
}

#[test]
fn port_map_types_and_odd_elements_are_named() {
    let json = edit_sample(TPROXY, |object| {
        if let Some(map) = object.get_mut("map")
            && map["name"] == "pod_port_v6"
        {
            map["map"] = "mark".into();
            map["elem"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!([{"prefix": {"addr": "fd00::", "len": 64}}, 40004]));
        }
    });
    assert_eq!(
        differences(&expected(), &json),
        [
            "map pod_port_v6 has type \"ipv6_addr\" : \"mark\", expected ipv6_addr : inet_service",
            "map pod_port_v6 has unexpected element [{\"prefix\":{\"addr\":\"fd00::\",\"len\":64}},40004]",
        ]
    );
}

#[test]
fn elements_with_options_are_read() {
    // `add element ... { 10.0.0.1 comment "x" : 40001 }` lists the key as {"elem": {"val"}}.
    let json = edit_sample(TPROXY, |object| {
        if let Some(map) = object.get_mut("map")
            && map["name"] == "pod_port_v4"
        {
            map["elem"] =
                serde_json::json!([[{"elem": {"val": "10.0.0.1", "comment": "x"}}, 40001]]);
        }
    });
    verify_listing(&expected(), &json).unwrap();
}

#[test]
fn missing_and_unexpected_maps_are_named() {
    let without_v4_map = edit_sample(TPROXY, |object| {
        if object.pointer("/map/name").and_then(Value::as_str) == Some("pod_port_v4") {
            *object = serde_json::json!({"map": {"family": "inet", "table": "nodeproxy", "name": "stray", "type": "ipv4_addr", "map": "inet_service"}});
        }
    });
    assert_eq!(
        differences(&expected(), &without_v4_map),
        [
            "map pod_port_v4 is missing (tproxy capture)",
            "unexpected map stray (tproxy capture)",
        ]
    );
}

#[test]
fn the_pod_port_rule_shape_is_recognised_and_named() {
    let rule = RuleShape::TproxyPodPort {
        protocol: "ip6".into(),
        set: SET_V6.into(),
        family: "ip6".into(),
        map: PORT_MAP_V6.into(),
        mark: 0x1000,
    };
    assert_eq!(
        rule.to_string(),
        "`ip6 saddr @meshed_v6 meta l4proto tcp ct direction original tproxy ip6 to : ip6 saddr map @pod_port_v6 meta mark set meta mark | 0x1000 accept`"
    );
    let listing = Listing::parse("nodeproxy", TPROXY).unwrap();
    let prerouting = &listing.rules[CHAIN_NAME];
    assert_eq!(
        prerouting[2..4],
        expected_chains(&expected())[0].rules[2..4]
    );
    assert!(
        matches!(prerouting[3], RuleShape::TproxyPodPort { .. }),
        "{}",
        prerouting[3]
    );

    // Looked up by another address than the one matched (daddr): not our rule, named.
    let json = TPROXY.replace(
        "\"port\": {\"map\": {\"key\": {\"payload\": {\"protocol\": \"ip\", \"field\": \"saddr\"}}",
        "\"port\": {\"map\": {\"key\": {\"payload\": {\"protocol\": \"ip\", \"field\": \"daddr\"}}",
    );
    assert_ne!(json, TPROXY);
    let diffs = differences(&expected(), &json);
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert!(diffs[0].contains("unrecognised rule"), "{}", diffs[0]);
    assert!(diffs[0].contains("expected [`fib daddr type local return`, `meta l4proto tcp socket transparent 1 socket wildcard 0 meta mark set meta mark | 0x1000 accept`, `ip saddr @meshed_v4 meta l4proto tcp ct direction original tproxy ip to : ip saddr map @pod_port_v4 "), "{}", diffs[0]);
}

#[test]
fn element_differences_are_named() {
    for (mut rules, sample) in [(expected(), TPROXY), (redirect(), REDIRECT)] {
        rules.remove_pod("10.0.0.2".parse().unwrap());
        rules.add_pod("10.0.0.3".parse().unwrap());
        rules.add_pod("fd00::2".parse().unwrap());
        assert_eq!(
            differences(&rules, sample),
            [
                "set meshed_v4 lacks 10.0.0.3",
                "set meshed_v4 has unexpected 10.0.0.2",
                "set meshed_v6 lacks fd00::2",
            ]
        );
    }
}

#[test]
fn wrong_port_is_named() {
    for (mut rules, sample, got) in [
        (expected(), TPROXY, "tproxy ip to :15001"),
        (redirect(), REDIRECT, "redirect to :15001"),
    ] {
        rules.redirect_port = NonZeroU16::new(15002).unwrap();
        let diffs = differences(&rules, sample);
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert!(diffs[0].contains(got), "{}", diffs[0]);
        assert!(diffs[0].contains("expected ["), "{}", diffs[0]);
        assert!(diffs[0].contains(":15002"), "{}", diffs[0]);
    }
}

#[test]
fn wrong_mark_is_named() {
    let mut rules = expected();
    rules.routing.mark = NonZeroU32::new(0x2000).unwrap();
    let diffs = differences(&rules, TPROXY);
    assert_eq!(diffs.len(), 2, "{diffs:?}");
    assert!(
        diffs[0].contains("meta mark | 0x1000 accept`"),
        "{}",
        diffs[0]
    );
    assert!(
        diffs[0].contains("meta mark | 0x2000 accept`"),
        "{}",
        diffs[0]
    );
    assert!(
        diffs[1].starts_with("chain keep_destination has rules")
            && diffs[1].contains("0x2000 == 0x2000 dnat ip to ip daddr"),
        "{}",
        diffs[1]
    );
}

#[test]
fn the_other_capture_mode_is_named() {
    // A table left by a REDIRECT run, checked against TPROXY, and the other way round.
    let diffs = differences(&expected(), REDIRECT);
    assert_eq!(diffs.len(), 5, "{diffs:?}");
    assert_eq!(diffs[0], "map pod_port_v4 is missing (tproxy capture)");
    assert_eq!(diffs[1], "map pod_port_v6 is missing (tproxy capture)");
    assert!(
        diffs[2].contains("type Some(\"nat\")")
            && diffs[2].contains("expected type filter hook prerouting priority -150")
            && diffs[2].contains("(tproxy capture)"),
        "{}",
        diffs[2]
    );
    assert!(diffs[3].contains("redirect to :15001"), "{}", diffs[3]);
    assert!(diffs[3].contains("tproxy ip to :15001"), "{}", diffs[3]);
    assert_eq!(
        diffs[4],
        "chain keep_destination is missing (tproxy capture)"
    );

    let diffs = differences(&redirect(), TPROXY);
    assert_eq!(diffs.len(), 5, "{diffs:?}");
    assert_eq!(diffs[0], "unexpected map pod_port_v4 (redirect capture)");
    assert_eq!(diffs[1], "unexpected map pod_port_v6 (redirect capture)");
    assert!(diffs[2].contains("(redirect capture)"), "{}", diffs[2]);
    assert_eq!(
        diffs[4],
        "unexpected chain keep_destination (redirect capture)"
    );
}

#[test]
fn wrong_table_is_missing() {
    let rules = RuleSet::new(TableName::new("other").unwrap(), NonZeroU16::MIN);
    assert_eq!(differences(&rules, TPROXY), ["the table does not exist"]);
}

#[test]
fn wrong_priority_and_extra_rule() {
    for (rules, sample, prio) in [(expected(), TPROXY, -150), (redirect(), REDIRECT, -110)] {
        let json = sample
            .replace(&format!("\"prio\": {prio}"), "\"prio\": -100")
            .replace(
                "\"expr\": [{\"match\": {\"op\": \"==\", \"left\": {\"fib\"",
                "\"expr\": [{\"counter\": null}, {\"match\": {\"op\": \"==\", \"left\": {\"fib\"",
            );
        let diffs = differences(&rules, &json);
        assert_eq!(diffs.len(), 2, "{diffs:?}");
        assert!(diffs[0].contains("priority Some(-100)"), "{}", diffs[0]);
        assert!(diffs[1].contains("unrecognised rule"), "{}", diffs[1]);
    }
}

#[test]
fn a_tproxy_rule_without_the_reset_is_named() {
    // A hand-edited table that dropped the fail-closed resets.
    let root: Value = serde_json::from_str(TPROXY).unwrap();
    let kept: Vec<Value> = root["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| !o.to_string().contains("tcp reset"))
        .cloned()
        .collect();
    let json = serde_json::json!({ "nftables": kept }).to_string();
    let diffs = differences(&expected(), &json);
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert!(diffs[0].contains("reject with tcp reset`]"), "{}", diffs[0]);
}

#[test]
fn garbage_is_a_parse_error() {
    let err = verify_listing(&expected(), "not json").unwrap_err();
    assert!(matches!(err, Error::ParseListing { .. }), "{err}");
    let err = verify_listing(&expected(), "{}").unwrap_err();
    assert!(err.to_string().contains("nftables"), "{err}");
}
