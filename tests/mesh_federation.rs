//! Federation end to end: two trust domains, each with its own CA and agent,
//! and a tunnel from `web` in one to `api` in the other, which works exactly
//! while each CA holds the other's bundle (`ward bundle set`) and both
//! workloads' entries federate with the other trust domain
//! (`--federates-with`; a workload receives only those bundles).
//!
//! The mesh: `web` (uid 1001, `example.org`, agent 1) → its proxy's route →
//! mutual TLS → `api`'s proxy (uid 1002, `partner.test`, agent 2) → the
//! application (`tests/py/hash_app.py`, SHA-256 checked at both ends). The
//! api side's policy admits `web` of `example.org` by its trust domain.

mod common;

use std::time::{Duration, Instant};

use common::*;

const WEB: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/web";
const API: &str = "spiffe://partner.test/tenant/acme/ns/prod/sa/api";
const OPS_1: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/ops";
const OPS_2: &str = "spiffe://partner.test/tenant/acme/ns/prod/sa/ops";
const WEB_UID: u32 = 1001;
const API_UID: u32 = 1002;

fn step(n: u32, what: &str) {
    println!("step {n}: {what}");
}

/// A policy directory (readable by the proxies' uids) that lets `web` of
/// `example.org` call `api`, and nothing else.
fn partner_policies() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/ward.cedarschema");
    std::fs::copy(schema, dir.path().join("ward.cedarschema")).unwrap();
    std::fs::write(
        dir.path().join("partner.cedar"),
        r#"@id("example-web-to-partner-api")
permit (
  principal is Ward::Workload,
  action == Ward::Action::"connect",
  resource is Ward::Workload
)
when { principal.trust_domain == "example.org" && principal.service == "web" && resource.service == "api" };
"#,
    )
    .unwrap();
    dir
}

fn node_of(ca: &CaProcess) -> String {
    ca.first_agent()
}

/// `ca`'s bundle as a PEM file in `dir`.
fn bundle_file(ca: &CaProcess, dir: &std::path::Path) -> String {
    let path = dir.join(format!("{}.pem", ca.trust_domain));
    std::fs::write(&path, ca.cli(&["bundle", "show"]).stdout).unwrap();
    path.to_str().unwrap().to_owned()
}

