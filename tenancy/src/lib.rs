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

use std::fmt;
use std::hash::Hash;

pub use admission::{Admission, Limits, Rejection};
pub use cpu::{CpuControl, Mechanism};
pub use pool::{DRAIN_TIMEOUT, Isolation, Pool, PoolStats, Pools, TenantConfig};

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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::mpsc as std_mpsc;
    use std::time::{Duration, Instant};

    fn wait_until(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "condition not met in 5 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn wanted(keys: &[&str]) -> BTreeMap<String, TenantConfig> {
        keys.iter()
            .map(|k| ((*k).to_owned(), TenantConfig::default()))
            .collect()
    }

    #[test]
    fn each_tenant_runs_on_its_own_thread() {
        let pools: Pools<String> = Pools::new();
        let (tx, rx) = std_mpsc::channel();
        for t in ["a", "b", "a"] {
            let pool = pools.get_or_create(&t.to_owned()).unwrap();
            let tx = tx.clone();
            pool.spawn(move || async move {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                tx.send((t, name)).unwrap();
            })
            .unwrap();
        }
        let mut seen: Vec<(&str, String)> = (0..3).map(|_| rx.recv().unwrap()).collect();
        seen.sort();
        assert_eq!(seen[0].1, seen[1].1, "tenant a's jobs share a's thread");
        assert_ne!(seen[0].1, seen[2].1, "tenant b has a thread of its own");
        assert!(seen.iter().all(|(_, n)| n.starts_with("np-pool-")));
        assert_eq!(pools.keys(), vec!["a".to_owned(), "b".to_owned()]);
        wait_until(|| {
            pools
                .stats()
                .iter()
                .all(|(_, s)| s.tids.iter().all(|t| *t > 0) && s.active == 0)
        });
        let stats: BTreeMap<_, _> = pools.stats().into_iter().collect();
        assert_eq!(stats["a"].spawned, 2);
        assert_ne!(stats["a"].tids, stats["b"].tids);
        assert!(
            stats["a"].cpu_seconds.is_some(),
            "own threads are accounted"
        );
        pools.shutdown();
        assert!(pools.keys().is_empty());
    }

    #[test]
    fn shared_mode_runs_every_tenant_on_the_same_threads() {
        let pools: Pools<String> = Pools::with(Isolation::Shared(2), CpuControl::none()).unwrap();
        let (tx, rx) = std_mpsc::channel();
        for t in ["a", "b", "c", "d"] {
            let tx = tx.clone();
            pools
                .get_or_create(&t.to_owned())
                .unwrap()
                .spawn(move || async move {
                    tx.send(std::thread::current().name().unwrap_or("").to_owned())
                        .unwrap();
                })
                .unwrap();
        }
        let names: std::collections::BTreeSet<String> =
            (0..4).map(|_| rx.recv().unwrap()).collect();
        assert!(
            names.iter().all(|n| n.starts_with("np-shared-")),
            "{names:?}"
        );
        assert!(names.len() <= 2);
        let stats: BTreeMap<_, _> = pools.stats().into_iter().collect();
        assert_eq!(
            stats["a"].cpu_seconds, None,
            "shared threads cannot be charged to one tenant"
        );
        pools.shutdown();
    }

    #[test]
    fn a_panicking_job_hurts_no_other_job() {
        let pools: Pools<String> = Pools::new();
        let noisy = pools.get_or_create(&"noisy".to_owned()).unwrap();
        let quiet = pools.get_or_create(&"quiet".to_owned()).unwrap();
        for _ in 0..20 {
            noisy
                .spawn(|| async { panic!("bug in the noisy tenant") })
                .unwrap();
            // A panic while *making* the future is caught too.
            noisy
                .spawn(|| -> std::future::Ready<()> { panic!("bug before the future") })
                .unwrap();
        }
        let (tx, rx) = std_mpsc::channel();
        for i in 0..20 {
            let tx1 = tx.clone();
            quiet
                .spawn(move || async move { tx1.send(i).unwrap() })
                .unwrap();
            let tx2 = tx.clone();
            // The noisy pool itself keeps serving after its panics.
            noisy
                .spawn(move || async move { tx2.send(100 + i).unwrap() })
                .unwrap();
        }
        let got: Vec<i32> = (0..40).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(got.len(), 40);
        wait_until(|| noisy.stats().panics == 40);
        assert_eq!(quiet.stats().panics, 0);
    }

    #[test]
    fn a_stuck_tenant_slows_only_itself() {
        let pools: Pools<String> = Pools::new();
        let stuck = pools.get_or_create(&"stuck".to_owned()).unwrap();
        let quick = pools.get_or_create(&"quick".to_owned()).unwrap();
        let (started_tx, started_rx) = std_mpsc::channel();
        // A blocking call (the worst thing a job can do) holds stuck's thread for 2 s...
        stuck
            .spawn(move || async move {
                started_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_secs(2));
            })
            .unwrap();
        started_rx.recv().unwrap();
        // ...while quick's jobs still run at once, each within well under that.
        let (tx, rx) = std_mpsc::channel();
        let begin = Instant::now();
        for i in 0..50 {
            let tx = tx.clone();
            quick
                .spawn(move || async move { tx.send(i).unwrap() })
                .unwrap();
        }
        for _ in 0..50 {
            rx.recv_timeout(Duration::from_secs(1)).unwrap();
        }
        assert!(
            begin.elapsed() < Duration::from_secs(1),
            "quick waited for stuck"
        );
        pools.shutdown();
    }

    #[test]
    fn the_supervisor_restarts_a_dead_worker() {
        let pools: Pools<String> = Pools::new();
        let pool = pools.get_or_create(&"t".to_owned()).unwrap();
        wait_until(|| pool.stats().tids[0] > 0);
        let old_tid = pool.stats().tids[0];
        pool.kill_worker_for_test();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut restarted = Vec::new();
        while restarted.is_empty() && Instant::now() < deadline {
            restarted = pools.supervise();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(restarted, vec!["t".to_owned()]);
        assert_eq!(pool.stats().restarts, 1);
        let (tx, rx) = std_mpsc::channel();
        pool.spawn(move || async move { tx.send(()).unwrap() })
            .unwrap();
        rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert_ne!(pool.stats().tids[0], old_tid);
        assert!(pools.supervise().is_empty(), "a healthy pool is left alone");
    }

    #[test]
    fn reconcile_creates_configures_and_drains() {
        let pools: Pools<String> = Pools::new();
        let (added, removed) = pools.reconcile(&wanted(&["a", "b"])).unwrap();
        assert_eq!(added, vec!["a".to_owned(), "b".to_owned()]);
        assert!(removed.is_empty());
        let a = pools.get(&"a".to_owned()).unwrap();
        let mut want2 = wanted(&["b", "c"]);
        want2.insert(
            "b".to_owned(),
            TenantConfig {
                weight: 400,
                limits: Limits {
                    max_connections: Some(1),
                    ..Limits::default()
                },
            },
        );
        let (added, removed) = pools.reconcile(&want2).unwrap();
        assert_eq!(added, vec!["c".to_owned()]);
        assert_eq!(removed, vec!["a".to_owned()]);
        assert!(pools.get(&"a".to_owned()).is_none());
        // A stale handle (held by a connection in flight) sees the pool closed.
        assert!(matches!(
            a.spawn(|| async {}),
            Err(Error::Closed { tenant }) if tenant == "a"
        ));
        // New limits apply to the existing pool at once.
        let b = pools.get(&"b".to_owned()).unwrap();
        assert_eq!(b.stats().weight, 400);
        let _held = b.admit(0).unwrap();
        assert_eq!(b.admit(0).unwrap_err(), Rejection::Connections);
        // ...and only to it.
        let c = pools.get(&"c".to_owned()).unwrap();
        let _c1 = c.admit(0).unwrap();
        let _c2 = c.admit(0).unwrap();
        pools.shutdown();
    }

    #[test]
    fn a_service_runs_uncounted_restarts_with_its_worker_and_stops_with_its_pool() {
        let pools: Pools<String> = Pools::new();
        pools.reconcile(&wanted(&["a"])).unwrap();
        let pool = pools.get(&"a".to_owned()).unwrap();
        // Each start of the service reports its thread; its drop-guard reports its end.
        struct Stopped(std_mpsc::Sender<&'static str>);
        impl Drop for Stopped {
            fn drop(&mut self) {
                let _ = self.0.send("stopped");
            }
        }
        let (tx, rx) = std_mpsc::channel();
        let service_tx = std::sync::Mutex::new(tx);
        pool.spawn_service(move || {
            let tx = service_tx.lock().unwrap().clone();
            async move {
                let _stopped = Stopped(tx.clone());
                tx.send(
                    if std::thread::current()
                        .name()
                        .unwrap_or("")
                        .starts_with("np-pool-")
                    {
                        "started on the pool's thread"
                    } else {
                        "started elsewhere"
                    },
                )
                .unwrap();
                std::future::pending::<()>().await;
            }
        })
        .unwrap();
        let recv = || rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(recv(), "started on the pool's thread");
        let stats = pool.stats();
        assert_eq!(
            (stats.spawned, stats.active),
            (0, 0),
            "a service is not a job"
        );

        // A dead worker takes the service with it; the restarted one runs it again.
        pool.kill_worker_for_test();
        assert_eq!(recv(), "stopped");
        wait_until(|| !pools.supervise().is_empty());
        assert_eq!(recv(), "started on the pool's thread");

        // Removing the tenant stops its service at once (not after the drain timeout).
        let begin = Instant::now();
        pools.reconcile(&BTreeMap::new()).unwrap();
        assert_eq!(recv(), "stopped");
        assert!(begin.elapsed() < DRAIN_TIMEOUT, "{:?}", begin.elapsed());
        assert!(matches!(
            pool.spawn_service(|| async {}),
            Err(Error::Closed { tenant }) if tenant == "a"
        ));

        // Shared workers outlive every pool, so they run no services.
        let shared: Pools<String> = Pools::with(Isolation::Shared(1), CpuControl::none()).unwrap();
        let err = shared
            .get_or_create(&"s".to_owned())
            .unwrap()
            .spawn_service(|| async {})
            .unwrap_err();
        assert!(matches!(err, Error::SharedWorkers { .. }), "{err}");
        assert!(err.to_string().contains("per-tenant"), "{err}");
        shared.shutdown();
        pools.shutdown();
    }
}
