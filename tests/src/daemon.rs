//! Running the `nodeproxy` binary inside a network namespace, and talking HTTP to its admin and
//! metrics endpoints from inside that namespace.
//!
//! Must not touch: processes it did not start (it signals only its own child, by pid).

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::NamedTempFile;

use nodeproxy::lab::topology::Netns;

/// Admin port when the arguments give no `--admin-addr`.
pub const DEFAULT_ADMIN_PORT: u16 = 15000;
/// Metrics port when the arguments give no `--metrics-addr`.
pub const DEFAULT_METRICS_PORT: u16 = 15020;
/// How long [`Daemon::stop`] waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// A `nodeproxy` (or other) process running inside a namespace, with its stdout and stderr
/// captured to a temporary file. Dropping it stops it (SIGTERM, then SIGKILL) and, if the
/// current thread is panicking, prints its log.
#[derive(Debug)]
pub struct Daemon {
    ns: Netns,
    child: Child,
    log: NamedTempFile,
    admin_port: u16,
    metrics_port: u16,
}

impl Daemon {
    /// Starts [`crate::nodeproxy_bin`] with `args` inside `ns`, e.g.
    /// `["run", "--config", FILE, "--node", NAME, "--admin-addr", "127.0.0.1:15000"]`. The
    /// admin and metrics ports are taken from `--admin-addr` / `--metrics-addr` if present.
    pub fn start(ns: &Netns, args: &[&str]) -> anyhow::Result<Daemon> {
        Daemon::start_program(ns, crate::nodeproxy_bin(), args)
    }

    /// Like [`Daemon::start`], for any program.
    pub fn start_program(
        ns: &Netns,
        program: impl AsRef<OsStr>,
        args: &[&str],
    ) -> anyhow::Result<Daemon> {
        let program = program.as_ref();
        let log = NamedTempFile::with_prefix("nodeproxy-log-").context("create log file")?;
        // Clones share one file offset, so stdout and stderr interleave instead of overwriting.
        let stdout = log.as_file().try_clone().context("clone log file")?;
        let stderr = log.as_file().try_clone().context("clone log file")?;
        let child = ns
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("start {} in netns {}", program.display(), ns.name()))?;
        Ok(Daemon {
            ns: ns.clone(),
            child,
            log,
            admin_port: port_arg(args, "--admin-addr").unwrap_or(DEFAULT_ADMIN_PORT),
            metrics_port: port_arg(args, "--metrics-addr").unwrap_or(DEFAULT_METRICS_PORT),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The namespace the process runs in.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Polls `GET /ready` on the admin port until it answers 200. Fails, with the log, if the
    /// process exits first or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "process exited ({status}) before it was ready; log:\n{}",
                    self.logs()
                );
            }
            let last = match self.get("/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("HTTP {code}: {body}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "not ready after {timeout:?} (last /ready: {last}); log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// `GET path` on the admin port: (status, body).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.http_get(self.admin_port, path)
    }

    /// `GET http://127.0.0.1:<port><path>` from inside the namespace: (status, body).
    pub fn http_get(&self, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(
            &self.ns,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            path,
        )
    }

    /// Scrapes and parses `/metrics` on the metrics port.
    pub fn metrics(&self) -> anyhow::Result<prometheus_parse::Scrape> {
        let (status, body) = self.http_get(self.metrics_port, "/metrics")?;
        if status != 200 {
            bail!("GET /metrics returned {status}: {body}");
        }
        prometheus_parse::Scrape::parse(body.lines().map(|line| Ok(line.to_owned())))
            .context("parse /metrics")
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read(self.log.path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|e| format!("<cannot read log {}: {e}>", self.log.path().display()))
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Sends SIGTERM and waits up to 10 s for the process to exit, then SIGKILLs it. Returns the
    /// exit status; calling it again returns the same status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).context("pid out of range")?);
        kill(pid, Signal::SIGTERM).context("send SIGTERM")?;
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill().context("send SIGKILL")?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let stopped = self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- log of {} in netns {} (stop: {stopped:?}) ---\n{}--- end of log ---",
                self.pid(),
                self.ns.name(),
                self.logs()
            );
        }
    }
}

/// The port of `--flag ADDR` or `--flag=ADDR` in `args`, if present and parseable.
fn port_arg(args: &[&str], flag: &str) -> Option<u16> {
    let inline = format!("{flag}=");
    let value = args.iter().enumerate().find_map(|(i, arg)| {
        if *arg == flag {
            args.get(i + 1).copied()
        } else {
            arg.strip_prefix(inline.as_str())
        }
    })?;
    value.parse::<SocketAddr>().ok().map(|addr| addr.port())
}

/// `GET http://<addr><path>` from inside `ns` (the connection is made from a thread in the
/// namespace, by the daemon's own admin client): (status, body).
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    ns.run(move || nodeproxy::admin_client::get(addr, path))
        .with_context(|| format!("enter netns {}", ns.name()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_either_flag_form() {
        let args = [
            "run",
            "--admin-addr",
            "127.0.0.1:16000",
            "--metrics-addr=[::1]:16020",
        ];
        assert_eq!(port_arg(&args, "--admin-addr"), Some(16000));
        assert_eq!(port_arg(&args, "--metrics-addr"), Some(16020));
        assert_eq!(port_arg(&["run"], "--admin-addr"), None);
    }
}
