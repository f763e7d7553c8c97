//! The node view on the wire: [`WireView`], a node view keyed per kind, and the snapshot and
//! delta messages between two of them.
//!
//! The server builds the node-independent part ([`SharedWire`]: workloads, services,
//! namespaces) once per publication and shares it (`Arc`) between every node's [`WireView`],
//! adding only each node's tenants and policies ([`WireView::for_node`]); it sends what changed
//! since the last view it sent ([`WireView::delta`]; an unchanged shared part is skipped by
//! pointer). The client applies updates to its own copy ([`WireView::apply`]) and turns it back
//! into a [`NodeView`] ([`WireView::to_view`]). A delta is per kind: whole objects to upsert
//! and keys to remove, nothing finer.
//!
//! Must not touch: sockets, the sources; it is pure data.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use certs::Identity;

use crate::api as pb;
use crate::error::{Error, Result};
use crate::view::{
    Cluster, Endpoint, NodeView, Policy, PortRef, Service, ServicePort, TenantLimits,
    TenantSettings, Workload,
};

/// The part of every node's view that does not depend on the node, keyed as on the wire.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SharedWire {
    /// Workloads (every node's) by `namespace/name`.
    pub workloads: BTreeMap<String, pb::Workload>,
    /// Services by `namespace/name`.
    pub services: BTreeMap<String, pb::Service>,
    /// Meshed namespace names.
    pub namespaces: BTreeSet<String>,
}

impl SharedWire {
    /// The shared part of every node's view of `cluster`.
    pub fn from_cluster(cluster: &Cluster) -> Self {
        Self {
            workloads: cluster
                .workloads()
                .map(|w| (ns_key(&w.namespace, &w.name), workload_to_pb(w)))
                .collect(),
            services: cluster
                .services()
                .iter()
                .map(|s| (ns_key(&s.namespace, &s.name), service_to_pb(s)))
                .collect(),
            namespaces: cluster.meshed_namespaces().iter().cloned().collect(),
        }
    }
}

/// One node's view, keyed as on the wire.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WireView {
    /// The node it is for.
    pub node: String,
    /// The trust domain of its identities.
    pub trust_domain: String,
    /// Workloads, services and namespaces: the same for every node.
    pub shared: Arc<SharedWire>,
    /// Policies by `namespace/name`.
    pub policies: BTreeMap<String, pb::AuthorizationPolicy>,
    /// Tenant settings by SPIFFE ID.
    pub tenants: BTreeMap<String, pb::TenantSettings>,
}

/// Upserts and removals of one kind between two keyed maps.
fn diff<V: Clone + PartialEq>(
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
) -> (Vec<V>, Vec<String>) {
    let upserts = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(_, v)| v.clone())
        .collect();
    let removals = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (upserts, removals)
}

fn apply_kind<V>(
    map: &mut BTreeMap<String, V>,
    upserts: Vec<V>,
    removals: Vec<String>,
    key: impl Fn(&V) -> String,
) {
    for k in removals {
        map.remove(&k);
    }
    for v in upserts {
        map.insert(key(&v), v);
    }
}

