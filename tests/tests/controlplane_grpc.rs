//! The control plane over real sockets: the file-source server and the node client on
//! loopback, over TLS with a serving certificate from a real CA that the clients trust through
//! a bundle file, as a remote control plane runs. A snapshot first, a delta after the file
//! changes, a bad file that changes nothing, the last view kept while the server is gone,
//! Watch refused without a token or for another node, the daemon's signer certifying over TLS
//! with its token file, health and reflection (v1 and v1alpha). Absences are asserted only
//! after a positive signal (a counted failure, a later update) shows the event that must not
//! have caused anything has happened.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use controlplane::api::discovery_client::DiscoveryClient;
use controlplane::api::identity_client::IdentityClient;
use controlplane::api::{CertifyRequest, NodeRequest};
use controlplane::auth::BootstrapTokens;
use controlplane::client::{
    self, Backoff, ClientConfig, DISCONNECTS_TOTAL, Target, Token, VersionedView,
};
use controlplane::feed::{FileInput, SOURCE_ERRORS_TOTAL};
use controlplane::server::Transport;
use tokio::sync::watch;
use tonic::transport::Channel;

const EXAMPLE: &str = include_str!("../../examples/authorization-policy.yaml");
const TOKEN_A: &str = "node-a-token-0123456789";

/// A file-source control plane on loopback, on a runtime of its own: stopping it drops every
/// task of the server (its listener, open connections and streams, the file watcher) at
/// once, as a crash would. Aborting only the server's task on the test's runtime would leave
/// open streams serving. It serves TLS with a certificate for 127.0.0.1 from its CA, whose
/// certificate is in `target`'s bundle file; with `ca` set, Identity.Certify signs.
struct Server {
    target: Target,
    ca: Arc<certs::Ca>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    fn start(path: &Path) -> Self {
        Self::start_with(path, false)
    }

    fn start_with(path: &Path, certify: bool) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let ca = Arc::new(certs::Ca::generate("cluster.local").unwrap());
        let bundle = bundle_file(path, &ca);
        let target = Target::new(
            format!("https://{}", listener.local_addr().unwrap()),
            Some(bundle),
        );
        let names = certs::ServingNames::parse(["127.0.0.1"]).unwrap();
        let serving =
            certs::ServingCert::new(ca.clone(), names, Duration::from_secs(3600)).unwrap();
        let transport = Transport::Tls(serving.server_config().unwrap());
        let entered = runtime.enter();
        let auth = Arc::new(BootstrapTokens::single(TOKEN_A, Some("node-a".into())));
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        if certify {
            let (publisher, feed) = controlplane::feed::Publisher::new(
                "cluster.local",
                controlplane::view::Mode::Strict,
            );
            tokio::spawn(controlplane::feed::watch_file(
                FileInput::Path(path.to_owned()),
                publisher,
                Duration::from_millis(50),
            ));
            tokio::spawn(controlplane::server::serve_on(
                listener,
                transport,
                feed,
                auth,
                Some(ca.clone()),
                std::future::pending(),
            ));
        } else {
            controlplane::server::spawn_with_file(
                listener,
                transport,
                FileInput::Path(path.to_owned()),
                "cluster.local",
                auth,
                Duration::from_millis(50),
            );
        }
        drop(entered);
        Self {
            target,
            ca,
            runtime: Some(runtime),
        }
    }

    /// A channel to it over TLS, verified against its bundle.
    async fn channel(&self) -> Channel {
        self.target.connect(|e| e).await.unwrap()
    }

    /// Stops the server and everything it runs.
    fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Not a plain drop: that would block, which an async test may not.
            runtime.shutdown_background();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes `ca`'s certificate next to `beside`, as a node's CA bundle.
