//! Outbound capture: connections from local pods captured to port 15001 (TPROXY by default,
//! or nat REDIRECT).
//!
//! Phases (see `docs/ARCHITECTURE.md`, "Life of a connection"), each *decide, then act*:
//! 1. **capture** — [`accept_loop`] accepts, reads the original destination
//!    ([`OrigDst`]: the socket's local address with TPROXY, `SO_ORIGINAL_DST` with REDIRECT),
//!    and does nothing else.
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

use crate::config::CaptureMode;
use crate::metrics;
use crate::outcome::Outcome;
use crate::relay;
use crate::state::{LocalPod, Snapshot};

/// Where a captured connection was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrigDst {
    /// The accepted socket's local address: behind nftables TPROXY (the default capture), the
    /// packet reached the transparent listener unchanged, so the kernel gave the socket the
    /// destination the pod dialled.
    LocalAddr,
    /// Ask the kernel's NAT table (`SO_ORIGINAL_DST`): behind nftables REDIRECT, where the
    /// socket's local address is the node's own.
    OriginalDst,
    /// Every connection goes to this address. Only for in-process tests on loopback, where no
    /// capture rule exists.
    #[cfg(feature = "test-util")]
    Fixed(SocketAddr),
}

impl OrigDst {
    /// How `--capture` says the original destination is found.
    pub fn for_capture(mode: CaptureMode) -> Self {
        match mode {
            CaptureMode::Tproxy => OrigDst::LocalAddr,
            CaptureMode::Redirect => OrigDst::OriginalDst,
        }
    }

    /// The original destination of `stream`, if the kernel knows one.
    pub fn lookup(&self, stream: &tokio::net::TcpStream) -> Option<SocketAddr> {
        match self {
            OrigDst::LocalAddr => stream.local_addr().ok(),
            OrigDst::OriginalDst => {
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

/// Why a connection was refused before reaching any tenant: the refusals [`decide`] can
/// return, each one [`Outcome`] (which labels the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source IP is not a local meshed pod.
    UnknownSource,
    /// The kernel has no original destination: the connection was not captured to us.
    NotRedirected,
    /// The original destination is one of our own listeners.
    Loop,
    /// The tenant's pool is closed (its last pod just left).
    PoolClosed,
    /// The destination is a meshed pod on another node whose address the view does not know.
    NoTunnelPeer,
}

impl From<Refusal> for Outcome {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::UnknownSource => Outcome::UnknownSource,
            Refusal::NotRedirected => Outcome::NotRedirected,
            Refusal::Loop => Outcome::Loop,
            Refusal::PoolClosed => Outcome::PoolClosed,
            Refusal::NoTunnelPeer => Outcome::NoTunnelPeer,
        }
    }
}

/// What to do with a captured connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Relay to `dst` directly on behalf of the pod's tenant: a same-node meshed pod (then
    /// `peer` is its identity; no network, no encryption, but both identities are known) or a
    /// non-mesh destination (plain TCP passthrough, `peer` is `None`).
    Relay {
        /// The source pod (and through it, the tenant).
        pod: LocalPod,
        /// The original destination.
        dst: SocketAddr,
        /// The destination's identity, if it is a meshed pod on this node.
        peer: Option<Identity>,
    },
    /// A meshed pod on another node: through the mesh tunnel from the source tenant's pool.
    Tunnel {
        /// The source pod (and through it, the tenant).
        pod: LocalPod,
        /// The original destination (the `:authority` of the CONNECT).
        dst: SocketAddr,
        /// The destination identity and its node's tunnel address.
        peer: crate::tunnel::client::RemotePeer,
    },
    /// Refuse the connection.
    Refuse(Refusal),
}