fn run_ok(ca: &CaProcess, args: &[&str]) -> String {
    let out = ca.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Replaces entry `id` (`spiffe_id`, on `ca`'s only node, `selector`) so
/// that it federates with `tds`.
fn federate(ca: &CaProcess, id: &str, spiffe_id: &str, selector: &str, tds: &[&str]) {
    let node = node_of(ca);
    let mut args = vec![
        "entry",
        "update",
        id,
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        &node,
        "--selector",
        selector,
    ];
    for td in tds {
        args.extend(["--federates-with", td]);
    }
    run_ok(ca, &args);
}

/// A client-side proxy for `web` with one route to `api`, writing its
/// access log to `access_log`; its route port.
fn web_proxy(
    agent: &AgentProcess,
    api_inbound: &str,
    access_log: &std::path::Path,
) -> (ProxyProcess, u16) {
    let port = free_port();
    let route =
        format!("listen=127.0.0.1:{port},destination={api_inbound},id={API},target=api.acme:8080");
    let log = access_log.to_str().unwrap();
    (
        ProxyProcess::start(agent, WEB_UID, &["--route", &route, "--access-log", log]),
        port,
    )
}

/// A stream through `web`'s route `port` that has reached the application
/// and stays open, waiting for the 1 GiB it announced; it has sent `sent`
/// bytes (8 or more), which tells its access log lines apart.
fn open_stream(
    sent: usize,
    port: u16,
    app: &AppProcess,
    web: &ProxyProcess,
    api: &ProxyProcess,
) -> std::net::TcpStream {
    // Counted before the stream opens: through a pooled connection it may
    // reach the application before this line would run.
    let reached = app.connections() + 1;
    let mut open = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut head = (1u64 << 30).to_be_bytes().to_vec();
    head.resize(sent, 0);
    std::io::Write::write_all(&mut open, &head).unwrap();
    assert_eq!(
        app.wait_connections(reached),
        reached,
        "the stream did not reach the application within 20 s\n\
         web's proxy:\n{}\napi's proxy:\n{}",
        web.log_text(),
        api.log_text()
    );
    open
}

/// Asserts that `open` is closed within 5 s (its tunnel was cut).
fn assert_cut(mut open: std::net::TcpStream) {
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    match std::io::Read::read_to_end(&mut open, &mut rest) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the open stream outlived trust in its peer: {other:?}"),
    }
}

/// Waits until a 1 KiB stream through `port` crosses (`up`) or is refused.
fn wait_tunnel(port: u16, up: bool, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        if (hash_client(port, 1024, 1, 0.0).ok == 1) == up {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what} after 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_tunnel_across_trust_domains_works_exactly_while_the_cas_federate() {
    step(
        1,
        "two trust domains, each with a CA and an agent; web in example.org, api in partner.test",
    );
    let ca1 = CaProcess::start_in("example.org", &[]);
    let ca2 = CaProcess::start_in("partner.test", &[]);
    let agent1 = AgentProcess::start(&ca1);
    let agent2 = AgentProcess::start(&ca2);
    let (web_sel, api_sel) = (format!("unix:uid:{WEB_UID}"), format!("unix:uid:{API_UID}"));
    let web_entry = ca1.register(WEB, &node_of(&ca1), &web_sel);
    let api_entry = ca2.register(API, &node_of(&ca2), &api_sel);
    // This test's own uid is a workload on both sides (for py-spiffe).
    let me = format!("unix:uid:{}", my_uid());
    ca1.register(OPS_1, &node_of(&ca1), &me);
    let ops2_entry = ca2.register(OPS_2, &node_of(&ca2), &me);
    let policies = partner_policies();
    let app = AppProcess::start();
    let api_inbound = format!("127.0.0.1:{}", free_port());
    let forward = format!("127.0.0.1:{}", app.port);
    let logs = shared_dir();
    let access_log = logs.path().join("api-access.log");
    let web_access_log = logs.path().join("web-access.log");
    let api = ProxyProcess::start(
        &agent2,
        API_UID,
        &[
            "--inbound-listen",
            &api_inbound,
            "--forward",
            &forward,
            "--policy-dir",
            policies.path().to_str().unwrap(),
            "--access-log",
            access_log.to_str().unwrap(),
        ],
    );

    step(
        2,
        "not federated: web's proxy refuses api's certificate, the application sees nothing",
    );
    let (web, port) = web_proxy(&agent1, &api_inbound, &web_access_log);
    let r = hash_client(port, 1024, 1, 0.0);
    assert_eq!(r.ok, 0, "a stream crossed trust domains without federation");
    assert_eq!(app.connections(), 0);
    let why = "is not in trust domain example.org nor in one federated with it";
    let log = web.wait_log(|l| l.contains(why));
    assert!(log.contains(why), "web's proxy did not say why:\n{log}");
    let out = py_client(&["bundle", &agent2.endpoint(), "example.org"]);
    assert!(
        !out.status.success(),
        "a bundle for example.org before federating"
    );

    step(
        3,
        "each CA is given the other's bundle (`ward bundle set`, PEM one way, JWKS the other)",
    );
    let files = tempfile::tempdir().unwrap();
    let b2 = bundle_file(&ca2, files.path());
    let b1 = files.path().join("example.org.jwks");
    std::fs::write(&b1, run_ok(&ca1, &["bundle", "show", "--format", "jwks"])).unwrap();
    let b1 = b1.to_str().unwrap();
    let bundle_set = |ca: &CaProcess, td: &str, file: &str, format: &str| {
        ca.cli(&[
            "bundle",
            "set",
            "--trust-domain",
            td,
            "--file",
            file,
            "--format",
            format,
        ])
    };
    let set = Instant::now();
    for out in [
        bundle_set(&ca1, "partner.test", &b2, "pem"),
        bundle_set(&ca2, "example.org", b1, "jwks"),
    ] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Bad input is refused with the reason, and nothing is stored.
    let refused = |out: std::process::Output, why: &str| {
        assert!(!out.status.success(), "accepted; expected {why:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
    };
    let garbage = files.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let garbage = garbage.to_str().unwrap();
    refused(
        bundle_set(&ca2, "partner.test", &b2, "pem"),
        "this CA's own trust domain",
    );
    refused(
        bundle_set(&ca2, "third.test", garbage, "pem"),
        "garbage.pem",
    );
    refused(
        ca2.cli(&["bundle", "delete", "--trust-domain", "third.test"]),
        "no federated bundle for third.test",
    );
    let listed = ca2.cli_json(&["bundle", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["trust_domain"], "example.org", "{listed}");
    assert_eq!(listed[0]["x509_authorities"], 1, "{listed}");
    assert_eq!(listed[0]["jwt_authorities"], 1, "{listed}");
    // A bundle at the CA reaches only workloads whose entries federate with
    // its trust domain: none does yet.
    std::thread::sleep(Duration::from_secs(2));
    let out = py_client(&["bundle", &agent2.endpoint(), "example.org"]);
    assert!(
        !out.status.success(),
        "example.org's bundle served to a workload that does not federate with it"
    );
    assert_eq!(
        hash_client(port, 1024, 1, 0.0).ok,
        0,
        "a tunnel before the entries federate"
    );
    assert_eq!(app.connections(), 0);
    // An entry may federate only with a trust domain the CA has a bundle for.
    let unknown = ca2.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://partner.test/tenant/acme/ns/prod/sa/other",
        "--parent-id",
        &node_of(&ca2),
        "--selector",
        "unix:uid:4242",
        "--federates-with",
        "spiffe://third.test",
    ]);
    refused(unknown, "no federated bundle for that trust domain");

    step(
        4,
        "both entries federate: bytes arrive intact through the tunnel, decided by api's policy",
    );
    let federated = Instant::now();
    federate(&ca1, &web_entry, WEB, &web_sel, &["spiffe://partner.test"]);
    federate(&ca2, &api_entry, API, &api_sel, &["example.org"]);
    federate(&ca2, &ops2_entry, OPS_2, &me, &["example.org"]);
    let shown = ca2.cli_json(&["entry", "show", &api_entry]);
    assert_eq!(
        shown["federates_with"][0], "spiffe://example.org",
        "{shown}"
    );
    loop {
        let r = hash_client(port, 1024, 1, 0.0);
        if r.ok == 1 {
            break;
        }
        assert!(
            federated.elapsed() < Duration::from_secs(10),
            "no tunnel 10 s after the entries federate: {:?}",
            r.errors
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "  tunnel up {:?} after the entries federate ({:?} after the first `bundle set`)",
        federated.elapsed(),
        set.elapsed()
    );
    // The probes' decisions are logged within a second; then four streams.
    std::thread::sleep(Duration::from_millis(1500));
    let before = api.decision_lines().len();
    let r = hash_client(port, 64 * 1024, 4, 0.0);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.ok, 4);
    assert_eq!(r.bytes_received, 4 * 64 * 1024);
    let decisions = api.wait_decisions(before + 4).split_off(before);
    assert_eq!(decisions.len(), 4, "{decisions:?}");
    assert!(decisions.iter().all(|l| l["decision"] == "allow"
        && l["principal"] == WEB
        && l["resource"] == API
        && l["policies"][0] == "example-web-to-partner-api"));

    step(
        5,
        "py-spiffe: partner.test's agent serves example.org's bundle; a JWT-SVID of example.org validates there",
    );
    let out = py_client(&["bundle", &agent2.endpoint(), "example.org"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1 1");
    let out = py_client(&["jwt", &agent1.endpoint(), "partner"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = py_client(&["validate", &agent2.endpoint(), "partner", &token]);
    assert!(
        out.status.success(),
        "partner.test refused example.org's JWT-SVID: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), OPS_1);

    step(
        6,
        "web stops federating: its proxy closes its open connection to api (whose side still trusts web) and opens none; federating again, tunnels cross again",
    );
    let open = open_stream(9, port, &app, &web, &api);
    federate(&ca1, &web_entry, WEB, &web_sel, &[]);
    let took = wait_tunnel(port, false, "web's proxy still trusts partner.test");
    println!("  refused {took:?} after web's entry stopped federating");
    let said = "closing a connection whose peer is no longer trusted";
    let log = web.wait_log(|l| l.contains(said));
    assert!(log.contains(said), "{log}");
    assert_cut(open);
    let ended = wait_json_line(&web_access_log, Duration::from_secs(5), |l| {
        l["bytes_from_app"] == 9
    })
    .unwrap_or_else(|| {
        panic!(
            "no access line for the open stream:\n{}",
            std::fs::read_to_string(&web_access_log).unwrap_or_default()
        )
    });
    assert_eq!(ended["outcome"], "untrusted", "{ended}");
    assert_eq!(ended["status"], 200, "{ended}");
    federate(&ca1, &web_entry, WEB, &web_sel, &["spiffe://partner.test"]);
    let took = wait_tunnel(port, true, "no tunnel once web federates again");
    println!("  crossing again {took:?} after web's entry federates again");

    step(
        7,
        "api stops federating: its proxy closes web's open connection and refuses a new one; the bundle, kept while entries federate with it, can then be deleted",
    );
    refused(
        ca2.cli(&["bundle", "delete", "--trust-domain", "example.org"]),
        "2 entries federate with example.org",
    );
    let open = open_stream(8, port, &app, &web, &api);
    federate(&ca2, &api_entry, API, &api_sel, &[]);
    let stopped = Instant::now();
    loop {
        // web's proxy, with its pooled connection from step 6.
        let served = app.connections();
        if hash_client(port, 1024, 1, 0.0).ok == 0 {
            assert_eq!(
                app.connections(),
                served,
                "the application saw the refused one"
            );
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "api's proxy still trusts example.org 10 s after its entry stopped federating"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "  refused {:?} after the entry stopped federating",
        stopped.elapsed()
    );
    let said = |log: &str| {
        log.contains("closing a connection whose peer is no longer trusted")
            && log.contains("refused client certificate")
    };
    let log = api.wait_log(said);
    assert!(said(&log), "{log}");
    // The open stream was closed with its connection, and api's access log
    // says why (lines are written out every second).
    assert_cut(open);
    let ended = wait_json_line(&access_log, Duration::from_secs(5), |l| {
        l["bytes_to_app"] == 8 && l["peer_id"] == WEB
    })
    .unwrap_or_else(|| {
        panic!(
            "no access line for the open stream:\n{}",
            std::fs::read_to_string(&access_log).unwrap_or_default()
        )
    });
    assert_eq!(ended["outcome"], "untrusted", "{ended}");
    assert_eq!(ended["status"], 200, "{ended}");
    // ops still federates: `--mode dissociate` takes example.org off its
    // entry as the bundle goes (SPIRE's `bundle delete -mode dissociate`).
    let out = run_ok(
        &ca2,
        &[
            "bundle",
            "delete",
            "--trust-domain",
            "example.org",
            "--mode",
            "dissociate",
        ],
    );
    assert!(
        out.contains("Removed it from 1 entry") && out.contains(&ops2_entry),
        "{out}"
    );
    assert!(ca2
        .cli_json(&["bundle", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    let ops = ca2.cli_json(&["entry", "show", &ops2_entry]);
    assert_eq!(ops["federates_with"], serde_json::json!([]), "{ops}");
    // Set again, the bundle does not reach ops: its entry no longer lists it.
    assert!(bundle_set(&ca2, "example.org", b1, "jwks").status.success());
    std::thread::sleep(Duration::from_secs(2));
    let out = py_client(&["bundle", &agent2.endpoint(), "example.org"]);
    assert!(
        !out.status.success(),
        "example.org's bundle served to ops after its entry was dissociated"
    );
}

/// The `kid`s of a CA's JWT authorities, from its own bundle.
fn jwt_kids(ca: &CaProcess) -> Vec<String> {
    let jwks: serde_json::Value =
        serde_json::from_str(&run_ok(ca, &["bundle", "show", "--format", "jwks"])).unwrap();
    let mut kids: Vec<String> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    kids.sort();
    kids
}

/// The `kid`s CA `ca` holds for `td`'s federated bundle.
fn federated_kids(ca: &CaProcess, td: &str) -> Vec<String> {
    let list = ca.cli_json(&["bundle", "list"]);
    let mut kids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["trust_domain"] == td)
        .map(|b| {
            b["jwt_key_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    kids.sort();
    kids
}

/// `ward bundle set` of partner.test's bundle from `pem` on CA `ca`,
/// refreshed from `url` (`extra`: more flags).
fn set_with_endpoint(ca: &CaProcess, pem: &str, url: &str, extra: &[&str]) {
    let mut args = vec![
        "bundle",
        "set",
        "--trust-domain",
        "partner.test",
        "--file",
        pem,
        "--endpoint-url",
        url,
    ];
    args.extend_from_slice(extra);
    run_ok(ca, &args);
}

/// Waits (10 s at most) until CA `ca` holds `want` as `td`'s JWT key IDs;
/// how long that took.
fn wait_for_kids(ca: &CaProcess, td: &str, want: &[String]) -> Duration {
    let start = Instant::now();
    while federated_kids(ca, td) != want {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} holds JWT keys {:?} for {td}, expected {want:?}",
            ca.trust_domain,
            federated_kids(ca, td)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

#[test]
fn a_bundle_endpoint_keeps_a_federated_bundle_fresh_through_the_partners_rotation() {
    step(
        1,
        "partner.test's CA serves a SPIFFE bundle endpoint; example.org's refreshes every second",
    );
    let endpoint = format!("127.0.0.1:{}", free_port());
    let partner = CaProcess::start_in("partner.test", &["--federation-address", &endpoint]);
    let ours = CaProcess::start_in("example.org", &["--federation-refresh-interval", "1s"]);
    let url = format!("https://{endpoint}");

    step(
        2,
        "an independent HTTPS client gets the partner's bundle there",
    );
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import ssl, sys, urllib.request; \
             print(urllib.request.urlopen(sys.argv[1], context=ssl._create_unverified_context()).read().decode())",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        served,
        serde_json::from_str::<serde_json::Value>(&run_ok(
            &partner,
            &["bundle", "show", "--format", "jwks"]
        ))
        .unwrap()
    );

    step(
        3,
        "an endpoint presenting another SPIFFE ID than expected is not believed",
    );
    let files = tempfile::tempdir().unwrap();
    let pem = bundle_file(&partner, files.path());
    // Partner's bundle, refreshed from `url`, whose server must present `extra`'s ID if given.
    let follow = |extra: &[&str]| set_with_endpoint(&ours, &pem, &url, extra);
    follow(&["--endpoint-spiffe-id", "spiffe://partner.test/not-the-ca"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        federated_kids(&ours, "partner.test").is_empty(),
        "a bundle was taken from an endpoint with the wrong identity"
    );
    let log = ours.wait_log(|l| l.contains("cannot refresh a federated bundle"));
    assert_eq!(
        log.matches("cannot refresh a federated bundle").count(),
        1,
        "the failing endpoint is logged once:\n{log}"
    );
    assert!(log.contains("spiffe://partner.test/ward/ca"), "{log}");
    assert!(
        !log.contains("refused server certificate"),
        "each refresh logged its refusal again:\n{log}"
    );

    step(
        4,
        "with the endpoint's real identity (the default), the full bundle arrives",
    );
    follow(&[]);
    let wait_for = |want: Vec<String>| wait_for_kids(&ours, "partner.test", &want);
    let took = wait_for(jwt_kids(&partner));
    println!("  the endpoint's bundle arrived {took:?} after `bundle set`");

    step(
        5,
        "the partner rotates (a new JWT key enters its bundle): we follow without anyone's help",
    );
    let before = jwt_kids(&partner);
    run_ok(&partner, &["ca", "rotate"]);
    let after = jwt_kids(&partner);
    assert_ne!(before, after, "the rotation changed no JWT key");
    let took = wait_for(after);
    println!("  the rotated bundle arrived {took:?} after `ca rotate`");
    let list = ours.cli_json(&["bundle", "list"]);
    assert_eq!(list[0]["endpoint_url"], url.as_str(), "{list}");
    assert_eq!(
        list[0]["endpoint_spiffe_id"], "spiffe://partner.test/ward/ca",
        "{list}"
    );
}

/// Without a short refresh interval (the default is up to 5 minutes), a
/// bundle endpoint is fetched from as soon as it is set, and again as soon
/// as the bundle is set by hand, so a PEM bundle (X.509 roots only) gains
/// the partner's JWT keys within seconds.
#[test]
fn a_bundle_endpoint_is_fetched_from_as_soon_as_it_is_set() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let partner = CaProcess::start_in("partner.test", &["--federation-address", &endpoint]);
    let ours = CaProcess::start_in("example.org", &[]);
    let files = tempfile::tempdir().unwrap();
    let pem = bundle_file(&partner, files.path());
    let url = format!("https://{endpoint}");
    let want = jwt_kids(&partner);
    assert!(!want.is_empty(), "the partner's bundle has no JWT key");
    for (n, what) in ["the endpoint is set", "the bundle is set again by hand"]
        .into_iter()
        .enumerate()
    {
        step(n as u32 + 1, what);
        set_with_endpoint(&ours, &pem, &url, &[]);
        let took = wait_for_kids(&ours, "partner.test", &want);
        println!("  the endpoint's bundle arrived {took:?} after `bundle set`");
    }
}
