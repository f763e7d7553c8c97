//! The node's Discovery client: watch this node's view, keep it current, survive outages.
//!
//! Owns [`ClientConfig`], [`VersionedView`], the metric names and [`run`], the Watch loop: it
//! connects ([`Target::connect`]), sends `Watch` with the node's bearer token ([`Token`],
//! re-read from its file on every connect, so rotated projected tokens work), applies the
//! snapshot and deltas to a [`WireView`] and publishes each complete [`NodeView`] with its
//! version. When the stream breaks it keeps the last published view, counts a disconnect and
//! reconnects after a capped exponential backoff with jitter ([`Backoff`]: backon's, restarted
//! once a snapshot arrives). It never returns while anyone holds the receiver.
//!
//! The rooms (private modules, their public types re-exported here, so paths stay
//! `controlplane::client::Target` and so on): `target` ([`Target`]: a control plane's address
//! and the CA bundle that verifies it, what every client of the control plane connects with,
//! Certify too; TLS and the explanation of a failed handshake), `token` ([`Token`]), `error`
//! ([`ClientError`]) and `backoff` ([`Backoff`]).
//!
//! Must not touch: the data path (the caller applies views), Kubernetes clients.

mod backoff;
mod error;
mod target;
mod token;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tonic::transport::Endpoint;

pub use self::backoff::Backoff;
use self::backoff::Delays;
pub use self::error::ClientError;
pub use self::target::Target;
pub use self::token::Token;
use crate::api::NodeRequest;
use crate::api::discovery_client::DiscoveryClient;
use crate::convert::WireView;
use crate::error::Error;
use crate::view::NodeView;

/// Metric: the version of the view last applied (gauge).
pub const CONFIG_VERSION: &str = "nodeproxy_config_version";
/// Metric: when the view last changed, Unix seconds (gauge).
pub const CONFIG_LAST_UPDATE: &str = "nodeproxy_config_last_update_timestamp_seconds";
/// Metric: streams to the control plane that broke or could not be opened (counter).
pub const DISCONNECTS_TOTAL: &str = "nodeproxy_controlplane_disconnects_total";
/// A view and the control plane's version of it.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionedView {
    /// The server's version.
    pub version: u64,
    /// The node's view.
    pub view: NodeView,
}
/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The control plane and how to trust it.
    pub target: Target,
    /// This node's name.
    pub node: String,
    /// The bearer token.
    pub token: Token,
    /// Reconnect pacing.
    pub backoff: Backoff,
    /// Connect timeout.
    pub connect_timeout: Duration,
}

impl ClientConfig {
    /// A config with default backoff and timeouts.
    pub fn new(target: impl Into<Target>, node: impl Into<String>, token: Token) -> Self {
        Self {
            target: target.into(),
            node: node.into(),
            token,
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Checks the target and that the token would cross TLS ([`Target::check`]).
    pub fn check(&self) -> Result<(), ClientError> {
        self.target.check(&self.token)
    }

    fn configure(&self, endpoint: Endpoint) -> Endpoint {
        endpoint
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
    }
}

/// Why one watch ended.
#[derive(Debug, thiserror::Error)]
enum WatchEnd {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    View(#[from] Error),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the control plane ended the stream")]
    Eof,
}

/// Watches the node's view forever, publishing each complete view into `tx`. Returns when
/// every receiver of `tx` is gone. Checks the target first ([`ClientConfig::check`]): what
/// cannot work is an error at once; what may heal (the server, the bundle's file, the token's
/// file) is retried, the last view kept.
pub async fn run(
    config: ClientConfig,
    tx: watch::Sender<Option<Arc<VersionedView>>>,
) -> Result<(), ClientError> {
    config.check()?;
    let mut delays = config.backoff.delays();
    loop {
        let result = tokio::select! {
            r = watch_once(&config, &tx, &mut delays) => r,
            () = tx.closed() => return Ok(()),
        };
        let err = match result {
            Ok(()) => WatchEnd::Eof,
            Err(e) => e,
        };
        metrics::counter!(DISCONNECTS_TOTAL).increment(1);
        let delay = delays.next();
        let have_view = tx.borrow().is_some();
        tracing::warn!(
            endpoint = %config.target, error = %err, retry_in = ?delay,
            keeping_last_view = have_view,
            "control plane watch failed"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = tx.closed() => return Ok(()),
        }
    }
}

async fn watch_once(
    config: &ClientConfig,
    tx: &watch::Sender<Option<Arc<VersionedView>>>,
    delays: &mut Delays,
) -> Result<(), WatchEnd> {
    let mut request = tonic::Request::new(NodeRequest {
        node: config.node.clone(),
    });
    config.token.authorize(&mut request)?;
    let channel = config.target.connect(|e| config.configure(e)).await?;
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(64 << 20);
    let mut stream = client.watch(request).await?.into_inner();
    let mut wire: Option<WireView> = None;
    while let Some(update) = stream.message().await? {
        let version = update.version;
        let state = match (&mut wire, update.snapshot) {
            (_, true) => {
                delays.reset();
                wire.insert(WireView::default())
            }
            (Some(state), false) => state,
            (None, false) => {
                return Err(tonic::Status::data_loss(
                    "the control plane sent a delta before a snapshot",
                )
                .into());
            }
        };
        state.apply(update);
        let view = state.to_view()?;
        if view.node != config.node {
            return Err(tonic::Status::data_loss(format!(
                "asked for node {:?}, got the view of {:?}",
                config.node, view.node
            ))
            .into());
        }
        metrics::gauge!(CONFIG_VERSION).set(version as f64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!(CONFIG_LAST_UPDATE).set(now);
        tracing::debug!(version, local = view.local.len(), "view received");
        tx.send_replace(Some(Arc::new(VersionedView { version, view })));
    }
    Ok(())
}
