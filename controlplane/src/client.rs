//! The node's Discovery client: watch this node's view, keep it current, survive outages.
//!
//! Owns [`ClientConfig`], [`Backoff`] and [`run`]. [`run`] connects, sends `Watch` with the
//! node's bearer token (re-read from its file on every connect, so rotated projected tokens
//! work), applies the snapshot and deltas to a [`WireView`] and publishes each complete
//! [`NodeView`] with its version. When the stream breaks it keeps the last published view,
//! counts a disconnect and reconnects after a capped exponential backoff with jitter
//! (backon's, restarted once a snapshot arrives). It never returns while anyone holds the
//! receiver.
//!
//! Must not touch: the data path (the caller applies views), Kubernetes clients.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder as _, ExponentialBuilder};
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

/// Reconnect pacing: capped exponential backoff with jitter, so that nodes that lost the
/// control plane together do not reconnect in lockstep.
///
/// The `n`th delay (0-based) lies in `[d/2, d)` for `d = initial·2^n` capped at `max`: backon's
/// [`ExponentialBuilder`] is given half of each bound, and its jitter adds a random fraction
/// of up to as much again. So `initial` is the longest first wait and `max` the longest wait.
/// It never gives up; a stream that delivers a snapshot restarts it from `initial`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// The longest first delay.
    pub initial: Duration,
    /// The longest delay.
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
    /// The backon builder of these delays.
    fn builder(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_jitter()
            .with_factor(2.0)
            .with_min_delay(self.initial / 2)
            .with_max_delay(self.max / 2)
            .without_max_times()
    }

    /// The delays of one client, from the first.
    fn delays(&self) -> Delays {
        let builder = self.builder();
        Delays {
            builder,
            current: builder.build(),
            max: self.max,
        }
    }
}

/// The reconnect delays of one [`run`]: the next one, and a restart after a good stream.
#[derive(Debug)]
struct Delays {
    builder: ExponentialBuilder,
    current: <ExponentialBuilder as backon::BackoffBuilder>::Backoff,
    max: Duration,
}

impl Delays {
    /// The delay before the next reconnect.
    fn next(&mut self) -> Duration {
        // Without a limit on attempts backon's iterator does not end; were it to, the
        // longest delay is the safe answer.
        self.current.next().unwrap_or(self.max)
    }

    /// Starts again from the first delay (a stream delivered a snapshot).
    fn reset(&mut self) {
        self.current = self.builder.build();
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
    let mut delays = config.backoff.delays();
    loop {
        let result = tokio::select! {
            r = watch_once(&config, &endpoint, &tx, &mut delays) => r,
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
    delays: &mut Delays,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Reaches its cap at the sixth delay.
    const BACKOFF: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(3200),
    };

    /// Where each delay of [`BACKOFF`] must lie, by attempt: backon 1.6's jitter
    /// (`ExponentialBuilder::with_jitter`) adds `c·f` for a random `f` in `[0, 1)` to the
    /// un-jittered delay `c`, so a delay lies in `[c, 2c)`, and `c` is `initial/2` doubled per
    /// attempt up to `max/2`.
    const BOUNDS: [(u64, u64); 8] = [
        (50, 100),
        (100, 200),
        (200, 400),
        (400, 800),
        (800, 1600),
        (1600, 3200),
        (1600, 3200),
        (1600, 3200),
    ];

    /// Whether `d` lies in `[low, high)` ms. backon computes in f32 seconds, so each bound
    /// gets 10 parts per million of slack.
    fn within(d: Duration, (low, high): (u64, u64)) -> bool {
        let (low, high) = (MS * low as u32, MS * high as u32);
        let slack = high / 100_000;
        d + slack >= low && d < high + slack
    }

    #[test]
    fn delays_double_from_initial_up_to_the_cap_within_backons_jitter_bounds() {
        let mut top_at_cap = Duration::ZERO;
        for run in 0..200 {
            let mut delays = BACKOFF.delays();
            let mut previous = Duration::ZERO;
            for (attempt, bounds) in BOUNDS.iter().enumerate() {
                let d = delays.next();
                assert!(
                    within(d, *bounds),
                    "run {run}, attempt {attempt}: {d:?} not in {bounds:?} ms"
                );
                // Below the cap the ranges only touch, so a delay is never shorter than the
                // one before; at the cap they are all drawn from one range.
                if bounds.0 > BOUNDS[attempt.saturating_sub(1)].0 {
                    assert!(
                        d + d / 100_000 >= previous,
                        "run {run}, attempt {attempt}: {d:?} < {previous:?}"
                    );
                }
                previous = d;
            }
            // It never gives up and stays capped.
            for attempt in BOUNDS.len()..100 {
                let d = delays.next();
                assert!(
                    within(d, (1600, 3200)),
                    "run {run}, attempt {attempt}: {d:?}"
                );
                top_at_cap = top_at_cap.max(d);
            }
        }
        // Capped waits spread up to the cap, not stuck at its un-jittered half.
        assert!(
            top_at_cap > MS * 3000,
            "longest capped delay {top_at_cap:?}"
        );
    }

    #[test]
    fn first_delays_are_jittered_and_restart_after_a_good_stream() {
        let mut delays = BACKOFF.delays();
        let mut firsts = Vec::new();
        for _ in 0..200 {
            firsts.push(delays.next());
            // Some failures, then a stream that delivered a snapshot.
            for _ in 0..7 {
                delays.next();
            }
            delays.reset();
        }
        for d in &firsts {
            assert!(within(*d, BOUNDS[0]), "first delay {d:?} after a reset");
        }
        let distinct: BTreeSet<Duration> = firsts.iter().copied().collect();
        assert!(
            distinct.len() > 100,
            "only {} distinct first delays of 200",
            distinct.len()
        );
        // Both halves of [50, 100) ms are hit (each misses all 200 with probability 2^-200).
        let lower = firsts.iter().filter(|d| **d < MS * 75).count();
        assert!(
            lower > 0 && lower < firsts.len(),
            "{lower} of 200 below 75 ms"
        );
    }
}
