//! How connections end: one closed vocabulary of outcomes, each with who is to blame.
//!
//! Owns [`Outcome`] (every way a connection, a tunnel stream or an attempt at one can end or be
//! refused; its label value is the `error`/`reason` label of every metric), [`Blame`] (which
//! party to look at), [`Side`] (which end of a connection an error came from), the mappings
//! from the error types of the data path (I/O errors by kind, TLS errors and alerts, HTTP/2
//! errors, tenant limits) to outcomes, and [`ConnectionResult`], the one record per admitted
//! connection that the close metric is written from (and the access log will be), so the two
//! can never disagree. `docs/operations.md` carries the same table with what an operator should
//! look at for each outcome; a test keeps the two equal.
//!
//! Must not touch: sockets, metric names (see [`crate::metrics`]), error strings as labels.

use std::io;

use certs::Identity;

/// Who is to blame for an outcome: which party an operator should look at first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blame {
    /// Nobody: the connection ended cleanly.
    Nobody,
    /// The side that opened the connection: the local pod outbound, the peer node (and the pod
    /// behind it) inbound.
    Downstream,
    /// The side we connect to: the destination pod, or the peer node's tunnel.
    Upstream,
    /// A tenant's own limits (`TenantPolicy`) shed it: the tenant's load, or its limits.
    Tenant,
    /// The mesh's rules refused it by design: an identity was unknown, or a path would have
    /// broken isolation or encryption. Look at the node view and the workloads' identities.
    Policy,
    /// nodeproxy itself or its environment (certificates, file descriptors, a closing pool).
    Internal,
}

impl Blame {
    /// Every blame, in declaration order.
    pub const ALL: &'static [Blame] = &[
        Blame::Nobody,
        Blame::Downstream,
        Blame::Upstream,
        Blame::Tenant,
        Blame::Policy,
        Blame::Internal,
    ];

    /// The `blame` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Blame::Nobody => "none",
            Blame::Downstream => "downstream",
            Blame::Upstream => "upstream",
            Blame::Tenant => "tenant",
            Blame::Policy => "policy",
            Blame::Internal => "internal",
        }
    }
}

