//! Per-tenant pools: everything that runs on behalf of one tenant.
//!
//! A [`Pool`] owns one OS thread running its own single-threaded tokio runtime. Work is handed
//! to a pool as a *job*: a `Send` closure that is called on the pool's thread and returns the
//! future to run there, so sockets and timers the job creates are registered with the pool's
//! own reactor and the kernel scheduler, not a shared task queue, divides CPU between tenants.
//! [`Pools`] maps tenant keys to pools, creates them on demand and drains removed ones.
//!
//! A panic inside one job is caught at the job boundary, counted and logged; the pool's thread
//! and every other job keep running.
//!
//! Must not touch: sockets (tenancy opens none), certificates, Kubernetes, configuration files
//! or the environment. It is generic over the tenant key and knows nothing of identities.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

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
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a tenant key must be: cheap to clone, ordered, printable (for thread names and logs).
pub trait TenantKey: Clone + Eq + Hash + Ord + fmt::Display + Send + Sync + 'static {}
impl<T: Clone + Eq + Hash + Ord + fmt::Display + Send + Sync + 'static> TenantKey for T {}

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
type Job = Box<dyn FnOnce() -> LocalFuture + Send>;

/// Counters of one pool, readable from any thread.
#[derive(Debug, Default)]
struct Counters {
    spawned: AtomicU64,
    active: AtomicI64,
    panics: AtomicU64,
    tid: AtomicI64,
}

/// A point-in-time copy of a pool's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Jobs handed to the pool since it started.
    pub spawned: u64,
    /// Jobs currently running.
    pub active: i64,
    /// Jobs that panicked (caught; the pool kept running).
    pub panics: u64,
    /// The kernel thread id of the pool's runtime thread (0 until it has started).
    pub tid: i64,
}

/// A handle to one tenant's pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    tenant: String,
    tx: mpsc::UnboundedSender<Job>,
    counters: Arc<Counters>,
    /// Set when the pool is removed; wakes the pool's receive loop even while handles live.
    closed: Arc<tokio::sync::Notify>,
    is_closed: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("tenant", &self.inner.tenant)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Pool {
    fn start(tenant: String, index: usize) -> Result<(Pool, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::unbounded_channel::<Job>();
        let counters = Arc::new(Counters::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::Start {
                tenant: tenant.clone(),
                source,
            })?;
        let closed = Arc::new(tokio::sync::Notify::new());
        let thread_counters = counters.clone();
        let thread_tenant = tenant.clone();
        let thread_closed = closed.clone();
        let thread = std::thread::Builder::new()
            .name(format!("np-pool-{index}"))
            .spawn(move || run_pool(runtime, rx, thread_closed, thread_counters, thread_tenant))
            .map_err(|source| Error::Start {
                tenant: tenant.clone(),
                source,
            })?;
        let pool = Pool {
            inner: Arc::new(PoolInner {
                tenant,
                tx,
                counters,
                closed,
                is_closed: false.into(),
            }),
        };
        Ok((pool, thread))
    }

    /// The tenant this pool serves, as text.
    pub fn tenant(&self) -> &str {
        &self.inner.tenant
    }

    /// Hands a job to the pool. `make` is called on the pool's own thread, inside its runtime,
    /// and the future it returns runs there to completion. A panic in either is caught and
    /// counted; it does not stop the pool.
    pub fn spawn<F, Fut>(&self, make: F) -> Result<()>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let closed = || Error::Closed {
            tenant: self.inner.tenant.clone(),
        };
        if self.inner.is_closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let job: Job = Box::new(move || Box::pin(make()) as LocalFuture);
        self.inner.tx.send(job).map_err(|_| closed())?;
        self.inner.counters.spawned.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Stops taking new work; running jobs get [`DRAIN_TIMEOUT`] to finish, then the pool's
    /// thread exits. Jobs already queued still run.
    pub fn close(&self) {
        self.inner.is_closed.store(true, Ordering::Release);
        self.inner.closed.notify_one();
    }

    /// A copy of the pool's counters.
    pub fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        PoolStats {
            spawned: c.spawned.load(Ordering::Relaxed),
            active: c.active.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
            tid: c.tid.load(Ordering::Relaxed),
        }
    }
}

