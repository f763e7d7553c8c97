//! The daemon's lifecycle: start every room in order, apply view changes, shut down cleanly.
//!
//! Owns [`start`] and [`Running`]. Start order: load the node view → bind every listener (so a
//! port in use fails before anything touches the kernel) → start the tenants' pools → start
//! the admin runtime and the accept runtime (two threads of their own; neither does a
//! tenant's work) → apply the capture rules → ready. Shutdown reverses it: it stops capturing
//! new connections (empties the meshed sets), stops accepting, drains the pools (with TPROXY the
//! table still steers the drained connections' packets to their sockets), then removes the rules,
//! so nothing is left in the kernel.
//!
//! A new view (always from Discovery, never read here from a file) is first decided as a plain
//! [`ViewChange`] and then acted on (`Running::apply_view`). Rooms: `bind` (every listener),
//! `capture` (the rule set and `pod_port` diffs, pure), `view_change` (pure), `mesh` (who
//! signs certificates), `runtime_thread` (the admin, accept and discovery threads).
//!
//! Must not touch: the details of any phase (they live in their modules).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use certs::Identity;
use controlplane::file::FileSource;
use controlplane::view::NodeView;
use tenancy::Pools;

use crate::admin::{self, AdminState, Role};
use crate::config::{
    Config, CpuControlMode, EMBEDDED_CONFIG, IsolationConfig, IsolationMode, ViewSource,
};
use crate::metrics;
use crate::outbound::{self, OrigDst, Outbound};
use crate::state::{Readiness, Snapshot};
use crate::tenant_listeners::TenantListeners;

mod bind;
mod capture;
mod mesh;
mod runtime_thread;
mod view_change;

pub(crate) use bind::{bind_with, is_no_ipv6};

use bind::Listeners;
pub use capture::capture_rule_set;
pub(crate) use runtime_thread::RuntimeThread;

use capture::{PodPorts, Rules, port_changes};
use mesh::mesh_context;
use view_change::ViewChange;

/// Start-time choices that are not user configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// How original destinations are found; `None`: as `--capture` says (see
    /// [`OrigDst::for_capture`]). Tests on loopback pass [`OrigDst::Fixed`].
    pub orig_dst: Option<OrigDst>,
}

/// Loads and translates the configured world view into this node's view, directly from the
/// file or the embedded view: for `nodeproxy rules`, for [`start`] (in-process tests) and to
/// fail fast on a bad file. A running daemon reads every view through Discovery.
pub fn load_view(config: &Config) -> anyhow::Result<NodeView> {
    let objects = match &config.view {
        ViewSource::File(path) => FileSource::load(path)?,
        ViewSource::Embedded => {
            FileSource::parse_str("embedded examples/demo.yaml", EMBEDDED_CONFIG)?
        }
    };
    Ok(NodeView::build(
        &objects,
        &config.node,
        &config.trust_domain,
    )?)
}

/// A started daemon.
#[derive(Debug)]
pub struct Running {
    /// Bound outbound listeners.
    pub outbound_addrs: Vec<SocketAddr>,
    /// Bound admin listener.
    pub admin_addr: SocketAddr,
    /// Bound metrics listener.
    pub metrics_addr: SocketAddr,
    /// Bound mesh tunnel listener, if the tunnel is on.
    pub tunnel_addr: Option<SocketAddr>,
    state: AdminState,
    rules: Option<Rules>,
    /// The `pod_port` map entries in the kernel.
    pod_ports: std::sync::Mutex<PodPorts>,
    accept: Option<RuntimeThread>,
    admin: Option<RuntimeThread>,
}

/// Starts the daemon. Returns once it is ready (or with the first error, having undone
/// whatever it had done).
pub fn start(config: Config, opts: StartOptions) -> anyhow::Result<Running> {
    let view = load_view(&config).context("cannot load the node view")?;
    start_with_view(config, view, opts)
}

