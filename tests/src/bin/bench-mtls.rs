//! Benchmark (not a test): pod on node A → pod on node B, direct (routed, no daemons) vs
//! through both daemons' mTLS tunnel (HTTP/2 CONNECT on port 15008), in one run:
//! - iperf3 single stream throughput;
//! - sequential new connections per second (connect, 1-byte echo, close).
//!
//! Prints the medians and, last, `mtls_throughput_ratio=<ours/direct> conn_rate_ratio=<ours/direct>`.
//! Run it with `scripts/bench-mtls.sh` (release build, root). Needs iperf3, ip and nft.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nodeproxy::lab::twonode::{Side, TwoNodes};
use nodeproxy_tests::{
    Daemon, IPERF3_PORT, LISTEN_TIMEOUT, iperf3_bps, nodeproxy_bin, tcp_echo_server, unique_prefix,
    wait_for_listener,
};

fn view(t: &TwoNodes) -> String {
    let pod = |name: &str, node: &str, side: Side| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench}}\n\
             spec: {{serviceAccountName: {name}, nodeName: {node}, containers: [{{name: c, image: i}}]}}\n\
             status: {{phase: Running, hostIP: '{}', podIP: '{}'}}\n",
            t.node_ip(side),
            t.pod_ip(side, 1)
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: bench, labels: {{nodeproxy.io/mesh: enabled}}}}\n{}{}",
        pod("client", "node-a", Side::A),
        pod("server", "node-b", Side::B)
    )
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = env_or("ROUNDS", 3);
    let secs: u32 = env_or("SECONDS", 5);
    nodeproxy::lab::topology::check_privileges()?;
    let topo = TwoNodes::create(&unique_prefix("bm"), 1)?;
    let server_ip = topo.pod_ip(Side::B, 1);
    let iperf_server = topo
        .pod(Side::B, 1)
        .command("iperf3")
        .args(["-s", "-B", &server_ip.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("start iperf3 -s (install iperf3)")?;
    let mut iperf_server = KillOnDrop(iperf_server);
    wait_for_listener(&topo.pod(Side::B, 1), IPERF3_PORT, LISTEN_TIMEOUT)?;

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("view.yaml");
    std::fs::write(&config, view(&topo))?;
    let (ca_cert, ca_key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    certs::Ca::load_or_generate("cluster.local", &ca_cert, &ca_key)?;
    eprintln!("nodeproxy binary: {}", nodeproxy_bin().display());

    let (mut direct_bw, mut mtls_bw, mut direct_cps, mut mtls_cps) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let d = iperf3_bps(&topo.pod(Side::A, 1), topo.pod_ip(Side::B, 1).into(), secs)?;
        let dc = conn_rate(&topo, 9000 + 2 * round as u16, secs)?;
        eprintln!(
            "round {round}/{rounds}: direct {:6.2} Gbit/s {dc:8.0} conn/s",
            d / 1e9
        );
        direct_bw.push(d);
        direct_cps.push(dc);
        let start = |side: Side, node: &str| -> anyhow::Result<Daemon> {
            let mut d = Daemon::start(
                &topo.node(side),
                &[
                    "run",
                    "--config",
                    config.to_str().context("utf-8 path")?,
                    "--node",
                    node,
                    "--ca-cert",
                    ca_cert.to_str().context("utf-8 path")?,
                    "--ca-key",
                    ca_key.to_str().context("utf-8 path")?,
                    "--log",
                    "warn",
                ],
            )?;
            d.wait_ready(Duration::from_secs(20))?;
            Ok(d)
        };
        let mut a = start(Side::A, "node-a")?;
        let mut b = start(Side::B, "node-b")?;
        let p = iperf3_bps(&topo.pod(Side::A, 1), topo.pod_ip(Side::B, 1).into(), secs)?;
        let pc = conn_rate(&topo, 9001 + 2 * round as u16, secs)?;
        let handshakes = nodeproxy::admin_client::metric_sum(
            &b.metrics()?,
            nodeproxy::metrics::TLS_HANDSHAKES_TOTAL,
            &[("result", "ok")],
        );
        a.stop()?;
        b.stop()?;
        if handshakes < 1.0 {
            bail!("the mTLS run did not go through the tunnel (no handshake counted on node B)");
        }
        eprintln!(
            "round {round}/{rounds}: mtls   {:6.2} Gbit/s {pc:8.0} conn/s",
            p / 1e9
        );
        mtls_bw.push(p);
        mtls_cps.push(pc);
    }
    let _ = iperf_server.0.kill();
    let (d, p) = (median(&mut direct_bw), median(&mut mtls_bw));
    let (dc, pc) = (median(&mut direct_cps), median(&mut mtls_cps));
    println!(
        "direct_gbit_s={:.2} mtls_gbit_s={:.2} direct_conn_s={dc:.0} mtls_conn_s={pc:.0} (medians of {rounds} rounds, {secs} s each)",
        d / 1e9,
        p / 1e9
    );
    println!(
        "mtls_throughput_ratio={:.3} conn_rate_ratio={:.3}",
        p / d,
        pc / dc
    );
    Ok(())
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sequential new connections per second from pod a1 to `to` for `secs` seconds: connect,
/// send one byte, half-close, read the echo until the server closes. Each measurement uses a
/// fresh server `port`, so no connection matches a conntrack entry left by an earlier phase
/// (with or without the daemons' NAT).
fn conn_rate(topo: &TwoNodes, port: u16, secs: u32) -> anyhow::Result<f64> {
    let echo = tcp_echo_server(
        &topo.pod(Side::B, 1),
        SocketAddr::from((topo.pod_ip(Side::B, 1), port)),
    )?;
    let to = echo.local_addr();
    topo.pod(Side::A, 1).run(move || -> anyhow::Result<f64> {
        let start = Instant::now();
        let window = Duration::from_secs(secs.into());
        let mut n = 0u64;
        while start.elapsed() < window {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"x")?;
            s.shutdown(Shutdown::Write)?;
            let mut buf = [0u8; 8];
            let mut got = 0;
            loop {
                let r = s.read(&mut buf[got..])?;
                if r == 0 {
                    break;
                }
                got += r;
            }
            if got != 1 {
                bail!("connection {n}: echo returned {got} bytes");
            }
            // Abortive close after the echo: no TIME_WAIT, so the ephemeral ports (and the
            // nodes' conntrack) do not fill up and slow later rounds down.
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })?
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
