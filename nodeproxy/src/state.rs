//! The daemon's current picture of its node: a snapshot built from the control plane's view.
//!
//! Owns [`Snapshot`] (the node view plus the index the data path reads: source IP → local pod
//! → tenant) and [`Readiness`]. The data path loads the snapshot from an `ArcSwap` and never
//! waits for the control plane; a new view builds a new snapshot and swaps it in whole.
//!
//! Must not touch: sockets, the kernel, the pools.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use certs::Identity;
use controlplane::view::NodeView;
use serde::Serialize;

/// A local meshed pod, as the data path sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalPod {
    /// The pod's tenant (its service account identity).
    pub tenant: Identity,
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
}

/// A meshed pod on another node, as the data path sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemotePod {
    /// The pod's identity.
    pub identity: Identity,
    /// Its node's address (where the node's tunnel listens), if the view knows it.
    pub node_ip: Option<IpAddr>,
}

/// An immutable picture of the node, swapped in whole on every view change.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The view it was built from.
    pub view: NodeView,
    /// Monotonic version, bumped on every swap.
    pub version: u64,
    by_ip: HashMap<IpAddr, LocalPod>,
    remote_by_ip: HashMap<IpAddr, RemotePod>,
}

impl Snapshot {
    /// Indexes a view. The view's builder already rejected duplicate IPs.
    pub fn new(view: NodeView, version: u64) -> Self {
        let by_ip = view
            .local
            .iter()
            .flat_map(|w| {
                w.ips.iter().map(move |ip| {
                    (
                        *ip,
                        LocalPod {
                            tenant: w.identity.clone(),
                            name: w.name.clone(),
                            namespace: w.namespace.clone(),
                        },
                    )
                })
            })
            .collect();
        let remote_by_ip = view
            .remote
            .iter()
            .flat_map(|w| {
                w.ips.iter().map(move |ip| {
                    (
                        *ip,
                        RemotePod {
                            identity: w.identity.clone(),
                            node_ip: w.host_ip,
                        },
                    )
                })
            })
            .collect();
        Self {
            view,
            version,
            by_ip,
            remote_by_ip,
        }
    }

    /// The meshed pod on another node that owns `ip`, if any.
    pub fn remote_by_ip(&self, ip: IpAddr) -> Option<&RemotePod> {
        self.remote_by_ip.get(&ip.to_canonical())
    }

    /// The local meshed pod that owns `ip`, if any. IPv4-mapped IPv6 addresses (from a
    /// dual-stack socket) are looked up as IPv4.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&LocalPod> {
        self.by_ip.get(&ip.to_canonical())
    }

    /// The tenants with at least one local pod.
    pub fn tenants(&self) -> BTreeSet<Identity> {
        self.by_ip.values().map(|p| p.tenant.clone()).collect()
    }

    /// Every local tenant's weight and limits (defaults for tenants no policy names).
    pub fn tenant_configs(&self) -> BTreeMap<Identity, tenancy::TenantConfig> {
        let mut configs: BTreeMap<Identity, tenancy::TenantConfig> = self
            .tenants()
            .into_iter()
            .map(|t| (t, tenancy::TenantConfig::default()))
            .collect();
        for t in &self.view.tenants {
            if let Some(c) = configs.get_mut(&t.identity) {
                *c = tenancy::TenantConfig {
                    weight: t.weight,
                    limits: tenancy::Limits {
                        max_connections: t.limits.max_connections,
                        max_connections_per_second: t.limits.max_connections_per_second,
                        max_buffer_bytes: t.limits.max_buffer_bytes,
                    },
                };
            }
        }
        configs
    }

    /// Every local meshed pod IP (what the redirect set must hold).
    pub fn meshed_ips(&self) -> BTreeSet<IpAddr> {
        self.by_ip.keys().copied().collect()
    }
}

/// What `/ready` waits for.
#[derive(Debug, Default)]
pub struct Readiness {
    view_loaded: AtomicBool,
    rules_applied: AtomicBool,
    shutting_down: AtomicBool,
}

impl Readiness {
    /// Marks the node view as loaded.
    pub fn set_view_loaded(&self) {
        self.view_loaded.store(true, Ordering::Release);
    }

    /// Marks the capture rules as applied (or not needed).
    pub fn set_rules_applied(&self, applied: bool) {
        self.rules_applied.store(applied, Ordering::Release);
    }

    /// Marks the daemon as shutting down: never ready again.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// `Ok` when ready, else the reasons it is not.
    pub fn check(&self) -> Result<(), Vec<&'static str>> {
        let mut why = Vec::new();
        if !self.view_loaded.load(Ordering::Acquire) {
            why.push("node view not loaded");
        }
        if !self.rules_applied.load(Ordering::Acquire) {
            why.push("capture rules not applied");
        }
        if self.shutting_down.load(Ordering::Acquire) {
            why.push("shutting down");
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }
}
