//! `ward agent run`.

use std::net::SocketAddr;
use std::path::PathBuf;

use ward_agent::AgentConfig;

/// Every key of the config file, also as a flag (the flag wins).
#[derive(clap::Args)]
pub struct RunArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Trust domain. Default example.org
    #[arg(long)]
    trust_domain: Option<String>,
    /// A CA node API address (repeat for several; the agent fails over). Default 127.0.0.1:8081
    #[arg(long = "ca-address")]
    ca_addresses: Vec<String>,
    /// PEM roots to trust the CA with on first start (`ward bundle show` on the CA).
    #[arg(long)]
    trust_bundle: Option<PathBuf>,
    /// One-time join token (`ward token create` on the CA); only needed until the agent has a node SVID.
    /// Better given as WARD_JOIN_TOKEN: a command line is shown to every local user by `ps`.
    #[arg(long, env = "WARD_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Data directory (node key, node SVID, bundle). Default .ward/agent
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Workload API socket. Default .ward/agent/workload.sock
    #[arg(long)]
    socket_path: Option<PathBuf>,
    /// Address of /healthz, /readyz and /metrics. Default 127.0.0.1:8083
    #[arg(long)]
    health_address: Option<SocketAddr>,
    /// Entry sync interval (changes are also pushed). Default 5s
    #[arg(long, value_parser = ward_spec::duration::parse_duration)]
    sync_interval: Option<std::time::Duration>,
    /// A CA call without an answer for this long fails over to the next CA. Default 15s
    #[arg(long, value_parser = ward_spec::duration::parse_duration)]
    ca_call_timeout: Option<std::time::Duration>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
}

impl RunArgs {
    pub fn into_config(self) -> anyhow::Result<AgentConfig> {
        let mut c = match &self.config {
            Some(p) => AgentConfig::from_file(p)?,
            None => AgentConfig::default(),
        };
        if let Some(td) = self.trust_domain {
            c.trust_domain = ward_spec::TrustDomain::new(&td)
                .map_err(|e| anyhow::anyhow!("--trust-domain {td:?}: {e}"))?;
        }
        if !self.ca_addresses.is_empty() {
            c.ca_addresses = self.ca_addresses;
        }
        macro_rules! set_opt {
            ($($f:ident),*) => { $( if self.$f.is_some() { c.$f = self.$f; } )* };
        }
        set_opt!(trust_bundle, join_token);
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            data_dir,
            socket_path,
            health_address,
            sync_interval,
            ca_call_timeout,
            log_format
        );
        c.validate()?;
        Ok(c)
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = args.into_config()?;
    super::init_logging(cfg.log_format == "json");
    ward_agent::run(cfg, super::ca::shutdown_signal()).await
}
