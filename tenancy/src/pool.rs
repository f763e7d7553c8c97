//! Pools and the workers that run them.
//!
//! Owns [`Pools`], [`Pool`] and the private `Worker` (one OS thread running a single-threaded
//! tokio runtime with a `LocalSet`). In [`Isolation::PerTenant`] mode every tenant's pool has
//! a worker of its own, placed in the tenant's CPU group by [`CpuControl`]; in
//! [`Isolation::Shared`] mode all tenants' jobs are spread over one set of shared workers — the
//! model of a proxy with one shared runtime, kept so fairness can be measured with isolation
//! on and off in the same run.
//!
//! A job is a `Send` closure called on the worker's thread that returns the future to run
//! there; a panic in either is caught at the job boundary and counted. A service
//! ([`Pool::spawn_service`]) is a long-lived task of the pool (the tenant's own listener): not
//! counted, stopped when the pool closes. A supervisor pass ([`Pools::supervise`]) restarts a
//! tenant's worker whose thread died, and its services with it.
//!
//! Must not touch: sockets, identities, the environment.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::admission::{Admission, Gate, Limits, Rejection};
use crate::cpu::{self, CpuControl, DEFAULT_WEIGHT};
use crate::{Error, Result, TenantKey};

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
type Job = Box<dyn FnOnce() -> LocalFuture + Send>;
/// A pool's long-lived task (its own listener), started again on every new worker.
type Service = Arc<dyn Fn() -> LocalFuture + Send + Sync>;

/// What a worker is asked to run.
enum Work {
    /// A unit of a tenant's work, counted in its [`Counters`] and drained at close.
    Job(Job, Arc<Counters>),
    /// A service: not counted, not waited for; stopped when the worker is closed.
    Service(Service),
}

/// How long a removed pool waits for its running jobs before dropping them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How tenants' work is spread over threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// A worker thread per tenant, in the tenant's CPU group (the product).
    PerTenant,
    /// All tenants share this many worker threads (the comparison: no isolation).
    Shared(usize),
}

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

/// Counters of one tenant, readable from any thread.
#[derive(Debug, Default)]
struct Counters {
    spawned: AtomicU64,
    active: AtomicI64,
    panics: AtomicU64,
    restarts: AtomicU64,
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

/// One OS thread with a single-threaded runtime, running jobs as local tasks.
struct Worker {
    tx: mpsc::UnboundedSender<Work>,
    tid: Arc<AtomicI64>,
    closed: Arc<tokio::sync::Notify>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Worker {
    fn start(name: String, on_start: impl FnOnce(i64) + Send + 'static) -> Result<Arc<Worker>> {
        let start_err = |source| Error::Start {
            tenant: name.clone(),
            source,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(start_err)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let tid = Arc::new(AtomicI64::new(0));
        let closed = Arc::new(tokio::sync::Notify::new());
        let (t_tid, t_closed) = (tid.clone(), closed.clone());
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let me = current_tid();
                // Published once placed: whoever sees the tid sees the thread in its group.
                on_start(me);
                t_tid.store(me, Ordering::Release);
                run_worker(runtime, rx, t_closed);
            })
            .map_err(start_err)?;
        Ok(Arc::new(Worker {
            tx,
            tid,
            closed,
            thread: Mutex::new(Some(thread)),
        }))
    }

    fn send(&self, job: Job, counters: Arc<Counters>) -> bool {
        self.tx.send(Work::Job(job, counters)).is_ok()
    }

    fn send_service(&self, service: Service) -> bool {
        self.tx.send(Work::Service(service)).is_ok()
    }

    fn is_dead(&self) -> bool {
        lock(&self.thread).as_ref().is_some_and(|t| t.is_finished())
    }

    fn close(&self) {
        self.closed.notify_one();
    }

    fn join(&self) {
        let thread = lock(&self.thread).take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("a pool worker panicked while draining");
        }
    }
}

