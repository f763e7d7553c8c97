//! Builders of the objects the view's unit tests translate (test only).
//!
//! Must not touch: anything outside the tests of [`super`] and its modules.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use certs::Identity;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{MESH_ENABLED, MESH_LABEL};
use crate::error::Error;
use crate::objects::Objects;

pub(super) fn namespace(name: &str, meshed: bool) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: meshed.then(|| BTreeMap::from([(MESH_LABEL.into(), MESH_ENABLED.into())])),
            ..Default::default()
        },
        ..Default::default()
    }
}

pub(super) fn pod(ns: &str, name: &str, sa: Option<&str>, node: &str, ip: &str) -> Pod {
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

pub(super) fn objects(namespaces: Vec<Namespace>, pods: Vec<Pod>) -> Objects {
    Objects {
        namespaces,
        pods,
        ..Objects::new("test")
    }
}

pub(super) fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(super) fn problems(err: Error) -> Vec<(String, String)> {
    let Error::Config { problems, .. } = err else {
        panic!("{err}")
    };
    problems
        .into_iter()
        .map(|p| (p.object.unwrap_or_default(), p.field.unwrap_or_default()))
        .collect()
}
