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
//! Must not touch: the details of any phase (they live in their modules).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use certs::Identity;
use controlplane::file::FileSource;
use controlplane::view::NodeView;
use tenancy::Pools;
use tokio::sync::oneshot;

use crate::admin::{self, AdminState, Role};
use crate::config::{
    Config, CpuControlMode, EMBEDDED_CONFIG, IsolationConfig, IsolationMode, ViewSource,
};
use crate::metrics;
use crate::outbound::{self, OrigDst, Outbound};
use crate::state::{Readiness, Snapshot};
use crate::tenant_listeners::TenantListeners;

/// Start-time choices that are not user configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// How original destinations are found; `None`: as `--capture` says (see
    /// [`OrigDst::for_capture`]). Tests on loopback pass [`OrigDst::Fixed`].
    pub orig_dst: Option<OrigDst>,
}

/// Loads and translates the configured world view into this node's view.
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

/// The capture rules `config` asks for, holding the meshed pods of `snap`; `None` with
/// --no-redirect. What `nodeproxy rules` prints and what the daemon applies.
pub fn capture_rule_set(
    config: &Config,
    snap: &Snapshot,
) -> anyhow::Result<Option<redirect::RuleSet>> {
    let Some(rules) = &config.capture.rules else {
        return Ok(None);
    };
    let table = redirect::TableName::new(rules.table.as_str())?;
    let port = std::num::NonZeroU16::new(config.outbound_port())
        .context("the capture port must not be 0")?;
    let routing = redirect::PolicyRouting {
        mark: std::num::NonZeroU32::new(rules.tproxy_mark)
            .context("--tproxy-mark must not be 0")?,
        table: redirect::RouteTable::new(rules.tproxy_table)?,
        ..redirect::PolicyRouting::default()
    };
    let set = redirect::RuleSet::new(table, port)
        .with_capture(config.capture.mode.into())
        .with_routing(routing)
        .with_pods(snap.meshed_ips());
    Ok(Some(set))
}

/// The capture rules the daemon owns.
#[derive(Debug)]
struct Rules {
    nft: redirect::Nft,
    /// The rule set without pods; the snapshot adds them.
    empty: redirect::RuleSet,
}

impl Rules {
    fn from_config(config: &Config, snap: &Snapshot) -> anyhow::Result<Option<Rules>> {
        let (Some(rules), Some(set)) = (&config.capture.rules, capture_rule_set(config, snap)?)
        else {
            return Ok(None);
        };
        let nft = if rules.nft.as_os_str() == "nft" {
            redirect::Nft::new()?
        } else {
            redirect::Nft::with_path(&rules.nft)
        };
        Ok(Some(Rules {
            nft,
            empty: set.without_pods(),
        }))
    }

    fn rule_set(&self, snap: &Snapshot, ports: &PodPorts) -> redirect::RuleSet {
        self.empty
            .clone()
            .with_pods(snap.meshed_ips())
            .with_pod_ports(ports.iter().map(|(ip, port)| (*ip, *port)))
    }
}

/// Pod IP → its tenant's own capture port, as applied to the kernel's `pod_port` maps.
type PodPorts = std::collections::BTreeMap<std::net::IpAddr, std::num::NonZeroU16>;

/// Pod IP and capture port pairs, as `update_ports` takes them.
type PortPairs = Vec<(std::net::IpAddr, std::num::NonZeroU16)>;

/// What `update_ports` must add and remove to go from `old` to `new`: the removed pairs carry
/// the port the kernel has.
fn port_changes(old: &PodPorts, new: &PodPorts) -> (PortPairs, PortPairs) {
    let removed = old
        .iter()
        .filter(|(ip, port)| new.get(ip) != Some(port))
        .map(|(ip, port)| (*ip, *port))
        .collect();
    let added = new
        .iter()
        .filter(|(ip, port)| old.get(ip) != Some(port))
        .map(|(ip, port)| (*ip, *port))
        .collect();
    (added, removed)
}

