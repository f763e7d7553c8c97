//! `nodeproxy demo`: the whole product on one machine, in a minute.
//!
//! Builds a throwaway node network namespace with four pod namespaces joined by routed veths
//! (the addresses of `examples/demo.yaml`), starts the real daemon inside the node namespace
//! with real nftables rules, sends TCP traffic between pods, prints a per-tenant table read
//! from the daemon's own `/tenants` and `/metrics`, then stops the daemon, checks that its
//! rules are gone and removes every namespace — also on failure or Ctrl-C.
//!
//! Must not touch: the host's own namespace, firewall, routes or sysctls.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::admin_client;
use crate::lab::topology::{self, Netns, Topology, TopologySpec};

/// `nodeproxy demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Connections per traffic flow.
    #[arg(long, default_value_t = 20)]
    pub connections: usize,
    /// Bytes each connection sends (and gets echoed back).
    #[arg(long, default_value_t = 256 * 1024)]
    pub bytes: usize,
    /// Keep the topology and daemon running until Ctrl-C, to poke at it by hand.
    #[arg(long)]
    pub hold: bool,
}

const PREFIX: &str = "npdemo";
const ECHO_PORT: u16 = 8080;
const ADMIN: &str = "127.0.0.1:15000";
const METRICS: &str = "127.0.0.1:15020";

/// The pods of `examples/demo.yaml`, by topology index.
const PODS: [(&str, &str); 4] = [
    ("shop/frontend-0", "frontend"),
    ("shop/cart-0", "cart"),
    ("billing/ledger-0", "ledger"),
    ("legacy/batch-0", "not meshed"),
];

/// Traffic flows: (from pod, to pod).
const FLOWS: [(usize, usize); 4] = [(1, 2), (2, 3), (3, 1), (4, 2)];

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    topology::check_privileges().context(
        "the demo builds network namespaces and nftables rules, so it needs root \
         (CAP_SYS_ADMIN + CAP_NET_ADMIN), the `ip` tool (iproute2) and `nft` (nftables); \
         scripts/install-deps.sh installs the tools",
    )?;
    if redirect::Nft::new().is_err() {
        bail!("the `nft` binary is missing: install nftables (scripts/install-deps.sh does)");
    }
    let exe = std::env::current_exe().context("cannot find our own executable")?;

    step("building a node namespace and 4 pod namespaces (routed veths, 10.200.<i>.0/24)");
    let topo = Arc::new(Mutex::new(Some(Topology::create(TopologySpec {
        prefix: PREFIX.to_owned(),
        pods: PODS.len(),
        ipv6: false,
    })?)));
    cleanup_on_signal(topo.clone());
    let result = with_topology(&topo, |t| demo(t, &exe, &args));
    if let Some(mut t) = lock(&topo).take() {
        step("removing the namespaces");
        t.cleanup()?;
    }
    result
}

