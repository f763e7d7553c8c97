//! Outbound capture: connections redirected from local pods to port 15001.
//!
//! Phases (see `docs/ARCHITECTURE.md`, "Life of a connection"), each *decide, then act*:
//! 1. **capture** — [`accept_loop`] accepts, reads the original destination
//!    ([`OrigDst`]), and does nothing else.
//! 2. **identify + admit** — [`decide`], a pure function of the snapshot, the peer address and
//!    the original destination, yields a [`Decision`]: relay for a tenant, or refuse (with a
//!    closed-set reason). An unknown source is refused, never given a guessed identity.
//! 3. **hand off** — the socket is handed to the tenant's pool as a job; from here on, nothing
//!    runs outside that pool (see [`crate::relay`]).
//!
//! Must not touch: the kernel's rules, certificates, the control plane; it never awaits
//! anything but `accept`.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use certs::Identity;
use tenancy::Pools;
use tokio::net::TcpListener;

use crate::metrics;
use crate::relay;
use crate::state::{LocalPod, Snapshot};

/// Where a captured connection was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrigDst {
    /// Ask the kernel (`SO_ORIGINAL_DST`): the production mode behind nftables REDIRECT.
    Kernel,
    /// Every connection goes to this address. Only for in-process tests on loopback, where no
    /// NAT rule exists to ask the kernel about.
    #[cfg(feature = "test-util")]
    Fixed(SocketAddr),
}

impl OrigDst {
    /// The original destination of `stream`, if the kernel knows one.
    pub fn lookup(&self, stream: &tokio::net::TcpStream) -> Option<SocketAddr> {
        match self {
            OrigDst::Kernel => {
                let sock = socket2::SockRef::from(stream);
                let local = stream.local_addr().ok()?;
                let addr = if local.is_ipv4() || is_v4_mapped(&local) {
                    sock.original_dst_v4()
                } else {
                    sock.original_dst_v6()
                };
                addr.ok()?.as_socket()
            }
            #[cfg(feature = "test-util")]
            OrigDst::Fixed(addr) => Some(*addr),
        }
    }
}

fn is_v4_mapped(addr: &SocketAddr) -> bool {
    matches!(addr, SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some())
}

/// Why a connection was refused before reaching any tenant. A closed set: it labels metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source IP is not a local meshed pod.
    UnknownSource,
    /// The kernel has no original destination: the connection was not redirected to us.
    NotRedirected,
    /// The original destination is one of our own listeners.
    Loop,
    /// The tenant's pool is closed (its last pod just left).
    PoolClosed,
}

impl Refusal {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownSource => "unknown_source",
            Refusal::NotRedirected => "not_redirected",
            Refusal::Loop => "loop",
            Refusal::PoolClosed => "pool_closed",
        }
    }
}

/// What to do with a captured connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Relay to `dst` on behalf of the pod's tenant.
    Relay {
        /// The source pod (and through it, the tenant).
        pod: LocalPod,
        /// The original destination.
        dst: SocketAddr,
    },
    /// Refuse the connection.
    Refuse(Refusal),
}

/// Decides what to do with a connection from `peer` to `orig_dst` (pure).
pub fn decide(
    snap: &Snapshot,
    peer: SocketAddr,
    orig_dst: Option<SocketAddr>,
    listeners: &[SocketAddr],
) -> Decision {
    let Some(dst) = orig_dst else {
        return Decision::Refuse(Refusal::NotRedirected);
    };
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if listeners
        .iter()
        .any(|l| l.port() == dst.port() && (l.ip().is_unspecified() || l.ip() == dst.ip()))
    {
        return Decision::Refuse(Refusal::Loop);
    }
    match snap.pod_by_ip(peer.ip()) {
        Some(pod) => Decision::Relay {
            pod: pod.clone(),
            dst,
        },
        None => Decision::Refuse(Refusal::UnknownSource),
    }
}

/// Everything an accept loop needs; cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbound {
    /// The current node snapshot.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// The tenants' pools.
    pub pools: Arc<Pools<Identity>>,
    /// How to find original destinations.
    pub orig_dst: OrigDst,
    /// Our own outbound listener addresses (loop detection).
    pub listeners: Arc<[SocketAddr]>,
}

/// Accepts captured connections forever, classifying each and handing it to its tenant's pool.
pub async fn accept_loop(listener: TcpListener, ctx: Outbound) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let orig = ctx.orig_dst.lookup(&stream);
        let decision = decide(&ctx.snapshot.load(), peer, orig, &ctx.listeners);
        match decision {
            Decision::Refuse(reason) => refuse(stream, peer, orig, reason),
            Decision::Relay { pod, dst } => hand_off(&ctx, stream, peer, pod, dst),
        }
    }
}

