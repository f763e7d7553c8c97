//! Benchmark (not a test): the noisy neighbour. Tenant A (the victim) measures ping-pong
//! latency (`sockperf pp`) and sequential new-connection rate through nodeproxy, alone and while
//! tenant B pushes bulk traffic (`iperf3 -P 4`) through the same daemon; with isolation on
//! (`--isolation per-tenant`) and off (`--isolation shared`), in one run.
//!
//! Like kubelet, every pod's processes run in a CPU cgroup of their own with equal weight, and
//! the daemon in one more (a DaemonSet pod); without that, the pods' own processes would compete
//! as raw processes and no proxy could protect the victim.
//!
//! Run it with `scripts/bench-fairness.sh` (release build, root). The last line is
//! `victim_p99_ratio=… victim_conn_rate_ratio=… off_p99_ratio=… … control_p99_ratio=…
//! control_conn_rate_ratio=…` (with B / alone; the control is a pod pair outside the mesh, what
//! the kernel alone gives, measured the same two ways).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nodeproxy_tests::{
    Daemon, IPERF3_PORT, LISTEN_TIMEOUT, Netns, Topology, TopologySpec, nodeproxy_bin,
    unique_prefix, wait_for_listener,
};

/// Pods: 1 victim client (tenant A), 2 victim server, 3 bulk client (tenant B), 4 bulk server;
/// 5 → 6, a client and server outside the mesh (not in the view: never captured), the control.
const VIEW: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {nodeproxy.io/mesh: enabled}}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: victim, namespace: bench}\n\
spec: {serviceAccountName: victim, nodeName: n1, containers: [{name: c, image: i}]}\n\
status: {phase: Running, podIP: 10.200.1.2}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: bulk, namespace: bench}\n\
spec: {serviceAccountName: bulk, nodeName: n1, containers: [{name: c, image: i}]}\n\
status: {phase: Running, podIP: 10.200.3.2}\n";

