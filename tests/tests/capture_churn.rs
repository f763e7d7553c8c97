//! Privileged regression test: a churny client through the capture does not stall on the
//! proxy's TIME_WAIT sockets.
//!
//! The problem (measured with REDIRECT): every captured connection of a pod is (pod:port ↔
//! node:15001) at the daemon, whatever its destination. The daemon closes first when the server
//! does, so it holds TIME_WAIT on that tuple; when the client soon reuses the source port for
//! another destination, its SYN meets that TIME_WAIT socket, whose timestamps came from another
//! flow: PAWS drops it (`TcpExtPAWSTimewait`) and the client retransmits the SYN a second later
//! (`TcpExtTCPSynRetrans`). With TPROXY the daemon's socket has the original destination as its
//! local address, so each destination has a tuple of its own, as without the proxy.
//!
//! Asserted on kernel counters, not on wall-clock time.
//!
//! Every test is `#[ignore]`d (it needs root, `ip` and `nft`): `scripts/test.sh` runs them as root
//! with `--include-ignored`, and once asked to run, a test that cannot panics saying why.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use nodeproxy::admin_client::metric_sum;
use nodeproxy_tests::{Netns, NodeLab, require_privileges, unique_prefix};

/// The client pod's tenant.
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
/// Server ports the client rotates over, on each of the two server pods.
const PORTS: [u16; 4] = [9101, 9102, 9103, 9104];
/// The client's ephemeral port range (64 ports).
const EPHEMERAL_PORTS: &str = "40000 40063";
/// Sequential connections of the TPROXY run.
const CONNECTIONS: usize = 3000;
/// The most connections of the REDIRECT run, which stops at its first PAWS drop (seen here after
/// 400 to 1400; each costs the client a 1 s SYN retransmit).
const REDIRECT_CONNECTIONS: usize = 10_000;

/// Pod 1 (client) and pods 2 and 3 (servers), all meshed.
fn view() -> String {
    let pod = |name: &str, sa: &str, i: u8| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{serviceAccountName: {sa}, nodeName: n1, containers: [{{name: c, image: i}}]}}\n\
             status: {{phase: Running, podIP: 10.200.{i}.2}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{nodeproxy.io/mesh: enabled}}}}\n{}{}{}",
        pod("client-0", "client", 1),
        pod("server-0", "server", 2),
        pod("server-1", "server", 3),
    )
}

/// A counter of the `TcpExt` group of `/proc/net/netstat`, read inside `ns`.
fn tcp_ext(ns: &Netns, name: &str) -> u64 {
    let out = ns.command("cat").arg("/proc/net/netstat").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|line| line.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let index = names
        .split_whitespace()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("no TcpExt counter {name} in {names}"));
    values
        .split_whitespace()
        .nth(index)
        .unwrap()
        .parse()
        .unwrap()
}

