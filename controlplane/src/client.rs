//! The node's Discovery client: watch this node's view, keep it current, survive outages.
//!
//! Owns [`Target`] (a control plane's address and the CA bundle that verifies it: what every
//! client of the control plane connects with, Certify too), [`Token`], [`ClientError`],
//! [`ClientConfig`], [`Backoff`] and [`run`]. A remote control plane is reached over TLS
//! (`https://`), its serving certificate verified against the CA bundle (re-read at every
//! connect, so a rotated bundle is picked up); a bearer token crosses plain text (`http://`)
//! only to the daemon's in-process server on loopback. A failed handshake is explained: a
//! certificate from another CA, an expired one, one for other names, a server without TLS.
//! [`run`] connects, sends `Watch` with the
//! node's bearer token (re-read from its file on every connect, so rotated projected tokens
//! work), applies the snapshot and deltas to a [`WireView`] and publishes each complete
//! [`NodeView`] with its version. When the stream breaks it keeps the last published view,
//! counts a disconnect and reconnects after a capped exponential backoff with jitter
//! (backon's, restarted once a snapshot arrives). It never returns while anyone holds the
//! receiver.
//!
//! Must not touch: the data path (the caller applies views), Kubernetes clients.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder as _, ExponentialBuilder};
use rustls::CertificateError;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::sync::watch;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

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

/// How long a TLS handshake with the control plane may take (the endpoint's connect timeout
/// covers only the TCP connect).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

impl Token {
    /// Reads the token (a file at every call) and sets `authorization: Bearer <token>` on
    /// `request`; with [`Token::None`] nothing.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) -> Result<(), ClientError> {
        let (token, from) = match self {
            Token::None => return Ok(()),
            Token::Fixed(token) => (token.clone(), "the given token".to_owned()),
            Token::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ClientError::Token {
                    from: format!("file {}", path.display()),
                    reason: format!("cannot read it ({e}); check --control-plane-token-file"),
                })?;
                (text.trim().to_owned(), format!("file {}", path.display()))
            }
        };
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Token {
                from,
                reason: "it is not valid header text (one line of printable ASCII)".to_owned(),
            })?;
        request.metadata_mut().insert("authorization", value);
        Ok(())
    }
}

/// Why a client of the control plane cannot use it: each names the value and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not a usable URL.
    #[error("control plane address {url:?}: {reason}; use https://host:port")]
    Address {
        /// The address as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `https://` without a CA bundle to verify the server with.
    #[error(
        "control plane {url}: TLS needs the control plane's CA bundle to verify it; give \
         --control-plane-ca FILE (NODEPROXY_CONTROL_PLANE_CA), the CA certificate of \
         nodeproxy-controlplane (its --ca-cert file)"
    )]
    NoCaBundle {
        /// The address.
        url: String,
    },
    /// A CA bundle given for a plain-text address.
    #[error(
        "control plane {url}: the CA bundle {} is given but http:// is plain text and would not \
         use it; use https://", path.display()
    )]
    CaWithoutTls {
        /// The address.
        url: String,
        /// The bundle.
        path: PathBuf,
    },
    /// The CA bundle is missing, unreadable or holds no usable certificate.
    #[error("control plane CA bundle {}: {reason}", path.display())]
    CaBundle {
        /// The bundle file.
        path: PathBuf,
        /// What is wrong, and the fix.
        reason: String,
    },
    /// A bearer token would cross plain text.
    #[error(
        "control plane {url}: the bearer token is sent only over TLS, and http:// is plain text; \
         use https://host:15012 with --control-plane-ca (a control plane started with \
         --insecure-plaintext cannot take tokens)"
    )]
    TokenInClear {
        /// The address.
        url: String,
    },
    /// The token cannot be read or sent.
    #[error("bearer token ({from}): {reason}")]
    Token {
        /// Where it comes from.
        from: String,
        /// What is wrong, and the fix.
        reason: String,
    },
    /// The TLS handshake failed; the reason says why and what to do.
    #[error("TLS to the control plane at {url}: {reason}")]
    Tls {
        /// The address.
        url: String,
        /// What failed, and the fix.
        reason: String,
    },
    /// No connection (refused, unreachable, timed out, no such host).
    #[error("cannot connect to the control plane at {url}: {reason}")]
    Connect {
        /// The address.
        url: String,
        /// The cause.
        reason: String,
    },
}

