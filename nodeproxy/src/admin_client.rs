//! A small HTTP/1 client for the daemon's own admin and metrics endpoints, used by `demo`,
//! `lab` and the tests (hyper does the HTTP).
//!
//! Must not touch: the data path. It blocks the calling thread (it runs its own tiny runtime),
//! so call it from a thread that may block, e.g. one inside a network namespace.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// `GET http://<addr><path>`; returns the status code and the body as text.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), get_async(addr, path))
            .await
            .with_context(|| format!("GET http://{addr}{path} timed out"))?
    })
}

async fn get_async(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls `GET path` until it answers 200 or `timeout` passes.
pub fn wait_ok(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let last = match get(addr, path) {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("{code}: {}", body.trim()),
            Err(e) => format!("{e:#}"),
        };
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("GET http://{addr}{path} not OK after {timeout:?}; last answer: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Parses Prometheus text (our own `/metrics`).
pub fn parse_metrics(text: &str) -> std::io::Result<prometheus_parse::Scrape> {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
}

/// The sum of every sample of `name` whose labels include `labels` (counters, gauges and
/// untyped samples; 0 when there is none).
pub fn metric_sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        // Start from +0.0: an empty f64 sum is -0.0, which prints as "-0".
        .fold(0.0, |a, b| a + b)
}
