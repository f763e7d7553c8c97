//! Per-identity certificate stores: a key generated inside, a CSR out, a chain in, rotation.
//!
//! Owns [`CertStore`] (a cheap cloneable handle), its private worker task, the [`Signer`]
//! trait the worker calls (the control plane's gRPC client or, in standalone mode, an
//! embedded [`crate::ca::Ca`] behind node authorization), and [`Current`]: what the data path
//! reads — rustls server and client configs built around the current key, and the expiry.
//!
//! The worker generates a fresh ECDSA P-256 key for every certificate, asks the signer, and
//! publishes the result through `tokio::sync::watch`; it renews at half the remaining
//! lifetime and on failure keeps the old certificate and backs off exponentially with jitter
//! (backon's), so stores whose renewals fail together do not retry in lockstep. The key
//! never leaves: it is inside the rustls configs (as a signing key in aws-lc memory), there
//! is no accessor returning its bytes, `Debug` is redacted and nothing here serializes. When
//! the last handle is dropped the worker stops, and the keys go with the last config that
//! uses them.
//!
//! Must not touch: sockets, other identities' stores (one store per identity, no registry).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder as _, ExponentialBuilder};
use rcgen::{CertificateParams, DistinguishedName, SanType};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use tokio::sync::watch;

use crate::key::EcKey;
use crate::verify::{SpiffeServerVerifier, spiffe_id_of};
use crate::{Error, Identity, Result};

/// ALPN protocol of the mesh tunnel (HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

/// What a signer returns: the leaf first, then intermediates; and the roots to trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    /// The certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The trust bundle (roots).
    pub trust_bundle: Vec<CertificateDer<'static>>,
}

/// A boxed future, as [`Signer`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Signs CSRs for a store: the control plane's `Identity.Certify` client, or an embedded CA.
pub trait Signer: Send + Sync + 'static {
    /// Signs `csr` (DER) for `identity`.
    fn sign<'a>(&'a self, identity: &'a Identity, csr: Vec<u8>) -> BoxFuture<'a, Result<Signed>>;
}

impl Signer for crate::ca::Ca {
    fn sign<'a>(&'a self, identity: &'a Identity, csr: Vec<u8>) -> BoxFuture<'a, Result<Signed>> {
        Box::pin(async move { crate::ca::Ca::sign(self, identity, &csr) })
    }
}

/// Rotation timing.
///
/// After the n-th failure in a row the store waits `min(initial_backoff × 2ⁿ⁻¹, max_backoff)`
/// plus a random jitter of up to as much again, so every wait lies in
/// `[initial_backoff, 2 × max_backoff)`. A success starts the sequence over.
#[derive(Clone, Copy, Debug)]
pub struct RotationOptions {
    /// First retry delay after a failed renewal, before jitter (doubles up to `max_backoff`).
    pub initial_backoff: Duration,
    /// Longest retry delay before jitter; with it a wait can reach twice this.
    pub max_backoff: Duration,
}