/// A control plane's address and how to trust it: what every client of it (the Watch client,
/// the daemon's Certify signer) connects with.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Target {
    /// `https://host:port`; `http://` only for the in-process server on loopback.
    pub url: String,
    /// The CA bundle (PEM) the server's certificate must chain to; required with `https://`
    /// and re-read at every connect.
    pub ca_file: Option<PathBuf>,
}

impl From<&str> for Target {
    /// An address without a CA bundle (plain text, unless it says `https://`).
    fn from(url: &str) -> Self {
        Self::new(url, None)
    }
}

impl From<String> for Target {
    fn from(url: String) -> Self {
        Self::new(url, None)
    }
}

impl From<&String> for Target {
    fn from(url: &String) -> Self {
        Self::new(url.as_str(), None)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl Target {
    /// `url`, verified against the bundle in `ca_file` when it is `https://`.
    pub fn new(url: impl Into<String>, ca_file: Option<PathBuf>) -> Self {
        Self {
            url: url.into(),
            ca_file,
        }
    }

    /// Checks everything that can be checked without connecting: the address, that `https://`
    /// has a readable bundle of certificates and `http://` none, and that `token` would
    /// cross TLS (or, a fixed token only, plain text to loopback: the in-process server).
    pub fn check(&self, token: &Token) -> Result<(), ClientError> {
        let (tls, host) = self.parse()?;
        match (tls, &self.ca_file) {
            (true, None) => {
                return Err(ClientError::NoCaBundle {
                    url: self.url.clone(),
                });
            }
            (true, Some(path)) => {
                load_bundle(path)?;
            }
            (false, Some(path)) => {
                return Err(ClientError::CaWithoutTls {
                    url: self.url.clone(),
                    path: path.clone(),
                });
            }
            (false, None) => {}
        }
        let in_clear = match token {
            Token::None => false,
            Token::File(_) => !tls,
            Token::Fixed(_) => !tls && !is_loopback(&host),
        };
        if in_clear {
            return Err(ClientError::TokenInClear {
                url: self.url.clone(),
            });
        }
        Ok(())
    }

    /// Connects: TLS verified against the bundle (read now) for `https://`. `configure` sets
    /// timeouts and keep-alives. A failed handshake is explained (another CA, expired, other
    /// names, no TLS there).
    pub async fn connect(
        &self,
        configure: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<Channel, ClientError> {
        let (tls, _) = self.parse()?;
        let mut endpoint = Endpoint::from_shared(self.url.clone()).map_err(|e| self.bad(e))?;
        if tls {
            let path = self
                .ca_file
                .as_deref()
                .ok_or_else(|| ClientError::NoCaBundle {
                    url: self.url.clone(),
                })?;
            let roots = load_bundle(path)?;
            endpoint = endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .trust_anchors(roots.roots)
                        .timeout(TLS_HANDSHAKE_TIMEOUT),
                )
                .map_err(|e| self.bad(e))?;
        }
        configure(endpoint)
            .connect()
            .await
            .map_err(|e| self.explain(&e))
    }

    /// Whether the address speaks TLS, and its host.
    fn parse(&self) -> Result<(bool, String), ClientError> {
        let endpoint = Endpoint::from_shared(self.url.clone()).map_err(|e| self.bad(e))?;
        let uri = endpoint.uri();
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(ClientError::Address {
                    url: self.url.clone(),
                    reason: "the scheme must be https:// (or http:// for a plain-text server)"
                        .to_owned(),
                });
            }
        };
        let host = uri.host().unwrap_or_default().to_owned();
        if host.is_empty() {
            return Err(ClientError::Address {
                url: self.url.clone(),
                reason: "it names no host".to_owned(),
            });
        }
        Ok((tls, host))
    }

    fn bad(&self, e: impl fmt::Display) -> ClientError {
        ClientError::Address {
            url: self.url.clone(),
            reason: e.to_string(),
        }
    }

