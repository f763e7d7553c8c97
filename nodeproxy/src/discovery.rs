//! How the daemon gets its node view: always through the control plane's Discovery API.
//!
//! Owns [`Discovery`]: a thread of its own (`np-discovery`) running the gRPC client, and, in
//! standalone mode (`--config FILE` or the embedded view), the control plane server itself
//! with the file source on `127.0.0.1:<ephemeral>` and a one-time bearer token. With
//! `--control-plane URL` it connects to a remote control plane instead. The client keeps the
//! last good view when the control plane is unreachable and reconnects with backoff
//! ([`controlplane::client`]); the caller waits for the first snapshot
//! ([`Discovery::first_view`]) before it reports ready, then applies each later view
//! ([`Discovery::updates`] → `Running::apply_view`).
//!
//! Must not touch: the data path, the kernel, Kubernetes clients (the embedded server has only
//! the file source).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use controlplane::auth::BootstrapTokens;
use controlplane::client::{self, ClientConfig, Token, VersionedView};
use controlplane::feed::FileInput;
use controlplane::view::NodeView;
use tokio::sync::{oneshot, watch};

use crate::config::{Config, EMBEDDED_CONFIG, ViewSource};

/// How often the embedded server polls the config file for changes.
const FILE_POLL: Duration = Duration::from_secs(1);

/// The daemon's view feed (client, and the embedded server in standalone mode).
#[derive(Debug)]
pub struct Discovery {
    views: watch::Receiver<Option<Arc<VersionedView>>>,
    /// The embedded server's address, in standalone mode.
    pub server_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Discovery {
    /// Starts the client (and in standalone mode the embedded server) on a thread of its own.
    pub fn start(config: &Config) -> anyhow::Result<Self> {
        // The client's metrics start before the daemon's other rooms: install the recorder now.
        let _ = crate::metrics::handle();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build the discovery runtime")?;
        let (client_config, server) = match &config.control_plane {
            Some(cp) => {
                let token = cp.token_file.clone().map_or(Token::None, Token::File);
                (ClientConfig::new(&cp.endpoint, &config.node, token), None)
            }
            None => {
                let input = match &config.view {
                    ViewSource::File(path) => FileInput::Path(path.clone()),
                    ViewSource::Embedded => FileInput::Text {
                        name: "embedded examples/demo.yaml".to_owned(),
                        text: EMBEDDED_CONFIG.to_owned(),
                    },
                };
                // Fail fast, with every problem of the file, rather than wait for a first view
                // the embedded server would never send.
                crate::app::load_view(config).context("cannot load the node view")?;
                let listener = rt
                    .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
                    .context("cannot listen for the embedded control plane on 127.0.0.1")?;
                let addr = listener.local_addr()?;
                let token = one_time_token();
                let client = ClientConfig::new(
                    format!("http://{addr}"),
                    &config.node,
                    Token::Fixed(token.clone()),
                );
                let auth = Arc::new(BootstrapTokens::single(token, Some(config.node.clone())));
                (client, Some((listener, input, auth, addr)))
            }
        };
        let server_addr = server.as_ref().map(|s| s.3);
        let trust_domain = config.trust_domain.clone();
        let (tx, views) = watch::channel(None);
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("np-discovery".to_owned())
            .spawn(move || {
                rt.block_on(async move {
                    if let Some((listener, input, auth, _)) = server {
                        let _server = controlplane::server::spawn_with_file(
                            listener,
                            input,
                            &trust_domain,
                            auth,
                            FILE_POLL,
                        );
                    }
                    tokio::select! {
                        result = client::run(client_config, tx) => {
                            if let Err(e) = result {
                                tracing::error!(error = %e, "control plane client stopped");
                            }
                        }
                        _ = stopped => {}
                    }
                });
            })
            .context("cannot start the np-discovery thread")?;
        Ok(Self {
            views,
            server_addr,
            stop: Some(stop),
            thread: Some(thread),
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
}

impl Drop for Discovery {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A random token for the embedded server, which only this process knows.
fn one_time_token() -> String {
    (0..4)
        .map(|i| format!("{:016x}", RandomState::new().hash_one(i)))
        .collect()
}
