//! A single-threaded tokio runtime on a named thread of its own: the admin, accept and
//! discovery rooms each run on one.
//!
//! Owns [`RuntimeThread`]. Must not touch: what runs on it.

use anyhow::Context as _;
use tokio::sync::oneshot;

/// A single-threaded runtime on a thread of its own, stopped by dropping the handle.
#[derive(Debug)]
pub(crate) struct RuntimeThread {
    pub(crate) handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RuntimeThread {
    /// A thread named `name` running a current-thread runtime, with EEVDF slice `slice`.
    pub(crate) fn start(name: &str, slice: Option<std::time::Duration>) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .with_context(|| format!("cannot build the {name} runtime"))?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                if let Some(slice) = slice {
                    let tid = i64::from(nix::unistd::gettid().as_raw());
                    if let Err(e) = tenancy::cpu::set_slice(tid, slice) {
                        tracing::warn!(thread = %std::thread::current().name().unwrap_or("?"), error = %e, "cannot set the thread's scheduler slice; it keeps the kernel's default");
                    }
                }
                rt.block_on(async {
                    let _ = stopped.await;
                });
                // Dropping the runtime cancels its tasks and closes their listeners.
                drop(rt);
            })
            .with_context(|| format!("cannot start the {name} thread"))?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for RuntimeThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
