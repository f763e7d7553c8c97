//! `nodeproxy-controlplane`: serves per-node views over gRPC on 15012 from the Kubernetes API
//! or a file, over TLS with a serving certificate from its own CA, and prints our CRDs
//! (`nodeproxy-controlplane crds`). Wiring only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use controlplane::auth::{
    Authenticator, BootstrapTokens, DEFAULT_DAEMON_ACCOUNT, ServiceAccountRef,
};
use controlplane::feed::{FileInput, Publisher};
use controlplane::kubernetes::{AUDIENCE, KubeSource, TokenReviewAuth};
use controlplane::server::Transport;
use controlplane::view::Mode;

/// The nodeproxy control plane.
#[derive(Debug, Parser)]
#[command(name = "nodeproxy-controlplane", version, about)]
struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "NODEPROXY_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (what manifests/crds/nodeproxy.io.yaml holds).
    Crds,
    /// Generate the control plane's CA into two new files (the key with mode 0600) and exit;
    /// loads and checks them instead if both exist, and never overwrites one. For the
    /// `nodeproxy-ca` Secret and the `nodeproxy-ca-bundle` ConfigMap (docs/install.md).
    CaInit {
        /// Where the CA certificate (PEM) goes.
        #[arg(long)]
        ca_cert: PathBuf,
        /// Where the CA key (PEM, PKCS#8) goes.
        #[arg(long)]
        ca_key: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Source {
    /// Watch the Kubernetes API (in-cluster config or KUBECONFIG).
    Kubernetes,
    /// Read Kubernetes-shaped YAML from --file, reloading it when it changes.
    File,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Where the objects come from.
    #[arg(long, env = "NODEPROXY_CP_SOURCE", value_enum, default_value_t = Source::Kubernetes)]
    source: Source,
    /// The YAML file of --source file.
    #[arg(long, env = "NODEPROXY_CP_FILE", required_if_eq("source", "file"))]
    file: Option<PathBuf>,
    /// The gRPC listener.
    #[arg(long, env = "NODEPROXY_CP_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], 15012)))]
    listen: SocketAddr,
    /// Prometheus /metrics listener.
    #[arg(long, env = "NODEPROXY_CP_METRICS_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], 15014)))]
    metrics_addr: SocketAddr,
    /// Lines of `<token> [<node>]`: nodes authenticate with `authorization: Bearer <token>`.
    /// Required with --source file; with --source kubernetes it replaces TokenReview.
    #[arg(long, env = "NODEPROXY_CP_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// The audience nodes' projected service-account tokens must carry.
    #[arg(long, env = "NODEPROXY_CP_AUDIENCE", default_value = AUDIENCE)]
    audience: String,
    /// The nodeproxy daemon's ServiceAccount, `<namespace>/<name>`: only tokens of its own
    /// pods may speak for a node (TokenReview; any other pod's token is refused).
    #[arg(long, env = "NODEPROXY_CP_DAEMON_SERVICE_ACCOUNT", default_value = DEFAULT_DAEMON_ACCOUNT)]
    daemon_service_account: ServiceAccountRef,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, env = "NODEPROXY_TRUST_DOMAIN", default_value = certs::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// CA certificate (PEM); with --ca-key. Loaded if both files exist, else generated and
    /// written there. The CA signs the serving certificate of --listen and, for
    /// `Identity.Certify`, workload certificates; nodes verify the control plane against this
    /// file (--control-plane-ca). Required unless --insecure-plaintext (then, without it,
    /// Certify answers UNIMPLEMENTED).
    #[arg(long, env = "NODEPROXY_CP_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// CA key (PEM, PKCS#8), see --ca-cert.
    #[arg(long, env = "NODEPROXY_CP_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The names nodes dial the control plane by (comma-separated DNS names or IP addresses):
    /// the serving certificate of --listen is valid for exactly these.
    #[arg(
        long,
        env = "NODEPROXY_CP_SERVING_NAMES",
        value_delimiter = ',',
        default_values = controlplane::server::DEFAULT_SERVING_NAMES,
        conflicts_with = "insecure_plaintext"
    )]
    serving_names: Vec<String>,
    /// Serve gRPC in plain text, without TLS. Nodes then refuse to send their tokens, and
    /// anyone on the path could read the views: for local experiments only (logged as a
    /// warning).
    #[arg(long, env = "NODEPROXY_CP_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
    /// Lifetime of issued workload certificates, seconds.
    #[arg(
        long,
        env = "NODEPROXY_CP_CERT_LIFETIME_SECS",
        default_value_t = 86_400
    )]
    cert_lifetime_secs: u64,
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
        Some(Command::Crds) => controlplane::crd::crds_yaml()
            .map(|yaml| print!("{yaml}"))
            .context("cannot render the CRDs"),
        Some(Command::CaInit { ca_cert, ca_key }) => {
            certs::Ca::load_or_generate(&cli.serve.trust_domain, &ca_cert, &ca_key)
                .map(|_| println!("CA ready: {} and {}", ca_cert.display(), ca_key.display()))
                .context("cannot create the CA")
        }
        None => serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    certs::Identity::new(&args.trust_domain, "x", "x")
        .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => Some(Arc::new(
            certs::Ca::load_or_generate(&args.trust_domain, cert, key)?
                .with_lifetime(Duration::from_secs(args.cert_lifetime_secs)),
        )),
        _ => None,
    };
    // Before anything starts: a control plane that cannot serve TLS does not serve.
    let transport = transport(&args, ca.as_ref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot build the runtime")?;
    rt.block_on(async move {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(args.metrics_addr)
            .install()
            .with_context(|| format!("cannot serve metrics on {} (--metrics-addr)", args.metrics_addr))?;
        let tokens = args
            .bootstrap_token_file
            .as_deref()
            .map(BootstrapTokens::load)
            .transpose()?;
        let (auth, feed): (Arc<dyn Authenticator>, _) = match args.source {
            Source::File => {
                let path = args.file.clone().context("--file is required with --source file")?;
                let tokens = tokens.context(
                    "--bootstrap-token-file is required with --source file: nodes must authenticate",
                )?;
                let (publisher, feed) = Publisher::new(&args.trust_domain, Mode::Strict);
                tokio::spawn(controlplane::feed::watch_file(
                    FileInput::Path(path),
                    publisher,
                    Duration::from_secs(1),
                ));
                (Arc::new(tokens), feed)
            }
            Source::Kubernetes => {
                let client = kube::Client::try_default()
                    .await
                    .context("cannot configure the kubernetes client (in-cluster or KUBECONFIG)")?;
                let (publisher, feed) = Publisher::new(&args.trust_domain, Mode::Lenient);
                KubeSource::spawn(client.clone(), publisher);
                let auth: Arc<dyn Authenticator> = match tokens {
                    Some(tokens) => Arc::new(tokens),
                    None => Arc::new(TokenReviewAuth::with_account(
                        client,
                        args.audience.clone(),
                        args.daemon_service_account.clone(),
                    )),
                };
                (auth, feed)
            }
        };
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot watch SIGTERM")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
        };
        controlplane::server::serve_on(listener, transport, feed, auth, ca, shutdown).await?;
        anyhow::Ok(())
    })
}