/// Decides what to do with a connection from `peer` to `orig_dst` (pure).
///
/// With `tunnel_enabled` false (no mesh tunnel configured) remote meshed pods are treated as
/// non-mesh destinations.
pub fn decide(
    snap: &Snapshot,
    peer: SocketAddr,
    orig_dst: Option<SocketAddr>,
    listeners: &[SocketAddr],
    tunnel_enabled: bool,
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
    let Some(pod) = snap.pod_by_ip(peer.ip()) else {
        return Decision::Refuse(Refusal::UnknownSource);
    };
    let pod = pod.clone();
    if let Some(local) = snap.pod_by_ip(dst.ip()) {
        return Decision::Relay {
            pod,
            dst,
            peer: Some(local.tenant.clone()),
        };
    }
    match snap.remote_by_ip(dst.ip()) {
        Some(remote) if tunnel_enabled => match remote.node_ip {
            Some(node_ip) => Decision::Tunnel {
                pod,
                dst,
                peer: crate::tunnel::client::RemotePeer {
                    identity: remote.identity.clone(),
                    node: SocketAddr::new(node_ip, crate::tunnel::TUNNEL_PORT),
                },
            },
            // A meshed pod whose node address is unknown cannot be reached with mTLS;
            // refuse rather than send its traffic in the clear.
            None => Decision::Refuse(Refusal::NoTunnelPeer),
        },
        _ => Decision::Relay {
            pod,
            dst,
            peer: None,
        },
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
    /// The mesh tunnel, if enabled.
    pub mesh: Option<crate::tunnel::Mesh>,
}

/// Accepts captured connections forever, classifying each and handing it to its tenant's pool.
/// `kind` says which listener this is (for `nodeproxy_outbound_accepted_total`); on a tenant's
/// own listener the loop runs in that tenant's pool, and the hand-off stays on its thread.
pub async fn accept_loop(listener: TcpListener, ctx: Outbound, kind: metrics::Listener) {
    let accepted =
        ::metrics::counter!(metrics::OUTBOUND_ACCEPTED_TOTAL, "listener" => kind.as_str());
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
        accepted.increment(1);
        let orig = ctx.orig_dst.lookup(&stream);
        let decision = decide(
            &ctx.snapshot.load(),
            peer,
            orig,
            &ctx.listeners,
            ctx.mesh.is_some(),
        );
        match decision {
            Decision::Refuse(reason) => refuse(stream, peer, orig, reason),
            Decision::Relay { pod, dst, peer: id } => hand_off(&ctx, stream, peer, pod, dst, id),
            Decision::Tunnel {
                pod,
                dst,
                peer: remote,
            } => hand_off_tunnel(&ctx, stream, peer, pod, dst, remote),
        }
    }
}

fn refuse(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    orig: Option<SocketAddr>,
    reason: impl Into<Outcome>,
) {
    let outcome = reason.into();
    metrics::refused(outcome);
    tracing::debug!(
        %peer, orig_dst = ?orig, outcome = outcome.as_str(), blame = outcome.blame().as_str(),
        "connection refused"
    );
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
    peer_id: Option<Identity>,
) {
    hand_off_job(ctx, stream, peer, pod, dst, move |std_stream, pod| {
        relay::outbound(std_stream, peer, pod, dst, peer_id)
    });
}

/// Like [`hand_off`], for a connection that goes through the mesh tunnel.
fn hand_off_tunnel(
    ctx: &Outbound,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    pod: LocalPod,
    dst: SocketAddr,
    remote: crate::tunnel::client::RemotePeer,
) {
    let Some(mesh) = ctx.mesh.clone() else {
        return refuse(stream, peer, Some(dst), Refusal::NoTunnelPeer);
    };
    hand_off_job(ctx, stream, peer, pod, dst, move |std_stream, pod| {
        crate::tunnel::client::outbound(std_stream, peer, pod, dst, remote, mesh)
    });
}

