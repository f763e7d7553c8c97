//! The exact API requests of the Kubernetes source, against a `tower_test` mock API server:
//! every kind is listed then watched, namespaces only with the opt-in label selector, and a
//! `410 Gone` on the namespace watch makes it relist (the new list's labelled namespace then
//! meshes the pod listed earlier).
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use controlplane::feed::Publisher;
use controlplane::kubernetes::KubeSource;
use controlplane::view::Mode;
use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::json;

fn list(api_version: &str, kind: &str, rv: &str, items: Vec<serde_json::Value>) -> Response<Body> {
    let body = json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv}, "items": items});
    Response::new(Body::from(serde_json::to_vec(&body).unwrap()))
}

fn gone() -> Response<Body> {
    let event = json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "metadata": {},
        "status": "Failure", "message": "too old resource version: 1 (5)", "reason": "Expired", "code": 410}});
    let mut bytes = serde_json::to_vec(&event).unwrap();
    bytes.push(b'\n');
    Response::new(Body::from(bytes))
}

#[tokio::test]
async fn lists_then_watches_every_kind_with_the_mesh_selector_and_relists_after_410_gone() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        let mut namespace_lists = 0;
        let mut namespace_watches = 0;
        // Watches that stay open: their responses are never sent (nor dropped).
        let mut open_watches = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let uri = request.uri().to_string();
            log.lock()
                .unwrap()
                .push(format!("{} {uri}", request.method()));
            let path = request.uri().path().to_owned();
            let watching = uri.contains("watch=true");
            let response = match (path.as_str(), watching) {
                ("/api/v1/namespaces", false) => {
                    namespace_lists += 1;
                    let items = if namespace_lists == 1 {
                        vec![]
                    } else {
                        vec![
                            json!({"metadata": {"name": "app1", "labels": {"nodeproxy.io/mesh": "enabled"}}}),
                        ]
                    };
                    list(
                        "v1",
                        "NamespaceList",
                        &format!("{}", namespace_lists * 5),
                        items,
                    )
                }
                ("/api/v1/namespaces", true) => {
                    namespace_watches += 1;
                    if namespace_watches == 1 {
                        gone()
                    } else {
                        open_watches.push(send);
                        continue;
                    }
                }
                ("/api/v1/pods", false) => list(
                    "v1",
                    "PodList",
                    "3",
                    vec![json!({
                    "metadata": {"name": "web-0", "namespace": "app1"},
                    "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": []},
                    "status": {"podIP": "10.200.1.2", "phase": "Running"}})],
                ),
                ("/api/v1/serviceaccounts", false) => list("v1", "ServiceAccountList", "3", vec![]),
                ("/api/v1/services", false) => list("v1", "ServiceList", "3", vec![]),
                ("/apis/nodeproxy.io/v1alpha1/tenantpolicies", false) => {
                    list("nodeproxy.io/v1alpha1", "TenantPolicyList", "3", vec![])
                }
                ("/apis/nodeproxy.io/v1alpha1/authorizationpolicies", false) => list(
                    "nodeproxy.io/v1alpha1",
                    "AuthorizationPolicyList",
                    "3",
                    vec![],
                ),
                (_, true) => {
                    open_watches.push(send);
                    continue;
                }
                _ => panic!("unexpected request {uri}"),
            };
            send.send_response(response);
        }
    });

    let client = Client::new(service, "default");
    let (publisher, mut feed) = Publisher::new("cluster.local", Mode::Lenient);
    let _source = KubeSource::spawn(client, publisher);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let local = feed
            .borrow_and_update()
            .as_ref()
            .map(|p| p.cluster.node_view("node-a").local.len())
            .unwrap_or(0);
        if local == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relisted namespace never meshed the pod: {:#?}",
            seen.lock().unwrap()
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), feed.changed()).await;
    }

    let seen = seen.lock().unwrap().clone();
    let ns: Vec<&String> = seen
        .iter()
        .filter(|r| r.contains("/api/v1/namespaces?"))
        .collect();
    // list, watch (410 Gone), list again, watch again.
    assert!(ns.len() >= 4, "{ns:#?}");
    for r in &ns {
        assert!(r.starts_with("GET "), "{r}");
        assert!(
            r.contains("labelSelector=nodeproxy.io%2Fmesh%3Denabled"),
            "{r}"
        );
    }
    assert!(
        !ns[0].contains("watch=true") && ns[1].contains("watch=true"),
        "{ns:#?}"
    );
    assert!(
        ns[1].contains("resourceVersion=5"),
        "the watch starts at the list's version: {}",
        ns[1]
    );
    assert!(
        !ns[2].contains("watch=true"),
        "410 Gone must relist: {ns:#?}"
    );
    assert!(
        ns[3].contains("watch=true") && ns[3].contains("resourceVersion=10"),
        "{ns:#?}"
    );
    for path in [
        "/api/v1/pods?",
        "/api/v1/services?",
        "/api/v1/serviceaccounts?",
        "/apis/nodeproxy.io/v1alpha1/tenantpolicies?",
        "/apis/nodeproxy.io/v1alpha1/authorizationpolicies?",
    ] {
        let of_kind: Vec<&String> = seen.iter().filter(|r| r.contains(path)).collect();
        assert!(
            of_kind.len() >= 2
                && !of_kind[0].contains("watch=true")
                && of_kind[1].contains("watch=true"),
            "{path}: {of_kind:#?}"
        );
        assert!(
            !of_kind[0].contains("labelSelector") && !of_kind[0].contains("fieldSelector"),
            "{path}: cluster-wide"
        );
    }
}
