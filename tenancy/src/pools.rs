//! All pools of the node, keyed by tenant.
//!
//! Owns [`Pools`] and [`Isolation`]: the map from tenant key to [`Pool`], creation on demand,
//! reconciling against the wanted set (weights and limits of existing pools, new pools, drains
//! of removed ones off the caller's thread), the supervisor pass that restarts dead workers,
//! and shutdown. It decides where each pool's work runs: on a worker of its own, started here
//! and placed in the tenant's CPU group by [`CpuControl`], or on the shared workers
//! ([`Isolation::Shared`]) that outlive every pool. It owns the CPU groups' lifetimes (made on
//! start, removed after the drain).
//!
//! Must not touch: a pool's counters or limits other than through [`Pool`]; the worker's
//! thread and runtime other than through its start, close and join; sockets; the environment.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::cpu::CpuControl;
use crate::pool::{Pool, PoolStats, TenantConfig};
use crate::sync::{read, write};
use crate::worker::Worker;
use crate::{Result, TenantKey};

/// How tenants' work is spread over threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// A worker thread per tenant, in the tenant's CPU group (the product).
    PerTenant,
    /// All tenants share this many worker threads (the comparison: no isolation).
    Shared(usize),
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
        let pool = Pool::new(tenant.to_string(), slug, workers, own, config);
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
    /// [`crate::DRAIN_TIMEOUT`] to finish, in the background). Returns the tenants added and
    /// removed.
    pub fn reconcile(&self, wanted: &BTreeMap<K, TenantConfig>) -> Result<(Vec<K>, Vec<K>)> {
        let mut added = Vec::new();
        for (tenant, config) in wanted {
            match self.get(tenant) {
                None => {
                    self.create(tenant, *config)?;
                    added.push(tenant.clone());
                }
                Some(pool) => pool.configure(*config, &self.cpu),
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

    /// Joins a drained pool's worker off the caller's thread, then removes its CPU group.
    fn reap_later(&self, pool: Pool) {
        if !pool.owns_workers() {
            return;
        }
        let cpu = self.cpu.clone();
        let _ = std::thread::Builder::new()
            .name("np-reaper".into())
            .spawn(move || {
                pool.join_workers();
                cpu.remove(pool.slug());
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
            if !pool.needs_restart() {
                continue;
            }
            let index = self.next_index.fetch_add(1, Ordering::Relaxed);
            match self.start_worker(k.to_string(), pool.slug(), index, pool.weight()) {
                Ok(w) => {
                    pool.replace_worker(w);
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

    /// Closes every pool, waits (bounded by [`crate::DRAIN_TIMEOUT`]) for their threads, and
    /// removes the CPU groups.
    pub fn shutdown(&self) {
        let pools: Vec<Pool> = std::mem::take(&mut *write(&self.pools))
            .into_values()
            .collect();
        for p in &pools {
            p.close();
        }
        for p in &pools {
            if p.owns_workers() {
                p.join_workers();
                self.cpu.remove(p.slug());
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::test_support::wait_until;
    use crate::{Error, Limits, Rejection};
    use std::sync::mpsc as std_mpsc;
    use std::time::{Duration, Instant};

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
        let names: BTreeSet<String> = (0..4).map(|_| rx.recv().unwrap()).collect();
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
    fn a_stuck_tenant_slows_only_itself() {
        let pools: Pools<String> = Pools::new();
        let stuck = pools.get_or_create(&"stuck".to_owned()).unwrap();
        let quick = pools.get_or_create(&"quick".to_owned()).unwrap();
        let (started_tx, started_rx) = std_mpsc::channel();
        let (release_tx, release_rx) = std_mpsc::channel::<()>();
        // A blocking call (the worst thing a job can do) holds stuck's thread until released...
        stuck
            .spawn(move || async move {
                started_tx.send(()).unwrap();
                let _ = release_rx.recv();
            })
            .unwrap();
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // ...so stuck's next job waits (the negative control: the block is real)...
        let (behind_tx, behind_rx) = std_mpsc::channel();
        stuck
            .spawn(move || async move { behind_tx.send(()).unwrap() })
            .unwrap();
        // ...while quick's jobs all run in the meantime.
        let (tx, rx) = std_mpsc::channel();
        for i in 0..50 {
            let tx = tx.clone();
            quick
                .spawn(move || async move { tx.send(i).unwrap() })
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut done = 0;
        while done < 50
            && rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_ok()
        {
            done += 1;
        }
        let behind_ran = behind_rx.try_recv().is_ok();
        release_tx.send(()).unwrap();
        assert_eq!(done, 50, "quick waited for stuck");
        assert!(
            !behind_ran,
            "stuck's second job ran while its thread was held"
        );
        behind_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        pools.shutdown();
    }

    #[test]
    fn the_supervisor_restarts_a_dead_worker() {
        let pools: Pools<String> = Pools::new();
        let pool = pools.get_or_create(&"t".to_owned()).unwrap();
        wait_until(|| pool.stats().tids[0] > 0);
        let old_tid = pool.stats().tids[0];
        pool.kill_worker_for_test();
        let mut restarted = Vec::new();
        wait_until(|| {
            restarted = pools.supervise();
            !restarted.is_empty()
        });
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
    fn slugs_are_unique_cgroup_safe_and_bounded() {
        assert_eq!(
            slug("spiffe://td.local/ns/Web/sa/x_y", 3),
            "t3-td_local_ns_web_sa_x_y"
        );
        assert_ne!(slug("a", 0), slug("a", 1), "the index keeps groups apart");
        let long = format!("{}end", "a".repeat(200));
        let s = slug(&long, 12);
        assert_eq!(s.len(), "t12-".len() + 80);
        assert!(s.ends_with("aend"), "the tail is kept: {s}");
    }
}
