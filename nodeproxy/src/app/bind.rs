//! Binding the daemon's listeners, with errors that name the address, the flag and the fix.
//!
//! Owns [`Listeners`] (every listener of the daemon, bound before anything touches the kernel),
//! [`bind`], [`bind_with`] (transparent listeners for TPROXY) and [`BindError`].
//!
//! Must not touch: what is served on the listeners.

use std::net::SocketAddr;

use crate::config::Config;

/// Every listener the daemon serves, bound (so a port in use fails the start early).
#[derive(Debug)]
pub(crate) struct Listeners {
    /// The shared outbound capture listeners (IPv6 left out where the host has none).
    pub(crate) outbound: Vec<std::net::TcpListener>,
    pub(crate) admin: std::net::TcpListener,
    pub(crate) metrics: std::net::TcpListener,
    pub(crate) tunnel: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Binds what `config` names; outbound listeners `transparent` for TPROXY.
    pub(crate) fn bind(config: &Config, transparent: bool) -> anyhow::Result<Self> {
        let mut outbound = Vec::new();
        for addr in &config.outbound_addrs {
            match bind_with(*addr, transparent) {
                Ok(l) => outbound.push(l),
                // A host without IPv6 still serves IPv4.
                Err(e) if addr.is_ipv6() && is_no_ipv6(&e.source) => {
                    tracing::warn!(%addr, error = %e.source, "IPv6 is not available; not listening there");
                }
                Err(e) => return Err(e.into_anyhow(*addr, "--outbound-addr")),
            }
        }
        let named =
            |addr: SocketAddr, flag: &str| bind(addr).map_err(|e| bind_error(addr, flag, e));
        Ok(Self {
            outbound,
            admin: named(config.admin_addr, "--admin-addr")?,
            metrics: named(config.metrics_addr, "--metrics-addr")?,
            tunnel: match &config.tunnel {
                Some(t) => Some(named(t.addr, "--tunnel-addr")?),
                None => None,
            },
        })
    }

    /// The bound addresses of the outbound listeners.
    pub(crate) fn outbound_addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        self.outbound.iter().map(|l| l.local_addr()).collect()
    }
}

/// Binds a non-blocking listener; IPv6 listeners are IPv6-only so that `0.0.0.0` and `[::]`
/// can share a port.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    bind_with(addr, false).map_err(|e| e.source)
}

/// Why a listener could not be bound.
#[derive(Debug)]
pub(crate) struct BindError {
    /// Setting IP_TRANSPARENT failed (rather than creating, binding or listening).
    transparent: bool,
    pub(crate) source: std::io::Error,
}

impl BindError {
    pub(crate) fn into_anyhow(self, addr: SocketAddr, flag: &str) -> anyhow::Error {
        if !self.transparent {
            return bind_error(addr, flag, self.source);
        }
        let hint = match self.source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                ": --capture tproxy needs CAP_NET_ADMIN for a transparent listener; run as root or \
                 grant the capability, or use --capture redirect"
            }
            _ => "",
        };
        anyhow::anyhow!(
            "cannot make the listener on {addr} ({flag}) transparent (IP_TRANSPARENT): {}{hint}",
            self.source
        )
    }
}

/// Like [`bind`]; with `transparent`, sets IP_TRANSPARENT before binding, so that TPROXY can
/// deliver connections for any destination to it.
pub(crate) fn bind_with(
    addr: SocketAddr,
    transparent: bool,
) -> Result<std::net::TcpListener, BindError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let plain = |source| BindError {
        transparent: false,
        source,
    };
    let s =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(plain)?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(plain)?;
    }
    if transparent {
        let set = if addr.is_ipv6() {
            s.set_ip_transparent_v6(true)
        } else {
            s.set_ip_transparent_v4(true)
        };
        set.map_err(|source| BindError {
            transparent: true,
            source,
        })?;
    }
    s.set_reuse_address(true).map_err(plain)?;
    s.set_nonblocking(true).map_err(plain)?;
    s.bind(&addr.into()).map_err(plain)?;
    s.listen(1024).map_err(plain)?;
    Ok(s.into())
}

pub(crate) fn is_no_ipv6(e: &std::io::Error) -> bool {
    // EAFNOSUPPORT (97) or EADDRNOTAVAIL when IPv6 is disabled.
    e.raw_os_error() == Some(97) || e.kind() == std::io::ErrorKind::AddrNotAvailable
}

fn bind_error(addr: SocketAddr, flag: &str, e: std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            ": another process (perhaps another nodeproxy) holds it; stop it or choose another address with {flag}"
        ),
        std::io::ErrorKind::PermissionDenied => {
            ": binding needs CAP_NET_BIND_SERVICE for ports below 1024".to_owned()
        }
        _ => String::new(),
    };
    anyhow::anyhow!("cannot listen on {addr} ({flag}): {e}{hint}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_transparent_listener_without_privileges_names_the_fix() {
        let e = BindError {
            transparent: true,
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let msg = e
            .into_anyhow("0.0.0.0:15001".parse().unwrap(), "--outbound-addr")
            .to_string();
        assert!(msg.contains("0.0.0.0:15001"), "{msg}");
        assert!(msg.contains("IP_TRANSPARENT"), "{msg}");
        assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
        assert!(msg.contains("--capture redirect"), "{msg}");
    }
}
