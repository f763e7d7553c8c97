//! `nodeproxy_tests`: fixtures for the workspace's integration tests and benchmarks.
//!
//! Owns: the gate of tests that need root ([`require_privileges`]), unique namespace prefixes so
//! such tests run in parallel ([`unique_prefix`]), running the `nodeproxy` binary inside a
//! network namespace ([`Daemon`]), a topology with a config file for a daemon on its node
//! ([`NodeLab`]), a control plane for daemons started with `--control-plane`
//! ([`start_control_plane`]), and small TCP helpers that run inside namespaces
//! ([`tcp_echo_server`], [`tcp_roundtrip`], [`wait_for_listener`]). Topologies themselves come
//! from [`nodeproxy::lab::topology`], re-exported here.
//!
//! Must not touch: the host namespace's firewall, routes or sysctls. Everything privileged
//! happens inside namespaces a [`Topology`] created.

pub mod control_plane;
pub mod daemon;
pub mod net;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;

pub use control_plane::{ControlPlaneFiles, start_control_plane};
pub use daemon::{Daemon, http_get};
pub use net::{EchoServer, Seen, tcp_connect, tcp_echo_server, tcp_roundtrip, wait_for_listener};
pub use nodeproxy::lab::topology::{Netns, Topology, TopologyError, TopologySpec};

/// The port `iperf3 -s` listens on unless told otherwise.
pub const IPERF3_PORT: u16 = 5201;
/// How long to wait for a server process to listen ([`wait_for_listener`]).
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Benchmarks only: one iperf3 single-stream run from inside `ns` to an `iperf3 -s` at
/// `server`, for `secs` seconds; the received bits per second.
pub fn iperf3_bps(ns: &Netns, server: std::net::IpAddr, secs: u32) -> anyhow::Result<f64> {
    let out = ns
        .command("iperf3")
        .args(["-c", &server.to_string(), "-t", &secs.to_string(), "-J"])
        .output()
        .context("run iperf3 -c (install iperf3)")?;
    if !out.status.success() {
        anyhow::bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received.bits_per_second")
}

/// The node a [`NodeLab`]'s daemons run as (`--node`): its view places its pods on it.
const NODE: &str = "n1";
const ADMIN: &str = "127.0.0.1:15000";
const METRICS: &str = "127.0.0.1:15020";
/// How long [`NodeLab::start`] waits for the daemon to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A [`Topology`] and a view file (`view.yaml` in a temporary directory) for a `nodeproxy` daemon
/// in its node namespace: what a privileged daemon test sets up first. Dropping it removes both.
#[derive(Debug)]
pub struct NodeLab {
    /// The node and its pods.
    pub topo: Topology,
    /// The view file the daemons read (`--config`); tests may rewrite it (the daemon re-reads it
    /// every `--config-poll-secs`, and at once on SIGHUP).
    pub config: PathBuf,
    // Held so the view file lives as long as the lab.
    _dir: TempDir,
}

impl NodeLab {
    /// An IPv4-only topology with `pods` pods named by `prefix` (see [`unique_prefix`]), and
    /// `view` written to the view file.
    pub fn create(prefix: String, pods: usize, view: &str) -> anyhow::Result<NodeLab> {
        NodeLab::with_spec(
            TopologySpec {
                prefix,
                pods,
                ipv6: false,
            },
            view,
        )
    }

    /// Like [`NodeLab::create`], with IPv6 addresses and routes as well.
    pub fn dual_stack(prefix: String, pods: usize, view: &str) -> anyhow::Result<NodeLab> {
        NodeLab::with_spec(
            TopologySpec {
                prefix,
                pods,
                ipv6: true,
            },
            view,
        )
    }

    fn with_spec(spec: TopologySpec, view: &str) -> anyhow::Result<NodeLab> {
        let topo = Topology::create(spec).context("create topology")?;
        let dir = tempfile::tempdir().context("create a directory for the view file")?;
        let config = dir.path().join("view.yaml");
        std::fs::write(&config, view)
            .with_context(|| format!("write view file {}", config.display()))?;
        Ok(NodeLab {
            topo,
            config,
            _dir: dir,
        })
    }

    /// Starts `nodeproxy run --config <view file> --node n1 <extra...>` in the node namespace,
    /// without waiting for it to be ready.
    pub fn spawn(&self, extra: &[&str]) -> anyhow::Result<Daemon> {
        let config = self
            .config
            .to_str()
            .context("view file path is not UTF-8")?;
        let mut args = vec!["run", "--config", config, "--node", NODE];
        args.extend_from_slice(extra);
        Daemon::start(self.topo.node(), &args)
    }

    /// Starts the daemon with its admin and metrics endpoints on the node's loopback (ports
    /// 15000 and 15020) and `--capture <capture>`, and waits until it is ready.
    pub fn start(&self, capture: &str) -> anyhow::Result<Daemon> {
        self.start_with(capture, &[])
    }

    /// Like [`NodeLab::start`], with `extra` arguments (e.g. `["--config-poll-secs", "0"]`).
    pub fn start_with(&self, capture: &str, extra: &[&str]) -> anyhow::Result<Daemon> {
        let mut args = vec![
            "--admin-addr",
            ADMIN,
            "--metrics-addr",
            METRICS,
            "--capture",
            capture,
        ];
        args.extend_from_slice(extra);
        let mut daemon = self.spawn(&args)?;
        daemon.wait_ready(READY_TIMEOUT)?;
        Ok(daemon)
    }
}

use nodeproxy::lab::topology::{is_root, which};

/// Panics unless this test can use network namespaces and nftables: we are root and `ip`,
/// `nsenter` and `nft` are installed. The message names what is missing and how to get it.
///
/// Every test that calls it is `#[ignore = "privileged: ..."]`, so a plain `cargo test` lists it
/// as ignored; once asked to run (`--include-ignored`, as `scripts/test.sh` does as root) it
/// must run, never pass by skipping.
pub fn require_privileges() {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (run as root: `sudo scripts/test.sh`)".to_owned());
    }
    missing.extend(missing_tools(&[
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("nft", "nftables"),
    ]));
    assert!(
        missing.is_empty(),
        "this privileged test needs root, ip, nsenter and nft; missing: {}. \
         scripts/test.sh installs the tools (scripts/install-deps.sh) and, as root, runs the \
         privileged tests with --include-ignored",
        missing.join(", ")
    );
}

