//! [`Nft`]: applies, verifies, updates and removes the capture rules: the nftables table and,
//! with TPROXY, its policy routing. It runs `nft` and `ip` through [`crate::exec::Runner`] (the
//! one place that starts binaries), feeds scripts from `render` on stdin, reads listings for
//! `verify` and `routing`, and turns failures into [`Error`]s. Blocking by design: async callers
//! use `spawn_blocking`.

use std::net::IpAddr;
use std::num::NonZeroU16;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::exec::{Program, RunError, Runner, find_program};
use crate::render::{render, render_port_update, render_remove, render_update};
use crate::routing::{
    Family, FamilyListing, IpCommand, RoutingListing, plan_routing, plan_routing_removal,
    routing_differences,
};
use crate::spec::{Capture, PolicyRouting, RuleSet, TableName};
use crate::verify::verify_listing;
use crate::{Error, Result};

/// Runs `nft` (and `ip` for TPROXY's policy routing) to check, apply, update, verify and remove
/// the capture rules.
#[derive(Debug, Clone)]
pub struct Nft {
    runner: Runner,
}

impl Nft {
    /// Finds `nft` on `PATH` (then `/usr/sbin`, `/sbin`); `ip` is looked up the same way.
    pub fn new() -> Result<Self> {
        let nft = find_program("nft").ok_or_else(|| Program::Nft.not_found("PATH"))?;
        Ok(Self::with_path(nft))
    }

    /// Uses the `nft` binary at `path`; a missing binary is reported when a command runs.
    pub fn with_path(path: impl Into<PathBuf>) -> Self {
        Self {
            runner: Runner::new(path.into()),
        }
    }

    /// Runs every command inside the network namespace `netns` (`ip netns exec <netns> nft ...`,
    /// `ip -n <netns> ...`), for tests that must not touch the host's ruleset. `ip` is looked up
    /// on `PATH` (then `/usr/sbin`, `/sbin`).
    pub fn in_netns(self, netns: impl Into<String>) -> Result<Self> {
        Ok(Self {
            runner: self.runner.in_netns(netns.into())?,
        })
    }

    /// The `nft` binary this runs.
    pub fn path(&self) -> &Path {
        self.runner.nft()
    }

    /// Asks nft whether the rendered rule set would load (`nft -c -f -`), changing nothing.
    pub fn check(&self, rules: &RuleSet) -> Result<()> {
        self.nft(
            "check",
            &rules.table,
            &["-c", "-f", "-"],
            Some(&render(rules)),
        )
        .map(drop)
    }

    /// Installs `rules`: with TPROXY, first the policy routing (harmless without marked packets),
    /// then the table, created or atomically replaced in one `nft -f` transaction. Leftovers of a
    /// crashed run are replaced, never duplicated; with REDIRECT, the policy routing a TPROXY run
    /// may have left is removed.
    pub fn apply(&self, rules: &RuleSet) -> Result<()> {
        tracing::debug!(
            table = %rules.table,
            capture = %rules.capture,
            port = rules.redirect_port.get(),
            v4 = rules.meshed_v4.len(),
            v6 = rules.meshed_v6.len(),
            pod_ports = rules.pod_ports_v4.len() + rules.pod_ports_v6.len(),
            "applying capture rules"
        );
        match rules.capture {
            Capture::Tproxy => {
                let current = self.routing_listing(&rules.routing)?;
                self.run_ip_all(&plan_routing(&rules.routing, &current))?;
            }
            Capture::Redirect => self.remove_routing(&rules.routing, true)?,
        }
        self.nft("apply", &rules.table, &["-f", "-"], Some(&render(rules)))
            .map(drop)
    }

    /// Adds and removes meshed pod addresses in one transaction; does nothing if both are empty.
    /// Removing an absent address is not an error (see [`render_update`]).
    pub fn update(&self, table: &TableName, added: &[IpAddr], removed: &[IpAddr]) -> Result<()> {
        let Some(script) = render_update(table, added, removed) else {
            return Ok(());
        };
        tracing::debug!(%table, added = added.len(), removed = removed.len(), "updating meshed sets");
        self.nft("update", table, &["-f", "-"], Some(&script))
            .map(drop)
    }

    /// Adds and removes per-pod capture ports in one transaction (TPROXY tables only); does
    /// nothing if both are empty. Removing an absent address is not an error, but each removed
    /// pair must carry the port the kernel has for it (the caller tracks it): adding an address
    /// that is present with another port fails the whole batch, which then changes nothing (see
    /// [`render_port_update`]).
    pub fn update_ports(
        &self,
        table: &TableName,
        added: &[(IpAddr, NonZeroU16)],
        removed: &[(IpAddr, NonZeroU16)],
    ) -> Result<()> {
        let Some(script) = render_port_update(table, added, removed) else {
            return Ok(());
        };
        tracing::debug!(%table, added = added.len(), removed = removed.len(), "updating pod ports");
        self.nft("update", table, &["-f", "-"], Some(&script))
            .map(drop)
    }