/// The admit phase and the hand-off: the tenant's pool admits the connection against that
/// tenant's own limits (charging its buffers), or sheds it; then the socket leaves the accept
/// runtime and `job` runs in the pool, holding the admission until it ends.
fn hand_off_job<F, Fut>(
    ctx: &Outbound,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    pod: LocalPod,
    dst: SocketAddr,
    job: F,
) where
    F: FnOnce(std::net::TcpStream, LocalPod) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let pool = match ctx.pools.get_or_create(&pod.tenant) {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(tenant = %pod.tenant, error = %e, "no pool for tenant");
            return refuse(stream, peer, Some(dst), Refusal::PoolClosed);
        }
    };
    let admission = match pool.admit(relay::BUFFER_BYTES) {
        Ok(a) => a,
        Err(rejection) => {
            metrics::tenant_rejected(&pod.tenant, rejection);
            let outcome = Outcome::from(rejection);
            tracing::debug!(tenant = %pod.tenant, %peer, outcome = outcome.as_str(), "connection shed");
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            return;
        }
    };
    // Leave this runtime's reactor; the job re-registers the socket with the pool's own.
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot detach accepted socket");
            metrics::refused(Outcome::Internal);
            return;
        }
    };
    let tenant = pod.tenant.clone();
    let spawned = pool.spawn(move || {
        let fut = job(std_stream, pod);
        async move {
            let _admission = admission;
            fut.await;
        }
    });
    if let Err(e) = spawned {
        tracing::debug!(%tenant, error = %e, "pool closed while handing off");
        metrics::refused(Outcome::PoolClosed);
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
            host_ip: None,
        };
        let view = NodeView {
            node: "n1".into(),
            trust_domain: "cluster.local".into(),
            local: vec![
                w("web-0", "web", "10.200.1.2"),
                w("db-0", "db", "fdfe:200:2::2"),
            ],
            remote: vec![
                Workload {
                    node: "n2".into(),
                    host_ip: Some("192.168.0.2".parse().unwrap()),
                    ..w("api-0", "api", "10.200.9.2")
                },
                Workload {
                    node: "n3".into(),
                    ..w("lost-0", "lost", "10.200.8.2")
                },
            ],
            meshed_namespaces: vec!["shop".into()],
            tenants: vec![],
            services: vec![],
            policies: vec![],
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
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            Result<(&'a Identity, &'a str), Refusal>,
        );
        let cases: Vec<Case> = vec![
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
            let got = decide(&s, sa(peer), orig.map(sa), &listeners, true);
            let want = match want {
                Ok((tenant, dst)) => Decision::Relay {
                    pod: s.pod_by_ip(sa(peer).ip()).cloned().unwrap(),
                    dst: sa(dst),
                    peer: None,
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

    #[test]
    fn mesh_routing_table() {
        let s = snap();
        let listeners = [sa("0.0.0.0:15001")];
        let id = |sa_: &str| Identity::new("cluster.local", "shop", sa_).unwrap();
        let web = s.pod_by_ip(sa("10.200.1.2:1").ip()).cloned().unwrap();
        let decide = |dst: &str, tunnel: bool| {
            decide(
                &s,
                sa("10.200.1.2:40000"),
                Some(sa(dst)),
                &listeners,
                tunnel,
            )
        };
        // same-node meshed: direct, but the destination identity is known
        assert_eq!(
            decide("[fdfe:200:2::2]:5432", true),
            Decision::Relay {
                pod: web.clone(),
                dst: sa("[fdfe:200:2::2]:5432"),
                peer: Some(id("db")),
            }
        );
        // remote meshed: through the tunnel to its node's 15008
        assert_eq!(
            decide("10.200.9.2:8080", true),
            Decision::Tunnel {
                pod: web.clone(),
                dst: sa("10.200.9.2:8080"),
                peer: crate::tunnel::client::RemotePeer {
                    identity: id("api"),
                    node: sa("192.168.0.2:15008"),
                },
            }
        );
        // remote meshed with no known node address: refused, never sent in the clear
        assert_eq!(
            decide("10.200.8.2:8080", true),
            Decision::Refuse(Refusal::NoTunnelPeer)
        );
        // without a tunnel, remote pods are plain destinations
        assert_eq!(
            decide("10.200.9.2:8080", false),
            Decision::Relay {
                pod: web.clone(),
                dst: sa("10.200.9.2:8080"),
                peer: None,
            }
        );
        // non-mesh: plain passthrough
        assert_eq!(
            decide("1.1.1.1:443", true),
            Decision::Relay {
                pod: web,
                dst: sa("1.1.1.1:443"),
                peer: None,
            }
        );
    }

    trait Tap: Sized {
        fn tap(self, f: impl FnOnce(&Self)) -> Self {
            f(&self);
            self
        }
    }
    impl Tap for Decision {}
}
