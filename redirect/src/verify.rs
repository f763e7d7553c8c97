//! Pure comparison of a `nft -j list table inet <name>` listing with the expected [`RuleSet`].
//! It owns the JSON reading (serde_json over nft's schema version 1) and the wording of
//! differences; it runs nothing ([`crate::Nft::verify`] fetches the listing).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

use crate::spec::{CHAIN_NAME, CHAIN_PRIORITY, RuleSet, SET_V4, SET_V6};
use crate::{Error, Result};

/// Checks that `listing_json` (the output of `nft -j list table inet <name>`) matches `expected`.
///
/// Checked: the table exists; sets `meshed_v4`/`meshed_v6` have the right type and exactly the
/// expected elements; the nat chain is hooked at prerouting with priority `dstnat - 10`; its rules
/// are, in order, the local-destination `return` and the two redirects to the expected port; and
/// there are no other sets or chains. Every difference is reported in one [`Error::Mismatch`].
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
            RuleShape::Other(json) => write!(f, "unrecognised rule {json}"),
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

        let want_chain = ChainListing {
            ty: Some("nat".to_owned()),
            hook: Some("prerouting".to_owned()),
            prio: Some(CHAIN_PRIORITY),
            policy: Some("accept".to_owned()),
        };
        match self.chains.get(CHAIN_NAME) {
            None => out.push(format!("chain {CHAIN_NAME} is missing")),
            Some(chain) if *chain != want_chain => out.push(format!(
                "chain {CHAIN_NAME} is type {:?} hook {:?} priority {:?} policy {:?}, expected type nat hook prerouting priority {CHAIN_PRIORITY} policy accept",
                chain.ty, chain.hook, chain.prio, chain.policy
            )),
            Some(_) => {}
        }
        for name in self.chains.keys().filter(|n| *n != CHAIN_NAME) {
            out.push(format!("unexpected chain {name}"));
        }

        let port = u64::from(expected.redirect_port.get());
        let want_rules = [
            RuleShape::LocalReturn,
            RuleShape::Redirect {
                protocol: "ip".into(),
                set: SET_V4.into(),
                port,
            },
            RuleShape::Redirect {
                protocol: "ip6".into(),
                set: SET_V6.into(),
                port,
            },
        ];
        let got_rules = self
            .rules
            .get(CHAIN_NAME)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if self.chains.contains_key(CHAIN_NAME) && got_rules != want_rules {
            out.push(format!(
                "chain {CHAIN_NAME} has rules [{}], expected [{}]",
                join(got_rules),
                join(&want_rules)
            ));
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
    let other = || RuleShape::Other(Value::Array(expr.to_vec()).to_string());
    match expr {
        [fib, ret] if ret.get("return").is_some() => {
            let is_local = match_right(fib) == Some("local")
                && fib
                    .pointer("/match/left/fib/result")
                    .and_then(Value::as_str)
                    == Some("type")
                && fib.pointer("/match/left/fib/flags")
                    == Some(&Value::Array(vec![Value::String("daddr".into())]));
            if is_local {
                RuleShape::LocalReturn
            } else {
                other()
            }
        }
        [saddr, l4proto, redirect] => {
            let payload = saddr.pointer("/match/left/payload");
            let set = match_right(saddr).and_then(|r| r.strip_prefix('@'));
            let protocol = payload
                .and_then(|p| p.get("protocol"))
                .and_then(Value::as_str);
            let field = payload.and_then(|p| p.get("field")).and_then(Value::as_str);
            let is_tcp = l4proto
                .pointer("/match/left/meta/key")
                .and_then(Value::as_str)
                == Some("l4proto")
                && match_right(l4proto) == Some("tcp");
            let port = redirect.pointer("/redirect/port").and_then(Value::as_u64);
            match (protocol, field, set, is_tcp, port) {
                (Some(protocol), Some("saddr"), Some(set), true, Some(port)) => {
                    RuleShape::Redirect {
                        protocol: protocol.to_owned(),
                        set: set.to_owned(),
                        port,
                    }
                }
                _ => other(),
            }
        }
        _ => other(),
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
    use std::num::NonZeroU16;

    /// Captured from nftables 1.0.6 after applying `render` of `expected()`.
    const SAMPLE: &str = include_str!("../tests/data/list_v4_v6.json");

    fn expected() -> RuleSet {
        RuleSet::default().with_pods(
            ["10.0.0.1", "10.0.0.2", "fd00::1"]
                .iter()
                .map(|ip| ip.parse().unwrap()),
        )
    }

    fn differences(rules: &RuleSet, json: &str) -> Vec<String> {
        match verify_listing(rules, json) {
            Ok(()) => Vec::new(),
            Err(Error::Mismatch { differences, .. }) => differences,
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn sample_matches() {
        verify_listing(&expected(), SAMPLE).unwrap();
    }

    #[test]
    fn element_differences_are_named() {
        let mut rules = expected();
        rules.remove_pod("10.0.0.2".parse().unwrap());
        rules.add_pod("10.0.0.3".parse().unwrap());
        rules.add_pod("fd00::2".parse().unwrap());
        assert_eq!(
            differences(&rules, SAMPLE),
            [
                "set meshed_v4 lacks 10.0.0.3",
                "set meshed_v4 has unexpected 10.0.0.2",
                "set meshed_v6 lacks fd00::2",
            ]
        );
    }

    #[test]
    fn wrong_port_is_named() {
        let mut rules = expected();
        rules.redirect_port = NonZeroU16::new(15002).unwrap();
        let diffs = differences(&rules, SAMPLE);
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert!(diffs[0].contains("redirect to :15001"), "{}", diffs[0]);
        assert!(diffs[0].contains("expected"), "{}", diffs[0]);
    }

    #[test]
    fn wrong_table_is_missing() {
        let rules = RuleSet::new(TableName::new("other").unwrap(), NonZeroU16::MIN);
        assert_eq!(differences(&rules, SAMPLE), ["the table does not exist"]);
    }

    #[test]
    fn wrong_priority_and_extra_rule() {
        let json = SAMPLE.replace("\"prio\": -110", "\"prio\": -100").replace(
            "\"expr\": [{\"match\": {\"op\": \"==\", \"left\": {\"fib\"",
            "\"expr\": [{\"counter\": null}, {\"match\": {\"op\": \"==\", \"left\": {\"fib\"",
        );
        let diffs = differences(&expected(), &json);
        assert_eq!(diffs.len(), 2, "{diffs:?}");
        assert!(diffs[0].contains("priority Some(-100)"), "{}", diffs[0]);
        assert!(diffs[1].contains("unrecognised rule"), "{}", diffs[1]);
    }

    #[test]
    fn garbage_is_a_parse_error() {
        let err = verify_listing(&expected(), "not json").unwrap_err();
        assert!(matches!(err, Error::ParseListing { .. }), "{err}");
        let err = verify_listing(&expected(), "{}").unwrap_err();
        assert!(err.to_string().contains("nftables"), "{err}");
    }
}