    /// Turns a connect failure into what happened and what to do.
    fn explain(&self, e: &tonic::transport::Error) -> ClientError {
        let url = self.url.clone();
        let chain = error_chain(e);
        if let Some(tls) = find_rustls(e) {
            let bundle = self
                .ca_file
                .as_deref()
                .map_or_else(|| "the CA bundle".to_owned(), |p| p.display().to_string());
            return ClientError::Tls {
                url,
                reason: explain_tls(tls, &bundle),
            };
        }
        // tonic's handshake timeout is a private type: known by its message.
        if chain.contains("TLS handshake timeout") {
            return ClientError::Tls {
                url,
                reason: format!(
                    "it accepted the connection but did not finish a TLS handshake within \
                     {TLS_HANDSHAKE_TIMEOUT:?}: check that the address is the control plane's \
                     TLS port and that it is not overloaded"
                ),
            };
        }
        let refused =
            find_io(e).is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        let reason = if refused {
            format!(
                "{chain}: nothing listens there; check the address (--control-plane) and that the control plane runs"
            )
        } else {
            chain
        };
        ClientError::Connect { url, reason }
    }
}

/// What a failed TLS handshake means for an operator, and the fix. Pure: table-tested.
fn explain_tls(e: &rustls::Error, bundle: &str) -> String {
    let clocks = "check the clocks of this node and of the control plane";
    match e {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "its serving certificate is not signed by a CA in {bundle}: the control plane's \
                 CA differs from this bundle; give --control-plane-ca the control plane's CA \
                 certificate (its --ca-cert file)"
            ),
            CertificateError::ExpiredContext { time, not_after } => format!(
                "its serving certificate expired {} s ago (notAfter {} Unix seconds); the \
                 control plane reissues it at half its lifetime, so {clocks}",
                time.as_secs().saturating_sub(not_after.as_secs()),
                not_after.as_secs()
            ),
            CertificateError::Expired => {
                format!(
                    "its serving certificate expired; the control plane reissues it at half its lifetime, so {clocks}"
                )
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("its serving certificate is not valid yet; {clocks}")
            }
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => format!(
                "its serving certificate is for {}, not {}: dial it by one of those names, or \
                 add this one to the control plane's --serving-names",
                presented
                    .iter()
                    .map(|name| plain_name(name))
                    .collect::<Vec<_>>()
                    .join(", "),
                expected.to_str()
            ),
            CertificateError::NotValidForName => "its serving certificate is not for this \
                address: dial it by one of its --serving-names, or add this one there"
                .to_owned(),
            other => format!("its serving certificate is refused ({other:?})"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "it does not answer in TLS: is it a plain-text server (--insecure-plaintext), or \
             not the control plane? Use the address of its TLS port"
                .to_owned()
        }
        other => format!("the handshake failed ({other})"),
    }
}

/// A name as webpki presents it (`DnsName("a.svc")`, `IpAddress(10.0.0.1)`), plainly.
fn plain_name(presented: &str) -> &str {
    ["DnsName(", "IpAddress("]
        .iter()
        .find_map(|kind| presented.strip_prefix(kind)?.strip_suffix(')'))
        .map_or(presented, |name| name.trim_matches('"'))
}

/// The first rustls error in `e`'s chain (tokio-rustls wraps it in an `io::Error`, whose
/// `source` skips it, so each `io::Error` is looked into too).
fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = err.source();
    }
    None
}

/// The first I/O error in `e`'s chain.
fn find_io<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        next = err.source();
    }
    None
}

