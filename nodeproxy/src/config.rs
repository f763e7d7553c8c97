//! The one door for the daemon's configuration.
//!
//! Owns [`Config`]: built once from the command line and `NODEPROXY_*` environment variables
//! (clap reads both), validated as a whole so that every problem is reported together, and
//! served as JSON at `/config_dump`. Other modules receive the typed value; nothing else in the
//! workspace reads the environment.
//!
//! Must not touch: sockets, the kernel, the world view (that comes from `controlplane`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

/// The embedded standalone world view (`examples/demo.yaml`), used when no `--config` is given.
pub const EMBEDDED_CONFIG: &str = include_str!("../../examples/demo.yaml");
/// The node name of the embedded world view.
pub const EMBEDDED_NODE: &str = "demo-node";

/// Default ports (see DESIGN §4).
pub mod ports {
    /// Outbound capture.
    pub const OUTBOUND: u16 = 15001;
    /// Admin (`/live`, `/ready`, `/config_dump`, `/tenants`).
    pub const ADMIN: u16 = 15000;
    /// Prometheus `/metrics`.
    pub const METRICS: u16 = 15020;
    /// Mesh tunnel (mTLS, HTTP/2 CONNECT).
    pub const TUNNEL: u16 = 15008;
}

/// `nodeproxy run` options. Every flag can also be set by its `NODEPROXY_*` variable.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// World view: a YAML stream of Kubernetes-shaped objects (Namespace, Pod). Without it, the
    /// embedded demo view is used.
    #[arg(long, env = "NODEPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name (`spec.nodeName` of its pods). Defaults to the embedded view's node
    /// when no --config is given.
    #[arg(long, env = "NODEPROXY_NODE")]
    pub node: Option<String>,
    /// With --config: re-read the file every this many seconds when it changed (0: never;
    /// SIGHUP always re-reads it at once).
    #[arg(long, env = "NODEPROXY_CONFIG_POLL_SECS", default_value_t = 1)]
    pub config_poll_secs: u64,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, env = "NODEPROXY_TRUST_DOMAIN", default_value = certs::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Outbound capture listeners (comma-separated); all must use the same port, which is the
    /// port the capture rules deliver to. Port 0 is allowed only with --no-redirect; with
    /// `--capture tproxy` they must be wildcard addresses (0.0.0.0, [::]).
    #[arg(long, env = "NODEPROXY_OUTBOUND_ADDR", value_delimiter = ',',
          default_values_t = [SocketAddr::from(([0, 0, 0, 0], ports::OUTBOUND)),
                              SocketAddr::from(([0u16; 8], ports::OUTBOUND))])]
    pub outbound_addr: Vec<SocketAddr>,
    /// Admin listener.
    #[arg(long, env = "NODEPROXY_ADMIN_ADDR", default_value_t = SocketAddr::from(([127, 0, 0, 1], ports::ADMIN)))]
    pub admin_addr: SocketAddr,
    /// Prometheus listener.
    #[arg(long, env = "NODEPROXY_METRICS_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::METRICS)))]
    pub metrics_addr: SocketAddr,
    /// Do not install capture rules (traffic must reach the outbound port some other way, in
    /// the way --capture names).
    #[arg(long, env = "NODEPROXY_NO_REDIRECT")]
    pub no_redirect: bool,
    /// How captured connections reach the outbound listener. `tproxy`: nftables `tproxy` plus
    /// policy routing; the listener is transparent (IP_TRANSPARENT, needs CAP_NET_ADMIN) and a
    /// connection's original destination is its socket's local address, so every destination
    /// keeps a socket tuple of its own. `redirect`: nftables nat `redirect`, the destination read
    /// with SO_ORIGINAL_DST; every connection of a pod shares (pod:port ↔ node:15001), so a
    /// client that soon reuses a source port for another destination can stall 1 s (PAWS).
    #[arg(long, env = "NODEPROXY_CAPTURE", value_enum, default_value_t = CaptureMode::Tproxy)]
    pub capture: CaptureMode,
    /// With `--capture tproxy`: the fwmark bit(s) set on captured packets (OR-ed in) and routed
    /// locally by `ip rule ... fwmark MARK/MARK`; hex (0x1000) or decimal.
    #[arg(long, env = "NODEPROXY_TPROXY_MARK", default_value = "0x1000", value_parser = parse_mark)]
    pub tproxy_mark: u32,
    /// With `--capture tproxy`: the routing table that holds `local default dev lo`.
    #[arg(long, env = "NODEPROXY_TPROXY_TABLE", default_value_t = redirect::DEFAULT_ROUTE_TABLE)]
    pub tproxy_table: u32,
    /// Name of our nftables table (family inet).
    #[arg(long, env = "NODEPROXY_NFT_TABLE", default_value = "nodeproxy")]
    pub nft_table: String,
    /// The nft binary.
    #[arg(long, env = "NODEPROXY_NFT", default_value = "nft")]
    pub nft: PathBuf,
    /// A remote control plane (`https://host:15012`) to watch this node's view from, and to
    /// have workload certificates signed by, instead of running one in-process over --config
    /// or the embedded view. Needs --node and, for TLS, --control-plane-ca.
    #[arg(long, env = "NODEPROXY_CONTROL_PLANE", conflicts_with = "config")]
    pub control_plane: Option<String>,
    /// The CA bundle (PEM) that verifies --control-plane's serving certificate: the control
    /// plane's CA certificate (its --ca-cert; in Kubernetes a ConfigMap). Re-read at every
    /// connect.
    #[arg(long, env = "NODEPROXY_CONTROL_PLANE_CA", requires = "control_plane")]
    pub control_plane_ca: Option<PathBuf>,
    /// The bearer token for --control-plane, read at every connect: a bootstrap token, or the
    /// projected service-account token (audience nodeproxy-controlplane). Sent only over TLS.
    #[arg(
        long,
        env = "NODEPROXY_CONTROL_PLANE_TOKEN_FILE",
        requires = "control_plane"
    )]
    pub control_plane_token_file: Option<PathBuf>,
    /// Tenant isolation: `per-tenant` (each tenant's connections on a thread of its own, in a
    /// CPU group weighted by its TenantPolicy) or `shared` (all tenants on shared threads — the
    /// model of a proxy with one runtime, kept for comparison).
    #[arg(long, env = "NODEPROXY_ISOLATION", value_enum, default_value_t = IsolationMode::PerTenant)]
    pub isolation: IsolationMode,
    /// Threads of the shared mode (default: the number of CPUs).
    #[arg(long, env = "NODEPROXY_SHARED_THREADS")]
    pub shared_threads: Option<usize>,
    /// How per-tenant CPU weights are enforced: `auto` (cgroup v2, else cgroup v1, else nice),
    /// `nice`, or `none`.
    #[arg(long, env = "NODEPROXY_CPU_CONTROL", value_enum, default_value_t = CpuControlMode::Auto)]
    pub cpu_control: CpuControlMode,
    /// cgroup v1 only: put tenant CPU groups directly in this cgroup (a path below the cpu
    /// hierarchy, e.g. `kubepods`), as siblings of the pods, instead of under the daemon's own
    /// cgroup. A light tenant then never waits behind the daemon's busy tenants.
    #[arg(long, env = "NODEPROXY_CGROUP_PARENT")]
    pub cgroup_parent: Option<PathBuf>,
    /// EEVDF slice, in microseconds, of the accept thread and the per-tenant pool threads
    /// (Linux 6.12+; 100..=100000, 0 keeps the kernel's default). A short slice does not change
    /// a tenant's CPU share, only how soon its thread runs when it wakes: a light tenant's
    /// thread then preempts a busy one instead of waiting out its slice.
    #[arg(long, env = "NODEPROXY_SCHED_SLICE_US", default_value_t = DEFAULT_SCHED_SLICE_US)]
    pub sched_slice_us: u64,
    /// Accept every captured connection on the shared listener's accept thread. By default,
    /// with TPROXY and per-tenant isolation, each tenant has a transparent listener of its own,
    /// accepted on its own thread, and the shared listener is only the fallback.
    #[arg(long, env = "NODEPROXY_NO_TENANT_LISTENERS")]
    pub no_tenant_listeners: bool,
    /// Mesh tunnel listener (mTLS, HTTP/2 CONNECT). Peers are always dialled on port 15008.
    #[arg(long, env = "NODEPROXY_TUNNEL_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::TUNNEL)))]
    pub tunnel_addr: SocketAddr,
    /// Do not run the mesh tunnel: traffic to meshed pods on other nodes passes as plain TCP.
    #[arg(long, env = "NODEPROXY_NO_TUNNEL")]
    pub no_tunnel: bool,
    /// Standalone CA certificate (PEM). With --ca-key: loaded if both files exist, else a new
    /// CA is generated and written there, so that several standalone nodes can share it. The
    /// CA key is the only private key nodeproxy ever writes to disk.
    #[arg(long, env = "NODEPROXY_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Standalone CA key (PEM, PKCS#8), see --ca-cert.
    #[arg(long, env = "NODEPROXY_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Lifetime of workload certificates in seconds (renewed at half of it).
    #[arg(long, env = "NODEPROXY_CERT_LIFETIME_SECS", default_value_t = 86_400)]
    pub cert_lifetime_secs: u64,
}

