//! Zero-copy TCP→TCP relaying with `splice(2)`: bytes move socket → pipe → socket inside the
//! kernel, never through a user-space buffer.
//!
//! Owns [`bidirectional`]: two pipes per connection (one per direction), each direction a loop
//! of "wait readable → splice into the pipe → wait writable → splice out of it", driven by the
//! pool's tokio reactor through `try_io`, counting bytes as they pass. Plain TCP relays use it;
//! anything that must see the bytes (TLS, HTTP) does not.
//!
//! Must not touch: classification, metrics names (it takes counters), sockets other than the
//! two it is given.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call and the pipe size asked for.
const CHUNK: usize = 256 * 1024;

/// A pipe used as the in-kernel buffer of one direction.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // A larger pipe moves more per call; the default 64 KiB is kept if the system limit
        // (fs.pipe-max-size) refuses.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
        Ok(Self { read, write })
    }
}

/// Pipes for both directions of one connection; creating them is the only way this fails
/// before any byte moves (file descriptor exhaustion), so the caller can fall back to copying.
#[derive(Debug)]
pub struct Pipes([Pipe; 2]);

impl Pipes {
    /// Two pipes (four descriptors).
    pub fn new() -> io::Result<Self> {
        Ok(Self([Pipe::new()?, Pipe::new()?]))
    }
}

/// Relays `a` ⇄ `b` until both directions reach EOF (each EOF is passed on as a half-close).
/// `a_to_b` and `b_to_a` count the bytes moved each way as they move.
pub async fn bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    pipes: Pipes,
    a_to_b: &metrics::Counter,
    b_to_a: &metrics::Counter,
) -> io::Result<()> {
    let [p1, p2] = pipes.0;
    tokio::try_join!(one_way(a, b, &p1, a_to_b), one_way(b, a, &p2, b_to_a))?;
    Ok(())
}

async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counter: &metrics::Counter,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe.write.as_fd(), None, CHUNK, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // EOF: pass the half-close on; the other direction may still be sending.
            return socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, to.as_fd(), None, left, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        counter.increment(n as u64);
    }
}
