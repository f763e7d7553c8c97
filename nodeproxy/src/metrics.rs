//! Metric names, labels and the process-wide Prometheus recorder.
//!
//! Owns every `nodeproxy_*` metric name and the closed label sets, so that names are written
//! once. Labels are bounded: tenant (a local identity), direction, refusal reason, error kind —
//! never an address or an error string.
//!
//! Must not touch: sockets (the admin server serves [`handle`]'s text), the world view.

use std::sync::OnceLock;

use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Connections opened through the proxy.
pub const TCP_OPEN_TOTAL: &str = "nodeproxy_tcp_open_total";
/// Connections closed (label `error`: `none`, or what ended the connection).
pub const TCP_CLOSE_TOTAL: &str = "nodeproxy_tcp_close_total";
/// Bytes read from the downstream peer (the side that opened the connection).
pub const TCP_READ_BYTES_TOTAL: &str = "nodeproxy_tcp_read_bytes_total";
/// Bytes written to the downstream peer.
pub const TCP_WRITE_BYTES_TOTAL: &str = "nodeproxy_tcp_write_bytes_total";
/// Connections open now.
pub const TCP_OPEN_CONNECTIONS: &str = "nodeproxy_tcp_open_connections";
/// Connections refused before any tenant was chosen (label `reason`).
pub const TCP_REFUSED_TOTAL: &str = "nodeproxy_tcp_refused_total";
/// Captured connections accepted (label `listener`: `tenant` for a tenant's own listener,
/// `shared` for the shared one on 15001, which in per-tenant mode means a fallback).
pub const OUTBOUND_ACCEPTED_TOTAL: &str = "nodeproxy_outbound_accepted_total";
/// Number of local tenants (pools).
pub const TENANTS: &str = "nodeproxy_tenants";
/// Panics caught inside a tenant's pool.
pub const TENANT_PANICS_TOTAL: &str = "nodeproxy_tenant_panics_total";
/// New work a tenant's own limits refused (labels `tenant`, `reason`).
pub const TENANT_REJECTED_TOTAL: &str = "nodeproxy_tenant_rejected_total";
/// CPU seconds used by a tenant's pool threads, from the kernel (a gauge: the exporter's
/// counters are integers).
pub const TENANT_CPU_SECONDS_TOTAL: &str = "nodeproxy_tenant_cpu_seconds_total";
/// Connections a tenant holds admitted now.
pub const TENANT_OPEN_CONNECTIONS: &str = "nodeproxy_tenant_open_connections";
/// Buffer bytes charged to a tenant now.
pub const TENANT_BUFFER_BYTES: &str = "nodeproxy_tenant_buffer_bytes";
/// A tenant's CPU weight.
pub const TENANT_WEIGHT: &str = "nodeproxy_tenant_weight";
/// Times a tenant's dead pool worker was restarted.
pub const TENANT_POOL_RESTARTS_TOTAL: &str = "nodeproxy_tenant_pool_restarts_total";
/// Whether the capture rules are in place (1) or not (0).
pub const REDIRECT_RULES_APPLIED: &str = "nodeproxy_redirect_rules_applied";
/// Mesh tunnel TLS handshakes (labels `tenant`, `direction`, `result`: `ok`, `error`,
/// `timeout`, `no_certificate`).
pub const TLS_HANDSHAKES_TOTAL: &str = "nodeproxy_tls_handshakes_total";
/// When the tenant's current certificate expires (Unix seconds).
pub const CERT_EXPIRY_TIMESTAMP_SECONDS: &str = "nodeproxy_cert_expiry_timestamp_seconds";
/// The `peer` label value when the other side has no mesh identity.
pub const PEER_UNKNOWN: &str = "unknown";

/// Traffic direction label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a local pod to anywhere.
    Outbound,
    /// From a peer node's tunnel to a local pod.
    Inbound,
}

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Which listener accepted a captured connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The shared outbound listener (15001), on the accept thread.
    Shared,
    /// A tenant's own listener, on the tenant's pool thread.
    Tenant,
}

