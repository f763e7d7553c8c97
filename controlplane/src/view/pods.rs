//! Pods: which pods are part of the mesh, and the [`Workload`] each one becomes.
//!
//! A pod is meshed when its namespace is labelled [`MESH_LABEL`](super::MESH_LABEL)`=`
//! [`MESH_ENABLED`](super::MESH_ENABLED), it has not finished (phase is not `Succeeded` or
//! `Failed`) and it does not use the host's network. Each meshed pod becomes a workload with
//! a SPIFFE identity from its namespace and service account; a pod that cannot (no name, no
//! node, a bad address or service account, an address another meshed pod has) is reported
//! with the field to fix. Owns [`Workload`]; [`super::Cluster`] calls `translate`.
//!
//! Must not touch: services, policies, tenant settings (their modules read the workloads).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use certs::Identity;
use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

use super::{DEFAULT_SERVICE_ACCOUNT, Labelled, Mode, non_empty};
use crate::error::{Origin, Problem};
use crate::objects::{DEFAULT_NAMESPACE, Objects};

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

/// Turns every meshed pod (a pod of a `meshed` namespace) into a workload, with its pod's
/// labels, collecting the problems of those that cannot be.
pub(super) fn translate(
    objects: &Objects,
    meshed: &BTreeSet<&str>,
    trust_domain: &str,
    mode: Mode,
) -> (Vec<Labelled>, Vec<Problem>) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::view::NodeView;
    use crate::view::fixtures::{namespace, objects, pod, problems};
    use k8s_openapi::api::core::v1::PodIP;
    use pretty_assertions::assert_eq;

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
}