/// The mesh tunnel and the standalone CA.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TunnelConfig {
    /// Listener of the tunnel.
    pub addr: SocketAddr,
    /// Standalone CA files (certificate, key), or `None` for an in-memory CA that only this
    /// node trusts. Only the paths are dumped, never the contents.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// Lifetime of workload certificates, seconds.
    pub cert_lifetime_secs: u64,
}

impl RunArgs {
    /// Parses `nodeproxy run` flags (without the program name and verb): for tests and lab
    /// experiments that start the daemon in-process.
    pub fn from_flags<I, T>(flags: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            run: RunArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("run"))
            .chain(flags.into_iter().map(Into::into));
        <Flags as clap::Parser>::try_parse_from(argv).map(|f| f.run)
    }
}

/// `--isolation` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationMode {
    /// A thread per tenant in a weighted CPU group.
    PerTenant,
    /// Every tenant on the same shared threads.
    Shared,
}

/// `--cpu-control` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CpuControlMode {
    /// cgroup v2, else cgroup v1, else nice.
    Auto,
    /// Per-thread nice values.
    Nice,
    /// No CPU placement.
    None,
}

/// Default EEVDF slice of the accept and pool threads, µs: the kernel's shortest. Measured
/// with `scripts/bench-fairness.sh` (see docs/operations.md).
pub const DEFAULT_SCHED_SLICE_US: u64 = 100;

