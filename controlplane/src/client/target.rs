//! How every client reaches and verifies the control plane.
//!
//! Owns [`Target`]: a control plane's address and the CA bundle that verifies it, what every
//! client of the control plane connects with (the Watch client, the daemon's Certify signer).
//! A remote control plane is reached over TLS (`https://`), its serving certificate verified
//! against the CA bundle (re-read at every connect, so a rotated bundle is picked up); a bearer
//! token crosses plain text (`http://`) only to the daemon's in-process server on loopback. A
//! failed handshake is explained: a certificate from another CA, an expired one, one for other
//! names, a server without TLS.
//!
//! Must not touch: the Watch loop, tokens' contents (it decides only whether one may cross).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::CertificateError;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::{ClientError, Token};

/// How long a TLS handshake with the control plane may take (the endpoint's connect timeout
/// covers only the TCP connect).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A control plane's address and how to trust it: what every client of it (the Watch client,
/// the daemon's Certify signer) connects with.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Target {
    /// `https://host:port`; `http://` only for the in-process server on loopback.
    pub url: String,
    /// The CA bundle (PEM) the server's certificate must chain to; required with `https://`
    /// and re-read at every connect.
    pub ca_file: Option<PathBuf>,
}

impl From<&str> for Target {
    /// An address without a CA bundle (plain text, unless it says `https://`).
    fn from(url: &str) -> Self {
        Self::new(url, None)
    }
}

impl From<String> for Target {
    fn from(url: String) -> Self {
        Self::new(url, None)
    }
}

impl From<&String> for Target {
    fn from(url: &String) -> Self {
        Self::new(url.as_str(), None)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl Target {
    /// `url`, verified against the bundle in `ca_file` when it is `https://`.
    pub fn new(url: impl Into<String>, ca_file: Option<PathBuf>) -> Self {
        Self {
            url: url.into(),
            ca_file,
        }
    }

    /// Checks everything that can be checked without connecting: the address, that `https://`
    /// has a readable bundle of certificates and `http://` none, and that `token` would
    /// cross TLS (or, a fixed token only, plain text to loopback: the in-process server).
    pub fn check(&self, token: &Token) -> Result<(), ClientError> {
        let (tls, host) = self.parse()?;
        match (tls, &self.ca_file) {
            (true, None) => {
                return Err(ClientError::NoCaBundle {
                    url: self.url.clone(),
                });
            }
            (true, Some(path)) => {
                load_bundle(path)?;
            }
            (false, Some(path)) => {
                return Err(ClientError::CaWithoutTls {
                    url: self.url.clone(),
                    path: path.clone(),
                });
            }
            (false, None) => {}
        }
        let in_clear = match token {
            Token::None => false,
            Token::File(_) => !tls,
            Token::Fixed(_) => !tls && !is_loopback(&host),
        };
        if in_clear {
            return Err(ClientError::TokenInClear {
                url: self.url.clone(),
            });
        }
        Ok(())
    }

    /// Connects: TLS verified against the bundle (read now) for `https://`. `configure` sets
    /// timeouts and keep-alives. A failed handshake is explained (another CA, expired, other
    /// names, no TLS there).
    pub async fn connect(
        &self,
        configure: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<Channel, ClientError> {
        let (tls, _) = self.parse()?;
        let mut endpoint = Endpoint::from_shared(self.url.clone()).map_err(|e| self.bad(e))?;
        if tls {
            let path = self
                .ca_file
                .as_deref()
                .ok_or_else(|| ClientError::NoCaBundle {
                    url: self.url.clone(),
                })?;
            let roots = load_bundle(path)?;
            endpoint = endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .trust_anchors(roots.roots)
                        .timeout(TLS_HANDSHAKE_TIMEOUT),
                )
                .map_err(|e| self.bad(e))?;
        }
        configure(endpoint)
            .connect()
            .await
            .map_err(|e| self.explain(&e))
    }

    /// Whether the address speaks TLS, and its host.
    fn parse(&self) -> Result<(bool, String), ClientError> {
        let endpoint = Endpoint::from_shared(self.url.clone()).map_err(|e| self.bad(e))?;
        let uri = endpoint.uri();
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(ClientError::Address {
                    url: self.url.clone(),
                    reason: "the scheme must be https:// (or http:// for a plain-text server)"
                        .to_owned(),
                });
            }
        };
        let host = uri.host().unwrap_or_default().to_owned();
        if host.is_empty() {
            return Err(ClientError::Address {
                url: self.url.clone(),
                reason: "it names no host".to_owned(),
            });
        }
        Ok((tls, host))
    }

