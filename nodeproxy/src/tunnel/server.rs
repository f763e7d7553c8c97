//! The tunnel's server half: the pool-side job for one inbound mTLS connection.
//!
//! Owns [`serve`]: runs on the **destination** tenant's pool (chosen by the accept loop in
//! [`crate::inbound`] from the SNI), terminates TLS with that tenant's certificate, reads the
//! client's SPIFFE identity (the chain was verified by webpki during the handshake), then
//! serves HTTP/2: each CONNECT stream names a local pod (`:authority`), which must belong to
//! this tenant; the stream is joined to a new TCP connection to that pod.
//!
//! Must not touch: other tenants' pools or certificates, the outbound side.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use certs::Identity;
use http_body_util::Empty;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{HANDSHAKE_TIMEOUT, MAX_STREAMS_PER_CONN, Mesh, count_handshake};
use crate::metrics::{ConnMetrics, Direction};
use crate::relay::CONNECT_TIMEOUT;

/// Serves one inbound tunnel connection for `tenant` (the identity the client's SNI named).
pub async fn serve(stream: std::net::TcpStream, client: SocketAddr, tenant: Identity, mesh: Mesh) {
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register socket with the pool runtime");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let tls = super::tenant_tls(&tenant, &mesh);
    let current = match super::current(&tls).await {
        Ok(c) => c,
        Err(e) => {
            count_handshake(&tenant, "inbound", "no_certificate");
            tracing::warn!(%tenant, %client, error = %e, "refusing a tunnel connection");
            return;
        }
    };
    drop(tls);
    let acceptor = tokio_rustls::TlsAcceptor::from(current.server_config());
    drop(current);
    let tls_stream =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(super::buffered(stream)))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                count_handshake(&tenant, "inbound", "error");
                tracing::warn!(%tenant, %client, error = %e, "tunnel TLS handshake refused");
                return;
            }
            Err(_) => {
                count_handshake(&tenant, "inbound", "timeout");
                tracing::warn!(%tenant, %client, "tunnel TLS handshake timed out");
                return;
            }
        };
    let peer_id = match certs::verify::peer_identity(tls_stream.get_ref().1) {
        Ok(id) => id,
        Err(e) => {
            count_handshake(&tenant, "inbound", "error");
            tracing::warn!(%tenant, %client, error = %e, "tunnel client has no usable identity");
            return;
        }
    };
    count_handshake(&tenant, "inbound", "ok");
    tracing::debug!(%tenant, %client, peer = %peer_id, "tunnel connection accepted");
    let service = {
        let (tenant, peer_id, mesh) = (tenant.clone(), peer_id.clone(), mesh.clone());
        service_fn(move |req| handle(req, tenant.clone(), peer_id.clone(), mesh.clone()))
    };
    let served = http2::Builder::new(super::LocalExec)
        .max_concurrent_streams(MAX_STREAMS_PER_CONN as u32)
        .initial_stream_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONN_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .max_send_buf_size(super::SEND_BUF)
        .serve_connection(TokioIo::new(tls_stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%tenant, %client, error = %e, "tunnel connection ended");
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = code;
    resp
}

/// One CONNECT stream: check, connect to the local pod, answer 200 and join the two.
async fn handle(
    mut req: Request<hyper::body::Incoming>,
    tenant: Identity,
    peer_id: Identity,
    mesh: Mesh,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    if req.method() != http::Method::CONNECT {
        return Ok(status(StatusCode::METHOD_NOT_ALLOWED));
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    // The target must be a local pod of the tenant whose certificate the client asked for.
    let owner = mesh
        .snapshot
        .load()
        .pod_by_ip(target.ip())
        .map(|p| p.tenant.clone());
    if owner.as_ref() != Some(&tenant) {
        tracing::warn!(%tenant, peer = %peer_id, %target, owner = ?owner.map(|o| o.to_string()), "refusing CONNECT: target is not a local pod of this identity");
        return Ok(status(StatusCode::FORBIDDEN));
    }
    let up = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%tenant, %target, error = %e, "local pod refused the connection");
            return Ok(status(StatusCode::BAD_GATEWAY));
        }
        Err(_) => return Ok(status(StatusCode::GATEWAY_TIMEOUT)),
    };
    let _ = up.set_nodelay(true);
    let mut m = ConnMetrics::open_with_peer(
        &tenant.to_string(),
        Direction::Inbound,
        &peer_id.to_string(),
    );
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::task::spawn_local(async move {
        let mut up = up;
        let outcome = match on_upgrade.await {
            Ok(upgraded) => {
                let mut down = TokioIo::new(upgraded);
                match tokio::io::copy_bidirectional_with_sizes(
                    &mut down,
                    &mut up,
                    64 * 1024,
                    64 * 1024,
                )
                .await
                {
                    Ok((from_down, from_up)) => {
                        m.read_bytes.increment(from_down);
                        m.write_bytes.increment(from_up);
                        "none"
                    }
                    Err(_) => "io",
                }
            }
            Err(_) => "io",
        };
        tracing::debug!(%tenant, peer = %peer_id, %target, outcome, "inbound tunnelled connection closed");
        m.set_outcome(outcome);
    });
    Ok(status(StatusCode::OK))
}