fn bundle_file(beside: &Path, ca: &certs::Ca) -> PathBuf {
    let path = beside.with_extension("ca.pem");
    std::fs::write(&path, ca.root_pem()).unwrap();
    path
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

/// The sum of every sample of the counter `name` in this process.
fn counter(name: &str) -> f64 {
    nodeproxy_tests::local_counter(name, &[])
}

/// Polls (with a deadline) until the counter `name` reaches `at_least`.
async fn wait_for_counter(name: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(name) < at_least {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {name} to reach {at_least} (at {})",
            counter(name)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
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
    let mut server = Server::start(&path);

    // The node client.
    let (tx, mut rx) = watch::channel(None);
    let mut config = ClientConfig::new(
        server.target.clone(),
        "node-a",
        Token::Fixed(TOKEN_A.into()),
    );
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
    let mut raw = DiscoveryClient::new(server.channel().await);
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

    // A bad file keeps the last good view. Once the source has counted the failed load, a
    // good file with an unrelated change must be the very next publication, and the stream's
    // next update: nothing was published for the bad file.
    let errors = counter(SOURCE_ERRORS_TOTAL);
    std::fs::write(&path, "kind: [broken").unwrap();
    wait_for_counter(SOURCE_ERRORS_TOTAL, errors + 1.0).await;
    std::fs::write(
        &path,
        EXAMPLE.replace("name: metrics-api-0", "name: metrics-api-2"),
    )
    .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.version, delta.version + 1, "{next:?}");
    assert_eq!(next.removed_workloads, ["shop/metrics-api-1"], "{next:?}");
    let third = wait_for(&mut rx, "the change after the bad file", |v| {
        v.version > second.version
    })
    .await;
    assert_eq!(third.version, next.version);
    assert_eq!(names(&third), ["metrics-api-2", "web-0"]);

    // The server goes away: the node keeps its view. The client counts the broken stream and
    // then a failed reconnect (it tried with no server there); only then is the view checked.
    let disconnects = counter(DISCONNECTS_TOTAL);
    server.stop();
    let end = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .unwrap();
    assert!(!matches!(end, Ok(Some(_))), "the server is gone: {end:?}");
    wait_for_counter(DISCONNECTS_TOTAL, disconnects + 2.0).await;
    assert!(
        !rx.has_changed().unwrap(),
        "the client published a view while the server was gone"
    );
    let kept = rx.borrow().clone().unwrap();
    assert_eq!(kept.version, third.version);
    assert_eq!(names(&kept), ["metrics-api-2", "web-0"]);
    client_task.abort();
}

#[tokio::test]
async fn watch_is_refused_without_a_token_or_for_another_node_and_certify_is_unimplemented() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("view.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let server = Server::start(&path);
    let mut raw = DiscoveryClient::new(server.channel().await);

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

    let mut identity = IdentityClient::new(server.channel().await);
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
    let server = Server::start(&path);
    let channel = server.channel().await;
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

#[tokio::test]
async fn the_daemons_signer_certifies_over_tls_with_its_token_file_and_never_in_clear() {
    use certs::Signer as _;
    use nodeproxy::tunnel::signer::GrpcSigner;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("view.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN_A}\n")).unwrap();
    let server = Server::start_with(&path, true);
    // web-0 (shop/web) runs on node-a; node-a's token may ask for it.
    let web = certs::test_util::identity("shop", "web");
    let csr = || certs::ca::csr_from_pem(&certs::test_util::csr_pem(&web.to_string())).unwrap();

    let signer = GrpcSigner::new(
        server.target.clone(),
        Some(token.clone()),
        Duration::from_secs(600),
    );
    // The file source may not have published yet: until then the CA refuses (no such pod).
    let deadline = Instant::now() + Duration::from_secs(20);
    let signed = loop {
        match signer.sign(&web, csr()).await {
            Ok(signed) => break signed,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(certs::verify::spiffe_id_of(&signed.chain[0]).unwrap(), web);
    assert_eq!(signed.trust_bundle, [server.ca.root().clone()]);

    // The same signer over http:// refuses before it connects: the token never leaves.
    let plain = GrpcSigner::new(
        Target::from(server.target.url.replace("https://", "http://")),
        Some(token),
        Duration::from_secs(600),
    );
    let err = plain.sign(&web, csr()).await.unwrap_err().to_string();
    assert!(
        err.contains("only over TLS") && err.contains("https://"),
        "{err}"
    );
}