fn run_worker(
    runtime: tokio::runtime::Runtime,
    mut rx: mpsc::UnboundedReceiver<Work>,
    closed: Arc<tokio::sync::Notify>,
) {
    let running = Arc::new(AtomicI64::new(0));
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let mut services: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        loop {
            let work = tokio::select! {
                biased;
                work = rx.recv() => match work {
                    Some(work) => work,
                    None => break,
                },
                () = closed.notified() => {
                    // Services (the tenant's listener) take no new work once closed; what was
                    // queued before the close still runs, then the jobs drain.
                    for service in services.drain(..) {
                        service.abort();
                    }
                    rx.close();
                    continue;
                }
            };
            let (job, counters) = match work {
                Work::Job(job, counters) => (job, counters),
                Work::Service(service) => {
                    services.push(tokio::task::spawn_local(run_service(service)));
                    continue;
                }
            };
            #[cfg(any(test, feature = "test-util"))]
            if counters.spawned.load(Ordering::Relaxed) == u64::MAX {
                panic!("worker killed on purpose (test)");
            }
            let running = running.clone();
            tokio::task::spawn_local(run_job(job, counters, running));
        }
        for service in services {
            service.abort();
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while running.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Runs a service until it ends or its worker closes; a panic ends only the service.
async fn run_service(service: Service) {
    if let Err(panic) = run_caught(|| service()).await {
        tracing::error!(
            panic = panic_message(&panic),
            "a pool service panicked; it runs again only if the worker restarts"
        );
    }
}

async fn run_job(job: Job, counters: Arc<Counters>, running: Arc<AtomicI64>) {
    counters.active.fetch_add(1, Ordering::Relaxed);
    running.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(&counters, &running);
    if let Err(panic) = run_caught(job).await {
        counters.panics.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            panic = panic_message(&panic),
            "a job panicked; its pool keeps running"
        );
    }
}

/// Builds the future with `make` and runs it, catching a panic in either.
async fn run_caught(make: impl FnOnce() -> LocalFuture) -> std::thread::Result<()> {
    match std::panic::catch_unwind(AssertUnwindSafe(make)) {
        Ok(fut) => CatchUnwind(fut).await,
        Err(panic) => Err(panic),
    }
}

struct ActiveGuard<'a>(&'a Counters, &'a AtomicI64);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.1.fetch_sub(1, Ordering::Relaxed);
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

/// The kernel thread id of the calling thread, from `/proc/thread-self`; 0 without procfs.
fn current_tid() -> i64 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
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
        let tids: Vec<i64> = read(&self.inner.workers)
            .iter()
            .map(|w| w.tid.load(Ordering::Acquire))
            .collect();
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
            weight: self.inner.weight.load(Ordering::Relaxed) as u32,
        }
    }

    /// Stops taking new work; running jobs get [`DRAIN_TIMEOUT`] to finish.
    fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        // The services hold handles to this pool; dropping them here breaks that cycle.
        lock(&self.inner.services).clear();
        if self.inner.own_workers {
            for w in read(&self.inner.workers).iter() {
                w.close();
            }
        }
    }

    #[cfg(any(test, feature = "test-util"))]
    /// Makes the pool's worker thread die outside any job, as a runtime bug would (tests of
    /// the supervisor).
    pub fn kill_worker_for_test(&self) {
        let poison = Arc::new(Counters::default());
        poison.spawned.store(u64::MAX, Ordering::Relaxed);
        if let Some(w) = read(&self.inner.workers).first() {
            w.send(Box::new(|| Box::pin(async {}) as LocalFuture), poison);
        }
    }
}

/// All pools of the node, keyed by tenant.
pub struct Pools<K: TenantKey> {
    pools: RwLock<BTreeMap<K, Pool>>,
    isolation: Isolation,
    cpu: CpuControl,
    shared: Vec<Arc<Worker>>,
    next_index: AtomicU64,
}

impl<K: TenantKey> fmt::Debug for Pools<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pools")
            .field("isolation", &self.isolation)
            .field("cpu", &self.cpu.mechanism().name())
            .field("tenants", &read(&self.pools).len())
            .finish()
    }
}

impl<K: TenantKey> Pools<K> {
    /// Pools with a worker per tenant and no CPU placement (unit tests, unprivileged use).
    pub fn new() -> Self {
        Self::with(Isolation::PerTenant, CpuControl::none()).unwrap_or_else(|_| unreachable!())
    }

