//! The tunnel's client half: the pool-side job for a connection to a remote meshed pod.
//!
//! Owns [`outbound`] (the job: get a tunnel stream, copy both ways through `super::copy`,
//! count) and [`ConnPool`]: HTTP/2 connections (`h2`, each driven by a task of its own on this
//! thread) over mTLS keyed by (destination identity, peer node). The pool lives in
//! the *source* tenant's [`super::TenantTls`] on that tenant's thread, so the key of the map is
//! implicitly (source identity, destination identity, peer node) and a connection is never
//! shared across source identities. Each connection carries at most
//! [`super::MAX_STREAMS_PER_CONN`] streams; past that a new connection is opened.
//!
//! Must not touch: other tenants' pools, the inbound side, classification.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use certs::Identity;
use tokio::net::TcpStream;

use super::copy::{self, H2Stream};
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

type Sender = h2::client::SendRequest<Bytes>;

/// One pooled HTTP/2 connection.
#[derive(Debug)]
struct Conn {
    send: Sender,
    streams: Rc<Cell<usize>>,
    /// Set by the task driving the connection when it ends.
    closed: Rc<Cell<bool>>,
    /// The certificate generation the connection was made with: after a rotation new
    /// streams go to new connections (with the new certificate); old ones drain.
    generation: u64,
}

impl Conn {
    /// Whether new streams may still be opened: the connection runs and has seen no
    /// connection error (a GOAWAY, a protocol error, stream ids used up).
    fn is_open(&mut self) -> bool {
        // Our own handle never sends a request, so it never waits for a stream to open:
        // polling it only checks the connection, and no wake-up is needed.
        let mut cx = Context::from_waker(Waker::noop());
        !self.closed.get() && !matches!(self.send.poll_ready(&mut cx), Poll::Ready(Err(_)))
    }
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
        list.retain_mut(|c| c.generation == generation && c.is_open());
        list.iter()
            .find(|c| c.streams.get() < super::MAX_STREAMS_PER_CONN)
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
#[derive(Debug)]
pub struct TunnelStream {
    stream: H2Stream,
    _slot: SlotGuard,
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
    let (send, slot) = match picked {
        Some(p) => p,
        None => {
            let (send, closed) = dial(tls, &current, peer).await?;
            let slot = Rc::new(Cell::new(0));
            tls.conns
                .borrow_mut()
                .conns
                .entry(key)
                .or_default()
                .push(Conn {
                    send: send.clone(),
                    streams: slot.clone(),
                    closed,
                    generation,
                });
            (send, slot)
        }
    };
    slot.set(slot.get() + 1);
    // From here on the slot is released by the guard, whatever happens.
    let guard = SlotGuard(slot);
    let refused = |reason: String| TunnelError::Connect2 {
        peer: peer.node,
        target,
        reason,
    };
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .map_err(|e| refused(format!("cannot build the CONNECT request: {e}")))?;
    let (resp, send) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut send = send.ready().await?;
        let (resp, stream) = send.send_request(req, false)?;
        Ok::<_, h2::Error>((resp.await?, stream))
    })
    .await
    .map_err(|_| refused(format!("no answer within {HANDSHAKE_TIMEOUT:?}")))?
    .map_err(|e| refused(format!("HTTP/2: {e}")))?;
    if resp.status() != http::StatusCode::OK {
        return Err(refused(format!("the peer answered {}", resp.status())));
    }
    Ok(TunnelStream {
        stream: H2Stream {
            send,
            recv: resp.into_body(),
        },
        _slot: guard,
    })
}

/// Holds one stream's place on a pooled connection.
#[derive(Debug)]
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
) -> Result<(Sender, Rc<Cell<bool>>), TunnelError> {
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
    let handshake = h2::client::Builder::new()
        .initial_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONN_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .max_send_buffer_size(super::SEND_BUF)
        .max_header_list_size(super::MAX_HEADER_LIST)
        .max_local_error_reset_streams(Some(super::MAX_LOCAL_ERROR_RESETS))
        .initial_max_send_streams(super::MAX_STREAMS_PER_CONN)
        .enable_push(false)
        .handshake(tls_stream);
    let http2_failed = |reason: String| TunnelError::Handshake {
        peer: peer.node,
        reason,
    };
    let (send, conn) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| http2_failed(format!("no HTTP/2 handshake within {HANDSHAKE_TIMEOUT:?}")))?
        .map_err(|e| http2_failed(format!("HTTP/2: {e}")))?;
    let closed = Rc::new(Cell::new(false));
    let node = peer.node;
    let ended = closed.clone();
    // The connection's own task, on this (the tenant's) thread like everything else here.
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::debug!(peer = %node, error = %e, "tunnel connection ended");
        }
        ended.set(true);
    });
    Ok((send, closed))
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
    match copy::join(&mut down, &mut up.stream, &m.read_bytes, &m.write_bytes).await {
        Ok(()) => "none",
        Err(e) => {
            tracing::debug!(%dst, error = %e, "tunnelled connection failed");
            e.kind()
        }
    }
}
