//! The tunnel's server half: the pool-side job for one inbound mTLS connection.
//!
//! Owns [`serve`]: runs on the **destination** tenant's pool (chosen by the accept loop in
//! [`crate::inbound`] from the SNI), terminates TLS with that tenant's certificate, reads the
//! client's SPIFFE identity (the chain was verified by webpki during the handshake), then
//! serves HTTP/2 (`h2`): each CONNECT stream names a local pod (`:authority`), which must
//! belong to this tenant ([`decide`], no I/O); the tenant's pool admits it against the tenant's
//! own limits (over a limit: 503, counted in `nodeproxy_tenant_rejected_total`); the stream is
//! joined to a new TCP connection to that pod through `super::copy`. Each stream is a task of
//! its own on this thread. Every handshake is counted with its [`Outcome`]; a stream refused
//! before admission in `nodeproxy_tcp_refused_total`, an admitted one (even if its pod cannot
//! be reached) in the `tcp_` metrics of its [`ConnMetrics`].
//!
//! Must not touch: other tenants' pools or certificates, the outbound side.

use std::net::SocketAddr;

use bytes::Bytes;
use certs::Identity;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode, Uri};
use tokio::net::TcpStream;

use super::copy::{self, H2Stream};
use super::{HANDSHAKE_TIMEOUT, MAX_STREAMS_PER_CONN, Mesh};
use crate::metrics::{self, ConnMetrics};
use crate::outcome::{self, Direction, Outcome, Side};
use crate::relay::CONNECT_TIMEOUT;
use crate::state::Snapshot;

/// Serves one inbound tunnel connection for `tenant` (the identity the client's SNI named).
/// `pool` is that tenant's own pool: each stream is admitted against its limits.
pub async fn serve(
    stream: std::net::TcpStream,
    client: SocketAddr,
    tenant: Identity,
    mesh: Mesh,
    pool: tenancy::Pool,
) {
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register socket with the pool runtime");
            metrics::refused(Outcome::Internal);
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (tls_stream, peer_id) = match handshake(stream, &tenant, &mesh).await {
        Ok(accepted) => accepted,
        Err((outcome, why)) => {
            metrics::handshake(&tenant, Direction::Inbound, outcome);
            // The test suite and operators read this line: keep "tunnel TLS handshake refused".
            tracing::warn!(%tenant, %client, error = %why, outcome = outcome.as_str(), blame = outcome.blame().as_str(), "tunnel TLS handshake refused");
            return;
        }
    };
    tracing::debug!(%tenant, %client, peer = %peer_id, "tunnel connection accepted");
    serve_http2(tls_stream, client, tenant, peer_id, mesh, pool).await;
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::io::BufReader<TcpStream>>;

/// The TLS handshake with the tenant's certificate and the client's verified identity, or
/// how and why not.
async fn handshake(
    stream: TcpStream,
    tenant: &Identity,
    mesh: &Mesh,
) -> Result<(TlsStream, Identity), (Outcome, String)> {
    let tls = super::tenant_tls(tenant, mesh);
    let current = super::current(&tls)
        .await
        .map_err(|e| (e.outcome(), e.to_string()))?;
    drop(tls);
    let acceptor = tokio_rustls::TlsAcceptor::from(current.server_config());
    drop(current);
    let accept = acceptor.accept(super::buffered(stream));
    let tls_stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept)
        .await
        .map_err(|_| {
            let why = format!("no handshake within {HANDSHAKE_TIMEOUT:?}");
            (Outcome::DownstreamTlsTimeout, why)
        })?
        .map_err(|e| (outcome::handshake(Side::Downstream, &e), e.to_string()))?;
    let peer_id = certs::verify::peer_identity(tls_stream.get_ref().1).map_err(|e| {
        let why = format!("the client has no usable identity: {e}");
        (Outcome::DownstreamTlsCertificate, why)
    })?;
    Ok((tls_stream, peer_id))
}

