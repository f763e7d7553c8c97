//! Authorization policies: who may reach one port of some pods, and which local addresses
//! that protects.
//!
//! Owns [`Policy`]. `translate` checks every `AuthorizationPolicy` (its port, the identities
//! it allows) once for the cluster, leaving targets empty; `for_workloads` resolves one
//! policy's targets against one node's workloads (a policy protecting none of them is not
//! part of that node's view).
//!
//! Must not touch: tenant settings, services.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use certs::Identity;
use serde::Serialize;

use super::services::port_ref;
use super::{Labelled, PortRef, ns_name, selects};
use crate::crd::AuthorizationPolicy;
use crate::error::Problem;
use crate::objects::Objects;

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

/// The authorization policies of meshed namespaces, checked; invalid ones are reported and
/// left out.
pub(super) fn translate(
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
                "{:?} is not a port; set a number from 1 to 65535 or a container port name \
                 (e.g. admin-http)",
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

/// `policy` with its targets among `workloads` (one node's), or `None` if it protects none
/// of them.
pub(super) fn for_workloads(policy: &Policy, workloads: &[&Labelled]) -> Option<Policy> {
    let mut targets: Vec<IpAddr> = workloads
        .iter()
        .filter(|(w, labels)| {
            w.namespace == policy.namespace && selects(&policy.pod_selector, labels)
        })
        .flat_map(|(w, _)| w.ips.iter().copied())
        .collect();
    targets.sort();
    (!targets.is_empty()).then(|| Policy {
        targets,
        ..policy.clone()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use pretty_assertions::assert_eq;

    use crate::crd::{AllowedIdentity, AuthorizationPolicy, AuthorizationPolicySpec};
    use crate::view::fixtures::{namespace, objects};
    use crate::view::{Cluster, Mode};

    #[test]
    fn reports_a_bad_port_and_a_bad_allowed_identity_naming_the_fix() {
        let mut objects = objects(vec![namespace("shop", true)], vec![]);
        objects.authorization_policies.push(AuthorizationPolicy {
            metadata: ObjectMeta {
                name: Some("admin".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: AuthorizationPolicySpec {
                pod_selector: None,
                port: IntOrString::Int(0),
                allow: vec![AllowedIdentity {
                    namespace: None,
                    service_account: "Bad".into(),
                }],
                allow_probes: false,
            },
            status: None,
        });
        let cluster = Cluster::translate(&objects, "cluster.local", Mode::Strict);
        let found: Vec<(String, String, String)> = cluster
            .problems
            .into_iter()
            .map(|p| (p.object.unwrap(), p.field.unwrap(), p.message))
            .collect();
        assert_eq!(found.len(), 2, "{found:#?}");
        assert_eq!(
            found[0],
            (
                "AuthorizationPolicy shop/admin".to_owned(),
                "spec.port".to_owned(),
                "Int(0) is not a port; set a number from 1 to 65535 or a container port name \
                 (e.g. admin-http)"
                    .to_owned()
            )
        );
        assert_eq!(found[1].1, "spec.allow[0]");
        assert!(found[1].2.ends_with("; correct the name"), "{}", found[1].2);
    }
}
