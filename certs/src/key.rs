//! The private keys: ECDSA P-256, generated inside this crate and never handed out.
//!
//! Owns [`EcKey`]: the key lives in aws-lc memory (which aws-lc cleanses when it frees it); the
//! PKCS#8 bytes exist only transiently in a [`Zeroizing`] buffer or an aws-lc `Document`,
//! both wiped on drop. There is no accessor that returns key bytes, `Debug` is redacted and
//! nothing here is `Serialize`. The one exception is the CA key, which the operator may ask
//! to be written to a file in standalone mode ([`EcKey::generate_with_pkcs8`]).
//!
//! Must not touch: sockets, files (except through [`crate::ca`]), logs (no key material is
//! ever formatted).

use std::fmt;
use std::sync::Arc;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

use crate::{Error, Result};

/// An ECDSA P-256 private key with its public half. Signs CSRs and certificates (through
/// rcgen) and produces rustls signing keys; never exposes its bytes.
///
/// Kept rather than `rcgen::KeyPair`, which holds the PKCS#8 bytes in a plain `Vec` for its
/// whole life and hands them out (`serialize_der`).
pub(crate) struct EcKey {
    pair: EcdsaKeyPair,
    rustls: Arc<dyn rustls::sign::SigningKey>,
}

impl fmt::Debug for EcKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EcKey(P-256, [redacted])")
    }
}

impl EcKey {
    /// Generates a fresh key.
    pub(crate) fn generate() -> Result<Self> {
        Ok(Self::generate_with_pkcs8()?.0)
    }

    /// Generates a fresh key and also returns its PKCS#8 encoding, wiped when dropped. Only the
    /// CA uses the bytes, to write its key where the operator asked.
    pub(crate) fn generate_with_pkcs8() -> Result<(Self, Zeroizing<Vec<u8>>)> {
        let rng = SystemRandom::new();
        // `Document` zeroizes itself on drop; the copy is zeroized by `Zeroizing`.
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| Error::Crypto("cannot generate an ECDSA P-256 key".into()))?;
        let pkcs8 = Zeroizing::new(doc.as_ref().to_vec());
        drop(doc);
        Ok((Self::from_pkcs8(&pkcs8)?, pkcs8))
    }

    /// Loads a PKCS#8 ECDSA P-256 key.
    pub(crate) fn from_pkcs8(pkcs8: &[u8]) -> Result<Self> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
            .map_err(|e| Error::Crypto(format!("the key is not a PKCS#8 ECDSA P-256 key ({e})")))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
        let rustls = rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der)
            .map_err(|e| Error::Crypto(format!("rustls rejects the key: {e}")))?;
        Ok(Self { pair, rustls })
    }

    /// The rustls signing key (shares the key; does not copy its bytes out).
    pub(crate) fn rustls_key(&self) -> Arc<dyn rustls::sign::SigningKey> {
        self.rustls.clone()
    }
}

impl rcgen::PublicKeyData for EcKey {
    fn der_bytes(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for EcKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let rng = SystemRandom::new();
        self.pair
            .sign(&rng, msg)
            .map(|sig| sig.as_ref().to_vec())
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let key = EcKey::generate().unwrap();
        let dbg = format!("{key:?}");
        assert_eq!(dbg, "EcKey(P-256, [redacted])");
    }
}
