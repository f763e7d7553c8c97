//! The checked-in CRDs (`manifests/crds/nodeproxy.io.yaml`) must be what the Rust types
//! generate. Regenerate with:
//! `cargo run -p controlplane --features kube --bin nodeproxy-controlplane -- crds > manifests/crds/nodeproxy.io.yaml`
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used)]

#[test]
fn checked_in_crds_are_up_to_date() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/crds/nodeproxy.io.yaml"
    );
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    let generated = controlplane::crd::crds_yaml().unwrap();
    assert!(
        checked_in == generated,
        "{path} is stale; regenerate it with `cargo run -p controlplane --features kube --bin \
         nodeproxy-controlplane -- crds > manifests/crds/nodeproxy.io.yaml`"
    );
}

#[test]
fn the_crds_parse_back_as_custom_resource_definitions() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let yaml = controlplane::crd::crds_yaml().unwrap();
    let crds: Vec<CustomResourceDefinition> = serde_saphyr::from_multiple(&yaml).unwrap();
    let names: Vec<_> = crds
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "tenantpolicies.nodeproxy.io",
            "authorizationpolicies.nodeproxy.io"
        ]
    );
}
