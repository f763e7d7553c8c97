//! The rule set as a plain value: [`TableName`] (a validated nft identifier) and [`RuleSet`]
//! (table, redirect port, meshed pod addresses). No I/O here and no rendering; see `render`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU16;

use crate::{Error, Result};

/// Default table name (family `inet`).
pub const DEFAULT_TABLE_NAME: &str = "nodeproxy";

/// Default outbound capture port (DESIGN §4).
pub const DEFAULT_REDIRECT_PORT: NonZeroU16 = match NonZeroU16::new(15001) {
    Some(port) => port,
    None => unreachable!(),
};

/// Name of the nat chain hooked at prerouting.
pub const CHAIN_NAME: &str = "prerouting";

/// Priority of the nat chain: `dstnat - 10`, so our NAT decision comes before kube-proxy's (the
/// first NAT decision of a flow wins, and we want to see the Service's ClusterIP).
pub const CHAIN_PRIORITY: i64 = -110;

/// [`CHAIN_PRIORITY`] as written in nft syntax.
pub const CHAIN_PRIORITY_TEXT: &str = "dstnat - 10";

/// Name of the set holding meshed pods' IPv4 addresses.
pub const SET_V4: &str = "meshed_v4";

/// Name of the set holding meshed pods' IPv6 addresses.
pub const SET_V6: &str = "meshed_v6";

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

/// The complete capture rule set of a node, as a plain value.
///
/// The sets are `BTreeSet`s so that rendering is deterministic. IPv4-mapped IPv6 addresses are
/// stored as IPv4 (see [`RuleSet::add_pod`]), because the kernel sees such traffic as IPv4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// The `inet` table that holds everything.
    pub table: TableName,
    /// Port that captured connections are redirected to (the outbound listener).
    pub redirect_port: NonZeroU16,
    /// Meshed pods' IPv4 addresses (set [`SET_V4`]).
    pub meshed_v4: BTreeSet<Ipv4Addr>,
    /// Meshed pods' IPv6 addresses (set [`SET_V6`]).
    pub meshed_v6: BTreeSet<Ipv6Addr>,
}

impl Default for RuleSet {
    fn default() -> Self {
        Self::new(TableName::default(), DEFAULT_REDIRECT_PORT)
    }
}

impl RuleSet {
    /// A rule set with no meshed pods.
    pub fn new(table: TableName, redirect_port: NonZeroU16) -> Self {
        Self {
            table,
            redirect_port,
            meshed_v4: BTreeSet::new(),
            meshed_v6: BTreeSet::new(),
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
    fn defaults() {
        let rules = RuleSet::default();
        assert_eq!(rules.table.as_str(), "nodeproxy");
        assert_eq!(rules.redirect_port.get(), 15001);
    }
}
