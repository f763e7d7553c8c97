//! In-process end-to-end: the whole daemon on loopback, no root needed.
//!
//! There is no NAT rule on loopback, so the kernel cannot tell an original destination; the
//! daemon is started with `OrigDst::Fixed` (a test-util mode) pointing at a real echo server.
//! Everything else is real: listeners, classification by source IP, the tenants' pools, the
//! relay, the admin and metrics endpoints over HTTP.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use nodeproxy::admin_client;
use nodeproxy::app::{self, StartOptions};
use nodeproxy::config::{Config, RunArgs};
use nodeproxy::outbound::OrigDst;

const VIEW: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodeproxy.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop}
spec: {serviceAccountName: web, nodeName: n1, containers: [{name: app, image: web}]}
status: {phase: Running, podIP: 127.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop}
spec: {serviceAccountName: db, nodeName: n1, containers: [{name: app, image: db}]}
status: {phase: Running, podIP: 127.0.0.3}
"#;

fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn config(view_file: &std::path::Path) -> Config {
    let any = "127.0.0.1:0";
    Config::from_args(
        RunArgs::from_flags([
            "--config",
            view_file.to_str().unwrap(),
            "--node",
            "n1",
            "--outbound-addr",
            any,
            "--admin-addr",
            any,
            "--metrics-addr",
            any,
            "--tunnel-addr",
            any,
            "--no-redirect",
            // No capture on loopback; REDIRECT's listener needs no CAP_NET_ADMIN, so the tests
            // that start without `OrigDst::Fixed` also run unprivileged.
            "--capture",
            "redirect",
            "--cpu-control",
            "none",
        ])
        .unwrap(),
    )
    .unwrap()
}

/// Connects from `src` to the proxy, sends `payload`, returns what came back.
fn roundtrip(src: IpAddr, proxy: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect(&proxy.into())?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(payload)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

fn metric(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    admin_client::metric_sum(scrape, name, labels)
}

fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (code, text) = admin_client::get(addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    admin_client::parse_metrics(&text).unwrap()
}

/// Starts the daemon on loopback with `view`, every captured connection going to a fresh echo
/// server; returns once it is ready. Keep the directory alive as long as the daemon.
fn start_with_echo(view: &str) -> (tempfile::TempDir, app::Running) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("view.yaml");
    std::fs::write(&file, view).unwrap();
    let running = app::start(
        config(&file),
        StartOptions {
            orig_dst: Some(OrigDst::Fixed(echo_server())),
        },
    )
    .unwrap();
    admin_client::wait_ok(running.admin_addr, "/ready", Duration::from_secs(5)).unwrap();
    (dir, running)
}

#[test]
fn relays_per_tenant_and_refuses_unknown_sources() {
    let (_dir, mut running) = start_with_echo(VIEW);
    let proxy = running.outbound_addrs[0];
    let (admin, metrics) = (running.admin_addr, running.metrics_addr);

    // Tenant web: 3 connections of 100 KiB each, echoed intact.
    let payload: Vec<u8> = (0..100 * 1024).map(|i| (i % 253) as u8).collect();
    for _ in 0..3 {
        let back = roundtrip("127.0.0.2".parse().unwrap(), proxy, &payload).unwrap();
        assert_eq!(back, payload);
    }
    // Tenant db: one small connection.
    assert_eq!(
        roundtrip("127.0.0.3".parse().unwrap(), proxy, b"ping").unwrap(),
        b"ping"
    );
    // An address that is no local meshed pod gets nothing: no identity is guessed.
    let refused = roundtrip("127.0.0.9".parse().unwrap(), proxy, b"who am i");
    assert!(
        matches!(&refused, Ok(v) if v.is_empty()) || refused.is_err(),
        "unknown source got data back: {refused:?}"
    );

    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let db = "spiffe://cluster.local/ns/shop/sa/db";
    // Close counts are recorded when the pool's job ends: poll, do not sleep.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = scrape(metrics);
        if metric(&s, "nodeproxy_tcp_close_total", &[("tenant", web)]) >= 3.0
            || std::time::Instant::now() > deadline
        {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = [("direction", "outbound")];
    assert_eq!(
        metric(&s, "nodeproxy_tcp_open_total", &[("tenant", web), out[0]]),
        3.0
    );
    assert_eq!(
        metric(&s, "nodeproxy_tcp_open_total", &[("tenant", db)]),
        1.0
    );
    assert_eq!(
        metric(
            &s,
            "nodeproxy_tcp_close_total",
            &[("tenant", web), ("error", "none")]
        ),
        3.0
    );
    assert_eq!(
        metric(&s, "nodeproxy_tcp_read_bytes_total", &[("tenant", web)]),
        3.0 * payload.len() as f64
    );
    assert_eq!(
        metric(&s, "nodeproxy_tcp_write_bytes_total", &[("tenant", web)]),
        3.0 * payload.len() as f64
    );
    assert_eq!(
        metric(&s, "nodeproxy_tcp_open_connections", &[("tenant", web)]),
        0.0
    );
    assert!(
        metric(
            &s,
            "nodeproxy_tcp_refused_total",
            &[("reason", "unknown_source")]
        ) >= 1.0
    );

    // /tenants: both tenants, each with its own pool thread and its own count.
    let (code, body) = admin_client::get(admin, "/tenants").unwrap();
    assert_eq!(code, 200);
    let tenants: serde_json::Value = serde_json::from_str(&body).unwrap();
    let by_id = |id: &str| {
        tenants
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tenant"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} missing from /tenants: {body}"))
    };
    assert_eq!(by_id(web)["connections_total"], 3);
    assert_eq!(by_id(db)["connections_total"], 1);
    assert_eq!(by_id(web)["pods"][0]["pod"], "shop/web-0");
    assert_ne!(by_id(web)["thread_ids"], by_id(db)["thread_ids"]);
    assert_eq!(by_id(web)["isolation"], "per-tenant");

    // /config_dump: the resolved config and the view.
    let (code, body) = admin_client::get(admin, "/config_dump").unwrap();
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["config"]["node"], "n1");
    assert_eq!(dump["view"]["local"].as_array().unwrap().len(), 2);

    running.shutdown();
    let (code, _) = admin_client::get(admin, "/ready").map_or((0, String::new()), |r| r);
    assert_ne!(code, 200, "not ready (or gone) after shutdown");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let view = dir.path().join("view.yaml");
    std::fs::write(&view, VIEW).unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = config(&view);
    config.admin_addr = taken.local_addr().unwrap();
    let err = app::start(config, StartOptions::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&taken.local_addr().unwrap().to_string()),
        "{msg}"
    );
    assert!(msg.contains("--admin-addr"), "{msg}");
}

