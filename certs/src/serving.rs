//! The serving certificate of a server the CA runs itself: the control plane's gRPC listener.
//!
//! Owns [`ServingNames`] (the DNS names and IP addresses it is valid for) and [`ServingCert`],
//! a rustls certificate resolver around a key generated here and a short-lived certificate
//! from the [`Ca`], reissued by the first handshake past half its lifetime. The key reaches
//! rustls as a signing key and goes nowhere else: no accessor, redacted `Debug`, never logged,
//! never written.
//!
//! Must not touch: sockets (the caller runs the listener), files, node views.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::DnsName;
use time::OffsetDateTime;

use crate::ca::{Ca, MAX_BACKDATE, random_serial, rcgen_err};
use crate::key::EcKey;
use crate::{Error, Result};

/// Lifetime of serving certificates unless configured otherwise.
pub const DEFAULT_SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// After a failed reissue, how long a [`ServingCert`] keeps the current certificate before
/// the next handshake tries again (at most; a tenth of the lifetime when that is shorter).
const SERVING_RETRY: Duration = Duration::from_secs(30);

/// Issues, with `ca`, a serving certificate for `names` and a key generated for it, valid
/// from now (backdated like workload certificates) for `lifetime`.
fn issue(ca: &Ca, names: &ServingNames, lifetime: Duration) -> Result<Issued> {
    let key = EcKey::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names.first());
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .0
        .iter()
        .map(|name| match name {
            ServingName::Dns(dns) => rcgen::string::Ia5String::try_from(dns.as_str())
                .map(SanType::DnsName)
                .map_err(|e| Error::Ca(format!("the serving name {dns} is not IA5 ({e})"))),
            ServingName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
        })
        .collect::<Result<_>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - MAX_BACKDATE.min(lifetime / 4);
    params.not_after = now + lifetime;
    params.serial_number = Some(random_serial()?);
    let cert = params
        .signed_by(&key, ca.issuer())
        .map_err(rcgen_err("sign the serving certificate"))?;
    let issued_at = SystemTime::now();
    Ok(Issued {
        key: Arc::new(CertifiedKey::new(
            vec![cert.der().clone()],
            key.rustls_key(),
        )),
        renew_at: issued_at + lifetime / 2,
        not_after: issued_at + lifetime,
    })
}

/// One name a serving certificate is valid for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServingName {
    /// A DNS name (a `dNSName` SAN).
    Dns(String),
    /// An IP address (an `iPAddress` SAN), for clients that dial an address.
    Ip(IpAddr),
}

impl fmt::Display for ServingName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServingName::Dns(name) => f.write_str(name),
            ServingName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The names of a serving certificate: at least one, each a DNS name or an IP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingNames(Vec<ServingName>);

impl ServingNames {
    /// Parses `names`: an IP address literal, or a lowercase DNS name. Duplicates are dropped.
    pub fn parse<I, S>(names: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut parsed = Vec::new();
        for name in names {
            let name = name.as_ref().trim();
            let bad = |reason| Error::InvalidServingName {
                value: name.to_owned(),
                reason,
            };
            let name = if let Ok(ip) = name.parse::<IpAddr>() {
                ServingName::Ip(ip)
            } else if name.is_empty() {
                return Err(bad("it is empty"));
            } else if !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            {
                return Err(bad(
                    "only lowercase letters, digits, '-' and '.' are allowed",
                ));
            } else if DnsName::try_from(name).is_err() {
                return Err(bad(
                    "it is not a DNS name (an empty label, a label over 63 characters, or a '-' at an edge)",
                ));
            } else {
                ServingName::Dns(name.to_owned())
            };
            if !parsed.contains(&name) {
                parsed.push(name);
            }
        }
        if parsed.is_empty() {
            return Err(Error::InvalidServingName {
                value: String::new(),
                reason: "no names are given",
            });
        }
        Ok(Self(parsed))
    }

    /// The names, in the order given.
    pub fn names(&self) -> &[ServingName] {
        &self.0
    }

    /// The first name (the certificate's common name).
    fn first(&self) -> String {
        self.0.first().map(ToString::to_string).unwrap_or_default()
    }
}

impl fmt::Display for ServingNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{name}")?;
        }
        Ok(())
    }
}

/// One issued serving certificate with its key, and when to replace it.
#[derive(Clone)]
struct Issued {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
    not_after: SystemTime,
}

