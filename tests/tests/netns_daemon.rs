//! Privileged tier: the real daemon binary in a node network namespace, real nftables rules,
//! pods in their own namespaces sending real TCP through it.
//!
//! Every test is `#[ignore]`d (it needs root, `ip` and `nft`): `scripts/test.sh` runs them as root
//! with `--include-ignored`, and once asked to run, a test that cannot panics saying why.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use nodeproxy::admin_client::metric_sum;
use nodeproxy_tests::{
    NodeLab, Topology, require_privileges, tcp_connect, tcp_echo_server, tcp_roundtrip,
    unique_prefix,
};

const ALPHA: &str = "spiffe://cluster.local/ns/shop/sa/alpha";

/// Pod 1 (alpha) and pod 2 (beta) are meshed; pod 3 is in namespace `plain`, which is meshed
/// only when `plain_meshed`.
fn view(plain_meshed: bool) -> String {
    let label = if plain_meshed {
        "{nodeproxy.io/mesh: enabled}"
    } else {
        "{}"
    };
    let pod = |name: &str, ns: &str, sa: &str, i: u8| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{serviceAccountName: {sa}, nodeName: n1, containers: [{{name: c, image: i}}]}}\n\
             status: {{phase: Running, podIP: 10.200.{i}.2, podIPs: [{{ip: 10.200.{i}.2}}, {{ip: 'fdfe:200:{i}::2'}}]}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{nodeproxy.io/mesh: enabled}}}}\n\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: plain, labels: {label}}}\n{}{}{}",
        pod("a-0", "shop", "alpha", 1),
        pod("b-0", "shop", "beta", 2),
        pod("c-0", "plain", "gamma", 3),
    )
}

