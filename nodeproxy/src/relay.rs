//! The relay phase: plain TCP between the downstream pod and its original destination.
//!
//! Owns [`outbound`], the job a tenant's pool runs for each captured connection: register the
//! socket with the pool's runtime, connect upstream, copy both ways with per-tenant byte
//! counters, and record how it ended (an [`Outcome`], blaming the side whose socket failed).
//! Everything here runs on the tenant's own pool thread.
//!
//! Must not touch: classification (already decided), the snapshot, other tenants' pools.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::metrics::ConnMetrics;
use crate::outcome::{self, Direction, IoFault, Outcome, Side};
use crate::splice;
use crate::state::LocalPod;

/// How long an upstream connect may take before the downstream is reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Copy buffer per direction. Large buffers cut syscalls for bulk streams.
const BUF_SIZE: usize = 64 * 1024;

/// Buffer bytes one relayed connection holds, charged to its tenant at admission.
pub const BUFFER_BYTES: u64 = 2 * BUF_SIZE as u64;

/// Relays one captured connection of `pod`'s tenant to `dst`. Runs inside the tenant's pool.
/// `peer_id` is the destination's identity when it is a meshed pod on this node.
pub async fn outbound(
    down: std::net::TcpStream,
    peer: SocketAddr,
    pod: LocalPod,
    dst: SocketAddr,
    peer_id: Option<certs::Identity>,
) {
    let mut m = ConnMetrics::open(&pod.tenant, Direction::Outbound, peer_id.as_ref());
    let outcome = relay(down, dst, &m).await;
    tracing::debug!(
        tenant = %pod.tenant, pod = %format_args!("{}/{}", pod.namespace, pod.name),
        %peer, %dst, outcome = outcome.as_str(), blame = outcome.blame().as_str(),
        "connection closed"
    );
    m.record(outcome);
}

async fn relay(down: std::net::TcpStream, dst: SocketAddr, m: &ConnMetrics) -> Outcome {
    let mut down = match TcpStream::from_std(down) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register socket with the pool runtime");
            return Outcome::Internal;
        }
    };
    let mut up = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%dst, error = %e, "upstream connect failed");
            reset(&down);
            return outcome::connect(&e);
        }
        Err(_) => {
            tracing::debug!(%dst, "upstream connect timed out");
            reset(&down);
            return Outcome::UpstreamConnect;
        }
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    // Zero-copy in the kernel when pipes are available; a user-space copy otherwise.
    if let Ok(pipes) = splice::Pipes::new() {
        let moved = splice::bidirectional(&down, &up, pipes, &m.read_bytes, &m.write_bytes).await;
        return match moved {
            Ok(()) => Outcome::Clean,
            Err(fault) => failed(&down, &up, dst, &fault),
        };
    }
    let (mut dr, mut dw) = down.split();
    let (mut ur, mut uw) = up.split();
    let up_dir = pump(&mut dr, &mut uw, Side::Downstream, &m.read_bytes);
    let down_dir = pump(&mut ur, &mut dw, Side::Upstream, &m.write_bytes);
    match tokio::try_join!(up_dir, down_dir) {
        Ok(_) => Outcome::Clean,
        Err(fault) => failed(&down, &up, dst, &fault),
    }
}

/// Resets both ends of a relay that failed mid-stream; the outcome blames the failed side.
fn failed(down: &TcpStream, up: &TcpStream, dst: SocketAddr, fault: &IoFault) -> Outcome {
    tracing::debug!(%dst, error = %fault, "relay failed");
    reset(down);
    reset(up);
    fault.outcome()
}

/// Copies `r` (`from`'s socket) to `w` (the other side's) until EOF, then half-closes `w`.
/// Counts every chunk as it goes, so long-lived connections show up in metrics while they run.
/// An error names the side whose socket failed.
async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    from: Side,
    counter: &metrics::Counter,
) -> Result<(), IoFault>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = r.read(&mut buf).await.map_err(IoFault::new(from))?;
        if n == 0 {
            // Half-close: the peer may still be sending the other way.
            return w.shutdown().await.map_err(IoFault::new(from.other()));
        }
        w.write_all(&buf[..n])
            .await
            .map_err(IoFault::new(from.other()))?;
        counter.increment(n as u64);
    }
}

fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}
