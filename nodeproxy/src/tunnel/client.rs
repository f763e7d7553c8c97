//! The tunnel's client half: the pool-side job for a connection to a remote meshed pod.
//!
//! Owns [`outbound`] (the job: get a tunnel stream, copy both ways, count) and [`ConnPool`]:
//! HTTP/2 connections over mTLS keyed by (destination identity, peer node). The pool lives in
//! the *source* tenant's [`super::TenantTls`] on that tenant's thread, so the key of the map is
//! implicitly (source identity, destination identity, peer node) and a connection is never
//! shared across source identities. Each connection carries at most
//! [`super::MAX_STREAMS_PER_CONN`] streams; past that a new connection is opened.
//!
//! Must not touch: other tenants' pools, the inbound side, classification.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use certs::Identity;
use http_body_util::Empty;
use hyper::client::conn::http2;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{HANDSHAKE_TIMEOUT, Mesh, TenantTls, TunnelError, count_handshake};
use crate::metrics::{ConnMetrics, Direction};
use crate::relay::CONNECT_TIMEOUT;
use crate::state::LocalPod;

/// Where a tunnelled connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePeer {
    /// The destination pod's identity (what the peer's certificate must name).
    pub identity: Identity,
    /// The peer node's tunnel address.
    pub node: SocketAddr,
}

type Sender = http2::SendRequest<Empty<Bytes>>;

/// One pooled HTTP/2 connection.
#[derive(Debug)]
struct Conn {
    send: http2::SendRequest<Empty<Bytes>>,
    streams: Rc<Cell<usize>>,
    /// The certificate generation the connection was made with: after a rotation new
    /// streams go to new connections (with the new certificate); old ones drain.
    generation: u64,
}

/// The source tenant's tunnel connections, keyed by (destination identity, peer node).
#[derive(Debug, Default)]
pub struct ConnPool {
    conns: HashMap<(Identity, SocketAddr), Vec<Conn>>,
}

impl ConnPool {
    /// A connection with room for one more stream, dropping closed ones.
    fn pick(
        &mut self,
        key: &(Identity, SocketAddr),
        generation: u64,
    ) -> Option<(Sender, Rc<Cell<usize>>)> {
        let list = self.conns.get_mut(key)?;
        // Dropping our handle lets a connection close once its last stream ends.
        list.retain(|c| !c.send.is_closed() && c.generation == generation);
        list.iter()
            .find(|c| c.streams.get() < super::MAX_STREAMS_PER_CONN && c.send.is_ready())
            .map(|c| (c.send.clone(), c.streams.clone()))
    }

    /// Number of live connections (for tests and `/tenants`).
    pub fn len(&self) -> usize {
        self.conns.values().map(Vec::len).sum()
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A CONNECT stream through the tunnel; releases its slot on the connection when dropped.
pub struct TunnelStream {
    io: TokioIo<hyper::upgrade::Upgraded>,
    slot: Rc<Cell<usize>>,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream").finish_non_exhaustive()
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        self.slot.set(self.slot.get().saturating_sub(1));
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Opens a CONNECT stream to `target` through `peer`, from the tenant `tls` belongs to.
pub async fn open_stream(
    tls: &TenantTls,
    peer: &RemotePeer,
    target: SocketAddr,
) -> Result<TunnelStream, TunnelError> {
    let key = (peer.identity.clone(), peer.node);
    let current = super::current(tls).await?;
    let generation = current.generation();
    let picked = tls.conns.borrow_mut().pick(&key, generation);
    let (mut send, slot) = match picked {
        Some(p) => p,
        None => {
            let send = dial(tls, &current, peer).await?;
            let slot = Rc::new(Cell::new(0));
            tls.conns
                .borrow_mut()
                .conns
                .entry(key)
                .or_default()
                .push(Conn {
                    send: send.clone(),
                    streams: slot.clone(),
                    generation,
                });
            (send, slot)
        }
    };
    slot.set(slot.get() + 1);
    // From here on the slot is released by the guard, whatever happens.
    let guard = SlotGuard(slot.clone());
    let refused = |reason: String| TunnelError::Connect2 {
        peer: peer.node,
        target,
        reason,
    };
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| refused(format!("cannot build the CONNECT request: {e}")))?;
    let resp = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        send.ready().await?;
        send.send_request(req).await
    })
    .await
    .map_err(|_| refused(format!("no answer within {HANDSHAKE_TIMEOUT:?}")))?
    .map_err(|e| refused(format!("HTTP/2: {e}")))?;
    if resp.status() != http::StatusCode::OK {
        return Err(refused(format!("the peer answered {}", resp.status())));
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|e| refused(format!("no stream after 200: {e}")))?;
    std::mem::forget(guard);
    Ok(TunnelStream {
        io: TokioIo::new(upgraded),
        slot,
    })
}