fn ns_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl WireView {
    /// The wire form of `node`'s view of `cluster`, sharing `shared` (built from the same
    /// cluster) with every other node.
    pub fn for_node(cluster: &Cluster, shared: &Arc<SharedWire>, node: &str) -> Self {
        let (tenants, policies) = cluster.node_settings(node);
        Self {
            node: node.to_owned(),
            trust_domain: cluster.trust_domain().to_owned(),
            shared: shared.clone(),
            policies: policies
                .iter()
                .map(|p| (ns_key(&p.namespace, &p.name), policy_to_pb(p)))
                .collect(),
            tenants: tenants
                .iter()
                .map(|t| (t.identity.to_string(), tenant_to_pb(t)))
                .collect(),
        }
    }

    /// The wire form of a view.
    pub fn from_view(view: &NodeView) -> Self {
        let workloads = view
            .local
            .iter()
            .chain(&view.remote)
            .map(|w| (ns_key(&w.namespace, &w.name), workload_to_pb(w)))
            .collect();
        let services = view
            .services
            .iter()
            .map(|s| (ns_key(&s.namespace, &s.name), service_to_pb(s)))
            .collect();
        let policies = view
            .policies
            .iter()
            .map(|p| (ns_key(&p.namespace, &p.name), policy_to_pb(p)))
            .collect();
        let tenants = view
            .tenants
            .iter()
            .map(|t| (t.identity.to_string(), tenant_to_pb(t)))
            .collect();
        Self {
            node: view.node.clone(),
            trust_domain: view.trust_domain.clone(),
            shared: Arc::new(SharedWire {
                workloads,
                services,
                namespaces: view.meshed_namespaces.iter().cloned().collect(),
            }),
            policies,
            tenants,
        }
    }

    /// A full snapshot of this view at `version`.
    pub fn snapshot(&self, version: u64) -> pb::ViewUpdate {
        pb::ViewUpdate {
            version,
            snapshot: true,
            trust_domain: self.trust_domain.clone(),
            node: self.node.clone(),
            workloads: self.shared.workloads.values().cloned().collect(),
            services: self.shared.services.values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
            tenants: self.tenants.values().cloned().collect(),
            meshed_namespaces: self.shared.namespaces.iter().cloned().collect(),
            ..Default::default()
        }
    }

    /// What turns `self` into `new`, at `version`; `None` when nothing changed.
    pub fn delta(&self, new: &WireView, version: u64) -> Option<pb::ViewUpdate> {
        if self.node != new.node || self.trust_domain != new.trust_domain {
            return Some(new.snapshot(version));
        }
        let (mut workloads, mut removed_workloads) = (Vec::new(), Vec::new());
        let (mut services, mut removed_services) = (Vec::new(), Vec::new());
        let (mut meshed_namespaces, mut removed_namespaces) = (Vec::new(), Vec::new());
        // Every node shares one SharedWire per publication: the same pointer, nothing changed.
        if !Arc::ptr_eq(&self.shared, &new.shared) {
            let (old, new) = (&self.shared, &new.shared);
            (workloads, removed_workloads) = diff(&old.workloads, &new.workloads);
            (services, removed_services) = diff(&old.services, &new.services);
            meshed_namespaces = new
                .namespaces
                .difference(&old.namespaces)
                .cloned()
                .collect();
            removed_namespaces = old
                .namespaces
                .difference(&new.namespaces)
                .cloned()
                .collect();
        }
        let (policies, removed_policies) = diff(&self.policies, &new.policies);
        let (tenants, removed_tenants) = diff(&self.tenants, &new.tenants);
        let update = pb::ViewUpdate {
            version,
            snapshot: false,
            trust_domain: String::new(),
            node: String::new(),
            workloads,
            removed_workloads,
            services,
            removed_services,
            policies,
            removed_policies,
            tenants,
            removed_tenants,
            meshed_namespaces,
            removed_namespaces,
        };
        let empty = pb::ViewUpdate {
            version,
            ..Default::default()
        };
        (update != empty).then_some(update)
    }

    /// Applies an update received from the server: a snapshot replaces everything.
    pub fn apply(&mut self, update: pb::ViewUpdate) {
        if update.snapshot {
            *self = WireView {
                node: update.node,
                trust_domain: update.trust_domain,
                ..Default::default()
            };
        }
        // The client holds the only reference: no copy.
        let shared = Arc::make_mut(&mut self.shared);
        apply_kind(
            &mut shared.workloads,
            update.workloads,
            update.removed_workloads,
            |w| ns_key(&w.namespace, &w.name),
        );
        apply_kind(
            &mut shared.services,
            update.services,
            update.removed_services,
            |s| ns_key(&s.namespace, &s.name),
        );
        for ns in update.removed_namespaces {
            shared.namespaces.remove(&ns);
        }
        shared.namespaces.extend(update.meshed_namespaces);
        apply_kind(
            &mut self.policies,
            update.policies,
            update.removed_policies,
            |p| ns_key(&p.namespace, &p.name),
        );
        apply_kind(
            &mut self.tenants,
            update.tenants,
            update.removed_tenants,
            |t| t.identity.clone(),
        );
    }

    /// The view this wire form describes; fails on a value that does not parse.
    pub fn to_view(&self) -> Result<NodeView> {
        let mut local = Vec::new();
        let mut remote = Vec::new();
        for w in self.shared.workloads.values() {
            let workload = workload_from_pb(w)?;
            if workload.node == self.node {
                local.push(workload);
            } else {
                remote.push(workload);
            }
        }
        let by_name =
            |a: &Workload, b: &Workload| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name));
        local.sort_by(by_name);
        remote.sort_by(by_name);
        let mut services = self
            .shared
            .services
            .values()
            .map(service_from_pb)
            .collect::<Result<Vec<_>>>()?;
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut policies = self
            .policies
            .values()
            .map(policy_from_pb)
            .collect::<Result<Vec<_>>>()?;
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut tenants = self
            .tenants
            .values()
            .map(tenant_from_pb)
            .collect::<Result<Vec<_>>>()?;
        tenants.sort_by(|a, b| a.identity.cmp(&b.identity));
        Ok(NodeView {
            node: self.node.clone(),
            trust_domain: self.trust_domain.clone(),
            local,
            remote,
            meshed_namespaces: self.shared.namespaces.iter().cloned().collect(),
            tenants,
            services,
            policies,
        })
    }
}

