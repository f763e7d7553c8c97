//! Services: the services of meshed namespaces, with their meshed endpoints.
//!
//! Owns [`Service`], [`ServicePort`], [`PortRef`] and [`Endpoint`]. A service's endpoints are
//! the meshed workloads of its namespace that its selector matches (a service without a
//! selector has none here: its endpoints are managed by hand). `port_ref` reads a
//! Kubernetes port (number or container port name), for services and policies alike.
//!
//! Must not touch: pods' meshing rules (it reads the workloads [`super::pods`] made).

use std::collections::BTreeSet;
use std::net::IpAddr;

use certs::Identity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use super::{Labelled, non_empty, selects};
use crate::objects::{DEFAULT_NAMESPACE, Objects};

/// A service of a meshed namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    /// The service's name.
    pub name: String,
    /// The service's namespace.
    pub namespace: String,
    /// Its cluster addresses (empty for a headless service).
    pub cluster_ips: Vec<IpAddr>,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// The meshed pods its selector matches, sorted by pod.
    pub endpoints: Vec<Endpoint>,
}

/// One port of a [`Service`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// The port's name (may be empty).
    pub name: String,
    /// The service port.
    pub port: u16,
    /// The pod port it forwards to.
    pub target: PortRef,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// A pod port, by number or by container port name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(untagged)]
pub enum PortRef {
    /// A port number.
    Number(u16),
    /// A container port name, resolved against each pod.
    Name(String),
}

/// A meshed pod behind a [`Service`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The pod's primary address.
    pub ip: IpAddr,
    /// The node it runs on.
    pub node: String,
    /// Its identity.
    pub identity: Identity,
}

/// The services of meshed namespaces with the meshed workloads their selector matches.
/// A service without a selector has no endpoints here (its endpoints are managed by hand).
pub(super) fn translate(
    objects: &Objects,
    meshed: &BTreeSet<&str>,
    workloads: &[Labelled],
) -> Vec<Service> {
    let mut services = Vec::new();
    for svc in &objects.services {
        let namespace = non_empty(svc.metadata.namespace.as_deref()).unwrap_or(DEFAULT_NAMESPACE);
        let Some(name) = non_empty(svc.metadata.name.as_deref()) else {
            continue;
        };
        if !meshed.contains(namespace) {
            continue;
        }
        let spec = svc.spec.as_ref();
        let mut cluster_ips: Vec<IpAddr> = spec
            .and_then(|s| s.cluster_ips.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(spec.and_then(|s| s.cluster_ip.clone()))
            .filter_map(|ip| ip.parse().ok())
            .collect();
        cluster_ips.dedup();
        let ports = spec
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let target = match &p.target_port {
                    None => PortRef::Number(port),
                    Some(t) => port_ref(t)?,
                };
                Some(ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    port,
                    target,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                })
            })
            .collect();
        let selector = spec.and_then(|s| s.selector.clone()).unwrap_or_default();
        let endpoints = if selector.is_empty() {
            Vec::new()
        } else {
            workloads
                .iter()
                .filter(|(w, labels)| w.namespace == namespace && selects(&selector, labels))
                .filter_map(|(w, _)| {
                    Some(Endpoint {
                        pod: format!("{}/{}", w.namespace, w.name),
                        ip: *w.ips.first()?,
                        node: w.node.clone(),
                        identity: w.identity.clone(),
                    })
                })
                .collect()
        };
        services.push(Service {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            cluster_ips,
            ports,
            endpoints,
        });
    }
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    services
}

/// A port number (1..=65535) or a non-empty name.
pub(super) fn port_ref(port: &IntOrString) -> Option<PortRef> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|n| *n > 0)
            .map(PortRef::Number),
        IntOrString::String(s) if !s.is_empty() => Some(match s.parse::<u16>() {
            Ok(n) if n > 0 => PortRef::Number(n),
            _ => PortRef::Name(s.clone()),
        }),
        IntOrString::String(_) => None,
    }
}