/// Panics unless every `(tool, Debian package)` in `tools` is on `PATH`, naming the packages to
/// install: for privileged tests that run more than [`require_privileges`] checks.
pub fn require_tools(tools: &[(&str, &str)]) {
    let missing = missing_tools(tools);
    assert!(
        missing.is_empty(),
        "this test needs {}; scripts/install-deps.sh installs them",
        missing.join(", ")
    );
}

fn missing_tools(tools: &[(&str, &str)]) -> Vec<String> {
    tools
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .map(|(tool, package)| format!("`{tool}` (apt-get install {package})"))
        .collect()
}

/// A short topology prefix unique to this process and call: the first two alphanumeric
/// characters of `tag`, the pid in hex, `x`, a counter in hex (e.g. `tp1f3ax0`). Leaves room for
/// the `h<i>` veth suffix within the 15-character interface-name limit.
pub fn unique_prefix(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(2)
        .collect();
    format!("{tag}{:x}x{n:x}", std::process::id())
}

/// The `nodeproxy` binary: `$NODEPROXY_BIN` if set, else `nodeproxy` in the cargo target
/// directory the running test executable was built into (`target/debug/deps/x` ->
/// `target/debug/nodeproxy`). Panics with the fix if it does not exist.
pub fn nodeproxy_bin() -> PathBuf {
    let bin = match std::env::var_os("NODEPROXY_BIN") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("nodeproxy")))
            .unwrap_or_else(|| PathBuf::from("nodeproxy")),
    };
    assert!(
        bin.is_file(),
        "nodeproxy binary not found at {}: run `cargo build -p nodeproxy` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The sum of every sample of the counter `name` with `labels` in this process's own metrics
/// recorder (the daemon's, installed on first use; in-process control planes record there too).
pub fn local_counter(name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = nodeproxy::metrics::handle().render();
    let scrape = nodeproxy::admin_client::parse_metrics(&text)
        .expect("the recorder renders Prometheus text that parses");
    nodeproxy::admin_client::metric_sum(&scrape, name, labels)
}
