//! Blocking TCP helpers that run inside network namespaces: an echo server that records which
//! addresses reached it, and clients with timeouts.
//!
//! Must not touch: anything outside the given namespace (sockets are created on a thread that
//! entered it).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use nodeproxy::lab::topology::Netns;

/// How long a client waits for a connection to be established.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client or the echo server waits for one read or write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection an [`EchoServer`] accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The client address the server saw (after any proxying or NAT).
    pub peer: SocketAddr,
    /// The server address the connection arrived on.
    pub local: SocketAddr,
}

/// A TCP echo server running in a namespace. Echoes each connection's bytes back until the
/// client half-closes, then closes. Stops accepting when dropped.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    listener: TcpListener,
    stopping: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

/// Starts an [`EchoServer`] listening on `addr` inside `ns` (port 0 picks a free port). It is
/// accepting when this returns.
pub fn tcp_echo_server(ns: &Netns, addr: SocketAddr) -> io::Result<EchoServer> {
    let listener = ns.run(|| TcpListener::bind(addr))??;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stopping = Arc::new(AtomicBool::new(false));
    let accept_thread = {
        let listener = listener.try_clone()?;
        let seen = Arc::clone(&seen);
        let stopping = Arc::clone(&stopping);
        std::thread::Builder::new()
            .name(format!("echo {addr}"))
            .spawn(move || accept_loop(&listener, &seen, &stopping))?
    };
    Ok(EchoServer {
        addr,
        seen,
        listener,
        stopping,
        accept_thread: Some(accept_thread),
    })
}

fn accept_loop(listener: &TcpListener, seen: &Mutex<Vec<Seen>>, stopping: &AtomicBool) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) if stopping.load(Ordering::SeqCst) => return,
            // Transient (e.g. ECONNABORTED): keep serving.
            Err(_) => continue,
        };
        if let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) {
            seen.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Seen { peer, local });
        }
        // The socket already belongs to the namespace; the echo thread needs not enter it.
        let _ = std::thread::Builder::new()
            .name("echo conn".into())
            .spawn(move || echo(stream));
    }
}

fn echo(stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    if io::copy(&mut &stream, &mut &stream).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
    }
}

impl EchoServer {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every connection accepted so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The client addresses of every connection accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.seen().into_iter().map(|s| s.peer).collect()
    }

    /// Waits until at least `n` connections were accepted, polling until `timeout`; returns them
    /// (possibly fewer, if the deadline passed).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Seen> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.seen();
            if seen.len() >= n || Instant::now() >= deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // On Linux, shutting down a listening socket wakes a blocked accept() with EINVAL.
        let _ = SockRef::from(&self.listener).shutdown(Shutdown::Both);
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

/// Opens a TCP connection from inside `ns` to `to`, bound to `from_ip` if given, with
/// [`CONNECT_TIMEOUT`] and read/write timeouts of [`IO_TIMEOUT`].
pub fn tcp_connect(ns: &Netns, from_ip: Option<IpAddr>, to: SocketAddr) -> io::Result<TcpStream> {
    ns.run(|| {
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(ip) = from_ip {
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        socket.connect_timeout(&to.into(), CONNECT_TIMEOUT)?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(TcpStream::from(socket))
    })?
}

/// Connects from inside `ns` (see [`tcp_connect`]), sends `payload`, half-closes and returns
/// everything the server sent until it closed.
pub fn tcp_roundtrip(
    ns: &Netns,
    from_ip: Option<IpAddr>,
    to: SocketAddr,
    payload: &[u8],
) -> io::Result<Vec<u8>> {
    let stream = tcp_connect(ns, from_ip, to)?;
    // Write on a second thread so payloads larger than the socket buffers cannot deadlock
    // against a server that echoes while we are still writing.
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            (&stream).write_all(payload)?;
            stream.shutdown(Shutdown::Write)
        });
        let mut reply = Vec::new();
        let read = (&stream).read_to_end(&mut reply);
        let written = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        written?;
        read?;
        Ok(reply)
    })
}

/// Waits until a socket in `ns` listens on TCP `port` (any address, either family), polling the
/// namespace's `/proc/net/tcp` and `tcp6` until `timeout`: for servers started as processes
/// (`iperf3 -s`), which do not say when they listen.
pub fn wait_for_listener(ns: &Netns, port: u16, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let tables = ns.run(|| {
            ["tcp", "tcp6"].map(|t| std::fs::read_to_string(format!("/proc/thread-self/net/{t}")))
        })?;
        let mut listening = false;
        for table in tables {
            listening |= listens_on(&table?, port);
        }
        if listening {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "nothing listens on TCP port {port} in netns {} after {timeout:?}",
                    ns.name()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True if a `/proc/net/tcp{,6}` listing has a socket in state LISTEN (`0A`) on local `port`.
fn listens_on(table: &str, port: u16) -> bool {
    let port = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, local, _, "0A", ..] if local.ends_with(&port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_found_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
            0: 00000000:1451 00000000:0000 0A 00000000:00000000\n\
            1: 0100007F:1F90 0100007F:C350 01 00000000:00000000\n";
        assert!(listens_on(table, 5201));
        assert!(!listens_on(table, 8080), "established, not listening");
        assert!(!listens_on(table, 0x51), "the port is the whole field");
    }
}