/// Starts the daemon with a view obtained elsewhere: `nodeproxy run` gets it from the control
/// plane ([`crate::discovery`]), in-process or remote.
pub fn start_with_view(
    config: Config,
    view: NodeView,
    opts: StartOptions,
) -> anyhow::Result<Running> {
    if view.local.is_empty() {
        tracing::warn!(
            node = %config.node,
            "no meshed pods on this node: nothing will be captured until a pod in a namespace \
             labelled nodeproxy.io/mesh=enabled is scheduled here"
        );
    }
    let snapshot = Snapshot::new(view, 1);
    let rules = Rules::from_config(&config, &snapshot)?;
    let orig_dst = opts
        .orig_dst
        .unwrap_or_else(|| OrigDst::for_capture(config.capture.mode));
    // TPROXY delivers to a listener only if it is transparent.
    let transparent = orig_dst == OrigDst::LocalAddr;

    let listeners = Listeners::bind(&config, transparent)?;
    let outbound_addrs = listeners.outbound_addrs()?;
    let admin_addr = listeners.admin.local_addr()?;
    let metrics_addr = listeners.metrics.local_addr()?;
    let tunnel_addr = listeners
        .tunnel
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;

    let _ = metrics::handle();
    let pools: Arc<Pools<Identity>> = Arc::new(build_pools(&config.isolation)?);
    pools.reconcile(&snapshot.tenant_configs())?;
    ::metrics::gauge!(metrics::TENANTS).set(pools.keys().len() as f64);

    let readiness = Arc::new(Readiness::default());
    readiness.set_view_loaded();
    let state = AdminState {
        config: Arc::new(config),
        snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
        readiness,
        pools,
        tenant_listeners: Arc::default(),
    };

    let admin = start_admin(&state, listeners.admin, listeners.metrics)?;
    let mesh = match &state.config.tunnel {
        Some(t) => Some(mesh_context(t, &state)?),
        None => None,
    };
    let ctx = Outbound {
        snapshot: state.snapshot.clone(),
        pools: state.pools.clone(),
        orig_dst,
        listeners: outbound_addrs.clone().into(),
        mesh: mesh.clone(),
    };
    let accept = start_accept(&state, &ctx, listeners.outbound, listeners.tunnel)?;

    // Each tenant's own listener, accepted on its own thread: with TPROXY (the rules' per-pod
    // ports fall back to the shared listener) and per-tenant threads.
    if rules.is_some()
        && transparent
        && state.config.isolation.tenant_listeners
        && state.config.isolation.mode == IsolationMode::PerTenant
    {
        let listeners = Arc::new(TenantListeners::new(&outbound_addrs, ctx.clone()));
        listeners.sync(&state.pools);
        let _ = state.tenant_listeners.set(listeners);
    }

    let mut running = Running {
        outbound_addrs,
        admin_addr,
        metrics_addr,
        tunnel_addr,
        state,
        rules,
        pod_ports: std::sync::Mutex::default(),
        accept: Some(accept),
        admin: Some(admin),
    };
    if let Some(rules) = &running.rules {
        let snap = running.state.snapshot.load();
        let ports = running.wanted_pod_ports(&snap);
        let set = rules.rule_set(&snap, &ports);
        let applied = rules.nft.apply(&set).and_then(|()| rules.nft.verify(&set));
        if let Err(e) = applied {
            // Undo: nothing may stay in the kernel after a failed start.
            running.shutdown();
            return Err(anyhow::Error::new(e).context("cannot install the capture rules"));
        }
        tracing::info!(
            table = %set.table,
            capture = %set.capture,
            port = set.redirect_port,
            pods = set.meshed_v4.len() + set.meshed_v6.len(),
            pods_on_tenant_listeners = ports.len(),
            "capture rules applied"
        );
        *lock(&running.pod_ports) = ports;
        ::metrics::gauge!(metrics::REDIRECT_RULES_APPLIED).set(1.0);
    }
    running.state.readiness.set_rules_applied(true);
    tracing::info!(
        node = %running.state.config.node,
        outbound = ?running.outbound_addrs,
        admin = %running.admin_addr,
        metrics = %running.metrics_addr,
        tenants = running.state.pools.keys().len(),
        "nodeproxy ready"
    );
    Ok(running)
}