fn refuse(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    orig: Option<SocketAddr>,
    reason: Refusal,
) {
    metrics::refused(reason.as_str());
    tracing::debug!(%peer, orig_dst = ?orig, reason = reason.as_str(), "connection refused");
    // Reset rather than close: the client learns at once that nothing is there for it.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

fn hand_off(
    ctx: &Outbound,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    pod: LocalPod,
    dst: SocketAddr,
) {
    let pool = match ctx.pools.get_or_create(&pod.tenant) {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(tenant = %pod.tenant, error = %e, "no pool for tenant");
            return refuse(stream, peer, Some(dst), Refusal::PoolClosed);
        }
    };
    // Leave this runtime's reactor; the job re-registers the socket with the pool's own.
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot detach accepted socket");
            return;
        }
    };
    let tenant = pod.tenant.clone();
    let spawned = pool.spawn(move || relay::outbound(std_stream, peer, pod, dst));
    if let Err(e) = spawned {
        tracing::debug!(%tenant, error = %e, "pool closed while handing off");
        metrics::refused(Refusal::PoolClosed.as_str());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use controlplane::view::{NodeView, Workload};

    fn snap() -> Snapshot {
        let w = |name: &str, sa: &str, ip: &str| Workload {
            name: name.into(),
            namespace: "shop".into(),
            node: "n1".into(),
            ips: vec![ip.parse().unwrap()],
            identity: Identity::new("cluster.local", "shop", sa).unwrap(),
        };
        let view = NodeView {
            node: "n1".into(),
            trust_domain: "cluster.local".into(),
            local: vec![
                w("web-0", "web", "10.200.1.2"),
                w("db-0", "db", "fdfe:200:2::2"),
            ],
            remote: vec![],
            meshed_namespaces: vec!["shop".into()],
        };
        Snapshot::new(view, 1)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classification_table() {
        let s = snap();
        let listeners = [sa("0.0.0.0:15001"), sa("[::]:15001")];
        let web = Identity::new("cluster.local", "shop", "web").unwrap();
        let db = Identity::new("cluster.local", "shop", "db").unwrap();
        let cases: Vec<(&str, Option<&str>, Result<(&Identity, &str), Refusal>)> = vec![
            // a meshed pod going anywhere: relayed as its own tenant
            (
                "10.200.1.2:40000",
                Some("10.200.2.2:8080"),
                Ok((&web, "10.200.2.2:8080")),
            ),
            // a dual-stack socket reports v4 peers as mapped v6
            (
                "[::ffff:10.200.1.2]:40000",
                Some("[::ffff:10.200.9.9]:80"),
                Ok((&web, "10.200.9.9:80")),
            ),
            (
                "[fdfe:200:2::2]:1234",
                Some("[fdfe:200:1::2]:5432"),
                Ok((&db, "[fdfe:200:1::2]:5432")),
            ),
            // unknown sources are refused, never guessed
            (
                "10.200.7.7:40000",
                Some("10.200.2.2:8080"),
                Err(Refusal::UnknownSource),
            ),
            (
                "127.0.0.1:40000",
                Some("10.200.2.2:8080"),
                Err(Refusal::UnknownSource),
            ),
            // not redirected: no original destination
            ("10.200.1.2:40000", None, Err(Refusal::NotRedirected)),
            // straight at our own listener
            (
                "10.200.1.2:40000",
                Some("10.200.1.1:15001"),
                Err(Refusal::Loop),
            ),
        ];
        for (peer, orig, want) in cases {
            let got = decide(&s, sa(peer), orig.map(sa), &listeners);
            let want = match want {
                Ok((tenant, dst)) => Decision::Relay {
                    pod: s.pod_by_ip(sa(peer).ip()).cloned().unwrap(),
                    dst: sa(dst),
                }
                .tap(|d| {
                    if let Decision::Relay { pod, .. } = d {
                        assert_eq!(&pod.tenant, tenant);
                    }
                }),
                Err(r) => Decision::Refuse(r),
            };
            assert_eq!(got, want, "peer {peer} orig {orig:?}");
        }
    }

    trait Tap: Sized {
        fn tap(self, f: impl FnOnce(&Self)) -> Self {
            f(&self);
            self
        }
    }
    impl Tap for Decision {}
}
