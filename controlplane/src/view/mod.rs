//! The translation from Kubernetes objects to one node's view of the mesh.
//!
//! Owns [`NodeView`], [`Cluster`] (the node-independent translation a server cuts every node's
//! view from), [`Mode`] and the entry points ([`NodeView::build`], [`Cluster::translate`],
//! [`Cluster::node_view`]). Each kind is translated in its own module: [`pods`] (which pods
//! are part of the mesh, as [`Workload`]s), [`services`] (services of meshed namespaces with
//! endpoints from their selectors), [`policies`] (authorization policies and the local
//! addresses they protect) and [`tenants`] (each local tenant's settings from the
//! `TenantPolicy` naming it, or defaults). The translation is pure: every source (file,
//! Kubernetes) feeds it the same objects. [`Mode`] says what a problem does: fail the whole
//! view (file source: the operator fixes the file) or skip the object (Kubernetes source: one
//! bad object must not stop the cluster's view; a pod without an address yet is normal while
//! it is pending).
//!
//! Must not touch: sockets, the data path, the environment, files.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use certs::Identity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::error::{Error, Problem, Result, sort_problems};
use crate::objects::{DEFAULT_NAMESPACE, Objects};

#[cfg(test)]
mod fixtures;
pub mod pods;
pub mod policies;
pub mod services;
pub mod tenants;

pub use pods::Workload;
pub use policies::Policy;
pub use services::{Endpoint, PortRef, Service, ServicePort};
pub use tenants::{TenantLimits, TenantSettings, tenant_settings};

/// The namespace label that opts a namespace's pods into the mesh.
pub const MESH_LABEL: &str = "nodeproxy.io/mesh";

/// The value of [`MESH_LABEL`] that opts in.
pub const MESH_ENABLED: &str = "enabled";
/// The value of [`MESH_LABEL`] that says, explicitly, that a namespace stays out.
pub const MESH_DISABLED: &str = "disabled";

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

/// A problem for every namespace whose [`MESH_LABEL`] is neither [`MESH_ENABLED`] nor
/// [`MESH_DISABLED`] (a typo such as `Enabled` or `true`): its pods are not meshed, and the
/// message says how to mesh them.
fn mesh_label_problems(objects: &Objects) -> Vec<Problem> {
    objects
        .namespaces
        .iter()
        .filter_map(|ns| {
            let value = ns.metadata.labels.as_ref()?.get(MESH_LABEL)?;
            if value == MESH_ENABLED || value == MESH_DISABLED {
                return None;
            }
            let name = ns.metadata.name.as_deref().unwrap_or("?");
            Some(
                Problem::new(format!(
                    "label {MESH_LABEL}={value:?} is neither {MESH_ENABLED:?} nor {MESH_DISABLED:?}, \
                     so the namespace's pods are not meshed; to mesh them: kubectl label namespace \
                     {name} {MESH_LABEL}={MESH_ENABLED} --overwrite"
                ))
                .object(format!("Namespace {name}"))
                .field(format!("metadata.labels[{MESH_LABEL}]")),
            )
        })
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
        let meshed = meshed_namespaces(objects);
        let (mut workloads, mut problems) = pods::translate(objects, &meshed, trust_domain, mode);
        problems.extend(mesh_label_problems(objects));
        workloads.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
        let services = services::translate(objects, &meshed, &workloads);
        let policies = policies::translate(objects, &meshed, trust_domain, &mut problems);
        let tenant_settings = tenants::translate(objects, trust_domain, &mut problems);
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
        let local: Vec<&Labelled> = self
            .workloads
            .iter()
            .filter(|(w, _)| w.node == node)
            .collect();
        let tenants = tenants::of_workloads(&self.tenant_settings, local.iter().map(|(w, _)| w));
        let policies = self
            .policies
            .iter()
            .filter_map(|policy| policies::for_workloads(policy, &local))
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

/// (namespace, name) of a namespaced object, defaulted for messages.
fn ns_name(metadata: &ObjectMeta) -> (&str, &str) {
    (
        non_empty(metadata.namespace.as_deref()).unwrap_or(DEFAULT_NAMESPACE),
        non_empty(metadata.name.as_deref()).unwrap_or("<no name>"),
    )
}

/// `s`, unless it is missing or empty (Kubernetes treats both alike).
fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use fixtures::{id, ip, namespace, objects, pod};
    use pretty_assertions::assert_eq;

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
    fn rejects_a_bad_trust_domain_once() {
        let objects = objects(vec![namespace("shop", true)], vec![]);
        let err = NodeView::build(&objects, "n1", "Bad_Domain").unwrap_err();
        assert!(matches!(err, Error::TrustDomain { .. }), "{err:?}");
        assert!(err.to_string().contains("\"Bad_Domain\""), "{err}");
    }

    #[test]
    fn a_mesh_label_with_another_value_is_a_problem_that_names_it_and_the_fix() {
        let labelled = |name: &str, value: &str| {
            let mut ns = namespace(name, false);
            ns.metadata.labels = Some(BTreeMap::from([(MESH_LABEL.into(), value.into())]));
            ns
        };
        let objects = objects(
            vec![
                labelled("on", MESH_ENABLED),
                labelled("off", MESH_DISABLED),
                labelled("typo", "Enabled"),
            ],
            vec![],
        );
        let cluster = Cluster::translate(&objects, "cluster.local", Mode::Lenient);
        assert_eq!(cluster.meshed_namespaces(), ["on".to_owned()]);
        let [problem] = cluster.problems.as_slice() else {
            panic!("one problem expected: {:?}", cluster.problems)
        };
        assert_eq!(problem.object.as_deref(), Some("Namespace typo"));
        assert!(
            problem.message.contains("\"Enabled\""),
            "{}",
            problem.message
        );
        assert!(
            problem
                .message
                .contains("kubectl label namespace typo nodeproxy.io/mesh=enabled --overwrite"),
            "{}",
            problem.message
        );
        // A file is strict: the typo is an error naming the namespace, not a silent opt-out.
        let err = NodeView::build(&objects, "n1", "cluster.local").unwrap_err();
        assert!(err.to_string().contains("Namespace typo"), "{err}");
    }
}
