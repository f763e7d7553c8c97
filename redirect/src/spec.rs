//! The rule set as a plain value: [`TableName`] (a validated nft identifier), [`Capture`] (TPROXY
//! or REDIRECT), [`PolicyRouting`] (the fwmark and routing table TPROXY needs) and [`RuleSet`]
//! (all of these plus the shared capture port, the meshed pod addresses and, with TPROXY, each
//! pod's own capture port). No I/O here and no rendering; see `render` and `routing`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::{NonZeroU16, NonZeroU32};

use crate::{Error, Result};

/// Default table name (family `inet`).
pub const DEFAULT_TABLE_NAME: &str = "nodeproxy";

/// Default outbound capture port (DESIGN §4).
pub const DEFAULT_REDIRECT_PORT: NonZeroU16 = match NonZeroU16::new(15001) {
    Some(port) => port,
    None => unreachable!(),
};

/// Name of the chain hooked at prerouting (a filter chain with TPROXY, a nat chain with REDIRECT).
pub const CHAIN_NAME: &str = "prerouting";

/// Name of the nat chain that TPROXY adds to keep a captured connection's destination: an
/// identity `dnat` for packets carrying our mark, so that no later NAT (kube-proxy's Service
/// DNAT at `dstnat`) rewrites it. Rewritten after TPROXY picked the listener, a flow's later
/// packets would no longer find their socket and the connection would be reset.
pub const KEEP_DESTINATION_CHAIN: &str = "keep_destination";

/// Priority of the TPROXY filter chain: `mangle` (-150), before conntrack's NAT (`dstnat`,
/// -100), so no NAT decision precedes ours.
pub const TPROXY_CHAIN_PRIORITY: i64 = -150;

/// Priority of the REDIRECT nat chain: `dstnat - 10`, so our NAT decision comes before
/// kube-proxy's (the first NAT decision of a flow wins, and we want to see the Service's
/// ClusterIP).
pub const REDIRECT_CHAIN_PRIORITY: i64 = -110;

/// Default fwmark bit that TPROXY sets on captured packets (OR-ed into the mark, so other
/// components' bits survive). Chosen outside the bits the usual node components use:
/// kube-proxy's 0x4000/0x8000, Calico's 0xffff0000, Cilium's 0x0f00 and upper 16 bits, Istio's
/// 0x111/0x539/0x222.
pub const DEFAULT_TPROXY_MARK: NonZeroU32 = match NonZeroU32::new(0x1000) {
    Some(mark) => mark,
    None => unreachable!(),
};

/// Default routing table of the TPROXY policy routing (`local default dev lo`).
pub const DEFAULT_ROUTE_TABLE: u32 = 15001;

/// Preference of the policy routing rule `fwmark MARK/MARK lookup TABLE`: low, so it comes
/// before the rules CNIs add for pod traffic (Calico's WireGuard rule at 99, the AWS VPC CNI's at
/// 512 and 1536), which would otherwise route a marked packet away from this node. It matches
/// only packets that carry our mark bit.
pub const RULE_PRIORITY: u32 = 90;

/// Name of the set holding meshed pods' IPv4 addresses.
pub const SET_V4: &str = "meshed_v4";

/// Name of the set holding meshed pods' IPv6 addresses.
pub const SET_V6: &str = "meshed_v6";

/// Name of the map from a meshed pod's IPv4 address to its own capture port (TPROXY only).
pub const PORT_MAP_V4: &str = "pod_port_v4";

/// Name of the map from a meshed pod's IPv6 address to its own capture port (TPROXY only).
pub const PORT_MAP_V6: &str = "pod_port_v6";

/// An nftables table name that is safe to splice into an nft script.
///
/// Only `[A-Za-z][A-Za-z0-9_]{0,62}` is accepted: nft allows more, but anything else could change
/// the meaning of a rendered script.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName(String);