    fn bad(&self, e: impl fmt::Display) -> ClientError {
        ClientError::Address {
            url: self.url.clone(),
            reason: e.to_string(),
        }
    }

    /// Turns a connect failure into what happened and what to do.
    fn explain(&self, e: &tonic::transport::Error) -> ClientError {
        let url = self.url.clone();
        let chain = error_chain(e);
        if let Some(tls) = find_rustls(e) {
            let bundle = self
                .ca_file
                .as_deref()
                .map_or_else(|| "the CA bundle".to_owned(), |p| p.display().to_string());
            return ClientError::Tls {
                url,
                reason: explain_tls(tls, &bundle),
            };
        }
        // tonic's handshake timeout is a private type: known by its message.
        if chain.contains("TLS handshake timeout") {
            return ClientError::Tls {
                url,
                reason: format!(
                    "it accepted the connection but did not finish a TLS handshake within \
                     {TLS_HANDSHAKE_TIMEOUT:?}: check that the address is the control plane's \
                     TLS port and that it is not overloaded"
                ),
            };
        }
        let refused =
            find_io(e).is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        let reason = if refused {
            format!(
                "{chain}: nothing listens there; check the address (--control-plane) and that the control plane runs"
            )
        } else {
            chain
        };
        ClientError::Connect { url, reason }
    }
}

/// What a failed TLS handshake means for an operator, and the fix. Pure: table-tested.
fn explain_tls(e: &rustls::Error, bundle: &str) -> String {
    let clocks = "check the clocks of this node and of the control plane";
    match e {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "its serving certificate is not signed by a CA in {bundle}: the control plane's \
                 CA differs from this bundle; give --control-plane-ca the control plane's CA \
                 certificate (its --ca-cert file)"
            ),
            CertificateError::ExpiredContext { time, not_after } => format!(
                "its serving certificate expired {} s ago (notAfter {} Unix seconds); the \
                 control plane reissues it at half its lifetime, so {clocks}",
                time.as_secs().saturating_sub(not_after.as_secs()),
                not_after.as_secs()
            ),
            CertificateError::Expired => {
                format!(
                    "its serving certificate expired; the control plane reissues it at half its lifetime, so {clocks}"
                )
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("its serving certificate is not valid yet; {clocks}")
            }
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => format!(
                "its serving certificate is for {}, not {}: dial it by one of those names, or \
                 add this one to the control plane's --serving-names",
                presented
                    .iter()
                    .map(|name| plain_name(name))
                    .collect::<Vec<_>>()
                    .join(", "),
                expected.to_str()
            ),
            CertificateError::NotValidForName => "its serving certificate is not for this \
                address: dial it by one of its --serving-names, or add this one there"
                .to_owned(),
            other => format!("its serving certificate is refused ({other:?})"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "it does not answer in TLS: is it a plain-text server (--insecure-plaintext), or \
             not the control plane? Use the address of its TLS port"
                .to_owned()
        }
        other => format!("the handshake failed ({other})"),
    }
}

/// A name as webpki presents it (`DnsName("a.svc")`, `IpAddress(10.0.0.1)`), plainly.
fn plain_name(presented: &str) -> &str {
    ["DnsName(", "IpAddress("]
        .iter()
        .find_map(|kind| presented.strip_prefix(kind)?.strip_suffix(')'))
        .map_or(presented, |name| name.trim_matches('"'))
}

/// The first rustls error in `e`'s chain (tokio-rustls wraps it in an `io::Error`, whose
/// `source` skips it, so each `io::Error` is looked into too).
fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = err.source();
    }
    None
}

/// The first I/O error in `e`'s chain.
fn find_io<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        next = err.source();
    }
    None
}

