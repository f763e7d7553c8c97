//! Privileged tests: real nftables inside throwaway network namespaces, never the host's ruleset,
//! including real TCP connections captured with TPROXY (to a pod's own port or the shared one).
//! Each is `#[ignore]`d, so a plain `cargo test` lists them as ignored; asked to run
//! (`--include-ignored`, as `scripts/test.sh` does as root) they fail, never skip, when root,
//! `ip` or `nft` is missing.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::num::NonZeroU16;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, Shutdown, SockFlag, SockType, SockaddrIn, bind, connect, getsockname,
    setsockopt, shutdown, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};
use redirect::{Capture, Error, Nft, RuleSet, TableName};

/// A network namespace that is deleted when dropped, also when the test panics.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Self {
        let name = format!("np-redir-test-{}-{tag}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(status.success(), "ip netns add {name} failed: {status}");
        let netns = Self(name);
        // As on a real node; the IPv6 local route of TPROXY needs it.
        ip(&netns, &["link", "set", "lo", "up"]);
        netns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Applies `rules` and checks the kernel has exactly them.
fn apply_and_verify(nft: &Nft, rules: &RuleSet) {
    nft.apply(rules).unwrap();
    nft.verify(rules).unwrap();
}

/// Why these tests cannot run here, if they cannot.
fn missing_privileges() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .map(str::to_owned);
    if euid.as_deref() != Some("0") {
        return Some(format!(
            "root (the effective uid is {}; run as root: `sudo scripts/test.sh`)",
            euid.as_deref().unwrap_or("unknown")
        ));
    }
    let runs = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !runs("ip", "-V") {
        return Some("ip (`ip -V` does not run; install iproute2)".to_owned());
    }
    if Nft::new().is_err() {
        return Some("nft (not installed; install nftables)".to_owned());
    }
    None
}

/// Panics, naming what is missing and how to get it, unless this test can create network
/// namespaces and load nftables into them: it was asked to run, so it must not pass by skipping.
fn require_privileges() {
    if let Some(missing) = missing_privileges() {
        panic!(
            "this privileged test needs root, ip and nft; missing: {missing}. scripts/test.sh \
             runs the privileged tests as root with --include-ignored"
        );
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|ip| ip.parse().unwrap()).collect()
}

fn ip_addr(ip: &str) -> IpAddr {
    ip.parse().unwrap()
}

fn ports(list: &[(&str, u16)]) -> Vec<(IpAddr, NonZeroU16)> {
    list.iter()
        .map(|(ip, port)| (ip_addr(ip), NonZeroU16::new(*port).unwrap()))
        .collect()
}

/// Runs `f` on a thread that has entered `netns`; sockets it opens stay in that namespace.
fn in_netns<T: Send>(netns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || {
            let path = format!("/var/run/netns/{}", netns.0);
            let file = std::fs::File::open(&path).unwrap();
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
            f()
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A non-blocking transparent (IP_TRANSPARENT) listener on `0.0.0.0:port`, as the daemon opens
/// them; port 0 lets the kernel choose, as for a tenant's listener.
fn transparent_listener(port: u16) -> TcpListener {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
    setsockopt(&listener, sockopt::IpTransparent, &true).unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Stops `listener` listening now, then closes it.
///
/// Closing the fd alone is not enough: the other tests in this file run on parallel threads and
/// spawn `ip` and `nft`, and a child between its fork and its exec holds a copy of every fd,
/// this listener too (CLOEXEC closes it only at the exec). The socket then keeps listening
/// until that copy goes; a SYN arriving meanwhile is sent by TPROXY to the still-listening port
/// (traced: the `pod_port` rule, not the :15001 one, matched it), the kernel completes the
/// handshake on it, and the exec's close resets the connection nobody could accept (the client
/// read ECONNRESET; the test failed so in 5 of 100 runs of this file). `shutdown` ends the
/// listening state of the socket itself, whoever holds a copy of the fd.
fn close_listener(listener: TcpListener) {
    shutdown(listener.as_raw_fd(), Shutdown::Both).unwrap();
    drop(listener);
}

/// A port on which nothing listens while the returned socket lives: bound, never listening, so
/// TPROXY finds no listener there, and held, so the kernel gives its port to no other socket
/// (a port merely freed again can become the tenant listener's: the kernel picked a freed port
/// again for the next `bind` to port 0 in 2 of 20000 tries).
fn reserved_port() -> (OwnedFd, u16) {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
    )
    .unwrap();
    let port = getsockname::<SockaddrIn>(fd.as_raw_fd()).unwrap().port();
    (fd, port)
}

/// A TCP connection from `src` (one of the pod namespace's addresses) to `dst`; connecting gives
/// up after 5 s.
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::seconds(5))?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    Ok(TcpStream::from(fd))
}