/// TLS with a serving certificate from the CA for --serving-names, unless --insecure-plaintext.
fn transport(args: &ServeArgs, ca: Option<&Arc<certs::Ca>>) -> anyhow::Result<Transport> {
    if args.insecure_plaintext {
        tracing::warn!(
            listen = %args.listen,
            "--insecure-plaintext: serving gRPC without TLS; nodes will not send their tokens and \
             anyone on the path can read the views. Use it only for local experiments"
        );
        return Ok(Transport::Plaintext);
    }
    let (Some(ca), Some(ca_cert)) = (ca, &args.ca_cert) else {
        anyhow::bail!(
            "--ca-cert and --ca-key are required: the control plane's CA signs the serving \
             certificate of {} (nodes verify it with --control-plane-ca); give both paths \
             (generated there on first start when absent), or --insecure-plaintext for a local \
             experiment",
            args.listen
        );
    };
    let names = certs::ServingNames::parse(&args.serving_names).context("--serving-names")?;
    let serving =
        certs::ServingCert::new(ca.clone(), names, certs::serving::DEFAULT_SERVING_LIFETIME)
            .context("cannot issue the serving certificate")?;
    tracing::info!(
        listen = %args.listen, names = %serving.names(),
        "serving gRPC over TLS; nodes verify it with --control-plane-ca {}", ca_cert.display()
    );
    Ok(Transport::Tls(serving.server_config()?))
}
