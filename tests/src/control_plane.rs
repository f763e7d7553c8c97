//! A `nodeproxy-controlplane` run inside the test process: the file source (polled every
//! second), node-bound bootstrap tokens and a CA, serving TLS (a certificate from that CA for
//! its IP address) on an address inside a network namespace, for daemons started with
//! `--control-plane https://... --control-plane-ca <the CA's certificate>`.
//!
//! Must not touch: anything outside the namespace it listens in (its listener is bound on a
//! thread that entered it; the server itself needs no other I/O than the files it is given).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use controlplane::client::Target;

use nodeproxy::lab::topology::Netns;

/// How often the control plane's file source polls its view file.
pub const VIEW_POLL: Duration = Duration::from_secs(1);
/// The lifetime of the certificates its CA signs, its own serving certificate included.
const CERT_LIFETIME: Duration = Duration::from_secs(3600);

/// Files a [`start_control_plane`] reads.
#[derive(Debug, Clone, Copy)]
pub struct ControlPlaneFiles<'a> {
    /// The Kubernetes-shaped objects it serves (re-read every [`VIEW_POLL`] when changed).
    pub view: &'a Path,
    /// Bootstrap tokens, `<token> <node>` per line.
    pub tokens: &'a Path,
    /// The CA's certificate and key, generated if missing. The certificate is what daemons
    /// verify the control plane with (`--control-plane-ca`).
    pub ca_cert: &'a Path,
    /// See `ca_cert`.
    pub ca_key: &'a Path,
}

/// Starts a control plane listening on `addr` inside `ns`, on a thread of its own, and returns
/// how to reach it: `https://<addr>`, trusting the CA's certificate. It is listening when this
/// returns, and stops with the test process.
pub fn start_control_plane(
    ns: &Netns,
    addr: SocketAddr,
    files: ControlPlaneFiles<'_>,
) -> anyhow::Result<Target> {
    let listener = ns
        .run(|| std::net::TcpListener::bind(addr))
        .with_context(|| format!("enter netns {}", ns.name()))?
        .with_context(|| format!("listen on {addr} in netns {}", ns.name()))?;
    listener.set_nonblocking(true)?;
    let tokens = controlplane::auth::BootstrapTokens::load(files.tokens)
        .with_context(|| format!("load bootstrap tokens {}", files.tokens.display()))?;
    let ca = certs::Ca::load_or_generate("cluster.local", files.ca_cert, files.ca_key)
        .with_context(|| format!("load or generate the CA {}", files.ca_cert.display()))?
        .with_lifetime(CERT_LIFETIME);
    let ca = Arc::new(ca);
    let names = certs::ServingNames::parse([addr.ip().to_string()])?;
    let serving = certs::ServingCert::new(ca.clone(), names, CERT_LIFETIME)
        .context("issue the control plane's serving certificate")?;
    let transport = controlplane::server::Transport::Tls(serving.server_config()?);
    let view = files.view.to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build the control plane's runtime")?;
    std::thread::Builder::new()
        .name(format!("control plane {addr}"))
        .spawn(move || {
            rt.block_on(async move {
                let (publisher, feed) = controlplane::feed::Publisher::new(
                    "cluster.local",
                    controlplane::view::Mode::Strict,
                );
                tokio::spawn(controlplane::feed::watch_file(
                    controlplane::feed::FileInput::Path(view),
                    publisher,
                    VIEW_POLL,
                ));
                let served: anyhow::Result<()> = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => controlplane::server::serve_on(
                        listener,
                        transport,
                        feed,
                        Arc::new(tokens),
                        Some(ca),
                        std::future::pending(),
                    )
                    .await
                    .map_err(anyhow::Error::from),
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = served {
                    eprintln!("the test control plane on {addr} stopped: {e:#}");
                }
            });
        })
        .context("start the control plane's thread")?;
    Ok(Target::new(
        format!("https://{addr}"),
        Some(files.ca_cert.to_owned()),
    ))
}
