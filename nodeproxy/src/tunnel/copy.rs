//! The tunnel's copy loop: one proxied connection's bytes between the pod's TCP socket and its
//! HTTP/2 CONNECT stream, both ways. The one place both halves ([`super::client`] and
//! [`super::server`]) move data.
//!
//! Owns [`H2Stream`] and [`join`]. Bytes are handed over, not copied: the pod socket is read
//! into a [`BytesMut`] whose filled part is frozen and given to h2 as a DATA payload (h2 chains
//! it behind the frame head into the TLS writer), and each received DATA frame's [`Bytes`] is
//! written to the pod socket as it is. The copies left in user space are the TLS layer's
//! (rustls's records, tokio-rustls's plaintext into h2's read buffer). Memory stays bounded by HTTP/2 flow control: the pod is read
//! only when the stream has send capacity (at most [`super::SEND_BUF`] buffered in h2), and
//! the peer may send only as much as the pod has taken (window released after each write).
//!
//! Ends follow RFC 9113 §8.5: pod EOF → END_STREAM; the peer's END_STREAM → `shutdown(Write)`
//! on the pod socket; an error on either side → RST_STREAM(CONNECT_ERROR) to the peer and a
//! TCP reset to the pod, so neither end mistakes an aborted connection for a complete one.
//!
//! Must not touch: TLS, the connection pool, decisions about who may connect where.

use std::future::poll_fn;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::outcome::{self, Outcome, Side};

/// First read buffer of a connection: small, so an idle or chatty connection holds little.
const SMALL_READ: usize = 16 << 10;
/// Read buffer once a read has filled the small one (a bulk stream): one read is one DATA
/// frame ([`super::MAX_FRAME`]), and a connection holds no more than the relay's buffers.
const LARGE_READ: usize = 64 << 10;

/// Both halves of one CONNECT stream.
#[derive(Debug)]
pub(crate) struct H2Stream {
    /// Our side: DATA to the peer.
    pub send: SendStream<Bytes>,
    /// The peer's side: DATA from the peer.
    pub recv: RecvStream,
}

/// Why a tunnelled connection ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Fault {
    /// Reading or writing the pod socket failed (blame: the pod or its kernel).
    #[error("pod socket: {0}")]
    Pod(#[source] std::io::Error),
    /// The stream or its connection failed (blame: the peer or the path to it).
    #[error("tunnel stream: {0}")]
    Stream(#[source] h2::Error),
    /// The peer reset the stream.
    #[error("tunnel stream reset by the peer: {0}")]
    Reset(h2::Reason),
}

impl Fault {
    /// How the connection ends, given which side the pod is on (downstream for the client
    /// half, upstream for the server half); the tunnel is the other side. A reset from the
    /// peer blames the tunnel's side: the peer resets when its own end failed.
    pub(crate) fn outcome(&self, pod: Side) -> Outcome {
        let tunnel = pod.other();
        match self {
            Fault::Pod(e) => outcome::io(pod, e),
            Fault::Stream(e) => outcome::h2(tunnel, e),
            Fault::Reset(_) => tunnel.reset(),
        }
    }
}

/// Copies both ways between `pod` and `stream` until both directions have ended, counting
/// bytes as they move: `to_peer` what was read from the pod, `from_peer` what was written to
/// it. On a fault both ends are reset (see the module docs).
pub(crate) async fn join(
    pod: &mut TcpStream,
    stream: &mut H2Stream,
    to_peer: &metrics::Counter,
    from_peer: &metrics::Counter,
) -> Result<(), Fault> {
    let (mut r, mut w) = pod.split();
    let up = pod_to_peer(&mut r, &mut stream.send, to_peer);
    let down = peer_to_pod(&mut stream.recv, &mut w, from_peer);
    let result = tokio::try_join!(up, down).map(drop);
    if result.is_err() {
        stream.send.send_reset(h2::Reason::CONNECT_ERROR);
        let _ = socket2::SockRef::from(&*pod).set_linger(Some(Duration::ZERO));
    }
    result
}

/// Pod → peer: read what the pod sent, hand it to h2 as it is, END_STREAM at the pod's EOF.
async fn pod_to_peer(
    r: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    counter: &metrics::Counter,
) -> Result<(), Fault> {
    // No buffer until the pod first sends: a connection that never does holds none.
    let mut buf = BytesMut::new();
    let mut size = SMALL_READ;
    loop {
        // Wait for the pod, or for the peer to reset the stream while the pod is quiet (else
        // a reset after the peer's END_STREAM would go unnoticed until the pod sends again).
        tokio::select! {
            biased;
            ready = r.readable() => ready.map_err(Fault::Pod)?,
            reset = poll_fn(|cx| send.poll_reset(cx)) => return Err(reset_fault(reset)),
        }
        // Refill only when little is left, so a buffer is shared by many small chunks rather
        // than one each. Once h2 has let go of every chunk, `reserve` reuses the buffer in
        // place; while h2 still holds some, it allocates a new one.
        if buf.capacity() < size / 4 {
            buf.reserve(size);
        }
        let offered = buf.capacity();
        let n = match r.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Fault::Pod(e)),
        };
        if n == 0 {
            return send.send_data(Bytes::new(), true).map_err(Fault::Stream);
        }
        counter.increment(n as u64);
        if n == offered {
            // The pod had more than we asked for: a bulk stream.
            size = LARGE_READ;
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let capacity = poll_fn(|cx| poll_send_capacity(send, cx)).await?;
            let part = chunk.split_to(capacity.min(chunk.len()));
            send.send_data(part, false).map_err(Fault::Stream)?;
        }
        // Let the connection's task write the chunk into TLS before we read again: h2 then
        // drops it and the buffer is reused in place. Reading on instead allocates a buffer
        // per read, which the allocator serves from pages it has just given back to the
        // kernel: the sending daemon took a hundred times more page faults without this.
        tokio::task::yield_now().await;
    }
}

