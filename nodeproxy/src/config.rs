//! The one door for the daemon's configuration.
//!
//! Owns [`Config`]: built once from the command line and `NODEPROXY_*` environment variables
//! (clap reads both), validated as a whole so that every problem is reported together, and
//! served as JSON at `/config_dump`. Other modules receive the typed value; nothing else in the
//! workspace reads the environment.
//!
//! Must not touch: sockets, the kernel, the world view (that comes from `controlplane`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

/// The embedded standalone world view (`examples/demo.yaml`), used when no `--config` is given.
pub const EMBEDDED_CONFIG: &str = include_str!("../../examples/demo.yaml");
/// The node name of the embedded world view.
pub const EMBEDDED_NODE: &str = "demo-node";

/// Default ports (see DESIGN §4).
pub mod ports {
    /// Outbound capture.
    pub const OUTBOUND: u16 = 15001;
    /// Admin (`/live`, `/ready`, `/config_dump`, `/tenants`).
    pub const ADMIN: u16 = 15000;
    /// Prometheus `/metrics`.
    pub const METRICS: u16 = 15020;
}

/// `nodeproxy run` options. Every flag can also be set by its `NODEPROXY_*` variable.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// World view: a YAML stream of Kubernetes-shaped objects (Namespace, Pod). Without it, the
    /// embedded demo view is used.
    #[arg(long, env = "NODEPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name (`spec.nodeName` of its pods). Defaults to the embedded view's node
    /// when no --config is given.
    #[arg(long, env = "NODEPROXY_NODE")]
    pub node: Option<String>,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, env = "NODEPROXY_TRUST_DOMAIN", default_value = certs::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Outbound capture listeners (comma-separated); all must use the same port, which is the
    /// port the nftables rules redirect to. Port 0 is allowed only with --no-redirect.
    #[arg(long, env = "NODEPROXY_OUTBOUND_ADDR", value_delimiter = ',',
          default_values_t = [SocketAddr::from(([0, 0, 0, 0], ports::OUTBOUND)),
                              SocketAddr::from(([0u16; 8], ports::OUTBOUND))])]
    pub outbound_addr: Vec<SocketAddr>,
    /// Admin listener.
    #[arg(long, env = "NODEPROXY_ADMIN_ADDR", default_value_t = SocketAddr::from(([127, 0, 0, 1], ports::ADMIN)))]
    pub admin_addr: SocketAddr,
    /// Prometheus listener.
    #[arg(long, env = "NODEPROXY_METRICS_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::METRICS)))]
    pub metrics_addr: SocketAddr,
    /// Do not install nftables rules (traffic must reach the outbound port some other way).
    #[arg(long, env = "NODEPROXY_NO_REDIRECT")]
    pub no_redirect: bool,
    /// Name of our nftables table (family inet).
    #[arg(long, env = "NODEPROXY_NFT_TABLE", default_value = "nodeproxy")]
    pub nft_table: String,
    /// The nft binary.
    #[arg(long, env = "NODEPROXY_NFT", default_value = "nft")]
    pub nft: PathBuf,
    /// A remote control plane (`http://host:15012`) to watch this node's view from, instead of
    /// running one in-process over --config or the embedded view. Needs --node.
    #[arg(long, env = "NODEPROXY_CONTROL_PLANE", conflicts_with = "config")]
    pub control_plane: Option<String>,
    /// The bearer token for --control-plane, read at every connect: a bootstrap token, or the
    /// projected service-account token (audience nodeproxy-controlplane).
    #[arg(long, env = "NODEPROXY_CONTROL_PLANE_TOKEN_FILE", requires = "control_plane")]
    pub control_plane_token_file: Option<PathBuf>,
}

/// Where the world view comes from.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ViewSource {
    /// A file of Kubernetes-shaped YAML objects.
    File(PathBuf),
    /// The embedded demo view.
    Embedded,
}

/// A remote control plane.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ControlPlane {
    /// `http://host:port`.
    pub endpoint: String,
    /// Where the bearer token is read from at every connect.
    pub token_file: Option<PathBuf>,
}

/// How traffic is captured.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Capture {
    /// nftables REDIRECT to the outbound port, managed by the daemon.
    Nftables {
        /// Table name (family inet).
        table: String,
        /// The nft binary.
        nft: PathBuf,
    },
    /// No rules: something else steers traffic to the outbound listener.
    Disabled,
}

/// The resolved daemon configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// This node's name.
    pub node: String,
    /// Where the world view comes from.
    pub view: ViewSource,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Outbound capture listeners.
    pub outbound_addrs: Vec<SocketAddr>,
    /// Admin listener.
    pub admin_addr: SocketAddr,
    /// Prometheus listener.
    pub metrics_addr: SocketAddr,
    /// Capture mode.
    pub capture: Capture,
    /// A remote control plane; `None`: one runs in-process over `view`.
    pub control_plane: Option<ControlPlane>,
}