/// `e` and its causes, joined by `: `, each said once.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// Reads a PEM bundle of CA certificates: at least one, each usable as a trust anchor.
fn load_bundle(path: &Path) -> Result<rustls::RootCertStore, ClientError> {
    let bad = |reason: String| ClientError::CaBundle {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| {
        bad(format!(
            "cannot read it ({e}); give --control-plane-ca the control plane's CA certificate \
             (PEM; in Kubernetes the ConfigMap that holds it)"
        ))
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("it is not PEM ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("a certificate in it is unusable ({e})")))?;
    }
    if roots.is_empty() {
        return Err(bad(
            "it holds no CERTIFICATE; give the control plane's CA certificate (PEM)".to_owned(),
        ));
    }
    Ok(roots)
}

/// Whether `host` (from a URI: IPv6 in brackets) is this machine's loopback.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_cross_only_tls_but_the_in_process_token_may_cross_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("ca.pem");
        let ca = certs::Ca::generate("cluster.local").unwrap();
        std::fs::write(&bundle, ca.root_pem()).unwrap();
        let file = Token::File(dir.path().join("token"));
        let fixed = Token::Fixed("t".into());
        let tls = |url: &str| Target::new(url, Some(bundle.clone()));
        let plain = |url: &str| Target::from(url);
        // (target, token, None: accepted / Some(what the error says))
        let cases = [
            (tls("https://cp:15012"), &file, None),
            (tls("https://cp:15012"), &fixed, None),
            (plain("http://127.0.0.1:1"), &fixed, None),
            (plain("http://[::1]:1"), &fixed, None),
            (plain("http://localhost:1"), &fixed, None),
            (plain("http://cp:15012"), &Token::None, None),
            (plain("http://127.0.0.1:1"), &file, Some("only over TLS")),
            (plain("http://cp:15012"), &fixed, Some("only over TLS")),
            (
                plain("http://10.0.0.1:15012"),
                &fixed,
                Some("only over TLS"),
            ),
            (
                plain("https://cp:15012"),
                &Token::None,
                Some("--control-plane-ca FILE"),
            ),
            (tls("http://cp:15012"), &Token::None, Some("use https://")),
            (
                plain("ftp://cp:15012"),
                &Token::None,
                Some("the scheme must be https://"),
            ),
            (
                plain("https://"),
                &Token::None,
                Some("control plane address \"https://\""),
            ),
        ];
        for (target, token, want) in cases {
            let got = target.check(token);
            match (want, got) {
                (None, Ok(())) => {}
                (Some(want), Err(e)) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(want),
                        "{target} {token:?}: {want:?} not in {msg}"
                    );
                    assert!(msg.contains(&target.url), "{target}: {msg}");
                }
                (want, got) => panic!("{target} {token:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn each_tls_failure_names_its_cause_and_fix() {
        use rustls::pki_types::{ServerName, UnixTime};
        let bundle = "/etc/nodeproxy/ca.pem";
        let at = |secs| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        let cert = |e| rustls::Error::InvalidCertificate(e);
        let cases = [
            (
                cert(CertificateError::UnknownIssuer),
                vec![
                    bundle,
                    "the control plane's CA differs",
                    "--control-plane-ca",
                ],
            ),
            (
                cert(CertificateError::BadSignature),
                vec![bundle, "the control plane's CA differs"],
            ),
            (
                cert(CertificateError::ExpiredContext {
                    time: at(1_000_090),
                    not_after: at(1_000_000),
                }),
                vec!["expired 90 s ago", "notAfter 1000000", "clocks"],
            ),
            (cert(CertificateError::Expired), vec!["expired", "clocks"]),
            (
                cert(CertificateError::NotValidYet),
                vec!["not valid yet", "clocks"],
            ),
            (
                cert(CertificateError::NotValidForNameContext {
                    expected: ServerName::try_from("10.0.0.1").unwrap(),
                    presented: vec![
                        "DnsName(\"cp.nodeproxy-system.svc\")".into(),
                        "IpAddress(10.0.0.2)".into(),
                    ],
                }),
                vec![
                    "for cp.nodeproxy-system.svc, 10.0.0.2, not 10.0.0.1",
                    "--serving-names",
                ],
            ),
            (
                cert(CertificateError::NotValidForName),
                vec!["--serving-names"],
            ),
            (
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                vec!["does not answer in TLS", "--insecure-plaintext"],
            ),
            (
                rustls::Error::NoApplicationProtocol,
                vec!["the handshake failed"],
            ),
        ];
        for (e, wants) in cases {
            let msg = explain_tls(&e, bundle);
            for want in wants {
                assert!(msg.contains(want), "{e:?}: {want:?} not in {msg}");
            }
        }
    }
}
