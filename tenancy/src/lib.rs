//! Per-tenant pools: everything that runs on behalf of one tenant.
//!
//! A [`Pool`] is one tenant's share of the daemon: its worker thread (running its own
//! single-threaded tokio runtime, placed by [`cpu::CpuControl`] in a per-tenant CPU cgroup with
//! the tenant's weight, so the kernel scheduler divides CPU between tenants), its admission
//! limits ([`admission`]) and its counters. Work is handed to a pool as a *job*: a `Send`
//! closure called on the pool's thread that returns the future to run there, so sockets and
//! timers the job creates belong to the pool's own reactor. [`Pools`] maps tenant keys to pools,
//! creates them on demand, reconciles weights and limits, drains removed ones and restarts
//! dead workers. A panic inside one job is caught at the job boundary and counted.
//!
//! Must not touch: sockets (tenancy opens none), certificates, Kubernetes, configuration files
//! or the environment. It is generic over the tenant key and knows nothing of identities.

pub mod admission;
pub mod cpu;
mod pool;
mod pools;
mod sync;
mod worker;

use std::fmt;
use std::hash::Hash;

pub use admission::{Admission, Limits, Rejection};
pub use cpu::{CpuControl, Mechanism};
pub use pool::{Pool, PoolStats, TenantConfig};
pub use pools::{Isolation, Pools};
pub use worker::DRAIN_TIMEOUT;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pool's OS thread or runtime could not be created.
    #[error("cannot start the pool for tenant {tenant}: {source}")]
    Start {
        /// The tenant whose pool failed to start.
        tenant: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The pool is draining or gone; it takes no new work.
    #[error("the pool for tenant {tenant} is closed and takes no new work")]
    Closed {
        /// The tenant whose pool is closed.
        tenant: String,
    },
    /// A service needs a worker of the tenant's own ([`Isolation::PerTenant`]).
    #[error(
        "the pool for tenant {tenant} runs on shared workers (isolation: shared); services need \
         a worker of the tenant's own (isolation: per-tenant)"
    )]
    SharedWorkers {
        /// The tenant whose pool has no worker of its own.
        tenant: String,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a tenant key must be: cheap to clone, ordered, printable (for thread names and logs).
pub trait TenantKey: Clone + Eq + Hash + Ord + fmt::Display + Send + Sync + 'static {}
impl<T: Clone + Eq + Hash + Ord + fmt::Display + Send + Sync + 'static> TenantKey for T {}

#[cfg(test)]
mod test_support {
    use std::time::{Duration, Instant};

    /// Polls `f` until it holds; panics after 5 s.
    pub(crate) fn wait_until(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "condition not met in 5 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