impl TableName {
    /// Validates `name` as a table name.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > 63 {
            Some("it is longer than 63 bytes")
        } else if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
            Some("it does not start with an ASCII letter")
        } else if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            Some("it contains a character other than ASCII letters, digits and '_'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidTableName { name, reason }),
            None => Ok(Self(name)),
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TableName {
    fn default() -> Self {
        Self(DEFAULT_TABLE_NAME.to_owned())
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How captured connections reach the proxy's outbound listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Capture {
    /// `tproxy` in a filter chain at prerouting priority `mangle`, plus [`PolicyRouting`]: the
    /// packet is delivered, unchanged, to the transparent listener, so the accepted socket's
    /// local address is the original destination. No NAT: each destination has its own socket
    /// tuple, exactly as without the proxy.
    #[default]
    Tproxy,
    /// `redirect` in a nat chain at prerouting priority `dstnat - 10`: every captured connection
    /// becomes (pod ↔ node:port) and the destination is read back with `SO_ORIGINAL_DST`. Kept
    /// for nodes where TPROXY is not available. Its shared tuple lets a client's SYN to a new
    /// destination hit the proxy's TIME_WAIT socket of an old one (PAWS drops it: a 1 s stall).
    Redirect,
}

impl Capture {
    /// The nft chain type (`filter` or `nat`).
    pub fn chain_type(self) -> &'static str {
        match self {
            Capture::Tproxy => "filter",
            Capture::Redirect => "nat",
        }
    }

    /// The chain's priority as a number (as `nft -j` lists it).
    pub fn chain_priority(self) -> i64 {
        match self {
            Capture::Tproxy => TPROXY_CHAIN_PRIORITY,
            Capture::Redirect => REDIRECT_CHAIN_PRIORITY,
        }
    }

    /// The chain's priority in nft syntax.
    pub fn chain_priority_text(self) -> &'static str {
        match self {
            Capture::Tproxy => "mangle",
            Capture::Redirect => "dstnat - 10",
        }
    }

    /// The mode's name, as the `--capture` flag spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Capture::Tproxy => "tproxy",
            Capture::Redirect => "redirect",
        }
    }
}

impl fmt::Display for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A routing table id that is ours to fill: not 0 (unspecified) and not the kernel's `default`
/// (253), `main` (254) or `local` (255).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteTable(u32);

impl RouteTable {
    /// Validates `id` as a routing table of our own.
    pub fn new(id: u32) -> Result<Self> {
        let reason = match id {
            0 => Some("0 means no table"),
            253 => Some("253 is the kernel's `default` table"),
            254 => Some("254 is the kernel's `main` table"),
            255 => Some("255 is the kernel's `local` table"),
            _ => None,
        };
        match reason {
            Some(reason) => Err(Error::InvalidRouteTable { id, reason }),
            None => Ok(Self(id)),
        }
    }

    /// The table id.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for RouteTable {
    fn default() -> Self {
        Self(DEFAULT_ROUTE_TABLE)
    }
}

impl fmt::Display for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The policy routing TPROXY needs: packets carrying the `mark` bit(s) are looked up in `table`,
/// whose only route is `local default dev lo`, so they are delivered to this host (to the
/// socket TPROXY assigned) instead of being forwarded to their destination address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRouting {
    /// The fwmark bit(s) set on captured packets and matched as `fwmark MARK/MARK`.
    pub mark: NonZeroU32,
    /// The routing table that delivers marked packets locally.
    pub table: RouteTable,
    /// The preference of the `ip rule`.
    pub priority: u32,
}

impl Default for PolicyRouting {
    fn default() -> Self {
        Self {
            mark: DEFAULT_TPROXY_MARK,
            table: RouteTable::default(),
            priority: RULE_PRIORITY,
        }
    }
}

