//! The translation from Kubernetes objects to one node's view of the mesh.
//!
//! Owns [`NodeView`] and [`Workload`], and the rules that make a pod part of the mesh: it is in
//! a namespace labelled [`MESH_LABEL`]`=`[`MESH_ENABLED`], it has not finished (phase is not
//! `Succeeded` or `Failed`) and it does not use the host's network. Each meshed pod becomes a
//! workload with a SPIFFE identity from its namespace and service account. The translation is
//! pure: every source (the file source now, the Kubernetes watcher later) feeds it the same
//! `k8s-openapi` objects, and every problem it finds is reported at once.
//!
//! Must not touch: sockets, the data path, the environment, files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use certs::Identity;
use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

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
}

impl NodeView {
    /// Translates `objects` into the view of `node`, or reports every problem that prevents it.
    ///
    /// A node without local meshed pods is valid (its `local` is empty).
    pub fn build(objects: &Objects, node: &str, trust_domain: &str) -> Result<Self> {
        // Identity::new checks the trust domain along with the names; check it alone first so
        // a bad flag is not reported once per pod as if the pods were wrong.
        Identity::new(trust_domain, DEFAULT_NAMESPACE, DEFAULT_SERVICE_ACCOUNT).map_err(
            |source| Error::TrustDomain {
                trust_domain: trust_domain.to_owned(),
                source,
            },
        )?;
        let (workloads, mut problems) = translate(objects, trust_domain);
        if !problems.is_empty() {
            sort_problems(&mut problems);
            return Err(Error::Config {
                file: objects.source.clone(),
                problems,
            });
        }
        let (mut local, mut remote): (Vec<_>, Vec<_>) =
            workloads.into_iter().partition(|w| w.node == node);
        let key = |w: &Workload| (w.namespace.clone(), w.name.clone());
        local.sort_by_key(key);
        remote.sort_by_key(key);
        Ok(Self {
            node: node.to_owned(),
            trust_domain: trust_domain.to_owned(),
            local,
            remote,
            meshed_namespaces: meshed_namespaces(objects)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        })
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
    translate(objects, certs::DEFAULT_TRUST_DOMAIN).1
}

/// Turns every meshed pod into a workload, collecting the problems of those that cannot be.
fn translate(objects: &Objects, trust_domain: &str) -> (Vec<Workload>, Vec<Problem>) {
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
        let ips = pod_ips(pod, &mut |field, message| {
            problems.push(problem(field, message))
        });
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
        workloads.push(Workload {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            node: node.to_owned(),
            ips,
            identity,
        });
    }
    (workloads, problems)
}

/// The pod's addresses, `status.podIP` first, without repeats; reports unparsable or missing
/// ones through `problem(field, message)`.
fn pod_ips(pod: &Pod, problem: &mut dyn FnMut(&str, String)) -> Vec<IpAddr> {
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
    if !seen_any {
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