fn demo(topo: &Topology, exe: &PathBuf, args: &DemoArgs) -> anyhow::Result<()> {
    let log_path = std::env::temp_dir().join(format!("nodeproxy-demo-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)?;
    step("starting nodeproxy in the node namespace (embedded view: examples/demo.yaml)");
    let child = topo
        .node()
        .command(exe)
        .args(["run", "--admin-addr", ADMIN, "--metrics-addr", METRICS])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the daemon")?;
    let pid = child.id();
    topo.track(child);
    let admin: SocketAddr = ADMIN.parse()?;
    let metrics: SocketAddr = METRICS.parse()?;
    let ready = topo
        .node()
        .run(|| admin_client::wait_ok(admin, "/ready", Duration::from_secs(20)))?;
    if let Err(e) = ready {
        let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!("the daemon did not become ready: {e:#}\n--- daemon log ---\n{logs}");
    }
    let rules = topo
        .node()
        .command("nft")
        .args(["list", "table", "inet", "nodeproxy"])
        .output()?;
    println!("{}", indent(&String::from_utf8_lossy(&rules.stdout)));
    println!(
        "    policy routing (TPROXY delivers marked packets locally):\n{}",
        indent(&policy_routing(topo)?)
    );

    step("starting echo servers on :8080 in every pod");
    for pod in topo.pods() {
        echo_server(pod)?;
    }
    for &(from, to) in &FLOWS {
        let dst = SocketAddr::from((topo.pod_ip(to), ECHO_PORT));
        let started = Instant::now();
        let n = args.connections;
        let bytes = args.bytes;
        let outcome = topo.pod(from).run(move || traffic(dst, n, bytes))?;
        let ok = outcome
            .with_context(|| format!("traffic {} → {} failed", PODS[from - 1].0, PODS[to - 1].0))?;
        println!(
            "  {:<18} → {:<18} {n} connections, {} echoed, {:?}",
            PODS[from - 1].0,
            PODS[to - 1].0,
            human(ok as f64),
            started.elapsed()
        );
    }

    step("what the daemon saw (from /tenants and /metrics)");
    let (tenants, scrape) = topo.node().run(move || -> anyhow::Result<_> {
        let (_, tenants) = admin_client::get(admin, "/tenants")?;
        let (_, text) = admin_client::get(metrics, "/metrics")?;
        Ok((tenants, text))
    })??;
    print_table(&tenants, &scrape)?;

    if args.hold {
        step(&format!(
            "holding; try: ip netns exec {PREFIX}-node curl -s {ADMIN}/tenants   (Ctrl-C ends)"
        ));
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    step("stopping the daemon (SIGTERM) and checking its rules are gone");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    // The daemon drains its connections (up to 5 s) before it removes the rules.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = topo
            .node()
            .command("nft")
            .args(["list", "tables"])
            .output()?;
        let tables = String::from_utf8_lossy(&out.stdout).into_owned();
        let routing = policy_routing(topo)?;
        if !tables.contains("nodeproxy") && routing.trim().is_empty() {
            println!(
                "  rules removed: `nft list tables` in the node namespace shows no nodeproxy table, \
                 and no `ip rule` looks up table {}",
                redirect::DEFAULT_ROUTE_TABLE
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("the daemon did not remove its rules within 15 s: {tables}{routing}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&log_path);
    Ok(())
}

fn print_table(tenants_json: &str, metrics_text: &str) -> anyhow::Result<()> {
    let tenants: serde_json::Value = serde_json::from_str(tenants_json)?;
    let scrape = admin_client::parse_metrics(metrics_text)?;
    let sum =
        |name: &str, tenant: &str| admin_client::metric_sum(&scrape, name, &[("tenant", tenant)]);
    println!(
        "  {:<44} {:<18} {:>6} {:>12} {:>12} {:>7} {:>9}",
        "tenant", "pods", "conns", "from pods", "to pods", "weight", "cpu ms"
    );
    for t in tenants.as_array().into_iter().flatten() {
        let id = t["tenant"].as_str().unwrap_or_default();
        let pods: Vec<&str> = t["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["pod"].as_str())
            .collect();
        println!(
            "  {:<44} {:<18} {:>6} {:>12} {:>12} {:>7} {:>9.1}",
            id,
            pods.join(","),
            sum(crate::metrics::TCP_OPEN_TOTAL, id),
            human(sum(crate::metrics::TCP_READ_BYTES_TOTAL, id)),
            human(sum(crate::metrics::TCP_WRITE_BYTES_TOTAL, id)),
            t["weight"].as_u64().unwrap_or_default(),
            t["cpu_seconds"].as_f64().unwrap_or_default() * 1000.0,
        );
    }
    if let Some(t) = tenants.as_array().and_then(|a| a.first()) {
        println!(
            "  each tenant runs on a thread of its own ({}), CPU-weighted by {}",
            t["isolation"].as_str().unwrap_or("?"),
            t["cpu_share"].as_str().unwrap_or("?")
        );
    }
    let refused = admin_client::metric_sum(&scrape, crate::metrics::TCP_REFUSED_TOTAL, &[]);
    println!(
        "  legacy/batch-0 is in a namespace without nodeproxy.io/mesh=enabled: its traffic was \
         not captured. Refused connections: {refused}"
    );
    Ok(())
}

/// An echo server on :8080 in `pod`, one thread per connection, for the life of the process.
fn echo_server(pod: &Netns) -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    pod.spawn(move || {
        let listener = TcpListener::bind(("0.0.0.0", ECHO_PORT));
        let ok = listener.as_ref().map(|_| ()).map_err(|e| e.to_string());
        let _ = tx.send(ok);
        let Ok(listener) = listener else { return };
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    })?;
    rx.recv()?
        .map_err(|e| anyhow::anyhow!("echo server in {}: {e}", pod.name()))
}

/// Opens `n` connections to `dst`, each sending `bytes` and reading them back. Returns the
/// bytes echoed.
fn traffic(dst: SocketAddr, n: usize, bytes: usize) -> anyhow::Result<usize> {
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut total = 0;
    for _ in 0..n {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .with_context(|| format!("connect to {dst}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut writer = s.try_clone()?;
        let data = payload.clone();
        let w = std::thread::spawn(move || -> std::io::Result<()> {
            writer.write_all(&data)?;
            writer.shutdown(std::net::Shutdown::Write)
        });
        let mut echoed = Vec::with_capacity(bytes);
        s.read_to_end(&mut echoed)?;
        w.join()
            .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
        if echoed != payload {
            bail!(
                "{dst} echoed {} bytes that differ from the {} sent",
                echoed.len(),
                bytes
            );
        }
        total += echoed.len();
    }
    Ok(total)
}

fn with_topology<R>(
    topo: &Arc<Mutex<Option<Topology>>>,
    f: impl FnOnce(&Topology) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let guard = lock(topo);
    let t = guard.as_ref().context("topology already removed")?;
    f(t)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// On Ctrl-C or SIGTERM, remove the namespaces (which also kills the daemon) and exit.
fn cleanup_on_signal(topo: Arc<Mutex<Option<Topology>>>) {
    let _ = std::thread::Builder::new()
        .name("np-demo-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            });
            eprintln!("\ninterrupted: removing the demo namespaces");
            // The main thread may hold the lock while it waits on traffic; clean up without it.
            let names = [format!("{PREFIX}-node")]
                .into_iter()
                .chain((1..=PODS.len()).map(|i| format!("{PREFIX}-pod{i}")));
            for name in names {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "pids", &name])
                    .output()
                    .map(|o| {
                        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                            let _ = std::process::Command::new("kill")
                                .args(["-9", pid])
                                .status();
                        }
                    });
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &name])
                    .status();
            }
            if let Ok(mut guard) = topo.try_lock() {
                // Already deleted above; forget it so its Drop does not try again.
                std::mem::forget(guard.take());
            }
            std::process::exit(130);
        });
}

fn step(msg: &str) {
    println!("==> {msg}");
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn human(bytes: f64) -> String {
    if bytes >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
    } else if bytes >= 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// The node's `ip rule`s that look up TPROXY's routing table, both families.
fn policy_routing(topo: &Topology) -> anyhow::Result<String> {
    let mut out = String::new();
    for family in ["-4", "-6"] {
        let table = redirect::DEFAULT_ROUTE_TABLE.to_string();
        let listing = topo
            .node()
            .command("ip")
            .args([family, "rule", "show", "table", &table])
            .output()
            .context("run `ip rule show` in the node namespace")?;
        for line in String::from_utf8_lossy(&listing.stdout).lines() {
            out.push_str(&format!("ip {family} rule {line}\n"));
        }
    }
    Ok(out)
}
