//! The tunneling sidecar end to end: a real CA, agent, proxies (each as its
//! own uid, hence its own SPIFFE ID) and applications (`tests/py/hash_app.py`,
//! which checks SHA-256 at both ends), all separate processes on loopback.
//!
//! The mesh: `web` (uid 1001) → its proxy's route listener → mutual TLS →
//! `api`'s proxy (uid 1002, inbound) → the application. Policies are the
//! repository's examples, which let acme's `web` call `api`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const WEB: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/web";
const API: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/api";
const DB: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/db";
const WEB_UID: u32 = 1001;
const API_UID: u32 = 1002;
const DB_UID: u32 = 1003;

struct Mesh {
    _ca: CaProcess,
    agent: AgentProcess,
    policies: tempfile::TempDir,
    app: AppProcess,
    api: ProxyProcess,
    api_inbound: String,
}

impl Mesh {
    fn start(ca_flags: &[&str], api_flags: &[&str]) -> Mesh {
        let ca = CaProcess::start(ca_flags);
        let agent = AgentProcess::start(&ca);
        let node = ca.cli_json(&["agent", "list"])[0]["spiffe_id"]
            .as_str()
            .unwrap()
            .to_owned();
        for (id, uid) in [(WEB, WEB_UID), (API, API_UID), (DB, DB_UID)] {
            ca.register(id, &node, &format!("unix:uid:{uid}"));
        }
        let policies = policy_copy();
        let app = AppProcess::start();
        let api_inbound = format!("127.0.0.1:{}", free_port());
        let forward = format!("127.0.0.1:{}", app.port);
        let policy_dir = policies.path().to_str().unwrap().to_owned();
        let mut flags = vec![
            "--inbound-listen",
            &api_inbound,
            "--forward",
            &forward,
            "--policy-dir",
            &policy_dir,
        ];
        flags.extend_from_slice(api_flags);
        let api = ProxyProcess::start(&agent, API_UID, &flags);
        Mesh {
            _ca: ca,
            agent,
            policies,
            app,
            api,
            api_inbound,
        }
    }

    /// A client-side proxy as `uid` with one route to `api`; returns it and the route port.
    fn client_proxy(&self, uid: u32, expect: &str, extra: &[&str]) -> (ProxyProcess, u16) {
        let port = free_port();
        let route = format!(
            "listen=127.0.0.1:{port},destination={},id={expect},target=api.acme:8080",
            self.api_inbound
        );
        let mut args = vec!["--route", route.as_str()];
        args.extend_from_slice(extra);
        (ProxyProcess::start(&self.agent, uid, &args), port)
    }
}

/// The repository's policies, in a directory the proxies (other uids) can read.
fn policy_copy() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for e in std::fs::read_dir(&src).unwrap() {
        let p: PathBuf = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}

fn assert_clean(r: &ClientReport, exchanges: u64, size: u64) {
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert_eq!(r.ok, exchanges);
    assert_eq!(r.bytes_sent, exchanges * size);
    assert_eq!(r.bytes_received, exchanges * size);
}

#[test]
fn bytes_arrive_intact_both_ways_and_streams_share_one_connection() {
    let mesh = Mesh::start(&[], &[]);
    let (web, port) = mesh.client_proxy(WEB_UID, API, &[]);

    // 1. One stream each of 1 B, 64 KiB and 100 MiB: both ends compare SHA-256.
    for size in [1usize, 64 * 1024, 100 * 1024 * 1024] {
        let r = hash_client(port, size, 1, 0.0);
        assert_clean(&r, 1, size as u64);
    }
    // 2. 100 concurrent streams of 1 MiB.
    let r = hash_client(port, 1024 * 1024, 100, 0.0);
    assert_clean(&r, 100, 1024 * 1024);

    // 3. All of it went over one pooled TLS connection, and the application
    //    saw one connection per stream.
    let conns = web.metric("ward_proxy_connections_total{direction=\"outbound\"}");
    assert_eq!(conns, 1.0, "outbound TLS connections made");
    assert_eq!(mesh.app.wait_connections(103), 103);
    let streams = mesh
        .api
        .metric("ward_proxy_streams_total{direction=\"inbound\"}");
    assert_eq!(streams, 103.0);
    let allowed = mesh
        .api
        .metric("ward_proxy_authorization_decisions_total{decision=\"allow\"}");
    assert_eq!(allowed, 103.0);
    let to_app = mesh
        .api
        .metric("ward_proxy_bytes_total{direction=\"inbound\",flow=\"to_app\"}");
    // Each exchange: an 8-byte length, then the payload.
    let payload = 1 + 64 * 1024 + 100 * 1024 * 1024 + 100 * 1024 * 1024;
    assert_eq!(to_app as u64, payload + 103 * 8);

    // 4. Every stream has a decision log line naming the policy that allowed it.
    let lines = mesh.api.decision_lines();
    assert_eq!(lines.len(), 103);
    assert!(lines.iter().all(|l| l["decision"] == "allow"
        && l["principal"] == WEB
        && l["resource"] == API
        && l["policies"][0] == "acme-web-to-api"));
}

#[test]
fn a_denied_principal_gets_403_and_a_policy_edit_lets_it_in_without_a_restart() {
    let mesh = Mesh::start(&[], &[]);
    // `db` may not call `api` under the example policies.
    let port = free_port();
    let connect = format!("127.0.0.1:{port}");
    let route = format!(
        "destination={},id={API},target=api.acme:8080",
        mesh.api_inbound
    );
    let db = ProxyProcess::start(
        &mesh.agent,
        DB_UID,
        &["--route", &route, "--connect-listen", &connect],
    );

    // 1. Through the HTTP CONNECT listener the application sees the peer's 403.
    let reply = http_connect(&connect, "api.acme:8080");
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert_eq!(
        mesh.app.connections(),
        0,
        "a denied stream reached the application"
    );
    let denied = mesh.api.decision_lines();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["decision"], "deny");
    assert_eq!(denied[0]["principal"], DB);
    assert_eq!(
        mesh.api
            .metric("ward_proxy_authorization_decisions_total{decision=\"deny\"}"),
        1.0
    );

    // 2. Allow db → api in the watched directory; new streams get through.
    std::fs::write(
        mesh.policies.path().join("db-to-api.cedar"),
        r#"@id("acme-db-to-api")
permit (
  principal is Ward::Workload in Ward::Tenant::"acme",
  action == Ward::Action::"connect",
  resource is Ward::Workload in Ward::Tenant::"acme"
)
when { principal.service == "db" && resource.service == "api" };
"#,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = http_connect(&connect, "api.acme:8080");
        if reply.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {reply}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(mesh.app.wait_connections(1), 1);
    let last = mesh.api.decision_lines().pop().unwrap();
    assert_eq!(last["decision"], "allow");
    assert_eq!(last["policies"][0], "acme-db-to-api");
    drop(db);
}

/// Sends `CONNECT target` to an HTTP CONNECT listener; returns the reply head.
fn http_connect(addr: &str, target: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => buf.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}
