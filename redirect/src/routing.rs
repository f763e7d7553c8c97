//! Pure planning of TPROXY's policy routing: the `ip rule` that sends packets carrying our mark
//! to our routing table, and that table's one route, `local default dev lo`, per address family.
//!
//! Decide, then act: [`routing_commands`] renders what a clean node needs (what `nodeproxy
//! rules` shows); [`plan_routing`] and [`plan_routing_removal`] compare a [`RoutingListing`]
//! (parsed `ip -j` output) with the wanted state and return the [`IpCommand`]s that get there, so
//! applying twice changes nothing and a crashed run's leftovers are replaced, not duplicated;
//! [`routing_differences`] words the differences for `verify`. No I/O here; [`crate::Nft`] runs
//! the commands.
//!
//! Our state is defined by the routing table: every rule that looks up [`PolicyRouting::table`]
//! and every route in it belongs to us, and nothing else is touched.

use std::fmt;

use serde_json::Value;

use crate::spec::PolicyRouting;

/// An address family of the policy routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 (`ip -4`).
    V4,
    /// IPv6 (`ip -6`).
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The `ip` flag selecting the family.
    pub fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    /// The prefix matching every address of the family.
    fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// One `ip` invocation, as plain arguments (without the binary and without a namespace prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpCommand {
    args: Vec<String>,
}

impl IpCommand {
    fn new(family: Family, words: &[&str]) -> Self {
        Self {
            args: std::iter::once(family.flag())
                .chain(words.iter().copied())
                .map(str::to_owned)
                .collect(),
        }
    }

    /// The arguments after `ip`.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The command that lists the rules looking up our table (`ip -4 -j rule show table T`).
    pub fn list_rules(family: Family, routing: &PolicyRouting) -> Self {
        Self::new(
            family,
            &["-j", "rule", "show", "table", &routing.table.to_string()],
        )
    }

    /// The command that lists the routes of our table (`ip -4 -j route show table T`).
    pub fn list_routes(family: Family, routing: &PolicyRouting) -> Self {
        Self::new(
            family,
            &["-j", "route", "show", "table", &routing.table.to_string()],
        )
    }
}

impl fmt::Display for IpCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ip {}", self.args.join(" "))
    }
}

fn fwmark(routing: &PolicyRouting) -> String {
    format!("{:#x}/{:#x}", routing.mark, routing.mark)
}

fn add_route(family: Family, routing: &PolicyRouting) -> IpCommand {
    let table = routing.table.to_string();
    #[rustfmt::skip]
    let words = ["route", "replace", "local", family.any(), "dev", "lo", "table", &table];
    IpCommand::new(family, &words)
}

fn add_rule(family: Family, routing: &PolicyRouting) -> IpCommand {
    let (pref, mark, table) = (
        routing.priority.to_string(),
        fwmark(routing),
        routing.table.to_string(),
    );
    #[rustfmt::skip]
    let words = ["rule", "add", "pref", &pref, "fwmark", &mark, "lookup", &table];
    IpCommand::new(family, &words)
}

fn delete_rule(family: Family, routing: &PolicyRouting, rule: &ListedRule) -> IpCommand {
    let table = routing.table.to_string();
    match rule.priority {
        Some(pref) => IpCommand::new(
            family,
            &["rule", "del", "pref", &pref.to_string(), "lookup", &table],
        ),
        None => IpCommand::new(family, &["rule", "del", "lookup", &table]),
    }
}

fn flush_routes(family: Family, routing: &PolicyRouting) -> IpCommand {
    IpCommand::new(
        family,
        &["route", "flush", "table", &routing.table.to_string()],
    )
}

/// The commands that set up the policy routing on a node that has none of it: per family, the
/// route first (harmless alone), then the rule that makes marked packets use it.
pub fn routing_commands(routing: &PolicyRouting) -> Vec<IpCommand> {
    Family::ALL
        .iter()
        .flat_map(|&family| [add_route(family, routing), add_rule(family, routing)])
        .collect()
}