impl RotationOptions {
    /// The waits after consecutive failed renewals: exponential, capped, jittered, endless.
    fn retry_delays(self) -> impl Iterator<Item = Duration> + Send {
        ExponentialBuilder::new()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(self.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

impl Default for RotationOptions {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// The current certificate of a store, ready for the data path.
pub struct Current {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    not_after: SystemTime,
    serial: u64,
}

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Current")
            .field("not_after", &self.not_after)
            .field("serial", &self.serial)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl Current {
    /// A server config (mTLS: clients must present a certificate from the trust bundle; read
    /// their identity after the handshake with [`crate::verify::peer_identity`]).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// A client config presenting this identity and verifying servers with
    /// [`SpiffeServerVerifier`]: the server name must be [`crate::sni::encode`] of the
    /// expected identity.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// When the certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// How many certificates this store has obtained, this one included (1 for the first).
    pub fn generation(&self) -> u64 {
        self.serial
    }
}

/// The per-identity certificate store handle. Cheap to clone; the worker stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct CertStore {
    identity: Identity,
    rx: watch::Receiver<Option<Arc<Current>>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.rx.borrow().as_ref().map(|c| c.not_after);
        f.debug_struct("CertStore")
            .field("identity", &self.identity)
            .field("not_after", &current)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl CertStore {
    /// Starts a store for `identity` on the current tokio runtime: its worker obtains the
    /// first certificate at once and renews it from then on.
    pub fn spawn(identity: Identity, signer: Arc<dyn Signer>, opts: RotationOptions) -> Self {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(worker(identity.clone(), signer, opts, tx));
        Self { identity, rx }
    }

    /// The identity this store holds certificates for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The current certificate, if one was obtained yet. Never waits.
    pub fn current(&self) -> Option<Arc<Current>> {
        self.rx.borrow().clone()
    }

    /// Waits until a certificate is available (or the worker stopped).
    pub async fn ready(&self) -> Result<Arc<Current>> {
        let mut rx = self.rx.clone();
        let got = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::StoreStopped(self.identity.to_string()))?;
        got.clone()
            .ok_or_else(|| Error::StoreStopped(self.identity.to_string()))
    }

    /// A receiver that sees every new certificate (for expiry metrics).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Current>>> {
        self.rx.clone()
    }
}

async fn worker(
    identity: Identity,
    signer: Arc<dyn Signer>,
    opts: RotationOptions,
    tx: watch::Sender<Option<Arc<Current>>>,
) {
    let mut delays = opts.retry_delays();
    let mut serial = 0;
    loop {
        let wait = match issue(&identity, &*signer, serial + 1).await {
            Ok(current) => {
                serial += 1;
                let not_after = current.not_after;
                tx.send_replace(Some(Arc::new(current)));
                delays = opts.retry_delays();
                // Renew halfway through the remaining validity.
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tracing::info!(%identity, valid_for = ?left, generation = serial, "certificate obtained");
                left / 2
            }
            Err(e) => {
                // Keep the old certificate (if any) and retry later. The sequence is endless
                // (no max times); the fallback is only for the type.
                let wait = delays.next().unwrap_or(opts.max_backoff);
                tracing::warn!(%identity, error = %e, retry_in = ?wait, "cannot obtain a certificate; keeping the current one");
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = tx.closed() => return,
        }
    }
}

/// One round: a new key, a CSR, the signer's answer, configs around them.
async fn issue(identity: &Identity, signer: &dyn Signer, serial: u64) -> Result<Current> {
    let key = EcKey::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(identity.to_string())
        .map_err(|e| Error::Crypto(format!("the SPIFFE ID {identity} is not IA5: {e}")))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| Error::Crypto(format!("cannot build a CSR for {identity}: {e}")))?;
    let signed = signer.sign(identity, csr.der().to_vec()).await?;
    build_current(identity, key, signed, serial)
}

fn build_current(identity: &Identity, key: EcKey, signed: Signed, serial: u64) -> Result<Current> {
    let leaf = signed.chain.first().ok_or_else(|| {
        Error::BadSigned(format!("the signer returned no certificate for {identity}"))
    })?;
    let named = spiffe_id_of(leaf)?;
    if &named != identity {
        return Err(Error::BadSigned(format!(
            "asked for {identity}, the signer returned a certificate for {named}"
        )));
    }
    let not_after = not_after_of(leaf)?;
    let mut roots = RootCertStore::empty();
    for root in &signed.trust_bundle {
        roots
            .add(root.clone())
            .map_err(|e| Error::BadSigned(format!("a trust bundle root is unusable: {e}")))?;
    }
    let roots = Arc::new(roots);
    let provider = provider();
    let certified = Arc::new(CertifiedKey::new(signed.chain, key.rustls_key()));
    drop(key);
    let resolver = Arc::new(Resolver(certified));
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| Error::BadSigned(format!("cannot build the client verifier: {e}")))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Crypto(e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(resolver.clone());
    server.alpn_protocols = vec![ALPN_H2.to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Crypto(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(roots, provider)))
        .with_client_cert_resolver(resolver);
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Current {
        server: Arc::new(server),
        client: Arc::new(client),
        not_after,
        serial,
    })
}

/// The one crypto provider: aws-lc-rs, TLS 1.3 suites only, AES-128-GCM preferred (as strong
/// as the mesh needs, and the cheapest per byte with AES-NI; the tunnel is bulk-bound).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// Kept rather than `time`'s `SystemTime::from`: a notAfter before 1970 is the signer's error,
/// reported as one, not a certificate to renew at once.
fn not_after_of(cert: &CertificateDer<'_>) -> Result<SystemTime> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| Error::BadSigned(format!("the certificate cannot be parsed ({e})")))?;
    let secs = x509.validity().not_after.timestamp();
    let secs = u64::try_from(secs)
        .map_err(|_| Error::BadSigned(format!("notAfter {secs} is before 1970")))?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Always presents one certificate (the store's), to servers and clients alike.
struct Resolver(Arc<CertifiedKey>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver([redacted])")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::test_util::{FakeCa, identity};
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One mTLS handshake over a duplex pipe: the client (as `client`) dials the server (as
    /// `server`) naming `expected`. Returns the client identity the server saw, or the errors.
    async fn handshake(
        client: &Current,
        server: &Current,
        expected: &Identity,
    ) -> std::result::Result<Identity, String> {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from(crate::sni::encode(expected).unwrap()).unwrap();
        let connector = tokio_rustls::TlsConnector::from(client.client_config());
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        let server_side = async move {
            let mut tls = acceptor
                .accept(s)
                .await
                .map_err(|e| format!("server: {e}"))?;
            let peer = crate::verify::peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            tls.write_all(&buf).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer)
        };
        let client_side = async move {
            let mut tls = connector
                .connect(name, c)
                .await
                .map_err(|e| format!("client: {e}"))?;
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"ping");
            Ok::<_, String>(())
        };
        let (s, c) = tokio::join!(server_side, client_side);
        match (s, c) {
            (Ok(peer), Ok(())) => Ok(peer),
            (s, c) => Err(format!(
                "{} / {}",
                s.err().unwrap_or_default(),
                c.err().unwrap_or_default()
            )),
        }
    }

    #[tokio::test]
    async fn right_identity_is_accepted_and_the_client_is_known() {
        let ca = FakeCa::new("cluster.local", Duration::from_secs(3600));
        let (web, db) = (identity("shop", "web"), identity("shop", "db"));
        let (ws, ds) = (ca.store(&web), ca.store(&db));
        let (w, d) = (ws.ready().await.unwrap(), ds.ready().await.unwrap());
        assert_eq!(handshake(&w, &d, &db).await.unwrap(), web);
    }

    #[tokio::test]
    async fn wrong_spiffe_id_is_refused() {
        let ca = FakeCa::new("cluster.local", Duration::from_secs(3600));
        let (web, db, pay) = (
            identity("shop", "web"),
            identity("shop", "db"),
            identity("shop", "pay"),
        );
        let w = ca.store(&web).ready().await.unwrap();
        let d = ca.store(&db).ready().await.unwrap();
        // The client wants `pay`, the server is `db`.
        let err = handshake(&w, &d, &pay).await.unwrap_err();
        assert!(err.contains("WrongPeer"), "{err}");
        assert!(
            err.contains("expected: \"spiffe://cluster.local/ns/shop/sa/pay\""),
            "{err}"
        );
        assert!(
            err.contains("presented: \"spiffe://cluster.local/ns/shop/sa/db\""),
            "{err}"
        );
    }

    struct Mixed {
        cert_from: Arc<FakeCa>,
        bundle_from: Arc<FakeCa>,
    }

    impl Signer for Mixed {
        fn sign<'a>(&'a self, id: &'a Identity, csr: Vec<u8>) -> BoxFuture<'a, Result<Signed>> {
            Box::pin(async move {
                let mut signed = self.cert_from.ca().sign(id, &csr)?;
                signed.trust_bundle = vec![self.bundle_from.ca().root().clone()];
                Ok(signed)
            })
        }
    }

    #[tokio::test]
    async fn another_cas_certificate_is_refused_both_ways() {
        let ours = FakeCa::new("cluster.local", Duration::from_secs(3600));
        let theirs = FakeCa::new("cluster.local", Duration::from_secs(3600));
        let (web, db) = (identity("shop", "web"), identity("shop", "db"));
        let good_client = ours.store(&web).ready().await.unwrap();
        let good_server = ours.store(&db).ready().await.unwrap();
        // A client whose certificate comes from the other CA but which trusts ours.
        let rogue_client = CertStore::spawn(
            web.clone(),
            Arc::new(Mixed {
                cert_from: theirs.clone(),
                bundle_from: ours.clone(),
            }),
            RotationOptions::default(),
        )
        .ready()
        .await
        .unwrap();
        let rogue_server = theirs.store(&db).ready().await.unwrap();
        // Both CAs have the same name, so webpki finds the issuer by name and then the
        // signature does not verify; a CA of another name gives UnknownIssuer.
        let refused = |e: &str| e.contains("BadSignature") || e.contains("UnknownIssuer");
        let err = handshake(&rogue_client, &good_server, &db)
            .await
            .unwrap_err();
        assert!(
            refused(&err) && err.contains("server: invalid peer certificate"),
            "{err}"
        );
        let err = handshake(&good_client, &rogue_server, &db)
            .await
            .unwrap_err();
        assert!(
            refused(&err) && err.contains("client: invalid peer certificate"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn debug_output_carries_no_key_material() {
        let ca = FakeCa::new("cluster.local", Duration::from_secs(3600));
        let store = ca.store(&identity("shop", "web"));
        let current = store.ready().await.unwrap();
        for text in [
            format!("{store:?}"),
            format!("{current:?}"),
            format!("{:?}", ca.ca()),
        ] {
            assert!(text.contains("redacted"), "{text}");
            assert!(!text.contains("PRIVATE KEY"), "{text}");
            assert!(!text.contains("EcdsaKeyPair"), "{text}");
        }
    }

    #[tokio::test]
    async fn rotates_at_half_life_and_keeps_the_old_cert_while_the_signer_fails() {
        let ca = FakeCa::new("cluster.local", Duration::from_secs(2));
        let web = identity("shop", "web");
        let store = ca.store(&web);
        let first = store.ready().await.unwrap();
        let mut rx = store.subscribe();
        // A second certificate arrives after about half the lifetime.
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|c| c.as_ref().is_some_and(|c| c.generation() > 1)),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(store.current().unwrap().not_after() >= first.not_after());
        // While the CA fails, the last certificate stays in place.
        ca.set_failing(true);
        let before = store.current().unwrap().generation();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(store.current().unwrap().generation(), before);
        ca.set_failing(false);
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|c| c.as_ref().is_some_and(|c| c.generation() > before)),
        )
        .await
        .unwrap()
        .unwrap();
    }

    /// backon documents its jitter as adding "a random jitter within `(0, current_delay)` to
    /// the current delay", where the current delay is `min(min × 2ⁿ, max)`: so the n-th wait
    /// lies in `[step, 2 × step]` (closed: the ends are a matter of float rounding).
    fn within_jitter(wait: Duration, step: Duration) -> bool {
        step <= wait && wait <= step * 2
    }

    #[test]
    fn retry_delays_grow_are_capped_and_jittered() {
        let opts = RotationOptions {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1600),
        };
        let waits: Vec<Duration> = opts.retry_delays().take(40).collect();
        assert_eq!(waits.len(), 40, "the sequence must not end");
        for (n, &wait) in waits.iter().enumerate() {
            // 100, 200, 400, 800, then 1600 ms from the fifth failure on.
            let step = (opts.initial_backoff * 2u32.pow(n.min(4) as u32)).min(opts.max_backoff);
            assert!(
                within_jitter(wait, step),
                "wait {n} is {wait:?}, step {step:?}"
            );
            assert!(wait >= opts.initial_backoff && wait <= opts.max_backoff * 2);
        }
        // Growing: by the fifth failure in a row the wait is at least four times the first...
        assert!(waits[4] >= waits[0] * 4, "{waits:?}");
        // ...jittered even at the cap, so a failing fleet spreads out...
        let capped = &waits[4..];
        assert!(capped.iter().any(|w| w != &capped[0]), "{capped:?}");
        // ...and two stores' sequences differ.
        let other: Vec<Duration> = opts.retry_delays().take(40).collect();
        assert_ne!(waits, other);
    }

    /// A signer that fails or succeeds as scripted (then fails), reporting when it is asked.
    struct Scripted {
        ca: crate::ca::Ca,
        outcomes: std::sync::Mutex<std::collections::VecDeque<bool>>,
        asked: tokio::sync::mpsc::UnboundedSender<tokio::time::Instant>,
    }

    impl Signer for Scripted {
        fn sign<'a>(&'a self, id: &'a Identity, csr: Vec<u8>) -> BoxFuture<'a, Result<Signed>> {
            Box::pin(async move {
                let _ = self.asked.send(tokio::time::Instant::now());
                let ok = self.outcomes.lock().unwrap().pop_front().unwrap_or(false);
                if !ok {
                    return Err(Error::Ca("scripted failure".into()));
                }
                self.ca.sign(id, &csr)
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_worker_backs_off_and_starts_over_after_a_success() {
        let (asked, mut calls) = tokio::sync::mpsc::unbounded_channel();
        let signer = Arc::new(Scripted {
            ca: crate::ca::Ca::generate("cluster.local").unwrap(),
            outcomes: std::sync::Mutex::new([false, false, false, true].into()),
            asked,
        });
        let opts = RotationOptions {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1000),
        };
        let store = CertStore::spawn(identity("shop", "web"), signer, opts);
        // Paused time: each gap between two requests is exactly the worker's sleep.
        let mut at = Vec::new();
        for _ in 0..6 {
            at.push(calls.recv().await.unwrap());
        }
        let gap = |i: usize| at[i + 1] - at[i];
        let s = Duration::from_secs;
        assert!(within_jitter(gap(0), s(1)), "{:?}", gap(0));
        assert!(within_jitter(gap(1), s(2)), "{:?}", gap(1));
        assert!(within_jitter(gap(2), s(4)), "{:?}", gap(2));
        // The fourth request succeeded: the next is the renewal at half life (a day's
        // certificate), and the failure after it waits the first step again.
        assert_eq!(store.current().unwrap().generation(), 1);
        assert!(gap(3) >= s(11 * 3600), "{:?}", gap(3));
        assert!(within_jitter(gap(4), s(1)), "{:?}", gap(4));
    }
}
