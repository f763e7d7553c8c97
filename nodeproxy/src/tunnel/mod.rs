//! The mesh tunnel (port 15008): mTLS between nodes, one HTTP/2 CONNECT stream per proxied
//! connection, HBONE-style (`:authority` = the destination pod's address).
//!
//! Owns the per-tenant TLS state ([`TenantTls`]: the tenant's [`CertStore`] and its client
//! connection pool), the standalone [`LocalCaSigner`] (an embedded CA behind node
//! authorization), and the two halves: [`client`] (outbound: a pooled connection from *this
//! tenant's* identity to the peer node) and [`server`] (inbound: terminate mTLS with the
//! destination tenant's certificate, verify the client identity, connect to the local pod),
//! which move bytes through one copy loop (`copy`). HTTP/2 is the `h2` crate used directly:
//! DATA payloads pass between h2 and the pod sockets as `Bytes`, without a copy (hyper's
//! CONNECT upgrade copied every buffer once more each way). Every task of a connection, its
//! own included, runs on the tenant's pool thread (`spawn_local`).
//! With a remote control plane the stores' CSRs go to its `Identity.Certify`
//! ([`signer::GrpcSigner`]) instead.
//!
//! **Where keys live.** A tenant's `CertStore` is created on the tenant's own pool thread, on
//! first use, and kept in a thread-local of that thread. No map of stores exists that other
//! pools' code could reach: a job running for tenant A on A's thread cannot name B's store.
//! The store itself never exposes key bytes (see `certs`).
//!
//! **Server name.** The client sends `certs::sni::encode(destination identity)` (base32 of the
//! SPIFFE ID + `.id.nodeproxy`); the server's accept loop peeks at the ClientHello to pick the
//! destination tenant's pool, and the client's verifier checks the server's URI SAN against it.
//!
//! Must not touch: the snapshot beyond reading it, other tenants' state, the kernel's rules.

pub mod client;
mod copy;
pub mod server;
pub mod signer;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use certs::store::BoxFuture;
use certs::{Ca, CertStore, Identity, RotationOptions, Signed, Signer};

use crate::metrics;
use crate::outcome::{self, Outcome};
use crate::state::Snapshot;

/// The port every node's tunnel listens on (peers are dialled there).
pub const TUNNEL_PORT: u16 = 15008;
/// How long a handshake (TLS + HTTP/2) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection waits for the tenant's first certificate.
pub const CERT_WAIT: Duration = Duration::from_secs(10);
/// Streams per pooled tunnel connection; past it, a new connection is opened.
pub const MAX_STREAMS_PER_CONN: usize = 100;
/// HTTP/2 flow-control windows: fixed and large, so one bulk stream is never window-bound on a
/// fast link (HTTP/2's 64 KiB default stalls it; the BDP estimator ramps up too slowly).
const STREAM_WINDOW: u32 = 8 << 20;
/// Connection-level window (shared by all streams of a connection).
const CONN_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame we accept. A received frame pins a buffer of h2's reader for as long
/// as the copy loop holds it, so h2 reads the next one into a new buffer of about a frame's
/// size. With 256 KiB frames the allocator kept trimming and re-faulting those pages (page
/// faults were a tenth of the receiving daemon's CPU); 64 KiB (what hyper's CONNECT upgrade
/// sent, in 64 KiB writes) does not.
const MAX_FRAME: u32 = 64 << 10;
/// Per-stream send buffer of HTTP/2: at most this much of a stream's data waits in h2 for the
/// peer's window or the socket, so it bounds the memory of a stream whose peer is slow.
const SEND_BUF: usize = 4 << 20;
/// Largest header block we accept (a CONNECT head is a few dozen bytes; hyper's default).
const MAX_HEADER_LIST: u32 = 16 << 10;
/// Streams reset by our side for protocol errors before the connection is closed (hyper's
/// default, against peers that provoke resets to burn our CPU).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// What the tunnel's halves need from the daemon; cheap to clone, `Send`.
#[derive(Clone)]
pub struct Mesh {
    /// Signs the tenants' CSRs.
    pub signer: Arc<dyn Signer>,
    /// Rotation timing of the stores.
    pub rotation: RotationOptions,
    /// The current node snapshot.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("rotation", &self.rotation)
            .finish_non_exhaustive()
    }
}

/// One tenant's TLS state on its pool thread: its store and its client connections.
#[derive(Debug)]
pub struct TenantTls {
    /// The tenant's certificate store.
    pub store: CertStore,
    /// Pooled tunnel connections from this tenant.
    pub conns: RefCell<client::ConnPool>,
}

thread_local! {
    /// The TLS state of the tenant(s) whose pool runs on this thread. With isolation on this
    /// holds one tenant; with isolation off (one shared thread) one entry per tenant.
    static TENANTS: RefCell<HashMap<Identity, Rc<TenantTls>>> = RefCell::new(HashMap::new());
}

