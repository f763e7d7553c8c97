//! Inbound mesh tunnel capture: connections from peer nodes to port 15008.
//!
//! Owns [`accept_loop`]: accept, peek at the TLS ClientHello (without consuming it) to read the
//! server name, decode it to the destination identity ([`certs::sni`]), and hand the socket to
//! *that* tenant's pool, which does the handshake with its own certificate
//! ([`crate::tunnel::server::serve`]). A name that is not a local tenant is refused here, before
//! any tenant's work or key is involved. Like the outbound accept loop, it never does a
//! tenant's work: no TLS, no copying.
//!
//! Must not touch: certificates or keys, the outbound side.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use certs::Identity;
use tenancy::Pools;
use tokio::net::{TcpListener, TcpStream};

use crate::metrics;
use crate::tunnel::{self, Mesh};

/// How long the client may take to send its ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest ClientHello we wait for.
const MAX_HELLO: usize = 16 * 1024;

/// Everything the inbound accept loop needs; cheap to clone.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// The tenants' pools.
    pub pools: Arc<Pools<Identity>>,
    /// The mesh context handed to the pool job.
    pub mesh: Mesh,
}

/// Accepts tunnel connections forever, handing each to the destination tenant's pool.
pub async fn accept_loop(listener: TcpListener, ctx: Inbound) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Peeking may wait for the client; do not hold up the next accept.
        let ctx = ctx.clone();
        tokio::spawn(async move { classify(stream, peer, ctx).await });
    }
}

async fn classify(stream: TcpStream, peer: SocketAddr, ctx: Inbound) {
    let name = match tokio::time::timeout(HELLO_TIMEOUT, peek_sni(&stream)).await {
        Ok(Ok(name)) => name,
        Ok(Err(reason)) => return refuse(stream, peer, reason, None),
        Err(_) => return refuse(stream, peer, "no ClientHello in time", None),
    };
    let tenant = match certs::sni::decode(&name) {
        Ok(id) => id,
        Err(_) => return refuse(stream, peer, "server name names no identity", Some(&name)),
    };
    if !ctx.mesh.snapshot.load().tenants().contains(&tenant) {
        return refuse(
            stream,
            peer,
            "no local pod has the identity the server name names",
            Some(&name),
        );
    }
    let pool = match ctx.pools.get_or_create(&tenant) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(%tenant, error = %e, "no pool for tunnel tenant");
            return refuse(stream, peer, "tenant pool closed", Some(&name));
        }
    };
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot detach accepted socket");
            return;
        }
    };
    let mesh = ctx.mesh.clone();
    let t = tenant.clone();
    let own = pool.clone();
    if let Err(e) = pool.spawn(move || tunnel::server::serve(std_stream, peer, t, mesh, own)) {
        tracing::debug!(%tenant, error = %e, "pool closed while handing off a tunnel connection");
        metrics::refused("pool_closed");
    }
}

fn refuse(stream: TcpStream, peer: SocketAddr, reason: &'static str, name: Option<&str>) {
    metrics::refused("tunnel_refused");
    tracing::info!(%peer, server_name = ?name, reason, "tunnel connection refused");
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// The server name of the ClientHello at the head of `stream`, read with `MSG_PEEK` so the
/// bytes stay for the real handshake on the tenant's pool.
async fn peek_sni(stream: &TcpStream) -> Result<String, &'static str> {
    let mut buf = vec![0u8; MAX_HELLO];
    loop {
        let n = stream.peek(&mut buf).await.map_err(|_| "peek failed")?;
        if n == 0 {
            return Err("closed before a ClientHello");
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        acceptor.read_tls(&mut rd).map_err(|_| "not TLS")?;
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return accepted
                    .client_hello()
                    .server_name()
                    .map(str::to_owned)
                    .ok_or("no server name in the ClientHello");
            }
            Ok(None) if n < MAX_HELLO => {
                // Partial hello: wait for more bytes (rare; a hello fits a segment).
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(None) => return Err("ClientHello too large"),
            Err(_) => return Err("not a TLS ClientHello"),
        }
    }
}
