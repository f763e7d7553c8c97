//! Inbound mesh tunnel capture: connections from peer nodes to port 15008.
//!
//! Owns [`accept_loop`]: accept, peek at the TLS ClientHello (without consuming it) to read the
//! server name, decode it to the destination identity ([`certs::sni`]), and hand the socket to
//! *that* tenant's pool, which does the handshake with its own certificate
//! ([`crate::tunnel::server::serve`]). A name that is not a local tenant is refused here, before
//! any tenant's work or key is involved, and counted in `nodeproxy_tcp_refused_total` with
//! one [`Outcome`] per reason. Like the outbound accept loop, it never does a tenant's work:
//! no TLS, no copying.
//!
//! Must not touch: certificates or keys, the outbound side.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use certs::Identity;
use tenancy::Pools;
use tokio::net::{TcpListener, TcpStream};

use crate::metrics;
use crate::outcome::{self, Outcome, Side};
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
        Ok(Err((outcome, why))) => return refuse(stream, peer, outcome, why, None),
        Err(_) => {
            let why = "no ClientHello in time";
            return refuse(stream, peer, Outcome::HelloTimeout, why, None);
        }
    };
    let tenant = match certs::sni::decode(&name) {
        Ok(id) => id,
        Err(_) => {
            let why = "server name names no identity";
            return refuse(stream, peer, Outcome::UnknownServerName, why, Some(&name));
        }
    };
    if !ctx.mesh.snapshot.load().tenants().contains(&tenant) {
        let why = "no local pod has the identity the server name names";
        return refuse(stream, peer, Outcome::NotLocalTenant, why, Some(&name));
    }
    let pool = match ctx.pools.get_or_create(&tenant) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(%tenant, error = %e, "no pool for tunnel tenant");
            let why = "tenant pool closed";
            return refuse(stream, peer, Outcome::PoolClosed, why, Some(&name));
        }
    };
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot detach accepted socket");
            metrics::refused(Outcome::Internal);
            return;
        }
    };
    let mesh = ctx.mesh.clone();
    let t = tenant.clone();
    let own = pool.clone();
    if let Err(e) = pool.spawn(move || tunnel::server::serve(std_stream, peer, t, mesh, own)) {
        tracing::debug!(%tenant, error = %e, "pool closed while handing off a tunnel connection");
        metrics::refused(Outcome::PoolClosed);
    }
}

/// Counts and resets a refused tunnel connection; `why` is the log line's detail.
fn refuse(
    stream: TcpStream,
    peer: SocketAddr,
    outcome: Outcome,
    why: &'static str,
    name: Option<&str>,
) {
    metrics::refused(outcome);
    tracing::info!(
        %peer, server_name = ?name, reason = why, outcome = outcome.as_str(),
        blame = outcome.blame().as_str(), "tunnel connection refused"
    );
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// The server name of the ClientHello at the head of `stream`, read with `MSG_PEEK` so the
/// bytes stay for the real handshake on the tenant's pool. An error says why not: the outcome
/// and the log line's detail.
async fn peek_sni(stream: &TcpStream) -> Result<String, (Outcome, &'static str)> {
    let bad = |why| (Outcome::BadClientHello, why);
    let mut buf = vec![0u8; MAX_HELLO];
    loop {
        let n = stream
            .peek(&mut buf)
            .await
            .map_err(|e| (outcome::io(Side::Downstream, &e), "peek failed"))?;
        if n == 0 {
            return Err(bad("closed before a ClientHello"));
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        acceptor.read_tls(&mut rd).map_err(|_| bad("not TLS"))?;
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return accepted
                    .client_hello()
                    .server_name()
                    .map(str::to_owned)
                    .ok_or(bad("no server name in the ClientHello"));
            }
            Ok(None) if n < MAX_HELLO => {
                // Partial hello: wait for more bytes (rare; a hello fits a segment).
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(None) => return Err(bad("ClientHello too large")),
            Err(_) => return Err(bad("not a TLS ClientHello")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// The first flight of a TLS client to `server_name` (an IP address sends no SNI).
    fn client_hello(server_name: &str) -> Vec<u8> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    /// What [`peek_sni`] makes of a client that sends `bytes` and closes its side.
    async fn peek(bytes: &[u8]) -> Result<String, Outcome> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(bytes).await.unwrap();
        client.shutdown().await.unwrap();
        let got = tokio::time::timeout(HELLO_TIMEOUT, peek_sni(&server))
            .await
            .expect("peek_sni hung");
        got.map_err(|(outcome, _)| outcome)
    }

    #[tokio::test]
    async fn what_is_not_a_client_hello_with_a_server_name_is_a_bad_client_hello() {
        let name = "abc.id.nodeproxy";
        assert_eq!(peek(&client_hello(name)).await, Ok(name.to_owned()));
        let cases: [(&str, Vec<u8>); 3] = [
            ("closed at once", Vec::new()),
            ("plain HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            ("no server name", client_hello("10.0.0.1")),
        ];
        for (what, bytes) in cases {
            assert_eq!(peek(&bytes).await, Err(Outcome::BadClientHello), "{what}");
        }
    }
}
