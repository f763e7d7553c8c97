//! What a new node view changes, decided before anything is done about it.
//!
//! Owns [`ViewChange`]: a plain value computed from the old and the new snapshot (no I/O): the
//! pod addresses that join and leave the capture sets and the tenants the pools must hold.
//! The lifecycle then acts on it in an order that never captures a pod before the daemon
//! knows it (see `Running::apply_view`).
//!
//! Must not touch: the kernel, pools, listeners (the lifecycle acts; this only decides).

use std::collections::BTreeMap;
use std::net::IpAddr;

use certs::Identity;

use crate::state::Snapshot;

/// What going from one snapshot to the next must change.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ViewChange {
    /// Pod addresses that join the capture sets.
    pub(crate) pods_added: Vec<IpAddr>,
    /// Pod addresses that leave the capture sets.
    pub(crate) pods_removed: Vec<IpAddr>,
    /// Every tenant the new view has, with its weight and limits: what the pools reconcile to.
    pub(crate) tenants: BTreeMap<Identity, tenancy::TenantConfig>,
}

impl ViewChange {
    /// Decides the change from `old` to `new`.
    pub(crate) fn decide(old: &Snapshot, new: &Snapshot) -> Self {
        let (old_ips, new_ips) = (old.meshed_ips(), new.meshed_ips());
        ViewChange {
            pods_added: new_ips.difference(&old_ips).copied().collect(),
            pods_removed: old_ips.difference(&new_ips).copied().collect(),
            tenants: new.tenant_configs(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use controlplane::view::NodeView;

    const NODE: &str = "n1";

    /// A node view of `pods`: (namespace, service account, pod IP) on this node, all meshed.
    fn snapshot(pods: &[(&str, &str, &str)], version: u64) -> Snapshot {
        let mut yaml = String::new();
        let mut namespaces: Vec<&str> = pods.iter().map(|p| p.0).collect();
        namespaces.dedup();
        for ns in namespaces {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    nodeproxy.io/mesh: enabled\n"
            ));
        }
        for (i, (ns, sa, ip)) in pods.iter().enumerate() {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: {ns}\nspec:\n  nodeName: {NODE}\n  serviceAccountName: {sa}\n  containers: [{{name: c, image: x}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  hostIP: 192.0.2.1\n"
            ));
        }
        let objects = controlplane::file::FileSource::parse_str("test", &yaml).unwrap();
        let view = NodeView::build(&objects, NODE, certs::DEFAULT_TRUST_DOMAIN).unwrap();
        Snapshot::new(view, version)
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    fn tenant(ns: &str, sa: &str) -> Identity {
        Identity::new(certs::DEFAULT_TRUST_DOMAIN, ns, sa).unwrap()
    }

    type Case<'a> = (
        &'a Snapshot,
        &'a Snapshot,
        &'a [&'a str],
        &'a [&'a str],
        Vec<Identity>,
    );

    #[test]
    fn pods_that_come_and_go_and_the_tenants_that_remain() {
        let empty = snapshot(&[], 1);
        let one = snapshot(&[("a", "web", "10.0.0.1")], 2);
        let two = snapshot(&[("a", "web", "10.0.0.1"), ("b", "db", "10.0.0.2")], 3);
        let moved = snapshot(&[("b", "db", "10.0.0.2"), ("b", "db", "fd00::3")], 4);

        // (old, new, pods added, pods removed, tenants after)
        let cases: [Case; 5] = [
            (&empty, &empty, &[], &[], vec![]),
            (&empty, &one, &["10.0.0.1"], &[], vec![tenant("a", "web")]),
            (
                &one,
                &two,
                &["10.0.0.2"],
                &[],
                vec![tenant("a", "web"), tenant("b", "db")],
            ),
            (
                &two,
                &moved,
                &["fd00::3"],
                &["10.0.0.1"],
                vec![tenant("b", "db")],
            ),
            (&moved, &empty, &[], &["10.0.0.2", "fd00::3"], vec![]),
        ];
        for (old, new, added, removed, tenants) in cases {
            let change = ViewChange::decide(old, new);
            assert_eq!(change.pods_added, ips(added), "{change:?}");
            assert_eq!(change.pods_removed, ips(removed), "{change:?}");
            assert_eq!(
                change.tenants.keys().cloned().collect::<Vec<_>>(),
                tenants,
                "{change:?}"
            );
        }
    }
}
