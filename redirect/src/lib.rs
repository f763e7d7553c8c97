//! `redirect` owns the node's nftables rule set that captures TCP from meshed pods entering the
//! node (hook prerouting) and redirects it to the proxy's outbound port (default 15001).
//!
//! It is split into *decide, then act*: [`RuleSet`] is a plain value, [`render`] and
//! [`render_update`] turn it into native `nft` scripts without I/O, [`verify_listing`] compares a
//! `nft -j list table` listing with a [`RuleSet`] without I/O, and [`Nft`] is the only type that
//! runs the `nft` binary. Pods come and go by updating set elements, never by reloading the table.
//!
//! This crate must not touch sockets, tenancy, Kubernetes or the environment: other crates pass it
//! typed values, and it reads nothing from `NODEPROXY_*`.

mod nft;
mod render;
mod spec;
mod verify;

pub use nft::Nft;
pub use render::{render, render_remove, render_update};
pub use spec::{
    CHAIN_NAME, CHAIN_PRIORITY, CHAIN_PRIORITY_TEXT, DEFAULT_REDIRECT_PORT, DEFAULT_TABLE_NAME,
    RuleSet, SET_V4, SET_V6, TableName,
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

    /// A binary we need (`nft`, or `ip` for network namespaces) is not installed.
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

    /// `nft -j` printed something that is not the JSON we expect.
    #[error("could not parse `nft -j list` output for table inet {table}: {detail}")]
    ParseListing {
        /// The table concerned.
        table: String,
        /// What was wrong with the JSON.
        detail: String,
    },

    /// The table in the kernel differs from the expected rule set.
    #[error("table inet {table} differs from the expected rule set: {}; re-apply it with `Nft::apply`", differences.join("; "))]
    Mismatch {
        /// The table concerned.
        table: String,
        /// One sentence per difference found.
        differences: Vec<String>,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