/// A rule as `ip -j rule show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListedRule {
    priority: Option<u32>,
    fwmark: Option<u32>,
    fwmask: Option<u32>,
    /// Selectors or actions other than pref, fwmark and table (e.g. `iif`, `from`, `not`).
    other_keys: bool,
    json: String,
}

impl ListedRule {
    fn is_ours(&self, routing: &PolicyRouting) -> bool {
        let mark = Some(routing.mark.get());
        self.priority == Some(routing.priority)
            && self.fwmark == mark
            && self.fwmask == mark
            && !self.other_keys
    }
}

/// A route as `ip -j route show table T` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListedRoute {
    ours: bool,
    json: String,
}

/// What the kernel has of our policy routing in one address family: the rules that look up our
/// table and the routes in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyListing {
    rules: Vec<ListedRule>,
    routes: Vec<ListedRoute>,
}

impl FamilyListing {
    /// Parses the output of [`IpCommand::list_rules`] and [`IpCommand::list_routes`] (pass `[]`
    /// for routes when the kernel says the table does not exist). The error says what was wrong.
    pub fn parse(rules_json: &str, routes_json: &str) -> Result<Self, String> {
        let rules = json_array(rules_json)?
            .iter()
            .map(|rule| ListedRule {
                priority: rule
                    .get("priority")
                    .and_then(Value::as_u64)
                    .and_then(|p| u32::try_from(p).ok()),
                fwmark: rule.get("fwmark").and_then(parse_u32),
                fwmask: rule.get("fwmask").and_then(parse_u32),
                other_keys: rule.as_object().is_none_or(|o| {
                    o.iter().any(|(key, value)| match key.as_str() {
                        "priority" | "fwmark" | "fwmask" | "table" => false,
                        "src" => value.as_str() != Some("all"),
                        _ => true,
                    })
                }),
                json: rule.to_string(),
            })
            .collect();
        let routes = json_array(routes_json)?
            .iter()
            .map(|route| ListedRoute {
                ours: ["type", "dst", "dev"].map(|k| route.get(k).and_then(Value::as_str))
                    == [Some("local"), Some("default"), Some("lo")],
                json: route.to_string(),
            })
            .collect();
        Ok(Self { rules, routes })
    }

    fn rules_are_ours(&self, routing: &PolicyRouting) -> bool {
        matches!(self.rules.as_slice(), [rule] if rule.is_ours(routing))
    }

    fn routes_are_ours(&self) -> bool {
        matches!(self.routes.as_slice(), [route] if route.ours)
    }
}

fn json_array(json: &str) -> Result<Vec<Value>, String> {
    // `ip -j` prints nothing at all for some empty listings.
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    match serde_json::from_str(json).map_err(|e| e.to_string())? {
        Value::Array(items) => Ok(items),
        other => Err(format!("expected a JSON array, got {other}")),
    }
}

/// `"0x1000"` (how `ip -j` prints marks) or a number.
fn parse_u32(value: &Value) -> Option<u32> {
    match value {
        Value::String(s) => match s.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        },
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    }
}

/// Our policy routing in the kernel, per family; `None` for a family the kernel does not support
/// (IPv6 disabled), which is then neither set up nor checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingListing {
    /// IPv4.
    pub v4: Option<FamilyListing>,
    /// IPv6.
    pub v6: Option<FamilyListing>,
}

impl RoutingListing {
    fn families(&self) -> impl Iterator<Item = (Family, &FamilyListing)> {
        [(Family::V4, &self.v4), (Family::V6, &self.v6)]
            .into_iter()
            .filter_map(|(family, listing)| Some((family, listing.as_ref()?)))
    }
}

