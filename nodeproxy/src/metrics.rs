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
/// Number of local tenants (pools).
pub const TENANTS: &str = "nodeproxy_tenants";
/// Panics caught inside a tenant's pool.
pub const TENANT_PANICS_TOTAL: &str = "nodeproxy_tenant_panics_total";
/// Whether the capture rules are in place (1) or not (0).
pub const REDIRECT_RULES_APPLIED: &str = "nodeproxy_redirect_rules_applied";

/// Traffic direction label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a local pod to anywhere.
    Outbound,
}

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
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
    direction: Direction,
    outcome: &'static str,
    /// Bytes read from downstream.
    pub read_bytes: Counter,
    /// Bytes written to downstream.
    pub write_bytes: Counter,
    open: Gauge,
}

impl ConnMetrics {
    /// Counts a newly opened connection of `tenant`.
    pub fn open(tenant: &str, direction: Direction) -> Self {
        let labels = [
            ("tenant", tenant.to_owned()),
            ("direction", direction.as_str().to_owned()),
        ];
        metrics::counter!(TCP_OPEN_TOTAL, &labels).increment(1);
        let open = metrics::gauge!(TCP_OPEN_CONNECTIONS, &labels);
        open.increment(1.0);
        Self {
            tenant: tenant.to_owned(),
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
            "error" => self.outcome,
        )
        .increment(1);
        self.open.decrement(1.0);
    }
}

/// Counts a connection refused before a tenant was known.
pub fn refused(reason: &'static str) {
    metrics::counter!(TCP_REFUSED_TOTAL, "reason" => reason).increment(1);
}