    /// Checks that the table in the kernel matches `rules` exactly (see [`verify_listing`]) and,
    /// with TPROXY, that the policy routing does (see [`routing_differences`]); every difference
    /// is reported in one [`Error::Mismatch`].
    pub fn verify(&self, rules: &RuleSet) -> Result<()> {
        let mut differences = if self.exists(&rules.table)? {
            let table = rules.table.as_str();
            let output = self.nft(
                "list",
                &rules.table,
                &["-j", "list", "table", "inet", table],
                None,
            )?;
            match verify_listing(rules, &String::from_utf8_lossy(&output.stdout)) {
                Ok(()) => Vec::new(),
                Err(Error::Mismatch { differences, .. }) => differences,
                Err(other) => return Err(other),
            }
        } else {
            vec!["the table does not exist".to_owned()]
        };
        if let Some(routing) = rules.policy_routing() {
            differences.extend(routing_differences(
                routing,
                &self.routing_listing(routing)?,
            ));
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(Error::Mismatch {
                table: rules.table.to_string(),
                differences,
            })
        }
    }

    /// Deletes the table, then every rule looking up the policy routing's table and every route
    /// in it (also when the table could not be deleted); succeeds if none of it exists, so it is
    /// safe both at startup (to clean up after a crashed run) and at shutdown.
    pub fn remove(&self, rules: &RuleSet) -> Result<()> {
        tracing::debug!(table = %rules.table, "removing capture rules");
        let table = self.nft(
            "remove",
            &rules.table,
            &["-f", "-"],
            Some(&render_remove(&rules.table)),
        );
        // The policy routing goes even if the table could not (e.g. nft is missing after a
        // failed start); the first error is reported.
        let routing = self.remove_routing(&rules.routing, rules.capture == Capture::Redirect);
        table.map(drop).and(routing)
    }

    /// Whether the `inet` table exists.
    pub fn exists(&self, table: &TableName) -> Result<bool> {
        let output = self.nft("list", table, &["-j", "list", "tables", "inet"], None)?;
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

    /// What the kernel has of our policy routing, per family (`None` where the family is not
    /// supported).
    pub fn routing_listing(&self, routing: &PolicyRouting) -> Result<RoutingListing> {
        let mut listing = RoutingListing::default();
        for family in Family::ALL {
            let list_rules = IpCommand::list_rules(family, routing);
            let rules = match self.ip_output(&list_rules) {
                Ok(out) => out,
                Err(Error::IpRejected { stderr, .. })
                    if stderr.contains("Address family not supported") =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let list_routes = IpCommand::list_routes(family, routing);
            let routes = match self.ip_output(&list_routes) {
                Ok(out) => out,
                // The kernel creates a routing table with its first route.
                Err(Error::IpRejected { stderr, .. })
                    if stderr.contains("table does not exist") =>
                {
                    "[]".to_owned()
                }
                Err(e) => return Err(e),
            };
            let parsed =
                FamilyListing::parse(&rules, &routes).map_err(|detail| Error::ParseRouting {
                    command: format!("{list_rules}; {list_routes}"),
                    detail,
                })?;
            match family {
                Family::V4 => listing.v4 = Some(parsed),
                Family::V6 => listing.v6 = Some(parsed),
            }
        }
        Ok(listing)
    }

    /// Removes our policy routing; with `tolerate_missing_ip`, a node without `ip` (which then
    /// cannot have any) is fine.
    fn remove_routing(&self, routing: &PolicyRouting, tolerate_missing_ip: bool) -> Result<()> {
        let current = match self.routing_listing(routing) {
            Ok(current) => current,
            Err(Error::NotFound { program: "ip", .. }) if tolerate_missing_ip => return Ok(()),
            Err(e) => return Err(e),
        };
        self.run_ip_all(&plan_routing_removal(routing, &current))
    }

    fn run_ip_all(&self, commands: &[IpCommand]) -> Result<()> {
        for command in commands {
            tracing::debug!(%command, "policy routing");
            self.ip_output(command)?;
        }
        Ok(())
    }

    /// Runs `ip` with `command`'s arguments; its stdout, or [`Error::IpRejected`].
    fn ip_output(&self, command: &IpCommand) -> Result<String> {
        let args: Vec<&str> = command.args().iter().map(String::as_str).collect();
        match self.runner.run(Program::Ip, &args, None) {
            Ok(output) => Ok(String::from_utf8_lossy(&output.stdout).into_owned()),
            Err(RunError::Start(e)) => Err(e),
            Err(RunError::Exited(exited)) => Err(Error::IpRejected {
                command: command.to_string(),
                status: exited.status,
                stderr: exited.stderr,
            }),
        }
    }

    /// Runs nft with `args`, writing `stdin` to it if given; a non-zero exit is [`Error::Rejected`].
    fn nft(
        &self,
        action: &'static str,
        table: &TableName,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output> {
        self.runner
            .run(Program::Nft, args, stdin)
            .map_err(|e| match e {
                RunError::Start(e) => e,
                RunError::Exited(exited) => Error::Rejected {
                    action,
                    table: table.to_string(),
                    status: exited.status,
                    stderr: exited.stderr,
                },
            })
    }
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
