//! Helpers for end-to-end tests: real `ward` processes in temporary
//! directories on loopback ports, and a node-API client built on ward-spec.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair, SanType};
use ward_spec::proto::node::v1::node_client::NodeClient;
use ward_spec::tls::{PeerPolicy, RootStore, SpiffeServerVerifier, SvidResolver};
use ward_spec::{SpiffeId, TrustBundle, TrustDomain};

pub const TD: &str = "example.org";

std::thread_local! {
    /// Set for a test that runs its CAs on PostgreSQL (see [`on_both_backends`]).
    static POSTGRES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes this test thread's CAs use a fresh PostgreSQL database each; false
/// (the test is skipped, with a message) when no server is configured, unless
/// `WARD_REQUIRE_POSTGRES` is set, which makes that a failure.
pub fn postgres_for_this_thread() -> bool {
    if std::env::var_os("WARD_TEST_POSTGRES_URL").is_none() {
        assert!(
            std::env::var_os("WARD_REQUIRE_POSTGRES").is_none(),
            "WARD_REQUIRE_POSTGRES is set but WARD_TEST_POSTGRES_URL is not"
        );
        println!("SKIPPED on PostgreSQL: WARD_TEST_POSTGRES_URL is not set");
        return false;
    }
    POSTGRES.with(|p| p.set(true));
    true
}

/// A new database on the server `WARD_TEST_POSTGRES_URL` names; its URL.
pub fn fresh_postgres_database() -> String {
    let url = std::env::var("WARD_TEST_POSTGRES_URL").expect("WARD_TEST_POSTGRES_URL");
    // Unique among live processes (pid, and a port this process holds), and
    // against databases earlier runs left behind (pids and ports recur).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("ward_e2e_{}_{}_{nanos}", std::process::id(), free_port());
    let out = Command::new("psql")
        .arg(&url)
        .args(["-q", "-c", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql (PostgreSQL's client) is needed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (base, _) = url
        .rsplit_once('/')
        .expect("a postgres URL names a database");
    format!("{base}/{name}")
}

/// A self-signed P-256 root for `spiffe://example.org`, made with openssl, to
/// load as a CA's upstream authority; (certificate path, key path).
pub fn upstream_root(dir: &Path) -> (String, String) {
    upstream_root_with(dir, "critical,CA:TRUE")
}

/// [`upstream_root`] with these `basicConstraints`.
pub fn upstream_root_with(dir: &Path, basic_constraints: &str) -> (String, String) {
    let (key, cert) = (dir.join("root.key"), dir.join("root.crt"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/O=Upstream/CN=Upstream Root",
        ])
        .args(["-addext", &format!("basicConstraints={basic_constraints}")])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .args(["-addext", "subjectAltName=URI:spiffe://example.org"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    )
}

/// Runs an async test twice: as `NAME::sqlite` with the CA on its embedded
/// store, and as `NAME::postgres` with every CA it starts on a fresh
/// PostgreSQL database.
#[macro_export]
macro_rules! on_both_backends {
    ($(async fn $name:ident() $body:block)*) => {$(
        async fn $name() $body

        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name().await
            }

            #[tokio::test]
            async fn postgres() {
                if super::common::postgres_for_this_thread() {
                    super::$name().await
                }
            }
        }
    )*};
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn ward_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ward")
}

/// A loopback port for a child process to listen on, free when checked and
/// kept from everyone else who might take it before the child binds it (or
/// binds it again after a restart):
/// - it lies outside the kernel's ephemeral range (below it where there is
///   room), so no `connect` or `bind(0)` is ever given it as a local port;
/// - a lock file held until this test process exits reserves it against
///   other test processes (nextest runs each test in one), and a counter
///   against other tests in this one.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// `len` consecutive loopback ports (as [`free_port`]); returns the first.
pub fn free_ports(len: u32) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());

    // Below the ephemeral range if there is room, else above it.
    let ephemeral: Vec<u32> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let (e_low, e_high) = match ephemeral[..] {
        [l, h] => (l, h),
        _ => (32768, 60999),
    };
    let (low, high) = if e_low >= 11_000 {
        (10_000, e_low)
    } else {
        (e_high + 1, 65_536)
    };
    assert!(
        high > low + 1000 + len,
        "no room for test ports outside the ephemeral range {e_low}-{e_high}"
    );
    // A lock file per port; without the directory, only the bind check.
    let dir = std::env::temp_dir().join("ward-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let claim = |port: u32| {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .ok();
        if lock.as_ref().is_some_and(|l| l.try_lock().is_err())
            || TcpListener::bind(("127.0.0.1", port as u16)).is_err()
        {
            return None;
        }
        Some(lock)
    };
    let start = std::process::id().wrapping_mul(7919);
    let span = high - low - len;
    for _ in 0..span {
        let first = low + start.wrapping_add(NEXT.fetch_add(len, Ordering::Relaxed)) % span;
        // Dropping the locks of a block that is not wholly free releases them.
        let Some(locks) = (first..first + len).map(claim).collect::<Option<Vec<_>>>() else {
            continue;
        };
        HELD.lock().unwrap().extend(locks.into_iter().flatten());
        return first as u16;
    }
    panic!("no {len} free loopback ports in {low}..{high}");
}

/// A running `ward ca serve`, killed on drop.
pub struct CaProcess {
    pub dir: PathBuf,
    pub node_addr: String,
    pub health_addr: String,
    pub extra: Vec<String>,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub trust_domain: String,
    _tmp: Option<tempfile::TempDir>,
}

impl CaProcess {
    /// Starts a CA in a fresh directory with extra `ward ca serve` flags.
    pub fn start(extra: &[&str]) -> CaProcess {
        CaProcess::start_in(TD, extra)
    }

    /// Starts a CA of trust domain `td`.
    pub fn start_in(td: &str, extra: &[&str]) -> CaProcess {
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if POSTGRES.with(|p| p.get()) {
            extra.extend(["--datastore".to_owned(), fresh_postgres_database()]);
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = CaProcess {
            dir: tmp.path().to_owned(),
            node_addr: format!("127.0.0.1:{}", free_port()),
            health_addr: format!("127.0.0.1:{}", free_port()),
            extra,
            child: None,
            log: tmp.path().join("ca.log"),
            trust_domain: td.to_owned(),
            _tmp: Some(tmp),
        };
        ca.spawn();
        ca
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn socket(&self) -> PathBuf {
        self.data_dir().join("admin.sock")
    }

    /// (Re)starts the process on the same directory and ports.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(ward_bin())
            .args([
                "ca",
                "serve",
                "--trust-domain",
                &self.trust_domain,
                "--data-dir",
            ])
            .arg(self.data_dir())
            .args([
                "--bind-address",
                &self.node_addr,
                "--health-address",
                &self.health_addr,
            ])
            .args(&self.extra)
            .env("WARD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    pub fn wait_ready(&mut self) {
        wait_ready(
            "CA",
            self.child.as_mut().unwrap(),
            &self.health_addr,
            &self.log,
        );
    }

    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    /// The log once `ok` accepts it (see [`wait_log`]).
    pub fn wait_log(&self, ok: impl Fn(&str) -> bool) -> String {
        wait_log(&self.log, ok)
    }

    /// Runs a `ward` client command against this CA's admin socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(ward_bin())
            .args(args)
            .env("WARD_ADMIN_SOCKET", self.socket())
            .output()
            .unwrap()
    }

    /// Runs a client command with `--output json` and parses stdout; panics on failure.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.cli(&a);
        assert!(
            out.status.success(),
            "ward {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn join_token(&self) -> String {
        self.cli_json(&["token", "create"])["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Registers an entry for uid 1000; returns its ID.
    pub fn create_entry(&self, spiffe_id: &str, parent: &str) -> String {
        self.register(spiffe_id, parent, "unix:uid:1000")
    }

    /// The SPIFFE ID of the first agent attested to this CA.
    pub fn first_agent(&self) -> String {
        self.cli_json(&["agent", "list"])[0]["spiffe_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Registers an entry with one selector; returns its ID.
    pub fn register(&self, spiffe_id: &str, parent: &str, selector: &str) -> String {
        self.cli_json(&[
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent,
            "--selector",
            selector,
        ])["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn bundle(&self) -> TrustBundle {
        let out = self.cli(&["bundle", "show", "--format", "jwks"]);
        assert!(out.status.success());
        TrustBundle::from_jwks(TrustDomain::new(&self.trust_domain).unwrap(), &out.stdout).unwrap()
    }

    /// Audit lines (target `audit`) in the log containing `needle`.
    pub fn audit_lines(&self, needle: &str) -> usize {
        count_audit_lines(&self.log_text(), needle)
    }

    /// Audit lines containing `needle`, once there are at least `n` of them
    /// (see [`wait_log`]).
    pub fn wait_audit_lines(&self, needle: &str, n: usize) -> usize {
        count_audit_lines(
            &self.wait_log(|l| count_audit_lines(l, needle) >= n),
            needle,
        )
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until a child process answers `/readyz` with 200; panics with its
/// log if it exits first or takes more than 30 s.
fn wait_ready(what: &str, child: &mut Child, health_addr: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited early ({status}); log:\n{}", read_log(log));
        }
        if http_get(health_addr, "/readyz").is_some_and(|(code, _)| code == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready; log:\n{}",
            read_log(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILL, no chance to clean up.
fn kill9(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// A process's log once `ok` accepts its text, or as it is after 10 s (for
/// the caller's assertion to fail on and show). A process writes its log
/// out from a thread of its own, so a line reaches the file a moment after
/// the event it tells of.
pub fn wait_log(log: &Path, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = read_log(log);
        if ok(&text) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Audit lines (target `audit`) in `log` containing `needle`.
pub fn count_audit_lines(log: &str, needle: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("audit") && l.contains(needle))
        .count()
}

/// A directory every test uid may write to (logs and files of processes
/// that run as other users); removed when dropped.
pub fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// The complete lines of a JSON-lines log (none if the file is not there
/// yet; a last line still being written is left out).
pub fn json_lines(log: &Path) -> Vec<serde_json::Value> {
    read_log(log)
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The lines of a JSON-lines log that `want` accepts, once there are `n` of
/// them, or once `within` has passed (logs write their lines out from a
/// thread of their own, allowed streams' lines every second).
pub fn wait_json_lines(
    log: &Path,
    n: usize,
    within: Duration,
    want: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        let lines: Vec<_> = json_lines(log).into_iter().filter(&want).collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first line of a JSON-lines log that `want` accepts, looked for until
/// `within` has passed.
pub fn wait_json_line(
    log: &Path,
    within: Duration,
    want: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    wait_json_lines(log, 1, within, want).into_iter().next()
}

/// A Prometheus sample's value from a `/metrics` endpoint (0 if absent).
pub fn metric_value(addr: &str, name: &str) -> f64 {
    http_get(addr, "/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        })
        .unwrap_or(0.0)
}

/// A minimal HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path)
}

/// A minimal HTTP/1.0 request without a body: (status code, body).
pub fn http_request(addr: &str, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Some((code, body))
}

/// A CSR with the given URI SANs.
pub fn csr(key: &KeyPair, uris: &[&str]) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.serialize_request(key).unwrap().der().to_vec()
}

/// An agent-side view of the node API.
pub struct Node {
    pub client: NodeClient<tonic::transport::Channel>,
    pub id: SpiffeId,
    pub key: KeyPair,
    pub chain: Vec<Vec<u8>>,
    pub resolver: SvidResolver,
}

fn tls_config(bundle: &TrustBundle, resolver: Option<SvidResolver>) -> Arc<rustls::ClientConfig> {
    let roots = RootStore::new(bundle).unwrap();
    let ca_id = TrustDomain::new(TD).unwrap().id("/ward/ca").unwrap();
    Arc::new(ward_spec::tls::client_config(
        resolver,
        SpiffeServerVerifier::new(roots, PeerPolicy::OneOf(vec![ca_id])),
    ))
}

/// A node-API client without a client certificate (only Attest works).
pub async fn anonymous_client(ca: &CaProcess) -> NodeClient<tonic::transport::Channel> {
    let ch = ward_spec::grpc::tls_channel(&ca.node_addr, tls_config(&ca.bundle(), None))
        .await
        .unwrap();
    NodeClient::new(ch)
}

/// A TLS connection to the node API without a client certificate, its
/// handshake done and nothing more said.
pub fn anonymous_tls(
    ca: &CaProcess,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let name = rustls::pki_types::ServerName::try_from("ward.invalid").unwrap();
    let mut conn = rustls::ClientConnection::new(tls_config(&ca.bundle(), None), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(&ca.node_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    rustls::StreamOwned::new(conn, tcp)
}

/// Whether the peer closes `tls` (an end of file, a reset or an alert)
/// within `within`; false if it is still open then.
pub fn closed_within(
    tls: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    within: Duration,
) -> bool {
    let deadline = std::time::Instant::now() + within;
    let mut b = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        tls.sock.set_read_timeout(Some(left)).unwrap();
        match tls.read(&mut b) {
            Ok(0) => return true,
            // The server's HTTP/2 settings.
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Attests with a fresh join token and returns an mTLS client with the node SVID.
pub async fn attest(ca: &CaProcess) -> Node {
    attest_with(ca, &ca.join_token()).await.unwrap()
}

pub async fn attest_with(ca: &CaProcess, token: &str) -> Result<Node, tonic::Status> {
    use ward_spec::proto::node::v1::AttestRequest;
    let key = KeyPair::generate().unwrap();
    let mut anon = anonymous_client(ca).await;
    let r = anon
        .attest(AttestRequest {
            join_token: token.to_owned(),
            csr: csr(&key, &[]),
        })
        .await?
        .into_inner();
    let resolver = SvidResolver::default();
    resolver.set(&r.svid_chain, key.serialized_der()).unwrap();
    let ch = ward_spec::grpc::tls_channel(
        &ca.node_addr,
        tls_config(&ca.bundle(), Some(resolver.clone())),
    )
    .await
    .unwrap();
    Ok(Node {
        client: NodeClient::new(ch),
        id: SpiffeId::parse(&r.spiffe_id).unwrap(),
        key,
        chain: r.svid_chain,
        resolver,
    })
}

impl Node {
    /// Signs one CSR for an entry.
    pub async fn sign(
        &mut self,
        entry_id: &str,
        csr: Vec<u8>,
    ) -> Result<Vec<Vec<u8>>, tonic::Status> {
        use ward_spec::proto::node::v1::SignX509SvidRequest;
        Ok(self
            .client
            .sign_x509_svid(SignX509SvidRequest {
                entry_id: entry_id.to_owned(),
                csr,
            })
            .await?
            .into_inner()
            .svid_chain)
    }

    /// A fresh mTLS connection (new handshake) with the current node SVID.
    pub async fn reconnect(&mut self, ca: &CaProcess) -> Result<(), String> {
        let ch = ward_spec::grpc::tls_channel(
            &ca.node_addr,
            tls_config(&ca.bundle(), Some(self.resolver.clone())),
        )
        .await
        .map_err(|e| format!("{e:?}"))?;
        self.client = NodeClient::new(ch);
        Ok(())
    }
}

pub fn write_pem(path: &Path, ders: &[Vec<u8>]) {
    let pem: String = ders
        .iter()
        .map(|d| ward_spec::bundle::der_to_pem("CERTIFICATE", d))
        .collect();
    std::fs::write(path, pem).unwrap();
}

/// Runs `openssl verify` of a leaf against root and intermediate files at `attime`.
pub fn openssl_verify(dir: &Path, root: &[Vec<u8>], chain: &[Vec<u8>]) -> (bool, String) {
    let r = dir.join("root.pem");
    let i = dir.join("intermediate.pem");
    let l = dir.join("leaf.pem");
    write_pem(&r, root);
    write_pem(&i, &chain[1..]);
    write_pem(&l, &chain[..1]);
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&r)
        .arg("-untrusted")
        .arg(&i)
        .arg(&l)
        .output()
        .expect("openssl is installed");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A running `ward agent run`, killed on drop.
pub struct AgentProcess {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub health_addr: String,
    pub ca_addrs: Vec<String>,
    /// More `ward agent run` flags.
    pub extra: Vec<String>,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub trust_domain: String,
    _tmp: tempfile::TempDir,
}

impl AgentProcess {
    /// Starts an agent attested to `ca` with a fresh join token.
    pub fn start(ca: &CaProcess) -> AgentProcess {
        let mut a = AgentProcess::prepare(vec![ca.node_addr.clone()]);
        a.trust_domain = ca.trust_domain.clone();
        std::fs::write(a.dir.join("bundle.pem"), ca.cli(&["bundle", "show"]).stdout).unwrap();
        let token = ca.join_token();
        a.spawn(Some(&token));
        a.wait_ready();
        a
    }

    /// A directory other users can reach (workloads run as other uids in tests).
    pub fn prepare(ca_addrs: Vec<String>) -> AgentProcess {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        AgentProcess {
            dir: tmp.path().to_owned(),
            socket: tmp.path().join("public/workload.sock"),
            health_addr: format!("127.0.0.1:{}", free_port()),
            ca_addrs,
            extra: Vec::new(),
            child: None,
            log: tmp.path().join("agent.log"),
            trust_domain: TD.to_owned(),
            _tmp: tmp,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn spawn(&mut self, token: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(ward_bin());
        cmd.args([
            "agent",
            "run",
            "--trust-domain",
            &self.trust_domain,
            "--data-dir",
        ])
        .arg(self.dir.join("data"))
        .arg("--socket-path")
        .arg(&self.socket)
        .args(["--health-address", &self.health_addr, "--trust-bundle"])
        .arg(self.dir.join("bundle.pem"))
        .env("WARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
        for a in &self.ca_addrs {
            cmd.args(["--ca-address", a]);
        }
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        cmd.args(&self.extra);
        self.child = Some(cmd.spawn().unwrap());
    }

    pub fn wait_ready(&mut self) {
        wait_ready(
            "agent",
            self.child.as_mut().unwrap(),
            &self.health_addr,
            &self.log,
        );
    }

    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    /// The log once `ok` accepts it (see [`wait_log`]).
    pub fn wait_log(&self, ok: impl Fn(&str) -> bool) -> String {
        wait_log(&self.log, ok)
    }

    /// Runs a `ward svid …` command against this agent as `uid` (None: as the test).
    pub fn svid_cli(&self, args: &[&str], uid: Option<u32>) -> Output {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(ward_bin());
        cmd.arg("svid")
            .args(args)
            .arg("--socket")
            .arg(self.endpoint());
        if let Some(u) = uid {
            cmd.uid(u).gid(u).current_dir("/");
        }
        cmd.output().unwrap()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The uid the tests run as.
pub fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// A Python with the independent clients the tests use — py-spiffe (PyPI
/// `spiffe`) and cedarpy (the official Cedar engine's Python binding) — in a
/// virtualenv under target/, created on first use.
pub fn py_spiffe() -> PathBuf {
    static PY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PY.get_or_init(|| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv");
        let py = venv.join("bin/python");
        let has = |py: &Path| {
            Command::new(py)
                .args(["-c", "import spiffe, cedarpy"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !has(&py) {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .unwrap();
            assert!(
                ok.success(),
                "cannot create a virtualenv at {}",
                venv.display()
            );
            let ok = Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "spiffe==0.3.2", "cedarpy==4.12.2"])
                .status()
                .unwrap();
            assert!(
                ok.success(),
                "cannot install py-spiffe and cedarpy from PyPI"
            );
        }
        assert!(has(&py), "py-spiffe or cedarpy is not importable");
        py
    })
    .clone()
}

/// Runs `tests/py/spiffe_client.py` with py-spiffe.
pub fn py_client(args: &[&str]) -> Output {
    Command::new(py_spiffe())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/spiffe_client.py"))
        .args(args)
        .output()
        .unwrap()
}

/// A running `ward proxy run`, as its own uid (its workload identity), killed on drop.
pub struct ProxyProcess {
    pub health_addr: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    /// The decision log (the proxy's standard output).
    pub decisions: PathBuf,
    args: Vec<String>,
    uid: u32,
    /// Standard output is a pipe the test reads only when it chooses.
    stdout_piped: bool,
    _tmp: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts a proxy on `agent`'s socket as `uid` with extra flags and waits
    /// until it is ready (it has an SVID and listens).
    pub fn start(agent: &AgentProcess, uid: u32, args: &[&str]) -> ProxyProcess {
        let mut p = ProxyProcess::spawn(agent, uid, args);
        p.wait_ready();
        p
    }

    /// Starts a proxy without waiting for it to be ready.
    pub fn spawn(agent: &AgentProcess, uid: u32, args: &[&str]) -> ProxyProcess {
        Self::spawn_with(agent, uid, args, false)
    }

    /// Starts a proxy whose standard output (its decision log) is a pipe
    /// nobody reads until [`ProxyProcess::take_stdout`]; waits until it is ready.
    pub fn start_stdout_unread(agent: &AgentProcess, uid: u32, args: &[&str]) -> ProxyProcess {
        let mut p = Self::spawn_with(agent, uid, args, true);
        p.wait_ready();
        p
    }

    /// The standard output pipe of a proxy started with it unread.
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child.as_mut().unwrap().stdout.take().unwrap()
    }

    fn spawn_with(
        agent: &AgentProcess,
        uid: u32,
        args: &[&str],
        stdout_piped: bool,
    ) -> ProxyProcess {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = ProxyProcess {
            health_addr: format!("127.0.0.1:{}", free_port()),
            child: None,
            log: tmp.path().join("proxy.log"),
            decisions: tmp.path().join("decisions.log"),
            args: ["proxy", "run", "--socket", &agent.endpoint()]
                .iter()
                .map(|s| s.to_string())
                .chain(args.iter().map(|s| s.to_string()))
                .collect(),
            uid,
            stdout_piped,
            _tmp: tmp,
        };
        p.run();
        p
    }

    fn run(&mut self) {
        use std::os::unix::process::CommandExt;
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap()
        };
        let child = Command::new(ward_bin())
            .args(&self.args)
            .args(["--health-address", &self.health_addr])
            // WARD_TEST_PROXY_LOG (e.g. `info,ward_proxy=debug`) to look into a failure.
            .env(
                "WARD_LOG",
                std::env::var("WARD_TEST_PROXY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .uid(self.uid)
            .gid(self.uid)
            .current_dir("/")
            .stdout(if self.stdout_piped {
                Stdio::piped()
            } else {
                open(&self.decisions).into()
            })
            .stderr(open(&self.log))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn wait_ready(&mut self) {
        wait_ready(
            "proxy",
            self.child.as_mut().unwrap(),
            &self.health_addr,
            &self.log,
        );
    }

    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    /// The log once `ok` accepts it (see [`wait_log`]).
    pub fn wait_log(&self, ok: impl Fn(&str) -> bool) -> String {
        wait_log(&self.log, ok)
    }

    pub fn decision_lines(&self) -> Vec<serde_json::Value> {
        json_lines(&self.decisions)
    }

    /// The decision log once it holds `n` lines, or after 5 s.
    pub fn wait_decisions(&self, n: usize) -> Vec<serde_json::Value> {
        self.wait_decisions_where(n, |_| true)
    }

    /// The decision lines `want` accepts, once there are `n` of them (the
    /// writer thread writes a denial out at once, an allow within a second),
    /// or after 5 s.
    pub fn wait_decisions_where(
        &self,
        n: usize,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        wait_json_lines(&self.decisions, n, Duration::from_secs(5), want)
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.health_addr, name)
    }

    /// `GET /config_dump`, parsed.
    pub fn config_dump(&self) -> serde_json::Value {
        let (status, body) = http_get(&self.health_addr, "/config_dump").expect("no answer");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("/config_dump is not JSON")
    }

    /// Sends `sig` (`-TERM`, `-STOP`, …) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let sent = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(sent.success(), "kill {sig} {pid}");
    }

    /// The exit status once the process has stopped, which it must within
    /// `within` (`what` says after what, for the failure's message).
    pub fn wait_exit(&mut self, within: Duration, what: &str) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running {within:?} after {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGTERM; returns the exit status once the process has stopped.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        c.wait().unwrap()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `tests/py/hash_app.py serve`: the application behind an inbound proxy. It
/// checks the bytes it gets and sends its own back; each connection it
/// accepts is a line in its log.
pub struct AppProcess {
    pub port: u16,
    pub connections_log: PathBuf,
    child: Child,
    _tmp: tempfile::TempDir,
}

impl AppProcess {
    pub fn start() -> AppProcess {
        let tmp = tempfile::tempdir().unwrap();
        let port = free_port();
        let connections_log = tmp.path().join("connections");
        std::fs::write(&connections_log, "").unwrap();
        let child = Command::new("python3")
            .arg(hash_app())
            .args(["serve", "--port", &port.to_string(), "--log"])
            .arg(&connections_log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the test application did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The probe above was a connection too.
        wait_for_lines(&connections_log, 1);
        std::fs::write(&connections_log, "").unwrap();
        AppProcess {
            port,
            connections_log,
            child,
            _tmp: tmp,
        }
    }

    /// Connections the application accepted since it started.
    pub fn connections(&self) -> usize {
        read_log(&self.connections_log).lines().count()
    }

    /// Waits (up to 20 s: a loaded machine running the whole suite can be
    /// slow) until the application has accepted `n` connections; returns the count.
    pub fn wait_connections(&self, n: usize) -> usize {
        wait_for_lines(&self.connections_log, n);
        self.connections()
    }
}

fn wait_for_lines(path: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while read_log(path).lines().count() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for AppProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn hash_app() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/hash_app.py")
}

/// Result of `hash_app.py client`.
#[derive(Debug, serde::Deserialize)]
pub struct ClientReport {
    pub ok: u64,
    pub errors: Vec<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Runs `hash_app.py client` against `port` (a proxy's route listener).
pub fn hash_client(port: u16, size: usize, streams: usize, seconds: f64) -> ClientReport {
    hash_client_with(port, size, streams, seconds, &[])
}

/// [`hash_client`] with more of its flags (`--half-close`).
pub fn hash_client_with(
    port: u16,
    size: usize,
    streams: usize,
    seconds: f64,
    extra: &[&str],
) -> ClientReport {
    let out = Command::new("python3")
        .arg(hash_app())
        .args([
            "client",
            "--port",
            &port.to_string(),
            "--size",
            &size.to_string(),
            "--streams",
            &streams.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hash client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