fn bad(field: &'static str, value: &str) -> Error {
    Error::Wire {
        field,
        value: value.to_owned(),
    }
}

fn ip(field: &'static str, s: &str) -> Result<IpAddr> {
    s.parse().map_err(|_| bad(field, s))
}

fn identity(field: &'static str, s: &str) -> Result<Identity> {
    s.parse().map_err(|_| bad(field, s))
}

fn port_to_pb(port: &PortRef) -> (Option<u32>, Option<String>) {
    match port {
        PortRef::Number(n) => (Some(u32::from(*n)), None),
        PortRef::Name(s) => (None, Some(s.clone())),
    }
}

fn port_from_pb(field: &'static str, number: Option<u32>, name: Option<&str>) -> Result<PortRef> {
    match (number, name) {
        (Some(n), _) => u16::try_from(n)
            .map(PortRef::Number)
            .map_err(|_| bad(field, &n.to_string())),
        (None, Some(s)) if !s.is_empty() => Ok(PortRef::Name(s.to_owned())),
        _ => Err(bad(field, "")),
    }
}

fn workload_to_pb(w: &Workload) -> pb::Workload {
    pb::Workload {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        node: w.node.clone(),
        ips: w.ips.iter().map(ToString::to_string).collect(),
        identity: w.identity.to_string(),
        host_ip: w.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
    }
}

fn workload_from_pb(w: &pb::Workload) -> Result<Workload> {
    Ok(Workload {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        node: w.node.clone(),
        ips: w
            .ips
            .iter()
            .map(|s| ip("workload ip", s))
            .collect::<Result<_>>()?,
        identity: identity("workload identity", &w.identity)?,
        host_ip: match w.host_ip.as_str() {
            "" => None,
            s => Some(ip("workload host ip", s)?),
        },
    })
}

fn service_to_pb(s: &Service) -> pb::Service {
    pb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        cluster_ips: s.cluster_ips.iter().map(ToString::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                name: p.name.clone(),
                port: u32::from(p.port),
                target: Some(match &p.target {
                    PortRef::Number(n) => pb::service_port::Target::TargetNumber(u32::from(*n)),
                    PortRef::Name(s) => pb::service_port::Target::TargetName(s.clone()),
                }),
                protocol: p.protocol.clone(),
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| pb::Endpoint {
                pod: e.pod.clone(),
                ip: e.ip.to_string(),
                node: e.node.clone(),
                identity: e.identity.to_string(),
            })
            .collect(),
    }
}

