//! Pure comparison of a `nft -j list table inet <name>` listing with the expected [`RuleSet`].
//! It owns the JSON reading (serde_json over nft's schema version 1) and the wording of
//! differences; it runs nothing ([`crate::Nft::verify`] fetches the listing).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

use crate::spec::{CHAIN_NAME, Capture, KEEP_DESTINATION_CHAIN, RuleSet, SET_V4, SET_V6};
use crate::{Error, Result};

/// Checks that `listing_json` (the output of `nft -j list table inet <name>`) matches `expected`.
///
/// Checked: the table exists; sets `meshed_v4`/`meshed_v6` have the right type and exactly the
/// expected elements; the chain has the capture mode's shape (TPROXY: a filter chain at
/// prerouting priority `mangle` whose rules are, in order, the local-destination `return`, the
/// transparent-socket rule, the two `tproxy` rules to the expected port and mark and the two
/// resets; REDIRECT: a nat chain at `dstnat - 10` with the `return` and the two redirects); and
/// there are no other sets or chains. Every difference is reported in one [`Error::Mismatch`].
/// The policy routing is checked apart ([`crate::routing_differences`]).
pub fn verify_listing(expected: &RuleSet, listing_json: &str) -> Result<()> {
    let table = expected.table.as_str();
    let listing = Listing::parse(table, listing_json)?;
    let differences = listing.differences(expected);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch {
            table: table.to_owned(),
            differences,
        })
    }
}

/// What we read from the JSON listing, restricted to one `inet` table.
#[derive(Debug, Default)]
struct Listing {
    table_found: bool,
    sets: BTreeMap<String, SetListing>,
    chains: BTreeMap<String, ChainListing>,
    rules: BTreeMap<String, Vec<RuleShape>>,
}

#[derive(Debug, Default)]
struct SetListing {
    ty: String,
    elements: BTreeSet<IpAddr>,
    /// Elements that are not plain addresses (ranges, prefixes, ...), as JSON text.
    unexpected: Vec<String>,
}

#[derive(Debug, PartialEq)]
struct ChainListing {
    ty: Option<String>,
    hook: Option<String>,
    prio: Option<i64>,
    policy: Option<String>,
}

/// A rule, recognised as one of the shapes we render or kept as JSON text.
#[derive(Debug, Clone, PartialEq)]
enum RuleShape {
    LocalReturn,
    Redirect {
        protocol: String,
        set: String,
        port: u64,
    },
    /// `meta l4proto tcp socket transparent 1 socket wildcard 0 meta mark set meta mark | MARK accept`
    TransparentSocket {
        mark: u64,
    },
    /// `<protocol> saddr @<set> meta l4proto tcp ct direction original tproxy <family> to :PORT
    /// meta mark set meta mark | MARK accept`
    Tproxy {
        protocol: String,
        set: String,
        family: String,
        port: u64,
        mark: u64,
    },
    /// `<protocol> saddr @<set> meta l4proto tcp ct direction original reject with tcp reset`
    Reset {
        protocol: String,
        set: String,
    },
    /// `meta mark & MARK == MARK dnat <family> to <family> daddr`
    KeepDestination {
        family: String,
        mark: u64,
    },
    Other(String),
}

impl fmt::Display for RuleShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleShape::LocalReturn => f.write_str("`fib daddr type local return`"),
            RuleShape::Redirect {
                protocol,
                set,
                port,
            } => write!(
                f,
                "`{protocol} saddr @{set} meta l4proto tcp redirect to :{port}`"
            ),
            RuleShape::TransparentSocket { mark } => write!(
                f,
                "`meta l4proto tcp socket transparent 1 socket wildcard 0 meta mark set meta mark | {mark:#x} accept`"
            ),
            RuleShape::Tproxy {
                protocol,
                set,
                family,
                port,
                mark,
            } => write!(
                f,
                "`{protocol} saddr @{set} meta l4proto tcp ct direction original tproxy {family} to :{port} meta mark set meta mark | {mark:#x} accept`"
            ),
            RuleShape::Reset { protocol, set } => write!(
                f,
                "`{protocol} saddr @{set} meta l4proto tcp ct direction original reject with tcp reset`"
            ),
            RuleShape::KeepDestination { family, mark } => write!(
                f,
                "`meta mark & {mark:#x} == {mark:#x} dnat {family} to {family} daddr`"
            ),
            RuleShape::Other(json) => write!(f, "unrecognised rule {json}"),
        }
    }
}