const SOCKPERF_PORT: u16 = 11111;
/// CPU groups: one per pod (5 and 6 are a pair outside the mesh, the control) and the daemon's.
const POD_GROUPS: [&str; 7] = ["pod1", "pod2", "pod3", "pod4", "pod5", "pod6", "daemon"];
/// The connection-rate echo server listens on `ECHO_PORTS` ports from `ECHO_PORT`; every
/// measurement dials a fresh one, so TIME_WAIT and conntrack entries of earlier rounds (tens of
/// thousands of connections) never collide with new ones and slow the later rounds.
const ECHO_PORT: u16 = 7000;
const ECHO_PORTS: u16 = 64;
/// Above this share of a round's CPU time taken by the hypervisor, the run says to run again.
const STEAL_WARN: f64 = 0.05;
static NEXT_ECHO: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // Helper roles, run as child processes inside a pod's namespace and cgroup.
    match args.get(1).map(String::as_str) {
        Some("echo-server") => return echo_server(args.get(2).context("port")?.parse()?),
        Some("conn-storm") => {
            return conn_storm(
                args.get(2).context("addr")?.parse()?,
                args.get(3).context("secs")?.parse()?,
            );
        }
        Some("conn-rate") => {
            return conn_rate(
                args.get(2).context("addr")?.parse()?,
                args.get(3).context("secs")?.parse()?,
            );
        }
        _ => {}
    }
    let secs: u64 = env_or("SECONDS", 5);
    // Five rounds at least: one round's p99 beside B varies ×2 (121–422 µs in one run).
    let rounds: usize = env_or("ROUNDS", 5);
    nodeproxy::lab::topology::check_privileges()?;
    // Held for the whole run: while open, idle CPUs poll instead of halting.
    let idle = IdleMode::from_env()?;
    let cg = PodCgroups::create()?;
    let topo = Topology::create(TopologySpec {
        prefix: unique_prefix("bf"),
        pods: 6,
        ipv6: false,
    })?;
    let me = std::env::current_exe()?;
    let spawn_in = |pod: usize, program: &Path, args: &[&str]| -> anyhow::Result<()> {
        let child = cg.spawn(&format!("pod{pod}"), topo.pod(pod), program, args)?;
        topo.track(child);
        Ok(())
    };
    // sockperf servers: the victim's (pod 2) and the control's (pod 6).
    for pod in [2, 6] {
        spawn_in(
            pod,
            Path::new("sockperf"),
            &[
                "sr",
                "--tcp",
                "-i",
                "0.0.0.0",
                "-p",
                &SOCKPERF_PORT.to_string(),
            ],
        )?;
    }
    for pod in [2, 4, 6] {
        spawn_in(pod, &me, &["echo-server", &ECHO_PORT.to_string()])?;
    }
    spawn_in(
        4,
        Path::new("iperf3"),
        &["-s", "-p", &IPERF3_PORT.to_string()],
    )?;
    // The echo server binds all its ports before it serves: its last one listening means all do.
    let last_echo_port = ECHO_PORT + ECHO_PORTS - 1;
    let servers = [(2, SOCKPERF_PORT), (6, SOCKPERF_PORT), (4, IPERF3_PORT)]
        .into_iter()
        .chain([2, 4, 6].map(|pod| (pod, last_echo_port)));
    for (pod, port) in servers {
        wait_for_listener(topo.pod(pod), port, LISTEN_TIMEOUT)
            .with_context(|| format!("pod {pod}'s server on port {port} did not start"))?;
    }

    let dir = tempfile::tempdir()?;
    let view = dir.path().join("view.yaml");
    let mut text = VIEW.to_owned();
    if let Ok(w) = std::env::var("TENANT_WEIGHT") {
        for sa in ["victim", "bulk"] {
            text.push_str(&format!("---\napiVersion: nodeproxy.io/v1alpha1\nkind: TenantPolicy\nmetadata: {{name: {sa}, namespace: bench}}\nspec: {{serviceAccount: {sa}, weight: {w}}}\n"));
        }
    }
    std::fs::write(&view, text)?;
    eprintln!(
        "nodeproxy binary: {}; cgroups: {}",
        nodeproxy_bin().display(),
        cg.describe()
    );

    // What tenant B does: `bulk` (iperf3 -P 4, the default) or `storm` (STORM_CLIENTS parallel
    // clients opening connections as fast as they can: a tenant in a reconnect loop).
    let neighbour = std::env::var("NEIGHBOUR").unwrap_or_else(|_| "bulk".into());
    if !["bulk", "storm"].contains(&neighbour.as_str()) {
        bail!("NEIGHBOUR={neighbour:?}: give bulk (iperf3 -P 4) or storm (a connection storm)");
    }
    let storm_clients: u16 = env_or("STORM_CLIENTS", 4);
    eprintln!("tenant B: {neighbour}");

    let mut log = RoundLog::create()?;
    let mut results = Vec::new();
    // Every round of every pair, for the steal summary.
    let mut all_rounds: Vec<Measured> = Vec::new();
    let (mut control_alone, mut control_noisy) = (Vec::new(), Vec::new());
    // MODES=per-tenant skips the shared runtime (quick experiments on isolation itself).
    let modes = std::env::var("MODES").unwrap_or_else(|_| "per-tenant,shared".into());
    let modes: Vec<&str> = modes.split(',').collect();
    if modes.first() != Some(&"per-tenant")
        || modes.iter().any(|m| !["per-tenant", "shared"].contains(m))
    {
        bail!(
            "MODES={modes:?}: give per-tenant, optionally followed by shared (per-tenant,shared)"
        );
    }
    for mode in modes {
        let mut daemon = cg.start_daemon(&topo, &view, mode)?;
        daemon.wait_ready(Duration::from_secs(20))?;
        let mut alone = Vec::new();
        let mut noisy = Vec::new();
        for round in 1..=rounds {
            // The control pair does not go through the daemon: measured in the first mode only.
            let control = mode == "per-tenant";
            if control {
                let c = measure_pair(&topo, &cg, &me, (5, 6), secs)?;
                log.round("outside the mesh", round, rounds, "alone", &c)?;
                control_alone.push(c);
            }
            let a = measure_pair(&topo, &cg, &me, (1, 2), secs)?;
            log.round(mode, round, rounds, "alone", &a)?;
            alone.push(a);
            let b_secs = (3 * secs + 10).to_string();
            let mut bulk = if neighbour == "storm" {
                (0..storm_clients)
                    .map(|i| {
                        let addr = SocketAddr::from((topo.pod_ip(4), ECHO_PORT + i % ECHO_PORTS));
                        cg.spawn(
                            "pod3",
                            topo.pod(3),
                            &me,
                            &["conn-storm", &addr.to_string(), &b_secs],
                        )
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?
            } else {
                let server = topo.pod_ip(4).to_string();
                let args = ["-c", &server, "-P", "4", "-t", &b_secs];
                vec![cg.spawn("pod3", topo.pod(3), Path::new("iperf3"), &args)?]
            };
            std::thread::sleep(Duration::from_secs(1));
            if control && let Ok(c) = measure_pair(&topo, &cg, &me, (5, 6), secs) {
                log.round("outside the mesh", round, rounds, "with B", &c)?;
                control_noisy.push(c);
            }
            let n = measure_pair(&topo, &cg, &me, (1, 2), secs);
            for b in &mut bulk {
                let _ = b.kill();
                let _ = b.wait();
            }
            let n = n?;
            log.round(mode, round, rounds, "with B", &n)?;
            noisy.push(n);
            std::thread::sleep(Duration::from_millis(500));
        }
        let metrics = daemon.metrics()?;
        let victim = "spiffe://cluster.local/ns/bench/sa/victim";
        let bulk_t = "spiffe://cluster.local/ns/bench/sa/bulk";
        let opened = |t: &str| {
            nodeproxy::admin_client::metric_sum(
                &metrics,
                nodeproxy::metrics::TCP_OPEN_TOTAL,
                &[("tenant", t)],
            )
        };
        if opened(victim) < 1.0 || opened(bulk_t) < 1.0 {
            bail!(
                "[{mode}] traffic did not go through nodeproxy: victim {} bulk {}",
                opened(victim),
                opened(bulk_t)
            );
        }
        daemon.stop()?;
        let r = ModeResult::of(&alone, &noisy);
        all_rounds.extend(alone.iter().chain(&noisy).copied());
        println!(
            "{mode:>10}: victim p99 {:.0} µs alone → {:.0} µs with B (×{:.2}); conn rate {:.0}/s → {:.0}/s (×{:.2})",
            r.p99_alone,
            r.p99_noisy,
            r.p99_noisy / r.p99_alone,
            r.rate_alone,
            r.rate_noisy,
            r.rate_noisy / r.rate_alone
        );
        results.push(r);
    }
    let on = &results[0];
    // Without the shared mode (MODES=per-tenant) its ratios print as NaN.
    let off = results.get(1).unwrap_or(&ModeResult {
        p99_alone: f64::NAN,
        p99_noisy: f64::NAN,
        rate_alone: f64::NAN,
        rate_noisy: f64::NAN,
    });
    all_rounds.extend(control_alone.iter().chain(&control_noisy).copied());
    let steal = median(all_rounds.iter().map(|m| m.steal).collect());
    let worst = all_rounds.iter().map(|m| m.steal).fold(0.0, f64::max);
    println!(
        "hypervisor steal: median {:.1} %, worst {:.1} % of a round's CPU time{}",
        steal * 100.0,
        worst * 100.0,
        if worst > STEAL_WARN {
            format!(
                " — the host was busy: rounds above {:.0} % measured it, not us; run again",
                STEAL_WARN * 100.0
            )
        } else {
            String::new()
        }
    );
    let control = ModeResult::of(&control_alone, &control_noisy);
    println!(
        "outside the mesh (the kernel alone, no proxy): p99 with B / alone ×{:.2}, conn rate ×{:.2}",
        control.p99_ratio(),
        control.rate_ratio()
    );
    if control.p99_ratio() < 1.0 && !idle.polling() {
        println!(
            "outside the mesh, p99 alone was above p99 with B: the alone rounds include idle vCPU wake-ups; IDLE=poll measures the path alone"
        );
    }
    println!(
        "victim_p99_ratio={:.2} victim_conn_rate_ratio={:.2} off_p99_ratio={:.2} off_conn_rate_ratio={:.2} control_p99_ratio={:.2} control_conn_rate_ratio={:.2}",
        on.p99_ratio(),
        on.rate_ratio(),
        off.p99_ratio(),
        off.rate_ratio(),
        control.p99_ratio(),
        control.rate_ratio(),
    );
    Ok(())
}

struct ModeResult {
    p99_alone: f64,
    p99_noisy: f64,
    rate_alone: f64,
    rate_noisy: f64,
}

impl ModeResult {
    /// Medians over the rounds alone and with B.
    fn of(alone: &[Measured], noisy: &[Measured]) -> Self {
        let p99 = |v: &[Measured]| median(v.iter().map(|x| x.p99_us).collect());
        let rate = |v: &[Measured]| median(v.iter().map(|x| x.conn_per_s).collect());
        Self {
            p99_alone: p99(alone),
            p99_noisy: p99(noisy),
            rate_alone: rate(alone),
            rate_noisy: rate(noisy),
        }
    }

    fn p99_ratio(&self) -> f64 {
        self.p99_noisy / self.p99_alone
    }

    fn rate_ratio(&self) -> f64 {
        self.rate_noisy / self.rate_alone
    }
}

/// One pair's figures in one round.
#[derive(Debug, Clone, Copy)]
struct Measured {
    p99_us: f64,
    p50_us: f64,
    conn_per_s: f64,
    /// The share of CPU time the hypervisor took from this VM meanwhile (`steal` in
    /// `/proc/stat`): above a few per cent, the round measured the host, not us.
    steal: f64,
}

impl std::fmt::Display for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.0} µs, p99 {:.0} µs, {:.0} conn/s (steal {:.0} %)",
            self.p50_us,
            self.p99_us,
            self.conn_per_s,
            self.steal * 100.0
        )
    }
}