    /// Pools in the given isolation mode, placing per-tenant workers with `cpu`.
    pub fn with(isolation: Isolation, cpu: CpuControl) -> Result<Self> {
        let shared = match isolation {
            Isolation::PerTenant => Vec::new(),
            Isolation::Shared(n) => (0..n.max(1))
                .map(|i| Worker::start(format!("np-shared-{i}"), |_| {}))
                .collect::<Result<_>>()?,
        };
        Ok(Self {
            pools: RwLock::new(BTreeMap::new()),
            isolation,
            cpu,
            shared,
            next_index: AtomicU64::new(0),
        })
    }

    /// The isolation mode.
    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// The CPU share mechanism in force.
    pub fn cpu(&self) -> &CpuControl {
        &self.cpu
    }

    /// The pool of `tenant`, if it exists.
    pub fn get(&self, tenant: &K) -> Option<Pool> {
        read(&self.pools).get(tenant).cloned()
    }

    /// The pool of `tenant`, created with default settings if it does not exist yet.
    pub fn get_or_create(&self, tenant: &K) -> Result<Pool> {
        if let Some(pool) = self.get(tenant) {
            return Ok(pool);
        }
        self.create(tenant, TenantConfig::default())
    }

    fn create(&self, tenant: &K, config: TenantConfig) -> Result<Pool> {
        let mut pools = write(&self.pools);
        if let Some(p) = pools.get(tenant) {
            return Ok(p.clone());
        }
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let slug = slug(&tenant.to_string(), index);
        let (workers, own) = match self.isolation {
            Isolation::PerTenant => (
                vec![self.start_worker(tenant.to_string(), &slug, index, config.weight)?],
                true,
            ),
            Isolation::Shared(_) => (self.shared.clone(), false),
        };
        let gate = Arc::new(Gate::default());
        gate.set_limits(config.limits);
        let pool = Pool {
            inner: Arc::new(PoolInner {
                tenant: tenant.to_string(),
                slug,
                counters: Arc::new(Counters::default()),
                gate,
                weight: AtomicU64::new(u64::from(config.weight)),
                workers: RwLock::new(workers),
                own_workers: own,
                next: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                services: Mutex::new(Vec::new()),
            }),
        };
        tracing::info!(tenant = %tenant, weight = config.weight, "pool started");
        pools.insert(tenant.clone(), pool.clone());
        Ok(pool)
    }

    fn start_worker(
        &self,
        tenant: String,
        slug: &str,
        index: u64,
        weight: u32,
    ) -> Result<Arc<Worker>> {
        let cpu = self.cpu.clone();
        let slug = slug.to_owned();
        Worker::start(format!("np-pool-{index}"), move |tid| {
            if let Err(e) = cpu.place(&slug, tid, weight) {
                tracing::warn!(
                    tenant = %tenant, mechanism = cpu.mechanism().name(), error = %e,
                    "cannot place the pool thread in its CPU group; it competes unweighted"
                );
            }
        })
    }