/// A chain `render` writes: its name, base-chain type and priority, and its rules in order.
struct ExpectedChain {
    name: &'static str,
    ty: &'static str,
    prio: i64,
    rules: Vec<RuleShape>,
}

/// The chains `render` writes for `rules`.
fn expected_chains(rules: &RuleSet) -> Vec<ExpectedChain> {
    let port = u64::from(rules.redirect_port.get());
    let mark = u64::from(rules.routing.mark.get());
    let families = [("ip", SET_V4), ("ip6", SET_V6)];
    let capture = rules.capture;
    let mut prerouting = ExpectedChain {
        name: CHAIN_NAME,
        ty: capture.chain_type(),
        prio: capture.chain_priority(),
        rules: vec![RuleShape::LocalReturn],
    };
    match capture {
        Capture::Redirect => {
            prerouting
                .rules
                .extend(families.map(|(protocol, set)| RuleShape::Redirect {
                    protocol: protocol.into(),
                    set: set.into(),
                    port,
                }));
            vec![prerouting]
        }
        Capture::Tproxy => {
            prerouting.rules.push(RuleShape::TransparentSocket { mark });
            prerouting
                .rules
                .extend(families.map(|(protocol, set)| RuleShape::Tproxy {
                    protocol: protocol.into(),
                    set: set.into(),
                    family: protocol.into(),
                    port,
                    mark,
                }));
            prerouting
                .rules
                .extend(families.map(|(protocol, set)| RuleShape::Reset {
                    protocol: protocol.into(),
                    set: set.into(),
                }));
            let keep = ExpectedChain {
                name: KEEP_DESTINATION_CHAIN,
                ty: Capture::Redirect.chain_type(),
                prio: Capture::Redirect.chain_priority(),
                rules: families
                    .map(|(family, _)| RuleShape::KeepDestination {
                        family: family.into(),
                        mark,
                    })
                    .into(),
            };
            vec![prerouting, keep]
        }
    }
}