/// HTTP/2 on an accepted mTLS connection: each CONNECT stream is a task of its own.
async fn serve_http2<T>(
    tls: T,
    client: SocketAddr,
    tenant: Identity,
    peer_id: Identity,
    mesh: Mesh,
    pool: tenancy::Pool,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS_PER_CONN as u32)
        .initial_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONN_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .max_send_buffer_size(super::SEND_BUF)
        .max_header_list_size(super::MAX_HEADER_LIST)
        .max_local_error_reset_streams(Some(super::MAX_LOCAL_ERROR_RESETS))
        .handshake::<_, Bytes>(tls);
    // The handshake is counted once it is complete: TLS, then HTTP/2 (as the client does).
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(c)) => {
            metrics::handshake(&tenant, Direction::Inbound, Outcome::Clean);
            c
        }
        Ok(Err(e)) => {
            let outcome = outcome::h2_handshake(Side::Downstream, &e);
            metrics::handshake(&tenant, Direction::Inbound, outcome);
            tracing::debug!(%tenant, %client, error = %e, outcome = outcome.as_str(), "no HTTP/2 on a tunnel connection");
            return;
        }
        Err(_) => {
            let outcome = Outcome::DownstreamTlsTimeout;
            metrics::handshake(&tenant, Direction::Inbound, outcome);
            tracing::debug!(%tenant, %client, outcome = outcome.as_str(), "no HTTP/2 handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    // Accepting also drives the connection: it runs until the client goes away.
    while let Some(next) = conn.accept().await {
        match next {
            Ok((req, respond)) => {
                let (tenant, peer_id) = (tenant.clone(), peer_id.clone());
                let (mesh, pool) = (mesh.clone(), pool.clone());
                tokio::task::spawn_local(handle(req, respond, tenant, peer_id, mesh, pool));
            }
            Err(e) => {
                let outcome = outcome::h2(Side::Downstream, &e);
                tracing::debug!(%tenant, %client, error = %e, outcome = outcome.as_str(), "tunnel connection ended");
                return;
            }
        }
    }
}

/// Why a CONNECT request is refused (decided from its head and the snapshot, no I/O).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Not a CONNECT.
    Method,
    /// `:authority` is not an `ip:port`.
    Authority,
    /// The target is not a local pod of the tenant whose certificate the client asked for;
    /// `owner` is whose pod it is, if any.
    NotOurs {
        target: SocketAddr,
        owner: Option<Identity>,
    },
}

