//! Workload identities, their private keys and certificates, and the CA that signs them.
//!
//! This crate owns [`Identity`], the SPIFFE ID a tenant is known by
//! (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`); [`store::CertStore`], the
//! per-identity store that generates its key inside, sends a CSR to a [`store::Signer`],
//! rotates, and hands out only rustls configs; [`verify`], the SPIFFE peer checks; [`sni`], the
//! server name that names an identity on the tunnel; [`ca::Ca`], the signing logic; and
//! [`serving::ServingCert`], the serving certificate of the control plane's own listener.
//! `certs` is the only crate that holds private keys, and no API returns their bytes.
//! [`test_util`] (feature `test-util`) has a fake CA for tests.
//!
//! Must not touch: sockets, the tenancy crate, Kubernetes clients, the environment. One crypto
//! provider only: aws-lc-rs (`ring` next to it makes rustls panic at config time).

pub mod ca;
mod key;
pub mod serving;
pub mod sni;
pub mod store;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod verify;

pub use ca::Ca;
pub use serving::{ServingCert, ServingNames};
pub use store::{CertStore, Current, RotationOptions, Signed, Signer};

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Errors of this crate. None carries key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A cryptographic operation failed.
    #[error("crypto: {0}")]
    Crypto(String),
    /// The CA could not be built or could not sign.
    #[error("CA: {0}")]
    Ca(String),
    /// The CA refused a CSR.
    #[error("refusing to sign for {identity}: {reason}")]
    CsrRefused {
        /// The identity asked for.
        identity: String,
        /// Why.
        reason: String,
    },
    /// The signer's answer is unusable.
    #[error("unusable certificate from the signer: {0}")]
    BadSigned(String),
    /// A peer's certificate is unusable.
    #[error("bad peer certificate: {0}")]
    BadPeerCert(String),
    /// A peer presented another identity than the expected one.
    #[error("peer identity is {presented}, expected {expected}")]
    WrongPeer {
        /// The identity we wanted.
        expected: String,
        /// The identity the certificate names.
        presented: String,
    },
    /// A server name does not encode an identity.
    #[error("server name {name:?} does not name an identity: {reason}")]
    InvalidSni {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An identity is too long for a server name.
    #[error(
        "identity {identity} is too long for a TLS server name ({len} > 253 characters); shorten the namespace or service account"
    )]
    SniTooLong {
        /// The identity.
        identity: String,
        /// The encoded length.
        len: usize,
    },
    /// The store's worker is gone.
    #[error("the certificate store of {0} has stopped")]
    StoreStopped(String),
    /// A file could not be read or written.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// `read` or `write`.
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A string is not a SPIFFE ID of the workload shape.
    #[error(
        "invalid SPIFFE ID {value:?}: {reason} (expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
    )]
    InvalidSpiffeId {
        /// The offending input.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A name for a serving certificate is neither an IP address nor a DNS name.
    #[error(
        "invalid serving name {value:?}: {reason}; give DNS names (such as nodeproxy-controlplane.nodeproxy-system.svc) or IP addresses"
    )]
    InvalidServingName {
        /// The offending name.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// One component of an identity is not a valid DNS-1123 name.
    #[error("invalid {what} {value:?} for an identity: {reason}")]
    InvalidName {
        /// Which component (trust domain, namespace, service account).
        what: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A workload identity: a Kubernetes service account in a trust domain.
///
/// All local pods with the same identity share one tenant.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl Identity {
    /// Builds an identity from its parts, validating each.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self> {
        check_trust_domain(trust_domain)?;
        check_name("namespace", namespace)?;
        check_name("service account", service_account)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// The trust domain (e.g. `cluster.local`).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// A short, bounded label for metrics and logs: `<namespace>/<service-account>`.
    pub fn short(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

impl FromStr for Identity {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason| Error::InvalidSpiffeId {
            value: s.to_owned(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| invalid("missing spiffe:// scheme"))?;
        let mut parts = rest.split('/');
        let td = parts.next().unwrap_or_default();
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Self::new(td, ns, sa),
            _ => Err(invalid("path is not /ns/<namespace>/sa/<service-account>")),
        }
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a Kubernetes DNS-1123 label (namespaces and service accounts are at most subdomains,
/// but a `/` or an empty part would break the SPIFFE path, which is what matters here).
/// Kept rather than rustls-pki-types' `DnsName`, which accepts uppercase and `_`.
fn check_name(what: &'static str, value: &str) -> Result<()> {
    let bad = |reason| Error::InvalidName {
        what,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(bad("it is empty"));
    }
    if value.len() > 253 {
        return Err(bad("it is longer than 253 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(bad(
            "only lowercase letters, digits, '-' and '.' are allowed",
        ));
    }
    if value.starts_with(['-', '.']) || value.ends_with(['-', '.']) {
        return Err(bad("it must start and end with a letter or digit"));
    }
    Ok(())
}

pub(crate) fn check_trust_domain(value: &str) -> Result<()> {
    check_name("trust domain", value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_string_form() {
        let id = Identity::new("cluster.local", "shop", "web").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.to_string().parse::<Identity>().unwrap(), id);
        assert_eq!(id.short(), "shop/web");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/shop/sa/web\"");
        assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), id);
    }

    #[test]
    fn rejects_malformed_ids_naming_the_value() {
        for bad in [
            "cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/sa/a/ns/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a/sa/-b",
        ] {
            let err = bad.parse::<Identity>().unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(bad) || msg.contains("invalid"), "{bad}: {msg}");
        }
        let err = "spiffe://cluster.local/ns/A/sa/b"
            .parse::<Identity>()
            .unwrap_err();
        assert!(err.to_string().contains("\"A\""), "{err}");
    }
}