/// Declares [`Outcome`] from one table: variant, label, blame, whether a retry is safe.
macro_rules! outcomes {
    ($($(#[$doc:meta])* $variant:ident => $label:literal, $blame:ident, retry: $retry:literal;)+) => {
        /// How a connection, a tunnel stream, or an attempt at one ended. A closed set: its
        /// label is the only value the `error` and `reason` labels of nodeproxy's metrics take.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Outcome {
            $($(#[$doc])* $variant,)+
        }

        impl Outcome {
            /// Every outcome, in declaration order.
            pub const ALL: &'static [Outcome] = &[$(Outcome::$variant),+];

            /// The label value (snake_case, bounded, unique).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Outcome::$variant => $label,)+
                }
            }

            /// Who is to blame.
            pub const fn blame(self) -> Blame {
                match self {
                    $(Outcome::$variant => Blame::$blame,)+
                }
            }

            /// Whether the same request may be sent again, to this or another endpoint: it
            /// failed on the way to the upstream, before any of its bytes reached the
            /// application there. For the L7 layer's retries.
            pub const fn retry_safe(self) -> bool {
                match self {
                    $(Outcome::$variant => $retry,)+
                }
            }
        }
    };
}

outcomes! {
    /// Both sides closed cleanly.
    Clean => "none", Nobody, retry: false;

    // Refused before the connection reached a tenant (outbound accept).
    /// The source address is not a local meshed pod; no identity is guessed.
    UnknownSource => "unknown_source", Policy, retry: false;
    /// The kernel knows no original destination: something connected to 15001 directly.
    NotRedirected => "not_redirected", Downstream, retry: false;
    /// The original destination is one of our own listeners.
    Loop => "loop", Downstream, retry: false;
    /// A meshed pod on another node whose node address the view does not know: refused rather
    /// than sent in the clear.
    NoTunnelPeer => "no_tunnel_peer", Policy, retry: false;
    /// The tenant's pool is closed (its last pod just left), or the socket could not be handed
    /// to it.
    PoolClosed => "pool_closed", Internal, retry: false;

    // A tenant's own limits (`tenancy::Rejection`).
    /// The tenant is at its open-connection limit.
    TenantConnections => "connections", Tenant, retry: false;
    /// The tenant is over its new-connection rate.
    TenantRate => "rate", Tenant, retry: false;
    /// The tenant is at its buffer memory limit.
    TenantBuffers => "buffers", Tenant, retry: false;

    // Refused by the tunnel's accept loop (15008), from the ClientHello.
    /// No ClientHello arrived in time.
    HelloTimeout => "hello_timeout", Downstream, retry: false;
    /// Not a TLS ClientHello with a server name (closed early, not TLS, too large, no SNI).
    BadClientHello => "bad_client_hello", Downstream, retry: false;
    /// The server name names no identity.
    UnknownServerName => "unknown_server_name", Downstream, retry: false;
    /// The server name names an identity with no pod on this node.
    NotLocalTenant => "not_local_tenant", Downstream, retry: false;

    // CONNECT streams.
    /// The peer sent a request that is not a CONNECT to an `ip:port`.
    BadConnect => "bad_connect", Downstream, retry: false;
    /// The CONNECT's target is not a local pod of the identity the client asked for (answered,
    /// or received, as 403).
    ConnectForbidden => "connect_forbidden", Policy, retry: false;
    /// The peer node shed the stream: the destination tenant is at one of its own limits
    /// (received as 503).
    UpstreamTenantLimit => "upstream_tenant_limit", Tenant, retry: true;
    /// The peer node refused the CONNECT stream for another reason, or HTTP/2 failed before it
    /// was answered.
    TunnelRefused => "tunnel_refused", Upstream, retry: true;

    // Connecting and relaying.
    /// The destination could not be reached: connection refused, unreachable, timed out (the
    /// peer node's tunnel, or the pod; a peer node's 502/504 too).
    UpstreamConnect => "upstream_connect", Upstream, retry: true;
    /// The upstream reset or failed mid-stream.
    UpstreamReset => "upstream_reset", Upstream, retry: false;
    /// The downstream reset or failed mid-stream.
    DownstreamReset => "downstream_reset", Downstream, retry: false;

    // The tunnel's TLS (and HTTP/2) handshake, as the client (upstream: the peer node).
    /// The tenant has no certificate yet: the CA or the control plane is not answering.
    NoCertificate => "no_certificate", Internal, retry: true;
    /// The handshake with the peer node failed otherwise (protocol error, HTTP/2 handshake).
    TlsHandshake => "tls_handshake", Upstream, retry: true;
    /// The peer node's certificate was not accepted (unknown CA, expired, not the destination
    /// identity).
    UpstreamTlsCertificate => "upstream_tls_certificate", Upstream, retry: true;
    /// The peer node refused our certificate (a certificate alert).
    UpstreamTlsRefused => "upstream_tls_refused", Upstream, retry: true;
    /// The handshake with the peer node did not finish in time.
    UpstreamTlsTimeout => "upstream_tls_timeout", Upstream, retry: true;

    // The tunnel's handshake, as the server (downstream: the peer node).
    /// The client's handshake failed otherwise (protocol error, HTTP/2 handshake).
    DownstreamTlsHandshake => "downstream_tls_handshake", Downstream, retry: false;
    /// The client sent no certificate, or one that was not accepted (unknown CA, expired, no
    /// usable SPIFFE identity).
    DownstreamTlsCertificate => "downstream_tls_certificate", Downstream, retry: false;
    /// The client refused our certificate (a certificate alert).
    DownstreamTlsRefused => "downstream_tls_refused", Downstream, retry: false;
    /// The client's handshake did not finish in time.
    DownstreamTlsTimeout => "downstream_tls_timeout", Downstream, retry: false;

    /// nodeproxy failed: a socket could not join the pool's runtime, a resource ran out, a
    /// panic (a connection whose result was never recorded counts as this).
    Internal => "internal", Internal, retry: false;
}

impl From<tenancy::Rejection> for Outcome {
    fn from(r: tenancy::Rejection) -> Self {
        match r {
            tenancy::Rejection::Connections => Outcome::TenantConnections,
            tenancy::Rejection::Rate => Outcome::TenantRate,
            tenancy::Rejection::Buffers => Outcome::TenantBuffers,
        }
    }
}

/// Which end of a connection something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The side that opened the connection.
    Downstream,
    /// The side we connected to.
    Upstream,
}