#[test]
fn a_bad_view_file_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let view = dir.path().join("bad.yaml");
    std::fs::write(
        &view,
        VIEW.replace(
            "nodeName: n1, containers: [{name: app, image: web}]",
            "containers: []",
        ) + "---\n"
            + &VIEW.split("---").nth(2).unwrap().replace("db-0", "db-1"),
    )
    .unwrap();
    let err = app::start(config(&view), StartOptions::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("bad.yaml"), "{msg}");
    assert!(msg.contains("nodeName"), "{msg}");
    assert!(msg.contains("127.0.0.3"), "duplicate IP named: {msg}");
    assert!(
        msg.contains("db-0") && msg.contains("db-1"),
        "both pods named: {msg}"
    );
}

/// A tenant over its own connection limit is shed, fast and counted; another tenant on the same
/// daemon is not touched.
#[test]
fn a_tenant_over_its_limit_is_shed_alone() {
    let policy = "---\napiVersion: nodeproxy.io/v1alpha1\nkind: TenantPolicy\n\
                  metadata: {name: web, namespace: limits}\n\
                  spec: {serviceAccount: web, weight: 300, limits: {maxConnections: 2}}\n";
    // Its own namespace: metrics are process-wide and the other tests count `shop`'s tenants.
    let (_dir, mut running) =
        start_with_echo(&format!("{}{policy}", VIEW.replace("shop", "limits")));
    let proxy = running.outbound_addrs[0];

    // web holds two open connections: its limit.
    let open = |src: &str| {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::new(src.parse().unwrap(), 0).into())
            .unwrap();
        sock.connect(&proxy.into()).unwrap();
        let s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = open("127.0.0.2");
        s.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        held.push(s);
    }
    // A third is shed: reset with no byte relayed.
    let mut third = open("127.0.0.2");
    let _ = third.write_all(b"hi");
    let mut b = [0u8; 2];
    assert!(
        third.read_exact(&mut b).is_err(),
        "web's third connection got through"
    );
    // db is not affected by web's limit.
    for _ in 0..5 {
        assert_eq!(
            roundtrip("127.0.0.3".parse().unwrap(), proxy, b"db").unwrap(),
            b"db"
        );
    }
    let (_, body) = admin_client::get(running.admin_addr, "/tenants").unwrap();
    let tenants: serde_json::Value = serde_json::from_str(&body).unwrap();
    let web = tenants
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "spiffe://cluster.local/ns/limits/sa/web")
        .unwrap();
    assert_eq!(web["weight"], 300);
    // --cpu-control none: nothing is written to the kernel.
    assert!(web["kernel_weight"].is_null(), "{web}");
    assert_eq!(web["limits"]["max_connections"], 2);
    assert_eq!(web["open_connections"], 2);
    assert_eq!(web["rejected"]["connections"], 1);
    let s = scrape(running.metrics_addr);
    assert_eq!(
        metric(
            &s,
            "nodeproxy_tenant_rejected_total",
            &[
                ("tenant", "spiffe://cluster.local/ns/limits/sa/web"),
                ("reason", "connections")
            ]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &s,
            "nodeproxy_tenant_rejected_total",
            &[("tenant", "spiffe://cluster.local/ns/limits/sa/db")]
        ),
        0.0
    );
    // Freeing a slot lets web in again.
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if roundtrip("127.0.0.2".parse().unwrap(), proxy, b"again").is_ok_and(|v| v == b"again") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "web never got a slot back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    running.shutdown();
}
