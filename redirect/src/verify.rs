//! Pure comparison of a `nft -j list table inet <name>` listing with the expected [`RuleSet`].
//! It owns the JSON reading (serde_json over nft's schema version 1) and the wording of
//! differences; it runs nothing ([`crate::Nft::verify`] fetches the listing).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

use crate::spec::{
    CHAIN_NAME, Capture, KEEP_DESTINATION_CHAIN, PORT_MAP_V4, PORT_MAP_V6, RuleSet, SET_V4, SET_V6,
};
use crate::{Error, Result};

/// Checks that `listing_json` (the output of `nft -j list table inet <name>`) matches `expected`.
///
/// Checked: the table exists; sets `meshed_v4`/`meshed_v6` have the right type and exactly the
/// expected elements; with TPROXY, maps `pod_port_v4`/`pod_port_v6` have the right types
/// (`ipv4_addr`/`ipv6_addr` : `inet_service`) and exactly the expected address-to-port elements;
/// the chain has the capture mode's shape (TPROXY: a filter chain at prerouting priority `mangle`
/// whose rules are, in order, the local-destination `return`, the transparent-socket rule, the
/// two `tproxy` rules to the pod's port from the maps, the two `tproxy` rules to the shared port,
/// all with the expected mark, and the two resets; REDIRECT: a nat chain at `dstnat - 10` with
/// the `return` and the two redirects); with TPROXY, the `keep_destination` nat chain; and there
/// are no other sets, maps or chains (with REDIRECT, no maps at all). Every difference is
/// reported in one [`Error::Mismatch`]. The policy routing is checked apart
/// ([`crate::routing_differences`]).
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
    maps: BTreeMap<String, MapListing>,
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

