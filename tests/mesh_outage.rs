//! End to end: the control plane may go away. With the CA stopped, the mesh
//! keeps carrying traffic under the last policy set; when the CA comes back,
//! the agent reconnects by itself, and nothing the CA had acknowledged is lost.
//!
//! The mesh: a CA, one agent, `web` (uid 1001) → its proxy → mutual TLS →
//! `api`'s proxy (uid 1002) → the application. Both proxies take their policy
//! set from the control plane (through the agent), not from a directory.

mod common;

use std::time::{Duration, Instant};

use common::*;

const WEB: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/web";
const API: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/api";
const WEB_UID: u32 = 1001;
const API_UID: u32 = 1002;

fn step(n: u32, what: &str) {
    println!("step {n}: {what}");
}

fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits until `f` holds (checked every 100 ms), up to `within`.
fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

const FREEZE: &str = r#"@id("freeze-web-to-api")
forbid (principal, action == Ward::Action::"connect", resource)
when { principal.service == "web" && resource.service == "api" };
"#;

#[test]
fn with_the_ca_stopped_traffic_continues_and_after_a_restart_nothing_is_lost() {
    step(
        1,
        "a CA, an agent and the repository's policies pushed to the CA",
    );
    let mut ca = CaProcess::start(&[]);
    let mut agent = AgentProcess::start(&ca);
    let node = ca.first_agent();
    let mut entries = vec![];
    for (id, uid) in [(WEB, WEB_UID), (API, API_UID)] {
        entries.push(ca.register(id, &node, &format!("unix:uid:{uid}")));
    }
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    ok(&ca.cli(&["policy", "push", policies, "--comment", "start"]));

    step(
        2,
        "api's proxy (policies from the agent), web's proxy with a route to it",
    );
    let app = AppProcess::start();
    let inbound = format!("127.0.0.1:{}", free_port());
    let forward = format!("127.0.0.1:{}", app.port);
    let api = ProxyProcess::start(
        &agent,
        API_UID,
        &["--inbound-listen", &inbound, "--forward", &forward],
    );
    let port = free_port();
    let route = format!("listen=127.0.0.1:{port},destination={inbound},id={API},target=api:8080");
    let _web = ProxyProcess::start(&agent, WEB_UID, &["--route", &route]);
    eventually(
        Duration::from_secs(10),
        "the policy set reaches api's proxy",
        || api.metric("ward_proxy_policy_reloads_total{result=\"loaded\"}") >= 1.0,
    );
    let r = hash_client(port, 64 * 1024, 4, 0.0);
    assert!(r.errors.is_empty() && r.ok == 4, "{:?}", r.errors);

    step(
        3,
        "the agent restarts (-9): api's proxy follows it again and does not load the set it has a second time",
    );
    let back = "policy stream from the agent available again";
    let reopened = || api.log_text().matches(back).count();
    let before = reopened();
    agent.kill9();
    agent.spawn(None);
    agent.wait_ready();
    eventually(
        Duration::from_secs(20),
        "api's proxy reopens its policy stream",
        || reopened() > before,
    );
    let loaded = "ward_proxy_policy_reloads_total{result=\"loaded\"}";
    assert_eq!(api.metric(loaded), 1.0);
    eventually(Duration::from_secs(10), "web reaches api again", || {
        hash_client(port, 1024, 1, 0.0).ok == 1
    });
    assert_eq!(api.metric(loaded), 1.0);

    step(
        4,
        "the CA is killed (-9): new streams, old connections and the policy set keep working",
    );
    ca.kill9();
    assert!(http_get(&ca.health_addr, "/healthz").is_none());
    for _ in 0..3 {
        let r = hash_client(port, 256 * 1024, 8, 0.0);
        assert!(r.errors.is_empty() && r.ok == 8, "{:?}", r.errors);
        std::thread::sleep(Duration::from_millis(500));
    }
    let allowed = api.metric("ward_proxy_authorization_decisions_total{decision=\"allow\"}");
    assert!(allowed >= 28.0, "allowed decisions: {allowed}");
    assert!(
        http_get(&ca.health_addr, "/healthz").is_none(),
        "the CA is still answering"
    );

    step(
        5,
        "the CA restarts on the same data: the agent reconnects by itself",
    );
    ca.spawn();
    let extra = ca.register(
        "spiffe://example.org/tenant/acme/ns/prod/sa/worker",
        &node,
        "unix:uid:1004",
    );
    let took = eventually(
        Duration::from_secs(30),
        "the new entry reaches the agent",
        || agent.svid_cli(&["fetch"], Some(1004)).status.success(),
    );
    println!("  the agent served an entry created after the restart within {took:?}");

    step(
        6,
        "a policy pushed after the restart reaches the proxies: web → api is refused",
    );
    let freeze = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(policies).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "cedar") {
            std::fs::copy(&p, freeze.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(freeze.path().join("freeze.cedar"), FREEZE).unwrap();
    ok(&ca.cli(&[
        "policy",
        "push",
        freeze.path().to_str().unwrap(),
        "--comment",
        "freeze",
    ]));
    eventually(Duration::from_secs(10), "the new set refuses web", || {
        hash_client(port, 1024, 1, 0.0).ok == 0
    });
    let denied = api
        .wait_decisions_where(1, |d| {
            d["decision"] == "deny" && d["policies"].to_string().contains("freeze-web-to-api")
        })
        .len();
    assert!(denied >= 1);

    step(
        7,
        "nothing acknowledged was lost: entries, the agent and both policy versions",
    );
    let listed = ca.cli_json(&["entry", "list"]);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    for id in entries.iter().chain([&extra]) {
        assert!(ids.contains(&id.as_str()), "entry {id} lost: {ids:?}");
    }
    assert_eq!(
        ca.cli_json(&["agent", "list"])[0]["spiffe_id"],
        node.as_str()
    );
    let history = ca.cli_json(&["policy", "history"]);
    let versions: Vec<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![2, 1]);
    assert_eq!(history[0]["comment"], "freeze");
    // api's proxy says which of them it runs.
    let dump = api.config_dump();
    assert_eq!(dump["policy"]["source"], "control plane", "{dump}");
    assert_eq!(dump["policy"]["control_plane_version"], 2, "{dump}");
    assert_eq!(dump["policy"]["control_plane_digest"], history[0]["digest"]);
    assert_eq!(history[0]["active"], true);
}