/// Peer → pod: write each DATA frame to the pod as it is, then let the peer send as much
/// again; `shutdown(Write)` at the peer's END_STREAM.
async fn peer_to_pod(
    recv: &mut RecvStream,
    w: &mut WriteHalf<'_>,
    counter: &metrics::Counter,
) -> Result<(), Fault> {
    while let Some(data) = recv.data().await {
        let data = data.map_err(stream_fault)?;
        w.write_all(&data).await.map_err(Fault::Pod)?;
        counter.increment(data.len() as u64);
        // Only what the pod has taken is given back to the peer's window: a slow pod slows
        // the peer instead of growing our buffers.
        let _ = recv.flow_control().release_capacity(data.len());
    }
    w.shutdown().await.map_err(Fault::Pod)
}

/// Send capacity of the stream (after `reserve_capacity`), waiting while there is none.
fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<usize, Fault>> {
    loop {
        let capacity = send.capacity();
        if capacity > 0 {
            return Poll::Ready(Ok(capacity));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Poll::Ready(Err(Fault::Stream(e))),
            // The stream can no longer send: reset by the peer, or its connection is gone.
            None => {
                return Poll::Ready(Err(match send.poll_reset(cx) {
                    Poll::Ready(reset) => reset_fault(reset),
                    Poll::Pending => Fault::Reset(h2::Reason::STREAM_CLOSED),
                }));
            }
        }
    }
}

fn reset_fault(reset: Result<h2::Reason, h2::Error>) -> Fault {
    match reset {
        Ok(reason) => Fault::Reset(reason),
        Err(e) => Fault::Stream(e),
    }
}