/// How tenants are kept apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IsolationConfig {
    /// Per-tenant threads or shared threads.
    pub mode: IsolationMode,
    /// Threads of the shared mode.
    pub shared_threads: usize,
    /// CPU weight enforcement of the per-tenant mode.
    pub cpu_control: CpuControlMode,
    /// Where tenant CPU groups go (cgroup v1), if not under the daemon's own cgroup.
    pub cgroup_parent: Option<PathBuf>,
    /// EEVDF slice of the accept and pool threads, µs (`None`: the kernel's default).
    pub sched_slice_us: Option<u64>,
    /// Each tenant accepts its pods' connections on a listener of its own (TPROXY, per-tenant).
    pub tenant_listeners: bool,
}

/// Where the world view comes from.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ViewSource {
    /// A file of Kubernetes-shaped YAML objects.
    File(PathBuf),
    /// The embedded demo view.
    Embedded,
}

/// A remote control plane.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ControlPlane {
    /// `https://host:port` and the CA bundle that verifies it.
    pub endpoint: controlplane::client::Target,
    /// Where the bearer token is read from at every connect.
    pub token_file: Option<PathBuf>,
}

impl ControlPlane {
    /// The token the clients send.
    pub fn token(&self) -> controlplane::client::Token {
        self.token_file.clone().map_or(
            controlplane::client::Token::None,
            controlplane::client::Token::File,
        )
    }
}

/// `--capture` values: how captured connections reach the outbound listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureMode {
    /// nftables `tproxy` and policy routing; a transparent listener; the original destination
    /// is the accepted socket's local address.
    Tproxy,
    /// nftables nat `redirect`; the original destination comes from `SO_ORIGINAL_DST`.
    Redirect,
}

impl From<CaptureMode> for redirect::Capture {
    fn from(mode: CaptureMode) -> Self {
        match mode {
            CaptureMode::Tproxy => redirect::Capture::Tproxy,
            CaptureMode::Redirect => redirect::Capture::Redirect,
        }
    }
}

/// How traffic is captured.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Capture {
    /// How captured connections reach the outbound listener (also when the rules come from
    /// elsewhere).
    pub mode: CaptureMode,
    /// The rules the daemon installs; `None` with --no-redirect, when something else steers
    /// traffic to the outbound listener.
    pub rules: Option<CaptureRules>,
}

