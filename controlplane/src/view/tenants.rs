//! Tenants: the CPU weight and admission limits of each local tenant.
//!
//! Owns [`TenantSettings`], [`TenantLimits`] and [`tenant_settings`] (what one
//! `TenantPolicy` asks for, checked). `translate` reads every `TenantPolicy` once for the
//! cluster (a second policy for the same tenant is a problem, not a merge);
//! `of_workloads` gives every identity of one node's workloads its settings, or the
//! defaults when no policy names it.
//!
//! Must not touch: pods' meshing rules, policies.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use certs::Identity;
use serde::Serialize;

use super::{Workload, ns_name};
use crate::crd::{self, TenantPolicy};
use crate::error::{Problem, Result};
use crate::objects::Objects;

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

/// The settings of the tenants named by valid `TenantPolicy` objects; invalid ones and a
/// second policy for the same tenant are reported and left out.
pub(super) fn translate(
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
                            "tenant {} is already configured by {other}; merge the two policies \
                             into one",
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

/// The settings of every tenant (identity) of `workloads`, sorted by identity: from
/// `configured` (valid `TenantPolicy` objects by identity), or the defaults.
pub(super) fn of_workloads<'a>(
    configured: &BTreeMap<Identity, TenantSettings>,
    workloads: impl Iterator<Item = &'a Workload>,
) -> Vec<TenantSettings> {
    let identities: BTreeSet<&Identity> = workloads.map(|w| &w.identity).collect();
    identities
        .into_iter()
        .map(|id| {
            configured
                .get(id)
                .cloned()
                .unwrap_or_else(|| TenantSettings::defaults(id.clone()))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::crd::TenantPolicySpec;
    use crate::view::fixtures::{id, namespace, objects};
    use crate::view::{Cluster, Mode};

    fn policy(name: &str, weight: u32) -> TenantPolicy {
        TenantPolicy {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: TenantPolicySpec {
                service_account: "web".into(),
                weight: Some(weight),
                limits: None,
            },
            status: None,
        }
    }

    #[test]
    fn a_second_policy_for_a_tenant_is_a_problem_and_the_first_one_stays() {
        let mut objects = objects(vec![namespace("shop", true)], vec![]);
        objects.tenant_policies = vec![policy("web", 300), policy("web-again", 5)];
        let cluster = Cluster::translate(&objects, "cluster.local", Mode::Strict);
        let found: Vec<(String, String, String)> = cluster
            .problems
            .iter()
            .map(|p| {
                (
                    p.object.clone().unwrap(),
                    p.field.clone().unwrap(),
                    p.message.clone(),
                )
            })
            .collect();
        assert_eq!(
            found,
            [(
                "TenantPolicy shop/web-again".to_owned(),
                "spec.serviceAccount".to_owned(),
                "tenant shop/web is already configured by TenantPolicy shop/web; merge the two \
                 policies into one"
                    .to_owned()
            )]
        );
        let web = id("shop", "web");
        assert_eq!(cluster.tenant_settings[&web].weight, 300);
    }
}