struct SlotGuard(Rc<Cell<usize>>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// A new mTLS + HTTP/2 connection from the tenant to `peer`.
async fn dial(
    tls: &TenantTls,
    current: &certs::Current,
    peer: &RemotePeer,
) -> Result<http2::SendRequest<Empty<Bytes>>, TunnelError> {
    let tenant = tls.store.identity().clone();
    let name = rustls::pki_types::ServerName::try_from(certs::sni::encode(&peer.identity)?)
        .map_err(|e| TunnelError::Handshake {
            peer: peer.node,
            reason: format!("bad server name: {e}"),
        })?;
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer.node)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(TunnelError::Connect {
                peer: peer.node,
                source,
            });
        }
        Err(_) => {
            return Err(TunnelError::Connect {
                peer: peer.node,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            });
        }
    };
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(current.client_config());
    let tls_stream = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        connector.connect(name, super::buffered(tcp)),
    )
    .await
    {
        Ok(Ok(s)) => {
            count_handshake(&tenant, "outbound", "ok");
            s
        }
        Ok(Err(e)) => {
            count_handshake(&tenant, "outbound", "error");
            tracing::warn!(%tenant, peer = %peer.node, expected = %peer.identity, error = %e, "tunnel TLS handshake failed");
            return Err(TunnelError::Handshake {
                peer: peer.node,
                reason: e.to_string(),
            });
        }
        Err(_) => {
            count_handshake(&tenant, "outbound", "timeout");
            return Err(TunnelError::Handshake {
                peer: peer.node,
                reason: format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            });
        }
    };
    let (send, conn) = http2::Builder::new(super::LocalExec)
        .initial_stream_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONN_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .max_send_buf_size(super::SEND_BUF)
        .handshake(TokioIo::new(tls_stream))
        .await
        .map_err(|e| TunnelError::Handshake {
            peer: peer.node,
            reason: format!("HTTP/2: {e}"),
        })?;
    let node = peer.node;
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::debug!(peer = %node, error = %e, "tunnel connection ended");
        }
    });
    Ok(send)
}

/// The pool job for a captured connection of `pod`'s tenant to a remote meshed pod: through
/// the tunnel to `peer`, copying both ways.
pub async fn outbound(
    down: std::net::TcpStream,
    src: SocketAddr,
    pod: LocalPod,
    dst: SocketAddr,
    peer: RemotePeer,
    mesh: Mesh,
) {
    let mut m = ConnMetrics::open_with_peer(
        &pod.tenant.to_string(),
        Direction::Outbound,
        &peer.identity.to_string(),
    );
    let outcome = relay(down, dst, &peer, &pod.tenant, &mesh, &m).await;
    tracing::debug!(
        tenant = %pod.tenant, pod = %format_args!("{}/{}", pod.namespace, pod.name),
        peer_identity = %peer.identity, peer_node = %peer.node, %src, %dst, outcome, "tunnelled connection closed"
    );
    m.set_outcome(outcome);
}

async fn relay(
    down: std::net::TcpStream,
    dst: SocketAddr,
    peer: &RemotePeer,
    tenant: &Identity,
    mesh: &Mesh,
    m: &ConnMetrics,
) -> &'static str {
    let mut down = match TcpStream::from_std(down) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register socket with the pool runtime");
            return "internal";
        }
    };
    let _ = down.set_nodelay(true);
    let tls = super::tenant_tls(tenant, mesh);
    let mut up = match open_stream(&tls, peer, dst).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%tenant, %dst, error = %e, "cannot open a tunnel stream");
            let _ = socket2::SockRef::from(&down).set_linger(Some(std::time::Duration::ZERO));
            return e.kind();
        }
    };
    drop(tls);
    match tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, 64 * 1024, 64 * 1024).await {
        Ok((from_down, from_up)) => {
            m.read_bytes.increment(from_down);
            m.write_bytes.increment(from_up);
            "none"
        }
        Err(e) => {
            tracing::debug!(%dst, error = %e, "tunnelled connection failed");
            let _ = socket2::SockRef::from(&down).set_linger(Some(std::time::Duration::ZERO));
            "io"
        }
    }
}