/// The body of a pool's thread: receive jobs, run each as a local task, and on close wait
/// (bounded) for running jobs to finish.
fn run_pool(
    runtime: tokio::runtime::Runtime,
    mut rx: mpsc::UnboundedReceiver<Job>,
    closed: Arc<tokio::sync::Notify>,
    counters: Arc<Counters>,
    tenant: String,
) {
    counters.tid.store(current_tid(), Ordering::Relaxed);
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        loop {
            let job = tokio::select! {
                biased;
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                () = closed.notified() => {
                    // Run what was queued before the close, then drain.
                    rx.close();
                    continue;
                }
            };
            let counters = counters.clone();
            let tenant = tenant.clone();
            tokio::task::spawn_local(async move {
                counters.active.fetch_add(1, Ordering::Relaxed);
                let _active = ActiveGuard(&counters);
                let outcome = match std::panic::catch_unwind(AssertUnwindSafe(job)) {
                    Ok(fut) => CatchUnwind(fut).await,
                    Err(panic) => Err(panic),
                };
                if let Err(panic) = outcome {
                    counters.panics.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        tenant = %tenant,
                        panic = panic_message(&panic),
                        "a job panicked; the pool keeps running"
                    );
                }
            });
        }
        // Closed, or every handle is gone: the pool is draining. Give running jobs a bounded time.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while counters.active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// How long a removed pool waits for its running jobs before dropping them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

struct ActiveGuard<'a>(&'a Counters);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Polls a future inside `catch_unwind`, so a panic ends only this job.
struct CatchUnwind(LocalFuture);

impl Future for CatchUnwind {
    type Output = std::thread::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(())) => Poll::Ready(Ok(())),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// The kernel thread id of the calling thread, from `/proc/thread-self` (no syscall wrapper
/// needed); 0 where procfs is not mounted.
fn current_tid() -> i64 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// All pools of the node, keyed by tenant.
pub struct Pools<K: TenantKey> {
    pools: RwLock<BTreeMap<K, Entry>>,
    next_index: AtomicU64,
}

struct Entry {
    pool: Pool,
    thread: std::thread::JoinHandle<()>,
}

impl<K: TenantKey> fmt::Debug for Pools<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pools")
            .field("tenants", &self.keys().len())
            .finish()
    }
}

impl<K: TenantKey> Default for Pools<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: TenantKey> Pools<K> {
    /// An empty set of pools.
    pub fn new() -> Self {
        Self {
            pools: RwLock::new(BTreeMap::new()),
            next_index: AtomicU64::new(0),
        }
    }

    /// The pool of `tenant`, if it exists.
    pub fn get(&self, tenant: &K) -> Option<Pool> {
        read(&self.pools).get(tenant).map(|e| e.pool.clone())
    }

    /// The pool of `tenant`, created (with its thread) if it does not exist yet.
    pub fn get_or_create(&self, tenant: &K) -> Result<Pool> {
        if let Some(pool) = self.get(tenant) {
            return Ok(pool);
        }
        let mut pools = write(&self.pools);
        if let Some(e) = pools.get(tenant) {
            return Ok(e.pool.clone());
        }
        let index = self.next_index.fetch_add(1, Ordering::Relaxed) as usize;
        let (pool, thread) = Pool::start(tenant.to_string(), index)?;
        tracing::info!(tenant = %tenant, thread = format!("np-pool-{index}"), "pool started");
        pools.insert(
            tenant.clone(),
            Entry {
                pool: pool.clone(),
                thread,
            },
        );
        Ok(pool)
    }