/// Connects from `src` to `dst` and returns the name of the listener that accepted it, after
/// checking that the accepted socket sees the pod's address and the original destination and
/// that data flows (later packets find the socket too).
fn accepted_by<'a>(
    pods: &Netns,
    listeners: &[(&'a str, &TcpListener)],
    src: Ipv4Addr,
    dst: SocketAddrV4,
) -> &'a str {
    let mut client = in_netns(pods, || connect_from(src, dst))
        .unwrap_or_else(|e| panic!("connect from {src} to {dst}: {e}"));
    client.write_all(b"ping").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for (name, listener) in listeners {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    assert_eq!(peer, client.local_addr().unwrap(), "{name}");
                    assert_eq!(stream.local_addr().unwrap(), SocketAddr::V4(dst), "{name}");
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    let mut got = [0; 4];
                    stream.read_exact(&mut got).unwrap();
                    assert_eq!(&got, b"ping", "{name}");
                    return name;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept on the {name} listener: {e}"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "no listener accepted the connection from {src} to {dst}"
        );
        // Polling with a deadline: the handshake completed before `connect` returned, only the
        // listener's side may lag by a packet.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `ip <family> <what> show table 15001` inside `netns`, one line per rule or route ("" if the
/// table does not exist).
fn ip_show(netns: &Netns, family: &str, what: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", &netns.0, family, what, "show", "table", "15001"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs `ip -n <netns> <args>`, which must succeed.
fn ip(netns: &Netns, args: &[&str]) {
    let status = Command::new("ip")
        .args(["-n", &netns.0])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "ip {args:?}: {status}");
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn apply_verify_update_remove() {
    require_privileges();
    let netns = Netns::create("life");
    let nft = Nft::new().unwrap().in_netns(&netns.0).unwrap();
    let table = TableName::new("np_test").unwrap();
    let mut rules = RuleSet::new(table.clone(), NonZeroU16::new(15001).unwrap())
        .with_capture(Capture::Redirect)
        .with_pods(ips(&["10.244.0.2", "fd00::2"]));

    assert!(!nft.exists(&table).unwrap());
    let err = nft.verify(&rules).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    nft.remove(&rules).unwrap(); // absent table: still fine

    nft.check(&rules).unwrap();
    assert!(
        !nft.exists(&table).unwrap(),
        "check must not change anything"
    );
    nft.apply(&rules).unwrap();
    assert!(nft.exists(&table).unwrap());
    nft.verify(&rules).unwrap();

    // Add one address per family, remove one present and one absent address.
    nft.update(
        &table,
        &ips(&["10.244.0.3", "fd00::3"]),
        &ips(&["10.244.0.2", "10.244.9.9"]),
    )
    .unwrap();
    let err = nft.verify(&rules).unwrap_err();
    let Error::Mismatch { differences, .. } = &err else {
        panic!("expected a mismatch, got {err}");
    };
    assert_eq!(
        differences,
        &[
            "set meshed_v4 lacks 10.244.0.2",
            "set meshed_v4 has unexpected 10.244.0.3",
            "set meshed_v6 has unexpected fd00::3",
        ]
    );
    for ip in ips(&["10.244.0.3", "fd00::3"]) {
        rules.add_pod(ip);
    }
    rules.remove_pod("10.244.0.2".parse().unwrap());
    nft.verify(&rules).unwrap();
    nft.update(&table, &[], &[]).unwrap();

    // Applying over the existing table replaces it (idempotent, no duplicate rules).
    nft.apply(&rules).unwrap();
    apply_and_verify(&nft, &rules);

    // A different port replaces the rules too, and so does the other capture mode.
    rules.redirect_port = NonZeroU16::new(16001).unwrap();
    apply_and_verify(&nft, &rules);
    rules.capture = Capture::Tproxy;
    apply_and_verify(&nft, &rules);

    nft.remove(&rules).unwrap();
    assert!(!nft.exists(&table).unwrap());
    nft.remove(&rules).unwrap();
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn tproxy_policy_routing_is_applied_verified_replaced_and_removed() {
    require_privileges();
    let netns = Netns::create("route");
    let nft = Nft::new().unwrap().in_netns(&netns.0).unwrap();
    let rules = RuleSet::default().with_pods(ips(&["10.244.0.2", "fd00::2"]));
    assert_eq!(rules.capture, Capture::Tproxy);

    apply_and_verify(&nft, &rules);
    for family in ["-4", "-6"] {
        assert_eq!(
            ip_show(&netns, family, "rule"),
            "90:\tfrom all fwmark 0x1000/0x1000 lookup 15001",
            "{family}"
        );
        assert!(
            ip_show(&netns, family, "route").starts_with("local default dev lo"),
            "{family}: {}",
            ip_show(&netns, family, "route")
        );
    }
    // Applying again changes nothing and duplicates nothing.
    apply_and_verify(&nft, &rules);
    assert_eq!(ip_show(&netns, "-4", "rule").lines().count(), 1);

    // A crashed run of another configuration left a second rule and a stray route: verify names
    // them, and the next apply replaces them.
    ip(
        &netns,
        &[
            "-4", "rule", "add", "pref", "70", "fwmark", "0x1", "lookup", "15001",
        ],
    );
    ip(
        &netns,
        &[
            "-4",
            "route",
            "add",
            "10.9.0.0/16",
            "dev",
            "lo",
            "table",
            "15001",
        ],
    );
    let err = nft.verify(&rules).unwrap_err();
    let Error::Mismatch { differences, .. } = &err else {
        panic!("expected a mismatch, got {err}");
    };
    assert_eq!(differences.len(), 2, "{differences:?}");
    assert!(
        differences[0].contains("also looks up table 15001"),
        "{err}"
    );
    assert!(differences[1].contains("10.9.0.0/16"), "{err}");
    apply_and_verify(&nft, &rules);

    // Missing policy routing is named too.
    ip(
        &netns,
        &["-6", "rule", "del", "pref", "90", "lookup", "15001"],
    );
    let err = nft.verify(&rules).unwrap_err().to_string();
    assert!(
        err.contains("ip -6 rule `pref 90 fwmark 0x1000/0x1000 lookup 15001` is missing"),
        "{err}"
    );

    // REDIRECT over a TPROXY leftover: the table is replaced and the policy routing removed.
    let redirect = rules.clone().with_capture(Capture::Redirect);
    apply_and_verify(&nft, &redirect);
    for family in ["-4", "-6"] {
        assert_eq!(ip_show(&netns, family, "rule"), "", "{family}");
        assert_eq!(ip_show(&netns, family, "route"), "", "{family}");
    }

    // And back; then remove takes the table and the policy routing.
    apply_and_verify(&nft, &rules);
    nft.remove(&rules).unwrap();
    assert!(!nft.exists(&rules.table).unwrap());
    for family in ["-4", "-6"] {
        assert_eq!(ip_show(&netns, family, "rule"), "", "{family}");
        assert_eq!(ip_show(&netns, family, "route"), "", "{family}");
    }
    nft.remove(&rules).unwrap();
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn pod_ports_are_applied_verified_and_updated() {
    require_privileges();
    let netns = Netns::create("ports");
    let nft = Nft::new().unwrap().in_netns(&netns.0).unwrap();
    let table = TableName::new("np_ports").unwrap();
    let mut rules = RuleSet::new(table.clone(), NonZeroU16::new(15001).unwrap())
        .with_pods(ips(&["10.244.0.2", "10.244.0.3", "fd00::2", "fd00::3"]))
        .with_pod_ports(ports(&[("10.244.0.2", 40002), ("fd00::2", 40012)]));
    apply_and_verify(&nft, &rules);

    // Add one entry per family, remove one present and one absent entry.
    nft.update_ports(
        &table,
        &ports(&[("10.244.0.3", 40003), ("fd00::3", 40013)]),
        &ports(&[("10.244.0.2", 40002), ("10.244.9.9", 40099)]),
    )
    .unwrap();
    let err = nft.verify(&rules).unwrap_err();
    let Error::Mismatch { differences, .. } = &err else {
        panic!("expected a mismatch, got {err}");
    };
    assert_eq!(
        differences,
        &[
            "map pod_port_v4 lacks 10.244.0.2 : 40002",
            "map pod_port_v4 has unexpected 10.244.0.3 : 40003",
            "map pod_port_v6 has unexpected fd00::3 : 40013",
        ]
    );
    rules.remove_pod_port(ip_addr("10.244.0.2"));
    for (ip, port) in ports(&[("10.244.0.3", 40003), ("fd00::3", 40013)]) {
        rules.set_pod_port(ip, port);
    }
    nft.verify(&rules).unwrap();

    // A port change: the old pair removed and the new one added, in one transaction.
    let new = NonZeroU16::new(40022).unwrap();
    let old = rules.set_pod_port(ip_addr("fd00::2"), new).unwrap();
    nft.update_ports(
        &table,
        &[(ip_addr("fd00::2"), new)],
        &[(ip_addr("fd00::2"), old)],
    )
    .unwrap();
    nft.verify(&rules).unwrap();

    // A removal with another port than the kernel's fails the whole batch, which changes nothing.
    let err = nft
        .update_ports(
            &table,
            &ports(&[("10.244.0.4", 40004)]),
            &ports(&[("10.244.0.3", 40999)]),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Rejected { .. }), "{err}");
    nft.verify(&rules).unwrap();
    nft.update_ports(&table, &[], &[]).unwrap();

    // Set updates leave the maps alone, and draining drops the ports with the pods.
    nft.update(&table, &ips(&["10.244.0.4"]), &[]).unwrap();
    rules.add_pod(ip_addr("10.244.0.4"));
    nft.verify(&rules).unwrap();
    apply_and_verify(&nft, &rules.without_pods());

    // REDIRECT ignores the ports: no maps, so a port update is rejected by nft.
    let redirect = rules.clone().with_capture(Capture::Redirect);
    apply_and_verify(&nft, &redirect);
    let err = nft
        .update_ports(&table, &ports(&[("10.244.0.2", 40002)]), &[])
        .unwrap_err();
    assert!(matches!(err, Error::Rejected { .. }), "{err}");
    nft.remove(&redirect).unwrap();
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn tproxy_delivers_to_the_pod_port_or_falls_back_to_the_shared_listener() {
    require_privileges();
    // A node namespace with the rules and listeners, and a pod namespace whose three addresses
    // stand for three pods, joined by a veth pair; the pods route everything via the node.
    let node = Netns::create("node");
    let pods = Netns::create("pods");
    ip(
        &node,
        &[
            "link", "add", "vpods", "type", "veth", "peer", "name", "eth0", "netns", &pods.0,
        ],
    );
    ip(&node, &["addr", "add", "10.250.0.1/24", "dev", "vpods"]);
    ip(&node, &["link", "set", "vpods", "up"]);
    for addr in ["10.250.0.2/24", "10.250.0.3/24", "10.250.0.4/24"] {
        ip(&pods, &["addr", "add", addr, "dev", "eth0"]);
    }
    ip(&pods, &["link", "set", "eth0", "up"]);
    ip(&pods, &["route", "add", "default", "via", "10.250.0.1"]);

    let (shared, tenant, (_reserved, closed_port)) = in_netns(&node, || {
        (
            transparent_listener(15001),
            transparent_listener(0),
            reserved_port(),
        )
    });
    let tenant_port = tenant.local_addr().unwrap().port();
    let (with_port, with_closed_port, without_port) = (
        Ipv4Addr::new(10, 250, 0, 2),
        Ipv4Addr::new(10, 250, 0, 3),
        Ipv4Addr::new(10, 250, 0, 4),
    );
    let rules = RuleSet::default()
        .with_pods([with_port, with_closed_port, without_port].map(IpAddr::V4))
        .with_pod_ports([
            (IpAddr::V4(with_port), NonZeroU16::new(tenant_port).unwrap()),
            (
                IpAddr::V4(with_closed_port),
                NonZeroU16::new(closed_port).unwrap(),
            ),
        ]);
    let nft = Nft::new().unwrap().in_netns(&node.0).unwrap();
    apply_and_verify(&nft, &rules);

    // A destination outside both namespaces: only TPROXY's policy routing delivers it.
    let dst = SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 80);
    let listeners = [("shared", &shared), ("tenant", &tenant)];
    assert_eq!(accepted_by(&pods, &listeners, with_port, dst), "tenant");
    assert_eq!(
        accepted_by(&pods, &listeners, with_closed_port, dst),
        "shared"
    );
    assert_eq!(accepted_by(&pods, &listeners, without_port, dst), "shared");

    // The tenant's listener closes: its pod falls back to the shared listener.
    close_listener(tenant);
    let listeners = [("shared", &shared)];
    assert_eq!(accepted_by(&pods, &listeners, with_port, dst), "shared");
    nft.remove(&rules).unwrap();
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn check_accepts_rendered_output_and_reports_rejections() {
    require_privileges();
    let netns = Netns::create("check");
    let nft = Nft::new().unwrap().in_netns(&netns.0).unwrap();
    for capture in [Capture::Tproxy, Capture::Redirect] {
        for rules in [
            RuleSet::default(),
            RuleSet::default().with_pods(ips(&["10.0.0.1", "10.0.0.2", "fd00::1"])),
        ] {
            nft.check(&rules.with_capture(capture)).unwrap();
        }
    }

    // Every golden file passes `nft -c -f -` directly, as `nodeproxy rules | nft -c -f -` would.
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for entry in std::fs::read_dir(&golden).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "nft") {
            continue;
        }
        let script = std::fs::read(&path).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &netns.0, "nft", "-c", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &script).unwrap();
        assert!(
            child.wait().unwrap().success(),
            "nft -c rejected {}",
            path.display()
        );
    }

    // An update against a table that does not exist is rejected, with nft's stderr in the error.
    let err = nft
        .update(&TableName::default(), &ips(&["10.0.0.1"]), &[])
        .unwrap_err();
    let Error::Rejected { stderr, .. } = &err else {
        panic!("expected a rejection, got {err}");
    };
    assert!(stderr.contains("No such file or directory"), "{err}");
}
