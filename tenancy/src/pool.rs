//! One tenant's pool: the handle the data path holds.
//!
//! Owns [`Pool`] (hand it jobs and services, admit work against the tenant's own limits, read
//! its counters as [`PoolStats`]) and [`TenantConfig`] (its weight and limits). A pool runs on a
//! worker of its own ([`crate::Isolation::PerTenant`]) or on workers it shares with every other
//! tenant ([`crate::Isolation::Shared`]); only its own worker is re-weighed, closed, replaced
//! after a death and joined through it. The crate-private methods below are the levers
//! [`crate::Pools`] pulls; a pool never creates, places or restarts a worker by itself.
//!
//! Must not touch: other tenants' pools, the map of pools, sockets, the environment.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::admission::{Admission, Gate, Limits, Rejection};
use crate::cpu::{self, CpuControl, DEFAULT_WEIGHT};
use crate::sync::{lock, read, write};
use crate::worker::{Counters, Job, LocalFuture, Service, Worker};
use crate::{Error, Result};

/// A tenant's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantConfig {
    /// CPU weight (cgroup v2 scale: 1..=10000, default 100).
    pub weight: u32,
    /// Admission limits.
    pub limits: Limits,
}

impl Default for TenantConfig {
    fn default() -> Self {
        Self {
            weight: DEFAULT_WEIGHT,
            limits: Limits::default(),
        }
    }
}

/// A point-in-time copy of a pool's counters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PoolStats {
    /// Jobs handed to the pool since it started.
    pub spawned: u64,
    /// Jobs running now.
    pub active: i64,
    /// Jobs that panicked (caught; the pool kept running).
    pub panics: u64,
    /// Times the supervisor restarted the pool's worker.
    pub restarts: u64,
    /// Kernel thread ids of the pool's worker threads (0 until started).
    pub tids: Vec<i64>,
    /// CPU seconds used by the pool's own threads (kernel accounting); `None` when its
    /// threads are shared with other tenants.
    pub cpu_seconds: Option<f64>,
    /// Admitted work items holding a slot now.
    pub admitted: u64,
    /// Work items admitted since the pool started.
    pub admitted_total: u64,
    /// Buffer bytes charged now.
    pub buffer_bytes: u64,
    /// Refusals so far, by reason.
    pub rejected: Vec<(Rejection, u64)>,
    /// The CPU weight in force.
    pub weight: u32,
}

/// A handle to one tenant's pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    tenant: String,
    slug: String,
    counters: Arc<Counters>,
    gate: Arc<Gate>,
    weight: AtomicU64,
    /// One worker of its own (per-tenant mode) or the shared workers.
    workers: RwLock<Vec<Arc<Worker>>>,
    own_workers: bool,
    next: AtomicUsize,
    closed: AtomicBool,
    /// Started on the pool's worker, and again on the new one after a restart.
    services: Mutex<Vec<Service>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("tenant", &self.inner.tenant)
            .finish()
    }
}

impl Pool {
    /// The tenant this pool serves, as text.
    pub fn tenant(&self) -> &str {
        &self.inner.tenant
    }

    /// Admits one unit of new work that will hold `buffer_bytes` of buffers, against this
    /// tenant's own limits only. Keep the [`Admission`] alive as long as the work runs.
    pub fn admit(&self, buffer_bytes: u64) -> std::result::Result<Admission, Rejection> {
        self.inner.gate.admit(buffer_bytes)
    }