/// The capture rules the daemon installs and removes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CaptureRules {
    /// Table name (family inet).
    pub table: String,
    /// The nft binary.
    pub nft: PathBuf,
    /// TPROXY's fwmark bit(s) (hex in the dump).
    #[serde(serialize_with = "hex")]
    pub tproxy_mark: u32,
    /// TPROXY's routing table.
    pub tproxy_table: u32,
}

fn hex<S: serde::Serializer>(value: &u32, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{value:#x}"))
}

/// Parses `--tproxy-mark`: `0x`-prefixed hex or decimal.
fn parse_mark(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("{e}; write a 32-bit mark such as 0x1000"))
}

/// The resolved daemon configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// This node's name.
    pub node: String,
    /// Where the world view comes from.
    pub view: ViewSource,
    /// Standalone: how often the in-process control plane re-reads the view file, seconds
    /// (0: only on SIGHUP).
    pub config_poll_secs: u64,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Outbound capture listeners.
    pub outbound_addrs: Vec<SocketAddr>,
    /// Admin listener.
    pub admin_addr: SocketAddr,
    /// Prometheus listener.
    pub metrics_addr: SocketAddr,
    /// Capture mode.
    pub capture: Capture,
    /// A remote control plane; `None`: one runs in-process over `view`.
    pub control_plane: Option<ControlPlane>,
    /// Tenant isolation.
    pub isolation: IsolationConfig,
    /// The mesh tunnel, unless disabled.
    pub tunnel: Option<TunnelConfig>,
}

/// Every problem found in the configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// Resolves and validates `nodeproxy run` options: one parse per sub-config, every problem
    /// collected and reported together.
    pub fn from_args(args: RunArgs) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let control_plane = control_plane(&args, &mut errors);
        let (view, node) = view_and_node(&args, &mut errors);
        if let Err(e) = certs::Identity::new(&args.trust_domain, "x", "x") {
            errors.push(format!("--trust-domain: {e}"));
        }
        let capture = capture(&args, &mut errors);
        let isolation = isolation(&args, &mut errors);
        let tunnel = tunnel(&args, &mut errors);
        errors.extend(shared_listeners(&args, tunnel.as_ref()));
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Config {
            node,
            view,
            config_poll_secs: args.config_poll_secs,
            trust_domain: args.trust_domain,
            outbound_addrs: args.outbound_addr,
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            capture,
            control_plane,
            isolation,
            tunnel,
        })
    }

    /// The port the capture rules send captured traffic to.
    pub fn outbound_port(&self) -> u16 {
        self.outbound_addrs.first().map_or(0, |a| a.port())
    }
}

/// `--control-plane`, the CA bundle that verifies it, and its token: the address parses, the
/// bundle is readable and holds certificates, the token would cross only TLS.
fn control_plane(args: &RunArgs, errors: &mut Vec<String>) -> Option<ControlPlane> {
    let url = args.control_plane.clone()?;
    if args.node.is_none() {
        errors.push(format!("--node (NODEPROXY_NODE) is required with --control-plane {url}: name the node whose view to watch"));
    }
    let cp = ControlPlane {
        endpoint: controlplane::client::Target::new(url, args.control_plane_ca.clone()),
        token_file: args.control_plane_token_file.clone(),
    };
    if let Err(e) = cp.endpoint.check(&cp.token()) {
        errors.push(format!("--control-plane: {e}"));
    }
    Some(cp)
}

/// Where the view comes from, and the node it is cut for.
fn view_and_node(args: &RunArgs, errors: &mut Vec<String>) -> (ViewSource, String) {
    let (view, node) = match (&args.config, &args.node) {
        (Some(path), Some(node)) => (ViewSource::File(path.clone()), node.clone()),
        (None, node) => (
            ViewSource::Embedded,
            node.clone().unwrap_or_else(|| EMBEDDED_NODE.to_owned()),
        ),
        (Some(path), None) => {
            errors.push(format!(
                "--node (NODEPROXY_NODE) is required with --config {}: name the node whose pods this daemon serves",
                path.display()
            ));
            (ViewSource::File(path.clone()), String::new())
        }
    };
    if !node.is_empty() && !is_dns_name(&node) {
        errors.push(format!(
            "node name {node:?} is not a valid Kubernetes node name (lowercase letters, digits, '-' and '.')"
        ));
    }
    (view, node)
}