fn service_from_pb(s: &pb::Service) -> Result<Service> {
    let ports = s
        .ports
        .iter()
        .map(|p| {
            let (number, name) = match &p.target {
                Some(pb::service_port::Target::TargetNumber(n)) => (Some(*n), None),
                Some(pb::service_port::Target::TargetName(s)) => (None, Some(s.as_str())),
                None => (None, None),
            };
            Ok(ServicePort {
                name: p.name.clone(),
                port: u16::try_from(p.port)
                    .map_err(|_| bad("service port", &p.port.to_string()))?,
                target: port_from_pb("service target port", number, name)?,
                protocol: p.protocol.clone(),
            })
        })
        .collect::<Result<_>>()?;
    let endpoints = s
        .endpoints
        .iter()
        .map(|e| {
            Ok(Endpoint {
                pod: e.pod.clone(),
                ip: ip("endpoint ip", &e.ip)?,
                node: e.node.clone(),
                identity: identity("endpoint identity", &e.identity)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        cluster_ips: s
            .cluster_ips
            .iter()
            .map(|s| ip("service cluster ip", s))
            .collect::<Result<_>>()?,
        ports,
        endpoints,
    })
}

fn policy_to_pb(p: &Policy) -> pb::AuthorizationPolicy {
    let port = match port_to_pb(&p.port) {
        (Some(n), _) => Some(pb::authorization_policy::Port::PortNumber(n)),
        (_, Some(s)) => Some(pb::authorization_policy::Port::PortName(s)),
        _ => None,
    };
    pb::AuthorizationPolicy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        pod_selector: p.pod_selector.clone().into_iter().collect(),
        port,
        allowed_identities: p.allowed.iter().map(ToString::to_string).collect(),
        allow_probes: p.allow_probes,
        target_pods: p.targets.iter().map(ToString::to_string).collect(),
    }
}

fn policy_from_pb(p: &pb::AuthorizationPolicy) -> Result<Policy> {
    let (number, name) = match &p.port {
        Some(pb::authorization_policy::Port::PortNumber(n)) => (Some(*n), None),
        Some(pb::authorization_policy::Port::PortName(s)) => (None, Some(s.as_str())),
        None => (None, None),
    };
    Ok(Policy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        pod_selector: p.pod_selector.clone().into_iter().collect(),
        port: port_from_pb("policy port", number, name)?,
        allowed: p
            .allowed_identities
            .iter()
            .map(|s| identity("policy identity", s))
            .collect::<Result<_>>()?,
        allow_probes: p.allow_probes,
        targets: p
            .target_pods
            .iter()
            .map(|s| ip("policy target", s))
            .collect::<Result<_>>()?,
    })
}

fn tenant_to_pb(t: &TenantSettings) -> pb::TenantSettings {
    pb::TenantSettings {
        identity: t.identity.to_string(),
        weight: t.weight,
        max_connections: t.limits.max_connections,
        max_connections_per_second: t.limits.max_connections_per_second,
        max_buffer_bytes: t.limits.max_buffer_bytes,
    }
}

fn tenant_from_pb(t: &pb::TenantSettings) -> Result<TenantSettings> {
    Ok(TenantSettings {
        identity: identity("tenant identity", &t.identity)?,
        weight: t.weight,
        limits: TenantLimits {
            max_connections: t.max_connections,
            max_connections_per_second: t.max_connections_per_second,
            max_buffer_bytes: t.max_buffer_bytes,
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::FileSource;
    use pretty_assertions::assert_eq;

    const POLICY: &str = include_str!("../../examples/authorization-policy.yaml");

    fn view(text: &str, node: &str) -> NodeView {
        let objects = FileSource::parse_str("t.yaml", text).unwrap();
        NodeView::build(&objects, node, "cluster.local").unwrap()
    }

    #[test]
    fn a_view_survives_the_wire_and_deltas_carry_only_changes() {
        let before = view(POLICY, "node-a");
        let wire = WireView::from_view(&before);
        let mut client = WireView::default();
        client.apply(wire.snapshot(1));
        assert_eq!(client.to_view().unwrap(), before);

        // Remove one pod and change a tenant's weight.
        let text = POLICY.replace("weight: 300", "weight: 301");
        let mut objects = FileSource::parse_str("t.yaml", &text).unwrap();
        objects
            .pods
            .retain(|p| p.metadata.name.as_deref() != Some("viz-0"));
        let after = NodeView::build(&objects, "node-a", "cluster.local").unwrap();
        let delta = wire.delta(&WireView::from_view(&after), 2).unwrap();
        assert!(!delta.snapshot);
        assert_eq!(delta.removed_workloads, ["dive-viz/viz-0"]);
        assert!(delta.workloads.is_empty());
        assert_eq!(delta.tenants.len(), 1);
        client.apply(delta);
        assert_eq!(client.to_view().unwrap(), after);
        assert_eq!(
            WireView::from_view(&after).delta(&WireView::from_view(&after), 3),
            None
        );
    }
}
