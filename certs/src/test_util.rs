//! Fakes for tests (feature `test-util`): a CA that counts what it signs and can be told to
//! fail, so rotation and backoff can be driven from a test.
//!
//! Must not touch: anything outside tests; it is compiled only for tests and `test-util`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::ca::Ca;
use crate::store::{BoxFuture, CertStore, RotationOptions, Signed, Signer};
use crate::{Error, Identity, Result};

/// A generated in-memory CA that implements [`Signer`], counts signatures and can fail on
/// demand.
#[derive(Debug)]
pub struct FakeCa {
    ca: Ca,
    signed: AtomicU64,
    failing: AtomicBool,
}

impl FakeCa {
    /// A CA for `trust_domain` issuing certificates valid for `lifetime`.
    pub fn new(trust_domain: &str, lifetime: Duration) -> Arc<FakeCa> {
        let ca = Ca::generate(trust_domain)
            .unwrap_or_else(|e| panic!("test CA for {trust_domain}: {e}"))
            .with_lifetime(lifetime);
        Arc::new(FakeCa {
            ca,
            signed: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        })
    }

    /// The CA itself.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// How many certificates it signed.
    pub fn signed(&self) -> u64 {
        self.signed.load(Ordering::SeqCst)
    }

    /// Makes every following signature fail (or succeed again).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// A store for `identity` signed by this CA, with fast backoff.
    pub fn store(self: &Arc<Self>, identity: &Identity) -> CertStore {
        CertStore::spawn(
            identity.clone(),
            self.clone(),
            RotationOptions {
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
            },
        )
    }
}

impl Signer for FakeCa {
    fn sign<'a>(&'a self, identity: &'a Identity, csr: Vec<u8>) -> BoxFuture<'a, Result<Signed>> {
        Box::pin(async move {
            if self.failing.load(Ordering::SeqCst) {
                return Err(Error::Ca("the fake CA is set to fail".into()));
            }
            let signed = self.ca.sign(identity, &csr)?;
            self.signed.fetch_add(1, Ordering::SeqCst);
            Ok(signed)
        })
    }
}

/// An identity in `cluster.local` (panics on bad names; tests only).
pub fn identity(namespace: &str, service_account: &str) -> Identity {
    Identity::new(crate::DEFAULT_TRUST_DOMAIN, namespace, service_account)
        .unwrap_or_else(|e| panic!("test identity: {e}"))
}

/// A PEM CSR for the URI SAN `san`, from a throwaway key (for CA and Certify tests).
pub fn csr_pem(san: &str) -> String {
    let key = crate::key::EcKey::generate().unwrap_or_else(|e| panic!("test key: {e}"));
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(san).unwrap_or_else(|e| panic!("test SAN: {e}"));
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .unwrap_or_else(|e| panic!("test CSR: {e}"));
    crate::ca::csr_to_pem(csr.der())
}
