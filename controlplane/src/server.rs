//! The gRPC server: Discovery (per-node view streams), Identity ([`crate::ca`]), the standard
//! health service and server reflection (v1 and v1alpha, for older clients such as Python's
//! `grpcio-reflection`), on one listener.
//!
//! Owns [`DiscoveryService`], [`Transport`] and [`serve_on`]. A remote control plane speaks
//! TLS ([`Transport::Tls`], with `certs::ServingCert`'s config): each accepted connection is
//! handshaken on a task of its own (bounded by a timeout, so a silent client holds nothing
//! but its task) before gRPC sees it, and a client that does not speak TLS — a plain-text
//! gRPC client included — is refused at the handshake, before any request is read. Plain
//! text ([`Transport::Plaintext`]) is for the daemon's in-process channel on loopback and
//! explicit experiments. Each Watch authenticates the caller
//! ([`crate::auth`]), checks it may speak for the node it names, then runs a small task per
//! stream: on every publication of the [`Feed`] it cuts the node's view from the shared
//! translation, diffs it against what this stream last sent and sends the delta (the first
//! message is a full snapshot). A slow node only delays its own stream.
//!
//! Must not touch: the sources (they publish into the feed), private keys.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

use crate::api::discovery_server::{Discovery, DiscoveryServer};
use crate::api::identity_server::IdentityServer;
use crate::api::{self, NodeRequest, ViewUpdate};
use crate::auth::{self, Authenticator};
use crate::ca::IdentityService;
use crate::convert::WireView;
use crate::error::{Error, Result};
use crate::feed::Feed;

/// Metric: open Watch streams (gauge).
pub const WATCH_STREAMS: &str = "nodeproxy_controlplane_watch_streams";
/// Metric: updates sent to nodes, by `kind` (`snapshot`, `delta`) (counter).
pub const PUSHES_TOTAL: &str = "nodeproxy_controlplane_pushes_total";
/// Metric: seconds from a source's publication (or the stream's start, if later) to the
/// update's send (histogram/summary).
pub const PUSH_LATENCY: &str = "nodeproxy_controlplane_push_latency_seconds";
/// Metric: bytes of updates sent, by `kind` (counter).
pub const PUSH_BYTES_TOTAL: &str = "nodeproxy_controlplane_push_bytes_total";
/// Metric: connections refused at the TLS handshake, by `reason` (`tls`: not TLS or a
/// failed handshake, `timeout`) (counter).
pub const TLS_REFUSED_TOTAL: &str = "nodeproxy_controlplane_tls_refused_total";

/// The names of the serving certificate unless configured otherwise: the control plane's
/// Service in `nodeproxy-system`, short and fully qualified.
pub const DEFAULT_SERVING_NAMES: [&str; 2] = [
    "nodeproxy-controlplane.nodeproxy-system.svc",
    "nodeproxy-controlplane.nodeproxy-system.svc.cluster.local",
];

/// How long a connection may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the listener speaks.
#[derive(Debug, Clone)]
pub enum Transport {
    /// TLS with this server config (a remote control plane: `certs::ServingCert::server_config`).
    Tls(Arc<rustls::ServerConfig>),
    /// Plain text: the daemon's in-process channel on loopback, or an explicit experiment
    /// (`--insecure-plaintext`). Bearer tokens cross it in clear.
    Plaintext,
}

/// The Discovery service.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    feed: Feed,
    auth: Arc<dyn Authenticator>,
    /// Turns true when the server shuts down: open streams end so that shutdown completes.
    closing: watch::Receiver<bool>,
}

impl DiscoveryService {
    /// Serves views from `feed` to callers `auth` accepts.
    pub fn new(feed: Feed, auth: Arc<dyn Authenticator>) -> Self {
        let (_, closing) = watch::channel(false);
        Self {
            feed,
            auth,
            closing,
        }
    }
}

/// Decrements the stream gauge when a stream's task ends, however it ends.
struct StreamGauge;

