//! `ward up`: a complete local mesh in one command, on the embedded store.
//!
//! It starts, in order and each as its own process of this same binary: a CA
//! (SQLite in `DIR/ca`), the demo policy set pushed to it, one agent, and two
//! tenants' services (`acme`: web → api → db; `globex`: web → api), each a
//! small HTTP program (`ward demo app`) behind its own `ward proxy`. Each
//! proxy runs from its own hard link of this binary in `DIR/bin`, so the agent
//! tells them apart by the `unix:path` selector (no extra users needed). It
//! then makes the demo calls through the proxies, prints which were allowed
//! and denied and by which policies (read from the proxies' decision logs),
//! keeps one long-lived stream open (acme/web → acme/api) and reports when a
//! policy change closes or admits it, until Ctrl-C stops everything in reverse
//! order. State in `DIR` is kept between runs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ward_spec::proto::admin::v1 as pb;
use ward_spec::proto::types::v1 as types;
use ward_spec::TrustBundle;

use super::admin;
use super::AdminTarget;

/// `println!`, but a standard output closed by its reader (`ward up | head`)
/// does not stop the mesh: what is printed then is dropped.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The demo policy set (the repository's `policies/`), pushed on the first run.
const DEMO_POLICIES: &[(&str, &str)] = &[
    (
        "00-default-deny.cedar",
        include_str!("../../policies/00-default-deny.cedar"),
    ),
    (
        "acme-services.cedar",
        include_str!("../../policies/acme-services.cedar"),
    ),
    (
        "break-glass.cedar",
        include_str!("../../policies/break-glass.cedar"),
    ),
    (
        "exceptions.cedar",
        include_str!("../../policies/exceptions.cedar"),
    ),
    (
        "globex-services.cedar",
        include_str!("../../policies/globex-services.cedar"),
    ),
    (
        "tenant-admins.cedar",
        include_str!("../../policies/tenant-admins.cedar"),
    ),
    (
        "tenant-isolation.cedar",
        include_str!("../../policies/tenant-isolation.cedar"),
    ),
];

#[derive(clap::Args)]
#[command(after_help = "Example:\n  ward up\n  ward up --dir /tmp/mesh --base-port 18700")]
pub struct UpArgs {
    /// Where the mesh keeps its data, logs and sockets (kept between runs).
    #[arg(long, default_value = ".ward-up")]
    dir: PathBuf,
    /// The first of the loopback ports the mesh uses (about 60 from here).
    #[arg(long, default_value_t = 17700)]
    base_port: u16,
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
    /// Start, show the demo calls, stop (instead of running until Ctrl-C).
    #[arg(long)]
    once: bool,
}

/// One demo service: an application behind its proxy.
struct Service {
    tenant: &'static str,
    name: &'static str,
    /// The port the application's callers name (context.destination_port).
    port: u16,
    /// The services this one calls (tenant/name).
    calls: &'static [&'static str],
}

const SERVICES: &[Service] = &[
    Service {
        tenant: "acme",
        name: "web",
        port: 8080,
        calls: &["acme/api", "acme/db", "globex/api"],
    },
    Service {
        tenant: "acme",
        name: "api",
        port: 8080,
        calls: &["acme/db"],
    },
    Service {
        tenant: "acme",
        name: "db",
        port: 5432,
        calls: &[],
    },
    Service {
        tenant: "globex",
        name: "web",
        port: 8080,
        calls: &["globex/api", "acme/api"],
    },
    Service {
        tenant: "globex",
        name: "api",
        port: 8080,
        calls: &[],
    },
];

/// The demo calls, in the order shown: (caller, callee).
const DEMO_CALLS: &[(&str, &str)] = &[
    ("acme/web", "acme/api"),
    ("acme/api", "acme/db"),
    ("globex/web", "globex/api"),
    ("acme/web", "acme/db"),
    ("acme/web", "globex/api"),
    ("globex/web", "acme/api"),
];

impl Service {
    fn label(&self) -> String {
        format!("{}/{}", self.tenant, self.name)
    }

    fn file_name(&self) -> String {
        format!("{}-{}", self.tenant, self.name)
    }
}

/// The loopback ports of the mesh, laid out from the base port.
struct Ports {
    base: u16,
}