/// Prints each round as it ends and, with `OUT_DIR` set, appends it to `OUT_DIR/rounds.csv`
/// (one row per pair, round and phase; `scripts/plot-fairness.py` draws it).
struct RoundLog {
    csv: Option<std::fs::File>,
}

impl RoundLog {
    fn create() -> anyhow::Result<Self> {
        let Some(dir) = std::env::var_os("OUT_DIR") else {
            return Ok(Self { csv: None });
        };
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("OUT_DIR {}", dir.display()))?;
        let path = dir.join("rounds.csv");
        let mut csv = std::fs::File::create(&path)
            .with_context(|| format!("OUT_DIR: cannot write {}", path.display()))?;
        writeln!(csv, "pair,round,phase,p50_us,p99_us,conn_per_s,steal")?;
        eprintln!("rounds: {}", path.display());
        Ok(Self { csv: Some(csv) })
    }

    fn round(
        &mut self,
        pair: &str,
        round: usize,
        rounds: usize,
        phase: &str,
        m: &Measured,
    ) -> anyhow::Result<()> {
        eprintln!("[{pair}] round {round}/{rounds} {phase}: {m}");
        if let Some(csv) = &mut self.csv {
            writeln!(
                csv,
                "{pair},{round},{phase},{:.1},{:.1},{:.1},{:.4}",
                m.p50_us, m.p99_us, m.conn_per_s, m.steal
            )?;
        }
        Ok(())
    }
}

