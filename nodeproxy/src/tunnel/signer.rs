//! The node's `Identity.Certify` client: a [`certs::Signer`] that sends a tenant's CSR to the
//! remote control plane (`--control-plane URL`), authenticated with the node's bearer token.
//!
//! Owns [`GrpcSigner`]. It connects like the Watch client ([`controlplane::client::Target`]:
//! TLS verified against `--control-plane-ca`, the token only over TLS). The control plane
//! authorizes the node (it signs only identities of the node's own pods) and answers with the
//! chain and trust bundle in PEM; the CSR carries only a public key.
//!
//! Must not touch: private keys (the CSR is built inside `certs`), the data path.

use std::path::PathBuf;
use std::time::Duration;

use certs::store::BoxFuture;
use certs::{Identity, Signed, Signer};
use controlplane::api::CertifyRequest;
use controlplane::api::identity_client::IdentityClient;
use controlplane::client::{ClientError, Target, Token};

/// Signs through the control plane's `Identity.Certify`.
#[derive(Debug, Clone)]
pub struct GrpcSigner {
    endpoint: Target,
    token: Token,
    validity: Duration,
}

impl GrpcSigner {
    /// A signer calling `endpoint` (`https://host:15012` and its CA bundle) with the token
    /// read from `token_file` on every call (so a rotated projected token is picked up),
    /// asking for certificates valid for `validity` (the CA may shorten it).
    pub fn new(endpoint: Target, token_file: Option<PathBuf>, validity: Duration) -> Self {
        Self {
            endpoint,
            token: token_file.map_or(Token::None, Token::File),
            validity,
        }
    }

    async fn certify(&self, identity: &Identity, csr: Vec<u8>) -> certs::Result<Signed> {
        let client = |e: ClientError| certs::Error::Ca(format!("Certify for {identity}: {e}"));
        // The token must never cross plain text, whoever built this signer.
        self.endpoint.check(&self.token).map_err(client)?;
        let mut request = tonic::Request::new(CertifyRequest {
            csr_pem: certs::ca::csr_to_pem(&csr),
            identity: identity.to_string(),
            validity_seconds: self.validity.as_secs(),
        });
        self.token.authorize(&mut request).map_err(client)?;
        let channel = self
            .endpoint
            .connect(|e| {
                e.connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(10))
            })
            .await
            .map_err(client)?;
        let fail = |what: String| certs::Error::Ca(format!("Certify at {}: {what}", self.endpoint));
        let response = IdentityClient::new(channel)
            .certify(request)
            .await
            .map_err(|status| {
                fail(format!(
                    "{:?}: {} (identity {identity})",
                    status.code(),
                    status.message()
                ))
            })?
            .into_inner();
        let parse = |pems: &[String]| {
            pems.iter()
                .map(|p| certs::ca::cert_from_pem(p))
                .collect::<certs::Result<Vec<_>>>()
        };
        Ok(Signed {
            chain: parse(&response.cert_chain_pem)?,
            trust_bundle: parse(&response.trust_bundle_pem)?,
        })
    }
}

impl Signer for GrpcSigner {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: Vec<u8>,
    ) -> BoxFuture<'a, certs::Result<Signed>> {
        Box::pin(self.certify(identity, csr))
    }
}