/// The commands that turn `current` into exactly our policy routing: nothing when it already is;
/// otherwise every rule looking up our table that is not exactly ours is deleted (a stale or
/// duplicated rule from a crashed run) and ours added, and a table holding anything but our
/// route is flushed and filled. Per family, routes come before rules.
pub fn plan_routing(routing: &PolicyRouting, current: &RoutingListing) -> Vec<IpCommand> {
    let mut out = Vec::new();
    for (family, listing) in current.families() {
        if !listing.routes_are_ours() {
            if !listing.routes.is_empty() {
                out.push(flush_routes(family, routing));
            }
            out.push(add_route(family, routing));
        }
        if !listing.rules_are_ours(routing) {
            out.extend(
                listing
                    .rules
                    .iter()
                    .map(|rule| delete_rule(family, routing, rule)),
            );
            out.push(add_rule(family, routing));
        }
    }
    out
}

/// The commands that remove every rule looking up our table and every route in it; nothing when
/// there are none.
pub fn plan_routing_removal(routing: &PolicyRouting, current: &RoutingListing) -> Vec<IpCommand> {
    let mut out = Vec::new();
    for (family, listing) in current.families() {
        out.extend(
            listing
                .rules
                .iter()
                .map(|rule| delete_rule(family, routing, rule)),
        );
        if !listing.routes.is_empty() {
            out.push(flush_routes(family, routing));
        }
    }
    out
}