/// The complete capture rule set of a node, as a plain value.
///
/// The sets and maps are `BTreeSet`s and `BTreeMap`s so that rendering is deterministic.
/// IPv4-mapped IPv6 addresses are stored as IPv4 (see [`RuleSet::add_pod`]), because the kernel
/// sees such traffic as IPv4.
///
/// Per-pod capture ports ([`RuleSet::set_pod_port`]) only matter with [`Capture::Tproxy`]: a
/// meshed pod with a port entry is delivered to the transparent listener on that port (its
/// tenant's), and falls back to [`RuleSet::redirect_port`] when nothing listens there, because
/// `tproxy` finds no socket and the next rule is evaluated. REDIRECT cannot fall back (it
/// redirects even to a closed port), so with [`Capture::Redirect`] the maps are not rendered and
/// the ports are ignored. An entry for an address that is not a meshed pod captures nothing.
/// Remove a pod's entry before its listener closes: the kernel may hand the freed port to another
/// tenant's listener, which would then receive this pod's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// The `inet` table that holds everything.
    pub table: TableName,
    /// Port that captured connections are delivered to (the shared outbound listener), and with
    /// TPROXY the fallback for pods without a port entry or whose port has no listener.
    pub redirect_port: NonZeroU16,
    /// TPROXY (default) or REDIRECT.
    pub capture: Capture,
    /// The policy routing of [`Capture::Tproxy`] (unused with REDIRECT).
    pub routing: PolicyRouting,
    /// Meshed pods' IPv4 addresses (set [`SET_V4`]).
    pub meshed_v4: BTreeSet<Ipv4Addr>,
    /// Meshed pods' IPv6 addresses (set [`SET_V6`]).
    pub meshed_v6: BTreeSet<Ipv6Addr>,
    /// Meshed pods' own capture ports by IPv4 address (map [`PORT_MAP_V4`], TPROXY only).
    pub pod_ports_v4: BTreeMap<Ipv4Addr, NonZeroU16>,
    /// Meshed pods' own capture ports by IPv6 address (map [`PORT_MAP_V6`], TPROXY only).
    pub pod_ports_v6: BTreeMap<Ipv6Addr, NonZeroU16>,
}

impl Default for RuleSet {
    fn default() -> Self {
        Self::new(TableName::default(), DEFAULT_REDIRECT_PORT)
    }
}

impl RuleSet {
    /// A rule set with no meshed pods, capturing with TPROXY and the default policy routing.
    pub fn new(table: TableName, redirect_port: NonZeroU16) -> Self {
        Self {
            table,
            redirect_port,
            capture: Capture::default(),
            routing: PolicyRouting::default(),
            meshed_v4: BTreeSet::new(),
            meshed_v6: BTreeSet::new(),
            pod_ports_v4: BTreeMap::new(),
            pod_ports_v6: BTreeMap::new(),
        }
    }

    /// Builder: capture with `capture`.
    pub fn with_capture(mut self, capture: Capture) -> Self {
        self.capture = capture;
        self
    }

    /// Builder: TPROXY's policy routing.
    pub fn with_routing(mut self, routing: PolicyRouting) -> Self {
        self.routing = routing;
        self
    }

    /// The policy routing this rule set needs: `Some` with TPROXY, `None` with REDIRECT.
    pub fn policy_routing(&self) -> Option<&PolicyRouting> {
        match self.capture {
            Capture::Tproxy => Some(&self.routing),
            Capture::Redirect => None,
        }
    }

    /// The same rule set without any meshed pod or pod port: nothing new is captured, while
    /// (with TPROXY) packets of connections the proxy already holds still reach it. Used to drain
    /// at shutdown.
    pub fn without_pods(&self) -> Self {
        Self {
            meshed_v4: BTreeSet::new(),
            meshed_v6: BTreeSet::new(),
            pod_ports_v4: BTreeMap::new(),
            pod_ports_v6: BTreeMap::new(),
            ..self.clone()
        }
    }

