//! Privileged tier: two daemons (node A and node B, each in its own network namespace with its
//! own pods, joined by an underlay link) and a shared standalone CA. Real nftables capture, real
//! mTLS on port 15008, real HTTP/2 CONNECT.
//!
//! Every test is `#[ignore]`d (it needs root, `ip` and `nft`): `scripts/test.sh` runs them as root
//! with `--include-ignored`, and once asked to run, a test that cannot panics saying why.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use controlplane::client::Target;
use nodeproxy::admin_client::metric_sum;
use nodeproxy::lab::twonode::{Side, TwoNodes};
use nodeproxy_tests::{
    ControlPlaneFiles, Daemon, require_privileges, require_tools, tcp_connect, tcp_echo_server,
    tcp_roundtrip, unique_prefix,
};

const ADMIN: &str = "127.0.0.1:15000";
const METRICS: &str = "127.0.0.1:15020";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";

/// The meshed namespace `shop`, to which [`pod`]s are appended.
const SHOP: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodeproxy.io/mesh: enabled}}\n";

/// The node name (`--node`, `nodeName`) of `side`.
fn node_name(side: Side) -> &'static str {
    match side {
        Side::A => "node-a",
        Side::B => "node-b",
    }
}

/// Pod `name` in `shop`, of service account `sa`, on `side`'s node (pod `i` there).
fn pod(t: &TwoNodes, name: &str, sa: &str, side: Side, i: usize) -> String {
    let node = node_name(side);
    let (ip, host) = (t.pod_ip(side, i), t.node_ip(side));
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{serviceAccountName: {sa}, nodeName: {node}, containers: [{{name: c, image: i}}]}}\n\
         status: {{phase: Running, hostIP: '{host}', podIP: '{ip}'}}\n"
    )
}

/// Pod a1 (`shop/client`) on node-a, pod b1 (`shop/server`) on node-b.
fn view(t: &TwoNodes) -> String {
    format!(
        "{SHOP}{}{}",
        pod(t, "a1", "client", Side::A, 1),
        pod(t, "b1", "server", Side::B, 1)
    )
}

struct Mesh {
    topo: TwoNodes,
    a: Daemon,
    b: Daemon,
    dir: tempfile::TempDir,
}

fn start_mesh(tag: &str, lifetime_secs: u64) -> Mesh {
    start_mesh_with(tag, lifetime_secs, "")
}

