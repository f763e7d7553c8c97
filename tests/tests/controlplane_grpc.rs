//! The control plane over real sockets: the file-source server and the node client on
//! loopback. A snapshot first, a delta after the file changes, the last view kept while the
//! server is gone, and Watch refused without a token or for another node.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use controlplane::api::discovery_client::DiscoveryClient;
use controlplane::api::identity_client::IdentityClient;
use controlplane::api::{CertifyRequest, NodeRequest};
use controlplane::auth::BootstrapTokens;
use controlplane::client::{self, Backoff, ClientConfig, Token, VersionedView};
use controlplane::feed::FileInput;
use tokio::sync::watch;

const EXAMPLE: &str = include_str!("../../examples/authorization-policy.yaml");
const TOKEN_A: &str = "node-a-token-0123456789";

async fn start_server(path: &Path) -> (String, tokio::task::JoinHandle<controlplane::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let auth = Arc::new(BootstrapTokens::single(TOKEN_A, Some("node-a".into())));
    let server = controlplane::server::spawn_with_file(
        listener,
        FileInput::Path(path.to_owned()),
        "cluster.local",
        auth,
        Duration::from_millis(50),
    );
    (format!("http://{addr}"), server)
}

/// Waits (with a deadline) until the published view satisfies `f`.
async fn wait_for(
    rx: &mut watch::Receiver<Option<Arc<VersionedView>>>,
    what: &str,
    f: impl Fn(&VersionedView) -> bool,
) -> Arc<VersionedView> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = rx.borrow_and_update().clone()
            && f(&v)
        {
            return v;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

fn names(v: &VersionedView) -> Vec<String> {
    v.view.local.iter().map(|w| w.name.clone()).collect()
}

fn request(node: &str, token: Option<&str>) -> tonic::Request<NodeRequest> {
    let mut r = tonic::Request::new(NodeRequest { node: node.into() });
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

#[tokio::test]
async fn snapshot_then_delta_after_a_file_change_and_the_last_view_survives_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("view.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let (endpoint, server) = start_server(&path).await;

    // The node client.
    let (tx, mut rx) = watch::channel(None);
    let mut config = ClientConfig::new(&endpoint, "node-a", Token::Fixed(TOKEN_A.into()));
    config.backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    };
    let client_task = tokio::spawn(client::run(config, tx));
    let first = wait_for(&mut rx, "the first snapshot", |_| true).await;
    assert_eq!(names(&first), ["metrics-api-0", "web-0"]);
    assert_eq!(first.view.policies.len(), 1);
    assert_eq!(first.view.tenants.len(), 2);

    // A raw stream shows the wire: a snapshot, then a delta.
    let mut raw = DiscoveryClient::connect(endpoint.clone()).await.unwrap();
    let mut stream = raw
        .watch(request("node-a", Some(TOKEN_A)))
        .await
        .unwrap()
        .into_inner();
    let snapshot = stream.message().await.unwrap().unwrap();
    assert!(snapshot.snapshot);
    assert_eq!(snapshot.workloads.len(), 3);

    std::fs::write(
        &path,
        EXAMPLE.replace("name: metrics-api-0", "name: metrics-api-1"),
    )
    .unwrap();
    let delta = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!delta.snapshot);
    assert!(delta.version > snapshot.version);
    assert_eq!(delta.removed_workloads, ["shop/metrics-api-0"]);
    assert_eq!(delta.workloads.len(), 1);
    assert_eq!(delta.workloads[0].name, "metrics-api-1");
    let second = wait_for(&mut rx, "the delta", |v| v.version > first.version).await;
    assert_eq!(names(&second), ["metrics-api-1", "web-0"]);

    // A bad file keeps the last good view: no update.
    std::fs::write(&path, "kind: [broken").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.borrow().as_ref().unwrap().version, second.version);

    // The server goes away: the node keeps its view.
    server.abort();
    let _ = server.await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        names(rx.borrow().as_ref().unwrap()),
        ["metrics-api-1", "web-0"]
    );
    client_task.abort();
}

#[tokio::test]
async fn watch_is_refused_without_a_token_or_for_another_node_and_certify_is_unimplemented() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("view.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let (endpoint, _server) = start_server(&path).await;
    let mut raw = DiscoveryClient::connect(endpoint.clone()).await.unwrap();

    let err = raw.watch(request("node-a", None)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("Bearer"), "{}", err.message());

    let err = raw
        .watch(request("node-a", Some("forged-token-0123456789")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    let err = raw
        .watch(request("node-b", Some(TOKEN_A)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("only its own view"),
        "{}",
        err.message()
    );

    let mut identity = IdentityClient::connect(endpoint).await.unwrap();
    let mut req = tonic::Request::new(CertifyRequest::default());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN_A}").parse().unwrap(),
    );
    let err = identity.certify(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
}

#[tokio::test]
async fn health_and_reflection_answer_like_for_grpcurl() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("view.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let (endpoint, _server) = start_server(&path).await;

    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "nodeproxy.controlplane.v1.Discovery".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in [
        "nodeproxy.controlplane.v1.Discovery",
        "nodeproxy.controlplane.v1.Identity",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
    }
}