    /// Adds a meshed pod address (IPv4-mapped IPv6 goes to the IPv4 set); returns whether it was new.
    pub fn add_pod(&mut self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self.meshed_v4.insert(v4),
            IpAddr::V6(v6) => self.meshed_v6.insert(v6),
        }
    }

    /// Removes a meshed pod address; returns whether it was present.
    pub fn remove_pod(&mut self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self.meshed_v4.remove(&v4),
            IpAddr::V6(v6) => self.meshed_v6.remove(&v6),
        }
    }

    /// Builder form of [`RuleSet::add_pod`] for many addresses.
    pub fn with_pods(mut self, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        for ip in ips {
            self.add_pod(ip);
        }
        self
    }

    /// Delivers the meshed pod `ip`'s connections to `port` (its tenant's transparent listener)
    /// instead of [`RuleSet::redirect_port`]; TPROXY only (see [`RuleSet`]). IPv4-mapped IPv6
    /// goes to the IPv4 map, like [`RuleSet::add_pod`]. Returns the port it replaces, if any.
    pub fn set_pod_port(&mut self, ip: IpAddr, port: NonZeroU16) -> Option<NonZeroU16> {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self.pod_ports_v4.insert(v4, port),
            IpAddr::V6(v6) => self.pod_ports_v6.insert(v6, port),
        }
    }

    /// Sends the pod `ip`'s connections back to [`RuleSet::redirect_port`]; returns the port it
    /// had, if any.
    pub fn remove_pod_port(&mut self, ip: IpAddr) -> Option<NonZeroU16> {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self.pod_ports_v4.remove(&v4),
            IpAddr::V6(v6) => self.pod_ports_v6.remove(&v6),
        }
    }

    /// Builder form of [`RuleSet::set_pod_port`] for many pods (a later pair for the same address
    /// wins).
    pub fn with_pod_ports(mut self, ports: impl IntoIterator<Item = (IpAddr, NonZeroU16)>) -> Self {
        for (ip, port) in ports {
            self.set_pod_port(ip, port);
        }
        self
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        let cases: &[(&str, bool)] = &[
            ("nodeproxy", true),
            ("np_test_1", true),
            ("A", true),
            ("", false),
            ("1abc", false),
            ("_abc", false),
            ("a-b", false),
            ("a b", false),
            ("a;flush ruleset", false),
            ("a}", false),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
        ];
        for (name, ok) in cases {
            assert_eq!(TableName::new(*name).is_ok(), *ok, "{name:?}");
        }
        let err = TableName::new("a-b").unwrap_err().to_string();
        assert!(err.contains("\"a-b\""), "{err}");
    }

    #[test]
    fn mapped_v6_goes_to_v4_set() {
        let mut rules = RuleSet::default();
        assert!(rules.add_pod("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!rules.add_pod("10.0.0.1".parse().unwrap()));
        assert!(rules.meshed_v6.is_empty());
        assert!(rules.remove_pod("10.0.0.1".parse().unwrap()));
        assert!(!rules.remove_pod("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn pod_ports_by_family() {
        let port = |p: u16| NonZeroU16::new(p).unwrap();
        let mut rules = RuleSet::default()
            .with_pods(["10.0.0.1".parse().unwrap()])
            .with_pod_ports([
                ("::ffff:10.0.0.1".parse().unwrap(), port(40001)),
                ("fd00::1".parse().unwrap(), port(40002)),
            ]);
        assert_eq!(
            rules.pod_ports_v4,
            BTreeMap::from([("10.0.0.1".parse().unwrap(), port(40001))])
        );
        assert_eq!(
            rules.pod_ports_v6,
            BTreeMap::from([("fd00::1".parse().unwrap(), port(40002))])
        );
        assert_eq!(
            rules.set_pod_port("10.0.0.1".parse().unwrap(), port(40003)),
            Some(port(40001))
        );
        assert_eq!(
            rules.remove_pod_port("::ffff:10.0.0.1".parse().unwrap()),
            Some(port(40003))
        );
        assert_eq!(rules.remove_pod_port("10.0.0.1".parse().unwrap()), None);

        // Draining drops the ports along with the pods; everything else stays.
        let drained = rules.without_pods();
        assert!(drained.meshed_v4.is_empty() && drained.pod_ports_v6.is_empty());
        assert_eq!(drained.redirect_port, rules.redirect_port);
    }

    #[test]
    fn defaults() {
        let rules = RuleSet::default();
        assert_eq!(rules.table.as_str(), "nodeproxy");
        assert_eq!(rules.redirect_port.get(), 15001);
        assert_eq!(rules.capture, Capture::Tproxy);
        assert_eq!(rules.routing.mark.get(), 0x1000);
        assert_eq!(rules.routing.table.get(), 15001);
        assert_eq!(rules.policy_routing(), Some(&rules.routing));
        assert_eq!(rules.with_capture(Capture::Redirect).policy_routing(), None);
    }

    #[test]
    fn route_tables() {
        for (id, ok) in [
            (0, false),
            (1, true),
            (100, true),
            (253, false),
            (254, false),
        ] {
            assert_eq!(RouteTable::new(id).is_ok(), ok, "{id}");
        }
        let err = RouteTable::new(255).unwrap_err().to_string();
        assert!(err.contains("255") && err.contains("local"), "{err}");
    }
}