#[derive(Debug, Default)]
struct MapListing {
    /// The key type (`"type"` in the JSON).
    key_ty: String,
    /// The value type (`"map"` in the JSON).
    value_ty: String,
    /// Address-to-port elements.
    elements: BTreeMap<IpAddr, u64>,
    /// Elements that are not an address with a port, as JSON text.
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
    /// `<protocol> saddr @<set> meta l4proto tcp ct direction original tproxy <family> to :
    /// <protocol> saddr map @<map> meta mark set meta mark | MARK accept`: the pod's own port.
    TproxyPodPort {
        protocol: String,
        set: String,
        family: String,
        map: String,
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
            RuleShape::TproxyPodPort {
                protocol,
                set,
                family,
                map,
                mark,
            } => write!(
                f,
                "`{protocol} saddr @{set} meta l4proto tcp ct direction original tproxy {family} to : {protocol} saddr map @{map} meta mark set meta mark | {mark:#x} accept`"
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

/// A per-pod port map `render` writes: its name, key type and address-to-port elements.
struct ExpectedMap {
    name: &'static str,
    key_ty: &'static str,
    elements: BTreeMap<IpAddr, u64>,
}

/// The port maps `render` writes for `rules` (none with REDIRECT).
fn expected_port_maps(rules: &RuleSet) -> Vec<ExpectedMap> {
    match rules.capture {
        Capture::Redirect => Vec::new(),
        Capture::Tproxy => {
            let v4 = rules
                .pod_ports_v4
                .iter()
                .map(|(&ip, port)| (IpAddr::V4(ip), u64::from(port.get())))
                .collect();
            let v6 = rules
                .pod_ports_v6
                .iter()
                .map(|(&ip, port)| (IpAddr::V6(ip), u64::from(port.get())))
                .collect();
            vec![
                ExpectedMap {
                    name: PORT_MAP_V4,
                    key_ty: "ipv4_addr",
                    elements: v4,
                },
                ExpectedMap {
                    name: PORT_MAP_V6,
                    key_ty: "ipv6_addr",
                    elements: v6,
                },
            ]
        }
    }
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
            prerouting.rules.extend(
                [("ip", SET_V4, PORT_MAP_V4), ("ip6", SET_V6, PORT_MAP_V6)].map(
                    |(protocol, set, map)| RuleShape::TproxyPodPort {
                        protocol: protocol.into(),
                        set: set.into(),
                        family: protocol.into(),
                        map: map.into(),
                        mark,
                    },
                ),
            );
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
                "map" if in_table("table") => {
                    let name =
                        str_field(body, "name").ok_or_else(|| bad("map without name".into()))?;
                    listing.maps.insert(name.to_owned(), parse_map(body));
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
        let mut out = self.set_differences(expected);
        out.extend(self.map_differences(expected));
        out.extend(self.chain_differences(expected));
        out
    }

    fn set_differences(&self, expected: &RuleSet) -> Vec<String> {
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
        out
    }

    /// The per-pod port maps: with TPROXY exactly the expected ones, with REDIRECT none.
    fn map_differences(&self, expected: &RuleSet) -> Vec<String> {
        let capture = expected.capture;
        let mut out = Vec::new();
        let want_maps = expected_port_maps(expected);
        for ExpectedMap {
            name,
            key_ty,
            elements: want,
        } in &want_maps
        {
            let Some(map) = self.maps.get(*name) else {
                out.push(format!("map {name} is missing ({capture} capture)"));
                continue;
            };
            if map.key_ty != *key_ty || map.value_ty != "inet_service" {
                out.push(format!(
                    "map {name} has type {:?} : {:?}, expected {key_ty} : inet_service",
                    map.key_ty, map.value_ty
                ));
            }
            let missing = join_pairs(
                want.iter()
                    .filter(|(ip, _)| !map.elements.contains_key(*ip)),
            );
            if !missing.is_empty() {
                out.push(format!("map {name} lacks {missing}"));
            }
            for (ip, want_port) in want {
                match map.elements.get(ip) {
                    Some(got) if got != want_port => out.push(format!(
                        "map {name} maps {ip} to port {got}, expected {want_port}"
                    )),
                    _ => {}
                }
            }
            let extra = join_pairs(
                map.elements
                    .iter()
                    .filter(|(ip, _)| !want.contains_key(*ip)),
            );
            if !extra.is_empty() {
                out.push(format!("map {name} has unexpected {extra}"));
            }
            for element in &map.unexpected {
                out.push(format!("map {name} has unexpected element {element}"));
            }
        }
        for name in self.maps.keys() {
            if !want_maps.iter().any(|want| *name == want.name) {
                out.push(format!("unexpected map {name} ({capture} capture)"));
            }
        }
        out
    }

    fn chain_differences(&self, expected: &RuleSet) -> Vec<String> {
        let mut out = Vec::new();
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

/// Map elements as nft writes them: `ADDRESS : PORT, ...`.
fn join_pairs<'a>(pairs: impl Iterator<Item = (&'a IpAddr, &'a u64)>) -> String {
    pairs
        .map(|(ip, port)| format!("{ip} : {port}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A set's or map's type as text (a JSON string, or the JSON of a concatenation).
fn type_text(body: &Value, key: &str) -> String {
    body.get(key).map_or_else(String::new, |t| match t {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// A set's or map's elements (nft lists one element without the array on some versions).
fn elements(body: &Value) -> Vec<&Value> {
    match body.get("elem") {
        None => Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(single) => vec![single],
    }
}

/// An element's key as an address: plain elements are strings, elements with options (timeout,
/// comment) are `{"elem": {"val": ..}}`.
fn element_ip(element: &Value) -> Option<IpAddr> {
    element
        .as_str()
        .or_else(|| element.pointer("/elem/val").and_then(Value::as_str))
        .and_then(|text| text.parse().ok())
}

fn parse_set(body: &Value) -> SetListing {
    let mut set = SetListing {
        ty: type_text(body, "type"),
        ..SetListing::default()
    };
    for element in elements(body) {
        match element_ip(element) {
            Some(ip) => {
                set.elements.insert(ip);
            }
            None => set.unexpected.push(element.to_string()),
        }
    }
    set
}

/// A map as nftables 1.0.6 lists it: `{"type": KEY, "map": VALUE, "elem": [[KEY, VALUE], ..]}`,
/// an `inet_service` value being the port number.
fn parse_map(body: &Value) -> MapListing {
    let mut map = MapListing {
        key_ty: type_text(body, "type"),
        value_ty: type_text(body, "map"),
        ..MapListing::default()
    };
    for element in elements(body) {
        let pair = match element.as_array().map(Vec::as_slice) {
            Some([key, Value::Number(port)]) => element_ip(key).zip(port.as_u64()),
            _ => None,
        };
        match pair {
            Some((ip, port)) => {
                map.elements.insert(ip, port);
            }
            None => map.unexpected.push(element.to_string()),
        }
    }
    map
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
            let family = tproxy.pointer("/tproxy/family")?.as_str()?.to_owned();
            let mark = or_mark(mangle)?;
            // `to :PORT` only: an address in the tproxy statement is not what we render.
            let shape_ok = is_tcp(l4proto)
                && is_original(direction)
                && tproxy.pointer("/tproxy/addr").is_none()
                && accept.get("accept").is_some();
            if !shape_ok {
                return None;
            }
            let port = tproxy.pointer("/tproxy/port")?;
            if let Some(port) = port.as_u64() {
                return Some(RuleShape::Tproxy {
                    protocol,
                    set,
                    family,
                    port,
                    mark,
                });
            }
            // `to : <protocol> saddr map @<map>`: the port looked up by the same source address
            // that matched the set.
            let (key_protocol, map) = saddr_map(port)?;
            (key_protocol == protocol).then_some(RuleShape::TproxyPodPort {
                protocol,
                set,
                family,
                map,
                mark,
            })
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

/// `<protocol> saddr map @<map>` (a port expression): the protocol and the map.
fn saddr_map(expr: &Value) -> Option<(String, String)> {
    let payload = expr.pointer("/map/key/payload")?;
    let map = expr.pointer("/map/data")?.as_str()?.strip_prefix('@')?;
    let protocol = payload.get("protocol").and_then(Value::as_str)?;
    (payload.get("field").and_then(Value::as_str) == Some("saddr"))
        .then(|| (protocol.to_owned(), map.to_owned()))
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
mod tests;
