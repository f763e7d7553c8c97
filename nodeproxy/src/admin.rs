//! Admin and metrics HTTP endpoints, served on the admin runtime (never the data plane's).
//!
//! Owns the routes: on the admin port `/live`, `/ready`, `/config_dump` (the resolved config
//! and node view, JSON) and `/tenants` (JSON: tenants, their pods, open connections, pool
//! counters); on the metrics port `/metrics` (Prometheus text rendered by
//! `metrics-exporter-prometheus`). HTTP is hyper's.
//!
//! Must not touch: the data path's sockets, the kernel's rules; it only reads shared state.

use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use certs::Identity;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tenancy::Pools;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::state::{Readiness, Snapshot};

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The resolved configuration.
    pub config: Arc<Config>,
    /// The current node snapshot.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Readiness flags.
    pub readiness: Arc<Readiness>,
    /// The tenants' pools.
    pub pools: Arc<Pools<Identity>>,
    /// The tenants' own listeners, once the accept side is up (TPROXY, per-tenant isolation).
    pub tenant_listeners: Arc<std::sync::OnceLock<Arc<crate::tenant_listeners::TenantListeners>>>,
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `/live`, `/ready`, `/config_dump`, `/tenants`.
    Admin,
    /// `/metrics`.
    Metrics,
}

/// Serves HTTP/1 on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, role: Role, state: AdminState) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(role, &state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn route(role: Role, state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    match (role, req.uri().path()) {
        (Role::Admin, "/live") => text(StatusCode::OK, "live\n"),
        (Role::Admin, "/ready") => match state.readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {}\n", why.join(", ")),
            ),
        },
        (Role::Admin, "/config_dump") => json(&config_dump(state)),
        (Role::Admin, "/tenants") => json(&tenants(state)),
        (Role::Metrics, "/metrics") => {
            crate::metrics::record_tenants(&state.pools);
            let body = crate::metrics::handle().render();
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (Role::Admin, _) => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /config_dump or /tenants\n",
        ),
        (Role::Metrics, _) => text(StatusCode::NOT_FOUND, "not found; try /metrics\n"),
    }
}

#[derive(Serialize)]
struct ConfigDump<'a> {
    config: &'a Config,
    view_version: u64,
    view: &'a controlplane::view::NodeView,
}

fn config_dump(state: &AdminState) -> serde_json::Value {
    let snap = state.snapshot.load();
    serde_json::to_value(ConfigDump {
        config: &state.config,
        view_version: snap.version,
        view: &snap.view,
    })
    .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
}

/// One entry of `/tenants`.
#[derive(Debug, Serialize)]
pub struct TenantInfo {
    /// The tenant's SPIFFE ID.
    pub tenant: String,
    /// Its local pods (`namespace/name`) and their IPs.
    pub pods: Vec<PodInfo>,
    /// Connections open now (admitted and not yet closed).
    pub open_connections: u64,
    /// Connections admitted since its pool started.
    pub connections_total: u64,
    /// Jobs running in its pool now (connections and its own background work).
    pub active_jobs: i64,
    /// Panics caught in its pool.
    pub panics: u64,
    /// Times its dead worker was restarted.
    pub restarts: u64,
    /// Kernel thread ids of its pool's threads.
    pub thread_ids: Vec<i64>,
    /// `per-tenant` or `shared` threads.
    pub isolation: &'static str,
    /// How its CPU weight is enforced: `cgroup-v2`, `cgroup-v1`, `nice` or `none`.
    pub cpu_share: &'static str,
    /// The EEVDF slice of the tenant's thread as the kernel reports it, µs (a short slice lets
    /// a light tenant's thread run soon after it wakes; see `--sched-slice-us`).
    pub sched_slice_us: Option<u64>,
    /// Its CPU weight.
    pub weight: u32,
    /// What the kernel was given for it: `cpu.weight` (cgroup v2) or `cpu.shares` (cgroup v1;
    /// ×4 where tenant groups sit beside the pods, `--cgroup-parent`); absent with nice or none.
    pub kernel_weight: Option<u64>,
    /// Where its own listeners accept its pods' captured connections, on its own thread (empty:
    /// they go through the shared listener).
    pub listeners: Vec<std::net::SocketAddr>,
    /// CPU seconds its own threads used (absent when threads are shared).
    pub cpu_seconds: Option<f64>,
    /// Buffer bytes charged to it now.
    pub buffer_bytes: u64,
    /// Its limits (`null` is unlimited).
    pub limits: controlplane::view::TenantLimits,
    /// New work its limits refused, by reason.
    pub rejected: std::collections::BTreeMap<&'static str, u64>,
}

/// A pod in `/tenants`.
#[derive(Debug, Serialize)]
pub struct PodInfo {
    /// `namespace/name`.
    pub pod: String,
    /// Its IPs.
    pub ips: Vec<std::net::IpAddr>,
}

fn tenants(state: &AdminState) -> Vec<TenantInfo> {
    let snap = state.snapshot.load();
    let stats: std::collections::BTreeMap<Identity, tenancy::PoolStats> =
        state.pools.stats().into_iter().collect();
    let settings: std::collections::BTreeMap<&Identity, &controlplane::view::TenantSettings> =
        snap.view.tenants.iter().map(|t| (&t.identity, t)).collect();
    let isolation = match state.pools.isolation() {
        tenancy::Isolation::PerTenant => "per-tenant",
        tenancy::Isolation::Shared(_) => "shared",
    };
    let cpu_share = state.pools.cpu().mechanism().name();
    snap.view
        .tenants()
        .into_iter()
        .map(|(id, pods)| {
            let s = stats.get(id).cloned().unwrap_or_default();
            let sched_slice_us = s
                .tids
                .first()
                .and_then(|t| tenancy::cpu::thread_slice(*t))
                .and_then(|d| u64::try_from(d.as_micros()).ok());
            TenantInfo {
                tenant: id.to_string(),
                pods: pods
                    .iter()
                    .map(|w| PodInfo {
                        pod: format!("{}/{}", w.namespace, w.name),
                        ips: w.ips.clone(),
                    })
                    .collect(),
                open_connections: s.admitted,
                connections_total: s.admitted_total,
                active_jobs: s.active,
                panics: s.panics,
                restarts: s.restarts,
                thread_ids: s.tids,
                isolation,
                cpu_share,
                sched_slice_us,
                weight: s.weight,
                kernel_weight: state.pools.cpu().kernel_weight(s.weight),
                listeners: state
                    .tenant_listeners
                    .get()
                    .map(|l| l.addrs(id))
                    .unwrap_or_default(),
                cpu_seconds: s.cpu_seconds,
                buffer_bytes: s.buffer_bytes,
                limits: settings
                    .get(id)
                    .map(|t| t.limits.clone())
                    .unwrap_or_default(),
                rejected: s.rejected.iter().map(|(r, n)| (r.as_str(), *n)).collect(),
            }
        })
        .collect()
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot serialize: {e}\n"),
        ),
    }
}