    /// Makes the set of pools match `wanted`: creates missing pools and drains pools whose
    /// tenant is no longer wanted (running jobs get [`DRAIN_TIMEOUT`] to finish, in the
    /// background). Returns the tenants added and removed.
    pub fn reconcile<'a>(
        &self,
        wanted: impl IntoIterator<Item = &'a K>,
    ) -> Result<(Vec<K>, Vec<K>)> {
        let wanted: std::collections::BTreeSet<&K> = wanted.into_iter().collect();
        let mut added = Vec::new();
        for tenant in &wanted {
            if self.get(tenant).is_none() {
                self.get_or_create(tenant)?;
                added.push((*tenant).clone());
            }
        }
        let removed: Vec<K> = {
            let mut pools = write(&self.pools);
            let gone: Vec<K> = pools
                .keys()
                .filter(|k| !wanted.contains(k))
                .cloned()
                .collect();
            for k in &gone {
                if let Some(entry) = pools.remove(k) {
                    tracing::info!(tenant = %k, "pool draining: its last pod left");
                    // The thread drains and exits on its own; nobody needs to join it.
                    entry.pool.close();
                    drop(entry.thread);
                }
            }
            gone
        };
        Ok((added, removed))
    }

    /// The tenants that have a pool.
    pub fn keys(&self) -> Vec<K> {
        read(&self.pools).keys().cloned().collect()
    }

    /// Every pool's counters.
    pub fn stats(&self) -> Vec<(K, PoolStats)> {
        read(&self.pools)
            .iter()
            .map(|(k, e)| (k.clone(), e.pool.stats()))
            .collect()
    }

    /// Closes every pool and waits (bounded by [`DRAIN_TIMEOUT`] per pool) for their threads.
    pub fn shutdown(&self) {
        let entries: Vec<Entry> = std::mem::take(&mut *write(&self.pools))
            .into_values()
            .collect();
        let threads: Vec<_> = entries
            .into_iter()
            .map(|e| {
                e.pool.close();
                e.thread
            })
            .collect();
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a pool thread panicked while draining");
            }
        }
    }
}

// A poisoned lock only means another thread panicked while holding it; the map itself is
// always left consistent (single inserts and removes), so keep serving.
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::mpsc as std_mpsc;

    fn wait_until(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "condition not met in 5 s");
            std::thread::sleep(Duration::from_millis(5));
        }
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
                .all(|(_, s)| s.tid > 0 && s.active == 0)
        });
        let stats: BTreeMap<_, _> = pools.stats().into_iter().collect();
        assert_eq!(stats["a"].spawned, 2);
        assert_ne!(stats["a"].tid, stats["b"].tid);
        pools.shutdown();
        assert!(pools.keys().is_empty());
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
        let mut got: Vec<i32> = (0..40).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got.len(), 40);
        wait_until(|| noisy.stats().panics == 40);
        assert_eq!(quiet.stats().panics, 0);
    }

    #[test]
    fn reconcile_creates_and_drains() {
        let pools: Pools<String> = Pools::new();
        let want1 = ["a".to_owned(), "b".to_owned()];
        let (added, removed) = pools.reconcile(&want1).unwrap();
        assert_eq!(added, want1.to_vec());
        assert!(removed.is_empty());
        let a = pools.get(&"a".to_owned()).unwrap();
        let want2 = ["b".to_owned(), "c".to_owned()];
        let (added, removed) = pools.reconcile(&want2).unwrap();
        assert_eq!(added, vec!["c".to_owned()]);
        assert_eq!(removed, vec!["a".to_owned()]);
        assert!(pools.get(&"a".to_owned()).is_none());
        // A stale handle (held by a connection in flight) sees the pool closed.
        assert!(matches!(
            a.spawn(|| async {}),
            Err(Error::Closed { tenant }) if tenant == "a"
        ));
        pools.shutdown();
    }
}