/// The capture mode and, unless --no-redirect, the rules the daemon installs.
fn capture(args: &RunArgs, errors: &mut Vec<String>) -> Capture {
    if args.outbound_addr.is_empty() {
        errors.push("--outbound-addr: at least one listener is needed".to_owned());
    }
    let outbound_ports: std::collections::BTreeSet<u16> =
        args.outbound_addr.iter().map(|a| a.port()).collect();
    if outbound_ports.len() > 1 {
        errors.push(format!(
            "--outbound-addr: all outbound listeners must share one port (the redirect target), got ports {outbound_ports:?}"
        ));
    }
    let rules = (!args.no_redirect).then(|| {
        if outbound_ports.contains(&0) {
            errors.push(
                "--outbound-addr: port 0 cannot be a capture target; pick a port or pass --no-redirect"
                    .to_owned(),
            );
        }
        if !is_nft_name(&args.nft_table) {
            errors.push(format!(
                "--nft-table {:?}: use letters, digits and '_' only",
                args.nft_table
            ));
        }
        if args.capture == CaptureMode::Tproxy {
            errors.extend(tproxy_errors(
                args.tproxy_mark,
                args.tproxy_table,
                &args.outbound_addr,
            ));
        }
        CaptureRules {
            table: args.nft_table.clone(),
            nft: args.nft.clone(),
            tproxy_mark: args.tproxy_mark,
            tproxy_table: args.tproxy_table,
        }
    });
    Capture {
        mode: args.capture,
        rules,
    }
}

/// How tenants are kept apart.
fn isolation(args: &RunArgs, errors: &mut Vec<String>) -> IsolationConfig {
    if args.shared_threads == Some(0) {
        errors.push("--shared-threads 0: the shared mode needs at least one thread".to_owned());
    }
    let (min, max) = tenancy::cpu::SLICE_RANGE;
    if args.sched_slice_us > 0
        && !(min.as_micros()..=max.as_micros()).contains(&u128::from(args.sched_slice_us))
    {
        errors.push(format!(
            "--sched-slice-us {}: the kernel takes slices of {}..={} µs; use 0 for its default",
            args.sched_slice_us,
            min.as_micros(),
            max.as_micros()
        ));
    }
    IsolationConfig {
        mode: args.isolation,
        shared_threads: args.shared_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
        }),
        cpu_control: args.cpu_control,
        cgroup_parent: args.cgroup_parent.clone(),
        sched_slice_us: (args.sched_slice_us > 0).then_some(args.sched_slice_us),
        tenant_listeners: !args.no_tenant_listeners,
    }
}

/// The mesh tunnel, unless --no-tunnel.
fn tunnel(args: &RunArgs, errors: &mut Vec<String>) -> Option<TunnelConfig> {
    if args.cert_lifetime_secs < 2 {
        errors.push(format!(
            "--cert-lifetime-secs {}: certificates must live at least 2 seconds",
            args.cert_lifetime_secs
        ));
    }
    (!args.no_tunnel).then(|| TunnelConfig {
        addr: args.tunnel_addr,
        ca_files: args.ca_cert.clone().zip(args.ca_key.clone()),
        cert_lifetime_secs: args.cert_lifetime_secs,
    })
}

/// Every listener address configured twice (port 0 excepted: the kernel picks).
fn shared_listeners(args: &RunArgs, tunnel: Option<&TunnelConfig>) -> Vec<String> {
    let mut binds: Vec<SocketAddr> = args.outbound_addr.clone();
    binds.extend([args.admin_addr, args.metrics_addr]);
    binds.extend(tunnel.map(|t| t.addr));
    let mut errors = Vec::new();
    for (i, a) in binds.iter().enumerate() {
        if a.port() != 0 && binds[..i].contains(a) {
            errors.push(format!(
                "address {a} is configured for two listeners; give each its own"
            ));
        }
    }
    errors
}

