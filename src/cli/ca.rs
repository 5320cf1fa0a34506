//! `ward ca serve` and `ward ca rotate`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;
use ward_ca::config::{parse_duration, LogFormat};
use ward_ca::CaConfig;
use ward_spec::proto::admin::v1 as pb;

use super::{output, AdminTarget, Output};

#[derive(Subcommand)]
pub enum CaCommand {
    /// Run the certificate authority.
    #[command(
        after_help = "Example:\n  ward ca serve --trust-domain example.org --data-dir /var/lib/ward/ca\n  ward ca serve --config ca.toml --log-format json"
    )]
    Serve(Box<ServeArgs>),
    /// Prepare a new signing slot and activate it now (its keys enter the bundle first).
    #[command(after_help = "Example:\n  ward ca rotate --socket /var/lib/ward/ca/admin.sock")]
    Rotate {
        #[command(flatten)]
        target: AdminTarget,
    },
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    parse_duration(s)
}

/// Every key of the config file, also as a flag (the flag wins).
#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Trust domain. Default example.org
    #[arg(long)]
    trust_domain: Option<String>,
    /// Data directory (keys, SQLite store, admin socket). Default .ward/ca
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node API address (mutual TLS gRPC). Default 127.0.0.1:8081
    #[arg(long)]
    bind_address: Option<SocketAddr>,
    /// Admin API Unix socket. Default <data-dir>/admin.sock
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Address of /healthz, /readyz and /metrics. Default 127.0.0.1:8082
    #[arg(long)]
    health_address: Option<SocketAddr>,
    /// Datastore URL: sqlite://PATH, or postgres://USER:PASSWORD@HOST:PORT/DB for
    /// several replicas on one database. Default sqlite://<data-dir>/datastore.sqlite3
    #[arg(long)]
    datastore: Option<String>,
    /// Intermediate (signing) CA lifetime. Default 24h
    #[arg(long, value_parser = duration)]
    ca_ttl: Option<std::time::Duration>,
    /// Root CA lifetime. Default 8760h
    #[arg(long, value_parser = duration)]
    root_ttl: Option<std::time::Duration>,
    /// Workload X509-SVID lifetime. Default 1h
    #[arg(long, value_parser = duration)]
    x509_svid_ttl: Option<std::time::Duration>,
    /// JWT-SVID lifetime. Default 5m
    #[arg(long, value_parser = duration)]
    jwt_svid_ttl: Option<std::time::Duration>,
    /// Node SVID lifetime. Default 1h
    #[arg(long, value_parser = duration)]
    node_svid_ttl: Option<std::time::Duration>,
    /// Default join token lifetime. Default 10m
    #[arg(long, value_parser = duration)]
    join_token_ttl: Option<std::time::Duration>,
    /// How often the key schedule is checked. Default 10s
    #[arg(long, value_parser = duration)]
    rotation_check_interval: Option<std::time::Duration>,
    /// How long an entry's deletion is kept for agents to sync; an agent
    /// further behind syncs every entry again. Default 24h
    #[arg(long, value_parser = duration)]
    entry_change_retention: Option<std::time::Duration>,
    /// PEM certificate of an existing root to sign intermediates with.
    #[arg(long, requires = "upstream_key")]
    upstream_cert: Option<PathBuf>,
    /// PEM PKCS#8 key of --upstream-cert.
    #[arg(long, requires = "upstream_cert")]
    upstream_key: Option<PathBuf>,
    /// Serve our bundle as a SPIFFE bundle endpoint (https_spiffe) on this address.
    #[arg(long)]
    federation_address: Option<std::net::SocketAddr>,
    /// How often federated bundles are fetched from their endpoints. Default: each bundle's refresh hint
    #[arg(long, value_parser = duration)]
    federation_refresh_interval: Option<std::time::Duration>,
    /// Which path segments of this trust domain's SPIFFE IDs name the tenant,
    /// namespace and service, for admin policies. Default /tenant/{tenant}/ns/{namespace}/sa/{service}
    #[arg(long)]
    id_template: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// How long a node API connection without a client certificate (an
    /// agent attesting with a join token) stays open. Default 30s
    #[arg(long, value_parser = duration)]
    unauthenticated_timeout: Option<std::time::Duration>,
    /// How many node API connections without a client certificate may be
    /// open at once; more are closed after their handshake. Default 1024
    #[arg(long)]
    max_unauthenticated_connections: Option<usize>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<CaConfig> {
        let mut c = match &self.config {
            Some(p) => CaConfig::from_file(p)?,
            None => CaConfig::default(),
        };
        if let Some(td) = self.trust_domain {
            c.trust_domain = ward_spec::TrustDomain::new(&td)
                .map_err(|e| anyhow::anyhow!("--trust-domain {td:?}: {e}"))?;
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            data_dir,
            bind_address,
            health_address,
            ca_ttl,
            root_ttl,
            x509_svid_ttl,
            jwt_svid_ttl,
            node_svid_ttl,
            join_token_ttl,
            rotation_check_interval,
            entry_change_retention,
            unauthenticated_timeout,
            max_unauthenticated_connections
        );
        if self.admin_socket.is_some() {
            c.admin_socket = self.admin_socket;
        }
        if self.datastore.is_some() {
            c.datastore = self.datastore;
        }
        if self.upstream_cert.is_some() {
            c.upstream_cert = self.upstream_cert;
            c.upstream_key = self.upstream_key;
        }
        if self.federation_address.is_some() {
            c.federation_address = self.federation_address;
        }
        if self.federation_refresh_interval.is_some() {
            c.federation_refresh_interval = self.federation_refresh_interval;
        }
        if let Some(t) = self.id_template {
            c.id_template = t;
        }
        if let Some(f) = self.log_format {
            c.log_format = match f.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => anyhow::bail!("--log-format {other:?}: use text or json"),
            };
        }
        c.validate()?;
        Ok(c)
    }
}

pub async fn run(cmd: CaCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Serve(args) => {
            let cfg = args.into_config()?;
            super::init_logging(cfg.log_format == LogFormat::Json);
            ward_ca::server::serve(cfg, shutdown_signal()).await
        }
        CaCommand::Rotate { target } => {
            let mut c = super::admin::client(&target).await?;
            let r = c.rotate(pb::RotateRequest {}).await?.into_inner();
            match out {
                Output::Json => output::print_json(&json!({
                    "active_serial": r.active_serial,
                    "active_not_after": r.active_not_after,
                    "bundle_sequence": r.bundle_sequence,
                })),
                Output::Human => println!(
                    "Rotated. Active signing CA serial {} (expires {}); bundle sequence {}.",
                    r.active_serial,
                    output::time(r.active_not_after),
                    r.bundle_sequence
                ),
            }
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
