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
use ward_spec::linelog::LineLog;

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
    /// Whether this command runs a service (CA, agent, proxy, the mesh),
    /// not a command that prints and exits.
    pub fn serves(&self) -> bool {
        matches!(
            &self.command,
            Command::Up(_)
                | Command::Ca(ca::CaCommand::Serve(_))
                | Command::Agent(admin::AgentCommand::Run(_))
                | Command::Proxy(_)
                | Command::Demo(_)
        )
    }

    /// `--worker-threads` if given on the command line (it beats
    /// `WARD_WORKER_THREADS`, which beats the config file).
    pub fn worker_threads_flag(&self) -> Option<usize> {
        match &self.command {
            Command::Proxy(proxy::ProxyCommand::Run(args)) => args.worker_threads_flag(),
            _ => None,
        }
    }

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

/// Logs for long-running commands: human-readable by default, JSON on
/// request, on stderr through a [`LineLog`]: a thread of its own writes
/// them, so a serving thread never waits on stderr (a pipe nobody reads
/// fills after 64 KiB, and writing to it would stall the process). Past
/// [`STDERR_LIMIT`] of unwritten lines, new ones are dropped and counted, and
/// a warning says how many once stderr takes lines again.
pub fn init_logging(json: bool) {
    init_logging_to(json, Box::new(std::io::stderr()));
}

/// [`init_logging`], writing to `out` (stderr, or a test's stand-in).
fn init_logging_to(json: bool, out: Box<dyn std::io::Write + Send>) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{reload, EnvFilter};
    let (start, problem) = start_filter(std::env::var("WARD_LOG").ok().as_deref());
    let filter = EnvFilter::new(start);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = STDERR_LOG.set(LineLog::with_limit(
        "stderr",
        out,
        std::time::Duration::from_secs(1),
        STDERR_LIMIT,
    ));
    // The filter can be replaced while the process runs (`/logging`).
    let (filter, handle) = reload::Layer::new(filter);
    ward_spec::log_level::install(Box::new(move |new| {
        if let Some(new) = new {
            let directives = audit_kept(new)?;
            let parsed = EnvFilter::try_new(&directives)
                .map_err(|e| format!("invalid log filter {new:?}: {e}"))?;
            handle.reload(parsed).map_err(|e| e.to_string())?;
        }
        handle
            .with_current(|f| f.to_string())
            .map_err(|e| e.to_string())
    }));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(|| EventText(Vec::new()));
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json().flatten_event(true)).init();
    } else {
        registry.with(fmt).init();
    }
    if let Some(problem) = problem {
        tracing::warn!("{problem}");
    }
    // A panic's message goes straight to stderr (Rust's default hook), and a
    // panic on the main thread ends the process: the lines logged before it
    // are written out first, so they are not lost and come before it.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(log) = STDERR_LOG.get() {
            log.flush_within(PANIC_FLUSH_WAIT);
        }
        report(info);
    }));
}

/// The log filter a process starts with: `WARD_LOG`, with `audit=info`
/// added unless it names the `audit` target itself (`WARD_LOG=warn` keeps
/// audit lines; `WARD_LOG=warn,audit=off` is how to leave them out) or is
/// a level that keeps them anyway (`info`, `debug`, `trace`). A
/// filter that does not parse is replaced by `info` (with audit lines), and
/// the second value says why, for a warning once logging is up.
fn start_filter(env: Option<&str>) -> (String, Option<String>) {
    let Some(given) = env.map(str::trim).filter(|e| !e.is_empty()) else {
        return ("info".into(), None);
    };
    let names_audit = given
        .split(',')
        .any(|d| d.trim().split(['=', '[']).next() == Some("audit"));
    // A lone level of info or finer keeps audit lines as it is.
    let keeps_audit = ["info", "debug", "trace"].contains(&given.to_ascii_lowercase().as_str());
    let filter = if names_audit || keeps_audit {
        given.to_owned()
    } else {
        format!("{given},audit=info")
    };
    match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(_) => (filter, None),
        Err(e) => (
            "info".into(),
            Some(format!(
                "WARD_LOG={given:?} is not a log filter ({e}); logging at info"
            )),
        ),
    }
}

/// A log filter set at run time, with `audit=info` added: audit lines are
/// kept whatever it says. `audit=info` itself (as `/logging` shows the
/// filter) may be given; any other directive for the `audit` target, or
/// one with span or field filters (which would outrank it), is refused.
fn audit_kept(filter: &str) -> Result<String, String> {
    let mut kept = Vec::new();
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if directive == "audit=info" {
            continue;
        }
        let target = directive.split(['=', '[']).next().unwrap_or_default();
        if target == "audit" || directive.contains('[') {
            return Err(format!(
                "{directive:?}: the audit target stays at info (and span or field filters are not taken at run time)"
            ));
        }
        kept.push(directive);
    }
    kept.push("audit=info");
    Ok(kept.join(","))
}

/// How long a panic waits for stderr to take the lines logged before it.
const PANIC_FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The most the process's own log holds while stderr is not taking lines.
pub const STDERR_LIMIT: usize = 1024 * 1024;

static STDERR_LOG: std::sync::OnceLock<LineLog> = std::sync::OnceLock::new();

/// Writes out the log lines so far (before the process exits).
pub fn flush_logs() {
    if let Some(log) = STDERR_LOG.get() {
        log.flush();
    }
}