/// The TLS state of `tenant` on this (its pool's) thread, created on first use (the tenant's
/// first tunnelled connection, either way): the store is spawned here and fetches its first
/// certificate at once. Not warmed up earlier, so that a tenant that never uses the tunnel
/// never holds a key.
pub fn tenant_tls(tenant: &Identity, mesh: &Mesh) -> Rc<TenantTls> {
    TENANTS.with(|t| {
        t.borrow_mut()
            .entry(tenant.clone())
            .or_insert_with(|| {
                let store = CertStore::spawn(tenant.clone(), mesh.signer.clone(), mesh.rotation);
                watch_expiry(tenant, &store);
                Rc::new(TenantTls {
                    store,
                    conns: RefCell::new(client::ConnPool::default()),
                })
            })
            .clone()
    })
}

/// Publishes the expiry of the tenant's current certificate as a metric.
fn watch_expiry(tenant: &Identity, store: &CertStore) {
    let mut rx = store.subscribe();
    let gauge =
        ::metrics::gauge!(metrics::CERT_EXPIRY_TIMESTAMP_SECONDS, "tenant" => tenant.to_string());
    tokio::task::spawn_local(async move {
        loop {
            let not_after = rx.borrow_and_update().as_ref().map(|c| c.not_after());
            if let Some(t) = not_after {
                let secs = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                gauge.set(secs);
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The current TLS material of a tenant, waiting (bounded) for its first certificate.
pub async fn current(tls: &TenantTls) -> Result<Arc<certs::Current>, TunnelError> {
    if let Some(c) = tls.store.current() {
        return Ok(c);
    }
    match tokio::time::timeout(CERT_WAIT, tls.store.ready()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(TunnelError::NoCertificate(e.to_string())),
        Err(_) => Err(TunnelError::NoCertificate(format!(
            "no certificate for {} after {CERT_WAIT:?}; is the CA reachable and the pod on this node?",
            tls.store.identity()
        ))),
    }
}

/// How much is read from a tunnel socket at once.
const READ_BUF: usize = 256 << 10;

/// The tunnel socket under TLS, read through a large buffer: rustls asks for 4 KiB per read,
/// which would cost four `read` syscalls per TLS record; with the buffer one syscall fetches
/// many records. Writes pass straight through (rustls already writes records in batches).
pub(crate) fn buffered(tcp: tokio::net::TcpStream) -> tokio::io::BufReader<tokio::net::TcpStream> {
    tokio::io::BufReader::with_capacity(READ_BUF, tcp)
}

/// Errors of the tunnel's client half. Each names its [`Outcome`] (which says who is to
/// blame and whether a retry is safe), decided where the error is made.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The tenant has no certificate yet (the CA or control plane; a retry may help).
    #[error("no certificate: {0}")]
    NoCertificate(String),
    /// The peer node could not be reached.
    #[error("cannot reach tunnel peer {peer}: {source}")]
    Connect {
        /// The peer node's tunnel address.
        peer: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS or HTTP/2 handshake with the peer node failed.
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer.
        peer: SocketAddr,
        /// How it failed (one of the tunnel handshake's outcomes).
        outcome: Outcome,
        /// Why.
        reason: String,
    },
    /// The peer did not accept the CONNECT stream (HTTP/2 failed, or it answered another
    /// status than 200).
    #[error("tunnel to {peer} for {target}: {reason}")]
    Refused {
        /// The peer node.
        peer: SocketAddr,
        /// The destination pod.
        target: SocketAddr,
        /// How it failed.
        outcome: Outcome,
        /// Why.
        reason: String,
    },
    /// The destination identity cannot be named in SNI.
    #[error(transparent)]
    Name(#[from] certs::Error),
}

impl TunnelError {
    /// How the connection that met this error ends.
    pub fn outcome(&self) -> Outcome {
        match self {
            TunnelError::NoCertificate(_) => Outcome::NoCertificate,
            TunnelError::Connect { source, .. } => outcome::connect(source),
            TunnelError::Handshake { outcome, .. } | TunnelError::Refused { outcome, .. } => {
                *outcome
            }
            TunnelError::Name(_) => Outcome::Internal,
        }
    }
}

/// Standalone mode's signer: an embedded CA that signs only identities with a pod on this
/// node (node authorization, as the control plane's `Identity.Certify` does).
pub struct LocalCaSigner {
    ca: Ca,
    node: String,
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl std::fmt::Debug for LocalCaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCaSigner")
            .field("ca", &self.ca)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl LocalCaSigner {
    /// A signer for `node` using `ca`, authorizing against the current snapshot.
    pub fn new(ca: Ca, node: String, snapshot: Arc<ArcSwap<Snapshot>>) -> Self {
        Self { ca, node, snapshot }
    }
}

impl Signer for LocalCaSigner {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: Vec<u8>,
    ) -> BoxFuture<'a, certs::Result<Signed>> {
        Box::pin(async move {
            if !self.snapshot.load().tenants().contains(identity) {
                tracing::warn!(node = %self.node, %identity, "refusing to sign: no pod of this identity on the node");
                return Err(certs::Error::CsrRefused {
                    identity: identity.to_string(),
                    reason: format!("node {} has no pod with this identity", self.node),
                });
            }
            self.ca.sign(identity, &csr)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use controlplane::view::NodeView;

    const VIEW: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodeproxy.io/mesh: enabled}}\n\
        ---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop}\n\
        spec: {serviceAccountName: web, nodeName: n1, containers: [{name: c, image: i}]}\n\
        status: {phase: Running, podIP: 10.0.0.2}\n\
        ---\napiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: shop}\n\
        spec: {serviceAccountName: db, nodeName: n2, containers: [{name: c, image: i}]}\n\
        status: {phase: Running, podIP: 10.0.1.2}\n";

    #[test]
    fn tunnel_errors_name_their_outcome() {
        let peer: SocketAddr = "192.168.0.2:15008".parse().unwrap();
        let target: SocketAddr = "10.0.1.2:80".parse().unwrap();
        let io = |kind| std::io::Error::from(kind);
        let cases = [
            (
                TunnelError::NoCertificate("no CA".into()),
                Outcome::NoCertificate,
            ),
            (
                TunnelError::Connect {
                    peer,
                    source: io(std::io::ErrorKind::ConnectionRefused),
                },
                Outcome::UpstreamConnect,
            ),
            (
                TunnelError::Connect {
                    peer,
                    source: io(std::io::ErrorKind::AddrNotAvailable),
                },
                Outcome::Internal,
            ),
            (
                TunnelError::Handshake {
                    peer,
                    outcome: Outcome::UpstreamTlsCertificate,
                    reason: "unknown issuer".into(),
                },
                Outcome::UpstreamTlsCertificate,
            ),
            (
                TunnelError::Refused {
                    peer,
                    target,
                    outcome: Outcome::ConnectForbidden,
                    reason: "403".into(),
                },
                Outcome::ConnectForbidden,
            ),
            (
                TunnelError::Name(certs::Error::BadPeerCert("x".into())),
                Outcome::Internal,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.outcome(), want, "{e}");
        }
    }

    /// What the server half answers a refused CONNECT with, the client half reads back as the
    /// same outcome (blame included), so both nodes' metrics tell the same story.
    #[test]
    fn a_refused_connect_means_the_same_on_both_nodes() {
        use server::Refusal;
        let target: SocketAddr = "10.0.0.3:5432".parse().unwrap();
        let not_ours = Refusal::NotOurs {
            target,
            owner: None,
        };
        assert_eq!(not_ours.outcome(), Outcome::ConnectForbidden);
        assert_eq!(
            client::connect_status(not_ours.status()),
            not_ours.outcome()
        );
        // A request the peer finds malformed is its refusal, not the client's fault.
        for bad in [Refusal::Method, Refusal::Authority] {
            assert_eq!(bad.outcome(), Outcome::BadConnect);
            assert_eq!(client::connect_status(bad.status()), Outcome::TunnelRefused);
        }
        let shed = client::connect_status(server::SHED);
        assert_eq!(shed, Outcome::UpstreamTenantLimit);
        assert_eq!(shed.blame(), outcome::Blame::Tenant);
        for pod in [server::POD_REFUSED, server::POD_TIMEOUT] {
            assert_eq!(client::connect_status(pod), Outcome::UpstreamConnect);
        }
        assert_eq!(
            client::connect_status(http::StatusCode::INTERNAL_SERVER_ERROR),
            Outcome::TunnelRefused
        );
    }

    #[tokio::test]
    async fn the_standalone_signer_signs_only_identities_of_local_pods() {
        let objects = controlplane::FileSource::parse_str("test", VIEW).unwrap();
        let view = NodeView::build(&objects, "n1", "cluster.local").unwrap();
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::new(view, 1)));
        let signer = LocalCaSigner::new(
            Ca::generate("cluster.local").unwrap(),
            "n1".into(),
            snapshot,
        );
        let web: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let db: Identity = "spiffe://cluster.local/ns/shop/sa/db".parse().unwrap();
        let csr = |id: &Identity| {
            certs::ca::csr_from_pem(&certs::test_util::csr_pem(&id.to_string())).unwrap()
        };
        assert!(signer.sign(&web, csr(&web)).await.is_ok());
        let err = signer.sign(&db, csr(&db)).await.unwrap_err().to_string();
        assert!(
            err.contains("node n1 has no pod with this identity"),
            "{err}"
        );
        assert!(
            err.contains("spiffe://cluster.local/ns/shop/sa/db"),
            "{err}"
        );
    }
}
