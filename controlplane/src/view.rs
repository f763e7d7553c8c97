//! The translation from Kubernetes objects to one node's view of the mesh.
//!
//! Owns [`NodeView`] and its parts ([`Workload`], [`Service`], [`Policy`], [`TenantSettings`])
//! and the rules that make a pod part of the mesh: it is in a namespace labelled
//! [`MESH_LABEL`]`=`[`MESH_ENABLED`], it has not finished (phase is not `Succeeded` or
//! `Failed`) and it does not use the host's network. Each meshed pod becomes a workload with a
//! SPIFFE identity from its namespace and service account; services of meshed namespaces get
//! their endpoints from the meshed pods their selector matches; every local tenant gets its
//! settings from the `TenantPolicy` naming it, or defaults. The translation is pure: every
//! source (file, Kubernetes) feeds it the same objects. [`Mode`] says what a problem does:
//! fail the whole view (file source: the operator fixes the file) or skip the object
//! (Kubernetes source: one bad object must not stop the cluster's view; a pod without an
//! address yet is normal while it is pending).
//!
//! Must not touch: sockets, the data path, the environment, files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use certs::Identity;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::crd::{self, AuthorizationPolicy, TenantPolicy};

use crate::error::{Error, Origin, Problem, Result, sort_problems};
use crate::objects::{DEFAULT_NAMESPACE, Objects};

/// The namespace label that opts a namespace's pods into the mesh.
pub const MESH_LABEL: &str = "nodeproxy.io/mesh";

/// The value of [`MESH_LABEL`] that opts in.
pub const MESH_ENABLED: &str = "enabled";

/// The service account of a pod that names none (as Kubernetes does).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// What one node needs to know: its own meshed workloads and the meshed workloads elsewhere.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeView {
    /// The node this view is for (`spec.nodeName` of its pods).
    pub node: String,
    /// The trust domain of every identity in the view.
    pub trust_domain: String,
    /// Meshed pods on this node, sorted by (namespace, name).
    pub local: Vec<Workload>,
    /// Meshed pods on other nodes, sorted by (namespace, name).
    pub remote: Vec<Workload>,
    /// Names of the namespaces labelled into the mesh, sorted.
    pub meshed_namespaces: Vec<String>,
    /// Settings of every local tenant (identity of a local workload), sorted by identity;
    /// defaults when no `TenantPolicy` names it.
    pub tenants: Vec<TenantSettings>,
    /// Services of meshed namespaces with their meshed endpoints, sorted by (namespace, name).
    pub services: Vec<Service>,
    /// Authorization policies protecting at least one local workload, sorted by
    /// (namespace, name).
    pub policies: Vec<Policy>,
}

/// The CPU weight and admission limits of one tenant on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TenantSettings {
    /// The tenant.
    pub identity: Identity,
    /// CPU weight relative to the node's other tenants (1..=10000, default 100).
    pub weight: u32,
    /// Admission limits; `None` is unlimited.
    pub limits: TenantLimits,
}

/// Admission limits of a tenant; `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TenantLimits {
    /// Open connections at once.
    pub max_connections: Option<u64>,
    /// New connections per second.
    pub max_connections_per_second: Option<u32>,
    /// Bytes buffered in the tenant's relays.
    pub max_buffer_bytes: Option<u64>,
}

impl TenantSettings {
    /// The settings of a tenant no `TenantPolicy` names.
    pub fn defaults(identity: Identity) -> Self {
        Self {
            identity,
            weight: crd::DEFAULT_WEIGHT,
            limits: TenantLimits::default(),
        }
    }
}

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

