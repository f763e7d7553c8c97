//! Our custom resources: [`TenantPolicy`] and [`AuthorizationPolicy`] (group `nodeproxy.io`,
//! version `v1alpha1`, namespaced).
//!
//! The spec types are plain serde structs, so the file source reads them without a Kubernetes
//! client. With the `kube` feature the same specs derive `kube::CustomResource`, which
//! generates the resource types and their CRDs (`nodeproxy-controlplane crds` prints them into
//! `manifests/crds/`); without it, hand-written types with the same fields stand in, so code
//! that builds them with struct literals compiles either way.
//!
//! Must not touch: sockets, files, the environment; validation of values lives in
//! [`crate::view`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

/// The API group of our resources.
pub const GROUP: &str = "nodeproxy.io";
/// The API version of our resources.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of our resources.
pub const API_VERSION: &str = "nodeproxy.io/v1alpha1";

/// The CPU weight of a tenant no [`TenantPolicy`] names.
pub const DEFAULT_WEIGHT: u32 = 100;
/// The largest weight a [`TenantPolicy`] may set.
pub const MAX_WEIGHT: u32 = 10_000;

/// The desired share and limits of one tenant (a namespace's service account) on every node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource, schemars::JsonSchema),
    kube(
        group = "nodeproxy.io",
        version = "v1alpha1",
        kind = "TenantPolicy",
        namespaced,
        status = "PolicyStatus",
        derive = "PartialEq",
        derive = "Default",
        shortname = "tpol",
        printcolumn = r#"{"name":"ServiceAccount","type":"string","jsonPath":".spec.serviceAccount"}"#,
        printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".spec.weight"}"#
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TenantPolicySpec {
    /// The service account (in the policy's namespace) whose tenant this configures.
    pub service_account: String,
    /// The tenant's CPU weight relative to the others on a node (1..=10000, default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1, max = 10000)))]
    pub weight: Option<u32>,
    /// Admission limits; a missing limit is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<TenantPolicyLimits>,
}

/// The limits of a [`TenantPolicySpec`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct TenantPolicyLimits {
    /// Open connections at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    /// New connections per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_second: Option<u32>,
    /// Bytes buffered in the tenant's relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_buffer_bytes: Option<u64>,
}

/// Who may reach one port of the pods of a namespace. Other ports are not affected.
///
/// DESIGN §9 in one object: port 9090 allows `metrics-api` (same namespace) and
/// `dive-viz/dive-viz`, and the kubelet's probes; everyone else is denied on that port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource, schemars::JsonSchema),
    kube(
        group = "nodeproxy.io",
        version = "v1alpha1",
        kind = "AuthorizationPolicy",
        namespaced,
        status = "PolicyStatus",
        derive = "PartialEq",
        derive = "Default",
        shortname = "npauthz",
        printcolumn = r#"{"name":"Port","type":"string","jsonPath":".spec.port"}"#
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The pods (of the policy's namespace) it protects, by labels; empty or missing: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<BTreeMap<String, String>>,
    /// The protected port: a number, or the name of a container port (e.g. `admin-http`).
    #[cfg_attr(feature = "kube", schemars(schema_with = "int_or_string"))]
    pub port: IntOrString,
    /// Identities allowed to reach the port over mTLS.
    #[serde(default)]
    pub allow: Vec<AllowedIdentity>,
    /// Whether the kubelet's configured probes (liveness, readiness, startup) may reach it.
    #[serde(default)]
    pub allow_probes: bool,
}

/// One allowed client identity of an [`AuthorizationPolicySpec`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct AllowedIdentity {
    /// The client's namespace; missing: the policy's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The client's service account.
    pub service_account: String,
}

/// The status the Kubernetes source writes on our resources.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Accepted`: `True`, or `False` with the reason the object is ignored.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A status condition (the shape of `metav1.Condition`, trimmed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition type (`Accepted`).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// What is wrong and how to fix it.
    pub message: String,
    /// The generation the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(feature = "kube")]
fn int_or_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "A port number, or the name of a container port.",
        "x-kubernetes-int-or-string": true
    })
}

#[cfg(not(feature = "kube"))]
mod plain {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::{AuthorizationPolicySpec, PolicyStatus, TenantPolicySpec};

    /// A `TenantPolicy` object (the `kube` feature generates the same type with its CRD).
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct TenantPolicy {
        /// Standard object metadata.
        pub metadata: ObjectMeta,
        /// The desired tenant settings.
        pub spec: TenantPolicySpec,
        /// What the control plane made of it.
        pub status: Option<PolicyStatus>,
    }

    /// An `AuthorizationPolicy` object (the `kube` feature generates the same type with its CRD).
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct AuthorizationPolicy {
        /// Standard object metadata.
        pub metadata: ObjectMeta,
        /// Who may reach which port.
        pub spec: AuthorizationPolicySpec,
        /// What the control plane made of it.
        pub status: Option<PolicyStatus>,
    }
}

#[cfg(not(feature = "kube"))]
pub use plain::{AuthorizationPolicy, TenantPolicy};

/// The CRDs of our resources as one YAML stream (what `manifests/crds/` holds).
#[cfg(feature = "kube")]
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt as _;
    let mut out = String::from(
        "# Generated by `nodeproxy-controlplane crds`; do not edit.\n\
         # controlplane/tests/crds.rs fails when this file is stale.\n",
    );
    for crd in [TenantPolicy::crd(), AuthorizationPolicy::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
