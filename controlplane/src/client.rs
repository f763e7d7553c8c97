//! The node's Discovery client: watch this node's view, keep it current, survive outages.
//!
//! Owns [`ClientConfig`], [`Backoff`] and [`run`]. [`run`] connects, sends `Watch` with the
//! node's bearer token (re-read from its file on every connect, so rotated projected tokens
//! work), applies the snapshot and deltas to a [`WireView`] and publishes each complete
//! [`NodeView`] with its version. When the stream breaks it keeps the last published view,
//! counts a disconnect and reconnects after a capped exponential backoff with jitter (reset
//! once a snapshot arrives). It never returns while anyone holds the receiver.
//!
//! Must not touch: the data path (the caller applies views), Kubernetes clients.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tonic::transport::Endpoint;

use crate::api::NodeRequest;
use crate::api::discovery_client::DiscoveryClient;
use crate::convert::WireView;
use crate::error::{Error, Result};
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

/// Where the token comes from.
#[derive(Clone, Debug)]
pub enum Token {
    /// Fixed (the embedded server's own token).
    Fixed(String),
    /// Read from a file on every connect (bootstrap token, projected service-account token).
    File(PathBuf),
    /// None (the server will refuse; useful in tests).
    None,
}

/// Capped exponential backoff with jitter.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0-based): `initial·2^attempt` capped at `max`,
    /// then a random point in its upper half, so nodes do not reconnect in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
            .min(self.max);
        let random = RandomState::new().hash_one(attempt);
        let half = base / 2;
        half + half.mul_f64((random % 1_000) as f64 / 1_000.0)
    }
}

/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port`.
    pub endpoint: String,
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
    pub fn new(endpoint: impl Into<String>, node: impl Into<String>, token: Token) -> Self {
        Self {
            endpoint: endpoint.into(),
            node: node.into(),
            token,
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }

    fn channel_endpoint(&self) -> Result<Endpoint> {
        Endpoint::from_shared(self.endpoint.clone())
            .map(|e| {
                e.connect_timeout(self.connect_timeout)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .keep_alive_while_idle(true)
            })
            .map_err(|e| Error::Endpoint {
                endpoint: self.endpoint.clone(),
                reason: e.to_string(),
            })
    }

    fn token(&self) -> Result<Option<String>> {
        match &self.token {
            Token::Fixed(t) => Ok(Some(t.clone())),
            Token::None => Ok(None),
            Token::File(path) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|e| Error::TokenFile {
                    path: path.clone(),
                    reason: format!("cannot read it: {e}"),
                }),
        }
    }
}

/// Why one watch ended.
#[derive(Debug, thiserror::Error)]
enum WatchEnd {
    #[error(transparent)]
    Local(#[from] Error),
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the control plane ended the stream")]
    Eof,
}

/// Watches the node's view forever, publishing each complete view into `tx`. Returns when
/// every receiver of `tx` is gone. Checks the endpoint first.
pub async fn run(
    config: ClientConfig,
    tx: watch::Sender<Option<Arc<VersionedView>>>,
) -> Result<()> {
    let endpoint = config.channel_endpoint()?;
    let mut attempt = 0u32;
    loop {
        let result = tokio::select! {
            r = watch_once(&config, &endpoint, &tx, &mut attempt) => r,
            () = tx.closed() => return Ok(()),
        };
        let err = match result {
            Ok(()) => WatchEnd::Eof,
            Err(e) => e,
        };
        metrics::counter!(DISCONNECTS_TOTAL).increment(1);
        let delay = config.backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        let have_view = tx.borrow().is_some();
        tracing::warn!(
            endpoint = %config.endpoint, error = %err, retry_in = ?delay,
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
    endpoint: &Endpoint,
    tx: &watch::Sender<Option<Arc<VersionedView>>>,
    attempt: &mut u32,
) -> Result<(), WatchEnd> {
    let token = config.token()?;
    let channel = endpoint.connect().await?;
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(64 << 20);
    let mut request = tonic::Request::new(NodeRequest {
        node: config.node.clone(),
    });
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Endpoint {
                endpoint: config.endpoint.clone(),
                reason: "the token is not valid metadata text".to_owned(),
            })?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut stream = client.watch(request).await?.into_inner();
    let mut wire: Option<WireView> = None;
    while let Some(update) = stream.message().await? {
        let version = update.version;
        let state = match (&mut wire, update.snapshot) {
            (_, true) => {
                *attempt = 0;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered_within_the_upper_half() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..30 {
            let d = b.delay(attempt);
            let base = Duration::from_millis(100)
                .saturating_mul(2u32.saturating_pow(attempt.min(20)))
                .min(Duration::from_secs(2));
            assert!(d >= base / 2 && d <= base, "{attempt}: {d:?} vs {base:?}");
        }
    }
}
