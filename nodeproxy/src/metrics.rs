//! Metric names, labels and the process-wide Prometheus recorder.
//!
//! Owns every `nodeproxy_*` metric name and the functions that write the data path's metrics,
//! so that names and label sets are written once. Labels are bounded: tenant (a local
//! identity), peer (a mesh identity), direction, listener, and for how something ended an
//! [`Outcome`] (`error`/`reason`) with its [`Blame`](crate::outcome::Blame) (`blame`) — never
//! an address or an error string.
//!
//! Must not touch: sockets (the admin server serves [`handle`]'s text), the world view.

use std::sync::OnceLock;

use certs::Identity;
use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::outcome::{ConnectionResult, Direction, Outcome};

/// Connections opened through the proxy.
pub const TCP_OPEN_TOTAL: &str = "nodeproxy_tcp_open_total";
/// Connections closed (labels `error`: the [`Outcome`], `none` when clean; `blame`).
pub const TCP_CLOSE_TOTAL: &str = "nodeproxy_tcp_close_total";
/// Bytes read from the downstream peer (the side that opened the connection).
pub const TCP_READ_BYTES_TOTAL: &str = "nodeproxy_tcp_read_bytes_total";
/// Bytes written to the downstream peer.
pub const TCP_WRITE_BYTES_TOTAL: &str = "nodeproxy_tcp_write_bytes_total";
/// Connections open now.
pub const TCP_OPEN_CONNECTIONS: &str = "nodeproxy_tcp_open_connections";
/// Connections and tunnel streams refused before a tenant's pool admitted them (labels
/// `reason`: the [`Outcome`]; `blame`).
pub const TCP_REFUSED_TOTAL: &str = "nodeproxy_tcp_refused_total";
/// Captured connections accepted (label `listener`: `tenant` for a tenant's own listener,
/// `shared` for the shared one on 15001, which in per-tenant mode means a fallback).
pub const OUTBOUND_ACCEPTED_TOTAL: &str = "nodeproxy_outbound_accepted_total";
/// Number of local tenants (pools).
pub const TENANTS: &str = "nodeproxy_tenants";
/// Panics caught inside a tenant's pool.
pub const TENANT_PANICS_TOTAL: &str = "nodeproxy_tenant_panics_total";
/// New work a tenant's own limits refused (labels `tenant`, `reason`: the [`Outcome`] of the
/// limit, `blame`: always `tenant`).
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
/// Mesh tunnel handshakes (labels `tenant`, `direction`, `result`: `ok`, `error`, `timeout`,
/// `no_certificate`; `error`: the [`Outcome`], `none` when ok; `blame`).
pub const TLS_HANDSHAKES_TOTAL: &str = "nodeproxy_tls_handshakes_total";
/// When the tenant's current certificate expires (Unix seconds).
pub const CERT_EXPIRY_TIMESTAMP_SECONDS: &str = "nodeproxy_cert_expiry_timestamp_seconds";
/// The `peer` label value when the other side has no mesh identity.
pub const PEER_UNKNOWN: &str = "unknown";

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

/// Per-connection metric handles, resolved once when the connection is admitted, and the
/// connection's [`ConnectionResult`]. Dropping it counts the close from that result, so a
/// connection that ends by a panic is counted too (as `internal`).
#[derive(Debug)]
pub struct ConnMetrics {
    result: ConnectionResult,
    /// Bytes read from downstream.
    pub read_bytes: Counter,
    /// Bytes written to downstream.
    pub write_bytes: Counter,
    open: Gauge,
}

impl ConnMetrics {
    /// Counts a newly opened connection of `tenant`; `peer` is the other side's mesh identity
    /// (the destination outbound, the client inbound), if it has one.
    pub fn open(tenant: &Identity, direction: Direction, peer: Option<&Identity>) -> Self {
        let result = ConnectionResult::new(tenant.clone(), direction, peer.cloned());
        let labels = conn_labels(&result);
        metrics::counter!(TCP_OPEN_TOTAL, &labels).increment(1);
        let open = metrics::gauge!(TCP_OPEN_CONNECTIONS, &labels);
        open.increment(1.0);
        Self {
            result,
            read_bytes: metrics::counter!(TCP_READ_BYTES_TOTAL, &labels),
            write_bytes: metrics::counter!(TCP_WRITE_BYTES_TOTAL, &labels),
            open,
        }
    }

    /// Records how the connection ended, counted at drop.
    pub fn record(&mut self, outcome: Outcome) {
        self.result.outcome = outcome;
    }

    /// The connection's result so far.
    pub fn result(&self) -> &ConnectionResult {
        &self.result
    }
}

/// The labels every `tcp_` metric of a connection carries.
fn conn_labels(r: &ConnectionResult) -> [(&'static str, String); 3] {
    [
        ("tenant", r.tenant.to_string()),
        ("direction", r.direction.as_str().to_owned()),
        (
            "peer",
            r.peer
                .as_ref()
                .map_or_else(|| PEER_UNKNOWN.to_owned(), ToString::to_string),
        ),
    ]
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        record_close(&self.result);
        self.open.decrement(1.0);
    }
}

/// Counts the close of a connection from its result.
fn record_close(r: &ConnectionResult) {
    let [tenant, direction, peer] = conn_labels(r);
    let labels = [
        tenant,
        direction,
        peer,
        ("error", r.outcome.as_str().to_owned()),
        ("blame", r.outcome.blame().as_str().to_owned()),
    ];
    metrics::counter!(TCP_CLOSE_TOTAL, &labels).increment(1);
}

/// Counts new work of `tenant` refused by its own limits.
pub fn tenant_rejected(tenant: &Identity, rejection: tenancy::Rejection) {
    let outcome = Outcome::from(rejection);
    metrics::counter!(
        TENANT_REJECTED_TOTAL,
        "tenant" => tenant.to_string(),
        "reason" => outcome.as_str(),
        "blame" => outcome.blame().as_str(),
    )
    .increment(1);
}

/// Counts a mesh tunnel handshake of `tenant` (TLS and HTTP/2) that ended with `outcome`.
pub fn handshake(tenant: &Identity, direction: Direction, outcome: Outcome) {
    metrics::counter!(
        TLS_HANDSHAKES_TOTAL,
        "tenant" => tenant.to_string(),
        "direction" => direction.as_str(),
        "result" => handshake_result(outcome),
        "error" => outcome.as_str(),
        "blame" => outcome.blame().as_str(),
    )
    .increment(1);
}

/// The handshake metric's coarse `result` label, kept from before outcomes had names.
fn handshake_result(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Clean => "ok",
        Outcome::UpstreamTlsTimeout | Outcome::DownstreamTlsTimeout => "timeout",
        Outcome::NoCertificate => "no_certificate",
        _ => "error",
    }
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

/// Counts a connection or tunnel stream refused before a tenant's pool admitted it.
pub fn refused(outcome: Outcome) {
    metrics::counter!(
        TCP_REFUSED_TOTAL,
        "reason" => outcome.as_str(),
        "blame" => outcome.blame().as_str(),
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_result_keeps_its_four_values() {
        let results: std::collections::BTreeSet<_> =
            Outcome::ALL.iter().map(|o| handshake_result(*o)).collect();
        assert_eq!(
            results.into_iter().collect::<Vec<_>>(),
            ["error", "no_certificate", "ok", "timeout"]
        );
        assert_eq!(handshake_result(Outcome::Clean), "ok");
        assert_eq!(handshake_result(Outcome::DownstreamTlsTimeout), "timeout");
        assert_eq!(handshake_result(Outcome::DownstreamTlsCertificate), "error");
    }
}