impl Ports {
    fn at(&self, offset: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base + offset))
    }
    fn ca(&self) -> SocketAddr {
        self.at(0)
    }
    fn ca_health(&self) -> SocketAddr {
        self.at(1)
    }
    fn agent_health(&self) -> SocketAddr {
        self.at(2)
    }
    fn app(&self, i: usize) -> SocketAddr {
        self.at(10 + 10 * i as u16)
    }
    fn inbound(&self, i: usize) -> SocketAddr {
        self.at(11 + 10 * i as u16)
    }
    fn proxy_health(&self, i: usize) -> SocketAddr {
        self.at(12 + 10 * i as u16)
    }
    fn connect(&self, i: usize) -> SocketAddr {
        self.at(13 + 10 * i as u16)
    }
    fn route(&self, i: usize, j: usize) -> SocketAddr {
        self.at(14 + 10 * i as u16 + j as u16)
    }
}

/// Child processes, stopped in reverse order of start.
struct Children {
    /// Each part's name, process and log file.
    list: Vec<(String, Child, PathBuf)>,
    /// Set: stop without waiting for each part to finish.
    hurry: Arc<AtomicBool>,
}

impl Children {
    fn spawn(&mut self, name: &str, log: &Path, cmd: &mut Command) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        cmd.env(
            "WARD_LOG",
            std::env::var("WARD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Its own process group: Ctrl-C reaches `ward up` alone, which
        // then stops the parts in order.
        .process_group(0);
        let parent = rustix::process::getpid();
        // SAFETY: between fork and exec this calls only `prctl` and
        // `getppid` (system calls, async-signal-safe), and allocates nothing.
        // The death signal follows the thread that forks: this is the main
        // thread (`start` runs in `block_on`), which lives as long as `ward up`.
        unsafe {
            cmd.pre_exec(move || {
                // A `ward up` that ends without stopping it (kill -9, the
                // OOM killer) stops it all the same: SIGTERM, its drain.
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::TERM,
                ))?;
                // (Unless `ward up` was gone already.)
                if rustix::process::getppid() != Some(parent) {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.list.push((name.to_owned(), child, log.to_owned()));
        Ok(())
    }

    /// A part that exited by itself, if any: what happened, and the end
    /// of its log.
    fn exited(&mut self) -> Option<String> {
        for (name, c, log) in &mut self.list {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(format!(
                    "{name} exited ({status}); its log {} ends with:\n{}",
                    log.display(),
                    tail(log)
                ));
            }
        }
        None
    }

    fn stop_all(&mut self) {
        while let Some((name, mut c, _)) = self.list.pop() {
            if let Ok(None) = c.try_wait() {
                let pid = rustix::process::Pid::from_child(&c);
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && !self.hurry.load(Ordering::Relaxed) {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if let Ok(None) = c.try_wait() {
                    if !self.hurry.load(Ordering::Relaxed) {
                        say!("  {name} did not stop in 10 s; killing it");
                    }
                    let _ = c.kill();
                }
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Ctrl-C, SIGTERM and SIGHUP (the terminal closing), taken over before the
/// first part starts: from then on each stops the parts started so far.
/// SIGHUP is left alone when ignored (`nohup ward up`): the mesh then
/// outlives the terminal, as asked.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: (!hangup_ignored())
                .then(|| signal(SignalKind::hangup()))
                .transpose()?,
        })
    }

    async fn recv(&mut self) {
        let hup = async {
            match &mut self.hup {
                Some(hup) => hup.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            _ = hup => {}
        }
    }
}

/// Whether SIGHUP is ignored (as `nohup` leaves it).
fn hangup_ignored() -> bool {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action only reads the current one into `old`,
    // which is large enough for it.
    let r = unsafe { libc::sigaction(libc::SIGHUP, std::ptr::null(), old.as_mut_ptr()) };
    // SAFETY: zeroed is a valid `sigaction`, and a successful call filled it.
    r == 0 && unsafe { old.assume_init() }.sa_sigaction == libc::SIG_IGN
}

/// Stops every part started, in order; a signal meanwhile makes the stop
/// hurry (no waiting for each part to drain). The waiting happens on a
/// thread of its own, so that the signal is seen whatever the runtime's
/// threads (`WARD_WORKER_THREADS=1` makes it one).
async fn stop(mut children: Children, mut signals: Signals) {
    let hurry = children.hurry.clone();
    let mut stopping = tokio::task::spawn_blocking(move || children.stop_all());
    tokio::select! {
        _ = &mut stopping => return,
        _ = signals.recv() => hurry.store(true, Ordering::Relaxed),
    }
    let _ = stopping.await;
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let mut children = Children {
        list: Vec::new(),
        hurry: Arc::new(AtomicBool::new(false)),
    };
    let up = tokio::select! {
        up = start(&args, &mut children) => Some(up),
        _ = signals.recv() => None,
    };
    let mesh = match up {
        Some(Ok(mesh)) => mesh,
        Some(Err(e)) => {
            stop(children, signals).await;
            return Err(e);
        }
        None => {
            say!("\nStopping what was started…");
            stop(children, signals).await;
            say!("Stopped.");
            return Ok(());
        }
    };
    if args.once {
        say!("\nStopping (--once).");
        stop(children, signals).await;
        if !mesh.failed_calls.is_empty() {
            bail!("demo calls went wrong: {}", mesh.failed_calls.join("; "));
        }
        return Ok(());
    }
    say!("\nA long-lived stream acme/web → acme/api stays open; policy changes that close or admit it are shown here.");
    say!("Ctrl-C stops the mesh.\n");

    // 6. Run until a signal, watching the demo stream and the children.
    let watcher = StreamWatch::start(mesh.ports.route(mesh.web, 0));
    let result = loop {
        tokio::select! {
            _ = signals.recv() => break Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some(what) = children.exited() {
                    break Err(anyhow::anyhow!("{what}\n(all logs: {}/logs)", mesh.dir.display()));
                }
            }
        }
    };
    say!("\nStopping the mesh…");
    // The demo stream ends first: acme/api's proxy has nothing to drain.
    watcher.stop();
    stop(children, signals).await;
    say!("Stopped.");
    result
}

/// Whether the CA lists the agent `id`, not evicted.
async fn agent_known(
    ca: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    id: &str,
) -> anyhow::Result<bool> {
    let agents = admin::all_pages(|page_token| {
        let mut ca = ca.clone();
        async move {
            let r = ca
                .list_agents(pb::ListAgentsRequest {
                    page_token,
                    page_size: 0,
                })
                .await?
                .into_inner();
            Ok((r.agents, r.next_page_token))
        }
    })
    .await?;
    Ok(agents.iter().any(|a| a.spiffe_id == id && !a.evicted))
}

/// What `start` brought up.
struct Mesh {
    dir: PathBuf,
    ports: Ports,
    /// acme/web's index in SERVICES.
    web: usize,
    /// Demo calls that went wrong, whatever the policies said (see
    /// [`demo_call`]).
    failed_calls: Vec<String>,
}

/// Starts every part and makes the demo calls.
async fn start(args: &UpArgs, children: &mut Children) -> anyhow::Result<Mesh> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let td = ward_spec::TrustDomain::new(&args.trust_domain)
        .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
    let ports = Ports {
        base: args.base_port,
    };
    if args.base_port.checked_add(70).is_none() {
        bail!(
            "--base-port {} leaves no room for the mesh's ports",
            args.base_port
        );
    }
    let logs = dir.join("logs");
    for d in ["logs", "bin", "agent"] {
        let d = dir.join(d);
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    check_ports_free(&ports)?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    say!(
        "ward up: a local mesh in {} (trust domain {td})",
        dir.display()
    );

    // 1. The CA.
    let admin_socket = dir.join("ca/admin.sock");
    let step = Instant::now();
    children.spawn(
        "CA",
        &logs.join("ca.log"),
        Command::new(&exe)
            .args(["ca", "serve", "--trust-domain", td.as_str(), "--data-dir"])
            .arg(dir.join("ca"))
            .arg("--admin-socket")
            .arg(&admin_socket)
            .args(["--bind-address", &ports.ca().to_string()])
            .args(["--health-address", &ports.ca_health().to_string()]),
    )?;
    wait_ready(children, "CA", ports.ca_health(), &logs.join("ca.log")).await?;
    progress(
        "CA",
        &format!("{} (node API), admin socket ca/admin.sock", ports.ca()),
        step,
    );
    let target = AdminTarget {
        socket: admin_socket.clone(),
        ca_address: None,
        workload_socket: String::new(),
    };
    let mut ca = admin::client(&target).await?;

    // 2. The demo policy set, unless one is stored already.
    let step = Instant::now();
    let history = ca
        .list_policies(pb::ListPoliciesRequest {
            page_token: String::new(),
            page_size: 1,
        })
        .await
        .map_err(admin::status)?
        .into_inner();
    let policy_note = match history.versions.first() {
        Some(v) => format!("version {} (kept from the last run)", v.version),
        None => {
            let s = ca
                .push_policy(pb::PushPolicyRequest {
                    files: DEMO_POLICIES
                        .iter()
                        .map(|(name, text)| types::PolicyFile {
                            name: name.to_string(),
                            text: text.to_string(),
                        })
                        .collect(),
                    comment: "ward up: the demo set".into(),
                })
                .await
                .map_err(admin::status)?
                .into_inner();
            format!("version {}: {} policies pushed", s.version, s.policies)
        }
    };
    progress("policies", &policy_note, step);

    // 3. The agent: a join token unless it has a node identity already.
    let step = Instant::now();
    let agent_data = dir.join("agent/data");
    let state = ward_agent::state::StateDir::open(&agent_data).ok();
    let stored = state
        .as_ref()
        .and_then(|s| s.load_identity().ok().flatten());
    // One about to expire could expire before the agent reads it, or be
    // resumed though a token was made for a new one; one this CA does not
    // know (its data was removed, the agent's kept; or it was evicted)
    // would never be served. Either way the agent attests anew, and starts
    // over: its stored bundle, perhaps another CA's, is forgotten too.
    let lasts = |id: &ward_agent::state::NodeIdentity| {
        id.not_after > time::OffsetDateTime::now_utc().unix_timestamp() + 60
    };
    let stored = match stored {
        Some(id) if lasts(&id) && agent_known(&mut ca, &id.spiffe_id.to_string()).await? => {
            Some(id)
        }
        Some(id) if lasts(&id) => {
            say!("  (the agent's node identity is not this CA's: attesting anew)");
            None
        }
        _ => None,
    };
    let held_some = std::fs::read_dir(&agent_data).is_ok_and(|mut d| d.next().is_some());
    if stored.is_none() && held_some {
        say!(
            "  (the agent's data in {} is started over: it attests anew)",
            agent_data.display()
        );
        std::fs::remove_dir_all(&agent_data)
            .with_context(|| format!("cannot remove {}", agent_data.display()))?;
    }
    ward_spec::files::create_private_dir(&agent_data)?;
    let bundle = ca
        .get_bundle(pb::GetBundleRequest {})
        .await
        .map_err(admin::status)?
        .into_inner();
    let bundle = TrustBundle::from_jwks(td.clone(), &bundle.jwks)?;
    let bundle_pem: String = bundle
        .x509_authorities
        .iter()
        .map(|d| ward_spec::bundle::der_to_pem("CERTIFICATE", d))
        .collect();
    let bundle_path = dir.join("bundle.pem");
    std::fs::write(&bundle_path, bundle_pem)
        .with_context(|| format!("cannot write {}", bundle_path.display()))?;
    let socket = dir.join("agent/workload.sock");
    let mut agent_cmd = Command::new(&exe);
    agent_cmd
        .args(["agent", "run", "--trust-domain", td.as_str(), "--data-dir"])
        .arg(&agent_data)
        .arg("--socket-path")
        .arg(&socket)
        .args(["--health-address", &ports.agent_health().to_string()])
        .args(["--ca-address", &ports.ca().to_string()])
        .arg("--trust-bundle")
        .arg(dir.join("bundle.pem"));
    let agent_id = match &stored {
        Some(id) => id.spiffe_id.to_string(),
        None => {
            let t = ca
                .create_join_token(pb::CreateJoinTokenRequest {
                    ttl: 600,
                    tenant: String::new(),
                })
                .await
                .map_err(admin::status)?
                .into_inner();
            agent_cmd.env("WARD_JOIN_TOKEN", t.token);
            t.agent_id
        }
    };
    children.spawn("agent", &logs.join("agent.log"), &mut agent_cmd)?;
    wait_ready(
        children,
        "agent",
        ports.agent_health(),
        &logs.join("agent.log"),
    )
    .await?;
    progress(
        "agent",
        &format!("{agent_id}, Workload API agent/workload.sock"),
        step,
    );

    // 4. Entries, applications and proxies.
    let step = Instant::now();
    for (i, s) in SERVICES.iter().enumerate() {
        let link = dir.join("bin").join(s.file_name());
        link_binary(&exe, &link)?;
        let id = workload_id(&td, s);
        ensure_entry(
            &mut ca,
            &id,
            &agent_id,
            &format!("unix:path:{}", link.display()),
        )
        .await?;
        children.spawn(
            &format!("{} app", s.label()),
            &logs.join(format!("{}.app.log", s.file_name())),
            Command::new(&exe).args([
                "demo",
                "app",
                "--listen",
                &ports.app(i).to_string(),
                "--name",
                &s.label(),
            ]),
        )?;
        let mut proxy = Command::new(&link);
        proxy
            .args(["proxy", "run", "--socket"])
            .arg(&socket)
            .args(["--inbound-listen", &ports.inbound(i).to_string()])
            .args(["--forward", &ports.app(i).to_string()])
            .args(["--service-port", &s.port.to_string()])
            .args(["--health-address", &ports.proxy_health(i).to_string()])
            // Stopping waits at most this for open streams, well inside
            // the 10 s after which a part is killed.
            .args(["--drain-timeout", "3s"])
            // (The demo's applications are stopped with it: nothing calls
            // out once it is asked to stop.)
            .args(["--outbound-drain", "0s"])
            .arg("--decision-log")
            .arg(logs.join(format!("{}.decisions.jsonl", s.file_name())));
        if !s.calls.is_empty() {
            proxy.args(["--connect-listen", &ports.connect(i).to_string()]);
        }
        for (j, callee) in s.calls.iter().enumerate() {
            let (k, c) = service(callee);
            proxy.args([
                "--route",
                &format!(
                    "listen={},destination={},id={},target={}-{}:{}",
                    ports.route(i, j),
                    ports.inbound(k),
                    workload_id(&td, c),
                    c.tenant,
                    c.name,
                    c.port
                ),
            ]);
        }
        let log = logs.join(format!("{}.proxy.log", s.file_name()));
        children.spawn(&format!("{} proxy", s.label()), &log, &mut proxy)?;
    }
    // All start at once; each is ready when its SVID has arrived.
    for (i, s) in SERVICES.iter().enumerate() {
        let log = logs.join(format!("{}.proxy.log", s.file_name()));
        wait_ready(
            children,
            &format!("{} proxy", s.label()),
            ports.proxy_health(i),
            &log,
        )
        .await?;
        progress(
            &s.label(),
            &format!(
                "{}\n{:>16}app {}, proxy {} (HBONE)",
                workload_id(&td, s),
                "",
                ports.app(i),
                ports.inbound(i)
            ),
            step,
        );
    }
    say!("Up in {:.1} s.\n", started.elapsed().as_secs_f64());

    // 5. The demo calls, and the policies that decided them.
    say!("Demo calls (caller → callee: decision, deciding policies):");
    let mut failed_calls = Vec::new();
    for (caller, callee) in DEMO_CALLS {
        let (line, wrong) = demo_call(&dir, &ports, &td, caller, callee).await;
        say!("  {line}");
        if let Some(wrong) = wrong {
            say!("    ✗ {wrong}");
            failed_calls.push(format!("{caller} → {callee}: {wrong}"));
        }
    }

    let (wi, _) = service("acme/web");
    say!("\nBy hand:");
    say!(
        "  curl http://{}/          # as acme/web, to acme/api (allowed)",
        ports.route(wi, 0)
    );
    say!(
        "  curl http://{}/          # as acme/web, to globex/api (denied: tenant isolation)",
        ports.route(wi, 2)
    );
    say!(
        "  curl -p -x http://{} http://acme-api:8080/   # through acme/web's HTTP CONNECT listener",
        ports.connect(wi)
    );
    say!("  export WARD_ADMIN_SOCKET={}", admin_socket.display());
    say!("  ward policy history; ward policy push DIR; ward policy rollback VERSION");
    let active = dir.join("active-policies");
    say!(
        "  ward policy show --write {}   # the active set's files",
        active.display()
    );
    say!(
        "  ward policy matrix --policies {} --workloads {} --port 8080 --port 5432",
        active.display(),
        write_workloads(&dir, &td)?.display()
    );
    say!("\nWhere things are:");
    say!(
        "  logs       {}/logs (decision logs: *.decisions.jsonl)",
        dir.display()
    );
    say!(
        "  data       {}/ca (SQLite, keys), {}/agent",
        dir.display(),
        dir.display()
    );
    say!(
        "  metrics    http://{}/metrics (CA), http://{}/metrics (agent), http://{}/metrics (acme/web proxy)",
        ports.ca_health(),
        ports.agent_health(),
        ports.proxy_health(wi)
    );
    Ok(Mesh {
        dir,
        ports,
        web: wi,
        failed_calls,
    })
}

fn progress(what: &str, detail: &str, since: Instant) {
    say!(
        "  ✓ {what:<12} {detail}  ({} ms)",
        since.elapsed().as_millis()
    );
}

fn service(label: &str) -> (usize, &'static Service) {
    SERVICES
        .iter()
        .enumerate()
        .find(|(_, s)| s.label() == label)
        .expect("demo services are constant")
}

fn workload_id(td: &ward_spec::TrustDomain, s: &Service) -> String {
    format!("spiffe://{td}/tenant/{}/ns/demo/sa/{}", s.tenant, s.name)
}

fn check_ports_free(ports: &Ports) -> anyhow::Result<()> {
    let mut offsets = vec![0u16, 1, 2];
    offsets.extend((0..SERVICES.len() as u16).flat_map(|i| (10 + 10 * i)..(18 + 10 * i)));
    for o in offsets {
        let addr = ports.at(o);
        match std::net::TcpListener::bind(addr) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                bail!("port {addr} is in use (is another `ward up` running?); pass --base-port to use other ports")
            }
            Err(e) => bail!("cannot listen on {addr}: {e}; pass --base-port to use other ports"),
        }
    }
    Ok(())
}

/// `link` becomes a hard link to `exe` (a copy where links are impossible).
fn link_binary(exe: &Path, link: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(link);
    if std::fs::hard_link(exe, link).is_err() {
        std::fs::copy(exe, link).with_context(|| {
            format!(
                "cannot link or copy {} to {}",
                exe.display(),
                link.display()
            )
        })?;
    }
    Ok(())
}

/// Makes sure exactly one entry gives `id` to the workloads with `selector`
/// under `parent`.
async fn ensure_entry(
    ca: &mut ward_spec::proto::admin::v1::admin_client::AdminClient<tonic::transport::Channel>,
    id: &str,
    parent: &str,
    selector: &str,
) -> anyhow::Result<()> {
    let (kind, value) = selector.split_once(':').expect("selector has a type");
    let existing = ca
        .list_entries(pb::ListEntriesRequest {
            spiffe_id: id.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(admin::status)?
        .into_inner()
        .entries;
    let wanted = |e: &types::Entry| {
        e.parent_id == parent
            && e.selectors.len() == 1
            && e.selectors[0].r#type == kind
            && e.selectors[0].value == value
    };
    if existing.iter().any(wanted) {
        return Ok(());
    }
    for e in existing {
        ca.delete_entry(pb::DeleteEntryRequest { id: e.id })
            .await
            .map_err(admin::status)?;
    }
    ca.create_entry(pb::CreateEntryRequest {
        entry: Some(types::Entry {
            spiffe_id: id.to_owned(),
            parent_id: parent.to_owned(),
            selectors: vec![types::Selector {
                r#type: kind.to_owned(),
                value: value.to_owned(),
            }],
            ..Default::default()
        }),
    })
    .await
    .map_err(admin::status)?;
    Ok(())
}

async fn wait_ready(
    children: &mut Children,
    what: &str,
    health: SocketAddr,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let ready = tokio::task::spawn_blocking(move || http_get(health, "/readyz"))
            .await
            .ok()
            .flatten();
        if ready.is_some_and(|(code, _)| code == 200) {
            return Ok(());
        }
        if let Some(what) = children.exited() {
            bail!("{what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{what} was not ready after 60 s; its log {} ends with:\n{}",
        log.display(),
        tail(log)
    )
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A plain HTTP/1.1 GET; (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: ward\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split(' ').nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((code, body.to_owned()))
}

/// Calls `callee` as `caller` (through the caller's route listener) and finds
/// the callee proxy's decision: the line that shows both, and what went
/// wrong whatever the policies say (no decision logged, an allowed call
/// not answered, a denied one answered).
async fn demo_call(
    dir: &Path,
    ports: &Ports,
    td: &ward_spec::TrustDomain,
    caller: &str,
    callee: &str,
) -> (String, Option<String>) {
    let (i, from) = service(caller);
    let (_, to) = service(callee);
    let j = from
        .calls
        .iter()
        .position(|c| *c == callee)
        .expect("demo calls follow the routes");
    let addr = ports.route(i, j);
    let decisions = dir
        .join("logs")
        .join(format!("{}.decisions.jsonl", to.file_name()));
    // Lines logged before this call (an earlier run's) are not its decision.
    let before = std::fs::metadata(&decisions).map_or(0, |m| m.len());
    let answer = tokio::task::spawn_blocking(move || http_get(addr, "/"))
        .await
        .ok()
        .flatten();
    let decision = wait_decision(&decisions, before, &workload_id(td, from)).await;
    let (verdict, policies) = match &decision {
        Some(d) => (
            d["decision"].as_str().unwrap_or("?").to_uppercase(),
            d["policies"]
                .as_array()
                .map(|p| {
                    p.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "no policy permits it (default deny)".into()),
        ),
        None => ("?".into(), "no decision logged".into()),
    };
    let wrong = match (verdict.as_str(), &answer) {
        ("ALLOW", Some((200, _))) | ("DENY", None) => None,
        ("ALLOW", _) => Some("allowed, but not answered"),
        ("DENY", Some(_)) => Some("denied, but answered"),
        _ => Some("no decision logged"),
    };
    let reply = match answer {
        Some((200, body)) => format!("“{}”", body.trim()),
        Some((code, _)) => format!("HTTP {code}"),
        None => "connection closed".into(),
    };
    (
        format!("{caller:<11} → {callee:<11} {verdict:<5} {policies:<40} {reply}"),
        wrong.map(str::to_owned),
    )
}

/// The newest decision line for `principal` logged past byte `from`,
/// waiting for the log's flush.
async fn wait_decision(path: &Path, from: u64, principal: &str) -> Option<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let text = std::fs::read(path).unwrap_or_default();
        let added = text.get(from as usize..).unwrap_or_default();
        let found = String::from_utf8_lossy(added)
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["principal"].as_str() == Some(principal));
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write_workloads(dir: &Path, td: &ward_spec::TrustDomain) -> anyhow::Result<PathBuf> {
    let path = dir.join("workloads.txt");
    let text: String = SERVICES
        .iter()
        .map(|s| format!("{}\n", workload_id(td, s)))
        .collect();
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Holds a stream acme/web → acme/api open (`GET /stream`) and reports each
/// time it closes or opens again (tried every second), until stopped.
struct StreamWatch {
    stopped: Arc<AtomicBool>,
    open: Arc<Mutex<Option<TcpStream>>>,
}

impl StreamWatch {
    fn start(addr: SocketAddr) -> Self {
        let watch = StreamWatch {
            stopped: Arc::default(),
            open: Arc::default(),
        };
        let (stopped, open) = (watch.stopped.clone(), watch.open.clone());
        // A plain thread: it ends with the process (the runtime would wait
        // for a blocking task at shutdown).
        std::thread::spawn(move || watch_stream(addr, &stopped, &open));
        watch
    }

    /// Ends the stream and the watching.
    fn stop(self) {
        self.stopped.store(true, Ordering::Relaxed);
        if let Some(s) = self.open.lock().ok().and_then(|mut o| o.take()) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn watch_stream(addr: SocketAddr, stopped: &AtomicBool, open: &Mutex<Option<TcpStream>>) {
    let mut open_since: Option<Instant> = None;
    let mut denied_reported = false;
    while !stopped.load(Ordering::Relaxed) {
        let opened = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /stream HTTP/1.1\r\nHost: ward\r\n\r\n")?;
            if let Ok(mut o) = open.lock() {
                *o = Some(s.try_clone()?);
            }
            Ok(s)
        });
        // Stopped while connecting: the stream was not there to shut.
        if stopped.load(Ordering::Relaxed) {
            if let Ok(s) = &opened {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            return;
        }
        if let Ok(mut s) = opened {
            let mut buf = [0u8; 512];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if open_since.is_none() {
                    say!("[{}] demo stream acme/web → acme/api open", clock());
                    open_since = Some(Instant::now());
                    denied_reported = false;
                }
            }
        }
        if stopped.load(Ordering::Relaxed) {
            return;
        }
        match open_since.take() {
            Some(t) => say!(
                "[{}] demo stream acme/web → acme/api closed after {:.1} s (a policy change? see logs/acme-api.decisions.jsonl)",
                clock(),
                t.elapsed().as_secs_f64()
            ),
            None if !denied_reported => {
                say!("[{}] demo stream acme/web → acme/api refused; retrying every second", clock());
                denied_reported = true;
            }
            None => {}
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn clock() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
}
