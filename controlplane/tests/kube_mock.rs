//! The exact API requests of the Kubernetes source, against a `tower_test` mock API server:
//! every kind is listed then watched, namespaces only with the opt-in label selector, and a
//! `410 Gone` on the namespace watch makes it relist (the new list's labelled namespace then
//! meshes the pod listed earlier). And those of `TokenReviewAuth`: a TokenReview for our
//! audience, then a GET of the bound pod in the daemon's namespace only when the review names
//! the daemon's account; another account is refused without a lookup, a missing pod after
//! one, and an API server that cannot answer is `UNAVAILABLE`.
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use controlplane::auth::{Authenticator as _, Caller, POD_NAME_EXTRA, POD_UID_EXTRA};
use controlplane::feed::Publisher;
use controlplane::kubernetes::{AUDIENCE, KubeSource, TokenReviewAuth};
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

/// A mock API server's answers to TokenReviews (by token) and pod GETs (by path); records
/// every request as `METHOD path` (and, for reviews, checks the review's spec).
fn token_api(pods: &'static [&'static str]) -> (Client, Arc<Mutex<Vec<String>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let line = format!("{} {}", request.method(), request.uri().path());
            log.lock().unwrap().push(line.clone());
            let response = match line.as_str() {
                "POST /apis/authentication.k8s.io/v1/tokenreviews" => {
                    let body = request.into_body().collect_bytes().await.unwrap();
                    let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(review["spec"]["audiences"], json!([AUDIENCE]), "{review}");
                    let user = match review["spec"]["token"].as_str().unwrap() {
                        "unreachable" => {
                            let mut r = Response::new(Body::from(b"{}".to_vec()));
                            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            send.send_response(r);
                            continue;
                        }
                        "intruder" => "system:serviceaccount:app1:web",
                        _ => "system:serviceaccount:nodeproxy-system:nodeproxy",
                    };
                    let status = json!({"authenticated": true, "audiences": [AUDIENCE],
                        "user": {"username": user, "extra": {
                            POD_NAME_EXTRA: ["nodeproxy-a"], POD_UID_EXTRA: ["uid-a"]}}});
                    let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                        "metadata": {}, "spec": review["spec"], "status": status});
                    Response::new(Body::from(serde_json::to_vec(&body).unwrap()))
                }
                path if pods.iter().any(|p| path == format!("GET {p}")) => {
                    let pod = json!({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "nodeproxy-a", "namespace": "nodeproxy-system", "uid": "uid-a"},
                        "spec": {"nodeName": "node-a", "serviceAccountName": "nodeproxy", "containers": []}});
                    Response::new(Body::from(serde_json::to_vec(&pod).unwrap()))
                }
                _ => {
                    let status = json!({"apiVersion": "v1", "kind": "Status", "metadata": {},
                        "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
                    let mut r = Response::new(Body::from(serde_json::to_vec(&status).unwrap()));
                    *r.status_mut() = http::StatusCode::NOT_FOUND;
                    r
                }
            };
            send.send_response(response);
        }
    });
    (Client::new(service, "default"), seen)
}

const REVIEW: &str = "POST /apis/authentication.k8s.io/v1/tokenreviews";
const DAEMON_POD: &str = "/api/v1/namespaces/nodeproxy-system/pods/nodeproxy-a";

#[tokio::test]
async fn token_review_then_the_bound_pod_only_for_the_daemons_account() {
    let (client, seen) = token_api(&[DAEMON_POD]);
    let auth = TokenReviewAuth::new(client, AUDIENCE);
    let take = || std::mem::take(&mut *seen.lock().unwrap());

    assert_eq!(
        auth.authenticate("daemon").await.unwrap(),
        Caller::Node("node-a".into())
    );
    assert_eq!(take(), [REVIEW.to_owned(), format!("GET {DAEMON_POD}")]);

    let err = auth.authenticate("intruder").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().starts_with(
            "token of system:serviceaccount:app1:web: only nodeproxy-system/nodeproxy may speak \
             for a node"
        ),
        "{err:?}"
    );
    assert_eq!(take(), [REVIEW], "no pod lookup for another account");

    let err = auth.authenticate("unreachable").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .starts_with("cannot review the token with the kubernetes api"),
        "{err:?}"
    );
    assert_eq!(take(), [REVIEW]);

    // A configured account: its tokens, looked up in its namespace.
    let (client, seen) = token_api(&[]);
    let mesh = "mesh/proxy".parse().unwrap();
    let err = TokenReviewAuth::with_account(client, AUDIENCE, mesh)
        .authenticate("daemon")
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with(
            "token of system:serviceaccount:nodeproxy-system:nodeproxy: only mesh/proxy may"
        ),
        "{err:?}"
    );
    assert_eq!(std::mem::take(&mut *seen.lock().unwrap()), [REVIEW]);
}

#[tokio::test]
async fn a_token_whose_pod_is_gone_is_refused_after_the_lookup() {
    let (client, seen) = token_api(&[]);
    let err = TokenReviewAuth::new(client, AUDIENCE)
        .authenticate("daemon")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(
            "token of system:serviceaccount:nodeproxy-system:nodeproxy is bound to pod \
             nodeproxy-system/nodeproxy-a, which does not exist"
        ),
        "{err:?}"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        [REVIEW.to_owned(), format!("GET {DAEMON_POD}")]
    );
}
