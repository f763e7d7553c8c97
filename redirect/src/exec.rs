//! [`Runner`]: the one place that starts binaries (`nft` and `ip`), optionally inside a network
//! namespace (`ip netns exec <ns> nft ...`, `ip -n <ns> ...`). It writes a script to stdin,
//! captures stdout and stderr, and maps "not installed" to [`Error::NotFound`] with the package
//! to install; callers turn a non-zero exit into their own error. Blocking by design.

use std::ffi::OsString;
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};

use crate::{Error, Result};

/// Directories searched after `PATH`, since nft and ip live in sbin and non-root `PATH`s often
/// lack it.
const SBIN_DIRS: &[&str] = &["/usr/sbin", "/sbin"];

/// A binary the crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Program {
    /// `nft` (nftables).
    Nft,
    /// `ip` (iproute2).
    Ip,
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Nft => "nft",
            Program::Ip => "ip",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Program::Nft => "nftables",
            Program::Ip => "iproute2",
        }
    }

    /// The error for a binary that is not there.
    pub(crate) fn not_found(self, path: impl Into<String>) -> Error {
        Error::NotFound {
            program: self.name(),
            path: path.into(),
            package: self.package(),
        }
    }
}

/// A command that ran and exited non-zero.
#[derive(Debug)]
pub(crate) struct Exited {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard error, trimmed.
    pub stderr: String,
}

/// Why a command did not succeed: it could not run at all, or it ran and failed.
#[derive(Debug)]
pub(crate) enum RunError {
    /// Not installed, not executable, or the pipes broke.
    Start(Error),
    /// It ran and exited non-zero.
    Exited(Exited),
}

/// Runs `nft` and `ip`, in the current network namespace or in a named one.
#[derive(Debug, Clone)]
pub(crate) struct Runner {
    nft: PathBuf,
    ip: PathBuf,
    netns: Option<String>,
}

impl Runner {
    /// A runner for the `nft` at `nft` and the `ip` found on `PATH` (or plain `ip`, reported as
    /// missing when it first runs).
    pub(crate) fn new(nft: PathBuf) -> Self {
        Self {
            nft,
            ip: find_program("ip").unwrap_or_else(|| PathBuf::from("ip")),
            netns: None,
        }
    }

    /// Runs every command inside the network namespace `netns`; needs `ip` installed.
    pub(crate) fn in_netns(self, netns: String) -> Result<Self> {
        let ip = find_program("ip").ok_or_else(|| Program::Ip.not_found("PATH"))?;
        Ok(Self {
            ip,
            netns: Some(netns),
            ..self
        })
    }

    /// The `nft` binary.
    pub(crate) fn nft(&self) -> &Path {
        &self.nft
    }

    /// The binary to start and its arguments (pure).
    fn command_line<'a>(&'a self, program: Program, args: &[&str]) -> (&'a Path, Vec<OsString>) {
        let mut full: Vec<OsString> = match (program, &self.netns) {
            (Program::Nft, None) => Vec::new(),
            (Program::Nft, Some(netns)) => vec![
                "netns".into(),
                "exec".into(),
                netns.into(),
                self.nft.clone().into(),
            ],
            (Program::Ip, None) => Vec::new(),
            (Program::Ip, Some(netns)) => vec!["-n".into(), netns.into()],
        };
        full.extend(args.iter().map(OsString::from));
        let binary = match (program, &self.netns) {
            (Program::Nft, None) => &self.nft,
            _ => &self.ip,
        };
        (binary, full)
    }

    /// Runs `program` with `args`, writing `stdin` to it if given.
    pub(crate) fn run(
        &self,
        program: Program,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output, RunError> {
        let (binary, args) = self.command_line(program, args);
        let mut command = Command::new(binary);
        command
            .args(&args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_error = |source: std::io::Error| {
            let started = if binary == self.ip {
                Program::Ip
            } else {
                program
            };
            match source.kind() {
                ErrorKind::NotFound => started.not_found(binary.display().to_string()),
                _ => Error::Spawn {
                    path: binary.to_owned(),
                    source,
                },
            }
        };
        let mut child = command
            .spawn()
            .map_err(|e| RunError::Start(spawn_error(e)))?;
        let mut write_result = Ok(());
        if let (Some(script), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // nft reads all of stdin before it answers, so writing first cannot deadlock on a full
            // stdout pipe; dropping the pipe closes it and ends the input.
            write_result = pipe.write_all(script.as_bytes());
        }
        let output = child.wait_with_output().map_err(|source| {
            RunError::Start(Error::Spawn {
                path: binary.to_owned(),
                source,
            })
        })?;
        if !output.status.success() {
            // If the program exited early, its stderr explains more than our broken pipe does.
            return Err(RunError::Exited(Exited {
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            }));
        }
        write_result.map_err(|source| {
            RunError::Start(Error::Spawn {
                path: binary.to_owned(),
                source,
            })
        })?;
        Ok(output)
    }
}

/// Looks `name` up in `PATH`, then in the sbin directories.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    which::which(name)
        .or_else(|_| which::which_in(name, std::env::join_paths(SBIN_DIRS).ok(), "/"))
        .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn command_lines() {
        let mut runner = Runner::new("/usr/sbin/nft".into());
        runner.ip = "/usr/sbin/ip".into();
        let line = |runner: &Runner, program| {
            let (binary, args) = runner.command_line(program, &["-j", "x"]);
            let args: Vec<String> = args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            format!("{} {}", binary.display(), args.join(" "))
        };
        assert_eq!(line(&runner, Program::Nft), "/usr/sbin/nft -j x");
        assert_eq!(line(&runner, Program::Ip), "/usr/sbin/ip -j x");
        runner.netns = Some("ns1".into());
        assert_eq!(
            line(&runner, Program::Nft),
            "/usr/sbin/ip netns exec ns1 /usr/sbin/nft -j x"
        );
        assert_eq!(line(&runner, Program::Ip), "/usr/sbin/ip -n ns1 -j x");
    }
}
