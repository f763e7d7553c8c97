//! The control-plane channel over TLS on loopback: the server's certificate from its CA, the
//! node's client verifying it against a bundle file. A node with the bundle gets its view; a
//! plain-text client gets an error and never a view; a certificate from another CA, an
//! expired one, one for other names, a plain-text server, a server that never answers the
//! handshake and an address where nothing listens each fail with an error that names the cause
//! and the fix.
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use certs::{Ca, ServingCert, ServingNames};
use controlplane::api::NodeRequest;
use controlplane::api::discovery_client::DiscoveryClient;
use controlplane::auth::BootstrapTokens;
use controlplane::client::{self, ClientConfig, ClientError, Target, Token};
use controlplane::feed::FileInput;
use controlplane::server::Transport;
use tokio::sync::watch;

const EXAMPLE: &str = include_str!("../../examples/authorization-policy.yaml");
const TOKEN: &str = "node-a-token-0123456789";

/// A CA with its certificate in a file, as a node's bundle.
struct Bundle {
    ca: Arc<Ca>,
    file: PathBuf,
}

impl Bundle {
    fn new(dir: &Path, name: &str) -> Self {
        let ca = Ca::generate("cluster.local").unwrap();
        let file = dir.join(name);
        std::fs::write(&file, ca.root_pem()).unwrap();
        Self {
            ca: Arc::new(ca),
            file,
        }
    }
}

/// Starts a file-source server on 127.0.0.1 speaking `transport`; returns its port.
async fn start(transport: Transport) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let auth = Arc::new(BootstrapTokens::single(TOKEN, Some("node-a".into())));
    let input = FileInput::Text {
        name: "example".into(),
        text: EXAMPLE.into(),
    };
    controlplane::server::spawn_with_file(
        listener,
        transport,
        input,
        "cluster.local",
        auth,
        Duration::from_secs(60),
    );
    port
}

/// TLS with a certificate from `ca` for `names`.
fn tls(ca: &Arc<Ca>, names: &[&str]) -> Transport {
    let names = ServingNames::parse(names).unwrap();
    let serving = ServingCert::new(ca.clone(), names, Duration::from_secs(3600)).unwrap();
    Transport::Tls(serving.server_config().unwrap())
}

async fn connect(target: &Target) -> Result<(), ClientError> {
    target.connect(|e| e).await.map(drop)
}

/// Connects to `https://127.0.0.1:<port>`, trusting `bundle`.
async fn dial(port: u16, bundle: &Path) -> Result<(), ClientError> {
    let url = format!("https://127.0.0.1:{port}");
    connect(&Target::new(url, Some(bundle.to_owned()))).await
}

#[tokio::test]
async fn a_node_with_the_bundle_gets_its_view_and_a_plain_text_client_only_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::new(dir.path(), "ca.pem");
    let port = start(tls(&bundle.ca, &["127.0.0.1"])).await;

    // A plain-text gRPC client, token and all: refused at the TLS handshake, before any
    // request is read. Whether the error comes at connect or at the call depends on timing.
    let plain = async {
        let mut raw = DiscoveryClient::connect(format!("http://127.0.0.1:{port}")).await?;
        let mut request = tonic::Request::new(NodeRequest {
            node: "node-a".into(),
        });
        Token::Fixed(TOKEN.into()).authorize(&mut request)?;
        let mut stream = raw.watch(request).await?.into_inner();
        Ok::<_, Box<dyn std::error::Error>>(stream.message().await?)
    };
    let got = tokio::time::timeout(Duration::from_secs(20), plain)
        .await
        .unwrap();
    assert!(got.is_err(), "a plain-text client got {got:?}");

    // The node, verifying the server against its bundle, gets its view.
    let target = Target::new(format!("https://127.0.0.1:{port}"), Some(bundle.file));
    let (tx, mut rx) = watch::channel(None);
    let task = tokio::spawn(client::run(
        ClientConfig::new(target, "node-a", Token::Fixed(TOKEN.into())),
        tx,
    ));
    let view = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(Option::is_some))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    let names: Vec<&str> = view.view.local.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["metrics-api-0", "web-0"]);
    task.abort();
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_naming_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let served = Bundle::new(dir.path(), "served.pem");
    let other = Bundle::new(dir.path(), "other.pem");
    let port = start(tls(&served.ca, &["127.0.0.1"])).await;
    let url = format!("https://127.0.0.1:{port}");
    connect(&Target::new(&url, Some(served.file)))
        .await
        .unwrap();
    let err = connect(&Target::new(&url, Some(other.file.clone())))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    let msg = err.to_string();
    for want in [
        other.file.to_str().unwrap(),
        "the control plane's CA differs",
        "--control-plane-ca",
        &url,
    ] {
        assert!(msg.contains(want), "{want:?} not in {msg}");
    }
}

#[tokio::test]
async fn an_expired_serving_certificate_is_refused_naming_the_clocks() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::new(dir.path(), "ca.pem");
    let names = ServingNames::parse(["127.0.0.1"]).unwrap();
    let serving =
        ServingCert::without_renewal(bundle.ca.clone(), names, Duration::from_secs(2)).unwrap();
    let port = start(Transport::Tls(serving.server_config().unwrap())).await;
    let target = Target::new(format!("https://127.0.0.1:{port}"), Some(bundle.file));
    connect(&target).await.unwrap();
    // It expires within 2 s (webpki counts whole seconds): poll until the client says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        match connect(&target).await {
            Ok(()) => assert!(Instant::now() < deadline, "still accepted"),
            Err(e) => break e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let msg = err.to_string();
    assert!(
        msg.contains("serving certificate expired") && msg.contains("clocks"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_certificate_for_other_names_a_plain_text_server_and_no_server_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::new(dir.path(), "ca.pem");
    let port = start(tls(
        &bundle.ca,
        &["nodeproxy-controlplane.nodeproxy-system.svc"],
    ))
    .await;
    let err = dial(port, &bundle.file).await.unwrap_err().to_string();
    assert!(
        err.contains("for nodeproxy-controlplane.nodeproxy-system.svc, not 127.0.0.1")
            && err.contains("--serving-names"),
        "{err}"
    );

    let port = start(Transport::Plaintext).await;
    let err = dial(port, &bundle.file).await.unwrap_err().to_string();
    assert!(err.contains("does not answer in TLS"), "{err}");

    // A port where nothing listens (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = dial(port, &bundle.file).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("https://127.0.0.1:{port}")) && msg.contains("nothing listens there"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_the_handshake_is_given_up_on() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::new(dir.path(), "ca.pem");
    // Accepts, reads, never answers: without a handshake timeout the client would wait forever.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let started = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(30), dial(port, &bundle.file))
        .await
        .expect("the client still waits after 30 s");
    let msg = got.unwrap_err().to_string();
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    assert!(
        msg.contains("did not finish a TLS handshake within 10s") && msg.contains("TLS port"),
        "{msg}"
    );
    hold.abort();
}