impl Side {
    /// The other end.
    pub const fn other(self) -> Side {
        match self {
            Side::Downstream => Side::Upstream,
            Side::Upstream => Side::Downstream,
        }
    }

    /// This side reset or failed mid-stream.
    pub const fn reset(self) -> Outcome {
        self.pick(Outcome::DownstreamReset, Outcome::UpstreamReset)
    }

    const fn pick(self, downstream: Outcome, upstream: Outcome) -> Outcome {
        match self {
            Side::Downstream => downstream,
            Side::Upstream => upstream,
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
        })
    }
}

/// An I/O error and the end of the connection whose socket it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{side} socket: {source}")]
pub struct IoFault {
    /// Whose socket failed.
    pub side: Side,
    /// The error.
    #[source]
    pub source: io::Error,
}

impl IoFault {
    /// Tags an error with `side` (for `map_err`).
    pub fn new(side: Side) -> impl Fn(io::Error) -> IoFault + Copy {
        move |source| IoFault { side, source }
    }

    /// The outcome this fault ends the connection with.
    pub fn outcome(&self) -> Outcome {
        io(self.side, &self.source)
    }
}

/// The outcome of an I/O error on `side`'s socket of an established connection. A TLS error
/// inside it is classified as one ([`tls`]). Kinds that mean the peer or the path to it went
/// away are that side's reset (and so is a TLS record the peer corrupted); anything else
/// (resources running out, invalid arguments) is ours.
pub fn io(side: Side, e: &io::Error) -> Outcome {
    io_or(side, e, side.reset())
}

/// The outcome of an I/O error during the tunnel's handshake (TLS, then HTTP/2) with `side`:
/// as [`io`], except that the peer going away fails the handshake rather than resetting a
/// connection.
pub fn handshake(side: Side, e: &io::Error) -> Outcome {
    io_or(side, e, handshake_failed(side))
}

/// `side`'s failed tunnel handshake.
const fn handshake_failed(side: Side) -> Outcome {
    side.pick(Outcome::DownstreamTlsHandshake, Outcome::TlsHandshake)
}

/// The TLS error inside `e`, else `gone` when the peer went away, else internal.
fn io_or(side: Side, e: &io::Error, gone: Outcome) -> Outcome {
    if let Some(outcome) = inner_tls(side, e) {
        return outcome;
    }
    if peer_gone(e.kind()) || e.kind() == io::ErrorKind::InvalidData {
        gone
    } else {
        Outcome::Internal
    }
}

/// The outcome of the TLS error inside an I/O error, if there is one. tokio-rustls wraps the
/// [`rustls::Error`] itself; h2 keeps only the kind (`InvalidData`) and the text of its
/// transport's errors, so a certificate alert is also recognized by rustls's own text for it
/// (in TLS 1.3 the peer's refusal of our certificate arrives after our handshake, through h2).
fn inner_tls(side: Side, e: &io::Error) -> Option<Outcome> {
    if let Some(tls_error) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return Some(tls(side, tls_error));
    }
    if e.kind() != io::ErrorKind::InvalidData {
        return None;
    }
    let text = e.to_string();
    CERTIFICATE_ALERTS
        .iter()
        .any(|a| rustls::Error::AlertReceived(*a).to_string() == text)
        .then_some(side.pick(Outcome::DownstreamTlsRefused, Outcome::UpstreamTlsRefused))
}

/// Whether an error of this kind means the peer, or the path to it, went away.
fn peer_gone(kind: io::ErrorKind) -> bool {
    use io::ErrorKind as K;
    matches!(
        kind,
        K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::UnexpectedEof
            | K::NotConnected
            | K::TimedOut
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::NetworkDown
    )
}