/// A pair's two measurements, one after the other, from the `client` pod's cgroup to the
/// `server` pod: the victim (1 → 2) or the control outside the mesh (5 → 6).
fn measure_pair(
    topo: &Topology,
    cg: &PodCgroups,
    me: &Path,
    (client, server): (usize, usize),
    secs: u64,
) -> anyhow::Result<Measured> {
    let before = CpuTimes::now()?;
    let (p50_us, p99_us) = ping_pong(topo, cg, client, server, secs)?;
    let port =
        ECHO_PORT + NEXT_ECHO.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % ECHO_PORTS;
    let addr = SocketAddr::from((topo.pod_ip(server), port)).to_string();
    let out = cg
        .command(
            &format!("pod{client}"),
            topo.pod(client),
            me,
            &["conn-rate", &addr, &secs.to_string()],
        )
        .output()?;
    let conn_per_s: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| {
            format!(
                "conn-rate printed {:?} {:?}",
                out.stdout,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(Measured {
        p99_us,
        p50_us,
        conn_per_s,
        steal: CpuTimes::now()?.steal_since(&before),
    })
}

/// The machine's CPU time so far, from the `cpu` line of `/proc/stat` (in ticks).
struct CpuTimes {
    total: u64,
    steal: u64,
}

impl CpuTimes {
    fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        // cpu  user nice system idle iowait irq softirq steal guest guest_nice
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .context("no cpu line in /proc/stat")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        let steal = *fields.get(7).context("no steal field in /proc/stat")?;
        // guest time is already counted in user time.
        Ok(Self {
            total: fields.iter().take(8).sum(),
            steal,
        })
    }

    /// The fraction of CPU time stolen since `earlier`.
    fn steal_since(&self, earlier: &Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total).max(1);
        self.steal.saturating_sub(earlier.steal) as f64 / total as f64
    }
}

