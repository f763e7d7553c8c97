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
use super::{HANDSHAKE_TIMEOUT, Mesh, TenantTls, TunnelError};
use crate::metrics::{self, ConnMetrics};
use crate::outcome::{self, Direction, Outcome, Side};
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
    let refused = |outcome: Outcome, reason: String| TunnelError::Refused {
        peer: peer.node,
        target,
        outcome,
        reason,
    };
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .map_err(|e| {
            let why = format!("cannot build the CONNECT request: {e}");
            refused(Outcome::Internal, why)
        })?;
    let (resp, send) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut send = send.ready().await?;
        let (resp, stream) = send.send_request(req, false)?;
        Ok::<_, h2::Error>((resp.await?, stream))
    })
    .await
    .map_err(|_| {
        let why = format!("no answer within {HANDSHAKE_TIMEOUT:?}");
        refused(Outcome::TunnelRefused, why)
    })?
    .map_err(|e| refused(unanswered(&e), format!("HTTP/2: {e}")))?;
    if resp.status() != http::StatusCode::OK {
        let why = format!("the peer answered {}", resp.status());
        return Err(refused(connect_status(resp.status()), why));
    }
    Ok(TunnelStream {
        stream: H2Stream {
            send,
            recv: resp.into_body(),
        },
        _slot: guard,
    })
}

/// The outcome of a CONNECT the peer answered with `status` (not 200), as its server half
/// answers them (see `super::server`).
pub(super) fn connect_status(status: http::StatusCode) -> Outcome {
    use http::StatusCode as S;
    match status {
        S::FORBIDDEN => Outcome::ConnectForbidden,
        S::SERVICE_UNAVAILABLE => Outcome::UpstreamTenantLimit,
        S::BAD_GATEWAY | S::GATEWAY_TIMEOUT => Outcome::UpstreamConnect,
        _ => Outcome::TunnelRefused,
    }
}

/// The outcome of an HTTP/2 error before the CONNECT was answered: a TLS error inside (in TLS
/// 1.3 the peer's refusal of our certificate arrives only now) or our own misuse as such, any
/// other failure as a refused stream.
fn unanswered(e: &h2::Error) -> Outcome {
    match outcome::h2(Side::Upstream, e) {
        Outcome::UpstreamReset => Outcome::TunnelRefused,
        other => other,
    }
}

/// Holds one stream's place on a pooled connection.
#[derive(Debug)]
struct SlotGuard(Rc<Cell<usize>>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// A new mTLS + HTTP/2 connection from the tenant to `peer`; the handshake is counted with
/// its outcome.
async fn dial(
    tls: &TenantTls,
    current: &certs::Current,
    peer: &RemotePeer,
) -> Result<(Sender, Rc<Cell<bool>>), TunnelError> {
    let tenant = tls.store.identity().clone();
    let name = rustls::pki_types::ServerName::try_from(certs::sni::encode(&peer.identity)?)
        .map_err(|e| TunnelError::Handshake {
            peer: peer.node,
            outcome: Outcome::Internal,
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
    let shook = handshake(current, name, tcp, peer).await;
    let outcome = shook
        .as_ref()
        .map_or_else(TunnelError::outcome, |_| Outcome::Clean);
    metrics::handshake(&tenant, Direction::Outbound, outcome);
    if let Err(e) = &shook {
        tracing::warn!(%tenant, peer = %peer.node, expected = %peer.identity, error = %e, outcome = outcome.as_str(), "tunnel TLS handshake failed");
    }
    let (send, conn) = shook?;
    let closed = Rc::new(Cell::new(false));
    let node = peer.node;
    let ended = closed.clone();
    // The connection's own task, on this (the tenant's) thread like everything else here.
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            let outcome = outcome::h2(Side::Upstream, &e);
            tracing::debug!(peer = %node, error = %e, outcome = outcome.as_str(), "tunnel connection ended");
        }
        ended.set(true);
    });
    Ok((send, closed))
}

type Connection =
    h2::client::Connection<tokio_rustls::client::TlsStream<tokio::io::BufReader<TcpStream>>, Bytes>;

/// The TLS then HTTP/2 handshake on `tcp`, each bounded by [`HANDSHAKE_TIMEOUT`].
async fn handshake(
    current: &certs::Current,
    name: rustls::pki_types::ServerName<'static>,
    tcp: TcpStream,
    peer: &RemotePeer,
) -> Result<(Sender, Connection), TunnelError> {
    let failed = |outcome: Outcome, reason: String| TunnelError::Handshake {
        peer: peer.node,
        outcome,
        reason,
    };
    let timed_out = |what: &str| {
        let why = format!("no {what} handshake within {HANDSHAKE_TIMEOUT:?}");
        failed(Outcome::UpstreamTlsTimeout, why)
    };
    let connector = tokio_rustls::TlsConnector::from(current.client_config());
    let tls_stream = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        connector.connect(name, super::buffered(tcp)),
    )
    .await
    .map_err(|_| timed_out("TLS"))?
    .map_err(|e| failed(outcome::handshake(Side::Upstream, &e), e.to_string()))?;
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
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| timed_out("HTTP/2"))?
        .map_err(|e| {
            let outcome = outcome::h2_handshake(Side::Upstream, &e);
            failed(outcome, format!("HTTP/2: {e}"))
        })
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
    let mut m = ConnMetrics::open(&pod.tenant, Direction::Outbound, Some(&peer.identity));
    let outcome = relay(down, dst, &peer, &pod.tenant, &mesh, &m).await;
    tracing::debug!(
        tenant = %pod.tenant, pod = %format_args!("{}/{}", pod.namespace, pod.name),
        peer_identity = %peer.identity, peer_node = %peer.node, %src, %dst,
        outcome = outcome.as_str(), blame = outcome.blame().as_str(), "tunnelled connection closed"
    );
    m.record(outcome);
}

async fn relay(
    down: std::net::TcpStream,
    dst: SocketAddr,
    peer: &RemotePeer,
    tenant: &Identity,
    mesh: &Mesh,
    m: &ConnMetrics,
) -> Outcome {
    let mut down = match TcpStream::from_std(down) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register socket with the pool runtime");
            return Outcome::Internal;
        }
    };
    let _ = down.set_nodelay(true);
    let tls = super::tenant_tls(tenant, mesh);
    let mut up = match open_stream(&tls, peer, dst).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%tenant, %dst, error = %e, "cannot open a tunnel stream");
            let _ = socket2::SockRef::from(&down).set_linger(Some(std::time::Duration::ZERO));
            return e.outcome();
        }
    };
    drop(tls);
    match copy::join(&mut down, &mut up.stream, &m.read_bytes, &m.write_bytes).await {
        Ok(()) => Outcome::Clean,
        Err(e) => {
            tracing::debug!(%dst, error = %e, "tunnelled connection failed");
            // The pod is the downstream here, the tunnel the upstream.
            e.outcome(Side::Downstream)
        }
    }
}
