//! Each tenant's own transparent listeners. With TPROXY and per-tenant isolation, the capture
//! rules' `pod_port` maps deliver a pod's captured connections to a listener of its tenant's
//! own, and that listener is accepted on the tenant's pool thread ([`tenancy::Pool::spawn_service`]).
//! So from the SYN on, a tenant's connections wait only for the tenant's own thread and CPU
//! share: a connection storm from one tenant fills only its own backlog, and no connection
//! waits for a shared accept thread.
//!
//! The shared listener (15001) stays as the fallback: for a pod whose tenant has no listener
//! yet, and for one whose listener is gone (TPROXY finds no socket on that port and the next
//! rule sends the connection to 15001). The listener socket outlives a crashed pool worker:
//! the restarted worker accepts on it again, and connections that arrived meanwhile wait in
//! its backlog.
//!
//! Whichever listener accepts, [`crate::outbound::decide`] identifies the pod by its source
//! address and the connection goes to that pod's tenant's pool: a stale map entry costs a
//! hand-off between threads, never a wrong identity. The app still removes a pod's entry before
//! its tenant's listener can close, so a freed port reused by another tenant's listener does not
//! receive it.
//!
//! Owns [`TenantListeners`]: opening a tenant's listeners when its pool appears, forgetting
//! them when it goes (the pool's close stops the service and closes the socket), and the
//! pod → port assignments the capture rules need. Must not touch: the rules (the app applies
//! them), the accept loop itself ([`crate::outbound::accept_loop`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};

use certs::Identity;
use tenancy::Pools;

use crate::metrics::Listener;
use crate::outbound::{self, Outbound};
use crate::state::Snapshot;

/// The tenants' own listeners.
#[derive(Debug)]
pub struct TenantListeners {
    /// The shared listeners' addresses: a tenant gets one listener per address family, on the
    /// same IP and a port the kernel picks.
    shared: Vec<SocketAddr>,
    ctx: Outbound,
    /// Each tenant's listening addresses.
    open: Mutex<BTreeMap<Identity, Vec<SocketAddr>>>,
}

impl TenantListeners {
    /// No listeners yet; `shared` are the shared outbound listeners' addresses.
    pub fn new(shared: &[SocketAddr], ctx: Outbound) -> Self {
        Self {
            shared: shared.to_vec(),
            ctx,
            open: Mutex::new(BTreeMap::new()),
        }
    }

    /// Opens listeners for every pool that has none and forgets those of tenants whose pool
    /// is gone. A tenant whose listener cannot be opened keeps using the shared listener
    /// (logged); that is slower to isolate, never wrong.
    pub fn sync(&self, pools: &Pools<Identity>) {
        let mut open = lock(&self.open);
        let tenants = pools.keys();
        open.retain(|t, _| tenants.contains(t));
        for tenant in tenants {
            if open.contains_key(&tenant) {
                continue;
            }
            let Some(pool) = pools.get(&tenant) else {
                continue;
            };
            match self.start(&pool) {
                Ok(addrs) => {
                    tracing::info!(%tenant, listeners = ?addrs, "tenant listeners open");
                    open.insert(tenant, addrs);
                }
                Err(e) => tracing::warn!(
                    %tenant, error = %e,
                    "cannot open the tenant's own listener; its pods' connections go through the shared one"
                ),
            }
        }
    }

    fn start(&self, pool: &tenancy::Pool) -> anyhow::Result<Vec<SocketAddr>> {
        // Bind every family first: a failure then leaves no service behind, and the next sync
        // tries again from scratch.
        let mut listeners = Vec::new();
        for shared in &self.shared {
            let addr = SocketAddr::new(shared.ip(), 0);
            match crate::app::bind_with(addr, true) {
                Ok(l) => listeners.push(Arc::new(Listening(l))),
                // Like the shared listener, a host without IPv6 still serves IPv4.
                Err(e) if addr.is_ipv6() && crate::app::is_no_ipv6(&e.source) => {}
                Err(e) => return Err(e.into_anyhow(addr, "a tenant listener")),
            }
        }
        let addrs = listeners
            .iter()
            .map(|l| l.0.local_addr())
            .collect::<std::io::Result<Vec<_>>>()?;
        for listener in listeners {
            let ctx = self.ctx.clone();
            pool.spawn_service(move || {
                // A new socket handle per worker (the first, or one the supervisor restarted);
                // the listening socket itself stays open in between.
                let listener = listener
                    .0
                    .try_clone()
                    .and_then(tokio::net::TcpListener::from_std);
                let ctx = ctx.clone();
                async move {
                    match listener {
                        Ok(l) => outbound::accept_loop(l, ctx, Listener::Tenant).await,
                        Err(e) => tracing::error!(error = %e, "cannot serve a tenant listener"),
                    }
                }
            })?;
        }
        Ok(addrs)
    }

    /// The capture port of every meshed pod of `snap` whose tenant has a listener of the
    /// pod's address family.
    pub fn pod_ports(&self, snap: &Snapshot) -> BTreeMap<IpAddr, NonZeroU16> {
        let open = lock(&self.open);
        snap.meshed_ips()
            .into_iter()
            .filter_map(|ip| {
                let pod = snap.pod_by_ip(ip)?;
                let port = open
                    .get(&pod.tenant)?
                    .iter()
                    .find(|a| a.is_ipv4() == ip.to_canonical().is_ipv4())?
                    .port();
                Some((ip, NonZeroU16::new(port)?))
            })
            .collect()
    }

    /// The listening addresses of `tenant`'s own listeners (empty: it uses the shared one).
    pub fn addrs(&self, tenant: &Identity) -> Vec<SocketAddr> {
        lock(&self.open).get(tenant).cloned().unwrap_or_default()
    }
}

/// A tenant's listening socket, which stops listening the moment its last handle goes (the
/// pool closed), not when the last copy of its fd is closed: a child the daemon forks to run
/// `nft` holds copies of every fd until it execs, and for those milliseconds a plain close
/// would leave the socket listening — a SYN TPROXY sent there would complete its handshake
/// and then be reset, accepted by nobody (seen in `redirect/tests/netns.rs`).
#[derive(Debug)]
struct Listening(std::net::TcpListener);

impl Drop for Listening {
    fn drop(&mut self) {
        // shutdown(2) on a listening socket stops it listening for every fd that shares it.
        let _ = socket2::SockRef::from(&self.0).shutdown(std::net::Shutdown::Both);
    }
}

// The map is left consistent by every writer; a poisoned lock only means a panic elsewhere.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_listener_stops_listening_while_a_copy_of_its_fd_lives_on() {
        let listener = crate::app::bind_with("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = listener.local_addr().unwrap();
        // What a forked child holds until it execs: another fd of the same socket.
        let copy = listener.try_clone().unwrap();
        drop(Listening(listener));
        let err = std::net::TcpStream::connect(addr).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        drop(copy);
    }
}