/// Servers in `ns` on every port of [`PORTS`] that read one byte, send it back and close first.
/// Dropping them stops them.
struct OneByteServers {
    listeners: Vec<TcpListener>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl OneByteServers {
    fn start(ns: &Netns, ip: IpAddr) -> Self {
        let mut servers = OneByteServers {
            listeners: Vec::new(),
            threads: Vec::new(),
        };
        for port in PORTS {
            let listener = ns
                .run(move || TcpListener::bind(SocketAddr::new(ip, port)))
                .unwrap()
                .unwrap();
            let accepting = listener.try_clone().unwrap();
            servers.listeners.push(listener);
            servers.threads.push(std::thread::spawn(move || {
                // Ends when the listener is shut down (accept then fails).
                while let Ok((stream, _)) = accepting.accept() {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut byte = [0u8; 1];
                    if (&stream).read_exact(&mut byte).is_ok() {
                        let _ = (&stream).write_all(&byte);
                    }
                    // Dropping closes: the server's FIN comes first.
                }
            }));
        }
        servers
    }
}

impl Drop for OneByteServers {
    fn drop(&mut self) {
        for listener in &self.listeners {
            // On Linux this wakes a blocked accept() with EINVAL.
            let _ = socket2::SockRef::from(listener).shutdown(std::net::Shutdown::Both);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What a churn did.
#[derive(Debug)]
struct Churn {
    /// Connections made.
    made: usize,
    /// Connections whose source port the client had last used towards another destination:
    /// the case that meets the proxy's TIME_WAIT socket with REDIRECT.
    reused_elsewhere: usize,
}

/// From inside `ns`: up to `n` sequential connections rotating over `destinations`; each sends
/// one byte, reads it back and the server's close. After every 100 connections, `stop()` may end
/// the loop early.
fn churn(
    ns: &Netns,
    destinations: &[SocketAddr],
    n: usize,
    mut stop: impl FnMut() -> bool + Send,
) -> Churn {
    ns.run(move || {
        let mut last_destination = std::collections::HashMap::new();
        let mut churn = Churn {
            made: 0,
            reused_elsewhere: 0,
        };
        for i in 0..n {
            let to = destinations[i % destinations.len()];
            let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connection {i} to {to}: {e}"));
            let port = stream.local_addr().unwrap().port();
            if last_destination
                .insert(port, to)
                .is_some_and(|last| last != to)
            {
                churn.reused_elsewhere += 1;
            }
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream.write_all(b"x").unwrap();
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply).unwrap();
            assert_eq!(reply, b"x", "connection {i} to {to}");
            churn.made += 1;
            if churn.made.is_multiple_of(100) && stop() {
                break;
            }
        }
        churn
    })
    .unwrap()
}

struct Counters {
    paws_timewait: u64,
    syn_retrans: u64,
}

/// Runs the churn through a daemon started with `--capture <capture>`: the node's
/// `TcpExtPAWSTimewait` and the client's `TcpExtTCPSynRetrans` it caused, and the connections.
fn run(capture: &str, n: usize, stop_on_paws: bool) -> (Counters, Churn) {
    let lab = NodeLab::create(unique_prefix(&format!("c{capture}")), 3, &view()).unwrap();
    let topo = &lab.topo;
    let mut daemon = lab.start(capture).unwrap();
    let mut servers = Vec::new();
    let mut destinations = Vec::new();
    for i in [2, 3] {
        let ip = IpAddr::V4(topo.pod_ip(i));
        servers.push(OneByteServers::start(topo.pod(i), ip));
        destinations.extend(PORTS.map(|port| SocketAddr::new(ip, port)));
    }

    let (node, client) = (topo.node().clone(), topo.pod(1).clone());
    // A small ephemeral port range makes the client reuse source ports within seconds, as a busy
    // client does within the 60 s of TIME_WAIT over the default range.
    client
        .run(|| std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", EPHEMERAL_PORTS))
        .unwrap()
        .unwrap();
    let before = Counters {
        paws_timewait: tcp_ext(&node, "PAWSTimewait"),
        syn_retrans: tcp_ext(&client, "TCPSynRetrans"),
    };
    let churned = churn(&client, &destinations, n, || {
        stop_on_paws && tcp_ext(&node, "PAWSTimewait") > before.paws_timewait
    });
    let after = Counters {
        paws_timewait: tcp_ext(&node, "PAWSTimewait"),
        syn_retrans: tcp_ext(&client, "TCPSynRetrans"),
    };
    // The connections went through the daemon, every one: without the capture there would be
    // no proxy TIME_WAIT to meet, and the TPROXY run would pass for nothing.
    let opened = metric_sum(
        &daemon.metrics().unwrap(),
        "nodeproxy_tcp_open_total",
        &[("tenant", CLIENT)],
    );
    assert_eq!(opened, churned.made as f64, "{}", daemon.logs());
    assert!(daemon.stop().unwrap().success(), "{}", daemon.logs());
    let caused = Counters {
        paws_timewait: after.paws_timewait - before.paws_timewait,
        syn_retrans: after.syn_retrans - before.syn_retrans,
    };
    eprintln!(
        "--capture {capture}: {churned:?}, node TcpExtPAWSTimewait +{}, client TcpExtTCPSynRetrans +{}",
        caused.paws_timewait, caused.syn_retrans
    );
    (caused, churned)
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn tproxy_churn_across_destinations_never_meets_paws() {
    require_privileges();
    let (caused, churned) = run("tproxy", CONNECTIONS, false);
    assert_eq!(churned.made, CONNECTIONS);
    assert!(
        churned.reused_elsewhere > CONNECTIONS / 2,
        "the client should often reuse a source port for another destination: {churned:?}"
    );
    assert_eq!(
        (caused.paws_timewait, caused.syn_retrans),
        (0, 0),
        "{CONNECTIONS} sequential connections over {} ports on 2 servers: TcpExtPAWSTimewait \
         (node) and TcpExtTCPSynRetrans (client) must not rise",
        PORTS.len()
    );
}

/// The same churn with `--capture redirect` shows the problem; it stops at the first PAWS drop.
#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn redirect_churn_across_destinations_meets_paws() {
    require_privileges();
    let (caused, churned) = run("redirect", REDIRECT_CONNECTIONS, true);
    assert!(
        caused.paws_timewait > 0,
        "{churned:?} with REDIRECT caused no PAWS drop: has the kernel changed?"
    );
    assert!(caused.syn_retrans > 0, "a PAWS drop costs a SYN retransmit");
}