impl Listener {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Shared => "shared",
            Listener::Tenant => "tenant",
        }
    }
}

/// The process-wide Prometheus handle; installs the recorder on first use. Installing can only
/// happen once per process, so in-process tests that start several daemons share it.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; then our handle renders nothing,
        // which the metrics tests would show at once.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::error!("a metrics recorder was already installed; /metrics will be empty");
        }
        handle
    })
}

/// Per-connection metric handles, resolved once when the connection is admitted. Dropping it
/// counts the close, so a connection that ends by a panic is counted too (as `internal`).
#[derive(Debug)]
pub struct ConnMetrics {
    tenant: String,
    peer: String,
    direction: Direction,
    outcome: &'static str,
    /// Bytes read from downstream.
    pub read_bytes: Counter,
    /// Bytes written to downstream.
    pub write_bytes: Counter,
    open: Gauge,
}

impl ConnMetrics {
    /// Counts a newly opened connection of `tenant` whose other side has no mesh identity.
    pub fn open(tenant: &str, direction: Direction) -> Self {
        Self::open_with_peer(tenant, direction, PEER_UNKNOWN)
    }

    /// Counts a newly opened connection of `tenant` with the meshed identity `peer` (the
    /// destination for outbound, the client for inbound).
    pub fn open_with_peer(tenant: &str, direction: Direction, peer: &str) -> Self {
        let labels = [
            ("tenant", tenant.to_owned()),
            ("direction", direction.as_str().to_owned()),
            ("peer", peer.to_owned()),
        ];
        metrics::counter!(TCP_OPEN_TOTAL, &labels).increment(1);
        let open = metrics::gauge!(TCP_OPEN_CONNECTIONS, &labels);
        open.increment(1.0);
        Self {
            tenant: tenant.to_owned(),
            peer: peer.to_owned(),
            direction,
            outcome: "internal",
            read_bytes: metrics::counter!(TCP_READ_BYTES_TOTAL, &labels),
            write_bytes: metrics::counter!(TCP_WRITE_BYTES_TOTAL, &labels),
            open,
        }
    }

    /// Sets how the connection ended, counted at drop: a closed-set kind, `none` when clean.
    pub fn set_outcome(&mut self, error: &'static str) {
        self.outcome = error;
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        metrics::counter!(
            TCP_CLOSE_TOTAL,
            "tenant" => std::mem::take(&mut self.tenant),
            "direction" => self.direction.as_str(),
            "peer" => std::mem::take(&mut self.peer),
            "error" => self.outcome,
        )
        .increment(1);
        self.open.decrement(1.0);
    }
}

/// Counts new work of `tenant` refused by its own limits.
pub fn tenant_rejected(tenant: &certs::Identity, reason: &'static str) {
    metrics::counter!(TENANT_REJECTED_TOTAL, "tenant" => tenant.to_string(), "reason" => reason)
        .increment(1);
}

/// Copies every pool's accounting into the tenant metrics (called before each scrape).
pub fn record_tenants(pools: &tenancy::Pools<certs::Identity>) {
    for (tenant, s) in pools.stats() {
        let t = tenant.to_string();
        if let Some(cpu) = s.cpu_seconds {
            metrics::gauge!(TENANT_CPU_SECONDS_TOTAL, "tenant" => t.clone()).set(cpu);
        }
        metrics::gauge!(TENANT_OPEN_CONNECTIONS, "tenant" => t.clone()).set(s.admitted as f64);
        metrics::gauge!(TENANT_BUFFER_BYTES, "tenant" => t.clone()).set(s.buffer_bytes as f64);
        metrics::gauge!(TENANT_WEIGHT, "tenant" => t.clone()).set(f64::from(s.weight));
        metrics::counter!(TENANT_PANICS_TOTAL, "tenant" => t).absolute(s.panics);
    }
}

/// Counts a connection refused before a tenant was known.
pub fn refused(reason: &'static str) {
    metrics::counter!(TCP_REFUSED_TOTAL, "reason" => reason).increment(1);
}