impl Running {
    /// The tenant capture port of every meshed pod whose tenant has its own listener.
    fn wanted_pod_ports(&self, snap: &Snapshot) -> PodPorts {
        self.state
            .tenant_listeners
            .get()
            .map(|l| l.pod_ports(snap))
            .unwrap_or_default()
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Config {
        &self.state.config
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.snapshot.load_full()
    }

    /// Applies a new node view (from Discovery): pods that arrived are meshed (their IPs join
    /// the capture set, their tenants get pools), pods that left are unmeshed. On an error the
    /// snapshot is the new one but the kernel may lag; the next view retries.
    pub fn apply_view(&self, view: NodeView) -> anyhow::Result<()> {
        let old = self.state.snapshot.load_full();
        let new = Arc::new(Snapshot::new(view, old.version + 1));
        let change = ViewChange::decide(&old, &new);
        // Know new pods before their traffic is captured: the snapshot, their tenants' pools
        // and own listeners, and those listeners' ports (harmless before the pod is in the
        // meshed set, which the ports' rule checks first) all come before the set update.
        // Port entries that no longer hold go first, before a removed tenant's listener closes
        // and the kernel may give its port to another tenant's new one.
        self.state.snapshot.store(new.clone());
        let mut applied = lock(&self.pod_ports);
        if let Some(rules) = &self.rules {
            let (_, stale) = port_changes(&applied, &self.wanted_pod_ports(&new));
            rules
                .nft
                .update_ports(&rules.empty.table, &[], &stale)
                .context("cannot remove stale tenant capture ports")?;
            for (ip, _) in &stale {
                applied.remove(ip);
            }
        }
        let (t_added, t_removed) = self.state.pools.reconcile(&change.tenants)?;
        ::metrics::gauge!(metrics::TENANTS).set(self.state.pools.keys().len() as f64);
        if let Some(listeners) = self.state.tenant_listeners.get() {
            listeners.sync(&self.state.pools);
        }
        if let Some(rules) = &self.rules {
            let wanted = self.wanted_pod_ports(&new);
            let (ports_added, ports_removed) = port_changes(&applied, &wanted);
            rules
                .nft
                .update_ports(&rules.empty.table, &ports_added, &ports_removed)
                .context("cannot update the tenants' capture ports")?;
            *applied = wanted;
            rules
                .nft
                .update(&rules.empty.table, &change.pods_added, &change.pods_removed)
                .context("cannot update the capture set")?;
        }
        drop(applied);
        tracing::info!(
            version = new.version,
            pods_added = change.pods_added.len(), pods_removed = change.pods_removed.len(),
            tenants_added = ?t_added.iter().map(ToString::to_string).collect::<Vec<_>>(),
            tenants_removed = ?t_removed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "node view applied"
        );
        Ok(())
    }

    /// Stops capturing new connections, stops accepting, drains the pools, then removes the
    /// capture rules. Idempotent.
    pub fn shutdown(&mut self) {
        self.state.readiness.set_shutting_down();
        let rules = self.rules.take();
        if let Some(rules) = &rules {
            // Empty sets capture nothing new; connections we hold keep reaching us while they
            // drain (TPROXY: the transparent-socket rule; REDIRECT: conntrack's NAT entries).
            let meshed: Vec<_> = self
                .state
                .snapshot
                .load()
                .meshed_ips()
                .into_iter()
                .collect();
            if let Err(e) = rules.nft.update(&rules.empty.table, &[], &meshed) {
                tracing::warn!(error = %e, "cannot empty the capture sets before draining");
            }
        }
        drop(self.accept.take());
        self.state.pools.shutdown();
        if let Some(rules) = rules {
            match rules.nft.remove(&rules.empty) {
                Ok(()) => tracing::info!(table = %rules.empty.table, "capture rules removed"),
                Err(e) => tracing::error!(error = %e, "cannot remove the capture rules"),
            }
            ::metrics::gauge!(metrics::REDIRECT_RULES_APPLIED).set(0.0);
        }
        drop(self.admin.take());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The admin runtime (`np-admin`): admin and metrics endpoints, and the pool supervisor.
fn start_admin(
    state: &AdminState,
    admin_listener: std::net::TcpListener,
    metrics_listener: std::net::TcpListener,
) -> anyhow::Result<RuntimeThread> {
    let admin = RuntimeThread::start("np-admin", None)?;
    admin.handle.spawn(supervise(state.pools.clone()));
    for (listener, role) in [
        (admin_listener, Role::Admin),
        (metrics_listener, Role::Metrics),
    ] {
        let state = state.clone();
        admin.handle.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => admin::serve(l, role, state).await,
                Err(e) => tracing::error!(error = %e, "cannot serve admin listener"),
            }
        });
    }
    Ok(admin)
}

