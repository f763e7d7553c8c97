//! Why a client of the control plane cannot use it.
//!
//! Owns [`ClientError`]: each variant names the offending value and the fix. How a failed
//! connection is turned into one of them is `target`'s work.
//!
//! Must not touch: I/O; this module only describes.

use std::path::PathBuf;

/// Why a client of the control plane cannot use it: each names the value and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not a usable URL.
    #[error("control plane address {url:?}: {reason}; use https://host:port")]
    Address {
        /// The address as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `https://` without a CA bundle to verify the server with.
    #[error(
        "control plane {url}: TLS needs the control plane's CA bundle to verify it; give \
         --control-plane-ca FILE (NODEPROXY_CONTROL_PLANE_CA), the CA certificate of \
         nodeproxy-controlplane (its --ca-cert file)"
    )]
    NoCaBundle {
        /// The address.
        url: String,
    },
    /// A CA bundle given for a plain-text address.
    #[error(
        "control plane {url}: the CA bundle {} is given but http:// is plain text and would not \
         use it; use https://", path.display()
    )]
    CaWithoutTls {
        /// The address.
        url: String,
        /// The bundle.
        path: PathBuf,
    },
    /// The CA bundle is missing, unreadable or holds no usable certificate.
    #[error("control plane CA bundle {}: {reason}", path.display())]
    CaBundle {
        /// The bundle file.
        path: PathBuf,
        /// What is wrong, and the fix.
        reason: String,
    },
    /// A bearer token would cross plain text.
    #[error(
        "control plane {url}: the bearer token is sent only over TLS, and http:// is plain text; \
         use https://host:15012 with --control-plane-ca (a control plane started with \
         --insecure-plaintext cannot take tokens)"
    )]
    TokenInClear {
        /// The address.
        url: String,
    },
    /// The token cannot be read or sent.
    #[error("bearer token ({from}): {reason}")]
    Token {
        /// Where it comes from.
        from: String,
        /// What is wrong, and the fix.
        reason: String,
    },
    /// The TLS handshake failed; the reason says why and what to do.
    #[error("TLS to the control plane at {url}: {reason}")]
    Tls {
        /// The address.
        url: String,
        /// What failed, and the fix.
        reason: String,
    },
    /// No connection (refused, unreachable, timed out, no such host).
    #[error("cannot connect to the control plane at {url}: {reason}")]
    Connect {
        /// The address.
        url: String,
        /// The cause.
        reason: String,
    },
}
