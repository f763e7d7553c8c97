//! `redirect` owns the node's capture rules: the nftables table that captures TCP from meshed
//! pods entering the node (hook prerouting) and delivers it to the proxy's shared outbound port
//! (default 15001), and, with TPROXY (the default), the policy routing (`ip rule` + `ip route`)
//! that delivers the marked packets locally. With TPROXY a pod may also have its own capture port
//! (its tenant's transparent listener, maps `pod_port_v4`/`pod_port_v6`); when that port has no
//! listener, the shared port takes the connection. REDIRECT (a nat chain) remains as
//! [`Capture::Redirect`], without per-pod ports.
//!
//! It is split into *decide, then act*: [`RuleSet`] is a plain value; [`render`],
//! [`render_update`] and [`render_port_update`] turn it (or a change) into native `nft` scripts
//! without I/O; [`routing_commands`], [`plan_routing`] and [`plan_routing_removal`] turn it (and a
//! listing of what the kernel has) into `ip` commands without I/O; [`verify_listing`] and
//! [`routing_differences`] compare listings with a [`RuleSet`] without I/O; and [`Nft`] is the
//! only type that runs binaries (`nft` and `ip`, through one runner). Pods and their ports come
//! and go by updating set and map elements, never by reloading the table.
//!
//! This crate must not touch sockets, tenancy, Kubernetes or the environment: other crates pass it
//! typed values, and it reads nothing from `NODEPROXY_*`.

mod exec;
mod nft;
mod render;
mod routing;
mod spec;
mod verify;

pub use nft::Nft;
pub use render::{render, render_port_update, render_remove, render_update};
pub use routing::{
    Family, FamilyListing, IpCommand, RoutingListing, plan_routing, plan_routing_removal,
    routing_commands, routing_differences,
};
pub use spec::{
    CHAIN_NAME, Capture, DEFAULT_REDIRECT_PORT, DEFAULT_ROUTE_TABLE, DEFAULT_TABLE_NAME,
    DEFAULT_TPROXY_MARK, KEEP_DESTINATION_CHAIN, PORT_MAP_V4, PORT_MAP_V6, PolicyRouting,
    REDIRECT_CHAIN_PRIORITY, RULE_PRIORITY, RouteTable, RuleSet, SET_V4, SET_V6,
    TPROXY_CHAIN_PRIORITY, TableName,
};
pub use verify::verify_listing;

use std::path::PathBuf;
use std::process::ExitStatus;

/// Everything that can go wrong while building, applying or verifying a rule set.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A table name that nft would not accept as an identifier (or that could inject syntax).
    #[error(
        "invalid nftables table name {name:?}: {reason}; use 1-63 ASCII letters, digits or '_', starting with a letter"
    )]
    InvalidTableName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A routing table id that the kernel reserves (or 0).
    #[error(
        "invalid routing table {id} for the TPROXY policy routing: {reason}; pick an unused table id such as 15001"
    )]
    InvalidRouteTable {
        /// The rejected id.
        id: u32,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A binary we need (`nft`, or `ip` for policy routing and network namespaces) is not
    /// installed.
    #[error("{program} binary not found at {path}: install {package} (apt-get install {package})")]
    NotFound {
        /// The program's short name (`nft`, `ip`).
        program: &'static str,
        /// Where we looked (a path, or "PATH" when it was searched).
        path: String,
        /// The Debian package that provides it.
        package: &'static str,
    },

    /// The binary exists but could not be started or talked to.
    #[error("could not run {}: {source}; check that it is executable and that we run as root", path.display())]
    Spawn {
        /// The program we tried to run.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// nft ran and refused the command; `stderr` is nft's own explanation.
    #[error("nft {action} for table inet {table} failed ({status}): {stderr}")]
    Rejected {
        /// What we asked nft to do (e.g. "apply", "check", "update").
        action: &'static str,
        /// The table concerned.
        table: String,
        /// nft's exit status.
        status: ExitStatus,
        /// nft's standard error, trimmed.
        stderr: String,
    },

    /// `ip` ran and refused a policy routing command; `stderr` is its own explanation.
    #[error("`{command}` failed ({status}): {stderr}")]
    IpRejected {
        /// The command line (without a namespace prefix).
        command: String,
        /// ip's exit status.
        status: ExitStatus,
        /// ip's standard error, trimmed.
        stderr: String,
    },

    /// `ip -j` printed something that is not the JSON we expect.
    #[error("could not parse the output of `{command}`: {detail}")]
    ParseRouting {
        /// The command line.
        command: String,
        /// What was wrong with the JSON.
        detail: String,
    },

    /// `nft -j` printed something that is not the JSON we expect.
    #[error("could not parse `nft -j list` output for table inet {table}: {detail}")]
    ParseListing {
        /// The table concerned.
        table: String,
        /// What was wrong with the JSON.
        detail: String,
    },

    /// The table (or, with TPROXY, its policy routing) in the kernel differs from the expected
    /// rule set.
    #[error("the capture rules of table inet {table} differ from the expected rule set: {}; re-apply them with `Nft::apply`", differences.join("; "))]
    Mismatch {
        /// The table concerned.
        table: String,
        /// One sentence per difference found.
        differences: Vec<String>,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
