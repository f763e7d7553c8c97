//! The signing CA: a root (from PEM files, or generated) that signs workload CSRs.
//!
//! Owns [`Ca`]. It signs a CSR for a given identity only after checking that the CSR names
//! exactly that SPIFFE ID (one URI SAN, nothing else) in the CA's trust domain; the issued
//! certificate is short-lived ([`DEFAULT_LIFETIME`], configurable down to seconds for tests)
//! and takes nothing else from the CSR but its public key. *Who* may ask for which identity
//! (node authorization) is the caller's business: the control plane's `Identity.Certify`, or
//! the daemon's embedded signer in standalone mode.
//!
//! It also signs the serving certificate of the control plane's own listener
//! ([`crate::serving`]).
//!
//! The CA key is the only private key that may be written to disk, and only where the
//! operator says ([`Ca::load_or_generate`]), with mode 0600.
//!
//! Must not touch: sockets, node views, Kubernetes.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use data_encoding::Encoding;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::key::EcKey;
use crate::store::Signed;
use crate::{Error, Identity, Result};

/// Lifetime of workload certificates unless configured otherwise.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a generated root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far back a certificate's `notBefore` is set, to absorb clock skew between nodes
/// (capped at a quarter of the lifetime so test certificates of seconds stay meaningful).
pub(crate) const MAX_BACKDATE: Duration = Duration::from_secs(60);

/// A certificate authority for one trust domain.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, EcKey>,
    root: CertificateDer<'static>,
    root_pem: String,
    lifetime: Duration,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl Ca {
    /// Generates a new root for `trust_domain`, kept in memory only.
    pub fn generate(trust_domain: &str) -> Result<Ca> {
        Ok(Self::generate_inner(trust_domain)?.0)
    }

    fn generate_inner(trust_domain: &str) -> Result<(Ca, zeroize::Zeroizing<Vec<u8>>)> {
        crate::check_trust_domain(trust_domain)?;
        let (key, pkcs8) = EcKey::generate_with_pkcs8()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "nodeproxy");
        dn.push(DnType::CommonName, format!("nodeproxy CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - MAX_BACKDATE;
        params.not_after = now + ROOT_LIFETIME;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("self-sign the root"))?;
        let root = cert.der().clone();
        let root_pem = cert.pem();
        let issuer = Issuer::new(params, key);
        let ca = Ca {
            trust_domain: trust_domain.to_owned(),
            issuer,
            root,
            root_pem,
            lifetime: DEFAULT_LIFETIME,
        };
        Ok((ca, pkcs8))
    }

    /// Loads a root from PEM text: the CA certificate and its PKCS#8 ECDSA P-256 key.
    pub fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Ca> {
        crate::check_trust_domain(trust_domain)?;
        let root = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| Error::Ca(format!("the CA certificate is not PEM ({e})")))?;
        let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            Error::Ca(format!(
                "the CA key is not a PEM PKCS#8 key ({e}); convert it with `openssl pkcs8 -topk8 -nocrypt`"
            ))
        })?;
        let key = EcKey::from_pkcs8(pkcs8.secret_pkcs8_der())?;
        drop(pkcs8);
        let issuer =
            Issuer::from_ca_cert_der(&root, key).map_err(rcgen_err("read the CA certificate"))?;
        let root_pem = pem_encode("CERTIFICATE", &root);
        Ok(Ca {
            trust_domain: trust_domain.to_owned(),
            issuer,
            root,
            root_pem,
            lifetime: DEFAULT_LIFETIME,
        })
    }

    /// Loads the root from `cert_path` and `key_path`; if neither exists, generates one and
    /// writes both there (the key with mode 0600). One without the other is an error.
    pub fn load_or_generate(trust_domain: &str, cert_path: &Path, key_path: &Path) -> Result<Ca> {
        let io = |path: &Path, what: &'static str| {
            let path = path.display().to_string();
            move |source| Error::Io { what, path, source }
        };
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert = std::fs::read_to_string(cert_path).map_err(io(cert_path, "read"))?;
                let key = zeroize::Zeroizing::new(
                    std::fs::read_to_string(key_path).map_err(io(key_path, "read"))?,
                );
                Ca::from_pem(trust_domain, &cert, &key)
            }
            (false, false) => {
                let (ca, pkcs8) = Self::generate_inner(trust_domain)?;
                let key_pem = zeroize::Zeroizing::new(pem_encode("PRIVATE KEY", &pkcs8));
                write_file(key_path, key_pem.as_bytes(), 0o600).map_err(io(key_path, "write"))?;
                write_file(cert_path, ca.root_pem.as_bytes(), 0o644)
                    .map_err(io(cert_path, "write"))?;
                Ok(ca)
            }
            _ => Err(Error::Ca(format!(
                "only one of {} and {} exists: provide both, or remove the other to generate a new CA",
                cert_path.display(),
                key_path.display()
            ))),
        }
    }

    /// Sets the lifetime of the certificates it issues.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Ca {
        self.lifetime = lifetime;
        self
    }

    /// The lifetime of the certificates it issues.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The trust domain it signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate (the trust bundle).
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The signer of the certificates it issues.
    pub(crate) fn issuer(&self) -> &Issuer<'static, EcKey> {
        &self.issuer
    }

    /// The root certificate as PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs `csr` (DER) for `identity`, after checking it names exactly that identity.
    pub fn sign(&self, identity: &Identity, csr: &[u8]) -> Result<Signed> {
        self.sign_for(identity, csr, None)
    }

    /// Like [`Ca::sign`], with a lifetime the caller asks for; the CA's own lifetime is the
    /// upper bound (a request may shorten it, never lengthen it).
    pub fn sign_for(
        &self,
        identity: &Identity,
        csr: &[u8],
        requested: Option<Duration>,
    ) -> Result<Signed> {
        let lifetime = requested
            .filter(|d| !d.is_zero())
            .map_or(self.lifetime, |d| d.min(self.lifetime));
        let refuse = |reason: String| Error::CsrRefused {
            identity: identity.to_string(),
            reason,
        };
        if identity.trust_domain() != self.trust_domain {
            return Err(refuse(format!(
                "the CA signs only for trust domain {}",
                self.trust_domain
            )));
        }
        let req =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
                .map_err(|e| {
                    refuse(format!(
                        "the CSR is unreadable or its signature is wrong ({e})"
                    ))
                })?;
        let want = identity.to_string();
        let sans: Vec<String> = req
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if sans != [want.clone()] {
            return Err(refuse(format!(
                "the CSR must name exactly the SAN {want}, but names {sans:?}"
            )));
        }
        let uri = rcgen::string::Ia5String::try_from(want.as_str())
            .map_err(|e| refuse(format!("the SPIFFE ID is not IA5 ({e})")))?;
        // Take nothing but the public key from the request.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - MAX_BACKDATE.min(lifetime / 4);
        params.not_after = now + lifetime;
        params.serial_number = Some(random_serial()?);
        let cert = CertificateSigningRequestParams {
            params,
            public_key: req.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(rcgen_err("sign the certificate"))?;
        Ok(Signed {
            chain: vec![cert.der().clone()],
            trust_bundle: vec![self.root.clone()],
        })
    }
}

