//! Zero-copy TCP→TCP relaying with `splice(2)`: bytes move socket → pipe → socket inside the
//! kernel, never through a user-space buffer.
//!
//! Owns [`bidirectional`]: two pipes per connection (one per direction), each direction a loop
//! of "wait readable → splice into the pipe → wait writable → splice out of it", driven by the
//! pool's tokio reactor through `try_io`, counting bytes as they pass; an error names the side
//! whose socket failed ([`IoFault`]); the pipes of a relay that ended cleanly are kept (empty)
//! for the thread's next one. Plain TCP relays use it;
//! anything that must see the bytes (TLS, HTTP) does not.
//!
//! Must not touch: classification, metrics names (it takes counters), sockets other than the
//! two it is given.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::outcome::{IoFault, Side};

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

/// Spare pipes kept per thread for the next connection (four descriptors each).
const SPARE_MAX: usize = 16;

thread_local! {
    /// The pipes of relays that ended cleanly on this thread (so empty), for the next ones: a
    /// new connection then costs no pipe2/fcntl/close. Per thread, so per tenant pool.
    static SPARE: RefCell<Vec<Pipes>> = const { RefCell::new(Vec::new()) };
}

impl Pipes {
    /// Two pipes (four descriptors): this thread's spares if it has some, else new ones.
    pub fn new() -> io::Result<Self> {
        if let Some(pipes) = SPARE.with(|s| s.borrow_mut().pop()) {
            return Ok(pipes);
        }
        Ok(Self([Pipe::new()?, Pipe::new()?]))
    }

    /// Keeps the pipes for this thread's next connection. Only for pipes known to be empty.
    fn keep_empty(self) {
        SPARE.with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < SPARE_MAX {
                spare.push(self);
            }
        });
    }
}

/// Relays `down` ⇄ `up` until both directions reach EOF (each EOF is passed on as a
/// half-close). `down_to_up` and `up_to_down` count the bytes moved each way as they move.
pub async fn bidirectional(
    down: &TcpStream,
    up: &TcpStream,
    pipes: Pipes,
    down_to_up: &metrics::Counter,
    up_to_down: &metrics::Counter,
) -> Result<(), IoFault> {
    let [p1, p2] = &pipes.0;
    tokio::try_join!(
        one_way((down, Side::Downstream), up, p1, down_to_up),
        one_way((up, Side::Upstream), down, p2, up_to_down)
    )?;
    // Both directions reached EOF with every byte spliced out: the pipes are empty. After an
    // error they may hold bytes, and are closed instead.
    pipes.keep_empty();
    Ok(())
}

/// One direction, `from` (whose side is `side`) to `to`.
async fn one_way(
    (from, side): (&TcpStream, Side),
    to: &TcpStream,
    pipe: &Pipe,
    counter: &metrics::Counter,
) -> Result<(), IoFault> {
    // Reading into the pipe fails on `from`'s socket, writing out of it on `to`'s.
    let (on_from, on_to) = (IoFault::new(side), IoFault::new(side.other()));
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = loop {
            from.readable().await.map_err(on_from)?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe.write.as_fd(), None, CHUNK, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(on_from(e)),
            }
        };
        if n == 0 {
            // EOF: pass the half-close on; the other direction may still be sending.
            return socket2::SockRef::from(to)
                .shutdown(std::net::Shutdown::Write)
                .map_err(on_to);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await.map_err(on_to)?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, to.as_fd(), None, left, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(on_to(e)),
            }
        }
        counter.increment(n as u64);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::AsRawFd;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::outcome::Outcome;

    /// Client ⇄ (down … up) ⇄ server over loopback, relayed by [`bidirectional`]: the client
    /// sends `ping` and closes its side, the server answers `pong` and closes; with `reset`,
    /// that side's end aborts instead (the client once the server has its ping, the server
    /// instead of answering). Returns the relay's result and the descriptors of its pipes.
    async fn relay_once(reset: Option<Side>) -> (Result<(), IoFault>, [i32; 2]) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (down, _) = front.accept().await.unwrap();
        let up = TcpStream::connect(back.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = back.accept().await.unwrap();
        let pipes = Pipes::new().unwrap();
        let fds = [pipes.0[0].read.as_raw_fd(), pipes.0[1].read.as_raw_fd()];
        let (none, none2) = (metrics::Counter::noop(), metrics::Counter::noop());
        let relay = bidirectional(&down, &up, pipes, &none, &none2);
        let abort = |s: TcpStream| {
            socket2::SockRef::from(&s)
                .set_linger(Some(std::time::Duration::ZERO))
                .unwrap();
            drop(s);
        };
        let ends = async {
            client.write_all(b"ping").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"ping");
            match reset {
                Some(Side::Upstream) => return abort(server),
                Some(Side::Downstream) => {
                    abort(client);
                    server.write_all(b"pong").await.unwrap();
                    return server.shutdown().await.unwrap();
                }
                None => {}
            }
            server.write_all(b"pong").await.unwrap();
            server.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"pong");
        };
        let (result, ()) = tokio::join!(relay, ends);
        (result, fds)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_clean_relays_pipes_serve_the_next_connection_and_a_failed_ones_do_not() {
        let (first, fds) = relay_once(None).await;
        first.unwrap();
        let (second, reused) = relay_once(None).await;
        second.unwrap();
        assert_eq!(
            reused, fds,
            "the second relay did not reuse the first one's pipes"
        );
        // The server resets: that relay fails, and its pipes (possibly not empty) are closed.
        let (third, used) = relay_once(Some(Side::Upstream)).await;
        assert_eq!(used, fds);
        assert_eq!(
            SPARE.with(|s| s.borrow().len()),
            0,
            "a failed relay's pipes were kept"
        );
        assert_eq!(
            third.expect_err("a reset should fail the relay").outcome(),
            Outcome::UpstreamReset
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_relay_blames_the_side_that_reset() {
        let (result, _) = relay_once(Some(Side::Downstream)).await;
        let fault = result.expect_err("the client's reset should fail the relay");
        assert_eq!(fault.side, Side::Downstream, "{fault}");
        assert_eq!(fault.outcome(), Outcome::DownstreamReset);
    }
}