/// [`start_mesh`] with `extra` objects appended to both daemons' view.
fn start_mesh_with(tag: &str, lifetime_secs: u64, extra: &str) -> Mesh {
    let topo = TwoNodes::create(&unique_prefix(tag), 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("view.yaml");
    std::fs::write(&config, view(&topo) + extra).unwrap();
    let (ca_cert, ca_key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    // The operator's shared CA (standalone mode): created once, loaded by both daemons.
    certs::Ca::load_or_generate("cluster.local", &ca_cert, &ca_key).unwrap();
    let lifetime = lifetime_secs.to_string();
    let start = |side: Side| {
        start_daemon(
            &topo,
            side,
            &[
                "--config",
                config.to_str().unwrap(),
                "--ca-cert",
                ca_cert.to_str().unwrap(),
                "--ca-key",
                ca_key.to_str().unwrap(),
                "--cert-lifetime-secs",
                &lifetime,
            ],
        )
    };
    let a = start(Side::A);
    let b = start(Side::B);
    Mesh { topo, a, b, dir }
}

fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An echo server on pod B1's port 8080, and the address pod A1 dials to reach it.
fn echo_on_b(topo: &TwoNodes) -> (nodeproxy_tests::EchoServer, SocketAddr) {
    let server = tcp_echo_server(
        &topo.pod(Side::B, 1),
        SocketAddr::from(([0, 0, 0, 0], 8080)),
    )
    .unwrap();
    (
        server,
        SocketAddr::new(topo.pod_ip(Side::B, 1).into(), 8080),
    )
}

fn no_key_material(what: &str, text: &str) {
    assert!(
        !text.contains("PRIVATE KEY"),
        "{what} contains key material:\n{text}"
    );
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn pod_on_a_reaches_pod_on_b_through_the_mtls_tunnel() {
    require_privileges();
    let m = start_mesh("mt", 3600);
    let (server, to_b) = echo_on_b(&m.topo);
    let payload: Vec<u8> = (0..300_000).map(|i| (i % 251) as u8).collect();
    for _ in 0..3 {
        let reply = tcp_roundtrip(&m.topo.pod(Side::A, 1), None, to_b, &payload).unwrap();
        assert_eq!(reply.len(), payload.len());
        assert!(reply == payload, "the echo differs from what was sent");
    }
    // The server saw node B's daemon (its address on b1's link), not pod a1: the bytes came
    // out of the tunnel on node B.
    let seen = server.wait_for(3, Duration::from_secs(5));
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[0].peer.ip().to_canonical(),
        IpAddr::from(m.topo.gateway(Side::B, 1))
    );

    // Both daemons' metrics show both identities.
    let ma = poll("node-a close metrics", Duration::from_secs(10), || {
        let s = m.a.metrics().ok()?;
        (metric_sum(
            &s,
            "nodeproxy_tcp_close_total",
            &[
                ("tenant", CLIENT),
                ("peer", SERVER),
                ("direction", "outbound"),
                ("error", "none"),
            ],
        ) >= 3.0)
            .then_some(s)
    });
    assert!(
        metric_sum(
            &ma,
            "nodeproxy_tcp_read_bytes_total",
            &[("tenant", CLIENT), ("peer", SERVER)]
        ) >= 3.0 * payload.len() as f64
    );
    assert_eq!(
        metric_sum(
            &ma,
            "nodeproxy_tls_handshakes_total",
            &[
                ("tenant", CLIENT),
                ("direction", "outbound"),
                ("result", "ok")
            ]
        ),
        1.0,
        "the three connections share one pooled tunnel connection"
    );
    assert!(
        metric_sum(
            &ma,
            "nodeproxy_cert_expiry_timestamp_seconds",
            &[("tenant", CLIENT)]
        ) > 0.0
    );
    let mb = poll("node-b close metrics", Duration::from_secs(10), || {
        let s = m.b.metrics().ok()?;
        (metric_sum(
            &s,
            "nodeproxy_tcp_close_total",
            &[
                ("tenant", SERVER),
                ("peer", CLIENT),
                ("direction", "inbound"),
                ("error", "none"),
            ],
        ) >= 3.0)
            .then_some(s)
    });
    assert_eq!(
        metric_sum(
            &mb,
            "nodeproxy_tls_handshakes_total",
            &[
                ("tenant", SERVER),
                ("direction", "inbound"),
                ("result", "ok")
            ]
        ),
        1.0
    );

    // No key in /config_dump or the logs.
    for d in [&m.a, &m.b] {
        let (code, dump) = d.get("/config_dump").unwrap();
        assert_eq!(code, 200);
        no_key_material("/config_dump", &dump);
        no_key_material("the daemon's log", &d.logs());
    }
    drop(m.dir);
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn tunnelled_bytes_are_counted_while_the_connection_is_open() {
    require_privileges();
    use std::io::{Read, Write};
    let m = start_mesh("mb", 3600);
    let (_server, to_b) = echo_on_b(&m.topo);
    let payload = vec![7u8; 200_000];
    let mut conn = tcp_connect(&m.topo.pod(Side::A, 1), None, to_b).unwrap();
    conn.write_all(&payload).unwrap();
    let mut echo = vec![0u8; payload.len()];
    conn.read_exact(&mut echo).unwrap();
    assert!(echo == payload, "the echo differs from what was sent");
    // Still open: both daemons already count what went each way.
    let bytes = |d: &Daemon, tenant: &str, peer: &str, metric: &str| {
        d.metrics().map_or(0.0, |s| {
            metric_sum(&s, metric, &[("tenant", tenant), ("peer", peer)])
        })
    };
    let n = payload.len() as f64;
    poll(
        "byte counters of the open connection",
        Duration::from_secs(10),
        || {
            let counted = [
                bytes(&m.a, CLIENT, SERVER, "nodeproxy_tcp_read_bytes_total"),
                bytes(&m.a, CLIENT, SERVER, "nodeproxy_tcp_write_bytes_total"),
                bytes(&m.b, SERVER, CLIENT, "nodeproxy_tcp_read_bytes_total"),
                bytes(&m.b, SERVER, CLIENT, "nodeproxy_tcp_write_bytes_total"),
            ];
            counted.iter().all(|&c| c >= n).then_some(())
        },
    );
    // A failed scrape must fail the test, not read as zero closes.
    let closes = metric_sum(&m.a.metrics().unwrap(), "nodeproxy_tcp_close_total", &[]);
    assert_eq!(closes, 0.0, "the connection is still open");
    drop(conn);
}

/// Streams that arrive through the tunnel are the destination tenant's work: over its
/// connection limit, node B sheds them and counts the refusal against that tenant only.
#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn inbound_tunnel_streams_are_held_to_the_destination_tenants_limits() {
    require_privileges();
    use std::io::{Read, Write};
    let policy = "---\napiVersion: nodeproxy.io/v1alpha1\nkind: TenantPolicy\n\
        metadata: {name: server, namespace: shop}\n\
        spec: {serviceAccount: server, limits: {maxConnections: 1}}\n";
    let m = start_mesh_with("ml", 3600, policy);
    let (_server, to_b) = echo_on_b(&m.topo);
    let payload = b"held".to_vec();
    let mut held = tcp_connect(&m.topo.pod(Side::A, 1), None, to_b).unwrap();
    held.write_all(&payload).unwrap();
    let mut echo = vec![0u8; payload.len()];
    held.read_exact(&mut echo).unwrap();
    assert_eq!(echo, payload, "the first connection is within the limit");

    // A second one while the first is open: the server tenant is at its limit.
    let second = tcp_roundtrip(&m.topo.pod(Side::A, 1), None, to_b, b"over");
    assert!(
        !matches!(&second, Ok(reply) if reply == b"over"),
        "a connection over the destination tenant's limit got through: {second:?}"
    );
    // A failed scrape fails the test rather than reading as no refusal.
    let rejected = |d: &Daemon, tenant: &str| {
        metric_sum(
            &d.metrics().unwrap(),
            "nodeproxy_tenant_rejected_total",
            &[("tenant", tenant), ("reason", "connections")],
        )
    };
    poll("node B's refusal counter", Duration::from_secs(10), || {
        (rejected(&m.b, SERVER) >= 1.0).then_some(())
    });
    assert_eq!(
        rejected(&m.a, CLIENT),
        0.0,
        "the client tenant has no limit"
    );

    // Once the first connection ends its admission is released, and new ones get through.
    drop(held);
    poll(
        "a connection after the held one closed",
        Duration::from_secs(10),
        || {
            tcp_roundtrip(&m.topo.pod(Side::A, 1), None, to_b, b"again")
                .ok()
                .filter(|reply| reply == b"again")
        },
    );
}

/// `openssl s_client` from node A against node B's 15008, naming the server identity.
fn s_client(m: &Mesh, extra: &[&str]) -> String {
    let sni = certs::sni::encode(&SERVER.parse().unwrap()).unwrap();
    let connect = format!("{}:15008", m.topo.node_ip(Side::B));
    m.topo
        .node(Side::A)
        .command("openssl")
        .args([
            "s_client",
            "-connect",
            &connect,
            "-servername",
            &sni,
            "-alpn",
            "h2",
            "-ign_eof",
        ])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .output_with_input(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
}

trait OutputWithInput {
    fn output_with_input(&mut self, input: &[u8]) -> String;
}

impl OutputWithInput for std::process::Command {
    fn output_with_input(&mut self, input: &[u8]) -> String {
        use std::io::Write;
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

#[test]
#[ignore = "privileged: needs root, ip, nft and openssl; scripts/test.sh runs it as root (--include-ignored)"]
fn the_tunnel_refuses_clients_without_a_certificate_or_from_another_ca() {
    require_privileges();
    require_tools(&[("openssl", "openssl")]);
    let m = start_mesh("mr", 3600);
    let refused = |m: &Mesh, n: f64| {
        poll(
            "an inbound handshake error",
            Duration::from_secs(10),
            || {
                let s = m.b.metrics().ok()?;
                (metric_sum(
                    &s,
                    "nodeproxy_tls_handshakes_total",
                    &[
                        ("tenant", SERVER),
                        ("direction", "inbound"),
                        ("result", "error"),
                    ],
                ) >= n)
                    .then_some(())
            },
        )
    };
    // No client certificate.
    let out = s_client(&m, &[]);
    assert!(
        out.contains("alert certificate required") || out.contains("alert"),
        "{out}"
    );
    refused(&m, 1.0);
    assert!(
        m.b.logs().contains("tunnel TLS handshake refused"),
        "{}",
        m.b.logs()
    );

    // A certificate (with the right SPIFFE ID) from another CA.
    let (key, cert) = (
        m.dir.path().join("rogue.key"),
        m.dir.path().join("rogue.pem"),
    );
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ])
        .args(["-days", "1", "-subj", "/CN=rogue"])
        .args(["-addext", &format!("subjectAltName=URI:{CLIENT}")])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let out = s_client(
        &m,
        &[
            "-cert",
            cert.to_str().unwrap(),
            "-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(out.contains("alert"), "{out}");
    refused(&m, 2.0);
    // The refusal names the reason, never a key.
    let logs = m.b.logs();
    assert!(logs.contains("invalid peer certificate"), "{logs}");
    no_key_material("node-b's log", &logs);
    no_key_material("node-a's log", &m.a.logs());
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn certificates_rotate_under_continuous_traffic_without_failures() {
    require_privileges();
    let m = start_mesh("mo", 4);
    let (_server, to_b) = echo_on_b(&m.topo);
    let expiry = |d: &Daemon, tenant: &str| {
        d.metrics()
            .map(|s| {
                metric_sum(
                    &s,
                    "nodeproxy_cert_expiry_timestamp_seconds",
                    &[("tenant", tenant)],
                )
            })
            .unwrap_or(0.0)
    };
    let payload = b"rotation".repeat(100);
    let (mut ok, mut failed) = (0, Vec::new());
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(9);
    while Instant::now() < deadline {
        match tcp_roundtrip(&m.topo.pod(Side::A, 1), None, to_b, &payload) {
            Ok(reply) if reply == payload => ok += 1,
            Ok(reply) => failed.push(format!("short reply: {} bytes", reply.len())),
            Err(e) => failed.push(e.to_string()),
        }
        if first.is_none() {
            first = Some((expiry(&m.a, CLIENT), expiry(&m.b, SERVER)));
        }
    }
    let (a0, b0) = first.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "only {ok} connections in 9 s");
    // Both tenants renewed (4 s certificates, renewed at half life) during the traffic.
    assert!(
        expiry(&m.a, CLIENT) > a0 && a0 > 0.0,
        "node-a did not rotate"
    );
    assert!(
        expiry(&m.b, SERVER) > b0 && b0 > 0.0,
        "node-b did not rotate"
    );
    let ma = m.a.metrics().unwrap();
    assert!(
        metric_sum(
            &ma,
            "nodeproxy_tls_handshakes_total",
            &[
                ("tenant", CLIENT),
                ("direction", "outbound"),
                ("result", "ok")
            ]
        ) >= 2.0,
        "new certificates are used for new tunnel connections"
    );
    no_key_material("node-a's log", &m.a.logs());
    no_key_material("node-b's log", &m.b.logs());
}

/// Runs a control plane (see [`nodeproxy_tests::start_control_plane`]) on node A's underlay
/// address, reachable from both nodes, speaking TLS. Returns its address and CA; it stops with
/// the test process.
fn start_control_plane(t: &TwoNodes, view: &Path, tokens: &Path, ca: &Path, key: &Path) -> Target {
    let files = ControlPlaneFiles {
        view,
        tokens,
        ca_cert: ca,
        ca_key: key,
    };
    let addr = SocketAddr::from((t.node_ip(Side::A), 15012));
    nodeproxy_tests::start_control_plane(&t.node(Side::A), addr, files).unwrap()
}

/// Starts `nodeproxy run --node <side's node> <extra...>` on `side`'s node, its admin and metrics
/// endpoints on the node's loopback, and waits until it is ready.
fn start_daemon(t: &TwoNodes, side: Side, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "run",
        "--node",
        node_name(side),
        "--admin-addr",
        ADMIN,
        "--metrics-addr",
        METRICS,
    ];
    args.extend_from_slice(extra);
    let mut d = Daemon::start(&t.node(side), &args).unwrap();
    d.wait_ready(Duration::from_secs(20)).unwrap();
    d
}

/// [`start_daemon`] with `--control-plane` (and its CA) and `token` (written to a file in `dir`).
fn start_with_control_plane(
    t: &TwoNodes,
    side: Side,
    cp: &Target,
    dir: &Path,
    token: &str,
) -> Daemon {
    let token_file = dir.join(format!("{}.token", node_name(side)));
    std::fs::write(&token_file, token).unwrap();
    let ca = cp.ca_file.as_deref().unwrap();
    start_daemon(
        t,
        side,
        &[
            "--control-plane",
            &cp.url,
            "--control-plane-ca",
            ca.to_str().unwrap(),
            "--control-plane-token-file",
            token_file.to_str().unwrap(),
        ],
    )
}

/// Certify over real gRPC (TLS, verified against the control plane's CA) from inside node A's
/// namespace, as `token`.
fn certify(t: &TwoNodes, cp: &Target, token: &str, identity: &str) -> Result<(), tonic::Status> {
    let (cp, token, identity) = (cp.clone(), token.to_owned(), identity.to_owned());
    t.node(Side::A)
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let channel = cp.connect(|endpoint| endpoint).await.unwrap();
                let mut client = controlplane::api::identity_client::IdentityClient::new(channel);
                let mut req = tonic::Request::new(controlplane::api::CertifyRequest {
                    csr_pem: certs::test_util::csr_pem(&identity),
                    identity,
                    validity_seconds: 0,
                });
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                client.certify(req).await.map(drop)
            })
        })
        .unwrap()
}

