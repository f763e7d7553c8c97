//! The gRPC server: Discovery (per-node view streams), Identity ([`crate::ca`]), the standard
//! health service and server reflection, on one listener.
//!
//! Owns [`DiscoveryService`] and [`serve`]. Each Watch authenticates the caller
//! ([`crate::auth`]), checks it may speak for the node it names, then runs a small task per
//! stream: on every publication of the [`Feed`] it cuts the node's view from the shared
//! translation, diffs it against what this stream last sent and sends the delta (the first
//! message is a full snapshot). A slow node only delays its own stream.
//!
//! Must not touch: the sources (they publish into the feed), private keys.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
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

/// Serves Discovery, Identity, health and reflection on `listener` until `shutdown` resolves.
/// Identity answers `UNIMPLEMENTED` (no CA); see [`serve_with_ca`].
pub async fn serve(
    listener: TcpListener,
    feed: Feed,
    auth: Arc<dyn Authenticator>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_with_ca(listener, feed, auth, None, shutdown).await
}

/// Like [`serve`]; with `ca`, `Identity.Certify` signs for identities of the caller's pods.
pub async fn serve_with_ca(
    listener: TcpListener,
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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Io {
            what: "cannot build the reflection service".to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "control plane serving");
    // Graceful shutdown waits for open calls; Watch streams never end by themselves.
    let (closing_tx, closing) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    };
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(DiscoveryServer::new(DiscoveryService {
            feed,
            auth: auth.clone(),
            closing,
        }))
        .add_service(IdentityServer::new(identity))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| Error::Io {
            what: format!("control plane server on {addr:?}"),
            source: std::io::Error::other(e.to_string()),
        })
}

/// Starts a server with the file source on `listener`, on the current runtime: the file
/// watcher (polling every `poll`) and the gRPC server. The daemon's standalone mode runs this
/// in-process. The task ends with an error if the server fails.
pub fn spawn_with_file(
    listener: TcpListener,
    input: crate::feed::FileInput,
    trust_domain: &str,
    auth: Arc<dyn Authenticator>,
    poll: std::time::Duration,
) -> tokio::task::JoinHandle<Result<()>> {
    spawn_with_file_on(
        listener,
        input,
        trust_domain,
        auth,
        crate::feed::Rereads::every(poll),
    )
}

/// Like [`spawn_with_file`], re-reading the file when `rereads` says.
pub fn spawn_with_file_on(
    listener: TcpListener,
    input: crate::feed::FileInput,
    trust_domain: &str,
    auth: Arc<dyn Authenticator>,
    rereads: crate::feed::Rereads,
) -> tokio::task::JoinHandle<Result<()>> {
    let (publisher, feed) = crate::feed::Publisher::new(trust_domain, crate::view::Mode::Strict);
    tokio::spawn(crate::feed::watch_file_on(input, publisher, rereads));
    tokio::spawn(serve(listener, feed, auth, std::future::pending()))
}