/// The serving certificate of a server the CA runs itself (the control plane's gRPC
/// listener): issued by the CA for [`ServingNames`], with a key generated here.
///
/// It is a rustls certificate resolver ([`ServingCert::server_config`]): the key reaches rustls
/// as a signing key and goes nowhere else (no accessor, redacted `Debug`, never logged, never
/// written). The first handshake after half the lifetime reissues it (a fresh key, a fresh
/// certificate); if that fails, the current one is kept, a warning logged, and a later
/// handshake tries again. Connections already open keep the session they negotiated.
pub struct ServingCert {
    ca: Arc<Ca>,
    names: ServingNames,
    lifetime: Duration,
    renew: bool,
    current: RwLock<Issued>,
    issued: AtomicU64,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("names", &self.names.to_string())
            .field("lifetime", &self.lifetime)
            .field("not_after", &self.not_after())
            .field("key", &"[redacted]")
            .finish()
    }
}

impl ServingCert {
    /// Issues the first certificate for `names` from `ca`, valid for `lifetime` (at least
    /// 2 seconds).
    pub fn new(ca: Arc<Ca>, names: ServingNames, lifetime: Duration) -> Result<Arc<Self>> {
        if lifetime < Duration::from_secs(2) {
            return Err(Error::Ca(format!(
                "a serving certificate must live at least 2 seconds, not {lifetime:?}"
            )));
        }
        let first = issue(&ca, &names, lifetime)?;
        tracing::info!(names = %names, valid_for = ?lifetime, "serving certificate issued");
        Ok(Arc::new(Self {
            ca,
            names,
            lifetime,
            renew: true,
            current: RwLock::new(first),
            issued: AtomicU64::new(1),
        }))
    }

    /// Like [`ServingCert::new`], but never reissued: it expires after `lifetime`. For tests of
    /// what clients say about an expired certificate.
    #[cfg(any(test, feature = "test-util"))]
    pub fn without_renewal(
        ca: Arc<Ca>,
        names: ServingNames,
        lifetime: Duration,
    ) -> Result<Arc<Self>> {
        let first = issue(&ca, &names, lifetime)?;
        Ok(Arc::new(Self {
            ca,
            names,
            lifetime,
            renew: false,
            current: RwLock::new(first),
            issued: AtomicU64::new(1),
        }))
    }

    /// The names it is valid for.
    pub fn names(&self) -> &ServingNames {
        &self.names
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .not_after
    }