    /// Hands a job to the pool. `make` is called on one of the pool's worker threads, inside
    /// its runtime, and the future it returns runs there to completion. A panic in either is
    /// caught and counted; it does not stop the pool.
    pub fn spawn<F, Fut>(&self, make: F) -> Result<()>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let closed = || Error::Closed {
            tenant: self.inner.tenant.clone(),
        };
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let job: Job = Box::new(move || Box::pin(make()) as LocalFuture);
        let worker = {
            let workers = read(&self.inner.workers);
            let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % workers.len().max(1);
            workers.get(i).cloned().ok_or_else(closed)?
        };
        if !worker.send(job, self.inner.counters.clone()) {
            return Err(closed());
        }
        self.inner.counters.spawned.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `make`'s future on the pool's worker for as long as the pool lives: the tenant's own
    /// listener, for instance. A service is not a job: it is not counted in the stats, and the
    /// drain does not wait for it; it stops when the pool closes. When the supervisor restarts
    /// a dead worker, `make` is called again on the new one (so keep the listener itself
    /// outside and hand the service a clone of it). A panic ends only the service.
    pub fn spawn_service<F, Fut>(&self, make: F) -> Result<()>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let closed = || Error::Closed {
            tenant: self.inner.tenant.clone(),
        };
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        if !self.inner.own_workers {
            return Err(Error::SharedWorkers {
                tenant: self.inner.tenant.clone(),
            });
        }
        let service: Service = Arc::new(move || Box::pin(make()) as LocalFuture);
        let worker = read(&self.inner.workers)
            .first()
            .cloned()
            .ok_or_else(closed)?;
        lock(&self.inner.services).push(service.clone());
        if !worker.send_service(service) {
            return Err(closed());
        }
        Ok(())
    }

    /// A copy of the pool's counters.
    pub fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        let g = &self.inner.gate;
        let tids: Vec<i64> = read(&self.inner.workers).iter().map(|w| w.tid()).collect();
        let cpu_seconds = self.inner.own_workers.then(|| {
            tids.iter()
                .filter_map(|t| cpu::thread_cpu_seconds(*t))
                .sum()
        });
        PoolStats {
            spawned: c.spawned.load(Ordering::Relaxed),
            active: c.active.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
            restarts: c.restarts.load(Ordering::Relaxed),
            tids,
            cpu_seconds,
            admitted: g.open(),
            admitted_total: g.admitted_total(),
            buffer_bytes: g.buffer_bytes(),
            rejected: [Rejection::Connections, Rejection::Rate, Rejection::Buffers]
                .into_iter()
                .map(|r| (r, g.rejected(r)))
                .collect(),
            weight: self.weight(),
        }
    }

    #[cfg(any(test, feature = "test-util"))]
    /// Makes the pool's worker thread die outside any job, as a runtime bug would (tests of
    /// the supervisor).
    pub fn kill_worker_for_test(&self) {
        if let Some(w) = read(&self.inner.workers).first() {
            w.kill_for_test();
        }
    }

    /// A new pool on `workers`: one of its own (`own_workers`) or the shared ones.
    pub(crate) fn new(
        tenant: String,
        slug: String,
        workers: Vec<Arc<Worker>>,
        own_workers: bool,
        config: TenantConfig,
    ) -> Pool {
        let gate = Arc::new(Gate::default());
        gate.set_limits(config.limits);
        Pool {
            inner: Arc::new(PoolInner {
                tenant,
                slug,
                counters: Arc::new(Counters::default()),
                gate,
                weight: AtomicU64::new(u64::from(config.weight)),
                workers: RwLock::new(workers),
                own_workers,
                next: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                services: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The pool's CPU group name.
    pub(crate) fn slug(&self) -> &str {
        &self.inner.slug
    }

    /// The CPU weight in force.
    pub(crate) fn weight(&self) -> u32 {
        self.inner.weight.load(Ordering::Relaxed) as u32
    }

    /// Whether the pool has a worker of its own (and so a CPU group).
    pub(crate) fn owns_workers(&self) -> bool {
        self.inner.own_workers
    }

    /// Applies new limits at once, and a new weight to the pool's own started threads.
    pub(crate) fn configure(&self, config: TenantConfig, cpu: &CpuControl) {
        self.inner.gate.set_limits(config.limits);
        let old = self
            .inner
            .weight
            .swap(u64::from(config.weight), Ordering::Relaxed);
        if old == u64::from(config.weight) || !self.inner.own_workers {
            return;
        }
        for w in read(&self.inner.workers).iter() {
            let tid = w.tid();
            // Not started yet: it places itself (with the weight it was started with). Writing
            // tid 0 to a v1 `tasks` file would move the calling thread instead.
            if tid == 0 {
                continue;
            }
            if let Err(e) = cpu.place(&self.inner.slug, tid, config.weight) {
                tracing::warn!(tenant = %self.inner.tenant, error = %e, "cannot change the CPU weight");
            }
        }
    }

    /// Stops taking new work; running jobs get [`crate::DRAIN_TIMEOUT`] to finish.
    pub(crate) fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        // The services hold handles to this pool; dropping them here breaks that cycle.
        lock(&self.inner.services).clear();
        if self.inner.own_workers {
            for w in read(&self.inner.workers).iter() {
                w.close();
            }
        }
    }

    /// Whether the pool's own, still open, worker has died and needs a replacement.
    pub(crate) fn needs_restart(&self) -> bool {
        self.inner.own_workers
            && !self.inner.closed.load(Ordering::Acquire)
            && read(&self.inner.workers).iter().any(|w| w.is_dead())
    }

    /// Puts `worker` in place of the dead one: starts the pool's services on it, joins the
    /// old thread and counts the restart.
    pub(crate) fn replace_worker(&self, worker: Arc<Worker>) {
        for service in lock(&self.inner.services).iter() {
            worker.send_service(service.clone());
        }
        let old = std::mem::replace(&mut *write(&self.inner.workers), vec![worker]);
        for w in old {
            w.join();
        }
        self.inner.counters.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits for the pool's own worker threads to end (after [`Pool::close`]); shared
    /// workers are left alone.
    pub(crate) fn join_workers(&self) {
        if self.inner.own_workers {
            for w in read(&self.inner.workers).iter() {
                w.join();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::test_support::wait_until;
    use crate::{DRAIN_TIMEOUT, Isolation, Pools};
    use std::collections::BTreeMap;
    use std::sync::mpsc as std_mpsc;
    use std::time::{Duration, Instant};

    #[test]
    fn a_panicking_job_is_counted_in_its_own_pool_only() {
        let pools: Pools<String> = Pools::new();
        let noisy = pools.get_or_create(&"noisy".to_owned()).unwrap();
        let quiet = pools.get_or_create(&"quiet".to_owned()).unwrap();
        noisy
            .spawn(|| async { panic!("bug in the noisy tenant") })
            .unwrap();
        noisy
            .spawn(|| -> std::future::Ready<()> { panic!("bug before the future") })
            .unwrap();
        let (tx, rx) = std_mpsc::channel();
        for pool in [&noisy, &quiet] {
            let tx = tx.clone();
            pool.spawn(move || async move { tx.send(()).unwrap() })
                .unwrap();
        }
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        wait_until(|| noisy.stats().panics == 2 && noisy.stats().active == 0);
        assert_eq!((noisy.stats().spawned, quiet.stats().spawned), (3, 1));
        assert_eq!(quiet.stats().panics, 0);
        pools.shutdown();
    }

    #[test]
    fn a_service_runs_uncounted_restarts_with_its_worker_and_stops_with_its_pool() {
        let pools: Pools<String> = Pools::new();
        pools
            .reconcile(&BTreeMap::from([("a".to_owned(), TenantConfig::default())]))
            .unwrap();
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