fn stream_fault(e: h2::Error) -> Fault {
    match e.reason() {
        Some(reason) if e.is_reset() && e.is_remote() => Fault::Reset(reason),
        _ => Fault::Stream(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of loopback sockets: (the pod's end, the proxy's end).
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pod = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (proxy, _) = listener.accept().await.unwrap();
        (pod, proxy)
    }

    /// One CONNECT stream over an in-memory HTTP/2 connection: (client's, server's).
    async fn stream_pair() -> (H2Stream, H2Stream) {
        let (c, s) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            H2Stream {
                send,
                recv: req.into_body(),
            }
        });
        let (send, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::connect("10.0.0.1:80").body(()).unwrap();
        let (resp, send) = send
            .ready()
            .await
            .unwrap()
            .send_request(req, false)
            .unwrap();
        let resp = resp.await.unwrap();
        let client = H2Stream {
            send,
            recv: resp.into_body(),
        };
        (client, server.await.unwrap())
    }

    fn counter() -> (metrics::Counter, Arc<AtomicU64>) {
        let n = Arc::new(AtomicU64::new(0));
        (metrics::Counter::from_arc(n.clone()), n)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_with_half_close_and_are_counted() {
        let (mut stream_a, mut stream_b) = stream_pair().await;
        let (mut pod_a, mut proxy_a) = socket_pair().await;
        let (mut pod_b, mut proxy_b) = socket_pair().await;
        let (a_out, a_out_n) = counter();
        let (a_in, a_in_n) = counter();
        let (b_out, b_out_n) = counter();
        let (b_in, b_in_n) = counter();
        let side_a =
            tokio::spawn(async move { join(&mut proxy_a, &mut stream_a, &a_out, &a_in).await });
        let side_b =
            tokio::spawn(async move { join(&mut proxy_b, &mut stream_b, &b_out, &b_in).await });
        // More than the read buffers and a frame, so it goes as many chunks.
        let request: Vec<u8> = (0..3_000_000).map(|i| (i % 251) as u8).collect();
        let reply = b"the other way, after the request's end".to_vec();
        let (req, rep) = (request.clone(), reply.clone());
        let pod_b_task = tokio::spawn(async move {
            let mut got = Vec::new();
            // Reads to EOF: the request's end arrived as a half-close.
            pod_b.read_to_end(&mut got).await.unwrap();
            assert!(got == req, "the request differs");
            pod_b.write_all(&rep).await.unwrap();
            pod_b.shutdown().await.unwrap();
        });
        let (mut r, mut w) = pod_a.split();
        let mut got = Vec::new();
        let (wrote, read) = tokio::join!(
            async {
                w.write_all(&request).await.unwrap();
                w.shutdown().await.unwrap();
            },
            r.read_to_end(&mut got)
        );
        let _: () = wrote;
        read.unwrap();
        assert_eq!(got, reply);
        pod_b_task.await.unwrap();
        side_a.await.unwrap().unwrap();
        side_b.await.unwrap().unwrap();
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(n(&a_out_n), request.len() as u64);
        assert_eq!(n(&b_in_n), request.len() as u64);
        assert_eq!(n(&b_out_n), reply.len() as u64);
        assert_eq!(n(&a_in_n), reply.len() as u64);
    }

    #[test]
    fn faults_blame_the_pod_or_the_tunnel_side() {
        use std::io::{Error, ErrorKind};
        let reset = || Fault::Pod(Error::from(ErrorKind::ConnectionReset));
        // (fault, outcome on the client half (pod downstream), on the server half)
        let cases = [
            (reset(), Outcome::DownstreamReset, Outcome::UpstreamReset),
            (
                Fault::Pod(Error::from(ErrorKind::OutOfMemory)),
                Outcome::Internal,
                Outcome::Internal,
            ),
            (
                Fault::Reset(h2::Reason::CONNECT_ERROR),
                Outcome::UpstreamReset,
                Outcome::DownstreamReset,
            ),
            (
                Fault::Stream(h2::Reason::PROTOCOL_ERROR.into()),
                Outcome::UpstreamReset,
                Outcome::DownstreamReset,
            ),
        ];
        for (fault, client, server) in cases {
            assert_eq!(fault.outcome(Side::Downstream), client, "{fault:?}");
            assert_eq!(fault.outcome(Side::Upstream), server, "{fault:?}");
        }
    }

    #[tokio::test]
    async fn a_reset_pod_connection_resets_the_stream_and_the_other_pod() {
        let (mut stream_a, mut stream_b) = stream_pair().await;
        let (mut pod_a, mut proxy_a) = socket_pair().await;
        let (pod_b, mut proxy_b) = socket_pair().await;
        let (c1, _) = counter();
        let (c2, _) = counter();
        let (c3, _) = counter();
        let (c4, _) = counter();
        let side_a = tokio::spawn(async move { join(&mut proxy_a, &mut stream_a, &c1, &c2).await });
        let side_b = tokio::spawn(async move { join(&mut proxy_b, &mut stream_b, &c3, &c4).await });
        // Pod B aborts its connection.
        socket2::SockRef::from(&pod_b)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(pod_b);
        let b = side_b.await.unwrap().unwrap_err();
        assert!(matches!(b, Fault::Pod(_)), "{b:?}");
        let a = side_a.await.unwrap().unwrap_err();
        assert!(
            matches!(a, Fault::Reset(h2::Reason::CONNECT_ERROR)),
            "{a:?}"
        );
        // Side B is the server half (its pod upstream), side A the client half: both blame
        // pod B, which reset.
        assert_eq!(b.outcome(Side::Upstream), Outcome::UpstreamReset);
        assert_eq!(a.outcome(Side::Downstream), Outcome::UpstreamReset);
        // Pod A sees an abort, not a clean end.
        let mut buf = [0u8; 16];
        let err = pod_a.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_peer_reset_after_its_end_is_noticed_while_the_pod_is_quiet() {
        let (mut stream_a, mut stream_b) = stream_pair().await;
        let (mut pod_a, mut proxy_a) = socket_pair().await;
        let (c1, _) = counter();
        let (c2, _) = counter();
        let side_a = tokio::spawn(async move { join(&mut proxy_a, &mut stream_a, &c1, &c2).await });
        // The peer ends its side (pod A sees the half-close), then resets the stream; pod A
        // sends nothing meanwhile, so only watching for resets can notice.
        stream_b.send.send_data(Bytes::new(), true).unwrap();
        let mut rest = Vec::new();
        pod_a.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        stream_b.send.send_reset(h2::Reason::CANCEL);
        let a = tokio::time::timeout(Duration::from_secs(10), side_a)
            .await
            .expect("the reset went unnoticed")
            .unwrap()
            .unwrap_err();
        assert!(matches!(a, Fault::Reset(h2::Reason::CANCEL)), "{a:?}");
    }
}