/// `sockperf pp` from pod `client` (in its cgroup) to the sockperf server in pod `server`:
/// (p50, p99) of the round-trip time in µs.
fn ping_pong(
    topo: &Topology,
    cg: &PodCgroups,
    client: usize,
    server: usize,
    secs: u64,
) -> anyhow::Result<(f64, f64)> {
    let out = cg
        .command(
            &format!("pod{client}"),
            topo.pod(client),
            Path::new("sockperf"),
            &[
                "pp",
                "--tcp",
                "-i",
                &topo.pod_ip(server).to_string(),
                "-p",
                &SOCKPERF_PORT.to_string(),
                "-t",
                &secs.to_string(),
                "-m",
                "64",
                "--full-rtt",
            ],
        )
        .output()
        .context("run sockperf pp (install sockperf)")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let pct = |p: &str| -> anyhow::Result<f64> {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next()?.trim().parse().ok())
            .with_context(|| format!("no percentile {p} in sockperf output:\n{text}"))
    };
    Ok((pct("50.000")?, pct("99.000")?))
}

/// Helper role: echo one message per connection (the victim's connection-rate server), on
/// `ECHO_PORTS` ports from `port`, one thread each.
fn echo_server(port: u16) -> anyhow::Result<()> {
    let listeners = (0..ECHO_PORTS)
        .map(|i| TcpListener::bind(("0.0.0.0", port + i)))
        .collect::<Result<Vec<_>, _>>()?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(mut s) = s else { continue };
                    let mut buf = [0u8; 64];
                    if let Ok(n) = s.read(&mut buf) {
                        let _ = s.write_all(&buf[..n]);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Helper role: sequential connect → 1 byte → echo → close for `secs`; prints connections/s.
fn conn_rate(addr: SocketAddr, secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        n += 1;
    }
    println!("{:.1}", n as f64 / start.elapsed().as_secs_f64());
    Ok(())
}

/// Helper role: connect → 1 byte → echo → reset, as fast as possible for `secs`, on and on
/// through errors (a tenant in a reconnect loop). The reset (linger 0) leaves no TIME_WAIT, so
/// the storm does not run out of ports.
fn conn_storm(addr: SocketAddr, secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let one = || -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)
        };
        if one().is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

/// Per-pod CPU cgroups with equal weights, as kubelet gives every pod (cgroup v1 `cpu.shares`
/// here; v2 `cpu.weight` where `/sys/fs/cgroup` is cgroup2 with the cpu controller).
struct PodCgroups {
    root: PathBuf,
    v2: bool,
}

impl PodCgroups {
    fn create() -> anyhow::Result<Self> {
        let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"));
        let base = if v2 {
            "/sys/fs/cgroup"
        } else {
            "/sys/fs/cgroup/cpu"
        };
        let root = Path::new(base).join(format!("npbench-{}", std::process::id()));
        std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        if v2 {
            std::fs::write(root.join("cgroup.subtree_control"), "+cpu")?;
        }
        let me = Self { root, v2 };
        // The daemon's pod weight: by default a pod's worth per tenant it serves (2 here), as
        // a DaemonSet sized by its CPU request would be.
        let daemon_weight: u64 = env_or("DAEMON_WEIGHT", 200);
        for g in POD_GROUPS {
            let dir = me.root.join(g);
            std::fs::create_dir_all(&dir)?;
            let weight = if g == "daemon" { daemon_weight } else { 100 };
            if v2 {
                std::fs::write(dir.join("cpu.weight"), weight.to_string())?;
            } else {
                std::fs::write(dir.join("cpu.shares"), (weight * 1024 / 100).to_string())?;
            }
        }
        Ok(me)
    }

    fn describe(&self) -> String {
        let groups = if self.flat() {
            "tenant groups beside the pods"
        } else {
            "tenant groups under the daemon's group"
        };
        let v = if self.v2 { "v2" } else { "v1" };
        format!("{} ({v}, {groups})", self.root.display())
    }