impl Listing {
    fn parse(table: &str, json: &str) -> Result<Self> {
        let bad = |detail: String| Error::ParseListing {
            table: table.to_owned(),
            detail,
        };
        let root: Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let objects = root
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no top-level \"nftables\" array".to_owned()))?;
        let mut listing = Listing::default();
        for object in objects {
            let Some((kind, body)) = object.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            let in_table = |name_key: &str| {
                body.get("family").and_then(Value::as_str) == Some("inet")
                    && body.get(name_key).and_then(Value::as_str) == Some(table)
            };
            match kind.as_str() {
                "table" if in_table("name") => listing.table_found = true,
                "set" if in_table("table") => {
                    let name =
                        str_field(body, "name").ok_or_else(|| bad("set without name".into()))?;
                    listing.sets.insert(name.to_owned(), parse_set(body));
                }
                "chain" if in_table("table") => {
                    let name =
                        str_field(body, "name").ok_or_else(|| bad("chain without name".into()))?;
                    listing.chains.insert(
                        name.to_owned(),
                        ChainListing {
                            ty: str_field(body, "type").map(str::to_owned),
                            hook: str_field(body, "hook").map(str::to_owned),
                            prio: body.get("prio").and_then(Value::as_i64),
                            policy: str_field(body, "policy").map(str::to_owned),
                        },
                    );
                }
                "rule" if in_table("table") => {
                    let chain =
                        str_field(body, "chain").ok_or_else(|| bad("rule without chain".into()))?;
                    let shape = body
                        .get("expr")
                        .and_then(Value::as_array)
                        .map_or_else(|| RuleShape::Other(body.to_string()), |e| rule_shape(e));
                    listing
                        .rules
                        .entry(chain.to_owned())
                        .or_default()
                        .push(shape);
                }
                _ => {}
            }
        }
        Ok(listing)
    }

    fn differences(&self, expected: &RuleSet) -> Vec<String> {
        if !self.table_found {
            return vec!["the table does not exist".to_owned()];
        }
        let mut out = Vec::new();
        let want_v4: BTreeSet<IpAddr> = expected.meshed_v4.iter().map(|&ip| ip.into()).collect();
        let want_v6: BTreeSet<IpAddr> = expected.meshed_v6.iter().map(|&ip| ip.into()).collect();
        for (name, ty, want) in [
            (SET_V4, "ipv4_addr", want_v4),
            (SET_V6, "ipv6_addr", want_v6),
        ] {
            let Some(set) = self.sets.get(name) else {
                out.push(format!("set {name} is missing"));
                continue;
            };
            if set.ty != ty {
                out.push(format!("set {name} has type {:?}, expected {ty}", set.ty));
            }
            let missing: Vec<String> = want
                .difference(&set.elements)
                .map(ToString::to_string)
                .collect();
            if !missing.is_empty() {
                out.push(format!("set {name} lacks {}", missing.join(", ")));
            }
            let extra: Vec<String> = set
                .elements
                .difference(&want)
                .map(ToString::to_string)
                .collect();
            if !extra.is_empty() {
                out.push(format!("set {name} has unexpected {}", extra.join(", ")));
            }
            for element in &set.unexpected {
                out.push(format!("set {name} has unexpected element {element}"));
            }
        }
        for name in self.sets.keys().filter(|n| *n != SET_V4 && *n != SET_V6) {
            out.push(format!("unexpected set {name}"));
        }

        let capture = expected.capture;
        let want = expected_chains(expected);
        for chain in &want {
            let name = chain.name;
            let want_chain = ChainListing {
                ty: Some(chain.ty.to_owned()),
                hook: Some("prerouting".to_owned()),
                prio: Some(chain.prio),
                policy: Some("accept".to_owned()),
            };
            match self.chains.get(name) {
                None => {
                    out.push(format!("chain {name} is missing ({capture} capture)"));
                    continue;
                }
                Some(got) if *got != want_chain => out.push(format!(
                    "chain {name} is type {:?} hook {:?} priority {:?} policy {:?}, expected type {} hook prerouting priority {} policy accept ({capture} capture)",
                    got.ty, got.hook, got.prio, got.policy, chain.ty, chain.prio,
                )),
                Some(_) => {}
            }
            let got_rules = self.rules.get(name).map(Vec::as_slice).unwrap_or_default();
            if got_rules != chain.rules {
                out.push(format!(
                    "chain {name} has rules [{}], expected [{}]",
                    join(got_rules),
                    join(&chain.rules)
                ));
            }
        }
        for name in self.chains.keys() {
            if !want.iter().any(|chain| chain.name == name) {
                out.push(format!("unexpected chain {name} ({capture} capture)"));
            }
        }
        out
    }
}

fn str_field<'a>(body: &'a Value, key: &str) -> Option<&'a str> {
    body.get(key).and_then(Value::as_str)
}