/// An authorization policy: who may reach one port of some local pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// The policy's name.
    pub name: String,
    /// The policy's namespace (the protected pods are in it).
    pub namespace: String,
    /// Labels the protected pods carry (empty: every pod of the namespace).
    pub pod_selector: BTreeMap<String, String>,
    /// The protected port.
    pub port: PortRef,
    /// The identities allowed on that port, sorted.
    pub allowed: Vec<Identity>,
    /// Whether the kubelet's probes are allowed on that port.
    pub allow_probes: bool,
    /// Addresses of the local workloads it protects, sorted.
    pub targets: Vec<IpAddr>,
}

/// What a problem found by the translation does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Any problem fails the whole build, and a meshed pod without an address is a problem
    /// (the file source has no kubelet: the operator must write it).
    #[default]
    Strict,
    /// Objects with problems are left out and their problems returned; a meshed pod without
    /// an address yet is left out silently (it is pending).
    Lenient,
}

/// One meshed pod.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workload {
    /// The pod's name.
    pub name: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The node the pod runs on.
    pub node: String,
    /// The pod's addresses (`status.podIP` first, then the rest of `status.podIPs`), unique.
    pub ips: Vec<IpAddr>,
    /// The identity the pod's traffic carries (its namespace and service account).
    pub identity: Identity,
    /// The address of the pod's node (`status.hostIP`, the node's InternalIP): where the
    /// node's mesh tunnel (port 15008) listens. `None` if the pod does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

impl NodeView {
    /// Translates `objects` into the view of `node`, or reports every problem that prevents it.
    ///
    /// A node without local meshed pods is valid (its `local` is empty). This is
    /// [`Mode::Strict`]; see [`NodeView::build_with`].
    pub fn build(objects: &Objects, node: &str, trust_domain: &str) -> Result<Self> {
        Self::build_with(objects, node, trust_domain, Mode::Strict).map(|(view, _)| view)
    }

    /// Translates `objects` into the view of `node` in the given [`Mode`]. In
    /// [`Mode::Lenient`] it returns the problems of the objects it left out along with the
    /// view; in [`Mode::Strict`] any problem is an error.
    pub fn build_with(
        objects: &Objects,
        node: &str,
        trust_domain: &str,
        mode: Mode,
    ) -> Result<(Self, Vec<Problem>)> {
        // Identity::new checks the trust domain along with the names; check it alone first so
        // a bad flag is not reported once per pod as if the pods were wrong.
        Identity::new(trust_domain, DEFAULT_NAMESPACE, DEFAULT_SERVICE_ACCOUNT).map_err(
            |source| Error::TrustDomain {
                trust_domain: trust_domain.to_owned(),
                source,
            },
        )?;
        let cluster = Cluster::translate(objects, trust_domain, mode);
        let mut problems = cluster.problems.clone();
        sort_problems(&mut problems);
        if mode == Mode::Strict && !problems.is_empty() {
            return Err(Error::Config {
                file: objects.source.clone(),
                problems,
            });
        }
        Ok((cluster.node_view(node), problems))
    }

    /// The local workloads grouped by identity: one entry per tenant of this node.
    pub fn tenants(&self) -> BTreeMap<&Identity, Vec<&Workload>> {
        let mut tenants: BTreeMap<&Identity, Vec<&Workload>> = BTreeMap::new();
        for workload in &self.local {
            tenants
                .entry(&workload.identity)
                .or_default()
                .push(workload);
        }
        tenants
    }

    /// Every address of every local workload, with its workload.
    pub fn local_ips(&self) -> impl Iterator<Item = (IpAddr, &Workload)> + '_ {
        self.local
            .iter()
            .flat_map(|w| w.ips.iter().map(move |ip| (*ip, w)))
    }
}

/// The names of the namespaces labelled into the mesh.
pub fn meshed_namespaces(objects: &Objects) -> BTreeSet<&str> {
    objects
        .namespaces
        .iter()
        .filter(|ns| {
            ns.metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(MESH_LABEL))
                .is_some_and(|v| v == MESH_ENABLED)
        })
        .filter_map(|ns| ns.metadata.name.as_deref())
        .collect()
}

