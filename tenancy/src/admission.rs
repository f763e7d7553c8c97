//! Admission: each tenant's own limits, checked before any of its new work starts.
//!
//! Owns [`Limits`], [`Admission`] (a guard that holds one open-connection slot and the
//! tenant's buffer bytes for as long as the work lives) and [`Rejection`] (a closed set of
//! reasons, for metrics). The checks are a few atomics and one short lock, so the accept loop
//! can shed a tenant's excess fast without doing that tenant's work.
//!
//! Must not touch: sockets, other tenants' counters, the environment.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::sync::lock;

/// A tenant's limits. `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Open connections (admitted work items) at once.
    pub max_connections: Option<u64>,
    /// New connections per second (token bucket, burst of one second's worth).
    pub max_connections_per_second: Option<u32>,
    /// Buffer bytes in use at once, summed over the tenant's connections.
    pub max_buffer_bytes: Option<u64>,
}

/// Why new work was refused. A closed set: it labels `nodeproxy_tenant_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The tenant is at `max_connections`.
    #[error("the tenant is at its open-connection limit")]
    Connections,
    /// The tenant is over `max_connections_per_second`.
    #[error("the tenant is over its new-connection rate limit")]
    Rate,
    /// The tenant's buffers would exceed `max_buffer_bytes`.
    #[error("the tenant is at its buffer memory limit")]
    Buffers,
}

impl Rejection {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Connections => "connections",
            Rejection::Rate => "rate",
            Rejection::Buffers => "buffers",
        }
    }
}

/// The live counters one tenant's admissions are checked against.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    limits: Mutex<Limits>,
    open: AtomicU64,
    admitted_total: AtomicU64,
    buffer_bytes: AtomicU64,
    bucket: Mutex<Option<Bucket>>,
    rejected: [AtomicU64; 3],
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Gate {
    pub(crate) fn set_limits(&self, limits: Limits) {
        *lock(&self.limits) = limits;
    }

    pub(crate) fn limits(&self) -> Limits {
        *lock(&self.limits)
    }

    pub(crate) fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    pub(crate) fn admitted_total(&self) -> u64 {
        self.admitted_total.load(Ordering::Relaxed)
    }

    pub(crate) fn buffer_bytes(&self) -> u64 {
        self.buffer_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn rejected(&self, r: Rejection) -> u64 {
        self.rejected[r as usize].load(Ordering::Relaxed)
    }

    /// Admits one unit of work that will use `buffer_bytes`, or says why not. Checks run in
    /// order connections → buffers → rate, so a refused connection never spends a rate token.
    pub(crate) fn admit(self: &Arc<Self>, buffer_bytes: u64) -> Result<Admission, Rejection> {
        let limits = self.limits();
        let result = self.try_admit(&limits, buffer_bytes);
        match result {
            Ok(_) => self.admitted_total.fetch_add(1, Ordering::Relaxed),
            Err(r) => self.rejected[r as usize].fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    fn try_admit(
        self: &Arc<Self>,
        limits: &Limits,
        buffer_bytes: u64,
    ) -> Result<Admission, Rejection> {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        let admission = Admission {
            gate: self.clone(),
            buffer_bytes: 0,
        };
        if limits.max_connections.is_some_and(|max| open > max) {
            return Err(Rejection::Connections);
        }
        let mut admission = admission;
        let bytes = self.buffer_bytes.fetch_add(buffer_bytes, Ordering::AcqRel) + buffer_bytes;
        admission.buffer_bytes = buffer_bytes;
        if limits.max_buffer_bytes.is_some_and(|max| bytes > max) {
            return Err(Rejection::Buffers);
        }
        if let Some(rate) = limits.max_connections_per_second
            && !self.take_token(rate)
        {
            return Err(Rejection::Rate);
        }
        Ok(admission)
    }

    fn take_token(&self, rate: u32) -> bool {
        let now = Instant::now();
        let rate = f64::from(rate.max(1));
        let mut bucket = lock(&self.bucket);
        let b = bucket.get_or_insert(Bucket {
            tokens: rate,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One admitted unit of work: holds its open-connection slot and buffer bytes until dropped.
#[derive(Debug)]
pub struct Admission {
    gate: Arc<Gate>,
    buffer_bytes: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
        self.gate
            .buffer_bytes
            .fetch_sub(self.buffer_bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gate(limits: Limits) -> Arc<Gate> {
        let g = Arc::new(Gate::default());
        g.set_limits(limits);
        g
    }

    #[test]
    fn open_connection_limit_frees_slots_on_drop() {
        let g = gate(Limits {
            max_connections: Some(2),
            ..Limits::default()
        });
        let a = g.admit(0).unwrap();
        let _b = g.admit(0).unwrap();
        assert_eq!(g.admit(0).unwrap_err(), Rejection::Connections);
        assert_eq!(g.open(), 2, "a refused attempt holds no slot");
        drop(a);
        let _c = g.admit(0).unwrap();
        assert_eq!(g.rejected(Rejection::Connections), 1);
        assert_eq!(g.admitted_total(), 3);
    }

    #[test]
    fn buffer_budget_is_charged_and_released() {
        let g = gate(Limits {
            max_buffer_bytes: Some(300),
            ..Limits::default()
        });
        let a = g.admit(128).unwrap();
        let _b = g.admit(128).unwrap();
        assert_eq!(g.buffer_bytes(), 256);
        assert_eq!(g.admit(128).unwrap_err(), Rejection::Buffers);
        assert_eq!(g.buffer_bytes(), 256, "a refused attempt holds no bytes");
        drop(a);
        assert_eq!(g.buffer_bytes(), 128);
        assert!(g.admit(128).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_refills_with_time() {
        let g = gate(Limits {
            max_connections_per_second: Some(10),
            ..Limits::default()
        });
        // A full bucket: a burst of one second's worth.
        for _ in 0..10 {
            drop(g.admit(0).unwrap());
        }
        assert_eq!(g.admit(0).unwrap_err(), Rejection::Rate);
        tokio::time::advance(Duration::from_millis(250)).await;
        // 0.25 s at 10/s refills 2.5 tokens: two more, not three.
        drop(g.admit(0).unwrap());
        drop(g.admit(0).unwrap());
        assert_eq!(g.admit(0).unwrap_err(), Rejection::Rate);
        tokio::time::advance(Duration::from_secs(60)).await;
        // Refill is capped at the burst size.
        for _ in 0..10 {
            drop(g.admit(0).unwrap());
        }
        assert_eq!(g.admit(0).unwrap_err(), Rejection::Rate);
        assert_eq!(g.rejected(Rejection::Rate), 3);
    }

    #[test]
    fn unlimited_by_default_and_limits_change_live() {
        let g = gate(Limits::default());
        let held: Vec<_> = (0..1000).map(|_| g.admit(1 << 20).unwrap()).collect();
        g.set_limits(Limits {
            max_connections: Some(1000),
            ..Limits::default()
        });
        assert_eq!(g.admit(0).unwrap_err(), Rejection::Connections);
        drop(held);
        assert!(g.admit(0).is_ok());
    }
}
