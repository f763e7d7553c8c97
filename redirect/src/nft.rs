//! [`Nft`]: the only place that runs the `nft` binary (optionally inside a network namespace via
//! `ip netns exec`). It feeds scripts from `render` on stdin, captures stderr into errors and
//! hands `nft -j` listings to `verify`. Blocking by design: async callers use `spawn_blocking`.

use std::ffi::OsString;
use std::io::{ErrorKind, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::render::{render, render_remove, render_update};
use crate::spec::{RuleSet, TableName};
use crate::verify::verify_listing;
use crate::{Error, Result};

/// Directories searched after `PATH`, since nft lives in sbin and non-root `PATH`s often lack it.
const SBIN_DIRS: &[&str] = &["/usr/sbin", "/sbin"];

/// Runs `nft` to check, apply, update, verify and remove the capture table.
#[derive(Debug, Clone)]
pub struct Nft {
    nft: PathBuf,
    /// `ip` binary and namespace name, when nft runs inside a network namespace.
    netns: Option<(PathBuf, String)>,
}

impl Nft {
    /// Finds `nft` on `PATH` (then `/usr/sbin`, `/sbin`).
    pub fn new() -> Result<Self> {
        let nft = find_program("nft").ok_or(Error::NotFound {
            program: "nft",
            path: "PATH".to_owned(),
            package: "nftables",
        })?;
        Ok(Self::with_path(nft))
    }

    /// Uses the `nft` binary at `path`; a missing binary is reported when a command runs.
    pub fn with_path(path: impl Into<PathBuf>) -> Self {
        Self {
            nft: path.into(),
            netns: None,
        }
    }

    /// Runs every command as `ip netns exec <netns> nft ...`, for tests that must not touch the
    /// host's ruleset. `ip` is looked up on `PATH` (then `/usr/sbin`, `/sbin`).
    pub fn in_netns(self, netns: impl Into<String>) -> Result<Self> {
        let ip = find_program("ip").ok_or(Error::NotFound {
            program: "ip",
            path: "PATH".to_owned(),
            package: "iproute2",
        })?;
        Ok(Self {
            netns: Some((ip, netns.into())),
            ..self
        })
    }

    /// The `nft` binary this runs.
    pub fn path(&self) -> &Path {
        &self.nft
    }

    /// Asks nft whether the rendered rule set would load (`nft -c -f -`), changing nothing.
    pub fn check(&self, rules: &RuleSet) -> Result<()> {
        self.run(
            "check",
            &rules.table,
            &["-c", "-f", "-"],
            Some(&render(rules)),
        )
        .map(drop)
    }

    /// Creates the table or atomically replaces it with `rules` (`nft -f -`, one transaction).
    pub fn apply(&self, rules: &RuleSet) -> Result<()> {
        tracing::debug!(
            table = %rules.table,
            port = rules.redirect_port.get(),
            v4 = rules.meshed_v4.len(),
            v6 = rules.meshed_v6.len(),
            "applying nftables rule set"
        );
        self.run("apply", &rules.table, &["-f", "-"], Some(&render(rules)))
            .map(drop)
    }

    /// Adds and removes meshed pod addresses in one transaction; does nothing if both are empty.
    /// Removing an absent address is not an error (see [`render_update`]).
    pub fn update(&self, table: &TableName, added: &[IpAddr], removed: &[IpAddr]) -> Result<()> {
        let Some(script) = render_update(table, added, removed) else {
            return Ok(());
        };
        tracing::debug!(%table, added = added.len(), removed = removed.len(), "updating meshed sets");
        self.run("update", table, &["-f", "-"], Some(&script))
            .map(drop)
    }

    /// Checks that the table in the kernel matches `rules` exactly (see [`verify_listing`]).
    pub fn verify(&self, rules: &RuleSet) -> Result<()> {
        if !self.exists(&rules.table)? {
            return Err(Error::Mismatch {
                table: rules.table.to_string(),
                differences: vec!["the table does not exist".to_owned()],
            });
        }
        let table = rules.table.as_str();
        let output = self.run(
            "list",
            &rules.table,
            &["-j", "list", "table", "inet", table],
            None,
        )?;
        verify_listing(rules, &String::from_utf8_lossy(&output.stdout))
    }

    /// Deletes the table; succeeds if it does not exist, so it is safe both at startup (to clean up
    /// after a crashed run) and at shutdown.
    pub fn remove(&self, table: &TableName) -> Result<()> {
        tracing::debug!(%table, "removing nftables table");
        self.run("remove", table, &["-f", "-"], Some(&render_remove(table)))
            .map(drop)
    }

    /// Whether the `inet` table exists.
    pub fn exists(&self, table: &TableName) -> Result<bool> {
        let output = self.run("list", table, &["-j", "list", "tables", "inet"], None)?;
        let root: Value =
            serde_json::from_slice(&output.stdout).map_err(|e| Error::ParseListing {
                table: table.to_string(),
                detail: e.to_string(),
            })?;
        let found = root
            .get("nftables")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|object| object.get("table"))
            .any(|t| {
                t.get("family").and_then(Value::as_str) == Some("inet")
                    && t.get("name").and_then(Value::as_str) == Some(table.as_str())
            });
        Ok(found)
    }

    /// Runs nft with `args`, writing `stdin` to it if given; a non-zero exit is [`Error::Rejected`].
    fn run(
        &self,
        action: &'static str,
        table: &TableName,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output> {
        let (program, mut full_args): (&Path, Vec<OsString>) = match &self.netns {
            Some((ip, netns)) => (
                ip,
                vec![
                    "netns".into(),
                    "exec".into(),
                    netns.into(),
                    self.nft.clone().into(),
                ],
            ),
            None => (&self.nft, Vec::new()),
        };
        full_args.extend(args.iter().map(OsString::from));
        let mut command = Command::new(program);
        command
            .args(&full_args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_error = |source: std::io::Error| match (source.kind(), &self.netns) {
            (ErrorKind::NotFound, None) => Error::NotFound {
                program: "nft",
                path: program.display().to_string(),
                package: "nftables",
            },
            (ErrorKind::NotFound, Some(_)) => Error::NotFound {
                program: "ip",
                path: program.display().to_string(),
                package: "iproute2",
            },
            _ => Error::Spawn {
                path: program.to_owned(),
                source,
            },
        };
        let mut child = command.spawn().map_err(spawn_error)?;
        let mut write_result = Ok(());
        if let (Some(script), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // nft reads all of stdin before it answers, so writing first cannot deadlock on a full
            // stdout pipe; dropping the pipe closes it and ends nft's input.
            write_result = pipe.write_all(script.as_bytes());
        }
        let output = child.wait_with_output().map_err(|source| Error::Spawn {
            path: program.to_owned(),
            source,
        })?;
        // If nft exited early, its stderr explains more than our broken pipe does.
        if output.status.success() {
            write_result.map_err(|source| Error::Spawn {
                path: program.to_owned(),
                source,
            })?;
        }
        if output.status.success() {
            Ok(output)
        } else {
            Err(Error::Rejected {
                action,
                table: table.to_string(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }
}

/// Looks `name` up in `PATH`, then in the sbin directories.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_is_not_found_with_a_fix() {
        let nft = Nft::with_path("/nonexistent/nft");
        let err = nft.exists(&TableName::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "nft binary not found at /nonexistent/nft: install nftables (apt-get install nftables)"
        );
    }
}