fn nft_tables(topo: &Topology) -> String {
    let out = topo
        .node()
        .command("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// TPROXY's policy routing in the node namespace: the rules looking up table 15001 and the routes
/// in it, both families, one line each ("" when there are none).
fn policy_routing(topo: &Topology) -> String {
    let mut out = String::new();
    for family in ["-4", "-6"] {
        for what in ["rule", "route"] {
            let listing = topo
                .node()
                .command("ip")
                .args([family, what, "show", "table", "15001"])
                .output()
                .unwrap();
            out.push_str(&String::from_utf8_lossy(&listing.stdout));
        }
    }
    out
}

fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn captures_meshed_pods_relays_per_tenant_and_cleans_up() {
    require_privileges();
    captures_relays_and_cleans_up("tproxy");
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn redirect_capture_still_works() {
    require_privileges();
    captures_relays_and_cleans_up("redirect");
}

/// v4 and v6 capture of meshed pods, non-mesh traffic untouched, a live mesh change, and nothing
/// left in the kernel after a clean stop.
fn captures_relays_and_cleans_up(capture: &str) {
    let lab = NodeLab::dual_stack(unique_prefix(&format!("n{capture}")), 3, &view(false)).unwrap();
    let topo = &lab.topo;
    // Never polled: only SIGHUP makes it re-read the view file (below).
    let mut daemon = lab
        .start_with(capture, &["--config-poll-secs", "0"])
        .unwrap();
    let routing = policy_routing(topo);
    if capture == "tproxy" {
        assert!(
            routing.contains("fwmark 0x1000/0x1000 lookup 15001")
                && routing.contains("local default dev lo"),
            "{routing}"
        );
    } else {
        assert_eq!(routing, "", "REDIRECT needs no policy routing");
    }

    // One dual-stack server: IPv4 peers show up as v4-mapped addresses.
    let server = tcp_echo_server(topo.pod(2), SocketAddr::from(([0u16; 8], 8080))).unwrap();
    let peer = |n: usize| {
        server.wait_for(n + 1, Duration::from_secs(5))[n]
            .peer
            .ip()
            .to_canonical()
    };
    let to_b4 = SocketAddr::new(IpAddr::V4(topo.pod_ip(2)), 8080);
    let to_b6 = SocketAddr::new(IpAddr::V6(topo.pod_ip6(2).unwrap()), 8080);
    let payload: Vec<u8> = (0..200_000).map(|i| (i % 241) as u8).collect();

    // Meshed pod → meshed pod, v4 and v6: relayed, so the server sees the node's address.
    assert_eq!(
        tcp_roundtrip(topo.pod(1), None, to_b4, &payload).unwrap(),
        payload
    );
    assert_eq!(
        tcp_roundtrip(topo.pod(1), None, to_b6, &payload).unwrap(),
        payload
    );
    assert_eq!(
        peer(0),
        IpAddr::V4(topo.node_ip_for_pod(2)),
        "v4 went through the daemon"
    );
    assert_eq!(
        peer(1),
        IpAddr::V6(topo.node_ip6_for_pod(2).unwrap()),
        "v6 went through the daemon"
    );

    // A pod outside the mesh is not captured: the server sees the pod itself.
    assert_eq!(
        tcp_roundtrip(topo.pod(3), None, to_b4, b"plain").unwrap(),
        b"plain"
    );
    assert_eq!(
        peer(2),
        IpAddr::V4(topo.pod_ip(3)),
        "non-mesh traffic untouched"
    );

    // The daemon's metrics count alpha's two connections and their bytes.
    let m = poll("close of alpha's connections", || {
        let m = daemon.metrics().ok()?;
        (metric_sum(&m, "nodeproxy_tcp_close_total", &[("tenant", ALPHA)]) >= 2.0).then_some(m)
    });
    assert_eq!(
        metric_sum(&m, "nodeproxy_tcp_open_total", &[("tenant", ALPHA)]),
        2.0
    );
    assert_eq!(
        metric_sum(&m, "nodeproxy_tcp_read_bytes_total", &[("tenant", ALPHA)]),
        2.0 * payload.len() as f64
    );
    assert_eq!(
        metric_sum(&m, "nodeproxy_tcp_open_total", &[]),
        2.0,
        "only meshed traffic was proxied"
    );
    // With TPROXY each tenant accepts on a listener of its own (its port in the rules' pod_port
    // maps); REDIRECT has only the shared one.
    let (own, shared) = if capture == "tproxy" {
        ("tenant", "shared")
    } else {
        ("shared", "tenant")
    };
    let accepted = |m: &_, listener: &str| {
        metric_sum(
            m,
            "nodeproxy_outbound_accepted_total",
            &[("listener", listener)],
        )
    };
    assert_eq!(
        (accepted(&m, own), accepted(&m, shared)),
        (2.0, 0.0),
        "{:?}",
        m.samples
            .iter()
            .filter(|s| s.metric.contains("accepted"))
            .collect::<Vec<_>>()
    );
    let (_, tenants) = daemon.get("/tenants").unwrap();
    let tenants: serde_json::Value = serde_json::from_str(&tenants).unwrap();
    let alpha = tenants
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == ALPHA)
        .unwrap();
    // Nested under the daemon's own cgroup (no --cgroup-parent): the weight unscaled.
    let kernel_weight = match alpha["cpu_share"].as_str() {
        Some("cgroup-v1") => serde_json::json!(1024),
        Some("cgroup-v2") => serde_json::json!(100),
        _ => serde_json::Value::Null,
    };
    assert_eq!(alpha["kernel_weight"], kernel_weight, "{alpha}");
    let listeners = alpha["listeners"].as_array().unwrap();
    assert_eq!(
        listeners.len(),
        if capture == "tproxy" { 2 } else { 0 },
        "{alpha}"
    );

    // Meshing `plain` on the running daemon: SIGHUP has the embedded control plane re-read the
    // file at once (with --config-poll-secs 0 nothing else would), and pod 3 is captured from
    // now on, by a set update, without reloading the table.
    std::fs::write(&lab.config, view(true)).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    poll("gamma in /tenants", || {
        let (_, body) = daemon.get("/tenants").ok()?;
        body.contains("ns/plain/sa/gamma").then_some(())
    });
    // The snapshot learns a pod before its IP joins the capture set (so its first connection is
    // never refused as unknown); wait for the set update too.
    let pod3 = topo.pod_ip(3).to_string();
    poll("pod 3 in the capture set", || {
        let out = topo
            .node()
            .command("nft")
            .args(["list", "set", "inet", "nodeproxy", "meshed_v4"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains(&pod3)
            .then_some(())
    });
    assert_eq!(
        tcp_roundtrip(topo.pod(3), None, to_b4, b"meshed").unwrap(),
        b"meshed"
    );
    assert_eq!(
        peer(3),
        IpAddr::V4(topo.node_ip_for_pod(2)),
        "pod 3 now captured"
    );
    // ...through its new tenant's own listener (TPROXY), which the update gave its port.
    let m = daemon.metrics().unwrap();
    assert_eq!((accepted(&m, own), accepted(&m, shared)), (3.0, 0.0));

    // A clean stop removes the rules.
    assert!(nft_tables(topo).contains("inet nodeproxy"));
    let status = daemon.stop().unwrap();
    assert!(status.success(), "daemon exit: {status}\n{}", daemon.logs());
    assert!(!nft_tables(topo).contains("nodeproxy"), "rules left behind");
    assert_eq!(policy_routing(topo), "", "policy routing left behind");
    // With the rules gone, meshed traffic flows directly again.
    assert_eq!(
        tcp_roundtrip(topo.pod(1), None, to_b4, b"direct").unwrap(),
        b"direct"
    );
    assert_eq!(peer(4), IpAddr::V4(topo.pod_ip(1)));
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn a_crashed_daemons_rules_are_replaced_at_the_next_start() {
    require_privileges();
    let lab = NodeLab::create(unique_prefix("nc"), 2, &view(false)).unwrap();
    let topo = &lab.topo;

    let mut first = lab.start("tproxy").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    poll("the killed daemon to exit", || {
        first.try_status().ok().flatten()
    });
    assert!(
        nft_tables(topo).contains("inet nodeproxy"),
        "a crash leaves the table"
    );
    let left = policy_routing(topo);
    assert!(
        left.contains("lookup 15001"),
        "and the policy routing: {left}"
    );
    // While nothing listens, meshed pods' connections are reset, never let through uncaptured.
    let server = tcp_echo_server(topo.pod(2), SocketAddr::from(([0, 0, 0, 0], 8080))).unwrap();
    let to_b = SocketAddr::new(IpAddr::V4(topo.pod_ip(2)), 8080);
    let err = tcp_roundtrip(topo.pod(1), None, to_b, b"nobody").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(server.seen().is_empty(), "a meshed connection got through");

    let mut second = lab.start("tproxy").unwrap();
    // Replaced, not duplicated.
    assert_eq!(policy_routing(topo), left);
    assert_eq!(
        tcp_roundtrip(topo.pod(1), None, to_b, b"again").unwrap(),
        b"again"
    );
    assert_eq!(
        server.wait_for(1, Duration::from_secs(5))[0].peer.ip(),
        IpAddr::V4(topo.node_ip_for_pod(2))
    );
    assert!(second.stop().unwrap().success());
    assert!(!nft_tables(topo).contains("nodeproxy"));
    assert_eq!(policy_routing(topo), "");
}

/// At SIGTERM the daemon stops capturing new connections but drains the ones it holds: with
/// TPROXY their packets still reach its sockets (the transparent-socket rule) until it closes.
#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn connections_open_at_shutdown_keep_working_while_the_daemon_drains() {
    require_privileges();
    use std::io::{Read, Write};
    let lab = NodeLab::create(unique_prefix("nt"), 2, &view(false)).unwrap();
    let topo = &lab.topo;
    // Without early demux only the rules, not a socket's cached input route, deliver packets of
    // a held connection to it.
    topo.node()
        .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_early_demux", "0"))
        .unwrap()
        .unwrap();
    let mut daemon = lab.start("tproxy").unwrap();
    let server = tcp_echo_server(topo.pod(2), SocketAddr::from(([0, 0, 0, 0], 8080))).unwrap();
    let to_b = SocketAddr::new(IpAddr::V4(topo.pod_ip(2)), 8080);

    let mut held = tcp_connect(topo.pod(1), None, to_b).unwrap();
    let echo = |stream: &mut std::net::TcpStream, what: &[u8]| {
        stream.write_all(what).unwrap();
        let mut back = vec![0; what.len()];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back, what);
    };
    echo(&mut held, b"before");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let pod1 = topo.pod_ip(1).to_string();
    poll("the capture set to be emptied", || {
        let out = topo
            .node()
            .command("nft")
            .args(["list", "set", "inet", "nodeproxy", "meshed_v4"])
            .output()
            .ok()?;
        let set = String::from_utf8_lossy(&out.stdout);
        (out.status.success() && !set.contains(&pod1)).then_some(())
    });
    // The held connection still goes through the draining daemon ...
    echo(&mut held, b"during the drain");
    // ... while a new one is no longer captured: the server sees pod 1 itself.
    assert_eq!(
        tcp_roundtrip(topo.pod(1), None, to_b, b"new").unwrap(),
        b"new"
    );
    let peers: Vec<IpAddr> = server
        .wait_for(2, Duration::from_secs(5))
        .iter()
        .map(|s| s.peer.ip())
        .collect();
    assert_eq!(
        peers,
        [topo.node_ip_for_pod(2), topo.pod_ip(1)].map(IpAddr::V4)
    );
    held.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    let status = poll("the daemon to exit", || daemon.try_status().ok().flatten());
    assert!(status.success(), "{status}\n{}", daemon.logs());
    assert!(!nft_tables(topo).contains("nodeproxy"));
    assert_eq!(policy_routing(topo), "");
}

/// A Service DNAT like kube-proxy's (nat prerouting at `dstnat` for pods, nat output for the
/// node's own connections) on top of the capture: the daemon sees and dials the Service address,
/// in both capture modes. With TPROXY, a DNAT after the capture would move the flow away from
/// its socket (the connection is reset); the `keep_destination` chain prevents it.
#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn a_service_dnat_like_kube_proxys_still_works_through_the_capture() {
    require_privileges();
    for capture in ["tproxy", "redirect"] {
        let lab = NodeLab::create(unique_prefix(&format!("s{capture}")), 2, &view(false)).unwrap();
        let topo = &lab.topo;
        let pod2 = topo.pod_ip(2);
        let kube_proxy = format!(
            "table ip kubeproxy {{\n\
             \tchain pre {{ type nat hook prerouting priority dstnat; policy accept; \
             ip daddr 10.96.0.10 tcp dport 80 dnat to {pod2}:8080; }}\n\
             \tchain out {{ type nat hook output priority -100; policy accept; \
             ip daddr 10.96.0.10 tcp dport 80 dnat to {pod2}:8080; }}\n}}\n"
        );
        let mut nft = topo
            .node()
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut nft.stdin.take().unwrap(), kube_proxy.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success());
        // The node needs a route towards Service addresses for its own connections.
        let route = topo
            .node()
            .command("ip")
            .args(["route", "add", "10.96.0.0/16", "via", &pod2.to_string()])
            .status()
            .unwrap();
        assert!(route.success());

        let mut daemon = lab.start(capture).unwrap();
        let server = tcp_echo_server(topo.pod(2), SocketAddr::from(([0, 0, 0, 0], 8080))).unwrap();
        let service = SocketAddr::from(([10, 96, 0, 10], 80));
        assert_eq!(
            tcp_roundtrip(topo.pod(1), None, service, b"svc").unwrap(),
            b"svc",
            "{capture}"
        );
        assert_eq!(
            server.wait_for(1, Duration::from_secs(5))[0].peer.ip(),
            IpAddr::V4(topo.node_ip_for_pod(2)),
            "{capture}: through the daemon"
        );
        // The daemon saw the Service address, not the pod behind it: no peer identity.
        let m = poll("the connection's close", || {
            let m = daemon.metrics().ok()?;
            (metric_sum(&m, "nodeproxy_tcp_close_total", &[("tenant", ALPHA)]) >= 1.0).then_some(m)
        });
        let open = |peer| {
            metric_sum(
                &m,
                "nodeproxy_tcp_open_total",
                &[("tenant", ALPHA), ("peer", peer)],
            )
        };
        assert_eq!(open("unknown"), 1.0, "{capture}");
        assert!(daemon.stop().unwrap().success(), "{}", daemon.logs());
    }
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn a_missing_nft_binary_is_a_clear_error_and_leaves_nothing() {
    require_privileges();
    let lab = NodeLab::create(unique_prefix("nn"), 1, &view(false)).unwrap();
    let topo = &lab.topo;
    let mut d = lab.spawn(&["--nft", "/nonexistent/nft"]).unwrap();
    let status = poll("the daemon to exit", || d.try_status().ok().flatten());
    assert!(!status.success());
    let logs = d.logs();
    assert!(
        logs.contains("/nonexistent/nft") && logs.contains("install nftables"),
        "{logs}"
    );
    assert!(!nft_tables(topo).contains("nodeproxy"));
    assert_eq!(policy_routing(topo), "");
}