fn join(rules: &[RuleShape]) -> String {
    rules
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_set(body: &Value) -> SetListing {
    let mut set = SetListing {
        ty: body.get("type").map_or_else(String::new, |t| match t {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }),
        ..SetListing::default()
    };
    let elements = match body.get("elem") {
        None => Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(single) => vec![single],
    };
    for element in elements {
        // Plain elements are strings; elements with options are {"elem": {"val": ..}}.
        let text = element
            .as_str()
            .or_else(|| element.pointer("/elem/val").and_then(Value::as_str));
        match text.and_then(|t| t.parse::<IpAddr>().ok()) {
            Some(ip) => {
                set.elements.insert(ip);
            }
            None => set.unexpected.push(element.to_string()),
        }
    }
    set
}

/// Recognises the rule shapes that `render` produces from their JSON expressions.
fn rule_shape(expr: &[Value]) -> RuleShape {
    known_shape(expr).unwrap_or_else(|| RuleShape::Other(Value::Array(expr.to_vec()).to_string()))
}

fn known_shape(expr: &[Value]) -> Option<RuleShape> {
    match expr {
        [fib, ret] if ret.get("return").is_some() => {
            let is_local = match_right(fib) == Some("local")
                && fib
                    .pointer("/match/left/fib/result")
                    .and_then(Value::as_str)
                    == Some("type")
                && fib.pointer("/match/left/fib/flags")
                    == Some(&Value::Array(vec![Value::String("daddr".into())]));
            is_local.then_some(RuleShape::LocalReturn)
        }
        [saddr, l4proto, redirect] if redirect.get("redirect").is_some() => {
            let (protocol, set) = saddr_in_set(saddr)?;
            let port = redirect.pointer("/redirect/port").and_then(Value::as_u64);
            match (is_tcp(l4proto), port) {
                (true, Some(port)) => Some(RuleShape::Redirect {
                    protocol,
                    set,
                    port,
                }),
                _ => None,
            }
        }
        [saddr, l4proto, direction, reject] if reject.get("reject").is_some() => {
            let (protocol, set) = saddr_in_set(saddr)?;
            let reset = reject.pointer("/reject/type").and_then(Value::as_str) == Some("tcp reset");
            (is_tcp(l4proto) && is_original(direction) && reset)
                .then_some(RuleShape::Reset { protocol, set })
        }
        [saddr, l4proto, direction, tproxy, mangle, accept] if tproxy.get("tproxy").is_some() => {
            let (protocol, set) = saddr_in_set(saddr)?;
            let family = tproxy.pointer("/tproxy/family").and_then(Value::as_str);
            let port = tproxy.pointer("/tproxy/port").and_then(Value::as_u64);
            // `to :PORT` only: an address in the tproxy statement is not what we render.
            let no_addr = tproxy.pointer("/tproxy/addr").is_none();
            match (family, port, or_mark(mangle)) {
                (Some(family), Some(port), Some(mark))
                    if is_tcp(l4proto)
                        && is_original(direction)
                        && no_addr
                        && accept.get("accept").is_some() =>
                {
                    Some(RuleShape::Tproxy {
                        protocol,
                        set,
                        family: family.to_owned(),
                        port,
                        mark,
                    })
                }
                _ => None,
            }
        }
        [mark, dnat] if dnat.get("dnat").is_some() => {
            let family = dnat.pointer("/dnat/family").and_then(Value::as_str)?;
            let addr = dnat.pointer("/dnat/addr/payload")?;
            let to_daddr = addr.get("protocol").and_then(Value::as_str) == Some(family)
                && addr.get("field").and_then(Value::as_str) == Some("daddr")
                && dnat.pointer("/dnat/port").is_none();
            let masked = mark.pointer("/match/left/&")?.as_array()?;
            let bits = match masked.as_slice() {
                [meta, bits]
                    if meta.pointer("/meta/key").and_then(Value::as_str) == Some("mark") =>
                {
                    bits.as_u64()
                }
                _ => None,
            }?;
            let equal = mark.pointer("/match/op").and_then(Value::as_str) == Some("==")
                && mark.pointer("/match/right").and_then(Value::as_u64) == Some(bits);
            (to_daddr && equal).then(|| RuleShape::KeepDestination {
                family: family.to_owned(),
                mark: bits,
            })
        }
        [l4proto, transparent, wildcard, mangle, accept] => {
            let socket = |expr: &Value, key: &str| {
                expr.pointer("/match/left/socket/key")
                    .and_then(Value::as_str)
                    == Some(key)
                    && expr.pointer("/match/op").and_then(Value::as_str) == Some("==")
            };
            let right = |expr: &Value| expr.pointer("/match/right").and_then(Value::as_u64);
            let shape_ok = is_tcp(l4proto)
                && socket(transparent, "transparent")
                && right(transparent) == Some(1)
                && socket(wildcard, "wildcard")
                && right(wildcard) == Some(0)
                && accept.get("accept").is_some();
            or_mark(mangle)
                .filter(|_| shape_ok)
                .map(|mark| RuleShape::TransparentSocket { mark })
        }
        _ => None,
    }
}

/// `<protocol> saddr @<set>`: the protocol and the set.
fn saddr_in_set(expr: &Value) -> Option<(String, String)> {
    let payload = expr.pointer("/match/left/payload")?;
    let set = match_right(expr)?.strip_prefix('@')?;
    let protocol = payload.get("protocol").and_then(Value::as_str)?;
    (payload.get("field").and_then(Value::as_str) == Some("saddr"))
        .then(|| (protocol.to_owned(), set.to_owned()))
}

/// `meta l4proto tcp`.
fn is_tcp(expr: &Value) -> bool {
    expr.pointer("/match/left/meta/key").and_then(Value::as_str) == Some("l4proto")
        && match_right(expr) == Some("tcp")
}

/// `ct direction original`.
fn is_original(expr: &Value) -> bool {
    expr.pointer("/match/left/ct/key").and_then(Value::as_str) == Some("direction")
        && match_right(expr) == Some("original")
}

/// `meta mark set meta mark | MARK`: the mark OR-ed in.
fn or_mark(expr: &Value) -> Option<u64> {
    let mangle = expr.get("mangle")?;
    if mangle.pointer("/key/meta/key").and_then(Value::as_str) != Some("mark") {
        return None;
    }
    match mangle.pointer("/value/|")?.as_array()?.as_slice() {
        [meta, mark] if meta.pointer("/meta/key").and_then(Value::as_str) == Some("mark") => {
            mark.as_u64()
        }
        _ => None,
    }
}

/// The right-hand side of an `==` match, when it is a string.
fn match_right(expr: &Value) -> Option<&str> {
    let op = expr.pointer("/match/op").and_then(Value::as_str);
    if op != Some("==") {
        return None;
    }
    expr.pointer("/match/right").and_then(Value::as_str)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::spec::TableName;
    use std::num::{NonZeroU16, NonZeroU32};

    /// Captured from nftables 1.0.6 after applying `render` of `expected()` (TPROXY, the default).
    const TPROXY: &str = include_str!("../tests/data/list_tproxy_v4_v6.json");
    /// Captured from nftables 1.0.6 after applying `render` of `expected()` with REDIRECT.
    const REDIRECT: &str = include_str!("../tests/data/list_redirect_v4_v6.json");

    fn expected() -> RuleSet {
        RuleSet::default().with_pods(
            ["10.0.0.1", "10.0.0.2", "fd00::1"]
                .iter()
                .map(|ip| ip.parse().unwrap()),
        )
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

    #[test]
    fn samples_match() {
        verify_listing(&expected(), TPROXY).unwrap();
        verify_listing(&redirect(), REDIRECT).unwrap();
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
        assert_eq!(diffs.len(), 3, "{diffs:?}");
        assert!(
            diffs[0].contains("type Some(\"nat\")")
                && diffs[0].contains("expected type filter hook prerouting priority -150")
                && diffs[0].contains("(tproxy capture)"),
            "{}",
            diffs[0]
        );
        assert!(diffs[1].contains("redirect to :15001"), "{}", diffs[1]);
        assert!(diffs[1].contains("tproxy ip to :15001"), "{}", diffs[1]);
        assert_eq!(
            diffs[2],
            "chain keep_destination is missing (tproxy capture)"
        );

        let diffs = differences(&redirect(), TPROXY);
        assert_eq!(diffs.len(), 3, "{diffs:?}");
        assert!(diffs[0].contains("(redirect capture)"), "{}", diffs[0]);
        assert_eq!(
            diffs[2],
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
}