/// The problems that would stop any node's view from being built (they do not depend on the
/// node). Identity names are checked against the default trust domain.
pub(crate) fn check(objects: &Objects) -> Vec<Problem> {
    Cluster::translate(objects, certs::DEFAULT_TRUST_DOMAIN, Mode::Strict).problems
}

/// The node-independent part of the translation: every meshed workload, service, policy and
/// tenant policy of the cluster, checked. [`Cluster::node_view`] cuts one node's view from it,
/// so a server with many nodes translates once per change, not once per node.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    trust_domain: String,
    meshed_namespaces: Vec<String>,
    /// Meshed workloads with their pod's labels, sorted by (namespace, name).
    workloads: Vec<Labelled>,
    services: Vec<Service>,
    /// Policies with their target selector, targets not yet resolved.
    policies: Vec<Policy>,
    /// Settings by identity, from valid `TenantPolicy` objects.
    tenant_settings: BTreeMap<Identity, TenantSettings>,
    /// What was wrong (and, in lenient mode, left out).
    pub problems: Vec<Problem>,
}

impl Cluster {
    /// Translates every object; problems are collected, never fatal. The trust domain must be
    /// valid (see [`NodeView::build_with`], which checks it).
    pub fn translate(objects: &Objects, trust_domain: &str, mode: Mode) -> Self {
        let (mut workloads, mut problems) = translate_pods(objects, trust_domain, mode);
        workloads.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
        let meshed = meshed_namespaces(objects);
        let services = translate_services(objects, &meshed, &workloads);
        let policies = translate_policies(objects, &meshed, trust_domain, &mut problems);
        let tenant_settings = translate_tenant_policies(objects, trust_domain, &mut problems);
        Self {
            trust_domain: trust_domain.to_owned(),
            meshed_namespaces: meshed.into_iter().map(str::to_owned).collect(),
            workloads,
            services,
            policies,
            tenant_settings,
            problems,
        }
    }

    /// The view of `node`.
    pub fn node_view(&self, node: &str) -> NodeView {
        let (local, remote): (Vec<_>, Vec<_>) = self
            .workloads
            .iter()
            .map(|(w, _)| w.clone())
            .partition(|w| w.node == node);
        let (tenants, policies) = self.node_settings(node);
        NodeView {
            node: node.to_owned(),
            trust_domain: self.trust_domain.clone(),
            local,
            remote,
            meshed_namespaces: self.meshed_namespaces.clone(),
            tenants,
            services: self.services.clone(),
            policies,
        }
    }

    /// The node-specific part of `node`'s view: its tenants' settings and the policies that
    /// protect its workloads. (Workloads, services and namespaces are the same for every node.)
    pub fn node_settings(&self, node: &str) -> (Vec<TenantSettings>, Vec<Policy>) {
        let identities: BTreeSet<&Identity> = self
            .workloads
            .iter()
            .filter(|(w, _)| w.node == node)
            .map(|(w, _)| &w.identity)
            .collect();
        let tenants = identities
            .into_iter()
            .map(|id| {
                self.tenant_settings
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| TenantSettings::defaults(id.clone()))
            })
            .collect();
        let policies = self
            .policies
            .iter()
            .filter_map(|policy| {
                let mut targets: Vec<IpAddr> = self
                    .workloads
                    .iter()
                    .filter(|(w, labels)| {
                        w.node == node
                            && w.namespace == policy.namespace
                            && selects(&policy.pod_selector, labels)
                    })
                    .flat_map(|(w, _)| w.ips.iter().copied())
                    .collect();
                targets.sort();
                (!targets.is_empty()).then(|| Policy {
                    targets,
                    ..policy.clone()
                })
            })
            .collect();
        (tenants, policies)
    }

    /// Every meshed workload of the cluster, sorted by (namespace, name).
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.iter().map(|(w, _)| w)
    }

    /// Every service of a meshed namespace, sorted by (namespace, name).
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// The meshed namespaces, sorted.
    pub fn meshed_namespaces(&self) -> &[String] {
        &self.meshed_namespaces
    }

    /// The trust domain of every identity.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