/// The DER of a PEM `CERTIFICATE REQUEST` (as the `Identity.Certify` API carries it).
pub fn csr_from_pem(pem: &str) -> Result<Vec<u8>> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.as_ref().to_vec())
        .map_err(|e| Error::Ca(format!("the CSR is not a PEM CERTIFICATE REQUEST ({e})")))
}

/// A DER `CERTIFICATE REQUEST` as PEM.
pub fn csr_to_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE REQUEST", der)
}

/// A certificate as PEM.
pub fn cert_to_pem(cert: &CertificateDer<'_>) -> String {
    pem_encode("CERTIFICATE", cert)
}

/// A PEM `CERTIFICATE` as DER.
pub fn cert_from_pem(pem: &str) -> Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Error::BadSigned(format!("a certificate is not PEM ({e})")))
}

/// Kept rather than rcgen's default serial, which is a hash of the public key: a CA's serials
/// should be unpredictable (CA/Browser Forum: at least 64 bits from a CSPRNG).
pub(crate) fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| Error::Crypto("no randomness for a serial number".into()))?;
    // Positive and without a leading zero octet.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

pub(crate) fn rcgen_err(what: &'static str) -> impl Fn(rcgen::Error) -> Error {
    move |e| Error::Ca(format!("cannot {what}: {e}"))
}

/// Base64 (RFC 4648, padded) in lines of 64 columns, each ending in `\n`: a PEM body as
/// rcgen writes it.
static PEM_BASE64: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = data_encoding::BASE64.specification();
    spec.wrap.width = 64;
    spec.wrap.separator.push('\n');
    spec.encoding()
        .expect("invariant: base64 wrapped at 64 columns with \\n is a valid specification")
});