/// `e` and its causes, joined by `: `, each said once.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// Reads a PEM bundle of CA certificates: at least one, each usable as a trust anchor.
fn load_bundle(path: &Path) -> Result<rustls::RootCertStore, ClientError> {
    let bad = |reason: String| ClientError::CaBundle {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| {
        bad(format!(
            "cannot read it ({e}); give --control-plane-ca the control plane's CA certificate \
             (PEM; in Kubernetes the ConfigMap that holds it)"
        ))
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("it is not PEM ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("a certificate in it is unusable ({e})")))?;
    }
    if roots.is_empty() {
        return Err(bad(
            "it holds no CERTIFICATE; give the control plane's CA certificate (PEM)".to_owned(),
        ));
    }
    Ok(roots)
}

/// Whether `host` (from a URI: IPv6 in brackets) is this machine's loopback.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
    fn tokens_cross_only_tls_but_the_in_process_token_may_cross_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("ca.pem");
        let ca = certs::Ca::generate("cluster.local").unwrap();
        std::fs::write(&bundle, ca.root_pem()).unwrap();
        let file = Token::File(dir.path().join("token"));
        let fixed = Token::Fixed("t".into());
        let tls = |url: &str| Target::new(url, Some(bundle.clone()));
        let plain = |url: &str| Target::from(url);
        // (target, token, None: accepted / Some(what the error says))
        let cases = [
            (tls("https://cp:15012"), &file, None),
            (tls("https://cp:15012"), &fixed, None),
            (plain("http://127.0.0.1:1"), &fixed, None),
            (plain("http://[::1]:1"), &fixed, None),
            (plain("http://localhost:1"), &fixed, None),
            (plain("http://cp:15012"), &Token::None, None),
            (plain("http://127.0.0.1:1"), &file, Some("only over TLS")),
            (plain("http://cp:15012"), &fixed, Some("only over TLS")),
            (
                plain("http://10.0.0.1:15012"),
                &fixed,
                Some("only over TLS"),
            ),
            (
                plain("https://cp:15012"),
                &Token::None,
                Some("--control-plane-ca FILE"),
            ),
            (tls("http://cp:15012"), &Token::None, Some("use https://")),
            (
                plain("ftp://cp:15012"),
                &Token::None,
                Some("the scheme must be https://"),
            ),
            (
                plain("https://"),
                &Token::None,
                Some("control plane address \"https://\""),
            ),
        ];
        for (target, token, want) in cases {
            let got = target.check(token);
            match (want, got) {
                (None, Ok(())) => {}
                (Some(want), Err(e)) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(want),
                        "{target} {token:?}: {want:?} not in {msg}"
                    );
                    assert!(msg.contains(&target.url), "{target}: {msg}");
                }
                (want, got) => panic!("{target} {token:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn a_token_is_sent_as_a_bearer_header_read_from_its_file_at_each_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let header = |token: &Token| {
            let mut request = tonic::Request::new(());
            token.authorize(&mut request).map(|()| {
                request
                    .metadata()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned())
            })
        };
        let file = Token::File(path.clone());
        let err = header(&file).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("cannot read"),
            "{err}"
        );
        std::fs::write(&path, "abc\n").unwrap();
        assert_eq!(header(&file).unwrap().as_deref(), Some("Bearer abc"));
        std::fs::write(&path, "rotated").unwrap();
        assert_eq!(header(&file).unwrap().as_deref(), Some("Bearer rotated"));
        assert_eq!(header(&Token::None).unwrap(), None);
        let err = header(&Token::Fixed("a\nb".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid header text"), "{err}");
    }

    #[test]
    fn each_tls_failure_names_its_cause_and_fix() {
        use rustls::pki_types::{ServerName, UnixTime};
        let bundle = "/etc/nodeproxy/ca.pem";
        let at = |secs| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        let cert = |e| rustls::Error::InvalidCertificate(e);
        let cases = [
            (
                cert(CertificateError::UnknownIssuer),
                vec![
                    bundle,
                    "the control plane's CA differs",
                    "--control-plane-ca",
                ],
            ),
            (
                cert(CertificateError::BadSignature),
                vec![bundle, "the control plane's CA differs"],
            ),
            (
                cert(CertificateError::ExpiredContext {
                    time: at(1_000_090),
                    not_after: at(1_000_000),
                }),
                vec!["expired 90 s ago", "notAfter 1000000", "clocks"],
            ),
            (cert(CertificateError::Expired), vec!["expired", "clocks"]),
            (
                cert(CertificateError::NotValidYet),
                vec!["not valid yet", "clocks"],
            ),
            (
                cert(CertificateError::NotValidForNameContext {
                    expected: ServerName::try_from("10.0.0.1").unwrap(),
                    presented: vec![
                        "DnsName(\"cp.nodeproxy-system.svc\")".into(),
                        "IpAddress(10.0.0.2)".into(),
                    ],
                }),
                vec![
                    "for cp.nodeproxy-system.svc, 10.0.0.2, not 10.0.0.1",
                    "--serving-names",
                ],
            ),
            (
                cert(CertificateError::NotValidForName),
                vec!["--serving-names"],
            ),
            (
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                vec!["does not answer in TLS", "--insecure-plaintext"],
            ),
            (
                rustls::Error::NoApplicationProtocol,
                vec!["the handshake failed"],
            ),
        ];
        for (e, wants) in cases {
            let msg = explain_tls(&e, bundle);
            for want in wants {
                assert!(msg.contains(want), "{e:?}: {want:?} not in {msg}");
            }
        }
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