    /// TENANT_GROUPS=flat (default on cgroup v1): tenant groups beside the pods, as
    /// `--cgroup-parent` puts them; `nested`: under the daemon's own group.
    fn flat(&self) -> bool {
        !self.v2 && std::env::var("TENANT_GROUPS").as_deref() != Ok("nested")
    }

    /// A command that runs `program` in `ns`, first moving itself into cgroup `group`.
    fn command(&self, group: &str, ns: &Netns, program: &Path, args: &[&str]) -> Command {
        let procs = self.root.join(group).join("cgroup.procs");
        let mut cmd = ns.command("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > {} && exec \"$0\" \"$@\"",
                procs.display()
            ))
            .arg(program)
            .args(args);
        cmd
    }

    fn spawn(
        &self,
        group: &str,
        ns: &Netns,
        program: &Path,
        args: &[&str],
    ) -> anyhow::Result<Child> {
        self.command(group, ns, program, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {} in {group}", program.display()))
    }

    fn start_daemon(
        &self,
        topo: &Topology,
        view: &Path,
        isolation: &str,
    ) -> anyhow::Result<Daemon> {
        let procs = self.root.join("daemon").join("cgroup.procs");
        let bin = nodeproxy_bin();
        let script = format!("echo $$ > {} && exec \"$0\" \"$@\"", procs.display());
        let view = view.to_str().context("utf-8 path")?;
        let mut args = vec![
            "-c".to_owned(),
            script,
            bin.to_str().context("utf-8 path")?.to_owned(),
            "run".into(),
            "--config".into(),
            view.into(),
            "--node".into(),
            "n1".into(),
            "--log".into(),
            "warn".into(),
            "--isolation".into(),
            isolation.into(),
        ];
        if self.flat() {
            let parent = self
                .root
                .strip_prefix("/sys/fs/cgroup/cpu")
                .unwrap_or(&self.root);
            args.extend(["--cgroup-parent".to_owned(), parent.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_program(topo.node(), "sh", &args)
    }
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        // Processes were killed with the topology; empty groups can go, children first.
        for g in POD_GROUPS {
            let dir = self.root.join(g);
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                // The daemon's tenant groups live below its group until it exits.
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for e in entries.flatten().filter(|e| e.path().is_dir()) {
                        remove_tree(&e.path());
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Flat tenant groups left by a killed daemon.
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten().filter(|e| e.path().is_dir()) {
                remove_tree(&e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten().filter(|e| e.path().is_dir()) {
            remove_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The median; NaN for no values.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// How idle CPUs wait for work during the run. In a VM whose idle vCPUs halt, a halted vCPU is
/// woken through the hypervisor (tens of µs). A ping-pong alone lets its CPUs halt between
/// messages; beside a bulk tenant they never idle. So with halting (`IDLE=halt`, the default:
/// the node's own setting) the alone baseline includes idle wake-ups and p99 with B can come out
/// *below* it. `IDLE=poll` holds `/dev/cpu_dma_latency` at 0 (the PM QoS request latency tuning
/// profiles make) for the run, so idle CPUs poll and the alone baseline is the path itself.
struct IdleMode {
    /// The PM QoS request; closing it withdraws the request.
    request: Option<std::fs::File>,
}

impl IdleMode {
    fn polling(&self) -> bool {
        self.request.is_some()
    }

    fn from_env() -> anyhow::Result<Self> {
        let mode = std::env::var("IDLE").unwrap_or_else(|_| "halt".into());
        match mode.as_str() {
            "halt" => {
                eprintln!("idle CPUs: the kernel's choice (IDLE=poll to keep them polling)");
                Ok(Self { request: None })
            }
            "poll" => {
                let path = "/dev/cpu_dma_latency";
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .with_context(|| format!("{path}: cannot hold idle CPUs polling; run with IDLE=halt to measure without"))?;
                f.write_all(&0i32.to_ne_bytes())
                    .with_context(|| format!("{path}: writing 0"))?;
                eprintln!("idle CPUs: polling, {path} held at 0 µs (IDLE=poll)");
                Ok(Self { request: Some(f) })
            }
            other => bail!("IDLE={other:?}: give halt (the kernel's choice, the default) or poll"),
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