/// One event's formatted text, handed to the stderr log when dropped.
struct EventText(Vec<u8>);

impl std::io::Write for EventText {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventText {
    fn drop(&mut self) {
        let text = self.0.strip_suffix(b"\n").unwrap_or(&self.0);
        if let (Some(log), false) = (STDERR_LOG.get(), text.is_empty()) {
            log.push(String::from_utf8_lossy(text), true);
        }
    }
}

#[cfg(test)]
mod tests {
    /// What `/logging` is given keeps audit lines at info; the filter it
    /// shows may be given back; directives that would outrank `audit=info`
    /// are refused by name.
    #[test]
    fn a_run_time_log_filter_keeps_audit_lines() {
        use super::audit_kept;
        assert_eq!(audit_kept("debug").unwrap(), "debug,audit=info");
        assert_eq!(
            audit_kept("ward_proxy=debug,audit=info,info").unwrap(),
            "ward_proxy=debug,info,audit=info"
        );
        assert_eq!(
            audit_kept("off, auditor=debug").unwrap(),
            "off,auditor=debug,audit=info"
        );
        for refused in ["audit=off", "info,audit", "audit[span]=off", "[span]=off"] {
            let e = audit_kept(refused).unwrap_err();
            assert!(e.contains("audit target"), "{refused}: {e}");
        }
    }

    /// `WARD_LOG` at start keeps audit lines unless it names the audit
    /// target; one that does not parse falls back to `info`, saying why.
    #[test]
    fn a_start_log_filter_keeps_audit_lines_unless_it_names_them() {
        use super::start_filter;
        assert_eq!(start_filter(None), ("info".into(), None));
        assert_eq!(start_filter(Some(" ")), ("info".into(), None));
        assert_eq!(start_filter(Some("warn")), ("warn,audit=info".into(), None));
        assert_eq!(start_filter(Some("debug")), ("debug".into(), None));
        assert_eq!(
            start_filter(Some("ward_ca=debug,warn")),
            ("ward_ca=debug,warn,audit=info".into(), None)
        );
        for named in ["warn,audit=off", "audit=debug", "warn,audit[x]=off"] {
            assert_eq!(start_filter(Some(named)), (named.into(), None));
        }
        let (filter, problem) = start_filter(Some("ward_ca=loud"));
        assert_eq!(filter, "info");
        let problem = problem.expect("a filter that does not parse is reported");
        assert!(problem.contains("WARD_LOG=\"ward_ca=loud\""), "{problem}");
    }

    /// Set in the child process of [`a_quiet_start_filter_still_writes_audit_lines`].
    const AUDIT_CHILD: &str = "WARD_TEST_AUDIT_CHILD";

    /// A process started with `WARD_LOG=warn` writes its audit lines (and
    /// not its other info lines); a filter that does not parse is warned of.
    #[test]
    fn a_quiet_start_filter_still_writes_audit_lines() {
        if std::env::var_os(AUDIT_CHILD).is_some() {
            super::init_logging_to(false, Box::new(std::io::stderr()));
            tracing::info!(target: "audit", event = "test_event", "an audit line");
            tracing::info!("an ordinary info line");
            super::flush_logs();
            return;
        }
        let child = |filter: &str| {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "cli::tests::a_quiet_start_filter_still_writes_audit_lines",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(AUDIT_CHILD, "1")
                .env("WARD_LOG", filter)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        let quiet = child("warn");
        assert!(quiet.contains("an audit line"), "{quiet}");
        assert!(!quiet.contains("an ordinary info line"), "{quiet}");
        let silenced = child("warn,audit=off");
        assert!(!silenced.contains("an audit line"), "{silenced}");
        let bad = child("ward=loud");
        assert!(bad.contains("is not a log filter"), "{bad}");
        assert!(bad.contains("an ordinary info line"), "{bad}");
    }

    /// Set in the child process of [`lines_logged_before_a_panic_reach_stderr_before_its_message`].
    const CHILD: &str = "WARD_TEST_PANICKING_CHILD";

    /// Stderr, reached a moment late: the log's writer thread takes a
    /// while to write each batch.
    struct SlowStderr;

    impl std::io::Write for SlowStderr {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(std::time::Duration::from_millis(300));
            std::io::stderr().write(b)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            std::io::stderr().flush()
        }
    }

    /// A child process (this test binary again, running only this test)
    /// logs a line and panics at once, while the log's writer thread is
    /// still on its way to stderr: without the flush at the panic, the
    /// panic's message (which goes straight to stderr) comes first, and the
    /// line is lost if the process ends before the writer gets there.
    #[test]
    fn lines_logged_before_a_panic_reach_stderr_before_its_message() {
        if std::env::var_os(CHILD).is_some() {
            super::init_logging_to(false, Box::new(SlowStderr));
            tracing::info!("the line before the panic");
            panic!("the test's panic");
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cli::tests::lines_logged_before_a_panic_reach_stderr_before_its_message",
                "--test-threads=1",
                // The panic's message then goes to stderr, not to the harness.
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("WARD_LOG", "info")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the child did not panic: {stderr}");
        let line = stderr.find("the line before the panic");
        let panic = stderr.find("the test's panic");
        assert!(
            matches!((line, panic), (Some(l), Some(p)) if l < p),
            "the logged line must come before the panic's message: {stderr}"
        );
    }
}