/// Every problem found in the configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// Resolves and validates `nodeproxy run` options.
    pub fn from_args(args: RunArgs) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let control_plane = args.control_plane.clone().map(|endpoint| {
            if args.node.is_none() {
                errors.push(format!("--node (NODEPROXY_NODE) is required with --control-plane {endpoint}: name the node whose view to watch"));
            }
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                errors.push(format!("--control-plane {endpoint:?}: use http://host:port"));
            }
            ControlPlane {
                endpoint,
                token_file: args.control_plane_token_file.clone(),
            }
        });
        let (view, node) = match (args.config, args.node) {
            (Some(path), Some(node)) => (ViewSource::File(path), node),
            (None, node) => (
                ViewSource::Embedded,
                node.unwrap_or_else(|| EMBEDDED_NODE.to_owned()),
            ),
            (Some(path), None) => {
                errors.push(format!(
                    "--node (NODEPROXY_NODE) is required with --config {}: name the node whose pods this daemon serves",
                    path.display()
                ));
                (ViewSource::File(path), String::new())
            }
        };
        if !node.is_empty() && !is_dns_name(&node) {
            errors.push(format!(
                "node name {node:?} is not a valid Kubernetes node name (lowercase letters, digits, '-' and '.')"
            ));
        }
        if let Err(e) = certs::Identity::new(&args.trust_domain, "x", "x") {
            errors.push(format!("--trust-domain: {e}"));
        }
        if args.outbound_addr.is_empty() {
            errors.push("--outbound-addr: at least one listener is needed".to_owned());
        }
        let outbound_ports: std::collections::BTreeSet<u16> =
            args.outbound_addr.iter().map(|a| a.port()).collect();
        if outbound_ports.len() > 1 {
            errors.push(format!(
                "--outbound-addr: all outbound listeners must share one port (the redirect target), got ports {outbound_ports:?}"
            ));
        }
        let capture = if args.no_redirect {
            Capture::Disabled
        } else {
            if outbound_ports.contains(&0) {
                errors.push(
                    "--outbound-addr: port 0 cannot be a redirect target; pick a port or pass --no-redirect"
                        .to_owned(),
                );
            }
            if !is_nft_name(&args.nft_table) {
                errors.push(format!(
                    "--nft-table {:?}: use letters, digits and '_' only",
                    args.nft_table
                ));
            }
            Capture::Nftables {
                table: args.nft_table,
                nft: args.nft,
            }
        };
        let mut binds: Vec<SocketAddr> = args.outbound_addr.clone();
        binds.extend([args.admin_addr, args.metrics_addr]);
        for (i, a) in binds.iter().enumerate() {
            if a.port() != 0 && binds[..i].contains(a) {
                errors.push(format!(
                    "address {a} is configured for two listeners; give each its own"
                ));
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Config {
            node,
            view,
            trust_domain: args.trust_domain,
            outbound_addrs: args.outbound_addr,
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            capture,
            control_plane,
        })
    }

    /// The port the redirect rules send captured traffic to.
    pub fn outbound_port(&self) -> u16 {
        self.outbound_addrs.first().map_or(0, |a| a.port())
    }
}

fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

fn is_nft_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.as_bytes()[0].is_ascii_alphabetic()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigErrors> {
        let cli =
            Cli::try_parse_from(std::iter::once("nodeproxy").chain(args.iter().copied())).unwrap();
        Config::from_args(cli.run)
    }

    #[test]
    fn defaults_use_the_embedded_view_and_design_ports() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.view, ViewSource::Embedded);
        assert_eq!(c.node, EMBEDDED_NODE);
        assert_eq!(c.outbound_port(), 15001);
        assert_eq!(c.admin_addr.port(), 15000);
        assert_eq!(c.metrics_addr.port(), 15020);
        assert!(matches!(c.capture, Capture::Nftables { ref table, .. } if table == "nodeproxy"));
    }

    #[test]
    fn all_problems_are_reported_together() {
        let err = parse(&[
            "--config",
            "/etc/x.yaml",
            "--trust-domain",
            "Bad_Domain",
            "--outbound-addr",
            "0.0.0.0:1,0.0.0.0:2",
            "--nft-table",
            "no-dashes",
        ])
        .unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.0.len(), 4, "{msg}");
        assert!(msg.contains("--node"), "{msg}");
        assert!(msg.contains("Bad_Domain"), "{msg}");
        assert!(msg.contains("share one port"), "{msg}");
        assert!(msg.contains("no-dashes"), "{msg}");
    }

    #[test]
    fn port_zero_needs_no_redirect() {
        assert!(parse(&["--outbound-addr", "127.0.0.1:0"]).is_err());
        let c = parse(&["--outbound-addr", "127.0.0.1:0", "--no-redirect"]).unwrap();
        assert_eq!(c.capture, Capture::Disabled);
    }

    #[test]
    fn a_shared_listener_address_is_an_error() {
        let err = parse(&["--admin-addr", "0.0.0.0:15020"]).unwrap_err();
        assert!(err.to_string().contains("0.0.0.0:15020"), "{err}");
    }
}