    /// Makes the set of pools match `wanted`: creates missing pools, applies weights and
    /// limits to existing ones, and drains pools whose tenant is gone (running jobs get
    /// [`DRAIN_TIMEOUT`] to finish, in the background). Returns the tenants added and removed.
    pub fn reconcile(&self, wanted: &BTreeMap<K, TenantConfig>) -> Result<(Vec<K>, Vec<K>)> {
        let mut added = Vec::new();
        for (tenant, config) in wanted {
            match self.get(tenant) {
                None => {
                    self.create(tenant, *config)?;
                    added.push(tenant.clone());
                }
                Some(pool) => self.configure(&pool, *config),
            }
        }
        let keep: BTreeSet<&K> = wanted.keys().collect();
        let gone: Vec<(K, Pool)> = {
            let mut pools = write(&self.pools);
            let keys: Vec<K> = pools
                .keys()
                .filter(|k| !keep.contains(k))
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| pools.remove(&k).map(|p| (k, p)))
                .collect()
        };
        let removed = gone
            .into_iter()
            .map(|(k, pool)| {
                tracing::info!(tenant = %k, "pool draining: its last pod left");
                pool.close();
                self.reap_later(pool);
                k
            })
            .collect();
        Ok((added, removed))
    }

    fn configure(&self, pool: &Pool, config: TenantConfig) {
        pool.inner.gate.set_limits(config.limits);
        let old = pool
            .inner
            .weight
            .swap(u64::from(config.weight), Ordering::Relaxed);
        if old != u64::from(config.weight) && pool.inner.own_workers {
            for w in read(&pool.inner.workers).iter() {
                let tid = w.tid.load(Ordering::Acquire);
                // Not started yet: it places itself (with the weight it was started with). Writing
                // tid 0 to a v1 `tasks` file would move the calling thread instead.
                if tid == 0 {
                    continue;
                }
                if let Err(e) = self.cpu.place(&pool.inner.slug, tid, config.weight) {
                    tracing::warn!(tenant = %pool.inner.tenant, error = %e, "cannot change the CPU weight");
                }
            }
        }
    }

    /// Joins a drained pool's worker off the caller's thread, then removes its CPU group.
    fn reap_later(&self, pool: Pool) {
        if !pool.inner.own_workers {
            return;
        }
        let cpu = self.cpu.clone();
        let _ = std::thread::Builder::new()
            .name("np-reaper".into())
            .spawn(move || {
                for w in read(&pool.inner.workers).iter() {
                    w.join();
                }
                cpu.remove(&pool.inner.slug);
            });
    }

    /// Restarts the worker of any pool whose thread died (its queued jobs are lost; its
    /// counters go on). Returns the tenants restarted. Call it periodically.
    pub fn supervise(&self) -> Vec<K> {
        let pools: Vec<(K, Pool)> = read(&self.pools)
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        let mut restarted = Vec::new();
        for (k, pool) in pools {
            if !pool.inner.own_workers || pool.inner.closed.load(Ordering::Acquire) {
                continue;
            }
            let dead = read(&pool.inner.workers).iter().any(|w| w.is_dead());
            if !dead {
                continue;
            }
            let index = self.next_index.fetch_add(1, Ordering::Relaxed);
            let weight = pool.inner.weight.load(Ordering::Relaxed) as u32;
            match self.start_worker(k.to_string(), &pool.inner.slug, index, weight) {
                Ok(w) => {
                    for service in lock(&pool.inner.services).iter() {
                        w.send_service(service.clone());
                    }
                    let old = std::mem::replace(&mut *write(&pool.inner.workers), vec![w]);
                    for w in old {
                        w.join();
                    }
                    pool.inner.counters.restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(tenant = %k, "pool worker died; restarted it");
                    restarted.push(k);
                }
                Err(e) => {
                    tracing::error!(tenant = %k, error = %e, "cannot restart a dead pool worker")
                }
            }
        }
        restarted
    }

    /// The tenants that have a pool.
    pub fn keys(&self) -> Vec<K> {
        read(&self.pools).keys().cloned().collect()
    }

    /// Every pool's counters.
    pub fn stats(&self) -> Vec<(K, PoolStats)> {
        read(&self.pools)
            .iter()
            .map(|(k, p)| (k.clone(), p.stats()))
            .collect()
    }

    /// Closes every pool, waits (bounded by [`DRAIN_TIMEOUT`]) for their threads, and removes
    /// the CPU groups.
    pub fn shutdown(&self) {
        let pools: Vec<Pool> = std::mem::take(&mut *write(&self.pools))
            .into_values()
            .collect();
        for p in &pools {
            p.close();
        }
        for p in &pools {
            if p.inner.own_workers {
                for w in read(&p.inner.workers).iter() {
                    w.join();
                }
                self.cpu.remove(&p.inner.slug);
            }
        }
        for w in &self.shared {
            w.close();
        }
        for w in &self.shared {
            w.join();
        }
        self.cpu.cleanup();
    }
}

impl<K: TenantKey> Default for Pools<K> {
    fn default() -> Self {
        Self::new()
    }
}

/// A cgroup directory name for a tenant: its text with anything but `[a-z0-9-]` replaced,
/// prefixed by a unique index so two tenants never share a group.
fn slug(tenant: &str, index: u64) -> String {
    let tail: String = tenant
        .trim_start_matches("spiffe://")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let tail: String = tail
        .chars()
        .rev()
        .take(80)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("t{index}-{tail}")
}

// Locks guard plain data that every writer leaves consistent; a poisoned lock only means
// another thread panicked while holding it, so keep serving.
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