    /// How many certificates it has issued, the first included.
    pub fn generation(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// A TLS 1.3 server config presenting this certificate (ALPN `h2`, no client
    /// certificates: callers authenticate in the protocol above, e.g. with bearer tokens).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(crate::store::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Crypto(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![crate::store::ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// The current certificate, reissued first when it is past half its lifetime.
    fn current(&self) -> Arc<CertifiedKey> {
        let now = SystemTime::now();
        {
            let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
            if !self.renew || now < current.renew_at {
                return current.key.clone();
            }
        }
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        // Another handshake may have reissued it meanwhile.
        if now >= current.renew_at {
            match issue(&self.ca, &self.names, self.lifetime) {
                Ok(next) => {
                    tracing::info!(
                        names = %self.names, valid_for = ?self.lifetime,
                        "serving certificate reissued"
                    );
                    *current = next;
                    self.issued.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let retry = SERVING_RETRY.min(self.lifetime / 10);
                    tracing::warn!(
                        names = %self.names, error = %e,
                        expires_in = ?current.not_after.duration_since(now).unwrap_or_default(),
                        retry_in = ?retry,
                        "cannot reissue the serving certificate; keeping the current one"
                    );
                    current.renew_at = now + retry;
                }
            }
        }
        current.key.clone()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn serving_names_are_ip_addresses_or_lowercase_dns_names() {
        let names = ServingNames::parse([
            "nodeproxy-controlplane.nodeproxy-system.svc",
            " 127.0.0.1",
            "::1",
            "127.0.0.1",
        ])
        .unwrap();
        assert_eq!(
            names.names(),
            [
                ServingName::Dns("nodeproxy-controlplane.nodeproxy-system.svc".into()),
                ServingName::Ip([127, 0, 0, 1].into()),
                ServingName::Ip(std::net::Ipv6Addr::LOCALHOST.into()),
            ]
        );
        assert_eq!(
            names.to_string(),
            "nodeproxy-controlplane.nodeproxy-system.svc,127.0.0.1,::1"
        );
        for (bad, why) in [
            ("Upper.svc", "lowercase"),
            ("a..b", "not a DNS name"),
            ("-a.svc", "not a DNS name"),
            ("", "empty"),
            ("a_b", "lowercase"),
        ] {
            let err = ServingNames::parse([bad]).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{bad:?}")) && err.contains(why),
                "{bad}: {err}"
            );
        }
        let err = ServingNames::parse(Vec::<String>::new()).unwrap_err();
        assert!(err.to_string().contains("no names"), "{err}");
    }

    /// One TLS handshake against `server`, trusting `roots`, dialling `name`. Returns the
    /// serial of the certificate the server presented, or the client's error.
    async fn dial(
        server: &Arc<ServingCert>,
        roots: &[&Ca],
        name: &str,
    ) -> std::result::Result<Vec<u8>, rustls::Error> {
        let mut store = rustls::RootCertStore::empty();
        for ca in roots {
            store.add(ca.root().clone()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(crate::store::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
        let (c, s) = tokio::io::duplex(64 * 1024);
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let (client, _server) = tokio::join!(connector.connect(name, c), acceptor.accept(s));
        let tls =
            client.map_err(|e| *e.into_inner().unwrap().downcast::<rustls::Error>().unwrap())?;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let (_, x509) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        Ok(x509.raw_serial().to_vec())
    }

    #[tokio::test]
    async fn a_serving_certificate_is_valid_for_its_names_and_only_from_its_ca() {
        let ca = Arc::new(Ca::generate("cluster.local").unwrap());
        let names = ServingNames::parse(["cp.nodeproxy-system.svc", "127.0.0.1"]).unwrap();
        let serving = ServingCert::new(ca.clone(), names, DEFAULT_SERVING_LIFETIME).unwrap();
        let dbg = format!("{serving:?}");
        assert!(
            dbg.contains("[redacted]") && !dbg.contains("PRIVATE"),
            "{dbg}"
        );
        let left = serving
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            left > DEFAULT_SERVING_LIFETIME - Duration::from_secs(60),
            "{left:?}"
        );

        let first = dial(&serving, &[&ca], "cp.nodeproxy-system.svc")
            .await
            .unwrap();
        assert_eq!(dial(&serving, &[&ca], "127.0.0.1").await.unwrap(), first);
        assert_eq!(serving.generation(), 1, "reissued before half its lifetime");
        let err = dial(&serving, &[&ca], "other.svc").await.unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{err:?}"
        );
        // Another CA of the same trust domain has the same subject name: webpki finds it as
        // the issuer, and the signature does not verify.
        let other = Ca::generate("cluster.local").unwrap();
        let err = dial(&serving, &[&other], "127.0.0.1").await.unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
        );
        let other = Ca::generate("other.td").unwrap();
        let err = dial(&serving, &[&other], "127.0.0.1").await.unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        );
        let err = ServingCert::new(
            ca,
            ServingNames::parse(["a.svc"]).unwrap(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("at least 2 seconds"), "{err}");
    }

    #[tokio::test]
    async fn a_serving_certificate_is_reissued_after_half_its_lifetime_and_else_expires() {
        let ca = Arc::new(Ca::generate("cluster.local").unwrap());
        let names = ServingNames::parse(["127.0.0.1"]).unwrap();
        let lifetime = Duration::from_secs(2);
        let renewing = ServingCert::new(ca.clone(), names.clone(), lifetime).unwrap();
        let fixed = ServingCert::without_renewal(ca.clone(), names, lifetime).unwrap();
        let first = dial(&renewing, &[&ca], "127.0.0.1").await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // Past half the lifetime a handshake gets a new certificate; the one that is never
        // reissued expires (webpki compares whole seconds, so this takes up to 3 s).
        let mut reissued = None;
        let mut expired = None;
        while reissued.is_none() || expired.is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "reissued: {reissued:?}, expired: {expired:?}"
            );
            let serial = dial(&renewing, &[&ca], "127.0.0.1").await.unwrap();
            if serial != first && reissued.is_none() {
                reissued = Some(renewing.generation());
            }
            if let Err(e) = dial(&fixed, &[&ca], "127.0.0.1").await {
                expired = Some(e);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(reissued, Some(2));
        assert!(
            matches!(
                expired,
                Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ExpiredContext { .. }
                ))
            ),
            "{expired:?}"
        );
        // The reissued one is still good when the first would have expired.
        dial(&renewing, &[&ca], "127.0.0.1").await.unwrap();
        assert_eq!(fixed.generation(), 1);
    }
}
