//! Command-line parsing and dispatch.

pub(crate) mod admin;
mod agent;
mod ca;
mod demo;
mod output;
mod policy;
mod proxy;
mod svid;
mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub use output::Output;

#[derive(Parser)]
#[command(
    name = "ward",
    version,
    about = "Ward: a zero-trust identity and mTLS mesh in one binary"
)]
pub struct Cli {
    /// Output format for client commands.
    #[arg(long, global = true, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Start a complete local mesh (CA, agent, two tenants' services behind
    /// proxies, demo policies) and show what it allows and denies.
    Up(up::UpArgs),
    /// The control plane: a certificate authority issuing SPIFFE identities.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Join tokens for attesting new node agents.
    #[command(subcommand)]
    Token(admin::TokenCommand),
    /// Registration entries: which workloads get which SPIFFE ID.
    #[command(subcommand)]
    Entry(admin::EntryCommand),
    /// The node agent, and the agents known to the CA.
    #[command(subcommand)]
    Agent(admin::AgentCommand),
    /// Cedar policies: validate, format, test, explain, matrix; push to the CA, history, rollback.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// The tunneling sidecar: mutual-TLS tunnels authorized by Cedar.
    #[command(subcommand)]
    Proxy(proxy::ProxyCommand),
    /// Workload API clients: fetch and validate SVIDs.
    #[command(subcommand)]
    Svid(svid::SvidCommand),
    /// The trust bundle of the CA's trust domain.
    #[command(subcommand)]
    Bundle(admin::BundleCommand),
    /// Programs the `ward up` demo runs.
    #[command(subcommand, hide = true)]
    Demo(demo::DemoCommand),
}

/// Where to reach the CA's admin API: its local socket (as the operator), or
/// its mutual-TLS port as a remote admin with an admin SVID from the Workload API.
#[derive(clap::Args, Clone)]
pub struct AdminTarget {
    /// The CA admin socket.
    #[arg(long, env = "WARD_ADMIN_SOCKET", default_value = ".ward/ca/admin.sock")]
    pub socket: PathBuf,
    /// A CA's node API address (host:port): call it remotely with this
    /// workload's admin SVID (an entry marked --admin) instead of the socket.
    #[arg(long, env = "WARD_CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// The Workload API socket the admin SVID comes from (with --ca-address).
    #[arg(
        long,
        env = "SPIFFE_ENDPOINT_SOCKET",
        default_value = "unix://.ward/agent/workload.sock"
    )]
    pub workload_socket: String,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BundleFormat {
    Pem,
    Jwks,
}

impl Cli {
    /// Runtime worker threads this command wants (None: one per core).
    pub fn worker_threads(&self) -> Option<usize> {
        match &self.command {
            Command::Proxy(proxy::ProxyCommand::Run(args)) => Some(args.worker_threads()),
            _ => None,
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ca(c) => ca::run(c, cli.output).await,
        Command::Token(c) => admin::token(c, cli.output).await,
        Command::Entry(c) => admin::entry(c, cli.output).await,
        Command::Agent(c) => admin::agent(c, cli.output).await,
        Command::Bundle(c) => admin::bundle(c, cli.output).await,
        Command::Svid(c) => svid::run(c, cli.output).await,
        Command::Policy(c) => policy::run(c, cli.output).await,
        Command::Proxy(c) => proxy::run(c).await,
        Command::Up(a) => up::run(a).await,
        Command::Demo(c) => demo::run(c).await,
    }
}

/// Logs for long-running commands: human-readable by default, JSON on request.
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