/// The outcome of a failed connect to an upstream. Refusals, unreachable routes and time-outs
/// are the upstream's; running out of local ports or descriptors is ours.
pub fn connect(e: &io::Error) -> Outcome {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::TimedOut
        | K::HostUnreachable
        | K::NetworkUnreachable
        | K::NetworkDown => Outcome::UpstreamConnect,
        _ => Outcome::Internal,
    }
}

/// The outcome of a TLS error in a handshake with `side` (the peer). Its certificate not
/// accepted, its refusal of ours (a certificate alert) and other failures are told apart;
/// errors of our own making (no clock, no randomness, bad keys) are internal.
pub fn tls(side: Side, e: &rustls::Error) -> Outcome {
    use rustls::Error as E;
    let certificate = side.pick(
        Outcome::DownstreamTlsCertificate,
        Outcome::UpstreamTlsCertificate,
    );
    let refused = side.pick(Outcome::DownstreamTlsRefused, Outcome::UpstreamTlsRefused);
    match e {
        E::InvalidCertificate(_) | E::NoCertificatesPresented | E::InvalidCertRevocationList(_) => {
            certificate
        }
        E::AlertReceived(alert) if CERTIFICATE_ALERTS.contains(alert) => refused,
        E::FailedToGetCurrentTime
        | E::FailedToGetRandomBytes
        | E::EncryptError
        | E::InconsistentKeys(_)
        | E::BadMaxFragmentSize
        | E::General(_) => Outcome::Internal,
        _ => handshake_failed(side),
    }
}

/// The alerts that say their sender did not accept our certificate.
const CERTIFICATE_ALERTS: &[rustls::AlertDescription] = {
    use rustls::AlertDescription as A;
    &[
        A::BadCertificate,
        A::UnsupportedCertificate,
        A::CertificateRevoked,
        A::CertificateExpired,
        A::CertificateUnknown,
        A::UnknownCA,
        A::AccessDenied,
        A::CertificateRequired,
        A::BadCertificateStatusResponse,
        A::CertificateUnobtainable,
        A::BadCertificateHashValue,
    ]
};

/// The outcome of an HTTP/2 error on an established connection or stream to `side`: its I/O
/// error if it has one (so a TLS alert inside is found), our misuse of the library as
/// internal, and anything else (a reset, a GOAWAY, a protocol error) as that side's reset.
pub fn h2(side: Side, e: &h2::Error) -> Outcome {
    h2_or(side, e, side.reset())
}

/// The outcome of an HTTP/2 handshake with `side` that failed (after TLS): as [`handshake`]
/// for its I/O error, else that side's handshake failure.
pub fn h2_handshake(side: Side, e: &h2::Error) -> Outcome {
    h2_or(side, e, handshake_failed(side))
}

/// [`io_or`] for the I/O error inside `e`, else internal if h2 blames us, else `failed`.
fn h2_or(side: Side, e: &h2::Error, failed: Outcome) -> Outcome {
    if let Some(io_error) = e.get_io() {
        return io_or(side, io_error, failed);
    }
    if h2_misuse(e) {
        return Outcome::Internal;
    }
    failed
}

/// Whether h2 blames its user (us): an error with neither an I/O error nor an HTTP/2 reason.
fn h2_misuse(e: &h2::Error) -> bool {
    e.get_io().is_none() && e.reason().is_none()
}

/// Traffic direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a local pod to anywhere.
    Outbound,
    /// From a peer node's tunnel to a local pod.
    Inbound,
}

impl Direction {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// What happened to one admitted connection: the one record its close metric is written from
/// (see [`crate::metrics::ConnMetrics`]), and the access log will be, so they cannot disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionResult {
    /// The tenant whose connection it is (the source outbound, the destination inbound).
    pub tenant: Identity,
    /// Which way it went.
    pub direction: Direction,
    /// The other side's mesh identity, if it has one.
    pub peer: Option<Identity>,
    /// How it ended; [`Outcome::Internal`] until recorded, so a connection that ends by a
    /// panic is counted too.
    pub outcome: Outcome,
}