#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn tunnel_certificates_come_from_the_control_planes_node_authorizing_ca() {
    require_privileges();
    let topo = TwoNodes::create(&unique_prefix("mc"), 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("view.yaml");
    std::fs::write(&config, view(&topo)).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "token-of-node-a-0123456789 node-a\ntoken-of-node-b-0123456789 node-b\n",
    )
    .unwrap();
    let (ca_cert, ca_key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    let cp = start_control_plane(&topo, &config, &tokens, &ca_cert, &ca_key);

    // Node authorization over the wire: node-a may certify its own pod's identity only.
    poll("the control plane", Duration::from_secs(10), || {
        certify(&topo, &cp, "token-of-node-a-0123456789", CLIENT).ok()
    });
    let refused = certify(&topo, &cp, "token-of-node-a-0123456789", SERVER).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("node \"node-a\"") && refused.message().contains(SERVER));

    let start =
        |side: Side, token: &str| start_with_control_plane(&topo, side, &cp, dir.path(), token);
    let a = start(Side::A, "token-of-node-a-0123456789");
    let b = start(Side::B, "token-of-node-b-0123456789");
    let (_server, to_b) = echo_on_b(&topo);
    let reply = tcp_roundtrip(&topo.pod(Side::A, 1), None, to_b, b"via the control plane").unwrap();
    assert_eq!(reply, b"via the control plane");
    let mb = poll(
        "node-b's inbound handshake",
        Duration::from_secs(10),
        || {
            let s = b.metrics().ok()?;
            (metric_sum(
                &s,
                "nodeproxy_tls_handshakes_total",
                &[
                    ("tenant", SERVER),
                    ("direction", "inbound"),
                    ("result", "ok"),
                ],
            ) >= 1.0)
                .then_some(s)
        },
    );
    assert!(
        metric_sum(
            &mb,
            "nodeproxy_cert_expiry_timestamp_seconds",
            &[("tenant", SERVER)]
        ) > 0.0
    );
    no_key_material("node-a's log", &a.logs());
    no_key_material("node-b's log", &b.logs());
}

