//! Scale benchmark (not a test): an index of 5,000 pods, 500 services and 200 namespaces on
//! 100 nodes. Reports the time to translate the cluster and to cut one node's snapshot, the
//! bytes of a snapshot and of a one-pod delta on the wire, and the process's RSS while it
//! holds the index plus one wire view per node (what the server keeps per Watch stream).
//!
//! `cargo run --release -p controlplane --features server --example scale`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use controlplane::Objects;
use controlplane::convert::{SharedWire, WireView};
use controlplane::view::{Cluster, MESH_ENABLED, MESH_LABEL, Mode};
use k8s_openapi::api::core::v1::{
    Namespace, Pod, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const PODS: usize = 5_000;
const SERVICES: usize = 500;
const NAMESPACES: usize = 200;
const NODES: usize = 100;

fn meta(name: String, ns: Option<String>, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: ns,
        labels: Some(labels),
        ..Default::default()
    }
}

fn pod(i: usize) -> Pod {
    let ns = format!("ns-{}", i % NAMESPACES);
    let app = format!("app-{}", i % SERVICES);
    Pod {
        metadata: meta(
            format!("pod-{i}"),
            Some(ns),
            BTreeMap::from([("app".into(), app)]),
        ),
        spec: Some(PodSpec {
            node_name: Some(format!("node-{}", i % NODES)),
            service_account_name: Some(format!("sa-{}", i % SERVICES)),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some(format!("10.{}.{}.{}", i / 65_536, (i / 256) % 256, i % 256)),
            host_ip: Some(format!("192.168.0.{}", i % NODES)),
            phase: Some("Running".into()),
            ..Default::default()
        }),
    }
}

fn objects() -> Objects {
    let namespaces = (0..NAMESPACES)
        .map(|i| Namespace {
            metadata: meta(
                format!("ns-{i}"),
                None,
                BTreeMap::from([(MESH_LABEL.into(), MESH_ENABLED.into())]),
            ),
            ..Default::default()
        })
        .collect();
    let services = (0..SERVICES)
        .map(|i| Service {
            // Service i selects app-i, whose pods are all in namespace i % NAMESPACES.
            metadata: meta(
                format!("svc-{i}"),
                Some(format!("ns-{}", i % NAMESPACES)),
                BTreeMap::new(),
            ),
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([("app".into(), format!("app-{i}"))])),
                cluster_ip: Some(format!("10.96.{}.{}", i / 256, i % 256)),
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let mut objects = Objects::new("scale");
    objects.namespaces = namespaces;
    objects.pods = (0..PODS).map(pod).collect();
    objects.services = services;
    objects
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let rss_start = rss_kib();
    let objects = objects();
    let t = Instant::now();
    let cluster = Cluster::translate(&objects, "cluster.local", Mode::Lenient);
    let translate = t.elapsed();
    assert!(
        cluster.problems.is_empty(),
        "{:?}",
        cluster.problems.first()
    );

    let t = Instant::now();
    let shared = Arc::new(SharedWire::from_cluster(&cluster));
    let shared_time = t.elapsed();
    let t = Instant::now();
    let rounds = 20;
    let mut wire = WireView::default();
    for _ in 0..rounds {
        wire = WireView::for_node(&cluster, &shared, "node-7");
    }
    let per_node = t.elapsed() / rounds;
    let t = Instant::now();
    let snapshot = wire.snapshot(1);
    let encode = t.elapsed();
    let snapshot_bytes = prost::Message::encoded_len(&snapshot);

    // One pod goes away: the delta every node receives.
    let mut changed = objects.clone();
    changed.pods.remove(1234);
    let t = Instant::now();
    let cluster2 = Cluster::translate(&changed, "cluster.local", Mode::Lenient);
    let shared2 = Arc::new(SharedWire::from_cluster(&cluster2));
    let wire2 = WireView::for_node(&cluster2, &shared2, "node-7");
    let delta = wire.delta(&wire2, 2).expect("a change");
    let delta_time = t.elapsed();
    let delta_bytes = prost::Message::encoded_len(&delta);

    // What a server with one stream per node holds.
    let views: Vec<WireView> = (0..NODES)
        .map(|n| WireView::for_node(&cluster, &shared, &format!("node-{n}")))
        .collect();
    let rss = rss_kib();
    println!("scale: {PODS} pods, {SERVICES} services, {NAMESPACES} namespaces, {NODES} nodes");
    println!("translate_cluster_ms={:.1}", translate.as_secs_f64() * 1e3);
    println!(
        "shared_wire_ms={:.1} (once per change, for every node)",
        shared_time.as_secs_f64() * 1e3
    );
    println!(
        "node_snapshot_ms={:.2} (node part {:.3} + encode {:.2})",
        (per_node + encode).as_secs_f64() * 1e3,
        per_node.as_secs_f64() * 1e3,
        encode.as_secs_f64() * 1e3
    );
    println!("snapshot_bytes={snapshot_bytes}");
    println!(
        "delta_bytes={delta_bytes} (one pod removed; retranslate + diff {:.1} ms)",
        delta_time.as_secs_f64() * 1e3
    );
    println!(
        "rss_kib={rss} (start {rss_start}; index + {} per-node wire views)",
        views.len()
    );
}