/// Problems only `--capture tproxy` with our own rules has.
fn tproxy_errors(mark: u32, table: u32, outbound: &[SocketAddr]) -> Vec<String> {
    let mut errors = Vec::new();
    if mark == 0 {
        errors.push(
            "--tproxy-mark 0: the mark needs at least one bit set (default 0x1000)".to_owned(),
        );
    }
    if let Err(e) = redirect::RouteTable::new(table) {
        errors.push(format!("--tproxy-table: {e}"));
    }
    for addr in outbound.iter().filter(|a| !a.ip().is_unspecified()) {
        errors.push(format!(
            "--outbound-addr {addr}: with --capture tproxy the listener must be a wildcard address \
             (0.0.0.0:{port} or [::]:{port}), because TPROXY finds it by the connection's original \
             destination; use one, or --capture redirect",
            port = addr.port()
        ));
    }
    errors
}

fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

fn is_nft_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.as_bytes()[0].is_ascii_alphabetic()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::Path;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigErrors> {
        let cli =
            Cli::try_parse_from(std::iter::once("nodeproxy").chain(args.iter().copied())).unwrap();
        Config::from_args(cli.run)
    }

    #[test]
    fn defaults_use_the_embedded_view_and_design_ports() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.view, ViewSource::Embedded);
        assert_eq!(c.node, EMBEDDED_NODE);
        assert_eq!(c.outbound_port(), 15001);
        assert_eq!(c.admin_addr.port(), 15000);
        assert_eq!(c.metrics_addr.port(), 15020);
        assert_eq!(c.capture.mode, CaptureMode::Tproxy);
        let rules = c.capture.rules.unwrap();
        assert_eq!(rules.table, "nodeproxy");
        assert_eq!((rules.tproxy_mark, rules.tproxy_table), (0x1000, 15001));
    }

    #[test]
    fn capture_mode_and_tproxy_settings() {
        let c = parse(&["--capture", "redirect"]).unwrap();
        assert_eq!(c.capture.mode, CaptureMode::Redirect);
        let c = parse(&["--tproxy-mark", "0x20000", "--tproxy-table", "100"]).unwrap();
        let rules = c.capture.rules.unwrap();
        assert_eq!((rules.tproxy_mark, rules.tproxy_table), (0x20000, 100));
        let c = parse(&["--tproxy-mark", "4096"]).unwrap();
        assert_eq!(c.capture.rules.unwrap().tproxy_mark, 0x1000);
        // The dump shows the mode and the mark in hex.
        let dump = serde_json::to_value(&parse(&[]).unwrap().capture).unwrap();
        assert_eq!(dump["mode"], "tproxy");
        assert_eq!(dump["rules"]["tproxy_mark"], "0x1000");

        let err = parse(&[
            "--tproxy-mark",
            "0",
            "--tproxy-table",
            "254",
            "--outbound-addr",
            "10.0.0.1:15001",
        ])
        .unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.0.len(), 3, "{msg}");
        assert!(msg.contains("--tproxy-mark 0"), "{msg}");
        assert!(msg.contains("254") && msg.contains("main"), "{msg}");
        assert!(
            msg.contains("--outbound-addr 10.0.0.1:15001") && msg.contains("--capture redirect"),
            "{msg}"
        );
        // None of that matters with REDIRECT.
        parse(&[
            "--capture",
            "redirect",
            "--tproxy-mark",
            "0",
            "--outbound-addr",
            "10.0.0.1:15001",
        ])
        .unwrap();
    }

    #[test]
    fn all_problems_are_reported_together() {
        let err = parse(&[
            "--config",
            "/etc/x.yaml",
            "--trust-domain",
            "Bad_Domain",
            "--outbound-addr",
            "0.0.0.0:1,0.0.0.0:2",
            "--nft-table",
            "no-dashes",
        ])
        .unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.0.len(), 4, "{msg}");
        assert!(msg.contains("--node"), "{msg}");
        assert!(msg.contains("Bad_Domain"), "{msg}");
        assert!(msg.contains("share one port"), "{msg}");
        assert!(msg.contains("no-dashes"), "{msg}");
    }

    #[test]
    fn port_zero_needs_no_redirect() {
        assert!(parse(&["--outbound-addr", "127.0.0.1:0"]).is_err());
        let c = parse(&["--outbound-addr", "127.0.0.1:0", "--no-redirect"]).unwrap();
        assert_eq!(c.capture.rules, None);
        assert_eq!(c.capture.mode, CaptureMode::Tproxy);
    }

    #[test]
    fn the_scheduler_slice_is_checked_against_the_kernels_range() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.isolation.sched_slice_us, Some(DEFAULT_SCHED_SLICE_US));
        assert_eq!(
            parse(&["--sched-slice-us", "0"])
                .unwrap()
                .isolation
                .sched_slice_us,
            None
        );
        let err = parse(&["--sched-slice-us", "50"]).unwrap_err().to_string();
        assert!(
            err.contains("--sched-slice-us 50") && err.contains("100..=100000"),
            "{err}"
        );
    }

    #[test]
    fn a_shared_listener_address_is_an_error() {
        let err = parse(&["--admin-addr", "0.0.0.0:15020"]).unwrap_err();
        assert!(err.to_string().contains("0.0.0.0:15020"), "{err}");
        // The tunnel's listener counts too, unless the tunnel is off.
        let err = parse(&["--tunnel-addr", "0.0.0.0:15020"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("0.0.0.0:15020 is configured for two listeners"),
            "{err}"
        );
        parse(&["--tunnel-addr", "0.0.0.0:15020", "--no-tunnel"]).unwrap();
    }

    #[test]
    fn a_remote_control_plane_needs_tls_and_a_readable_ca_bundle_for_its_token() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let ca_pem = certs::Ca::generate("cluster.local")
            .unwrap()
            .root_pem()
            .to_owned();
        std::fs::write(&ca, &ca_pem).unwrap();
        let token = dir.path().join("token");
        let (ca, token) = (ca.to_str().unwrap(), token.to_str().unwrap());
        let dir_path = dir.path().to_str().unwrap();
        let run = |extra: &[&str]| {
            let mut args = vec!["--node", "n1", "--control-plane"];
            args.extend_from_slice(extra);
            parse(&args)
        };
        let c = run(&[
            "https://cp.nodeproxy-system.svc:15012",
            "--control-plane-ca",
            ca,
            "--control-plane-token-file",
            token,
        ])
        .unwrap();
        let cp = c.control_plane.unwrap();
        assert_eq!(cp.endpoint.ca_file.as_deref(), Some(Path::new(ca)));
        // The dump names the bundle's file, not its contents.
        let dump = serde_json::to_string(&cp).unwrap();
        assert!(dump.contains(ca) && !dump.contains("BEGIN"), "{dump}");

        // Each bad input is one error naming the value and the fix.
        let cases: &[(&[&str], &[&str])] = &[
            (
                &["http://cp:15012", "--control-plane-token-file", token],
                &[
                    "http://cp:15012",
                    "only over TLS",
                    "https://",
                    "--control-plane-ca",
                ],
            ),
            (
                &["https://cp:15012"],
                &["https://cp:15012", "--control-plane-ca FILE"],
            ),
            (
                &[
                    "https://cp:15012",
                    "--control-plane-ca",
                    "/nonexistent/ca.pem",
                ],
                &["/nonexistent/ca.pem", "cannot read it", "CA certificate"],
            ),
            (
                &["https://cp:15012", "--control-plane-ca", dir_path],
                &[dir_path, "cannot read it"],
            ),
            (
                &["http://cp:15012", "--control-plane-ca", ca],
                &[ca, "use https://"],
            ),
            (&["cp:15012"], &["\"cp:15012\"", "https://host:port"]),
        ];
        for (flags, wants) in cases {
            let err = run(flags).unwrap_err();
            assert_eq!(err.0.len(), 1, "{flags:?}: {err}");
            for want in *wants {
                assert!(err.0[0].contains(want), "{flags:?}: {want:?} not in {err}");
            }
        }
        // A file that is there but holds no certificate.
        std::fs::write(token, "not a certificate").unwrap();
        let err = run(&["https://cp:15012", "--control-plane-ca", token]).unwrap_err();
        assert!(err.to_string().contains("holds no CERTIFICATE"), "{err}");
        // Plain text without a token is allowed (a control plane that refuses it will say so).
        run(&["http://127.0.0.1:15012"]).unwrap();
    }

    #[test]
    fn the_view_file_is_polled_every_second_unless_told_otherwise() {
        assert_eq!(parse(&[]).unwrap().config_poll_secs, 1);
        let c = parse(&[
            "--config",
            "/x.yaml",
            "--node",
            "n1",
            "--config-poll-secs",
            "0",
        ])
        .unwrap();
        assert_eq!(
            (c.view, c.config_poll_secs),
            (ViewSource::File("/x.yaml".into()), 0)
        );
    }
}
