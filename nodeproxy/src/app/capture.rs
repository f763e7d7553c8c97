//! The capture rules the daemon owns, as plain values: the rule set a config and a snapshot ask
//! for, and the `pod_port` map entries to add and remove between two states.
//!
//! Owns [`capture_rule_set`], [`Rules`], [`PodPorts`] and [`port_changes`]. Deciding is pure;
//! the only I/O is through `redirect::Nft`, which the lifecycle calls.
//!
//! Must not touch: nftables syntax (only `redirect` renders it), listeners, pools.

use anyhow::Context as _;

use crate::config::Config;
use crate::state::Snapshot;

/// The capture rules `config` asks for, holding the meshed pods of `snap`; `None` with
/// --no-redirect. What `nodeproxy rules` prints and what the daemon applies.
pub fn capture_rule_set(
    config: &Config,
    snap: &Snapshot,
) -> anyhow::Result<Option<redirect::RuleSet>> {
    let Some(rules) = &config.capture.rules else {
        return Ok(None);
    };
    let table = redirect::TableName::new(rules.table.as_str())?;
    let port = std::num::NonZeroU16::new(config.outbound_port())
        .context("the capture port must not be 0")?;
    let routing = redirect::PolicyRouting {
        mark: std::num::NonZeroU32::new(rules.tproxy_mark)
            .context("--tproxy-mark must not be 0")?,
        table: redirect::RouteTable::new(rules.tproxy_table)?,
        ..redirect::PolicyRouting::default()
    };
    let set = redirect::RuleSet::new(table, port)
        .with_capture(config.capture.mode.into())
        .with_routing(routing)
        .with_pods(snap.meshed_ips());
    Ok(Some(set))
}

/// The capture rules the daemon owns.
#[derive(Debug)]
pub(crate) struct Rules {
    pub(crate) nft: redirect::Nft,
    /// The rule set without pods; the snapshot adds them.
    pub(crate) empty: redirect::RuleSet,
}

impl Rules {
    pub(crate) fn from_config(config: &Config, snap: &Snapshot) -> anyhow::Result<Option<Rules>> {
        let (Some(rules), Some(set)) = (&config.capture.rules, capture_rule_set(config, snap)?)
        else {
            return Ok(None);
        };
        let nft = if rules.nft.as_os_str() == "nft" {
            redirect::Nft::new()?
        } else {
            redirect::Nft::with_path(&rules.nft)
        };
        Ok(Some(Rules {
            nft,
            empty: set.without_pods(),
        }))
    }

    pub(crate) fn rule_set(&self, snap: &Snapshot, ports: &PodPorts) -> redirect::RuleSet {
        self.empty
            .clone()
            .with_pods(snap.meshed_ips())
            .with_pod_ports(ports.iter().map(|(ip, port)| (*ip, *port)))
    }
}

/// Pod IP → its tenant's own capture port, as applied to the kernel's `pod_port` maps.
pub(crate) type PodPorts = std::collections::BTreeMap<std::net::IpAddr, std::num::NonZeroU16>;

/// Pod IP and capture port pairs, as `update_ports` takes them.
pub(crate) type PortPairs = Vec<(std::net::IpAddr, std::num::NonZeroU16)>;

/// What `update_ports` must add and remove to go from `old` to `new`: the removed pairs carry
/// the port the kernel has.
pub(crate) fn port_changes(old: &PodPorts, new: &PodPorts) -> (PortPairs, PortPairs) {
    let removed = old
        .iter()
        .filter(|(ip, port)| new.get(ip) != Some(port))
        .map(|(ip, port)| (*ip, *port))
        .collect();
    let added = new
        .iter()
        .filter(|(ip, port)| old.get(ip) != Some(port))
        .map(|(ip, port)| (*ip, *port))
        .collect();
    (added, removed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn port_changes_remove_what_the_kernel_has_and_add_what_is_new() {
        let port = |p: u16| std::num::NonZeroU16::new(p).unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let old: PodPorts = [
            (ip("10.0.0.1"), port(40001)),
            (ip("10.0.0.2"), port(40002)),
            (ip("fd00::3"), port(40003)),
        ]
        .into();
        // .1 stays, .2 left, ::3 moved to another tenant's port, .4 is new.
        let new: PodPorts = [
            (ip("10.0.0.1"), port(40001)),
            (ip("fd00::3"), port(40009)),
            (ip("10.0.0.4"), port(40001)),
        ]
        .into();
        let (added, removed) = port_changes(&old, &new);
        assert_eq!(
            added,
            vec![(ip("10.0.0.4"), port(40001)), (ip("fd00::3"), port(40009))]
        );
        assert_eq!(
            removed,
            vec![(ip("10.0.0.2"), port(40002)), (ip("fd00::3"), port(40003))]
        );
        assert_eq!(port_changes(&new, &new), (vec![], vec![]));
    }
}
