//! The tunneling sidecar end to end: a real CA, agent, proxies (each as its
//! own uid, hence its own SPIFFE ID) and applications (`tests/py/hash_app.py`,
//! which checks SHA-256 at both ends), all separate processes on loopback.
//!
//! The mesh: `web` (uid 1001) → its proxy's route listener → mutual TLS →
//! `api`'s proxy (uid 1002, inbound) → the application. Policies are the
//! repository's examples, which let acme's `web` call `api`.

mod common;

use std::io::{Read, Write};
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
    ca: CaProcess,
    agent: AgentProcess,
    policies: tempfile::TempDir,
    app: AppProcess,
    api: ProxyProcess,
    api_inbound: String,
}

impl Mesh {
    /// Sends `sig` (`-STOP`, `-CONT`) to the server-side proxy.
    fn signal_api(&self, sig: &str) {
        self.api.signal(sig);
    }

    fn start(ca_flags: &[&str], api_flags: &[&str]) -> Mesh {
        Self::start_with(ca_flags, api_flags, false, None)
    }

    /// `api_stdout_unread`: the server-side proxy's standard output is a
    /// pipe nobody reads (see [`ProxyProcess::start_stdout_unread`]).
    /// `forward`: the application the server-side proxy forwards to, if not
    /// the hash app.
    fn start_with(
        ca_flags: &[&str],
        api_flags: &[&str],
        api_stdout_unread: bool,
        forward: Option<&str>,
    ) -> Mesh {
        let ca = CaProcess::start(ca_flags);
        let agent = AgentProcess::start(&ca);
        let node = ca.first_agent();
        for (id, uid) in [(WEB, WEB_UID), (API, API_UID), (DB, DB_UID)] {
            ca.register(id, &node, &format!("unix:uid:{uid}"));
        }
        let policies = policy_copy();
        let app = AppProcess::start();
        let api_inbound = format!("127.0.0.1:{}", free_port());
        let forward = forward.map_or_else(|| format!("127.0.0.1:{}", app.port), str::to_owned);
        let policy_dir = policies.path().to_str().unwrap().to_owned();
        let mut flags = vec![
            "--inbound-listen",
            &api_inbound,
            "--forward",
            &forward,
            "--service-port",
            "8080",
            "--policy-dir",
            &policy_dir,
        ];
        flags.extend_from_slice(api_flags);
        let api = if api_stdout_unread {
            ProxyProcess::start_stdout_unread(&agent, API_UID, &flags)
        } else {
            ProxyProcess::start(&agent, API_UID, &flags)
        };
        Mesh {
            ca,
            agent,
            policies,
            app,
            api,
            api_inbound,
        }
    }

    /// A client-side proxy as `uid` with one route to `api`; returns it and the route port.
    fn client_proxy(&self, uid: u32, expect: &str, extra: &[&str]) -> (ProxyProcess, u16) {
        self.client_proxy_to(uid, expect, &self.api_inbound, extra)
    }

