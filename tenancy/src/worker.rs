//! The worker: one OS thread running a single-threaded tokio runtime with a `LocalSet`.
//!
//! Owns `Worker` (start, hand it work, close, join, tell whether its thread died), the job and
//! service runners with their panic catching (`catch_unwind` around both making and polling
//! the future, so a panic ends only that job or service), the per-tenant `Counters` the
//! runners update, and the drain at close ([`DRAIN_TIMEOUT`]). A worker does not know which
//! tenant or tenants it serves: the pool hands it each job together with the counters to
//! charge.
//!
//! Must not touch: pools, tenants, CPU groups (the caller's `on_start` places the thread),
//! sockets, the environment.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::sync::lock;
use crate::{Error, Result};

pub(crate) type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
/// A unit of a tenant's work: called on the worker's thread, it makes the future to run there.
pub(crate) type Job = Box<dyn FnOnce() -> LocalFuture + Send>;
/// A pool's long-lived task (its own listener), started again on every new worker.
pub(crate) type Service = Arc<dyn Fn() -> LocalFuture + Send + Sync>;

/// How long a removed pool waits for its running jobs before dropping them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a worker is asked to run.
enum Work {
    /// A unit of a tenant's work, counted in its [`Counters`] and drained at close.
    Job(Job, Arc<Counters>),
    /// A service: not counted, not waited for; stopped when the worker is closed.
    Service(Service),
}

/// Counters of one tenant, readable from any thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) spawned: AtomicU64,
    pub(crate) active: AtomicI64,
    pub(crate) panics: AtomicU64,
    pub(crate) restarts: AtomicU64,
}

/// One OS thread with a single-threaded runtime, running jobs as local tasks.
pub(crate) struct Worker {
    tx: mpsc::UnboundedSender<Work>,
    tid: Arc<AtomicI64>,
    closed: Arc<tokio::sync::Notify>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Worker {
    /// Starts a thread named `name`; `on_start` runs first on it with its kernel thread id.
    pub(crate) fn start(
        name: String,
        on_start: impl FnOnce(i64) + Send + 'static,
    ) -> Result<Arc<Worker>> {
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

    /// Queues a job, charged to `counters`; false once the worker takes no more work.
    pub(crate) fn send(&self, job: Job, counters: Arc<Counters>) -> bool {
        self.tx.send(Work::Job(job, counters)).is_ok()
    }

    /// Starts a service; false once the worker takes no more work.
    pub(crate) fn send_service(&self, service: Service) -> bool {
        self.tx.send(Work::Service(service)).is_ok()
    }

    /// The thread's kernel id, 0 until its `on_start` has returned.
    pub(crate) fn tid(&self) -> i64 {
        self.tid.load(Ordering::Acquire)
    }

    pub(crate) fn is_dead(&self) -> bool {
        lock(&self.thread).as_ref().is_some_and(|t| t.is_finished())
    }

    /// Stops the services and new work; queued and running jobs drain.
    pub(crate) fn close(&self) {
        self.closed.notify_one();
    }

    pub(crate) fn join(&self) {
        let thread = lock(&self.thread).take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("a pool worker panicked while draining");
        }
    }

    #[cfg(any(test, feature = "test-util"))]
    /// Makes the thread die outside any job, as a runtime bug would.
    pub(crate) fn kill_for_test(&self) {
        let poison = Arc::new(Counters::default());
        poison.spawned.store(u64::MAX, Ordering::Relaxed);
        self.send(Box::new(|| Box::pin(async {}) as LocalFuture), poison);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::test_support::wait_until;
    use std::sync::mpsc as std_mpsc;

    fn job<F: Future<Output = ()> + 'static>(make: impl FnOnce() -> F + Send + 'static) -> Job {
        Box::new(move || Box::pin(make()) as LocalFuture)
    }

    #[test]
    fn a_panicking_job_hurts_no_other_job_on_its_thread() {
        let worker = Worker::start("np-test-worker".into(), |_| {}).unwrap();
        let (noisy, quiet) = (Arc::<Counters>::default(), Arc::<Counters>::default());
        for _ in 0..20 {
            worker.send(
                job(|| async { panic!("bug in the noisy tenant") }),
                noisy.clone(),
            );
            // A panic while *making* the future is caught too.
            let make = || -> std::future::Ready<()> { panic!("bug before the future") };
            worker.send(job(make), noisy.clone());
        }
        let (tx, rx) = std_mpsc::channel();
        for i in 0..20 {
            let (tx1, tx2) = (tx.clone(), tx.clone());
            worker.send(
                job(move || async move { tx1.send(i).unwrap() }),
                quiet.clone(),
            );
            // The worker itself keeps serving the noisy tenant after its panics.
            worker.send(
                job(move || async move { tx2.send(100 + i).unwrap() }),
                noisy.clone(),
            );
        }
        let mut got: Vec<i32> = (0..40)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..20).chain(100..120).collect::<Vec<_>>());
        wait_until(|| noisy.active.load(Ordering::Relaxed) == 0);
        assert_eq!(noisy.panics.load(Ordering::Relaxed), 40);
        assert_eq!(quiet.panics.load(Ordering::Relaxed), 0);
        assert!(!worker.is_dead(), "a job's panic must not end its worker");
        worker.close();
        worker.join();
    }

    #[test]
    fn the_tid_is_published_only_after_on_start_returns() {
        let (started_tx, started_rx) = std_mpsc::channel();
        let (release_tx, release_rx) = std_mpsc::channel::<()>();
        let worker = Worker::start("np-test-worker".into(), move |tid| {
            started_tx.send(tid).unwrap();
            // Stands in for a slow CPU placement.
            release_rx.recv().unwrap();
        })
        .unwrap();
        let tid = started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(tid > 0, "the thread knows its own id");
        assert_eq!(worker.tid(), 0, "published before the thread was placed");
        release_tx.send(()).unwrap();
        wait_until(|| worker.tid() == tid);
        worker.close();
        worker.join();
    }

    #[test]
    fn panic_messages_are_read_from_both_payload_kinds() {
        let text = |p: Box<dyn std::any::Any + Send>| panic_message(&p);
        assert_eq!(text(Box::new("static")), "static");
        assert_eq!(text(Box::new(String::from("owned"))), "owned");
        assert_eq!(text(Box::new(7)), "non-string panic payload");
    }
}