impl StreamGauge {
    fn open() -> Self {
        metrics::gauge!(WATCH_STREAMS).increment(1.0);
        Self
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        metrics::gauge!(WATCH_STREAMS).decrement(1.0);
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = ReceiverStream<Result<ViewUpdate, Status>>;

    async fn watch(
        &self,
        request: Request<NodeRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let token = auth::bearer(request.metadata())?;
        let caller = self.auth.authenticate(token).await?;
        let node = request.into_inner().node;
        if node.is_empty() {
            return Err(Status::invalid_argument(
                "node is empty; name the node whose view to watch",
            ));
        }
        auth::authorize(&caller, &node)?;
        tracing::info!(%node, "watch stream opened");
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(stream_view(
            self.feed.clone(),
            self.closing.clone(),
            node,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Sends `node`'s view: a snapshot once the feed has one, then a delta per change.
async fn stream_view(
    mut feed: Feed,
    mut closing: watch::Receiver<bool>,
    node: String,
    tx: mpsc::Sender<Result<ViewUpdate, Status>>,
) {
    let _gauge = StreamGauge::open();
    let started = std::time::Instant::now();
    let mut last: Option<WireView> = None;
    loop {
        let published = feed.borrow_and_update().clone();
        if let Some(published) = published {
            let wire = WireView::for_node(&published.cluster, &published.shared, &node);
            let (kind, update) = match &last {
                None => ("snapshot", Some(wire.snapshot(published.version))),
                Some(prev) => ("delta", prev.delta(&wire, published.version)),
            };
            if let Some(update) = update {
                let bytes = prost::Message::encoded_len(&update);
                if tx.send(Ok(update)).await.is_err() {
                    break;
                }
                metrics::counter!(PUSHES_TOTAL, "kind" => kind).increment(1);
                metrics::counter!(PUSH_BYTES_TOTAL, "kind" => kind).increment(bytes as u64);
                let since = published.at.max(started);
                metrics::histogram!(PUSH_LATENCY).record(since.elapsed().as_secs_f64());
                tracing::debug!(%node, version = published.version, kind, bytes, "view pushed");
            }
            last = Some(wire);
        }
        tokio::select! {
            changed = feed.changed() => if changed.is_err() { break },
            () = tx.closed() => break,
            // Err: no shutdown signal exists (the branch is then disabled).
            Ok(()) = closing.changed() => {
                let _ = tx
                    .send(Err(Status::unavailable(
                        "the control plane is shutting down; reconnect",
                    )))
                    .await;
                break;
            }
        }
    }
    tracing::info!(%node, "watch stream closed");
}

/// Serves Discovery, Identity, health and reflection in plain text on `listener` until
/// `shutdown` resolves (the in-process channel, tests on loopback). Identity answers
/// `UNIMPLEMENTED` (no CA); see [`serve_on`].
pub async fn serve(
    listener: TcpListener,
    feed: Feed,
    auth: Arc<dyn Authenticator>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_on(listener, Transport::Plaintext, feed, auth, None, shutdown).await
}

/// Like [`serve`], in plain text; with `ca`, `Identity.Certify` signs for identities of the
/// caller's pods.
pub async fn serve_with_ca(
    listener: TcpListener,
    feed: Feed,
    auth: Arc<dyn Authenticator>,
    ca: Option<Arc<certs::Ca>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_on(listener, Transport::Plaintext, feed, auth, ca, shutdown).await
}

/// Serves Discovery, Identity, health and reflection on `listener`, speaking `transport`,
/// until `shutdown` resolves. With `ca`, `Identity.Certify` signs for identities of the
/// caller's pods; without, it answers `UNIMPLEMENTED`.
pub async fn serve_on(
    listener: TcpListener,
    transport: Transport,
    feed: Feed,
    auth: Arc<dyn Authenticator>,
    ca: Option<Arc<certs::Ca>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let identity = match ca {
        Some(ca) => IdentityService::with_ca(auth.clone(), feed.clone(), ca),
        None => IdentityService::new(auth.clone()),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<DiscoveryServer<DiscoveryService>>()
        .await;
    let reflection_error = |e: tonic_reflection::server::Error| Error::Io {
        what: "cannot build the reflection service".to_owned(),
        source: std::io::Error::other(e.to_string()),
    };
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    // v1alpha too: Python's grpcio-reflection and older grpcurl speak only that.
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;
    let addr = listener.local_addr().ok();
    // Graceful shutdown waits for open calls; Watch streams never end by themselves.
    let (closing_tx, closing) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    };
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(DiscoveryServer::new(DiscoveryService {
            feed,
            auth: auth.clone(),
            closing,
        }))
        .add_service(IdentityServer::new(identity));
    let served = match transport {
        Transport::Tls(config) => {
            tracing::info!(?addr, "control plane serving over TLS");
            router
                .serve_with_incoming_shutdown(tls_incoming(listener, config), shutdown)
                .await
        }
        Transport::Plaintext => {
            tracing::info!(?addr, "control plane serving in plain text");
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
    };
    served.map_err(|e| Error::Io {
        what: format!("control plane server on {addr:?}"),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Reflection over our API and the health service.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// The connections of `listener` that completed a TLS handshake with `config`. Each handshake
/// runs on a task of its own, so a slow or silent client delays nobody else; a failed one is
/// counted and logged with the peer's address, and the connection closed.
fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // The server stopped taking connections: close the listener.
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or memory: wait instead of spinning.
                    tracing::warn!(error = %e, "control plane cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        metrics::counter!(TLS_REFUSED_TOTAL, "reason" => "tls").increment(1);
                        tracing::info!(
                            %peer, error = %e,
                            "refused a connection at the TLS handshake (clients must use \
                             https:// and trust this control plane's CA)"
                        );
                    }
                    Err(_) => {
                        metrics::counter!(TLS_REFUSED_TOTAL, "reason" => "timeout").increment(1);
                        tracing::info!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Starts a server with the file source on `listener`, speaking `transport`, on the current
/// runtime: the file watcher (polling every `poll`) and the gRPC server. The task ends with an
/// error if the server fails.
pub fn spawn_with_file(
    listener: TcpListener,
    transport: Transport,
    input: crate::feed::FileInput,
    trust_domain: &str,
    auth: Arc<dyn Authenticator>,
    poll: Duration,
) -> tokio::task::JoinHandle<Result<()>> {
    spawn_with_file_on(
        listener,
        transport,
        input,
        trust_domain,
        auth,
        crate::feed::Rereads::every(poll),
    )
}

/// Like [`spawn_with_file`], re-reading the file when `rereads` says. The daemon's standalone
/// mode runs this in-process, in plain text on loopback.
pub fn spawn_with_file_on(
    listener: TcpListener,
    transport: Transport,
    input: crate::feed::FileInput,
    trust_domain: &str,
    auth: Arc<dyn Authenticator>,
    rereads: crate::feed::Rereads,
) -> tokio::task::JoinHandle<Result<()>> {
    let (publisher, feed) = crate::feed::Publisher::new(trust_domain, crate::view::Mode::Strict);
    tokio::spawn(crate::feed::watch_file_on(input, publisher, rereads));
    tokio::spawn(serve_on(
        listener,
        transport,
        feed,
        auth,
        None,
        std::future::pending(),
    ))
}