/// PEM-encodes `der` with `label`. The text is written into one allocation of its final size,
/// so the PEM of a key leaves no stale partial copy behind for the caller's `Zeroizing` to miss.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let (begin, end) = (
        format!("-----BEGIN {label}-----\n"),
        format!("-----END {label}-----\n"),
    );
    let len = begin.len() + PEM_BASE64.encode_len(der.len()) + end.len();
    let mut out = String::with_capacity(len);
    let capacity = out.capacity();
    out.push_str(&begin);
    PEM_BASE64.encode_append(der, &mut out);
    out.push_str(&end);
    debug_assert_eq!(out.capacity(), capacity, "the PEM text was reallocated");
    out
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::verify::spiffe_id_of;

    fn csr_for(san: &str) -> Vec<u8> {
        let key = EcKey::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(san).unwrap(),
        )];
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn signs_only_the_identity_the_csr_names() {
        let ca = Ca::generate("cluster.local").unwrap();
        let web = Identity::new("cluster.local", "shop", "web").unwrap();
        let signed = ca.sign(&web, &csr_for(&web.to_string())).unwrap();
        assert_eq!(spiffe_id_of(&signed.chain[0]).unwrap(), web);
        assert_eq!(signed.trust_bundle, vec![ca.root().clone()]);

        let db = Identity::new("cluster.local", "shop", "db").unwrap();
        let err = ca.sign(&db, &csr_for(&web.to_string())).unwrap_err();
        assert!(
            err.to_string()
                .contains("spiffe://cluster.local/ns/shop/sa/db"),
            "{err}"
        );
        assert!(err.to_string().contains("exactly"), "{err}");

        let other_td = Identity::new("other.td", "shop", "web").unwrap();
        let err = ca
            .sign(&other_td, &csr_for(&other_td.to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("trust domain"), "{err}");

        let err = ca.sign(&web, b"not a csr").unwrap_err();
        assert!(err.to_string().contains("unreadable"), "{err}");

        // A request may shorten the lifetime, never lengthen it; PEM round-trips.
        let csr = csr_from_pem(&csr_to_pem(&csr_for(&web.to_string()))).unwrap();
        let short = ca
            .sign_for(&web, &csr, Some(Duration::from_secs(60)))
            .unwrap();
        let long = ca
            .sign_for(
                &web,
                &csr,
                Some(Duration::from_secs(10 * DEFAULT_LIFETIME.as_secs())),
            )
            .unwrap();
        let life = |s: &Signed| {
            let (_, c) = x509_parser::parse_x509_certificate(&s.chain[0]).unwrap();
            c.validity().not_after.timestamp() - c.validity().not_before.timestamp()
        };
        assert!(life(&short) <= 60 + 60, "{}", life(&short));
        assert!(life(&long) <= DEFAULT_LIFETIME.as_secs() as i64 + 60);
        let pem = cert_to_pem(&short.chain[0]);
        assert_eq!(cert_from_pem(&pem).unwrap(), short.chain[0]);
    }

    #[test]
    fn root_round_trips_through_files_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        let a = Ca::load_or_generate("cluster.local", &cert, &key).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Ca::load_or_generate("cluster.local", &cert, &key).unwrap();
        assert_eq!(a.root(), b.root());
        assert!(!format!("{a:?}").contains("PRIVATE"));
        std::fs::remove_file(&key).unwrap();
        let err = Ca::load_or_generate("cluster.local", &cert, &key).unwrap_err();
        assert!(err.to_string().contains("only one of"), "{err}");
    }

    #[test]
    fn pem_is_64_column_base64_between_lf_lines() {
        // Computed with the hand-written encoder this module had and Python's `base64`:
        // empty, one full line, and two full lines plus a padded one.
        let body = [
            "",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4v\n",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4v\n\
             MDEyMzQ1Njc4OTo7PD0+P0BBQkNERUZHSElKS0xNTk9QUVJTVFVWV1hZWltcXV5f\n\
             YGFiYw==\n",
        ];
        for (len, body) in [0u8, 48, 100].into_iter().zip(body) {
            let der: Vec<u8> = (0..len).collect();
            let want = format!("-----BEGIN TEST-----\n{body}-----END TEST-----\n");
            assert_eq!(pem_encode("TEST", &der), want, "{len} bytes");
        }
        // The same text as rcgen writes for the root it generates.
        let ca = Ca::generate("cluster.local").unwrap();
        assert_eq!(cert_to_pem(ca.root()), ca.root_pem());
    }
}