/// Tenants' entries in the daemon's `/tenants`, by SPIFFE ID.
fn tenants(d: &Daemon) -> std::collections::BTreeMap<String, serde_json::Value> {
    let (code, body) = d.get("/tenants").unwrap();
    assert_eq!(code, 200, "{body}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    list.into_iter()
        .map(|t| (t["tenant"].as_str().unwrap().to_owned(), t))
        .collect()
}

/// With `--control-plane` the node view comes only from the control plane, so SIGHUP has nothing
/// to reload: every tenant keeps its pool, and later views still apply. (SIGHUP once re-read the
/// embedded demo view instead: every pod left capture and every pool drained.)
#[test]
#[ignore = "privileged: needs root, ip and nft; scripts/test.sh runs it as root (--include-ignored)"]
fn sighup_under_a_remote_control_plane_leaves_every_tenant_serving() {
    require_privileges();
    let topo = TwoNodes::create(&unique_prefix("mh"), 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("view.yaml");
    // Pods a1 (client) and a2 (server) on node-a; a3 (third) joins later.
    let two = format!(
        "{SHOP}{}{}",
        pod(&topo, "a1", "client", Side::A, 1),
        pod(&topo, "a2", "server", Side::A, 2)
    );
    std::fs::write(&config, &two).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "token-of-node-a-0123456789 node-a\n").unwrap();
    let (ca_cert, ca_key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    let cp = start_control_plane(&topo, &config, &tokens, &ca_cert, &ca_key);
    let a = start_with_control_plane(
        &topo,
        Side::A,
        &cp,
        dir.path(),
        "token-of-node-a-0123456789",
    );
    let server = tcp_echo_server(
        &topo.pod(Side::A, 2),
        SocketAddr::from(([0, 0, 0, 0], 8080)),
    )
    .unwrap();
    let to_a2 = SocketAddr::new(topo.pod_ip(Side::A, 2).into(), 8080);
    // One connection a1 -> a2, through the daemon (the server sees the node's address).
    let through_the_daemon = |n: usize, payload: &[u8]| {
        let reply = tcp_roundtrip(&topo.pod(Side::A, 1), None, to_a2, payload).unwrap();
        assert_eq!(reply, payload);
        let seen = server.wait_for(n, Duration::from_secs(5));
        assert_eq!(
            seen.get(n - 1).map(|s| s.peer.ip()),
            Some(IpAddr::from(topo.gateway(Side::A, 2))),
            "connection {n} did not go through the daemon: {seen:?}"
        );
    };
    through_the_daemon(1, b"before SIGHUP");
    // The pools' threads publish their ids once placed: wait for both tenants' ids.
    let before = poll(
        "both tenants' pool threads",
        Duration::from_secs(10),
        || {
            let t = tenants(&a);
            let placed = [CLIENT, SERVER].iter().all(|id| {
                t.get(*id).is_some_and(|e| {
                    e["thread_ids"]
                        .as_array()
                        .is_some_and(|ids| !ids.is_empty())
                })
            });
            placed.then_some(t)
        },
    );
    assert_eq!(
        before[CLIENT]["connections_total"], 1,
        "{:?}",
        before[CLIENT]
    );

    // Lines naming SIGHUP so far (none is expected; counting keeps the wait honest regardless).
    let hups = |d: &Daemon| d.logs().matches("SIGHUP").count();
    let hups_before = hups(&a);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(a.pid()).unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    poll(
        "the daemon to log its SIGHUP",
        Duration::from_secs(10),
        || (hups(&a) > hups_before).then_some(()),
    );
    // The main loop went on: a third tenant's pod, added at the control plane, shows up.
    let three = pod(&topo, "a3", "third", Side::A, 3);
    std::fs::write(&config, two + &three).unwrap();
    let third = "spiffe://cluster.local/ns/shop/sa/third";
    poll(
        "the third tenant in /tenants",
        Duration::from_secs(10),
        || tenants(&a).contains_key(third).then_some(()),
    );

    // The first tenants were never drained nor recreated: the same pool threads, and the client's
    // count goes on from before.
    through_the_daemon(2, b"after SIGHUP");
    let after = tenants(&a);
    for id in [CLIENT, SERVER] {
        let (was, is) = (&before[id], after.get(id));
        assert_eq!(
            is.map(|t| &t["thread_ids"]),
            Some(&was["thread_ids"]),
            "{id}'s pool was recreated: {was} then {is:?}"
        );
    }
    assert_eq!(after[CLIENT]["connections_total"], 2, "{}", after[CLIENT]);
    let logs = a.logs();
    assert!(!logs.contains("pool draining"), "{logs}");
    assert!(
        logs.contains("SIGHUP: the node view comes from the control plane; nothing to reload"),
        "{logs}"
    );
}