/// A meshed workload with its pod's labels (for selectors).
type Labelled = (Workload, BTreeMap<String, String>);

/// Whether `labels` carry every `selector` pair (an empty selector selects everything).
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The services of meshed namespaces with the meshed workloads their selector matches.
/// A service without a selector has no endpoints here (its endpoints are managed by hand).
fn translate_services(
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
fn port_ref(port: &IntOrString) -> Option<PortRef> {
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

/// The authorization policies of meshed namespaces, checked; invalid ones are reported and
/// left out.
fn translate_policies(
    objects: &Objects,
    meshed: &BTreeSet<&str>,
    trust_domain: &str,
    problems: &mut Vec<Problem>,
) -> Vec<Policy> {
    let mut policies = Vec::new();
    for policy in &objects.authorization_policies {
        let (namespace, name) = ns_name(&policy.metadata);
        let label = format!("AuthorizationPolicy {namespace}/{name}");
        let found = problems.len();
        let problem =
            |field: &str, message: String| Problem::new(message).object(label.clone()).field(field);
        if let Some(p) = check_policy(policy, namespace, trust_domain, &problem) {
            problems.extend(p);
        }
        if problems.len() > found || !meshed.contains(namespace) {
            continue;
        }
        let Some(port) = port_ref(&policy.spec.port) else {
            continue;
        };
        let mut allowed: Vec<Identity> = policy
            .spec
            .allow
            .iter()
            .filter_map(|a| {
                let ns = a
                    .namespace
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .unwrap_or(namespace);
                Identity::new(trust_domain, ns, &a.service_account).ok()
            })
            .collect();
        allowed.sort();
        allowed.dedup();
        policies.push(Policy {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            pod_selector: policy.spec.pod_selector.clone().unwrap_or_default(),
            port,
            allowed,
            allow_probes: policy.spec.allow_probes,
            targets: Vec::new(),
        });
    }
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    policies
}

/// Every problem of one authorization policy, or `None`.
fn check_policy(
    policy: &AuthorizationPolicy,
    namespace: &str,
    trust_domain: &str,
    problem: &dyn Fn(&str, String) -> Problem,
) -> Option<Vec<Problem>> {
    let mut out = Vec::new();
    if port_ref(&policy.spec.port).is_none() {
        out.push(problem(
            "spec.port",
            format!(
                "{:?} is not a port; set a number from 1 to 65535 or a container port name                  (e.g. admin-http)",
                policy.spec.port
            ),
        ));
    }
    for (i, allow) in policy.spec.allow.iter().enumerate() {
        let ns = allow
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(namespace);
        if let Err(err) = Identity::new(trust_domain, ns, &allow.service_account) {
            out.push(problem(
                &format!("spec.allow[{i}]"),
                format!("{err}; correct the name"),
            ));
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The settings of the tenants named by valid `TenantPolicy` objects; invalid ones and a
/// second policy for the same tenant are reported and left out.
fn translate_tenant_policies(
    objects: &Objects,
    trust_domain: &str,
    problems: &mut Vec<Problem>,
) -> BTreeMap<Identity, TenantSettings> {
    let mut settings = BTreeMap::new();
    let mut owners: HashMap<Identity, String> = HashMap::new();
    for (index, policy) in objects.tenant_policies.iter().enumerate() {
        let origin = objects.tenant_policy_origin(index);
        let (namespace, name) = ns_name(&policy.metadata);
        let label = format!("TenantPolicy {namespace}/{name}");
        match tenant_settings(policy, namespace, trust_domain) {
            Ok(s) => {
                if let Some(other) = owners.get(&s.identity) {
                    problems.push(
                        Problem::new(format!(
                            "tenant {} is already configured by {other}; merge the two policies                              into one",
                            s.identity.short()
                        ))
                        .at(origin)
                        .object(label)
                        .field("spec.serviceAccount"),
                    );
                    continue;
                }
                owners.insert(s.identity.clone(), label);
                settings.insert(s.identity.clone(), s);
            }
            Err(found) => problems.extend(found.into_iter().map(|(field, message)| {
                Problem::new(message)
                    .at(origin)
                    .object(label.clone())
                    .field(field)
            })),
        }
    }
    settings
}

/// The settings one `TenantPolicy` asks for, or its problems as (field, message).
pub fn tenant_settings(
    policy: &TenantPolicy,
    namespace: &str,
    trust_domain: &str,
) -> Result<TenantSettings, Vec<(&'static str, String)>> {
    let mut problems = Vec::new();
    let spec = &policy.spec;
    let identity = match Identity::new(trust_domain, namespace, &spec.service_account) {
        Ok(id) => Some(id),
        Err(err) => {
            problems.push((
                "spec.serviceAccount",
                format!("{err}; name the tenant's service account"),
            ));
            None
        }
    };
    let weight = spec.weight.unwrap_or(crd::DEFAULT_WEIGHT);
    if !(1..=crd::MAX_WEIGHT).contains(&weight) {
        problems.push((
            "spec.weight",
            format!(
                "{weight} is out of range; set a weight from 1 to {} (default {})",
                crd::MAX_WEIGHT,
                crd::DEFAULT_WEIGHT
            ),
        ));
    }
    let limits = spec.limits.clone().unwrap_or_default();
    let zero = |field: &'static str, problems: &mut Vec<_>| {
        problems.push((
            field,
            "0 would refuse all of the tenant's work; remove the limit or set at least 1"
                .to_owned(),
        ));
    };
    if limits.max_connections == Some(0) {
        zero("spec.limits.maxConnections", &mut problems);
    }
    if limits.max_connections_per_second == Some(0) {
        zero("spec.limits.maxConnectionsPerSecond", &mut problems);
    }
    if limits.max_buffer_bytes == Some(0) {
        zero("spec.limits.maxBufferBytes", &mut problems);
    }
    match identity {
        Some(identity) if problems.is_empty() => Ok(TenantSettings {
            identity,
            weight,
            limits: TenantLimits {
                max_connections: limits.max_connections,
                max_connections_per_second: limits.max_connections_per_second,
                max_buffer_bytes: limits.max_buffer_bytes,
            },
        }),
        _ => Err(problems),
    }
}

/// (namespace, name) of a namespaced object, defaulted for messages.
fn ns_name(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (&str, &str) {
    (
        non_empty(metadata.namespace.as_deref()).unwrap_or(DEFAULT_NAMESPACE),
        non_empty(metadata.name.as_deref()).unwrap_or("<no name>"),
    )
}

/// Turns every meshed pod into a workload (with its pod's labels), collecting the problems
/// of those that cannot be.
fn translate_pods(
    objects: &Objects,
    trust_domain: &str,
    mode: Mode,
) -> (Vec<Labelled>, Vec<Problem>) {
    let meshed = meshed_namespaces(objects);
    let mut workloads = Vec::new();
    let mut problems = Vec::new();
    // Address -> (pod label, origin) of the first meshed pod that used it.
    let mut owners: HashMap<IpAddr, (String, Option<Origin>)> = HashMap::new();
    for (index, pod) in objects.pods.iter().enumerate() {
        let origin = objects.pod_origin(index);
        let namespace = non_empty(pod.metadata.namespace.as_deref()).unwrap_or(DEFAULT_NAMESPACE);
        if !meshed.contains(namespace) {
            continue;
        }
        let name = non_empty(pod.metadata.name.as_deref());
        let label = format!("Pod {namespace}/{}", name.unwrap_or("<no name>"));
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            tracing::debug!(pod = %label, ?phase, "skipping a finished pod");
            continue;
        }
        let spec = pod.spec.as_ref();
        if spec.and_then(|s| s.host_network).unwrap_or(false) {
            // A host-network pod has the node's address: its traffic cannot be told apart
            // from the node's, so it cannot carry a workload identity.
            tracing::debug!(pod = %label, "skipping a host-network pod");
            continue;
        }
        let found = problems.len();
        let problem = |field: &str, message: String| {
            Problem::new(message)
                .at(origin)
                .object(label.clone())
                .field(field)
        };
        if name.is_none() {
            problems.push(problem(
                "metadata.name",
                "missing; every meshed pod needs a name".to_owned(),
            ));
        }
        let node = non_empty(spec.and_then(|s| s.node_name.as_deref()));
        if node.is_none() {
            problems.push(problem(
                "spec.nodeName",
                "missing; the file source has no scheduler, so set spec.nodeName to the node \
                 the pod runs on"
                    .to_owned(),
            ));
        }
        let ips = pod_ips(pod, mode, &mut |field, message| {
            problems.push(problem(field, message))
        });
        if ips.is_empty() && problems.len() == found {
            // Lenient mode: no address yet (pending); the source logs it.
            continue;
        }
        let service_account = spec
            .and_then(|s| {
                non_empty(s.service_account_name.as_deref())
                    .or_else(|| non_empty(s.service_account.as_deref()))
            })
            .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
        let identity = match Identity::new(trust_domain, namespace, service_account) {
            Ok(identity) => Some(identity),
            Err(err) => {
                let field = match &err {
                    certs::Error::InvalidName { what, .. } if *what == "namespace" => {
                        "metadata.namespace"
                    }
                    _ => "spec.serviceAccountName",
                };
                problems.push(problem(field, format!("{err}; rename it")));
                None
            }
        };
        let (Some(name), Some(node), Some(identity), true) =
            (name, node, identity, problems.len() == found)
        else {
            continue;
        };
        for ip in &ips {
            if let Some((other, other_origin)) = owners.get(ip) {
                let where_ = other_origin.map_or(String::new(), |o| format!(" ({o})"));
                problems.push(problem(
                    "status.podIPs",
                    format!(
                        "address {ip} is also used by {other}{where_}; two meshed pods cannot \
                         share an address, so remove the stale pod or correct its address"
                    ),
                ));
            } else {
                owners.insert(*ip, (label.clone(), origin));
            }
        }
        if problems.len() > found {
            continue;
        }
        workloads.push((
            Workload {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
                node: node.to_owned(),
                ips,
                identity,
                host_ip: pod
                    .status
                    .as_ref()
                    .and_then(|s| s.host_ip.as_deref())
                    .and_then(|ip| ip.parse().ok()),
            },
            pod.metadata.labels.clone().unwrap_or_default(),
        ));
    }
    (workloads, problems)
}

/// The pod's addresses, `status.podIP` first, without repeats; reports unparsable or missing
/// ones through `problem(field, message)` (missing ones only in [`Mode::Strict`]).
fn pod_ips(pod: &Pod, mode: Mode, problem: &mut dyn FnMut(&str, String)) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let primary = status
        .and_then(|s| non_empty(s.pod_ip.as_deref()))
        .map(|ip| ("status.podIP".to_owned(), ip));
    let others = status
        .and_then(|s| s.pod_ips.as_deref())
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            non_empty(Some(&p.ip)).map(|ip| (format!("status.podIPs[{i}].ip"), ip))
        });
    let mut ips = Vec::new();
    let mut seen_any = false;
    for (field, text) in primary.into_iter().chain(others) {
        seen_any = true;
        match text.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => problem(
                &field,
                format!(
                    "{text:?} is not an ip address; set the pod's IPv4 or IPv6 address \
                     (e.g. 10.200.1.2)"
                ),
            ),
        }
    }
    if !seen_any && mode == Mode::Strict {
        problem(
            "status.podIP",
            "missing; the file source has no kubelet to assign addresses, so set status.podIP"
                .to_owned(),
        );
    }
    ips
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Namespace, PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use pretty_assertions::assert_eq;

    fn namespace(name: &str, meshed: bool) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: meshed.then(|| BTreeMap::from([(MESH_LABEL.into(), MESH_ENABLED.into())])),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod(ns: &str, name: &str, sa: Option<&str>, node: &str, ip: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: sa.map(Into::into),
                node_name: Some(node.into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.into()),
                pod_ips: Some(vec![PodIP { ip: ip.into() }]),
                ..Default::default()
            }),
        }
    }

    fn objects(namespaces: Vec<Namespace>, pods: Vec<Pod>) -> Objects {
        Objects {
            namespaces,
            pods,
            ..Objects::new("test")
        }
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn problems(err: Error) -> Vec<(String, String)> {
        let Error::Config { problems, .. } = err else {
            panic!("{err}")
        };
        problems
            .into_iter()
            .map(|p| (p.object.unwrap_or_default(), p.field.unwrap_or_default()))
            .collect()
    }

    #[test]
    fn splits_meshed_pods_into_local_and_remote_and_ignores_the_rest() {
        let objects = objects(
            vec![namespace("shop", true), namespace("legacy", false)],
            vec![
                pod("shop", "web-1", Some("web"), "n1", "10.0.0.2"),
                pod("shop", "web-0", Some("web"), "n1", "10.0.0.1"),
                pod("shop", "db-0", Some("db"), "n2", "10.0.1.1"),
                pod("legacy", "old-0", None, "n1", "10.0.0.9"),
                // Not meshed, so its lack of an address is none of our business.
                pod("legacy", "old-1", None, "n1", ""),
                pod("nowhere", "x-0", None, "n1", "10.0.0.8"),
            ],
        );
        let view = NodeView::build(&objects, "n1", "cluster.local").unwrap();
        let names = |ws: &[Workload]| ws.iter().map(|w| w.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&view.local), ["web-0", "web-1"]);
        assert_eq!(names(&view.remote), ["db-0"]);
        assert_eq!(view.meshed_namespaces, ["shop"]);
        assert_eq!(view.local[0].ips, [ip("10.0.0.1")]);
        assert_eq!(view.local[0].identity, id("shop", "web"));
        assert_eq!(
            view.local_ips()
                .map(|(ip, w)| (ip, w.name.as_str()))
                .collect::<Vec<_>>(),
            [(ip("10.0.0.1"), "web-0"), (ip("10.0.0.2"), "web-1")]
        );

        let other = NodeView::build(&objects, "n3", "cluster.local").unwrap();
        assert!(other.local.is_empty());
        assert_eq!(other.remote.len(), 3);
    }

    #[test]
    fn groups_local_pods_into_tenants_by_identity_with_default_service_account() {
        let objects = objects(
            vec![namespace("shop", true), namespace("billing", true)],
            vec![
                pod("shop", "web-0", Some("web"), "n1", "10.0.0.1"),
                pod("shop", "web-1", Some("web"), "n1", "10.0.0.2"),
                pod("shop", "job-0", None, "n1", "10.0.0.3"),
                pod("billing", "web-0", Some("web"), "n1", "10.0.0.4"),
            ],
        );
        let view = NodeView::build(&objects, "n1", "example.org").unwrap();
        let tenants: Vec<(String, Vec<&str>)> = view
            .tenants()
            .into_iter()
            .map(|(id, ws)| (id.to_string(), ws.iter().map(|w| w.name.as_str()).collect()))
            .collect();
        assert_eq!(
            tenants,
            [
                (
                    "spiffe://example.org/ns/billing/sa/web".to_owned(),
                    vec!["web-0"]
                ),
                (
                    "spiffe://example.org/ns/shop/sa/default".to_owned(),
                    vec!["job-0"]
                ),
                (
                    "spiffe://example.org/ns/shop/sa/web".to_owned(),
                    vec!["web-0", "web-1"]
                ),
            ]
        );
    }

    #[test]
    fn skips_finished_and_host_network_pods() {
        let mut failed = pod("shop", "failed-0", None, "n1", "10.0.0.1");
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        let mut done = pod("shop", "done-0", None, "n1", "10.0.0.1");
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut host = pod("shop", "host-0", None, "n1", "192.0.2.2");
        host.spec.as_mut().unwrap().host_network = Some(true);
        let objects = objects(
            vec![namespace("shop", true)],
            vec![
                failed,
                done,
                host,
                pod("shop", "web-0", None, "n1", "10.0.0.1"),
            ],
        );
        let view = NodeView::build(&objects, "n1", "cluster.local").unwrap();
        assert_eq!(view.local.len(), 1);
        assert_eq!(view.local[0].name, "web-0");
    }

    #[test]
    fn reports_every_missing_or_bad_field_of_meshed_pods() {
        let mut no_node = pod("shop", "a-0", None, "", "10.0.0.1");
        no_node.spec.as_mut().unwrap().node_name = None;
        let mut no_ip = pod("shop", "b-0", None, "n1", "");
        no_ip.status.as_mut().unwrap().pod_ips = None;
        let mut bad_second_ip = pod("shop", "c-0", None, "n1", "10.0.0.3");
        bad_second_ip.status.as_mut().unwrap().pod_ips = Some(vec![
            PodIP {
                ip: "10.0.0.3".into(),
            },
            PodIP {
                ip: "fd00::zz".into(),
            },
        ]);
        let bad_sa = pod("shop", "d-0", Some("Web"), "n1", "10.0.0.4");
        let mut no_status = pod("shop", "e-0", None, "n1", "");
        no_status.status = None;
        let objects = objects(
            vec![namespace("shop", true)],
            vec![no_node, no_ip, bad_second_ip, bad_sa, no_status],
        );
        let err = NodeView::build(&objects, "n1", "cluster.local").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"fd00::zz\" is not an ip address"), "{text}");
        assert!(text.contains("no kubelet"), "{text}");
        assert_eq!(
            problems(err),
            [
                ("Pod shop/a-0".to_owned(), "spec.nodeName".to_owned()),
                ("Pod shop/b-0".to_owned(), "status.podIP".to_owned()),
                ("Pod shop/c-0".to_owned(), "status.podIPs[1].ip".to_owned()),
                (
                    "Pod shop/d-0".to_owned(),
                    "spec.serviceAccountName".to_owned()
                ),
                ("Pod shop/e-0".to_owned(), "status.podIP".to_owned()),
            ]
        );
    }

    #[test]
    fn reports_an_address_shared_by_two_meshed_pods_naming_both() {
        let objects = objects(
            vec![namespace("shop", true), namespace("billing", true)],
            vec![
                pod("shop", "web-0", None, "n1", "10.0.0.1"),
                pod("billing", "ledger-0", None, "n2", "10.0.0.1"),
            ],
        );
        let err = NodeView::build(&objects, "n1", "cluster.local").unwrap_err();
        assert_eq!(
            err.to_string(),
            "test: Pod billing/ledger-0: status.podIPs: address 10.0.0.1 is also used by Pod \
             shop/web-0; two meshed pods cannot share an address, so remove the stale pod or \
             correct its address"
        );
    }

    #[test]
    fn rejects_a_bad_trust_domain_once() {
        let objects = objects(vec![namespace("shop", true)], vec![]);
        let err = NodeView::build(&objects, "n1", "Bad_Domain").unwrap_err();
        assert!(matches!(err, Error::TrustDomain { .. }), "{err:?}");
        assert!(err.to_string().contains("\"Bad_Domain\""), "{err}");
    }
}