/// One sentence per difference between `current` and our policy routing.
pub fn routing_differences(routing: &PolicyRouting, current: &RoutingListing) -> Vec<String> {
    let mut out = Vec::new();
    let table = routing.table;
    for (family, listing) in current.families() {
        let flag = family.flag();
        if !listing.rules.iter().any(|rule| rule.is_ours(routing)) {
            out.push(format!(
                "ip {flag} rule `pref {} fwmark {} lookup {table}` is missing",
                routing.priority,
                fwmark(routing)
            ));
        }
        let mut seen_ours = false;
        for rule in &listing.rules {
            if rule.is_ours(routing) && !seen_ours {
                seen_ours = true;
            } else {
                out.push(format!(
                    "ip {flag} rule {} also looks up table {table}",
                    rule.json
                ));
            }
        }
        if !listing.routes.iter().any(|route| route.ours) {
            out.push(format!(
                "ip {flag} route `local default dev lo table {table}` is missing"
            ));
        }
        let mut seen_ours = false;
        for route in &listing.routes {
            if route.ours && !seen_ours {
                seen_ours = true;
            } else {
                out.push(format!(
                    "table {table} has an unexpected ip {flag} route {}",
                    route.json
                ));
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    /// Captured from iproute2 6.1 after `routing_commands` (the route lists differ per family).
    const OUR_RULE: &str =
        r#"[{"priority":90,"src":"all","fwmark":"0x1000","fwmask":"0x1000","table":"15001"}]"#;
    const OUR_ROUTE_V4: &str =
        r#"[{"type":"local","dst":"default","dev":"lo","scope":"host","flags":[]}]"#;
    const OUR_ROUTE_V6: &str =
        r#"[{"type":"local","dst":"default","dev":"lo","metric":1024,"flags":[],"pref":"medium"}]"#;

    fn listing(v4: (&str, &str), v6: Option<(&str, &str)>) -> RoutingListing {
        RoutingListing {
            v4: Some(FamilyListing::parse(v4.0, v4.1).unwrap()),
            v6: v6.map(|(rules, routes)| FamilyListing::parse(rules, routes).unwrap()),
        }
    }

    fn lines(commands: &[IpCommand]) -> Vec<String> {
        commands.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn clean_node_commands() {
        assert_eq!(
            lines(&routing_commands(&PolicyRouting::default())),
            [
                "ip -4 route replace local 0.0.0.0/0 dev lo table 15001",
                "ip -4 rule add pref 90 fwmark 0x1000/0x1000 lookup 15001",
                "ip -6 route replace local ::/0 dev lo table 15001",
                "ip -6 rule add pref 90 fwmark 0x1000/0x1000 lookup 15001",
            ]
        );
    }

    #[test]
    fn plans_from_every_starting_point() {
        let routing = PolicyRouting::default();
        let stale_rule = r#"[{"priority":90,"src":"all","fwmark":"0x1000","fwmask":"0x1000","table":"15001"},
            {"priority":89,"src":"all","fwmark":"0x1","table":"15001"},
            {"priority":90,"src":"10.0.0.0/8","table":"15001"}]"#;
        let stale_routes = r#"[{"dst":"10.0.0.0/8","dev":"eth0","flags":[]},
            {"type":"local","dst":"default","dev":"lo","scope":"host","flags":[]}]"#;
        let clean = lines(&routing_commands(&routing));
        let clean: Vec<&str> = clean.iter().map(String::as_str).collect();
        type Case<'a> = (&'a str, RoutingListing, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (
                "nothing there: everything is added",
                listing(("[]", "[]"), Some(("[]", ""))),
                clean,
            ),
            (
                "already exact: nothing to do",
                listing((OUR_RULE, OUR_ROUTE_V4), Some((OUR_RULE, OUR_ROUTE_V6))),
                vec![],
            ),
            (
                "IPv6 unsupported: only IPv4",
                listing(("[]", "[]"), None),
                vec![
                    "ip -4 route replace local 0.0.0.0/0 dev lo table 15001",
                    "ip -4 rule add pref 90 fwmark 0x1000/0x1000 lookup 15001",
                ],
            ),
            (
                "leftovers of another configuration are replaced, not duplicated",
                listing((stale_rule, stale_routes), Some((OUR_RULE, OUR_ROUTE_V6))),
                vec![
                    "ip -4 route flush table 15001",
                    "ip -4 route replace local 0.0.0.0/0 dev lo table 15001",
                    "ip -4 rule del pref 90 lookup 15001",
                    "ip -4 rule del pref 89 lookup 15001",
                    "ip -4 rule del pref 90 lookup 15001",
                    "ip -4 rule add pref 90 fwmark 0x1000/0x1000 lookup 15001",
                ],
            ),
        ];
        for (name, current, want) in cases {
            assert_eq!(lines(&plan_routing(&routing, &current)), want, "{name}");
        }
    }

    #[test]
    fn removal_plans() {
        let routing = PolicyRouting::default();
        let current = listing((OUR_RULE, OUR_ROUTE_V4), Some((OUR_RULE, OUR_ROUTE_V6)));
        assert_eq!(
            lines(&plan_routing_removal(&routing, &current)),
            [
                "ip -4 rule del pref 90 lookup 15001",
                "ip -4 route flush table 15001",
                "ip -6 rule del pref 90 lookup 15001",
                "ip -6 route flush table 15001",
            ]
        );
        let empty = listing(("[]", "[]"), Some(("[]", "[]")));
        assert!(plan_routing_removal(&routing, &empty).is_empty());
    }

    #[test]
    fn differences_are_named() {
        let routing = PolicyRouting::default();
        let exact = listing((OUR_RULE, OUR_ROUTE_V4), Some((OUR_RULE, OUR_ROUTE_V6)));
        assert!(routing_differences(&routing, &exact).is_empty());

        let other_mark =
            r#"[{"priority":90,"src":"all","fwmark":"0x1","fwmask":"0x1","table":"15001"}]"#;
        let current = listing((other_mark, "[]"), Some((OUR_RULE, OUR_ROUTE_V6)));
        assert_eq!(
            routing_differences(&routing, &current),
            [
                "ip -4 rule `pref 90 fwmark 0x1000/0x1000 lookup 15001` is missing",
                r#"ip -4 rule {"fwmark":"0x1","fwmask":"0x1","priority":90,"src":"all","table":"15001"} also looks up table 15001"#,
                "ip -4 route `local default dev lo table 15001` is missing",
            ]
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(FamilyListing::parse("not json", "[]").is_err());
        assert!(
            FamilyListing::parse("{}", "[]")
                .unwrap_err()
                .contains("array")
        );
    }
}