/// The accept runtime (`np-accept`): the shared outbound listeners and the tunnel's 15008.
/// Accept loops only: each connection is classified and handed to its tenant's pool.
fn start_accept(
    state: &AdminState,
    ctx: &Outbound,
    outbound: Vec<std::net::TcpListener>,
    tunnel: Option<std::net::TcpListener>,
) -> anyhow::Result<RuntimeThread> {
    // Every new connection on the shared listener passes this thread: it gets the pools' short
    // slice too.
    let slice = state
        .config
        .isolation
        .sched_slice_us
        .map(std::time::Duration::from_micros);
    let accept = RuntimeThread::start("np-accept", slice)?;
    for listener in outbound {
        let ctx = ctx.clone();
        accept.handle.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => outbound::accept_loop(l, ctx, metrics::Listener::Shared).await,
                Err(e) => tracing::error!(error = %e, "cannot serve outbound listener"),
            }
        });
    }
    if let (Some(listener), Some(mesh)) = (tunnel, &ctx.mesh) {
        let ctx = crate::inbound::Inbound {
            pools: state.pools.clone(),
            mesh: mesh.clone(),
        };
        accept.handle.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => crate::inbound::accept_loop(l, ctx).await,
                Err(e) => tracing::error!(error = %e, "cannot serve the tunnel listener"),
            }
        });
    }
    Ok(accept)
}

/// The tenants' pools in the configured isolation mode.
fn build_pools(isolation: &IsolationConfig) -> anyhow::Result<Pools<Identity>> {
    let pools = match isolation.mode {
        IsolationMode::PerTenant => {
            let cpu = match (isolation.cpu_control, &isolation.cgroup_parent) {
                (CpuControlMode::Auto, Some(parent)) => {
                    tenancy::CpuControl::v1_flat(parent, "nodeproxy").with_context(|| {
                        format!(
                            "--cgroup-parent {}: tenant groups need a cgroup v1 cpu group there",
                            parent.display()
                        )
                    })?
                }
                (CpuControlMode::Auto, None) => tenancy::CpuControl::detect("nodeproxy"),
                (CpuControlMode::Nice, _) => tenancy::CpuControl::nice(),
                (CpuControlMode::None, _) => tenancy::CpuControl::none(),
            };
            Pools::with(
                tenancy::Isolation::PerTenant,
                cpu.with_slice(
                    isolation
                        .sched_slice_us
                        .map(std::time::Duration::from_micros),
                ),
            )?
        }
        IsolationMode::Shared => Pools::with(
            tenancy::Isolation::Shared(isolation.shared_threads),
            tenancy::CpuControl::none(),
        )?,
    };
    tracing::info!(
        isolation = ?isolation.mode,
        cpu_share = pools.cpu().mechanism().name(),
        "tenant pools ready"
    );
    Ok(pools)
}

/// Restarts dead pool workers, once a second, for the life of the admin runtime.
async fn supervise(pools: Arc<Pools<Identity>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        for tenant in pools.supervise() {
            ::metrics::counter!(metrics::TENANT_POOL_RESTARTS_TOTAL, "tenant" => tenant.to_string())
                .increment(1);
        }
    }
}

// Guards plain data every writer leaves consistent; a poisoned lock only means a panic elsewhere.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