impl Refusal {
    /// The status the stream is answered with.
    pub(super) fn status(&self) -> StatusCode {
        match self {
            Refusal::Method => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::Authority => StatusCode::BAD_REQUEST,
            Refusal::NotOurs { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// How the stream ends.
    pub(super) fn outcome(&self) -> Outcome {
        match self {
            Refusal::Method | Refusal::Authority => Outcome::BadConnect,
            Refusal::NotOurs { .. } => Outcome::ConnectForbidden,
        }
    }
}

/// The status a stream shed by the tenant's limits is answered with.
pub(super) const SHED: StatusCode = StatusCode::SERVICE_UNAVAILABLE;
/// The status when the local pod refused the connection.
pub(super) const POD_REFUSED: StatusCode = StatusCode::BAD_GATEWAY;
/// The status when connecting to the local pod timed out.
pub(super) const POD_TIMEOUT: StatusCode = StatusCode::GATEWAY_TIMEOUT;

/// The decide phase of one stream: the local pod to connect to, or why not.
fn decide(
    method: &Method,
    uri: &Uri,
    snapshot: &Snapshot,
    tenant: &Identity,
) -> Result<SocketAddr, Refusal> {
    if method != Method::CONNECT {
        return Err(Refusal::Method);
    }
    let target = uri
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or(Refusal::Authority)?;
    let owner = snapshot.pod_by_ip(target.ip()).map(|p| p.tenant.clone());
    if owner.as_ref() != Some(tenant) {
        return Err(Refusal::NotOurs { target, owner });
    }
    Ok(target)
}

/// Answers a stream with `code` and no body.
fn respond_status(
    respond: &mut SendResponse<Bytes>,
    code: StatusCode,
    end: bool,
) -> Result<h2::SendStream<Bytes>, h2::Error> {
    let mut resp = Response::new(());
    *resp.status_mut() = code;
    respond.send_response(resp, end)
}

/// One CONNECT stream: check, admit against the tenant's limits, connect to the local pod,
/// answer 200 and join the two.
async fn handle(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    tenant: Identity,
    peer_id: Identity,
    mesh: Mesh,
    pool: tenancy::Pool,
) {
    let decided = decide(req.method(), req.uri(), &mesh.snapshot.load(), &tenant);
    let target = match decided {
        Ok(target) => target,
        Err(refusal) => {
            if let Refusal::NotOurs { target, owner } = &refusal {
                tracing::warn!(%tenant, peer = %peer_id, %target, owner = ?owner.as_ref().map(|o| o.to_string()), "refusing CONNECT: target is not a local pod of this identity");
            }
            metrics::refused(refusal.outcome());
            let _ = respond_status(&mut respond, refusal.status(), true);
            return;
        }
    };
    // Work that arrives for the tenant's pods is the tenant's work: its limits, its buffers.
    let _admission = match pool.admit(crate::relay::BUFFER_BYTES) {
        Ok(admission) => admission,
        Err(rejection) => {
            metrics::tenant_rejected(&tenant, rejection);
            tracing::debug!(%tenant, peer = %peer_id, %target, reason = rejection.as_str(), "CONNECT shed: the tenant is at its limit");
            let _ = respond_status(&mut respond, SHED, true);
            return;
        }
    };
    // Admitted: from here on the stream is a connection of the tenant's, counted at its end.
    let mut m = ConnMetrics::open(&tenant, Direction::Inbound, Some(&peer_id));
    let outcome = relay(req, respond, target, &m).await;
    tracing::debug!(%tenant, peer = %peer_id, %target, outcome = outcome.as_str(), blame = outcome.blame().as_str(), "inbound tunnelled connection closed");
    m.record(outcome);
}

/// Connects to the local pod, answers 200 and joins the two; or answers why not.
async fn relay(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    target: SocketAddr,
    m: &ConnMetrics,
) -> Outcome {
    let mut up = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%target, error = %e, "local pod refused the connection");
            let _ = respond_status(&mut respond, POD_REFUSED, true);
            return outcome::connect(&e);
        }
        Err(_) => {
            let _ = respond_status(&mut respond, POD_TIMEOUT, true);
            return Outcome::UpstreamConnect;
        }
    };
    let _ = up.set_nodelay(true);
    let send = match respond_status(&mut respond, StatusCode::OK, false) {
        Ok(send) => send,
        // The client reset the stream while we connected (h2 reports it as our misuse of a
        // closed stream, so it is not classified as an HTTP/2 error).
        Err(_) => return Outcome::DownstreamReset,
    };
    let mut stream = H2Stream {
        send,
        recv: req.into_body(),
    };
    // Downstream is the tunnel's client here: what comes from it is read, what goes to it is
    // written.
    match copy::join(&mut up, &mut stream, &m.write_bytes, &m.read_bytes).await {
        Ok(()) => Outcome::Clean,
        Err(e) => {
            tracing::debug!(%target, error = %e, "inbound tunnelled connection failed");
            // The pod is the upstream here.
            e.outcome(Side::Upstream)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use controlplane::view::NodeView;

    use super::*;

    const VIEW: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodeproxy.io/mesh: enabled}}\n\
        ---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop}\n\
        spec: {serviceAccountName: web, nodeName: n1, containers: [{name: c, image: i}]}\n\
        status: {phase: Running, podIP: 10.0.0.2}\n\
        ---\napiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: shop}\n\
        spec: {serviceAccountName: db, nodeName: n1, containers: [{name: c, image: i}]}\n\
        status: {phase: Running, podIP: 10.0.0.3}\n";

    #[test]
    fn a_connect_is_let_through_only_to_a_local_pod_of_the_named_tenant() {
        let objects = controlplane::FileSource::parse_str("test", VIEW).unwrap();
        let snapshot = Snapshot::new(NodeView::build(&objects, "n1", "cluster.local").unwrap(), 1);
        let web: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let db: Identity = "spiffe://cluster.local/ns/shop/sa/db".parse().unwrap();
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let cases = [
            (Method::CONNECT, "10.0.0.2:8080", Ok(addr("10.0.0.2:8080"))),
            (Method::GET, "10.0.0.2:8080", Err(Refusal::Method)),
            (Method::CONNECT, "web.shop:8080", Err(Refusal::Authority)),
            (
                Method::CONNECT,
                "10.0.0.3:5432",
                Err(Refusal::NotOurs {
                    target: addr("10.0.0.3:5432"),
                    owner: Some(db),
                }),
            ),
            (
                Method::CONNECT,
                "10.9.9.9:80",
                Err(Refusal::NotOurs {
                    target: addr("10.9.9.9:80"),
                    owner: None,
                }),
            ),
        ];
        for (method, uri, want) in cases {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(
                decide(&method, &uri, &snapshot, &web),
                want,
                "{method} {uri}"
            );
        }
        assert_eq!(Refusal::Method.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(Refusal::Authority.status(), StatusCode::BAD_REQUEST);
    }
}