    /// [`Mesh::client_proxy`] with the route's destination given.
    fn client_proxy_to(
        &self,
        uid: u32,
        expect: &str,
        destination: &str,
        extra: &[&str],
    ) -> (ProxyProcess, u16) {
        let port = free_port();
        let route = format!(
            "listen=127.0.0.1:{port},destination={destination},id={expect},target=api.acme:8080"
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
    let ended_ok = "ward_proxy_streams_ended_total{direction=\"inbound\",outcome=\"ok\"}";
    assert_eq!(mesh.api.metric(ended_ok), 103.0);
    // The same by peer, and each stream's set-up and duration.
    let from_web = format!("direction=\"inbound\",peer_id=\"{WEB}\"");
    let by_web = mesh
        .api
        .metric(&format!("ward_proxy_peer_streams_total{{{from_web}}}"));
    assert_eq!(by_web, 103.0);
    let to_app_by_web = mesh.api.metric(&format!(
        "ward_proxy_peer_bytes_total{{{from_web},flow=\"to_app\"}}"
    ));
    assert_eq!(to_app_by_web as u64, payload + 103 * 8);
    for h in [
        "stream_setup_seconds_count",
        "stream_duration_seconds_count",
    ] {
        let n = mesh
            .api
            .metric(&format!("ward_proxy_{h}{{direction=\"inbound\"}}"));
        assert_eq!(n, 103.0, "{h}");
    }

    // 4. Each proxy's /config_dump says what it runs with: its identity,
    //    its route with the pooled connection (no stream open now), its
    //    policy source and version.
    let dump = web.config_dump();
    assert_eq!(dump["identity"]["spiffe_id"], WEB, "{dump}");
    assert_eq!(dump["identity"]["trust_domain"], "example.org");
    assert!(dump["identity"]["svid_expires_at"].is_string(), "{dump}");
    let route = &dump["outbound"][0];
    assert_eq!(route["destination"], mesh.api_inbound, "{dump}");
    assert_eq!(route["ids"], serde_json::json!([API]));
    assert_eq!(route["connections"], 1, "{dump}");
    assert_eq!(route["endpoints"][0]["address"], mesh.api_inbound, "{dump}");
    assert_eq!(route["endpoints"][0]["connections"], 1, "{dump}");
    // (The last streams end as the proxy handles the application's close.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while web.config_dump()["outbound"][0]["streams"] != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(web.config_dump()["outbound"][0]["streams"], 0);
    let to_api = format!("direction=\"outbound\",peer_id=\"{API}\"");
    let streams_to_api = web.metric(&format!("ward_proxy_peer_streams_total{{{to_api}}}"));
    assert_eq!(streams_to_api, 103.0);
    let set_up = web.metric("ward_proxy_stream_setup_seconds_count{direction=\"outbound\"}");
    assert_eq!(set_up, 103.0);
    assert_eq!(dump["inbound"], serde_json::Value::Null);
    assert_eq!(dump["draining"], false);
    let dump = mesh.api.config_dump();
    assert_eq!(dump["identity"]["spiffe_id"], API, "{dump}");
    assert_eq!(
        dump["inbound"]["forward"],
        format!("127.0.0.1:{}", mesh.app.port)
    );
    assert!(dump["policy"]["source"]
        .as_str()
        .unwrap()
        .starts_with("directory "));
    assert!(dump["policy"]["version"].as_u64().unwrap() >= 1, "{dump}");
    assert_eq!(dump["policy"]["mode"], "enforce");

    // 5. Every stream has a decision log line naming the policy that allowed it.
    let lines = mesh.api.wait_decisions(103);
    assert_eq!(lines.len(), 103);
    assert!(lines.iter().all(|l| l["decision"] == "allow"
        && l["principal"] == WEB
        && l["resource"] == API
        && l["policies"][0] == "acme-web-to-api"));

    // 6. The tunnel's TCP connection has keepalive on at both ends (so a
    //    peer whose node vanished is found out): `ss` shows its timer (or,
    //    while a segment is in flight, the retransmission timer instead).
    let inbound_port = mesh.api_inbound.rsplit_once(':').unwrap().1;
    let filter = format!("( dport = :{inbound_port} or sport = :{inbound_port} )");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = std::process::Command::new("ss")
            .args(["-tnoH", "state", "established", &filter])
            .output()
            .expect("ss (iproute2)");
        let sockets = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = sockets.lines().collect();
        assert_eq!(lines.len(), 2, "one connection, two ends:\n{sockets}");
        if lines.iter().all(|l| l.contains("timer:(keepalive,")) {
            break;
        }
        assert!(Instant::now() < deadline, "no keepalive timer:\n{sockets}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 7. A stream held open is counted on its route in /config_dump.
    let mut open = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    open.write_all(&(1u64 << 30).to_be_bytes()).unwrap();
    assert_eq!(mesh.app.wait_connections(104), 104);
    assert_eq!(web.config_dump()["outbound"][0]["streams"], 1);

    // 8. A workload matching two entries serves as the one `--spiffe-id`
    //    names, whichever the agent lists first. (DB_ADMIN's proxy, ready,
    //    shows that the agent gives both: one of them is not listed first.)
    const DB_ADMIN: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/db-admin";
    let node = mesh.ca.first_agent();
    mesh.ca
        .register(DB_ADMIN, &node, &format!("unix:uid:{DB_UID}"));
    for id in [DB_ADMIN, DB] {
        let (db, _) = mesh.client_proxy(DB_UID, API, &["--spiffe-id", id]);
        let dump = db.config_dump();
        assert_eq!(dump["identity"]["spiffe_id"], id, "{dump}");
        assert_eq!(dump["spiffe_id"], id, "{dump}");
    }
}

/// A workload with more than one port: a `CONNECT` naming a listed port
/// goes to that port's application and policies see that port; any other
/// port goes to `--forward`, seen as the service port. A rule on a port
/// then holds for that port only.
#[test]
fn a_listed_inbound_port_reaches_its_own_application_and_policies_see_it() {
    let admin = AppProcess::start();
    let listed = format!("9090=127.0.0.1:{}", admin.port);
    let logs = shared_dir();
    let access = logs.path().join("api.log");
    let access_flag = format!("--access-log={}", access.display());
    let mesh = Mesh::start(&[], &["--inbound-port", &listed, &access_flag]);
    let ports = [free_port(), free_port(), free_port()];
    let routes: Vec<String> = ports
        .iter()
        .zip(["api.acme:9090", "api.acme:8080", "api.acme:7777"])
        .map(|(port, target)| {
            format!(
                "--route=listen=127.0.0.1:{port},destination={},id={API},target={target}",
                mesh.api_inbound
            )
        })
        .collect();
    let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
    let _web = ProxyProcess::start(&mesh.agent, WEB_UID, &routes);

    // 1. 9090 reaches its own application; 8080 and an unlisted port the
    //    forward one. Policies saw 9090 and 8080 (for both).
    for port in ports {
        assert_clean(&hash_client(port, 4096, 1, 0.0), 1, 4096);
    }
    assert_eq!(admin.wait_connections(1), 1);
    assert_eq!(mesh.app.wait_connections(2), 2);
    let lines = mesh.api.wait_decisions(3);
    let mut seen: Vec<u64> = lines
        .iter()
        .map(|l| l["context"]["destination_port"].as_u64().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, vec![8080, 8080, 9090], "{lines:?}");
    let dump = mesh.api.config_dump();
    assert_eq!(dump["inbound"]["ports"][0]["port"], 9090, "{dump}");
    // The access log names where each stream went.
    let lines = wait_json_lines(&access, 3, Duration::from_secs(5), |_| true);
    let mut went: Vec<String> = lines
        .iter()
        .map(|l| l["destination"].as_str().unwrap().to_owned())
        .collect();
    went.sort();
    let mut want = vec![
        format!("127.0.0.1:{}", admin.port),
        format!("127.0.0.1:{}", mesh.app.port),
        format!("127.0.0.1:{}", mesh.app.port),
    ];
    want.sort();
    assert_eq!(went, want, "{lines:?}");

    // 2. A rule on port 9090 holds for it alone.
    std::fs::write(
        mesh.policies.path().join("no-admin-port.cedar"),
        r#"@id("no-admin-port")
forbid (principal, action == Ward::Action::"connect", resource)
when { context.destination_port == 9090 };
"#,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while hash_client(ports[0], 1024, 1, 0.0).ok == 1 {
        assert!(Instant::now() < deadline, "port 9090 still allowed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = admin.connections();
    assert_eq!(hash_client(ports[0], 1024, 1, 0.0).ok, 0);
    assert_eq!(admin.connections(), before, "a denied stream reached it");
    for port in &ports[1..] {
        assert_clean(&hash_client(*port, 1024, 1, 0.0), 1, 1024);
    }
}

#[test]
fn a_denied_principal_gets_403_and_a_policy_edit_lets_it_in_without_a_restart() {
    let mesh = Mesh::start(&[], &[]);
    // `db` may not call `api` under the example policies.
    let port = free_port();
    let connect = format!("127.0.0.1:{port}");
    let route_port = free_port();
    let route = format!(
        "listen=127.0.0.1:{route_port},destination={},id={API},target=api.acme:8080",
        mesh.api_inbound
    );
    let db = ProxyProcess::start(
        &mesh.agent,
        DB_UID,
        &["--route", &route, "--connect-listen", &connect],
    );

    // 1. Through the HTTP CONNECT listener the application sees the peer's
    //    403, and why.
    let reply = http_connect(&connect, "api.acme:8080");
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(
        reply.contains(
            "\r\nward-proxy-error: the peer refused the stream: 403 Forbidden (denied)\r\n"
        ),
        "{reply}"
    );
    // (A plain HTTP request through the listener is told it takes CONNECT.)
    let reply = http_proxy_request(&connect, "GET", "http://api.acme:8080/");
    assert!(
        reply.starts_with("HTTP/1.1 405") && reply.contains("\r\nAllow: CONNECT\r\n"),
        "{reply}"
    );
    assert_eq!(
        mesh.app.connections(),
        0,
        "a denied stream reached the application"
    );
    let denied = mesh.api.wait_decisions(1);
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["decision"], "deny");
    assert_eq!(denied[0]["principal"], DB);
    assert_eq!(
        mesh.api
            .metric("ward_proxy_authorization_decisions_total{decision=\"deny\"}"),
        1.0
    );
    // Both ends count how the stream ended, access log or not (counted
    // right after the answer: waited for, up to 5 s).
    let ended = |p: &ProxyProcess, d: &str, outcome: &str, want: f64| {
        let name =
            format!("ward_proxy_streams_ended_total{{direction=\"{d}\",outcome=\"{outcome}\"}}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = p.metric(&name);
            if n == want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(ended(&mesh.api, "inbound", "denied", 1.0), 1.0);
    // (a peer's 403 is its policy's denial, at this end too)
    assert_eq!(ended(&db, "outbound", "denied", 1.0), 1.0);
    // (the plain HTTP request)
    assert_eq!(ended(&db, "outbound", "error", 1.0), 1.0);
    // Through the route's listener: the stream is counted from its CONNECT
    // on, but a refused one was carried to no peer and took no time.
    let r = hash_client(route_port, 1024, 1, 0.0);
    assert_eq!(r.ok, 0, "{:?}", r.errors);
    assert_eq!(ended(&db, "outbound", "denied", 2.0), 2.0);
    let streams = db.metric("ward_proxy_streams_total{direction=\"outbound\"}");
    assert_eq!(streams, 1.0);
    let to_api = format!("direction=\"outbound\",peer_id=\"{API}\"");
    let carried = db.metric(&format!("ward_proxy_peer_streams_total{{{to_api}}}"));
    assert_eq!(carried, 0.0);
    for h in [
        "stream_setup_seconds_count",
        "stream_duration_seconds_count",
    ] {
        let n = db.metric(&format!("ward_proxy_{h}{{direction=\"outbound\"}}"));
        assert_eq!(n, 0.0, "{h}");
    }

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
    // Allow lines reach the log within a second; every earlier stream was
    // denied, so the first allow line is this stream's.
    let allowed = mesh
        .api
        .wait_decisions_where(1, |l| l["decision"] == "allow");
    assert_eq!(allowed.len(), 1, "{allowed:?}");
    assert_eq!(allowed[0]["policies"][0], "acme-db-to-api");

    // 3. An invalid file is rejected (log line with file and position, and a
    //    metric); the last good set stays active.
    let rejected = "ward_proxy_policy_reloads_total{result=\"rejected\"}";
    assert_eq!(mesh.api.metric(rejected), 0.0);
    std::fs::write(
        mesh.policies.path().join("broken.cedar"),
        "permit (principal, action == Ward::Action::\"connect\", resource)\n  when { principal.no_such_attribute };\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while mesh.api.metric(rejected) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the invalid set was not reported"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = mesh
        .api
        .wait_log(|l| l.contains("policy set rejected") && l.contains("broken.cedar:2:"));
    assert!(
        log.contains("policy set rejected") && log.contains("broken.cedar:2:"),
        "{log}"
    );
    let reply = http_connect(&connect, "api.acme:8080");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    drop(db);
}

#[test]
fn the_access_log_has_a_line_per_stream_with_its_peer_outcome_and_bytes() {
    let logs = shared_dir();
    let path = |name: &str| logs.path().join(name).to_str().unwrap().to_owned();
    let (api_log, web_log, db_log) = (path("api.log"), path("web.log"), path("db.log"));
    let mesh = Mesh::start(&[], &["--access-log", &api_log]);
    let connect = format!("127.0.0.1:{}", free_port());
    let (mut web_proxy, web_port) = mesh.client_proxy(
        WEB_UID,
        API,
        &[
            "--access-log",
            &web_log,
            "--connect-listen",
            &connect,
            "--drain-timeout",
            "1s",
        ],
    );
    let db_connect = format!("127.0.0.1:{}", free_port());
    // db names api's proxy by host name: its lines say where that led.
    let by_name = mesh.api_inbound.replace("127.0.0.1", "localhost");
    let (_db, db_port) = mesh.client_proxy_to(
        DB_UID,
        API,
        &by_name,
        &["--access-log", &db_log, "--connect-listen", &db_connect],
    );

    let r = hash_client(web_port, 4096, 1, 0.0);
    assert_clean(&r, 1, 4096);
    // On the wire the client sends a length (8 bytes) and its 4,096 bytes; the
    // server answers two SHA-256 digests (64 bytes) and 4,096 bytes.
    let (request, response) = (8 + 4096, 4096 + 64);
    // db → api is denied by the example policies.
    assert_eq!(hash_client(db_port, 4096, 1, 0.0).ok, 0);

    // Lines are written out every second.
    let lines =
        |p: &str, n: usize| wait_json_lines(Path::new(p), n, Duration::from_secs(5), |_| true);
    let api = lines(&api_log, 2);
    assert_eq!(api.len(), 2, "{api:?}");
    let ok = api
        .iter()
        .find(|l| l["peer_id"] == WEB)
        .expect("web's stream");
    assert_eq!(ok["direction"], "inbound");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["outcome"], "ok");
    assert_eq!(ok["bytes_to_app"], request);
    assert_eq!(ok["bytes_from_app"], response);
    assert_eq!(ok["destination"], format!("127.0.0.1:{}", mesh.app.port));
    assert!(ok["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    let denied = api
        .iter()
        .find(|l| l["peer_id"] == DB)
        .expect("db's stream");
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["outcome"], "denied");
    assert_eq!(denied["bytes_to_app"], 0);
    // Each inbound line names the decision, as the decision log does.
    let decisions = mesh.api.wait_decisions(2);
    for (line, principal) in [(ok, WEB), (denied, DB)] {
        let decision = decisions
            .iter()
            .find(|d| d["principal"] == principal)
            .expect("a decision line");
        assert!(line["decision_id"].is_string(), "{line}");
        assert_eq!(line["decision_id"], decision["decision_id"], "{line}");
    }

    let web = lines(&web_log, 1);
    assert_eq!(web.len(), 1, "{web:?}");
    assert_eq!(web[0]["log"], "access");
    assert_eq!(web[0]["direction"], "outbound");
    assert_eq!(web[0]["status"], 200);
    assert_eq!(web[0]["outcome"], "ok");
    assert_eq!(web[0]["destination"], mesh.api_inbound);
    assert_eq!(web[0]["target"], "api.acme:8080");
    // The peer proxy's ID, as its certificate named it, and its address.
    assert_eq!(web[0]["peer_id"], API);
    assert_eq!(web[0]["peer_address"], mesh.api_inbound);
    assert_eq!(web[0]["bytes_from_app"], request);
    assert_eq!(web[0]["bytes_to_app"], response);
    assert!(web[0]["duration_ms"].as_f64().unwrap() > 0.0);

    // An HTTP CONNECT to a target no route names is refused by the proxy
    // itself; a stream still open when the proxy stops is logged as cut.
    let reply = http_connect(&connect, "nowhere.test:1");
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(
        reply.contains("\r\nward-proxy-error: no route names this target\r\n"),
        "{reply}"
    );
    let web = lines(&web_log, 2);
    assert_eq!(web.len(), 2, "{web:?}");
    assert_eq!(web[1]["status"], 403);
    assert_eq!(web[1]["outcome"], "denied");
    assert_eq!(web[1]["target"], "nowhere.test:1");
    assert_eq!(web[1]["peer_id"], serde_json::Value::Null);
    let mut open = std::net::TcpStream::connect(("127.0.0.1", web_port)).unwrap();
    std::io::Write::write_all(&mut open, &(1u64 << 30).to_be_bytes()).unwrap();
    assert_eq!(mesh.app.wait_connections(2), 2);
    assert!(web_proxy.terminate().success());
    let web = lines(&web_log, 3);
    assert_eq!(web.len(), 3, "{web:?}");
    assert_eq!(web[2]["outcome"], "cut");
    assert_eq!(web[2]["bytes_from_app"], serde_json::Value::Null);
    let db = lines(&db_log, 1);
    assert_eq!(db.len(), 1, "{db:?}");
    assert_eq!(db[0]["status"], 403);
    assert_eq!(db[0]["outcome"], "denied");
    assert_eq!(db[0]["peer_id"], API);
    assert_eq!(db[0]["destination"], by_name);
    assert_eq!(db[0]["peer_address"], mesh.api_inbound);
    // The same refusal through the HTTP CONNECT listener names the peer too.
    assert!(http_connect(&db_connect, "api.acme:8080").starts_with("HTTP/1.1 403"));
    let db = lines(&db_log, 2);
    assert_eq!(db.len(), 2, "{db:?}");
    assert_eq!(db[1]["status"], 403);
    assert_eq!(db[1]["outcome"], "denied");
    assert_eq!(db[1]["peer_id"], API);
}

#[test]
fn logs_whose_destination_stalls_do_not_stall_the_proxy_and_lose_nothing_once_it_is_read() {
    // The server-side proxy writes its decision log and its access log to
    // standard output, a pipe nobody reads: it fills after some 64 KiB.
    let mut mesh = Mesh::start_with(&[], &["--access-log", "stdout"], true, None);
    let (_web, web_port) = mesh.client_proxy(WEB_UID, API, &[]);
    // 1,000 streams one after another, each a 1-byte exchange: about 1 MB of
    // log lines, 15 times what the pipe holds.
    const STREAMS: usize = 1000;
    let started = Instant::now();
    for i in 0..STREAMS {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", web_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&[0, 0, 0, 0, 0, 0, 0, 1, 42]).unwrap();
        let mut answer = [0u8; 65];
        if let Err(e) = s.read_exact(&mut answer) {
            panic!("stream {i} got no answer: {e} (the proxy waits on its log?)");
        }
        assert!(started.elapsed() < Duration::from_secs(120));
    }
    assert_eq!(
        mesh.api
            .metric("ward_proxy_authorization_decisions_total{decision=\"allow\"}"),
        STREAMS as f64
    );
    // Nothing was dropped: the pipe's backlog is held until it is read.
    for log in ["decision", "access"] {
        let name = format!("ward_proxy_log_lines_dropped_total{{log=\"{log}\"}}");
        assert_eq!(mesh.api.metric(&name), 0.0, "{name}");
    }
    // Now read the pipe: every stream has its decision line and its access line.
    let mut out = mesh.api.take_stdout();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        text
    });
    assert!(mesh.api.terminate().success());
    let text = reader.join().unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let allowed = lines
        .iter()
        .filter(|l| l["decision"] == "allow" && l["principal"] == WEB)
        .count();
    let ended = lines
        .iter()
        .filter(|l| l["log"] == "access" && l["outcome"] == "ok" && l["peer_id"] == WEB)
        .count();
    assert_eq!((allowed, ended), (STREAMS, STREAMS));
}

#[test]
fn an_open_stream_a_new_policy_set_denies_is_closed_and_its_bytes_are_counted() {
    let mesh = Mesh::start(&[], &[]);
    let (_web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    // One stream exchanging 64 KiB messages for up to 8 s.
    let load = std::thread::spawn(move || hash_client(port, 64 * 1024, 1, 8.0));
    std::thread::sleep(Duration::from_millis(1500));
    let forbid = Instant::now();
    std::fs::write(
        mesh.policies.path().join("no-web.cedar"),
        r#"@id("web-cut-off")
forbid (principal, action == Ward::Action::"connect", resource)
when { principal.service == "web" };
"#,
    )
    .unwrap();
    let r = load.join().unwrap();
    let took = forbid.elapsed();
    println!(
        "  the stream ended {took:?} after the policy change, {} exchanges in",
        r.ok
    );
    assert!(r.ok > 0, "nothing went through before the change");
    assert!(
        !r.errors.is_empty(),
        "the stream outlived a set that denies it"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(mesh.api.metric("ward_proxy_streams_revoked_total"), 1.0);
    let closed = "closed an open stream the policy set now denies";
    assert!(mesh.api.wait_log(|l| l.contains(closed)).contains(closed));
    // What it carried before it was cut off is counted.
    let to_app = mesh
        .api
        .metric("ward_proxy_bytes_total{direction=\"inbound\",flow=\"to_app\"}");
    assert!(
        to_app >= (r.ok * 64 * 1024) as f64,
        "{to_app} bytes counted for {} exchanges of 64 KiB",
        r.ok
    );
}

#[test]
fn policies_see_the_port_the_proxy_serves_not_the_one_the_peer_names() {
    let mesh = Mesh::start(&[], &[]);
    // web may call api (example policies); now no one may reach api's 8080.
    std::fs::write(
        mesh.policies.path().join("no-8080.cedar"),
        r#"@id("nothing-on-8080")
forbid (principal, action == Ward::Action::"connect", resource)
when { context.destination_port == 8080 };
"#,
    )
    .unwrap();
    let connect = format!("127.0.0.1:{}", free_port());
    let route = |target: &str| format!("destination={},id={API},target={target}", mesh.api_inbound);
    let (r8080, r9999) = (route("api.acme:8080"), route("api.acme:9999"));
    let _web = ProxyProcess::start(
        &mesh.agent,
        WEB_UID,
        &[
            "--route",
            &r8080,
            "--route",
            &r9999,
            "--connect-listen",
            &connect,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http_connect(&connect, "api.acme:8080").starts_with("HTTP/1.1 403") {
        assert!(Instant::now() < deadline, "the forbid never took effect");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Naming another port reaches the same application, so it is decided
    // on the port served: refused all the same.
    let served = mesh.app.connections();
    let reply = http_connect(&connect, "api.acme:9999");
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert_eq!(
        mesh.app.connections(),
        served,
        "a forbidden stream got through"
    );
    // The counter is raised before the reply; the line is written out by
    // the log's thread, so wait until there is a line for every denial.
    let denials = mesh
        .api
        .metric("ward_proxy_authorization_decisions_total{decision=\"deny\"}");
    let last = mesh
        .api
        .wait_decisions_where(denials as usize, |l| l["decision"] == "deny")
        .pop()
        .unwrap();
    assert_eq!(last["decision"], "deny", "{last}");
    assert_eq!(last["policies"][0], "nothing-on-8080", "{last}");
}

#[test]
fn a_destination_that_never_answers_holds_up_only_its_own_route() {
    let mesh = Mesh::start(&[], &[]);
    // A "peer" that accepts TCP and never says a word: each TLS handshake
    // with it waits out the handshake timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for s in silent.incoming().flatten() {
            keep.lock().unwrap().push(s);
        }
    });
    let (dead_port, good_port) = (free_port(), free_port());
    let dead = format!("listen=127.0.0.1:{dead_port},destination={silent_addr},id={API}");
    let good = format!(
        "listen=127.0.0.1:{good_port},destination={},id={API},target=api.acme:8080",
        mesh.api_inbound
    );
    let _web = ProxyProcess::start(
        &mesh.agent,
        WEB_UID,
        &[
            "--route",
            &dead,
            "--route",
            &good,
            "--handshake-timeout",
            "8s",
        ],
    );
    // More application connections to the dead route than tunnels are
    // opened at once (256).
    let waiting: Vec<_> = (0..300)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", dead_port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let r = hash_client(good_port, 1024, 1, 0.0);
    let took = started.elapsed();
    println!("  a stream on the healthy route took {took:?} with 300 waiting on the dead one");
    assert_eq!(r.ok, 1, "{:?}", r.errors);
    assert!(
        took < Duration::from_secs(4),
        "the healthy route waited {took:?} behind the dead one"
    );
    // Once the first attempt has failed, those queued behind it fail at
    // once instead of each waiting out its own handshake.
    let failed_by = Instant::now() + Duration::from_secs(14);
    for mut s in waiting {
        use std::io::Read;
        s.set_read_timeout(Some(
            failed_by
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        let mut b = [0u8; 1];
        let r = s.read(&mut b);
        let timed_out = matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        assert!(
            !timed_out && matches!(r, Ok(0) | Err(_)),
            "an application connection to the dead route was held for more than 14 s"
        );
    }
    assert!(!held.lock().unwrap().is_empty());
}

/// A reset travels through the tunnel: the server application resets its
/// connection midway through its answer, and the client application gets
/// what came and then a reset, not an end of file that would pass the cut
/// answer off as whole. A route whose tunnel is refused resets the
/// application's connection too.
#[test]
fn a_reset_reaches_the_other_application_as_a_reset() {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let forward = server.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in server.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let _ = conn.write_all(&[7u8; 1000]);
                std::thread::sleep(Duration::from_millis(500));
                // Linger zero: closing sends a RST.
                socket2::SockRef::from(&conn)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            });
        }
    });
    let mesh = Mesh::start_with(&[], &[], false, Some(&forward));
    let (_web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    let read_all = |port: u16| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got);
        (got.len(), r.map_err(|e| e.kind()))
    };
    assert_eq!(
        read_all(port),
        (1000, Err(std::io::ErrorKind::ConnectionReset))
    );
    // db may not call api: its route's connection is reset.
    let (_db, db_port) = mesh.client_proxy(DB_UID, API, &[]);
    assert_eq!(
        read_all(db_port),
        (0, Err(std::io::ErrorKind::ConnectionReset))
    );
}

/// A proxy that takes inbound tunnels is not ready while it has no policy
/// set (every stream would be denied): here none has been pushed to the CA.
/// Once one is, the proxy gets it through its agent and is ready.
#[test]
fn an_inbound_proxy_is_not_ready_until_it_has_a_policy_set() {
    let ca = CaProcess::start(&[]);
    let agent = AgentProcess::start(&ca);
    let node = ca.first_agent();
    ca.register(API, &node, &format!("unix:uid:{API_UID}"));
    let inbound = format!("127.0.0.1:{}", free_port());
    let api = ProxyProcess::spawn(
        &agent,
        API_UID,
        &["--inbound-listen", &inbound, "--forward", "127.0.0.1:9"],
    );
    let readyz = || http_get(&api.health_addr, "/readyz");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match readyz() {
            Some((503, body)) if body.contains("no policy set yet") => break,
            other => assert!(
                Instant::now() < deadline,
                "never said it waits for a policy set: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // It has its SVID and listens meanwhile.
    assert!(api.log_text().contains("SVID installed"));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(readyz().map(|(code, _)| code), Some(503));

    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    assert!(ca.cli(&["policy", "push", policies]).status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while readyz().map(|(code, _)| code) != Some(200) {
        assert!(Instant::now() < deadline, "not ready: {:?}", readyz());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pooled connection whose peer stops answering (here a relay between the
/// proxies stops forwarding: the kernel still acknowledges the bytes, as it
/// does for a frozen peer, and nothing comes back, as from a node that lost
/// power) is given up on twice the connect timeout and a second after the
/// `CONNECT`: the application's connection is closed, not held open, and
/// the connection takes no new streams: the next one gets a new connection.
#[test]
fn a_connect_the_peer_never_answers_is_given_up_after_the_answer_timeout() {
    let mesh = Mesh::start(&[], &[]);
    let relay = Relay::start(&mesh.api_inbound);
    let port = free_port();
    let route = format!(
        "listen=127.0.0.1:{port},destination=127.0.0.1:{},id={API},target=api.acme:8080",
        relay.port
    );
    let web = ProxyProcess::start(
        &mesh.agent,
        WEB_UID,
        &["--route", &route, "--connect-timeout", "1s"],
    );
    assert_clean(&hash_client(port, 1024, 1, 0.0), 1, 1024);
    relay.black_hole_open_connections();
    let started = Instant::now();
    let closed = closed_at_once(&format!("127.0.0.1:{port}"), Duration::from_secs(15));
    let took = started.elapsed();
    println!("  the unanswered stream was closed after {took:?}");
    assert!(closed, "the application's connection was held for 15 s");
    assert!(
        took >= Duration::from_millis(2_500) && took < Duration::from_secs(10),
        "closed after {took:?}, the answer timeout is 3 s"
    );
    // Logged as out of reach, as for an HTTP CONNECT client.
    let unreachable =
        "ward_proxy_streams_ended_total{direction=\"outbound\",outcome=\"unreachable\"}";
    assert_eq!(web.metric(unreachable), 1.0);
    // Nor does it answer a PING: the connection is retired, and the next
    // stream goes out on a new connection, which serves.
    let retired =
        "a CONNECT and a PING were not answered in time; the connection takes no new streams";
    assert!(web.wait_log(|l| l.contains(retired)).contains(retired));
    assert_clean(&hash_client(port, 1024, 1, 0.0), 1, 1024);
    assert_eq!(
        web.metric("ward_proxy_connections_total{direction=\"outbound\"}"),
        2.0
    );
}

/// A peer slow to answer a `CONNECT` (its application takes longer to
/// accept than this side waits) but alive answers the PING that follows:
/// its pooled connection keeps taking streams.
#[test]
fn a_peer_slow_to_answer_but_alive_keeps_its_pooled_connection() {
    // An application whose accept queue is full: connecting to it hangs.
    let stuck = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    stuck
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    stuck.listen(0).unwrap();
    let stuck_addr = stuck.local_addr().unwrap().as_socket().unwrap();
    let _queued: Vec<_> = (0..3)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&stuck_addr, Duration::from_millis(300)).ok()
        })
        .collect();
    let forward = stuck_addr.to_string();
    let mesh = Mesh::start_with(&[], &["--connect-timeout", "8s"], false, Some(&forward));
    let (web, port) = mesh.client_proxy(WEB_UID, API, &["--connect-timeout", "1s"]);
    let started = Instant::now();
    assert!(closed_at_once(
        &format!("127.0.0.1:{port}"),
        Duration::from_secs(15)
    ));
    assert!(started.elapsed() >= Duration::from_millis(2_500));
    // Past the PING's timeout (2 s), a second stream goes out on the same
    // connection.
    std::thread::sleep(Duration::from_secs(3));
    let second = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        web.metric("ward_proxy_connections_total{direction=\"outbound\"}"),
        1.0
    );
    assert!(!web.log_text().contains("were not answered in time"));
    drop(second);
}

/// A TCP relay that can stop forwarding on the connections open so far
/// without closing them (new ones are forwarded), and can pass what comes
/// back from upstream no faster than a given rate (a slow link).
struct Relay {
    port: u16,
    /// Connections numbered below this forward nothing more.
    black_holed_below: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    fn start(upstream: &str) -> Relay {
        Relay::start_throttled(upstream, None)
    }

    /// Passes bytes from upstream at most `down_rate` bytes a second.
    fn start_throttled(upstream: &str, down_rate: Option<usize>) -> Relay {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let black_holed_below = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (below, count, upstream) = (
            black_holed_below.clone(),
            accepted.clone(),
            upstream.to_owned(),
        );
        std::thread::spawn(move || {
            for (n, down) in listener.incoming().enumerate() {
                let Ok(down) = down else { return };
                count.store(n + 1, Ordering::SeqCst);
                let up = std::net::TcpStream::connect(&upstream).unwrap();
                for (mut from, mut to, rate) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap(), None),
                    (up, down, down_rate),
                ] {
                    let below = below.clone();
                    std::thread::spawn(move || {
                        // A tenth of a second's worth at a time, when throttled.
                        let mut buf = vec![0u8; rate.map_or(64 * 1024, |r| r / 10)];
                        let (started, mut passed) = (Instant::now(), 0);
                        while let Ok(len @ 1..) = from.read(&mut buf) {
                            // Held, never forwarded, while the sockets stay open.
                            while below.load(Ordering::SeqCst) > n {
                                std::thread::sleep(Duration::from_millis(100));
                            }
                            if to.write_all(&buf[..len]).is_err() {
                                return;
                            }
                            passed += len;
                            if let Some(rate) = rate {
                                let due = Duration::from_secs_f64(passed as f64 / rate as f64);
                                std::thread::sleep(due.saturating_sub(started.elapsed()));
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Relay {
            port,
            black_holed_below,
            accepted,
        }
    }

    fn black_hole_open_connections(&self) {
        use std::sync::atomic::Ordering;
        let open = self.accepted.load(Ordering::SeqCst);
        assert!(open > 0);
        self.black_holed_below.store(open, Ordering::SeqCst);
    }
}

/// A slow link between the proxies (a relay passing 96 KiB a second
/// towards the client side), with PINGs every second and 1 s to answer
/// them:
/// - the client side's PINGs are answered behind megabytes of the answer,
///   the server side's go out behind them: neither end takes the late
///   answers for a dead peer, as long as data moves;
/// - that includes the server side's PINGs after its last write, which
///   wait for what it wrote before them (seconds of the link: what its
///   kernel holds unsent and what the relay has taken) to drain;
/// - the server application answers 2 MiB and closes, so its stream ends
///   with most of the answer still in the server-side proxy, whose
///   connection then closes idle (after 1 s) with the close grace (10 s)
///   too short to send the rest: it waits while bytes still move;
/// - a second stream opened meanwhile (its `CONNECT` answer queued behind
///   the first's data, far past the client side's answer timeout of 3 s)
///   is waited for while data comes in, and carries its bytes too.
#[test]
fn a_slow_link_between_the_proxies_loses_nothing_to_keepalives_or_closing() {
    let fast = ["--keepalive-interval", "1s", "--keepalive-timeout", "1s"];
    let api_flags = [&fast[..], &["--idle-timeout", "1s"]].concat();
    let mesh = Mesh::start(&[], &api_flags);
    let relay = Relay::start_throttled(&mesh.api_inbound, Some(96 * 1024));
    let to_relay = format!("127.0.0.1:{}", relay.port);
    let web_flags = [&fast[..], &["--connect-timeout", "1s"]].concat();
    let (web, port) = mesh.client_proxy_to(WEB_UID, API, &to_relay, &web_flags);
    const SIZE: usize = 2 << 20;
    let started = Instant::now();
    let first = std::thread::spawn(move || hash_client_with(port, SIZE, 1, 0.0, &["--half-close"]));
    std::thread::sleep(Duration::from_secs(3));
    let second = hash_client(port, 1024, 1, 0.0);
    let report = first.join().unwrap();
    let took = started.elapsed();
    assert_clean(&report, 1, SIZE as u64);
    assert_clean(&second, 1, 1024);
    // It did take the slow link, longer than the close grace (and the
    // PINGs' timeout many times over).
    assert!(took > Duration::from_secs(15), "{took:?}");
    for (proxy, direction) in [(&web, "outbound"), (&mesh.api, "inbound")] {
        let pings = proxy.metric(&format!(
            "ward_proxy_handshake_failures_total{{direction=\"{direction}\",reason=\"ping_timeout\"}}"
        ));
        assert_eq!(pings, 0.0, "{direction}");
    }
}

/// Registers `cron` (uid 1004) on `node` with X509-SVIDs that live `ttl` seconds.
fn register_cron(mesh: &Mesh, node: &str, ttl: u32) {
    let ttl = ttl.to_string();
    mesh.ca.cli_json(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/tenant/acme/ns/prod/sa/cron",
        "--parent-id",
        node,
        "--selector",
        "unix:uid:1004",
        "--x509-ttl",
        &ttl,
    ]);
}

/// Sends `CONNECT target` to an HTTP CONNECT listener; returns the reply head.
fn http_connect(addr: &str, target: &str) -> String {
    http_proxy_request(addr, "CONNECT", target)
}

/// An HTTP CONNECT client whose tunnel cannot be opened is told why: 502
/// when the destination refuses the connection, 504 when it does not
/// answer the TLS handshake in time, with the reason in `ward-proxy-error`;
/// the access log's outcome is `unreachable` either way. A request head
/// that does not end within 8 KiB is answered 431, a target that is not
/// `host:port` 400 (outcome `error`), whatever the client still sends.
#[test]
fn http_connect_failures_say_why() {
    let mesh = Mesh::start(&[], &[]);
    // A port nothing listens on, and a listener that never speaks TLS.
    let closed = format!("127.0.0.1:{}", free_port());
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let connect = format!("127.0.0.1:{}", free_port());
    let route = |d: &str, t: &str| format!("destination={d},id={API},target={t}");
    let (to_closed, to_silent) = (
        route(&closed, "closed.test:1"),
        route(&silent_addr, "silent.test:1"),
    );
    let web = ProxyProcess::start(
        &mesh.agent,
        WEB_UID,
        &[
            "--route",
            &to_closed,
            "--route",
            &to_silent,
            "--connect-listen",
            &connect,
            "--handshake-timeout",
            "1s",
        ],
    );
    let reply = http_connect(&connect, "closed.test:1");
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
    assert!(
        reply.contains(&format!("\r\nward-proxy-error: cannot connect to {closed}")),
        "{reply}"
    );
    let started = Instant::now();
    let reply = http_connect(&connect, "silent.test:1");
    assert!(reply.starts_with("HTTP/1.1 504"), "{reply}");
    assert!(
        reply.contains("\r\nward-proxy-error: TLS handshake with"),
        "{reply}"
    );
    assert!(reply.contains("(timeout)"), "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // At once again: answered from the failure just seen, still a timeout.
    let reply = http_connect(&connect, "silent.test:1");
    assert!(reply.starts_with("HTTP/1.1 504"), "{reply}");
    assert!(reply.contains("ms ago)"), "{reply}");
    let unreachable =
        "ward_proxy_streams_ended_total{direction=\"outbound\",outcome=\"unreachable\"}";
    assert_eq!(web.metric(unreachable), 3.0);
    // A request head that does not end within 8 KiB is refused as too large.
    // The client sends more than the proxy reads of a head: the proxy
    // reads the rest and drops it before closing, so the connection ends
    // cleanly (a close with bytes unread would reset it, and a reset can
    // throw the reply away).
    let reply = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&connect).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = b"CONNECT api.acme:8080 HTTP/1.1\r\nX-Padding: ".to_vec();
        head.resize(256 * 1024, b'a');
        let _ = s.write_all(&head);
        let mut reply = String::new();
        let read = s.read_to_string(&mut reply);
        assert!(read.is_ok(), "{read:?} after {reply:?}");
        // Not reset: what it sends after the reply is still taken.
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(100));
            s.write_all(&[b'b'; 1024])
                .expect("the proxy reset the connection");
        }
        reply
    };
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    assert!(
        reply.contains("\r\nward-proxy-error: request head too large\r\n"),
        "{reply}"
    );
    let error = "ward_proxy_streams_ended_total{direction=\"outbound\",outcome=\"error\"}";
    assert_eq!(web.metric(error), 1.0);
    // A request head may end its lines with a bare LF and start with an
    // empty line, and the target's host may be in any case (RFC 9112 §2.2);
    // a target that is not host:port is a bad request.
    let raw = |head: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&connect).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply
    };
    let reply = raw("\r\nCONNECT CLOSED.test:1 HTTP/1.1\nHost: closed.test\n\n");
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
    let reply = raw("CONNECT http://closed.test:1/ HTTP/1.1\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("\r\nConnection: close\r\n"), "{reply}");
    assert_eq!(web.metric(error), 2.0);
    drop(silent);
}

/// Sends `METHOD target` to an HTTP proxy listener; returns the reply head.
fn http_proxy_request(addr: &str, method: &str, target: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
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

type TlsSession = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A test-only TLS client: accepts any server certificate (the server is what
/// is under test) and presents `client` (chain, PKCS#8 key) if given.
/// Returns how many bytes the server answered the HTTP/2 preface with.
fn tls_probe(addr: &str, client: Option<(Vec<Vec<u8>>, Vec<u8>)>) -> Result<usize, String> {
    tls_session(addr, client).map(|(n, _)| n)
}

/// As [`tls_probe`], keeping the session open: it never answers anything.
fn tls_session(
    addr: &str,
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> Result<(usize, TlsSession), String> {
    tls_session_over(std::net::TcpStream::connect(addr).unwrap(), client)
}

/// [`tls_session`] over a TCP connection already made.
fn tls_session_over(
    tcp: std::net::TcpStream,
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> Result<(usize, TlsSession), String> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
    };
    use std::io::{Read, Write};
    use std::sync::Arc;

    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut cfg = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                chain.into_iter().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("x").unwrap()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // The HTTP/2 preface and an empty SETTINGS frame: a server that accepted
    // us answers with its own SETTINGS.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf) {
        Ok(0) => Err("closed".into()),
        Ok(n) => Ok((n, tls)),
        Err(e) => Err(e.to_string()),
    }
}

fn pem_file_ders(path: &Path, label: &str) -> Vec<Vec<u8>> {
    ward_spec::bundle::pem_to_ders(label, &std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An SVID fetched through `ward svid fetch` as `uid`: (chain, key, not_after).
fn fetch_svid(agent: &AgentProcess, uid: u32) -> (Vec<Vec<u8>>, Vec<u8>, i64) {
    let dir = shared_dir();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = agent.svid_cli(
            &["fetch", "--write", dir.path().to_str().unwrap()],
            Some(uid),
        );
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let chain = pem_file_ders(&dir.path().join("svid.pem"), "CERTIFICATE");
    let key = pem_file_ders(&dir.path().join("svid.key"), "PRIVATE KEY").remove(0);
    let not_after = ward_spec::svid::check_leaf(&chain[0]).unwrap().not_after;
    (chain, key, not_after)
}

/// A connection whose client certificate expires is told to close
/// (HTTP/2 GOAWAY) when it does: a handshake is not a licence to open
/// streams for good.
#[test]
fn a_connection_whose_peer_certificate_expires_takes_no_new_streams() {
    let mesh = Mesh::start(&[], &[]);
    let node = mesh.ca.first_agent();
    register_cron(&mesh, &node, 4);
    let (chain, key, not_after) = fetch_svid(&mesh.agent, 1004);
    let (_, mut tls) = tls_session(&mesh.api_inbound, Some((chain, key))).expect("accepted");
    assert!(
        unix_now() <= not_after,
        "the SVID expired before the test could use it"
    );
    // Everything the server sends from here on; a GOAWAY without debug data
    // is the frame header `00 00 08 07 00 00 00 00 00`.
    let goaway = [0u8, 0, 8, 7, 0, 0, 0, 0, 0];
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !got.windows(goaway.len()).any(|w| w == goaway) {
        assert!(
            Instant::now() < deadline,
            "no GOAWAY 20 s after the peer's certificate was issued"
        );
        match tls.read(&mut buf) {
            Ok(0) => panic!("closed without a GOAWAY"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        unix_now() > not_after,
        "GOAWAY before the certificate expired"
    );
    let line = mesh
        .api
        .wait_log(|l| l.contains("the peer's certificate has expired"));
    assert!(line.contains("cron"), "{line}");
}

/// A pooled connection whose peer's certificate has expired takes no new
/// streams: the next stream gets a new connection (and the peer's current
/// SVID), though this side's own SVID has not changed.
#[test]
fn a_pooled_connection_whose_peer_certificate_expires_is_not_given_new_streams() {
    let mesh = Mesh::start(&[], &[]);
    let ca = &mesh.ca;
    let node = ca.first_agent();
    let entries = ca.cli_json(&["entry", "list"]);
    let api_entry = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["spiffe_id"] == API)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // api's SVIDs now live 6 s (web's an hour).
    let selector = format!("unix:uid:{API_UID}");
    ca.cli_json(&[
        "entry",
        "update",
        &api_entry,
        "--spiffe-id",
        API,
        "--parent-id",
        &node,
        "--selector",
        &selector,
        "--x509-ttl",
        "6",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mesh.api.metric("ward_proxy_svid_expiry_seconds") > 6.0 {
        assert!(Instant::now() < deadline, "api never got its 6 s SVID");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    assert_clean(&hash_client(port, 1024, 1, 0.0), 1, 1024);
    let outbound = "ward_proxy_connections_total{direction=\"outbound\"}";
    assert_eq!(web.metric(outbound), 1.0);
    // The certificate api presented has expired 7 s on.
    std::thread::sleep(Duration::from_secs(7));
    assert_clean(&hash_client(port, 1024, 1, 0.0), 1, 1024);
    assert_eq!(web.metric(outbound), 2.0);
}

#[test]
fn peers_without_an_expected_valid_svid_are_refused_before_any_byte_flows() {
    let mesh = Mesh::start(&[], &[]);
    let inbound = mesh.api_inbound.clone();
    let reason = |r: &str| {
        mesh.api.metric(&format!(
            "ward_proxy_handshake_failures_total{{direction=\"inbound\",reason=\"{r}\"}}"
        ))
    };

    // 0. The probe itself works: web's real SVID gets the server's SETTINGS.
    let (chain, key, _) = fetch_svid(&mesh.agent, WEB_UID);
    let n = tls_probe(&inbound, Some((chain, key))).expect("a valid SVID is accepted");
    assert!(n > 0);

    // 1. Plaintext on the HBONE port.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&inbound).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"CONNECT api.acme:8080 HTTP/1.1\r\n\r\nhello")
            .unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            !String::from_utf8_lossy(&buf).contains("200"),
            "plaintext got an answer"
        );
    }
    // 2. No client certificate.
    assert!(tls_probe(&inbound, None).is_err());
    // 3. A certificate from another trust domain (its own CA, a proper SVID profile).
    let other_ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://other.org".try_into().unwrap(),
    )];
    let other_ca = ca_params.self_signed(&other_ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, other_ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://other.org/tenant/acme/ns/prod/sa/web"
            .try_into()
            .unwrap(),
    )];
    leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let foreign = (
        vec![leaf.der().to_vec(), other_ca.der().to_vec()],
        leaf_key.serialize_der(),
    );
    assert!(tls_probe(&inbound, Some(foreign)).is_err());
    // 4. A CA certificate as the leaf: our own trust domain's root, with its key.
    let root = mesh.ca.bundle().x509_authorities[0].clone();
    let root_key =
        pem_file_ders(&mesh.ca.data_dir().join("keys/root-0.key"), "PRIVATE KEY").remove(0);
    assert!(tls_probe(&inbound, Some((vec![root], root_key))).is_err());
    // 5. An expired SVID of our own trust domain (a 2-second entry).
    let node = mesh.ca.first_agent();
    register_cron(&mesh, &node, 2);
    let (chain, key, not_after) = fetch_svid(&mesh.agent, 1004);
    while unix_now() <= not_after + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(tls_probe(&inbound, Some((chain, key))).is_err());

    // None of them reached the application, and each is counted by reason.
    assert_eq!(mesh.app.connections(), 0);
    assert_eq!(reason("not_tls"), 1.0);
    assert_eq!(reason("no_certificate"), 1.0);
    assert_eq!(reason("foreign_trust_domain"), 1.0);
    assert_eq!(reason("not_an_svid"), 1.0);
    assert_eq!(reason("expired"), 1.0);
    assert_eq!(
        mesh.api
            .metric("ward_proxy_streams_total{direction=\"inbound\"}"),
        0.0
    );

    // 6. Outbound: a route that expects `db` but reaches `api`'s proxy is
    //    refused in the handshake; the application gets no byte.
    let (web, port) = mesh.client_proxy(WEB_UID, DB, &[]);
    let r = hash_client(port, 1024, 1, 0.0);
    assert_eq!(r.ok, 0);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(mesh.app.connections(), 0);
    assert_eq!(
        web.metric(
            "ward_proxy_handshake_failures_total{direction=\"outbound\",reason=\"unexpected_id\"}"
        ),
        1.0
    );
    let expected = "expected one of [spiffe://example.org/tenant/acme/ns/prod/sa/db]";
    assert!(web.wait_log(|l| l.contains(expected)).contains(expected));
}

#[test]
fn a_peer_that_resets_its_stream_while_the_application_is_connected_to_is_logged_as_cancelled() {
    let mesh = Mesh::start(&[], &[]);
    // An application that takes no connection: its accept queue (backlog 0)
    // is full, so the kernel drops further SYNs and a connect to it waits.
    let stuck = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    stuck.bind(&any.into()).unwrap();
    stuck.listen(0).unwrap();
    let stuck_addr = stuck.local_addr().unwrap().as_socket().unwrap();
    let mut filler = Vec::new();
    while let Ok(c) = std::net::TcpStream::connect_timeout(&stuck_addr, Duration::from_secs(1)) {
        filler.push(c);
        assert!(filler.len() < 4, "the listener's queue does not fill");
    }
    // A second server-side proxy for api, forwarding there, with a connect
    // timeout long enough to tell a cancelled stream from a timed-out one.
    let logs = shared_dir();
    let log = logs.path().join("access.log");
    let inbound = format!("127.0.0.1:{}", free_port());
    let _api = ProxyProcess::start(
        &mesh.agent,
        API_UID,
        &[
            "--inbound-listen",
            &inbound,
            "--forward",
            &stuck_addr.to_string(),
            "--policy-dir",
            mesh.policies.path().to_str().unwrap(),
            "--connect-timeout",
            "30s",
            "--access-log",
            log.to_str().unwrap(),
        ],
    );
    // web, speaking HTTP/2 by hand: a CONNECT (HPACK literals `:method` and
    // `:authority`) on stream 1, and, while the proxy connects, RST_STREAM
    // (CANCEL).
    let (chain, key, _) = fetch_svid(&mesh.agent, WEB_UID);
    let (_, mut tls) = tls_session(&inbound, Some((chain, key))).expect("web's SVID is accepted");
    let mut block = vec![0x02, 7];
    block.extend_from_slice(b"CONNECT");
    block.extend_from_slice(&[0x01, 13]);
    block.extend_from_slice(b"api.acme:8080");
    let mut headers = vec![0, 0, block.len() as u8, 0x1, 0x4, 0, 0, 0, 1];
    headers.extend_from_slice(&block);
    tls.write_all(&headers).unwrap();
    tls.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    tls.write_all(&[0, 0, 4, 0x3, 0, 0, 0, 0, 1, 0, 0, 0, 0x8])
        .unwrap();
    tls.flush().unwrap();
    // Its line is written within the second, not when the connect times out.
    let line = wait_json_line(&log, Duration::from_secs(10), |_| true)
        .expect("no access line 10 s after the peer reset its stream");
    assert_eq!(line["outcome"], "cancelled", "{line}");
    assert_eq!(line["status"], 0, "{line}");
    assert_eq!(line["peer_id"], WEB, "{line}");
    drop(filler);
}

#[test]
fn a_slow_loris_and_10000_idle_connections_do_not_stop_other_clients() {
    // The test holds 10,000 sockets too.
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        rlimit::Resource::NOFILE.set(hard, hard).unwrap();
    }
    let mesh = Mesh::start(&[], &["--handshake-timeout", "20s"]);
    let (_web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    // 1. A slow loris: a TLS record header, then one byte every 100 ms.
    let loris = {
        let (addr, stop) = (mesh.api_inbound.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
            // True when the proxy cut it off (a write failed), false when told to stop.
            for b in hello.iter().cycle() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return false;
                }
                if s.write_all(&[*b]).is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        })
    };
    // 2. 10,000 idle TCP connections that never say anything.
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        idle.push(std::net::TcpStream::connect(&mesh.api_inbound).unwrap());
    }
    // 3. Meanwhile a real client is served: 20 exchanges of 64 KiB on new streams.
    let timeouts = |m: &Mesh| {
        m.api
            .metric("ward_proxy_handshake_failures_total{direction=\"inbound\",reason=\"timeout\"}")
    };
    for _ in 0..20 {
        let r = hash_client(port, 64 * 1024, 1, 0.0);
        assert_clean(&r, 1, 64 * 1024);
    }
    assert_eq!(mesh.app.wait_connections(20), 20);
    // ... while every idle connection and the loris were still held open.
    assert_eq!(
        timeouts(&mesh),
        0.0,
        "served only after the idle ones were cut"
    );

    // 4. The idle connections and the loris are cut at the handshake timeout.
    let deadline = Instant::now() + Duration::from_secs(60);
    while timeouts(&mesh) < 10_001.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(timeouts(&mesh), 10_001.0);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(loris.join().unwrap(), "the loris was never cut off");
    drop(idle);
}

#[test]
fn rotation_under_load_keeps_every_stream_intact() {
    // 10 s SVIDs: the agent rotates each at about half its life.
    let mesh = Mesh::start(&["--x509-svid-ttl", "10s"], &[]);
    let (web, port) = mesh.client_proxy(WEB_UID, API, &[]);

    // 1. Ten connections stream continuously for 32 s (≥ 5 rotations), each
    //    exchange checked with SHA-256 at both ends.
    let load = std::thread::spawn(move || hash_client(port, 256 * 1024, 10, 32.0));
    // 2. Meanwhile, a new stream every 2 s: new handshakes use the new SVIDs.
    let start = Instant::now();
    let mut fresh = 0;
    while start.elapsed() < Duration::from_secs(30) {
        let r = hash_client(port, 1024, 1, 0.0);
        assert_clean(&r, 1, 1024);
        fresh += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    let r = load.join().unwrap();
    assert!(r.errors.is_empty(), "errors under rotation: {:?}", r.errors);
    assert!(r.ok >= 100, "only {} exchanges", r.ok);
    assert_eq!(r.bytes_sent, r.ok * 256 * 1024);

    // 3. Both proxies installed at least 6 SVIDs (the first and 5 rotations).
    for (name, p) in [("web", &web), ("api", &mesh.api)] {
        let installed = p
            .wait_log(|l| l.matches("SVID installed").count() >= 6)
            .matches("SVID installed")
            .count();
        assert!(installed >= 6, "{name} proxy installed {installed} SVIDs");
    }
    // 4. The ten long streams stayed on their connection; new streams moved
    //    to connections made with newer SVIDs.
    assert_eq!(mesh.app.wait_connections(10 + fresh), 10 + fresh);
    let outbound = web.metric("ward_proxy_connections_total{direction=\"outbound\"}");
    assert!(outbound >= 5.0, "outbound connections: {outbound}");
}

#[test]
fn no_listener_until_the_svid_arrives_sigterm_drains_open_streams_and_a_restarted_peer_is_reached()
{
    let mesh = Mesh::start(&[], &["--drain-timeout", "20s"]);
    // 1. A proxy for a uid without an entry: not ready, nothing listening.
    let port = free_port();
    let route = format!(
        "listen=127.0.0.1:{port},destination={},id={API}",
        mesh.api_inbound
    );
    let mut late = ProxyProcess::spawn(&mesh.agent, 1005, &["--route", &route]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        http_get(&late.health_addr, "/readyz").map(|r| r.0),
        Some(503)
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    // Its SVID arrives once it is registered.
    let node = mesh.ca.first_agent();
    mesh.ca.register(
        "spiffe://example.org/tenant/acme/ns/prod/sa/web2",
        &node,
        "unix:uid:1005",
    );
    late.wait_ready();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(late);

    // 2. SIGTERM while a stream is open: the stream finishes, new connections
    //    are refused, and the proxy exits cleanly.
    let (_web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    let load = std::thread::spawn(move || hash_client(port, 1024 * 1024, 1, 5.0));
    let mut api = mesh.api;
    let api_health = api.health_addr.clone();
    std::thread::sleep(Duration::from_secs(1));
    let waiter = std::thread::spawn(move || {
        let status = api.terminate();
        (status, api)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        std::net::TcpStream::connect(&mesh.api_inbound).is_err(),
        "the inbound listener still accepts while draining"
    );
    // While it drains, it is alive but not ready.
    assert_eq!(http_get(&api_health, "/healthz").map(|r| r.0), Some(200));
    let ready = http_get(&api_health, "/readyz");
    assert!(
        matches!(&ready, Some((503, body)) if body.contains("draining")),
        "{ready:?}"
    );

    // 3. An in-place restart: a new api proxy takes the address while the old
    //    one drains. web's pooled connection has had GOAWAY; a new stream
    //    goes over a new connection to the new proxy.
    let forward = format!("127.0.0.1:{}", mesh.app.port);
    let policy_dir = mesh.policies.path().to_str().unwrap().to_owned();
    let _api2 = ProxyProcess::start(
        &mesh.agent,
        API_UID,
        &[
            "--inbound-listen",
            &mesh.api_inbound,
            "--forward",
            &forward,
            "--policy-dir",
            &policy_dir,
        ],
    );
    let r2 = hash_client(port, 1024, 1, 0.0);
    assert_eq!(
        r2.ok, 1,
        "no stream through the restarted proxy: {:?}",
        r2.errors
    );
    assert!(
        !load.is_finished(),
        "the first stream ended before the restart"
    );

    let r = load.join().unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.ok >= 2);
    let (status, api) = waiter.join().unwrap();
    assert!(status.success(), "{status}");
    assert!(api.log_text().contains("drained"));
}

/// SIGTERM drains (here up to a minute, with a stream open); a second
/// SIGTERM cuts the drain short and the proxy exits at once; the stream it
/// cut reaches the client application as a reset.
#[test]
fn a_second_sigterm_cuts_the_drain_short() {
    let mesh = Mesh::start(&[], &["--drain-timeout", "60s"]);
    let (_web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    // An open stream: a request for 1 GiB whose first bytes are sent.
    let mut open = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    open.write_all(&(1u64 << 30).to_be_bytes()).unwrap();
    open.write_all(&[0u8; 4096]).unwrap();
    assert_eq!(mesh.app.wait_connections(1), 1);
    mesh.signal_api("-TERM");
    let mut api = mesh.api;
    std::thread::sleep(Duration::from_secs(1));
    let child = api.child.as_mut().unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the proxy exited though a stream was open"
    );
    api.signal("-TERM");
    let status = api.wait_exit(Duration::from_secs(5), "the second SIGTERM");
    assert!(status.success(), "{status}");
    let log = api.log_text();
    assert!(log.contains("drain cut short by a second signal"), "{log}");
    // The cut stream reaches the client application as a reset.
    open.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let read = open.read_to_end(&mut rest).map_err(|e| e.kind());
    assert_eq!(read, Err(std::io::ErrorKind::ConnectionReset));
}

/// While a proxy without inbound drains, its outbound routes still take
/// the application's new connections as long as one of its streams is open
/// (it may call out as it finishes its work); the proxy exits once those
/// streams are done too.
#[test]
fn outbound_routes_still_take_connections_while_the_proxy_drains() {
    let mesh = Mesh::start(&[], &[]);
    let (mut web, port) = mesh.client_proxy(WEB_UID, API, &["--drain-timeout", "20s"]);
    // An open stream: a request for 1 GiB whose first bytes are sent.
    let mut open = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    open.write_all(&(1u64 << 30).to_be_bytes()).unwrap();
    open.write_all(&[0u8; 4096]).unwrap();
    assert_eq!(mesh.app.wait_connections(1), 1);
    web.signal("-TERM");
    std::thread::sleep(Duration::from_millis(500));
    let ready = http_get(&web.health_addr, "/readyz");
    assert!(
        matches!(&ready, Some((503, body)) if body.contains("draining")),
        "{ready:?}"
    );
    // Draining, and a new connection to the route is tunneled.
    let r = hash_client(port, 64 * 1024, 2, 0.0);
    assert_clean(&r, 2, 64 * 1024);
    // The open stream ends; the drain is over and the proxy exits.
    drop(open);
    let status = web.wait_exit(Duration::from_secs(10), "the last stream ended");
    assert!(status.success(), "{status}");
    let log = web.log_text();
    assert!(log.contains("drained"), "{log}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

/// SIGTERM with nothing open: the outbound routes still take the
/// application's new connections for the outbound drain (5 s by default:
/// an application shutting down may call out, as with Istio's sidecar),
/// then the proxy exits.
#[test]
fn an_idle_proxy_keeps_its_outbound_routes_for_the_outbound_drain() {
    let mesh = Mesh::start(&[], &[]);
    let (mut web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    let limits = &web.config_dump()["limits"];
    assert_eq!(limits["outbound_drain_seconds"], 5.0, "{limits}");
    assert_clean(&hash_client(port, 1024, 1, 0.0), 1, 1024);
    web.signal("-TERM");
    let signalled = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert_clean(&hash_client(port, 64 * 1024, 2, 0.0), 2, 64 * 1024);
    assert!(
        signalled.elapsed() < Duration::from_millis(4500),
        "{:?}",
        signalled.elapsed()
    );
    let status = web.wait_exit(Duration::from_secs(15), "SIGTERM");
    assert!(status.success(), "{status}");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(5),
        "exited {took:?} after SIGTERM"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

/// While a proxy drains its inbound side, its outbound routes still take
/// its application's new connections (the application may call out as it
/// finishes the requests it was sent); once the inbound side is done they
/// close and the proxy exits.
#[test]
fn outbound_routes_take_connections_while_the_inbound_side_drains() {
    let db_inbound = format!("127.0.0.1:{}", free_port());
    let route_port = free_port();
    let route = format!(
        "listen=127.0.0.1:{route_port},destination={db_inbound},id={DB},target=db.acme:5432"
    );
    let mesh = Mesh::start(&[], &["--drain-timeout", "20s", "--route", &route]);
    let forward = format!("127.0.0.1:{}", mesh.app.port);
    let policy_dir = mesh.policies.path().to_str().unwrap().to_owned();
    let _db = ProxyProcess::start(
        &mesh.agent,
        DB_UID,
        &[
            "--inbound-listen",
            &db_inbound,
            "--forward",
            &forward,
            "--service-port",
            "5432",
            "--policy-dir",
            &policy_dir,
        ],
    );
    let (_web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    // An open inbound stream on api: web's request for 1 GiB.
    let mut open = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    open.write_all(&(1u64 << 30).to_be_bytes()).unwrap();
    open.write_all(&[0u8; 4096]).unwrap();
    assert_eq!(mesh.app.wait_connections(1), 1);
    assert_clean(&hash_client(route_port, 1024, 1, 0.0), 1, 1024);

    mesh.signal_api("-TERM");
    std::thread::sleep(Duration::from_millis(500));
    let ready = http_get(&mesh.api.health_addr, "/readyz");
    assert!(
        matches!(&ready, Some((503, body)) if body.contains("draining")),
        "{ready:?}"
    );
    assert!(
        std::net::TcpStream::connect(&mesh.api_inbound).is_err(),
        "the inbound listener still accepts while draining"
    );
    // Draining: api's application calls db.
    assert_clean(&hash_client(route_port, 64 * 1024, 2, 0.0), 2, 64 * 1024);

    // The inbound stream ends: the drain goes on to the outbound side and
    // the proxy exits.
    drop(open);
    let mut api = mesh.api;
    let status = api.wait_exit(Duration::from_secs(10), "the last stream ended");
    assert!(status.success(), "{status}");
    let log = api.log_text();
    assert!(log.contains("drained"), "{log}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", route_port)).is_err());
}

/// With `--drain-delay`, SIGTERM first makes the proxy not ready while it
/// goes on serving everything (new inbound connections and streams too);
/// the drain starts once the delay is over.
#[test]
fn a_drain_delay_keeps_serving_while_not_ready() {
    let mesh = Mesh::start(&[], &["--drain-delay", "5s"]);
    let limits = &mesh.api.config_dump()["limits"];
    assert_eq!(limits["drain_delay_seconds"], 5.0, "{limits}");
    let (_web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    assert_clean(&hash_client(port, 1024, 1, 0.0), 1, 1024);
    mesh.signal_api("-TERM");
    let signalled = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let ready = http_get(&mesh.api.health_addr, "/readyz");
    assert!(
        matches!(&ready, Some((503, body)) if body.contains("draining")),
        "{ready:?}"
    );
    // Still serving: a new stream over web's pooled connection, and a new
    // connection to the inbound listener.
    assert_clean(&hash_client(port, 64 * 1024, 2, 0.0), 2, 64 * 1024);
    assert!(std::net::TcpStream::connect(&mesh.api_inbound).is_ok());
    assert!(
        signalled.elapsed() < Duration::from_secs(4),
        "{:?}",
        signalled.elapsed()
    );
    let mut api = mesh.api;
    let status = api.wait_exit(Duration::from_secs(15), "SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(5),
        "exited {:?} after SIGTERM, within the delay",
        signalled.elapsed()
    );
    let log = api.log_text();
    assert!(log.contains("serving on for the drain delay"), "{log}");
    assert!(log.contains("drained"), "{log}");
}

/// `POST /quitquitquit` on the health port drains and stops the proxy as
/// SIGTERM does (Istio's endpoint, for a Job whose work is done); a
/// browser's cross-site request (with an `Origin`) is refused.
#[test]
fn quitquitquit_drains_and_stops_the_proxy() {
    let mesh = Mesh::start(&[], &[]);
    let (mut web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    assert_clean(&hash_client(port, 1024, 1, 0.0), 1, 1024);
    let health = web.health_addr.clone();
    assert_eq!(
        http_get(&health, "/quitquitquit").map(|r| r.0),
        Some(405),
        "GET"
    );
    let mut browser = std::net::TcpStream::connect(&health).unwrap();
    write!(
        browser,
        "POST /quitquitquit HTTP/1.0\r\nHost: x\r\nOrigin: http://evil.test\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    browser.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 403") || answer.starts_with("HTTP/1.1 403"),
        "{answer}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http_get(&health, "/readyz").map(|r| r.0), Some(200));

    let answer = http_request(&health, "POST", "/quitquitquit");
    let asked = Instant::now();
    assert_eq!(answer, Some((200, "draining\n".to_owned())));
    let status = web.wait_exit(Duration::from_secs(10), "/quitquitquit");
    assert!(status.success(), "{status}");
    // (The application that asked is done: the outbound routes are not
    // kept for the outbound drain, 5 s.)
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(4), "exited {took:?} after asked");
    let log = web.log_text();
    assert!(log.contains("asked on /quitquitquit"), "{log}");
    assert!(log.contains("drained"), "{log}");
}

/// A stream still being set up when SIGTERM arrives (its tunnel waits for
/// a TLS handshake with a peer that is frozen) is carried through the
/// drain once the peer answers, and the proxy then exits cleanly.
#[test]
fn a_stream_still_being_set_up_is_carried_through_the_drain() {
    let mesh = Mesh::start(&[], &[]);
    let (mut web, port) = mesh.client_proxy(WEB_UID, API, &["--drain-timeout", "20s"]);
    let signal = |sig: &str| mesh.signal_api(sig);
    // web has no pooled connection yet: its first stream needs a handshake,
    // which the frozen peer does not answer.
    signal("-STOP");
    let load = std::thread::spawn(move || hash_client(port, 64 * 1024, 1, 0.0));
    std::thread::sleep(Duration::from_millis(500));
    let waiter = std::thread::spawn(move || {
        let status = web.terminate();
        (status, web)
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !waiter.is_finished(),
        "web's proxy exited with a stream still being set up"
    );
    signal("-CONT");
    let r = load.join().unwrap();
    assert_clean(&r, 1, 64 * 1024);
    let (status, web) = waiter.join().unwrap();
    assert!(status.success(), "{status}");
    let log = web.log_text();
    assert!(log.contains("drained"), "{log}");
}

/// A peer's connection still in its handshake when the drain begins (a
/// far peer, or one this busy proxy has not got to yet) is waited for: its
/// first stream may be right behind the handshake. The proxy does not exit
/// under it; once it has closed, the drain ends.
#[test]
fn a_connection_still_in_its_handshake_when_the_drain_begins_is_waited_for() {
    let mut mesh = Mesh::start(&[], &["--drain-timeout", "20s"]);
    let (chain, key, _) = fetch_svid(&mesh.agent, WEB_UID);
    let tcp = std::net::TcpStream::connect(&mesh.api_inbound).unwrap();
    // Accepted; no byte of the handshake sent yet.
    std::thread::sleep(Duration::from_millis(300));
    mesh.signal_api("-TERM");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        mesh.api.running(),
        "the proxy exited with a connection in its handshake: {}",
        mesh.api.log_text()
    );
    let (_, tls) = tls_session_over(tcp, Some((chain, key)))
        .expect("the handshake begun before the drain is finished");
    drop(tls);
    let status = mesh
        .api
        .wait_exit(Duration::from_secs(10), "its last connection closed");
    assert!(status.success(), "{status}");
    let log = mesh.api.log_text();
    assert!(log.contains("drained"), "{log}");
}

#[test]
fn dry_run_lets_denied_streams_through_and_idle_connections_close() {
    // `api` in dry-run mode, every TLS connection closed after 2 s without streams.
    let mesh = Mesh::start(&[], &["--policy-mode", "dry-run", "--idle-timeout", "2s"]);
    let (db, port) = mesh.client_proxy(DB_UID, API, &["--idle-timeout", "2s"]);

    // 1. `db` → `api` is denied by the policies, but dry-run lets it through
    //    and logs the denial.
    let r = hash_client(port, 4096, 1, 0.0);
    assert_clean(&r, 1, 4096);
    let line = mesh.api.wait_decisions(1).pop().unwrap();
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["mode"], "dry-run");
    assert_eq!(
        mesh.api
            .metric("ward_proxy_authorization_decisions_total{decision=\"deny_dry_run\"}"),
        1.0
    );
    // The SVID's remaining life is exported.
    let expiry = db.metric("ward_proxy_svid_expiry_seconds");
    assert!(expiry > 60.0 && expiry <= 3600.0, "{expiry}");

    // 2. The pooled connection closes once idle, on both sides; the next
    //    stream makes a new one.
    let open = |p: &ProxyProcess, d: &str| {
        p.metric(&format!("ward_proxy_connections_open{{direction=\"{d}\"}}"))
    };
    assert_eq!(open(&db, "outbound"), 1.0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while (open(&db, "outbound") > 0.0 || open(&mesh.api, "inbound") > 0.0)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(open(&db, "outbound"), 0.0);
    assert_eq!(open(&mesh.api, "inbound"), 0.0);
    let r = hash_client(port, 4096, 1, 0.0);
    assert_clean(&r, 1, 4096);
    assert_eq!(
        db.metric("ward_proxy_connections_total{direction=\"outbound\"}"),
        2.0
    );

    // 3. A peer that never answers the close (it reads, but acknowledges
    //    neither SETTINGS nor the GOAWAY's PING) is cut off 10 s after it
    //    was told to close, not held forever.
    use std::io::Read;
    let (chain, key, _) = fetch_svid(&mesh.agent, WEB_UID);
    let (_, mut tls) = tls_session(&mesh.api_inbound, Some((chain, key)))
        .expect("a peer with a valid SVID is served");
    let opened = Instant::now();
    tls.get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 256];
    let ended = loop {
        match tls.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    let after = opened.elapsed();
    println!("a peer that never answered: its session ended after {after:?}");
    assert!(
        ended.as_ref().map_or_else(
            |e| e.kind() != std::io::ErrorKind::WouldBlock
                && e.kind() != std::io::ErrorKind::TimedOut,
            |_| true
        ),
        "still open after {after:?}: {ended:?}"
    );
    // Idle for 2 s, then 10 s to finish closing.
    assert!(
        after >= Duration::from_secs(11) && after < Duration::from_secs(20),
        "{after:?}"
    );
    assert_eq!(open(&mesh.api, "inbound"), 0.0);
}

/// Whether the server closes a fresh TCP connection to `addr` within `within`.
fn closed_at_once(addr: &str, within: Duration) -> bool {
    ends_within(&mut std::net::TcpStream::connect(addr).unwrap(), within)
}

/// Whether the connection `s` ends (an end of file or a reset) within
/// `within`, nothing read.
fn ends_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    match s.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Applications that stop reading hold up only their own streams: eight
/// connections, carried by one pooled tunnel connection, whose ends both
/// write 16 MiB and read nothing fill their streams' windows both ways; a
/// new stream on the same connection still goes both ways at once. (Were the
/// connection's window shared with less room than all its streams' windows,
/// four such streams would stop every other on it, as one stalled TCP
/// connection never stops another.)
#[test]
fn applications_that_stop_reading_hold_up_only_their_own_streams() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const STALLED: usize = 8;
    const EACH: usize = 16 << 20;
    // The server application: its first connections write and never read,
    // the rest echo.
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let forward = app.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    std::thread::spawn(move || {
        for s in app.incoming() {
            let mut s = s.unwrap();
            if counted.fetch_add(1, Ordering::SeqCst) < STALLED {
                std::thread::spawn(move || {
                    let _ = s.write_all(&vec![1u8; EACH]);
                    std::thread::park();
                });
            } else {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        }
    });
    let mesh = Mesh::start_with(&[], &[], false, Some(&forward));
    let (web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    // The client applications: the same, the other way.
    for _ in 0..STALLED {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::thread::spawn(move || {
            let _ = c.write_all(&vec![2u8; EACH]);
            std::thread::park();
        });
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while accepted.load(Ordering::SeqCst) < STALLED {
        assert!(
            Instant::now() < deadline,
            "the stalled streams never opened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Time for the stalled streams to fill every window and buffer they have.
    std::thread::sleep(Duration::from_secs(2));

    let mut probe = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let sent: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    probe.write_all(&sent).unwrap();
    let mut echoed = vec![0u8; sent.len()];
    probe
        .read_exact(&mut echoed)
        .expect("a new stream on the connection the stalled streams use went nowhere");
    assert!(echoed == sent, "the echo differs from what was sent");
    // All of it over the one pooled connection.
    assert_eq!(
        web.metric("ward_proxy_connections_total{direction=\"outbound\"}"),
        1.0
    );
}

/// The peer takes 2 streams per connection, this proxy would put 100 on
/// one: three application connections at once to a fresh proxy get two
/// TLS connections, and every stream is answered (h2 would otherwise hold a
/// third `CONNECT` back, unanswered, until one of the others ended; the
/// connection is made before the peer's settings say how many it takes).
#[test]
fn a_peer_that_takes_fewer_streams_per_connection_gets_a_new_connection_when_full() {
    let mesh = Mesh::start(&[], &["--max-streams-per-connection", "2"]);
    let (web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    let held: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let open = || {
        mesh.api
            .metric("ward_proxy_streams_open{direction=\"inbound\"}")
    };
    while open() < 3.0 {
        assert!(
            Instant::now() < deadline,
            "{} of the 3 held streams opened",
            open()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let conns = || web.metric("ward_proxy_connections_total{direction=\"outbound\"}");
    assert_eq!(conns(), 2.0);
    // Room is left on the second connection for one more.
    assert_clean(&hash_client(port, 64 * 1024, 1, 0.0), 1, 64 * 1024);
    assert_eq!(conns(), 2.0);
    drop(held);
}

#[test]
fn connections_beyond_max_connections_are_closed_and_the_rest_keep_working() {
    // 1. api's proxy takes at most 3 connections; web's pooled one is the first.
    let mesh = Mesh::start(&[], &["--max-connections", "3"]);
    let (_web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    assert_clean(&hash_client(port, 64 * 1024, 4, 0.0), 4, 64 * 1024);

    // 2. Two idle connections fill the limit; within it, nobody is cut
    //    before the handshake timeout (10 s).
    let idle: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(&mesh.api_inbound).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // 3. A fourth is closed at once, and counted.
    assert!(
        closed_at_once(&mesh.api_inbound, Duration::from_secs(2)),
        "a connection beyond max_connections was kept"
    );
    let over = mesh
        .api
        .metric("ward_proxy_refused_total{direction=\"inbound\",reason=\"over_connection_limit\"}");
    assert!(over >= 1.0, "over_connection_limit counted {over}");

    // 4. The pooled connection inside the limit still carries new streams.
    assert_clean(&hash_client(port, 64 * 1024, 4, 0.0), 4, 64 * 1024);

    // 5. Once the idle ones go, new connections are taken again.
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !closed_at_once(&mesh.api_inbound, Duration::from_secs(1)),
        "a connection within the limit was closed at once"
    );

    // 6. The same limit holds for application connections to a client-side
    //    proxy's listeners: two open streams fill it, a third is reset (an
    //    end of file would pass for a stream carried and ended).
    let (small, small_port) = mesh.client_proxy(WEB_UID, API, &["--max-connections", "2"]);
    let open: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", small_port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut third = std::net::TcpStream::connect(("127.0.0.1", small_port)).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let refused = third.read(&mut [0u8; 1]).map_err(|e| e.kind());
    assert_eq!(
        refused,
        Err(std::io::ErrorKind::ConnectionReset),
        "an application connection beyond max_connections"
    );
    assert!(
        small.metric(
            "ward_proxy_refused_total{direction=\"outbound\",reason=\"over_connection_limit\"}"
        ) >= 1.0
    );
    drop(open);
    std::thread::sleep(Duration::from_millis(300));
    assert_clean(&hash_client(small_port, 1024, 1, 0.0), 1, 1024);
}

/// `--max-inbound-streams` bounds the streams a proxy has open over all its
/// inbound connections together: with two held open over two pooled
/// connections (from two client proxies), a third stream is answered 503,
/// saying `overloaded` (as is its HTTP CONNECT client), and counted;
/// the held streams go on, and once one ends a new stream is taken.
#[test]
fn streams_beyond_max_inbound_streams_are_answered_503_and_the_rest_keep_working() {
    let mesh = Mesh::start(&[], &["--max-inbound-streams", "2"]);
    let connect = format!("127.0.0.1:{}", free_port());
    let (first, first_port) = mesh.client_proxy(WEB_UID, API, &["--connect-listen", &connect]);
    let (second, second_port) = mesh.client_proxy(WEB_UID, API, &[]);
    // Two streams held open, one over each client proxy's connection.
    let mut held: Vec<_> = [first_port, second_port]
        .into_iter()
        .map(|p| std::net::TcpStream::connect(("127.0.0.1", p)).unwrap())
        .collect();
    let open = || {
        mesh.api
            .metric("ward_proxy_streams_open{direction=\"inbound\"}")
    };
    wait_until("the 2 held streams did not open", || open() == 2.0);
    let inbound_conns = mesh
        .api
        .metric("ward_proxy_connections_open{direction=\"inbound\"}");
    assert_eq!(inbound_conns, 2.0);

    // A third is refused, and its client is told why.
    let reply = http_connect(&connect, &mesh.api_inbound);
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(
        reply.contains("\r\nward-proxy-error: the peer refused the stream: 503 Service Unavailable (overloaded)"),
        "{reply}"
    );
    let over = "ward_proxy_refused_total{direction=\"inbound\",reason=\"over_stream_limit\"}";
    assert_eq!(mesh.api.metric(over), 1.0);
    assert_eq!(
        mesh.api
            .metric("ward_proxy_authorization_decisions_total{decision=\"allow\"}"),
        2.0,
        "a stream over the limit was put to the authorizer"
    );
    wait_until("the refused stream was not logged as refused", || {
        first.metric("ward_proxy_streams_ended_total{direction=\"outbound\",outcome=\"refused\"}")
            == 1.0
    });

    // The held streams still carry an exchange each way: 4 bytes after their
    // length, answered by two digests and 4 bytes.
    for s in &mut held {
        s.write_all(&4u64.to_be_bytes()).unwrap();
        s.write_all(b"ping").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = [0u8; 64 + 4];
        s.read_exact(&mut got).unwrap();
    }

    // One ends: a new stream is taken again.
    drop(held.pop());
    wait_until("a closed stream is still open", || open() == 1.0);
    assert_clean(&hash_client(first_port, 64 * 1024, 1, 0.0), 1, 64 * 1024);
    assert_eq!(mesh.api.metric(over), 1.0);
    drop((held, second));
}

/// Waits up to 15 s for `cond`, saying `what` if it never holds.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A peer proxy that stops answering while its connection carries streams
/// (its process frozen, its kernel still acknowledging TCP, so TCP
/// keepalive takes it for alive) is found out by HTTP/2 PINGs: the other
/// end closes the connection and the streams on it, and their
/// applications' connections end, instead of all being held for good; the
/// streams end as `unreachable`. Each end does it: web's for a frozen api,
/// api's for a frozen web.
#[test]
fn a_frozen_peer_is_found_out_by_pings_and_its_streams_end() {
    let fast = ["--keepalive-interval", "1s", "--keepalive-timeout", "1s"];
    let mesh = Mesh::start(&[], &fast);
    let connect = format!("127.0.0.1:{}", free_port());
    let web_flags = [&fast[..], &["--connect-listen", &connect]].concat();
    let (web, port) = mesh.client_proxy(WEB_UID, API, &web_flags);
    let inbound_open = || {
        mesh.api
            .metric("ward_proxy_streams_open{direction=\"inbound\"}")
    };

    // 1. api freezes with a stream open: web finds out and closes.
    let mut held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    wait_until("the held stream never opened", || inbound_open() == 1.0);
    mesh.signal_api("-STOP");
    let found_out = ends_within(&mut held, Duration::from_secs(15));
    let web_conns = || web.metric("ward_proxy_connections_open{direction=\"outbound\"}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while web_conns() > 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let web_pings = web.metric(
        "ward_proxy_handshake_failures_total{direction=\"outbound\",reason=\"ping_timeout\"}",
    );
    mesh.signal_api("-CONT");
    assert!(found_out, "the stream to a frozen peer was held");
    assert_eq!(web_conns(), 0.0);
    assert_eq!(web_pings, 1.0);
    // Its stream ends as out of reach, not as an error.
    wait_until("web's stream did not end as unreachable", || {
        web.metric("ward_proxy_streams_ended_total{direction=\"outbound\",outcome=\"unreachable\"}")
            == 1.0
    });
    // The peer is back: a new stream gets a new connection.
    assert_clean(&hash_client(port, 64 * 1024, 1, 0.0), 1, 64 * 1024);

    // 2. web freezes with a stream open: api finds out and closes.
    wait_until("the checked stream did not end", || inbound_open() == 0.0);
    let held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    wait_until("the second held stream never opened", || {
        inbound_open() == 1.0
    });
    web.signal("-STOP");
    wait_until("api held the stream of a frozen peer", || {
        inbound_open() == 0.0
    });
    let api_pings = mesh.api.metric(
        "ward_proxy_handshake_failures_total{direction=\"inbound\",reason=\"ping_timeout\"}",
    );
    let api_conns = mesh
        .api
        .metric("ward_proxy_connections_open{direction=\"inbound\"}");
    web.signal("-CONT");
    assert_eq!(api_pings, 1.0);
    assert_eq!(api_conns, 0.0);
    let api_unreachable = mesh
        .api
        .metric("ward_proxy_streams_ended_total{direction=\"inbound\",outcome=\"unreachable\"}");
    assert_eq!(api_unreachable, 1.0);
    drop(held);

    // 3. An HTTP CONNECT client's stream waits for its answer on a pooled
    //    connection when api freezes: it is told 504, and the stream ends
    //    as unreachable, not as a protocol error (502).
    assert_clean(&hash_client(port, 1024, 1, 0.0), 1, 1024);
    mesh.signal_api("-STOP");
    let reply = http_connect(&connect, &mesh.api_inbound);
    mesh.signal_api("-CONT");
    assert!(reply.starts_with("HTTP/1.1 504"), "{reply}");
    assert!(reply.contains("keepalive PING"), "{reply}");
    assert_eq!(
        web.metric(
            "ward_proxy_streams_ended_total{direction=\"outbound\",outcome=\"unreachable\"}"
        ),
        2.0
    );
}

/// `/logging` on a health port says the log filter in force and, posted
/// `?level=FILTER`, replaces it while the process runs: a debug line the
/// proxy did not write before (a new inbound connection) appears after. A
/// filter that does not parse is refused by name and changes nothing. The
/// CA and the agent answer it too.
#[test]
fn the_log_filter_changes_at_run_time_through_logging() {
    let mesh = Mesh::start(&[], &[]);
    let health = mesh.api.health_addr.clone();
    assert_eq!(
        http_get(&health, "/logging"),
        Some((200, "info\n".to_owned()))
    );
    // A first connection, at info: no debug line for it.
    let (_web, web_port) = mesh.client_proxy(WEB_UID, API, &[]);
    assert_clean(&hash_client(web_port, 1024, 1, 0.0), 1, 1024);

    let (code, body) = http_request(&health, "POST", "/logging?level=ward_proxy%3Dloud").unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("ward_proxy=loud"), "{body}");
    let (code, body) = http_request(&health, "POST", "/logging").unwrap();
    assert_eq!(code, 400, "{body}");
    assert_eq!(http_get(&health, "/logging").unwrap().1, "info\n");
    // The audit target stays as it is; a browser's cross-site request is refused.
    let (code, body) = http_request(&health, "POST", "/logging?level=audit%3Doff").unwrap();
    assert_eq!(code, 400, "{body}");
    let mut page = std::net::TcpStream::connect(&health).unwrap();
    std::io::Write::write_all(
        &mut page,
        b"POST /logging?level=debug HTTP/1.0\r\nOrigin: http://example.com\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut page, &mut reply).unwrap();
    assert!(reply.split_whitespace().nth(1) == Some("403"), "{reply}");
    let (code, body) =
        http_request(&health, "POST", "/logging?level=info%2Cward_proxy%3Ddebug").unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, "ward_proxy=debug,audit=info,info\n")
    );
    // What GET shows may be posted back.
    let (code, body) = http_request(
        &health,
        "POST",
        "/logging?level=ward_proxy%3Ddebug%2Caudit%3Dinfo%2Cinfo",
    )
    .unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, "ward_proxy=debug,audit=info,info\n")
    );
    // Lines reach the log in order: none about the first connection.
    let log = mesh.api.wait_log(|l| l.contains("changing the log filter"));
    assert!(log.contains("changing the log filter"), "{log}");
    assert!(!log.contains("inbound connection"), "{log}");

    // Another peer's connection, now at debug.
    let (_db, db_port) = mesh.client_proxy(DB_UID, API, &[]);
    assert_eq!(hash_client(db_port, 1024, 1, 0.0).ok, 0);
    let log = mesh.api.wait_log(|l| l.contains("inbound connection"));
    assert!(log.contains("inbound connection"), "{log}");

    // The CA's and the agent's health ports answer it too (a change from
    // this host is taken: their servers give the handler its peer).
    for health in [&mesh.ca.health_addr, &mesh.agent.health_addr] {
        assert_eq!(http_get(health, "/logging").map(|r| r.0), Some(200));
        let changed = http_request(health, "POST", "/logging?level=info");
        assert!(
            matches!(&changed, Some((200, now)) if now.contains("audit=info")),
            "{changed:?}"
        );
    }
}

/// With `--proxy-protocol` the application learns who called: each
/// connection to it starts with a PROXY protocol v2 header (read here by
/// an independent parser, the `ppp` crate) naming the peer proxy's address,
/// the port policies decided on (here the one asked for), the caller's
/// SPIFFE ID (TLV 0xE1) and the decision that admitted it (TLV 0x05, as in
/// the decision log); the stream's own bytes follow unchanged, both ways.
#[test]
fn with_proxy_protocol_the_application_learns_the_callers_spiffe_id() {
    use std::io::{Read, Write};
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_addr = app.local_addr().unwrap().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = app.accept().unwrap();
        let mut head = [0u8; 16];
        s.read_exact(&mut head).unwrap();
        let mut rest = vec![0u8; u16::from_be_bytes([head[14], head[15]]) as usize];
        s.read_exact(&mut rest).unwrap();
        let bytes = [&head[..], &rest[..]].concat();
        let header = ppp::v2::Header::try_from(&bytes[..]).expect("not a PROXY v2 header");
        let tlvs: Vec<(u8, Vec<u8>)> = header
            .tlvs()
            .map(|t| {
                let t = t.expect("a TLV does not parse");
                (t.kind, t.value.to_vec())
            })
            .collect();
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).unwrap();
        s.write_all(b"world").unwrap();
        tx.send((header.addresses, tlvs, hello)).unwrap();
    });
    let mesh = Mesh::start_with(&[], &["--proxy-protocol"], false, Some(&app_addr));
    let (_web, port) = mesh.client_proxy(WEB_UID, API, &[]);
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"hello").unwrap();
    let mut reply = [0u8; 5];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"world");

    let (addresses, tlvs, hello) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(&hello, b"hello");
    let ppp::v2::Addresses::IPv4(a) = addresses else {
        panic!("not IPv4 addresses: {addresses:?}");
    };
    // From web's proxy, to api's inbound address and the port policies
    // decided on (the one asked for).
    assert_eq!(a.source_address, std::net::Ipv4Addr::LOCALHOST);
    assert_eq!(a.destination_address, std::net::Ipv4Addr::LOCALHOST);
    assert_eq!(a.destination_port, 8080);
    assert_eq!(tlvs.len(), 2, "{tlvs:?}");
    assert_eq!(tlvs[0], (0xE1, WEB.as_bytes().to_vec()));
    let decisions = mesh
        .api
        .wait_decisions_where(1, |d| d["principal"] == WEB && d["decision"] == "allow");
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    let decision_id = decisions[0]["decision_id"].as_str().unwrap();
    assert_eq!(tlvs[1], (0x05, decision_id.as_bytes().to_vec()));
}

/// `SPIFFE_ENDPOINT_SOCKET` is a default for the Workload API socket: a
/// config file's `workload_api_socket` wins over it (as `--socket` wins
/// over both), so a variable set for every container of a pod does not
/// move a proxy configured otherwise.
#[test]
fn the_config_files_socket_wins_over_spiffe_endpoint_socket() {
    let dir = tempfile::tempdir().unwrap();
    let health = format!("127.0.0.1:{}", free_port());
    let file = dir.path().join("proxy.toml");
    std::fs::write(
        &file,
        format!(
            "workload_api_socket = \"/run/from-file.sock\"\nhealth_address = \"{health}\"\n\
             [inbound]\nlisten = \"127.0.0.1:{}\"\nforward = \"127.0.0.1:1\"\n",
            free_port()
        ),
    )
    .unwrap();
    let socket_of = |extra: &[&str]| {
        let mut child = std::process::Command::new(ward_bin())
            .args(["proxy", "run", "--config"])
            .arg(&file)
            .args(extra)
            .env("SPIFFE_ENDPOINT_SOCKET", "unix:///run/from-env.sock")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let dump = loop {
            if let Some((200, body)) = http_get(&health, "/config_dump") {
                break serde_json::from_str::<serde_json::Value>(&body).unwrap();
            }
            assert!(Instant::now() < deadline, "no /config_dump");
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        dump["workload_api_socket"].as_str().unwrap().to_owned()
    };
    assert_eq!(socket_of(&[]), "/run/from-file.sock");
    assert_eq!(
        socket_of(&["--socket", "/run/from-flag.sock"]),
        "/run/from-flag.sock"
    );
    // A file that names none: the variable's.
    let named = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        named.replace("workload_api_socket = \"/run/from-file.sock\"\n", ""),
    )
    .unwrap();
    assert_eq!(socket_of(&[]), "/run/from-env.sock");
}