/// A single-threaded runtime on a thread of its own, stopped by dropping the handle.
#[derive(Debug)]
struct RuntimeThread {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RuntimeThread {
    /// A thread named `name` running a current-thread runtime, with EEVDF slice `slice`.
    fn start(name: &str, slice: Option<std::time::Duration>) -> anyhow::Result<Self> {
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

    let mut outbound_listeners = Vec::new();
    for addr in &config.outbound_addrs {
        match bind_with(*addr, transparent) {
            Ok(l) => outbound_listeners.push(l),
            // A host without IPv6 still serves IPv4.
            Err(e) if addr.is_ipv6() && is_no_ipv6(&e.source) => {
                tracing::warn!(%addr, error = %e.source, "IPv6 is not available; not listening there");
            }
            Err(e) => return Err(e.into_anyhow(*addr, "--outbound-addr")),
        }
    }
    let admin_listener =
        bind(config.admin_addr).map_err(|e| bind_error(config.admin_addr, "--admin-addr", e))?;
    let metrics_listener = bind(config.metrics_addr)
        .map_err(|e| bind_error(config.metrics_addr, "--metrics-addr", e))?;
    let outbound_addrs: Vec<SocketAddr> = outbound_listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;
    let admin_addr = admin_listener.local_addr()?;
    let tunnel_listener = match &config.tunnel {
        Some(t) => Some(bind(t.addr).map_err(|e| bind_error(t.addr, "--tunnel-addr", e))?),
        None => None,
    };
    let tunnel_addr = tunnel_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    let metrics_addr = metrics_listener.local_addr()?;

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

    // Every new connection passes the accept thread: it gets the pools' short slice too.
    let slice = state
        .config
        .isolation
        .sched_slice_us
        .map(std::time::Duration::from_micros);
    let accept = RuntimeThread::start("np-accept", slice)?;
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
    for listener in outbound_listeners {
        let ctx = ctx.clone();
        accept.handle.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => outbound::accept_loop(l, ctx, metrics::Listener::Shared).await,
                Err(e) => tracing::error!(error = %e, "cannot serve outbound listener"),
            }
        });
    }
    if let (Some(listener), Some(mesh)) = (tunnel_listener, &mesh) {
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

    /// Reloads the world view from its source and applies it: pods that arrived are meshed
    /// (their IPs join the capture set, their tenants get pools), pods that left are unmeshed.
    /// On any error the last good view stays in force.
    pub fn reload(&self) -> anyhow::Result<()> {
        let view = load_view(&self.state.config)?;
        self.apply_view(view)
    }

    /// Applies a new node view (see [`Running::reload`]).
    pub fn apply_view(&self, view: NodeView) -> anyhow::Result<()> {
        let old = self.state.snapshot.load_full();
        let new = Snapshot::new(view, old.version + 1);
        let (old_ips, new_ips) = (old.meshed_ips(), new.meshed_ips());
        let added: Vec<_> = new_ips.difference(&old_ips).copied().collect();
        let removed: Vec<_> = old_ips.difference(&new_ips).copied().collect();
        // Know new pods before their traffic is captured: the snapshot, their tenants' pools
        // and own listeners, and those listeners' ports (harmless before the pod is in the
        // meshed set, which the ports' rule checks first) all come before the set update.
        // Port entries that no longer hold go first, before a removed tenant's listener closes
        // and the kernel may give its port to another tenant's new one.
        let tenant_configs = new.tenant_configs();
        let new = Arc::new(new);
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
        let (t_added, t_removed) = self.state.pools.reconcile(&tenant_configs)?;
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
                .update(&rules.empty.table, &added, &removed)
                .context("cannot update the capture set")?;
        }
        drop(applied);
        tracing::info!(
            pods_added = added.len(), pods_removed = removed.len(),
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

/// The mesh context. With a remote control plane, its `Identity.Certify` signs the tenants'
/// certificates; in standalone mode an embedded CA (from the operator's files, or generated in
/// memory) behind node authorization does.
fn mesh_context(
    t: &crate::config::TunnelConfig,
    state: &AdminState,
) -> anyhow::Result<crate::tunnel::Mesh> {
    let lifetime = std::time::Duration::from_secs(t.cert_lifetime_secs);
    if let Some(cp) = &state.config.control_plane {
        // The remote control plane's CA signs, after authorizing this node.
        let signer = crate::tunnel::signer::GrpcSigner::new(
            cp.endpoint.clone(),
            cp.token_file.clone(),
            lifetime,
        );
        return Ok(crate::tunnel::Mesh {
            signer: Arc::new(signer),
            rotation: certs::RotationOptions::default(),
            snapshot: state.snapshot.clone(),
        });
    }
    let td = &state.config.trust_domain;
    let ca = match &t.ca_files {
        Some((cert, key)) => certs::Ca::load_or_generate(td, cert, key)
            .with_context(|| format!("cannot load or create the CA at {}", cert.display()))?,
        None => {
            tracing::warn!(
                "no --ca-cert/--ca-key: using an in-memory CA that only this node trusts; \
                 tunnels to other nodes will be refused"
            );
            certs::Ca::generate(td)?
        }
    }
    .with_lifetime(lifetime);
    let signer =
        crate::tunnel::LocalCaSigner::new(ca, state.config.node.clone(), state.snapshot.clone());
    Ok(crate::tunnel::Mesh {
        signer: Arc::new(signer),
        rotation: certs::RotationOptions::default(),
        snapshot: state.snapshot.clone(),
    })
}

/// Binds a non-blocking listener; IPv6 listeners are IPv6-only so that `0.0.0.0` and `[::]`
/// can share a port.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    bind_with(addr, false).map_err(|e| e.source)
}

/// Why a listener could not be bound.
#[derive(Debug)]
pub(crate) struct BindError {
    /// Setting IP_TRANSPARENT failed (rather than creating, binding or listening).
    transparent: bool,
    pub(crate) source: std::io::Error,
}

impl BindError {
    pub(crate) fn into_anyhow(self, addr: SocketAddr, flag: &str) -> anyhow::Error {
        if !self.transparent {
            return bind_error(addr, flag, self.source);
        }
        let hint = match self.source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                ": --capture tproxy needs CAP_NET_ADMIN for a transparent listener; run as root or \
                 grant the capability, or use --capture redirect"
            }
            _ => "",
        };
        anyhow::anyhow!(
            "cannot make the listener on {addr} ({flag}) transparent (IP_TRANSPARENT): {}{hint}",
            self.source
        )
    }
}

