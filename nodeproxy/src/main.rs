//! The `nodeproxy` binary: `run`, `demo`, `rules`. Wiring only; the work is in the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nodeproxy::app::{self, StartOptions};
use nodeproxy::config::{Config, RunArgs};
use nodeproxy::discovery::{Discovery, Reread};
use tokio::signal::unix::{SignalKind, signal};

/// A shared, per-node, multi-tenant proxy for Kubernetes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. `info,nodeproxy=debug`.
    #[arg(long, env = "NODEPROXY_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: capture meshed pods' TCP and proxy it per tenant.
    Run(RunArgs),
    /// Print the capture rules the daemon would apply: the nftables script (it passes
    /// `nft -c -f -`), with TPROXY's policy routing (`ip rule`/`ip route`) in its header
    /// comments.
    Rules(RunArgs),
    /// Build a throwaway node with pods in network namespaces, run the daemon on it, send
    /// traffic between pods and print a per-tenant table. Needs root; removes everything.
    Demo(nodeproxy::demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Rules(args) => rules(args),
        Command::Demo(args) => nodeproxy::demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::from_args(args)?;
    // Every mode reads its view through the control plane API (in-process when standalone);
    // not ready until the first full snapshot has arrived.
    let mut discovery = Discovery::start(&config)?;
    let view = discovery.first_view(std::time::Duration::from_secs(60))?;
    let mut views = discovery.updates();
    let mut views_open = true;
    let mut running = app::start_with_view(config, view, StartOptions::default())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the signal runtime")?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                changed = views.changed(), if views_open => {
                    views_open = changed.is_ok();
                    let update = views.borrow_and_update().clone();
                    if let Some(update) = update
                        && let Err(e) = running.apply_view(update.view.clone())
                    {
                        tracing::error!(error = format!("{e:#}"), version = update.version, "cannot apply the node view; keeping the last good one");
                    }
                }
                _ = hup.recv() => match discovery.reread() {
                    Reread::File(path) => tracing::info!(path = %path.display(), "SIGHUP: re-reading the view file"),
                    Reread::ControlPlane(endpoint) => tracing::info!(%endpoint, "SIGHUP: the node view comes from the control plane; nothing to reload"),
                    Reread::Embedded => tracing::info!("SIGHUP: the embedded view never changes; nothing to reload"),
                },
            }
        }
        anyhow::Ok(())
    })?;
    tracing::info!("shutting down");
    running.shutdown();
    drop(discovery);
    Ok(())
}

fn rules(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::from_args(args)?;
    let view = app::load_view(&config)?;
    let snap = nodeproxy::state::Snapshot::new(view, 1);
    let Some(set) = app::capture_rule_set(&config, &snap)? else {
        anyhow::bail!("--no-redirect is set: the daemon would apply no rules")
    };
    print!("{}", redirect::render(&set));
    Ok(())
}
