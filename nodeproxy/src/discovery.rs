//! How the daemon gets its node view: always through the control plane's Discovery API.
//!
//! Owns [`Discovery`]: a thread of its own (`np-discovery`) running the gRPC client, and, in
//! standalone mode (`--config FILE` or the embedded view), the control plane server itself
//! with the file source on `127.0.0.1:<ephemeral>` and a one-time bearer token, in plain text
//! (the token and the views never leave loopback and this process). With `--control-plane
//! URL` it connects to a remote control plane instead, over TLS verified against
//! `--control-plane-ca`. The client keeps the
//! last good view when the control plane is unreachable and reconnects with backoff
//! ([`controlplane::client`]); the caller waits for the first snapshot
//! ([`Discovery::first_view`]) before it reports ready, then applies each later view
//! ([`Discovery::updates`] → `Running::apply_view`). SIGHUP asks the source to re-read
//! ([`Discovery::reread`]): the embedded server re-reads its file at once; a remote control
//! plane pushes every change itself, so there is nothing to do.
//!
//! Must not touch: the data path, the kernel, Kubernetes clients (the embedded server has only
//! the file source).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use controlplane::auth::BootstrapTokens;
use controlplane::client::{self, ClientConfig, Token, VersionedView};
use controlplane::feed::{FileInput, Rereads};
use controlplane::server::Transport;
use controlplane::view::NodeView;
use tokio::sync::watch;

use crate::app::RuntimeThread;
use crate::config::{Config, EMBEDDED_CONFIG, ViewSource};

/// The daemon's view feed (client, and the embedded server in standalone mode).
#[derive(Debug)]
pub struct Discovery {
    views: watch::Receiver<Option<Arc<VersionedView>>>,
    /// The embedded server's address, in standalone mode.
    pub server_addr: Option<SocketAddr>,
    source: Source,
    /// Runs the client (and the embedded server); dropping it stops both.
    _thread: RuntimeThread,
}

/// Where the view comes from, as far as a re-read goes.
#[derive(Debug)]
enum Source {
    /// A remote control plane: it pushes every change; there is nothing to re-read.
    ControlPlane(String),
    /// The embedded server over a file, re-read at once when notified.
    File {
        path: PathBuf,
        now: Arc<tokio::sync::Notify>,
    },
    /// The embedded server over the embedded view, which never changes.
    Embedded,
}

/// What [`Discovery::reread`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reread {
    /// The embedded control plane re-reads this file now; its view arrives through Discovery.
    File(PathBuf),
    /// Nothing: the view comes from this remote control plane, which pushes every change.
    ControlPlane(String),
    /// Nothing: the embedded view is compiled in.
    Embedded,
}

impl Discovery {
    /// Starts the client (and in standalone mode the embedded server) on a thread of its own.
    pub fn start(config: &Config) -> anyhow::Result<Self> {
        // The client's metrics start before the daemon's other rooms: install the recorder now.
        let _ = crate::metrics::handle();
        let (client_config, server, source) = match &config.control_plane {
            Some(cp) => {
                let client = ClientConfig::new(cp.endpoint.clone(), &config.node, cp.token());
                (client, None, Source::ControlPlane(cp.endpoint.url.clone()))
            }
            None => {
                let (input, source) = match &config.view {
                    ViewSource::File(path) => {
                        // Fail fast, with every problem of the file, rather than wait for a
                        // first view the embedded server would never send.
                        crate::app::load_view(config).context("cannot load the node view")?;
                        let now = Arc::new(tokio::sync::Notify::new());
                        (
                            FileInput::Path(path.clone()),
                            Source::File {
                                path: path.clone(),
                                now,
                            },
                        )
                    }
                    ViewSource::Embedded => (
                        FileInput::Text {
                            name: "embedded examples/demo.yaml".to_owned(),
                            text: EMBEDDED_CONFIG.to_owned(),
                        },
                        Source::Embedded,
                    ),
                };
                let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .context("cannot listen for the embedded control plane on 127.0.0.1")?;
                let addr = listener.local_addr()?;
                let token = one_time_token()?;
                let client = ClientConfig::new(
                    format!("http://{addr}"),
                    &config.node,
                    Token::Fixed(token.clone()),
                );
                let auth = Arc::new(BootstrapTokens::single(token, Some(config.node.clone())));
                let rereads = Rereads {
                    every: (config.config_poll_secs > 0)
                        .then(|| Duration::from_secs(config.config_poll_secs)),
                    now: match &source {
                        Source::File { now, .. } => now.clone(),
                        _ => Arc::default(),
                    },
                };
                (client, Some((listener, input, auth, rereads, addr)), source)
            }
        };
        let server_addr = server.as_ref().map(|s| s.4);
        let trust_domain = config.trust_domain.clone();
        let (tx, views) = watch::channel(None);
        let thread = RuntimeThread::start("np-discovery", None)?;
        thread.handle.spawn(async move {
            if let Some((listener, input, auth, rereads, _)) = server {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        let _server = controlplane::server::spawn_with_file_on(
                            listener,
                            Transport::Plaintext,
                            input,
                            &trust_domain,
                            auth,
                            rereads,
                        );
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot serve the embedded control plane")
                    }
                }
            }
            if let Err(e) = client::run(client_config, tx).await {
                tracing::error!(error = %e, "control plane client stopped");
            }
        });
        Ok(Self {
            views,
            server_addr,
            source,
            _thread: thread,
        })
    }

    /// Waits (blocking, up to `timeout`) for the first full view.
    pub fn first_view(&mut self, timeout: Duration) -> anyhow::Result<NodeView> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.views.borrow_and_update().clone() {
                tracing::info!(version = v.version, "first node view received");
                return Ok(v.view.clone());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "no node view from the control plane within {timeout:?}; check that it is \
                     reachable and that this node's token is accepted (see the warnings above)"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A receiver of every later view.
    pub fn updates(&self) -> watch::Receiver<Option<Arc<VersionedView>>> {
        self.views.clone()
    }

    /// Asks the view's source to re-read it now (SIGHUP). The daemon never reads a view itself:
    /// whatever changes arrives through [`Discovery::updates`] like any other view.
    pub fn reread(&self) -> Reread {
        match &self.source {
            Source::File { path, now } => {
                now.notify_one();
                Reread::File(path.clone())
            }
            Source::ControlPlane(endpoint) => Reread::ControlPlane(endpoint.clone()),
            Source::Embedded => Reread::Embedded,
        }
    }
}

/// A random token for the embedded server, which only this process knows: 32 bytes from the
/// kernel's CSPRNG, hex.
fn one_time_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("cannot draw a random token: {e}"))?;
    Ok(data_encoding::HEXLOWER.encode(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn one_time_tokens_are_long_hex_and_never_repeat() {
        let a = one_time_token().unwrap();
        let b = one_time_token().unwrap();
        assert_eq!(a.len(), 64, "{a}");
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
    }

    /// Standalone without --config, the embedded server parses the embedded view once, and
    /// nothing checks it at start: it must translate for its own node.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_embedded_view_translates_for_its_node() {
        let args = crate::config::RunArgs::from_flags(Vec::<String>::new()).unwrap();
        let config = Config::from_args(args).unwrap();
        assert_eq!(config.view, ViewSource::Embedded);
        let view = crate::app::load_view(&config).unwrap();
        assert!(!view.local.is_empty(), "the demo view has local pods");
    }
}