/// Like [`bind`]; with `transparent`, sets IP_TRANSPARENT before binding, so that TPROXY can
/// deliver connections for any destination to it.
pub(crate) fn bind_with(
    addr: SocketAddr,
    transparent: bool,
) -> Result<std::net::TcpListener, BindError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let plain = |source| BindError {
        transparent: false,
        source,
    };
    let s =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(plain)?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(plain)?;
    }
    if transparent {
        let set = if addr.is_ipv6() {
            s.set_ip_transparent_v6(true)
        } else {
            s.set_ip_transparent_v4(true)
        };
        set.map_err(|source| BindError {
            transparent: true,
            source,
        })?;
    }
    s.set_reuse_address(true).map_err(plain)?;
    s.set_nonblocking(true).map_err(plain)?;
    s.bind(&addr.into()).map_err(plain)?;
    s.listen(1024).map_err(plain)?;
    Ok(s.into())
}

pub(crate) fn is_no_ipv6(e: &std::io::Error) -> bool {
    // EAFNOSUPPORT (97) or EADDRNOTAVAIL when IPv6 is disabled.
    e.raw_os_error() == Some(97) || e.kind() == std::io::ErrorKind::AddrNotAvailable
}

fn bind_error(addr: SocketAddr, flag: &str, e: std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            ": another process (perhaps another nodeproxy) holds it; stop it or choose another address with {flag}"
        ),
        std::io::ErrorKind::PermissionDenied => {
            ": binding needs CAP_NET_BIND_SERVICE for ports below 1024".to_owned()
        }
        _ => String::new(),
    };
    anyhow::anyhow!("cannot listen on {addr} ({flag}): {e}{hint}")
}

// Guards plain data every writer leaves consistent; a poisoned lock only means a panic elsewhere.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn port_changes_remove_what_the_kernel_has_and_add_what_is_new() {
        let port = |p: u16| std::num::NonZeroU16::new(p).unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let old: PodPorts = [
            (ip("10.0.0.1"), port(40001)),
            (ip("10.0.0.2"), port(40002)),
            (ip("fd00::3"), port(40003)),
        ]
        .into();
        // .1 stays, .2 left, ::3 moved to another tenant's port, .4 is new.
        let new: PodPorts = [
            (ip("10.0.0.1"), port(40001)),
            (ip("fd00::3"), port(40009)),
            (ip("10.0.0.4"), port(40001)),
        ]
        .into();
        let (added, removed) = port_changes(&old, &new);
        assert_eq!(
            added,
            vec![(ip("10.0.0.4"), port(40001)), (ip("fd00::3"), port(40009))]
        );
        assert_eq!(
            removed,
            vec![(ip("10.0.0.2"), port(40002)), (ip("fd00::3"), port(40003))]
        );
        assert_eq!(port_changes(&new, &new), (vec![], vec![]));
    }

    #[test]
    fn a_transparent_listener_without_privileges_names_the_fix() {
        let e = BindError {
            transparent: true,
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let msg = e
            .into_anyhow("0.0.0.0:15001".parse().unwrap(), "--outbound-addr")
            .to_string();
        assert!(msg.contains("0.0.0.0:15001"), "{msg}");
        assert!(msg.contains("IP_TRANSPARENT"), "{msg}");
        assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
        assert!(msg.contains("--capture redirect"), "{msg}");
    }
}
