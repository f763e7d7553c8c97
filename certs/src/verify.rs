//! Verifying SPIFFE peers: the chain against the trust bundle, then the **expected** identity.
//!
//! Owns [`spiffe_id_of`] (the one URI SAN of a certificate, as an [`Identity`]),
//! [`SpiffeServerVerifier`] (the client side: rustls' stock verifier checks only DNS/IP names,
//! so this one checks the chain with webpki and then that the server's URI SAN is the identity
//! the SNI names, see [`crate::sni`]) and [`peer_identity`] (the server side: the chain is
//! checked by webpki's client verifier during the handshake, the identity is read after it
//! and returned for the caller to authorize).
//!
//! Must not touch: private keys, sockets.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use x509_parser::extensions::GeneralName;

use crate::{Error, Identity, Result};

/// The SPIFFE ID of a certificate: its single URI SAN. Anything else is an error.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<Identity> {
    let bad = |reason: String| Error::BadPeerCert(reason);
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| bad(format!("the certificate cannot be parsed ({e})")))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| bad(format!("its subjectAltName is malformed ({e})")))?
        .ok_or_else(|| bad("it has no subjectAltName".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one.parse(),
        other => Err(bad(format!(
            "it must carry exactly one URI SAN (a SPIFFE ID), but has {}",
            other.len()
        ))),
    }
}

/// The identity of the peer of a finished handshake (the chain was verified during it).
pub fn peer_identity(conn: &rustls::CommonState) -> Result<Identity> {
    let certs = conn
        .peer_certificates()
        .ok_or_else(|| Error::BadPeerCert("the peer sent no certificate".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Error::BadPeerCert("the peer sent an empty chain".into()))?;
    spiffe_id_of(leaf)
}

/// A client-side verifier for SPIFFE servers: the chain must lead to the trust bundle and the
/// server's SPIFFE ID must be the identity the server name (SNI) names.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// A verifier trusting `roots`.
    pub fn new(roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>) -> Self {
        Self { roots, provider }
    }
}

fn other(e: Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = match server_name {
            ServerName::DnsName(name) => crate::sni::decode(name.as_ref()).map_err(other)?,
            _ => {
                return Err(other(Error::BadPeerCert(
                    "the server name is an IP address, not an identity name".into(),
                )));
            }
        };
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = spiffe_id_of(end_entity).map_err(other)?;
        if presented != expected {
            return Err(other(Error::WrongPeer {
                expected: expected.to_string(),
                presented: presented.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
