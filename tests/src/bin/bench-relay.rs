//! Benchmark (not a test): iperf3 single stream pod → pod, direct vs through nodeproxy's plain
//! TCP relay, alternating in one run. Prints the medians and, last, `relay_throughput_ratio=`.
//!
//! Run it with `scripts/bench-relay.sh` (release build, root). Needs iperf3, ip and nft.

use std::time::Duration;

use anyhow::{Context, bail};
use nodeproxy_tests::{
    Daemon, IPERF3_PORT, LISTEN_TIMEOUT, Topology, TopologySpec, iperf3_bps, nodeproxy_bin,
    unique_prefix, wait_for_listener,
};

const VIEW: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {nodeproxy.io/mesh: enabled}}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: bench}\n\
spec: {serviceAccountName: client, nodeName: n1, containers: [{name: c, image: i}]}\n\
status: {phase: Running, podIP: 10.200.1.2}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: bench}\n\
spec: {serviceAccountName: server, nodeName: n1, containers: [{name: c, image: i}]}\n\
status: {phase: Running, podIP: 10.200.2.2}\n";

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let secs: u32 = std::env::var("SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    nodeproxy::lab::topology::check_privileges()?;
    let topo = Topology::create(TopologySpec {
        prefix: unique_prefix("br"),
        pods: 2,
        ipv6: false,
    })?;
    let server = topo
        .pod(2)
        .command("iperf3")
        .args(["-s", "-B", &topo.pod_ip(2).to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("start iperf3 -s (install iperf3)")?;
    topo.track(server);
    wait_for_listener(topo.pod(2), IPERF3_PORT, LISTEN_TIMEOUT)?;

    let dir = tempfile::tempdir()?;
    let view = dir.path().join("view.yaml");
    std::fs::write(&view, VIEW)?;
    eprintln!("nodeproxy binary: {}", nodeproxy_bin().display());

    let mut direct = Vec::new();
    let mut proxied = Vec::new();
    for round in 1..=rounds {
        let d = iperf3_bps(topo.pod(1), topo.pod_ip(2).into(), secs)?;
        eprintln!("round {round}/{rounds}: direct  {:6.2} Gbit/s", d / 1e9);
        direct.push(d);
        let mut daemon = Daemon::start(
            topo.node(),
            &[
                "run",
                "--config",
                view.to_str().context("utf-8 path")?,
                "--node",
                "n1",
                "--log",
                "warn",
            ],
        )?;
        daemon.wait_ready(Duration::from_secs(20))?;
        let p = iperf3_bps(topo.pod(1), topo.pod_ip(2).into(), secs)?;
        let opened = nodeproxy::admin_client::metric_sum(
            &daemon.metrics()?,
            nodeproxy::metrics::TCP_OPEN_TOTAL,
            &[],
        );
        daemon.stop()?;
        if opened < 1.0 {
            bail!("the proxied run did not go through nodeproxy (no connection counted)");
        }
        eprintln!("round {round}/{rounds}: through {:6.2} Gbit/s", p / 1e9);
        proxied.push(p);
    }
    let (d, p) = (median(&mut direct), median(&mut proxied));
    println!(
        "direct_gbit_s={:.2} proxied_gbit_s={:.2} (medians of {rounds} rounds, {secs} s each)",
        d / 1e9,
        p / 1e9
    );
    println!("relay_throughput_ratio={:.3}", p / d);
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