impl ConnectionResult {
    /// A connection of `tenant` that has not ended yet.
    pub fn new(tenant: Identity, direction: Direction, peer: Option<Identity>) -> Self {
        Self {
            tenant,
            direction,
            peer,
            outcome: Outcome::Internal,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    #[test]
    fn every_label_is_unique_snake_case_and_bounded() {
        let mut seen = HashSet::new();
        for o in Outcome::ALL {
            let l = o.as_str();
            assert!(seen.insert(l), "label {l} used twice");
            assert!((1..=32).contains(&l.len()), "label {l} is too long");
            assert!(
                l.starts_with(|c: char| c.is_ascii_lowercase())
                    && l.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    && !l.contains("__")
                    && !l.ends_with('_'),
                "label {l} is not snake_case"
            );
        }
        let blames: HashSet<_> = Blame::ALL.iter().map(|b| b.as_str()).collect();
        assert_eq!(
            blames.len(),
            Blame::ALL.len(),
            "a blame label is used twice"
        );
    }

    #[test]
    fn the_labels_metrics_and_tests_already_read_are_kept() {
        let kept = [
            (Outcome::Clean, "none"),
            (Outcome::UnknownSource, "unknown_source"),
            (Outcome::NotRedirected, "not_redirected"),
            (Outcome::Loop, "loop"),
            (Outcome::NoTunnelPeer, "no_tunnel_peer"),
            (Outcome::PoolClosed, "pool_closed"),
            (Outcome::TenantConnections, "connections"),
            (Outcome::TenantRate, "rate"),
            (Outcome::TenantBuffers, "buffers"),
            (Outcome::UpstreamConnect, "upstream_connect"),
            (Outcome::NoCertificate, "no_certificate"),
            (Outcome::TlsHandshake, "tls_handshake"),
            (Outcome::TunnelRefused, "tunnel_refused"),
            (Outcome::Internal, "internal"),
        ];
        for (o, label) in kept {
            assert_eq!(o.as_str(), label);
        }
        // The tenant limits keep tenancy's own names.
        for r in [
            tenancy::Rejection::Connections,
            tenancy::Rejection::Rate,
            tenancy::Rejection::Buffers,
        ] {
            assert_eq!(Outcome::from(r).as_str(), r.as_str());
        }
    }

    #[test]
    fn blame_table() {
        let cases = [
            (Outcome::Clean, Blame::Nobody),
            (Outcome::UnknownSource, Blame::Policy),
            (Outcome::NoTunnelPeer, Blame::Policy),
            (Outcome::ConnectForbidden, Blame::Policy),
            (Outcome::NotRedirected, Blame::Downstream),
            (Outcome::NotLocalTenant, Blame::Downstream),
            (Outcome::TenantConnections, Blame::Tenant),
            (Outcome::UpstreamTenantLimit, Blame::Tenant),
            (Outcome::UpstreamConnect, Blame::Upstream),
            (Outcome::TunnelRefused, Blame::Upstream),
            (Outcome::TlsHandshake, Blame::Upstream),
            (Outcome::NoCertificate, Blame::Internal),
            (Outcome::PoolClosed, Blame::Internal),
            (Outcome::Internal, Blame::Internal),
        ];
        for (o, want) in cases {
            assert_eq!(o.blame(), want, "{o:?}");
        }
        // A label that names a side blames that side.
        for o in Outcome::ALL {
            let l = o.as_str();
            if l.starts_with("upstream_") && *o != Outcome::UpstreamTenantLimit {
                assert_eq!(o.blame(), Blame::Upstream, "{l}");
            }
            if l.starts_with("downstream_") {
                assert_eq!(o.blame(), Blame::Downstream, "{l}");
            }
        }
        // Only "none" blames nobody, and only what never reached an upstream's application
        // may be retried.
        for o in Outcome::ALL {
            assert_eq!(o.blame() == Blame::Nobody, *o == Outcome::Clean, "{o:?}");
            if o.retry_safe() {
                assert!(
                    matches!(o.blame(), Blame::Upstream | Blame::Tenant | Blame::Internal),
                    "{o:?} is retry-safe but blames {:?}",
                    o.blame()
                );
            }
        }
        assert!(Outcome::UpstreamConnect.retry_safe());
        assert!(
            !Outcome::UpstreamReset.retry_safe(),
            "bytes may have arrived"
        );
        assert!(!Outcome::ConnectForbidden.retry_safe());
    }

    #[test]
    fn io_errors_by_kind() {
        use io::ErrorKind as K;
        let cases = [
            (
                Side::Downstream,
                K::ConnectionReset,
                Outcome::DownstreamReset,
            ),
            (Side::Upstream, K::ConnectionReset, Outcome::UpstreamReset),
            (Side::Upstream, K::BrokenPipe, Outcome::UpstreamReset),
            (Side::Downstream, K::UnexpectedEof, Outcome::DownstreamReset),
            (Side::Upstream, K::TimedOut, Outcome::UpstreamReset),
            (
                Side::Downstream,
                K::HostUnreachable,
                Outcome::DownstreamReset,
            ),
            (Side::Upstream, K::OutOfMemory, Outcome::Internal),
            (Side::Downstream, K::InvalidInput, Outcome::Internal),
            (Side::Upstream, K::Other, Outcome::Internal),
        ];
        for (side, kind, want) in cases {
            assert_eq!(io(side, &io::Error::from(kind)), want, "{side} {kind:?}");
            let fault = IoFault::new(side)(io::Error::from(kind));
            assert_eq!(fault.outcome(), want);
        }
        // In a handshake, the peer going away fails the handshake.
        let handshakes = [
            (
                Side::Downstream,
                K::ConnectionReset,
                Outcome::DownstreamTlsHandshake,
            ),
            (Side::Upstream, K::UnexpectedEof, Outcome::TlsHandshake),
            (Side::Upstream, K::OutOfMemory, Outcome::Internal),
        ];
        for (side, kind, want) in handshakes {
            assert_eq!(
                handshake(side, &io::Error::from(kind)),
                want,
                "{side} {kind:?}"
            );
        }
        let connects = [
            (K::ConnectionRefused, Outcome::UpstreamConnect),
            (K::TimedOut, Outcome::UpstreamConnect),
            (K::HostUnreachable, Outcome::UpstreamConnect),
            (K::NetworkUnreachable, Outcome::UpstreamConnect),
            (K::AddrNotAvailable, Outcome::Internal),
            (K::OutOfMemory, Outcome::Internal),
        ];
        for (kind, want) in connects {
            assert_eq!(connect(&io::Error::from(kind)), want, "{kind:?}");
        }
        // EMFILE: out of descriptors is ours, not the upstream's.
        assert_eq!(
            connect(&io::Error::from_raw_os_error(24)),
            Outcome::Internal
        );
    }

    #[test]
    fn tls_errors_and_alerts() {
        use Outcome as O;
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        // (error, [outcome with the client downstream, with the peer node upstream])
        let certificate = [O::DownstreamTlsCertificate, O::UpstreamTlsCertificate];
        let refused = [O::DownstreamTlsRefused, O::UpstreamTlsRefused];
        let failed = [O::DownstreamTlsHandshake, O::TlsHandshake];
        let cases = [
            (E::InvalidCertificate(C::UnknownIssuer), certificate),
            (E::InvalidCertificate(C::Expired), certificate),
            (E::NoCertificatesPresented, certificate),
            (E::AlertReceived(A::BadCertificate), refused),
            (E::AlertReceived(A::UnknownCA), refused),
            (E::AlertReceived(A::CertificateRequired), refused),
            (E::AlertReceived(A::HandshakeFailure), failed),
            (E::AlertReceived(A::ProtocolVersion), failed),
            (E::DecryptError, failed),
            (E::FailedToGetRandomBytes, [O::Internal, O::Internal]),
        ];
        for (e, [down, up]) in cases {
            assert_eq!(tls(Side::Downstream, &e), down, "{e:?}");
            assert_eq!(tls(Side::Upstream, &e), up, "{e:?}");
            // As tokio-rustls reports it: an I/O error carrying the TLS error.
            let wrapped = io::Error::new(io::ErrorKind::InvalidData, e.clone());
            assert_eq!(io(Side::Upstream, &wrapped), up, "wrapped {e:?}");
            assert_eq!(handshake(Side::Downstream, &wrapped), down, "wrapped {e:?}");
        }
    }

    /// A transport whose first read fails with the given error; writes succeed.
    struct FailingRead(Option<io::Error>);

    impl tokio::io::AsyncRead for FailingRead {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let e = self
                .0
                .take()
                .unwrap_or_else(|| io::ErrorKind::UnexpectedEof.into());
            std::task::Poll::Ready(Err(e))
        }
    }

    impl tokio::io::AsyncWrite for FailingRead {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// The error an HTTP/2 client connection ends with when its transport fails with `e`.
    async fn h2_error_from(e: io::Error) -> h2::Error {
        let (_send, conn) = ::h2::client::handshake(FailingRead(Some(e))).await.unwrap();
        conn.await.unwrap_err()
    }

    #[tokio::test]
    async fn http2_errors() {
        // The late refusal of our certificate, as h2 passes it on (kind and text only).
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA);
        let e = h2_error_from(io::Error::new(io::ErrorKind::InvalidData, alert)).await;
        assert!(e.get_io().is_some(), "{e:?}");
        assert_eq!(h2(Side::Upstream, &e), Outcome::UpstreamTlsRefused, "{e:?}");
        assert_eq!(
            h2_handshake(Side::Downstream, &e),
            Outcome::DownstreamTlsRefused
        );
        // Another TLS failure fails the handshake, or resets an established connection.
        let decrypt = rustls::Error::DecryptError;
        let e = h2_error_from(io::Error::new(io::ErrorKind::InvalidData, decrypt)).await;
        assert_eq!(
            h2_handshake(Side::Upstream, &e),
            Outcome::TlsHandshake,
            "{e:?}"
        );
        assert_eq!(h2(Side::Upstream, &e), Outcome::UpstreamReset, "{e:?}");
        let e = h2_error_from(io::ErrorKind::ConnectionReset.into()).await;
        assert_eq!(h2(Side::Downstream, &e), Outcome::DownstreamReset);
        assert_eq!(
            h2_handshake(Side::Downstream, &e),
            Outcome::DownstreamTlsHandshake
        );
        // Resets and GOAWAYs blame the side; h2 blaming its user blames us.
        let reset: h2::Error = h2::Reason::CANCEL.into();
        assert_eq!(h2(Side::Upstream, &reset), Outcome::UpstreamReset);
        assert_eq!(h2(Side::Downstream, &reset), Outcome::DownstreamReset);
        assert_eq!(h2_handshake(Side::Upstream, &reset), Outcome::TlsHandshake);
    }

    /// The outcome table of `docs/operations.md`: label → (blame, retry).
    fn documented() -> HashMap<String, (String, String)> {
        let doc = include_str!("../../docs/operations.md");
        let section = doc
            .split("### Outcomes")
            .nth(1)
            .expect("docs/operations.md has an \"### Outcomes\" section");
        section
            .lines()
            .skip_while(|l| !l.starts_with("| outcome | blame | retry |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let strip = |s: &str| s.trim_matches('`').to_owned();
                (strip(cells[1]), (strip(cells[2]), cells[3].to_owned()))
            })
            .collect()
    }

    #[test]
    fn the_operations_doc_lists_every_outcome_with_its_blame_and_retry() {
        let doc = documented();
        for o in Outcome::ALL {
            let retry = if o.retry_safe() { "yes" } else { "no" };
            assert_eq!(
                doc.get(o.as_str()),
                Some(&(o.blame().as_str().to_owned(), retry.to_owned())),
                "docs/operations.md: the row of `{}`",
                o.as_str()
            );
        }
        assert_eq!(
            doc.len(),
            Outcome::ALL.len(),
            "docs/operations.md lists outcomes that do not exist"
        );
    }
}
