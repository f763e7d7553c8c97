//! Privileged self-test of the netns topology and the fixtures: pods reach each other only
//! through the node, nothing else is reachable, the host is untouched, and cleanup works, also
//! after a crashed run.
//!
//! Every test is `#[ignore]`d (it needs root, `ip` and `nft`): `scripts/test.sh` runs them as root
//! with `--include-ignored`, and once asked to run, a test that cannot panics saying why.
#![allow(clippy::unwrap_used)]

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use nodeproxy_tests::{
    Daemon, Netns, Topology, TopologySpec, require_privileges, tcp_echo_server, tcp_roundtrip,
    unique_prefix, wait_for_listener,
};

fn spec(prefix: &str, pods: usize, ipv6: bool) -> TopologySpec {
    TopologySpec {
        prefix: prefix.to_owned(),
        pods,
        ipv6,
    }
}

/// Names in `ip netns list` that belong to a topology with `prefix`.
fn listed(prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect()
}

fn read_in(ns: &Netns, path: &str) -> String {
    let out = ns.command("cat").arg(path).output().unwrap();
    assert!(out.status.success(), "cat {path} in {}", ns.name());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn pods_reach_each_other_through_the_node_and_nothing_else() {
    require_privileges();
    let host_forward4 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let host_forward6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap();
    let prefix = unique_prefix("tp");
    let topo = Topology::create(spec(&prefix, 3, true)).unwrap();
    assert_eq!(listed(&prefix).len(), 4, "{:?}", listed(&prefix));

    // IPv4, pod1 -> pod2, routed by the node without NAT.
    let server =
        tcp_echo_server(topo.pod(2), SocketAddr::new(topo.pod_ip(2).into(), 8080)).unwrap();
    let reply = tcp_roundtrip(topo.pod(1), None, server.local_addr(), b"hello v4").unwrap();
    assert_eq!(reply, b"hello v4");
    let big = vec![7u8; 4 << 20];
    assert_eq!(
        tcp_roundtrip(topo.pod(3), None, server.local_addr(), &big).unwrap(),
        big
    );
    let peers: Vec<IpAddr> = server.peers().iter().map(SocketAddr::ip).collect();
    assert_eq!(peers, [IpAddr::from(topo.pod_ip(1)), topo.pod_ip(3).into()]);

    // IPv6, pod3 -> pod2, with an explicit source address.
    let pod2_v6 = topo.pod_ip6(2).unwrap();
    let pod3_v6 = IpAddr::from(topo.pod_ip6(3).unwrap());
    let server6 = tcp_echo_server(topo.pod(2), SocketAddr::new(pod2_v6.into(), 8080)).unwrap();
    let reply = tcp_roundtrip(
        topo.pod(3),
        Some(pod3_v6),
        server6.local_addr(),
        b"hello v6",
    )
    .unwrap();
    assert_eq!(reply, b"hello v6");
    assert_eq!(server6.peers()[0].ip(), pod3_v6);

    // The node answers on each pod's gateway address.
    let node_server = tcp_echo_server(
        topo.node(),
        SocketAddr::new(topo.node_ip_for_pod(1).into(), 0),
    )
    .unwrap();
    let reply = tcp_roundtrip(topo.pod(1), None, node_server.local_addr(), b"node").unwrap();
    assert_eq!(reply, b"node");

    // Nothing outside the topology is reachable: the node has no uplink and no default route.
    for target in ["10.200.99.1:1", "192.0.2.1:80", "[2001:db8::1]:80"] {
        let target: SocketAddr = target.parse().unwrap();
        let err = tcp_roundtrip(topo.pod(1), None, target, b"x").unwrap_err();
        assert_ne!(
            err.kind(),
            ErrorKind::TimedOut,
            "{target}: should fail fast, got {err}"
        );
    }

    // Forwarding is on in the node namespace only; the host's sysctls are unchanged.
    assert_eq!(read_in(topo.node(), "/proc/sys/net/ipv4/ip_forward"), "1");
    assert_eq!(
        read_in(topo.node(), "/proc/sys/net/ipv6/conf/all/forwarding"),
        "1"
    );
    assert_eq!(read_in(topo.pod(1), "/proc/sys/net/ipv4/ip_forward"), "0");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forward4
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap(),
        host_forward6
    );

    drop(topo);
    assert_eq!(listed(&prefix), Vec::<String>::new());
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn create_replaces_namespaces_left_by_a_crashed_run() {
    require_privileges();
    let prefix = unique_prefix("tc");
    let crashed = Topology::create(spec(&prefix, 2, false)).unwrap();
    // A process a crashed run left behind would keep the namespace alive.
    let mut orphan = crashed.node().command("sleep").arg("300").spawn().unwrap();
    std::mem::forget(crashed);
    assert_eq!(listed(&prefix).len(), 3);

    let mut topo = Topology::create(spec(&prefix, 2, false)).unwrap();
    let status = orphan.wait().unwrap();
    assert!(
        !status.success(),
        "the leftover process was killed: {status}"
    );
    let server =
        tcp_echo_server(topo.pod(2), SocketAddr::new(topo.pod_ip(2).into(), 9000)).unwrap();
    assert_eq!(
        tcp_roundtrip(topo.pod(1), None, server.local_addr(), b"again").unwrap(),
        b"again"
    );

    // Explicit cleanup also stops tracked children; a second cleanup is a no-op.
    let tracked = topo.node().command("sleep").arg("300").spawn().unwrap();
    let tracked_pid = tracked.id();
    topo.track(tracked);
    topo.cleanup().unwrap();
    topo.cleanup().unwrap();
    assert_eq!(listed(&prefix), Vec::<String>::new());
    assert!(!std::path::Path::new(&format!("/proc/{tracked_pid}")).exists());
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn netns_threads_run_inside_and_report_missing_namespaces() {
    require_privileges();
    let topo = Topology::create(spec(&unique_prefix("tn"), 1, false)).unwrap();
    let inside = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let seen = topo
        .pod(1)
        .run(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
        .unwrap();
    assert_ne!(seen, inside, "run() must execute in the pod namespace");
    let spawned = topo
        .pod(1)
        .spawn(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(spawned, seen);

    let missing = Netns::from_name("np-does-not-exist");
    let err = missing.run(|| ()).unwrap_err();
    assert!(
        err.to_string().contains("/var/run/netns/np-does-not-exist"),
        "{err}"
    );
    assert!(missing.spawn(|| ()).is_err());
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn daemon_captures_logs_reports_early_exit_and_stops() {
    require_privileges();
    let topo = Topology::create(spec(&unique_prefix("td"), 1, false)).unwrap();

    let mut quitter =
        Daemon::start_program(topo.node(), "sh", &["-c", "echo bye; exit 3"]).unwrap();
    let err = quitter.wait_ready(Duration::from_secs(10)).unwrap_err();
    assert!(format!("{err:#}").contains("bye"), "{err:#}");

    let mut sleeper = Daemon::start_program(
        topo.node(),
        "sh",
        &["-c", "echo out; echo err >&2; exec sleep 300"],
    )
    .unwrap();
    let err = sleeper.wait_ready(Duration::from_millis(300)).unwrap_err();
    assert!(format!("{err:#}").contains("not ready"), "{err:#}");
    let logs = sleeper.logs();
    assert!(logs.contains("out") && logs.contains("err"), "{logs}");
    let status = sleeper.stop().unwrap();
    assert!(!status.success());
    assert_eq!(sleeper.stop().unwrap(), status);
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn wait_for_listener_sees_listeners_in_its_namespace_only() {
    require_privileges();
    let topo = Topology::create(spec(&unique_prefix("tl"), 2, true)).unwrap();
    let v4 = tcp_echo_server(topo.pod(1), SocketAddr::new(topo.pod_ip(1).into(), 0)).unwrap();
    let v6 = tcp_echo_server(topo.pod(1), SocketAddr::from(([0u16; 8], 0))).unwrap();
    let short = Duration::from_millis(200);
    for port in [v4.local_addr().port(), v6.local_addr().port()] {
        wait_for_listener(topo.pod(1), port, short).unwrap();
        let err = wait_for_listener(topo.pod(2), port, short).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    }
    // A connected socket on the port is no listener.
    let port = v4.local_addr().port();
    let _conn = nodeproxy_tests::tcp_connect(topo.pod(1), None, v4.local_addr()).unwrap();
    // Accepted (not just queued, which closing the listener would reset), then not listening.
    assert_eq!(v4.wait_for(1, Duration::from_secs(5)).len(), 1);
    drop(v4);
    let err = wait_for_listener(topo.pod(1), port, short).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
}
