//! CA replicas on one PostgreSQL database: each signs with its own
//! intermediate under the shared root, and a change made through one reaches
//! the agents attached to the other at once (PostgreSQL `LISTEN/NOTIFY`, no
//! polling).
//!
//! Needs a PostgreSQL server: `WARD_TEST_POSTGRES_URL` (`.ci/run` starts one
//! and sets it, with `WARD_REQUIRE_POSTGRES=1` so a missing server fails).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rcgen::KeyPair;

fn step(n: u32, what: &str) {
    println!("step {n}: {what}");
}

/// A new database on the test server, or None (with the reason) without one.
fn fresh_database() -> Option<String> {
    if std::env::var_os("WARD_TEST_POSTGRES_URL").is_none() {
        assert!(
            std::env::var_os("WARD_REQUIRE_POSTGRES").is_none(),
            "WARD_REQUIRE_POSTGRES is set but WARD_TEST_POSTGRES_URL is not"
        );
        println!(
            "SKIPPED: set WARD_TEST_POSTGRES_URL to run the replica tests; nothing was tested"
        );
        return None;
    }
    Some(fresh_postgres_database())
}

/// Replicas A and B on `db`, each with its own keys under one upstream root
/// (kept in `dir`).
fn two_replicas(db: &str, dir: &Path) -> (CaProcess, CaProcess) {
    let (cert, key) = upstream_root(dir);
    let flags = [
        "--datastore",
        db,
        "--upstream-cert",
        cert.as_str(),
        "--upstream-key",
        key.as_str(),
    ];
    (CaProcess::start(&flags), CaProcess::start(&flags))
}

/// An agent that knows A and B and attaches to A (with extra `ward agent
/// run` flags); its node SPIFFE ID.
fn agent_attached_to(a: &CaProcess, b: &CaProcess, extra: &[&str]) -> (AgentProcess, String) {
    agent_at(a, vec![a.node_addr.clone(), b.node_addr.clone()], extra)
}

/// An agent attested through `a`'s join token that knows the CAs at `addrs`
/// (the first attests it); its node SPIFFE ID.
fn agent_at(a: &CaProcess, addrs: Vec<String>, extra: &[&str]) -> (AgentProcess, String) {
    let token = a.join_token();
    let mut agent = AgentProcess::prepare(addrs);
    agent.extra = extra.iter().map(|s| s.to_string()).collect();
    std::fs::write(
        agent.dir.join("bundle.pem"),
        a.cli(&["bundle", "show"]).stdout,
    )
    .unwrap();
    agent.spawn(Some(&token));
    agent.wait_ready();
    let node = a.first_agent();
    (agent, node)
}

/// Creates `spiffe://example.org/tenant/acme/ns/prod/sa/NAME` under `node`
/// for this test's uid, with X509-SVIDs of `ttl` seconds; fails the test if
/// the CA refuses.
fn create_entry(ca: &CaProcess, node: &str, name: &str, ttl: &str) {
    let out = try_create_entry(ca, node, name, ttl);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn try_create_entry(ca: &CaProcess, node: &str, name: &str, ttl: &str) -> std::process::Output {
    ca.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://example.org/tenant/acme/ns/prod/sa/{name}"),
        "--parent-id",
        node,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
        "--x509-ttl",
        ttl,
    ])
}

/// (SPIFFE ID, expiry) of every X509-SVID the agent serves this test's uid.
fn served(agent: &AgentProcess) -> Vec<(String, i64)> {
    let out = agent.svid_cli(&["fetch", "--output", "json"], None);
    if !out.status.success() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["spiffe_id"].as_str().unwrap().to_owned(),
                s["expires_at"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn an_entry_created_through_one_replica_reaches_an_agent_of_the_other_within_a_second() {
    let Some(db) = fresh_database() else { return };

    step(
        1,
        "two replicas on one database, each with its own keys under the shared root",
    );
    let root_dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(&db, root_dir.path());
    let bundle_a = a.cli(&["bundle", "show"]).stdout;
    assert_eq!(
        bundle_a,
        b.cli(&["bundle", "show"]).stdout,
        "the replicas trust different roots"
    );

    step(
        2,
        "one bundle: both replicas publish it, with each one's JWT key, at the same sequence",
    );
    let jwks = |ca: &CaProcess| -> serde_json::Value {
        serde_json::from_slice(&ca.cli(&["bundle", "show", "--format", "jwks"]).stdout).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while jwks(&a) != jwks(&b) {
        assert!(
            Instant::now() < deadline,
            "the replicas publish different bundles:\n{}\n{}",
            jwks(&a),
            jwks(&b)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let published = jwks(&a);
    let jwt_keys = published["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .count();
    assert_eq!(jwt_keys, 2, "{published}");
    assert_eq!(
        published["spiffe_sequence"], 2,
        "one bump per real change: {published}"
    );

    step(
        3,
        "a join token made through A attests an agent attached to B",
    );
    let token = a.join_token();
    let mut agent = AgentProcess::prepare(vec![b.node_addr.clone()]);
    std::fs::write(agent.dir.join("bundle.pem"), &bundle_a).unwrap();
    agent.spawn(Some(&token));
    agent.wait_ready();
    let node = b.first_agent();

    step(
        4,
        "an entry created through A is served by B's agent within a second",
    );
    assert!(!agent.svid_cli(&["fetch"], None).status.success());
    let created = Instant::now();
    a.register(
        "spiffe://example.org/tenant/acme/ns/prod/sa/replicated",
        &node,
        &format!("unix:uid:{}", my_uid()),
    );
    let registered = created.elapsed();
    loop {
        let out = agent.svid_cli(&["fetch"], None);
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("replicated"));
            break;
        }
        assert!(
            created.elapsed() < Duration::from_secs(1),
            "B's agent had no SVID 1 s after the entry was created through A"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "  served {:?} after the create call returned ({registered:?} for the call itself)",
        created.elapsed() - registered
    );

    step(5, "a policy set pushed through A is B's active set too");
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    let out = a.cli(&["policy", "push", policies]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history = b.cli_json(&["policy", "history"]);
    assert_eq!(history[0]["version"], 1);
    assert_eq!(history[0]["active"], true);

    step(
        6,
        "a federated bundle set through A is in B's bundle within a second",
    );
    let partner_dir = tempfile::tempdir().unwrap();
    let (partner_root, _) = upstream_root(partner_dir.path());
    let out = a.cli_json(&[
        "bundle",
        "set",
        "--trust-domain",
        "partner.test",
        "--file",
        &partner_root,
    ]);
    assert_eq!(out["trust_domain"], "partner.test", "{out}");
    assert_eq!(out["x509_authorities"], 1, "{out}");
    let set = Instant::now();
    while b
        .cli_json(&["bundle", "list"])
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            set.elapsed() < Duration::from_secs(1),
            "B does not federate with partner.test 1 s after A was told to"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        b.cli_json(&["bundle", "list"])[0]["trust_domain"],
        "partner.test"
    );
}

#[test]
fn the_agent_fails_over_when_its_replica_is_killed_and_never_serves_an_expired_svid() {
    let Some(db) = fresh_database() else { return };

    step(
        1,
        "two replicas on one database; the agent knows both and attaches to A",
    );
    let root_dir = tempfile::tempdir().unwrap();
    let (mut a, b) = two_replicas(&db, root_dir.path());
    let (agent, node) = agent_attached_to(&a, &b, &[]);

    step(2, "a workload with 6 s SVIDs (rotated every ~3 s)");
    create_entry(&a, &node, "short", "6");
    let entry: serde_json::Value =
        serde_json::from_slice(&a.cli(&["entry", "list", "--output", "json"]).stdout).unwrap();
    let entry_id = entry[0]["id"].as_str().unwrap().to_owned();
    let fetch = |agent: &AgentProcess| served(agent).first().map(|s| s.1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fetch(&agent).is_none() {
        assert!(Instant::now() < deadline, "no SVID from the agent");
        std::thread::sleep(Duration::from_millis(100));
    }

    step(
        3,
        "A is killed (-9); for 20 s the workload asks every 200 ms",
    );
    a.kill9();
    let mut expiries = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        let now = unix_now();
        match fetch(&agent) {
            Some(exp) => {
                assert!(
                    exp > now,
                    "served an SVID that expired at {exp} (now {now})"
                );
                expiries.insert(exp);
            }
            None => panic!("the workload got no SVID at {now}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        expiries.len() >= 5,
        "only {} distinct SVIDs in 20 s: rotation did not continue through B",
        expiries.len()
    );
    assert!(
        agent
            .wait_log(|l| l.contains("failed over to another CA"))
            .contains("failed over to another CA"),
        "the agent never said it moved to B"
    );

    step(
        4,
        "nothing acknowledged through A is lost: B knows the agent and the entry",
    );
    assert_eq!(
        b.cli_json(&["agent", "list"])[0]["spiffe_id"],
        node.as_str()
    );
    let out = b.cli(&["entry", "show", &entry_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL server of this test's own, so it can be stopped and started
/// without disturbing other tests: initialized and run as the `postgres` user
/// from the Debian packages' binaries.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// None (with the reason) where that is not possible here, unless
    /// `WARD_REQUIRE_POSTGRES` is set, which makes it a failure.
    fn start() -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|b| b.join("initdb").exists())
                .max()
        });
        let why = match (&bin, my_uid()) {
            (None, _) => Some("PostgreSQL's server binaries are not installed"),
            (_, uid) if uid != 0 => Some("running a PostgreSQL server as `postgres` needs root"),
            _ => None,
        };
        if let Some(why) = why {
            assert!(
                std::env::var_os("WARD_REQUIRE_POSTGRES").is_none(),
                "WARD_REQUIRE_POSTGRES is set but {why}"
            );
            println!("SKIPPED: {why}; nothing was tested");
            return None;
        }
        let pg = PrivatePostgres {
            dir: tempfile::tempdir().unwrap(),
            bin: bin.unwrap(),
            port: free_port(),
        };
        let chown = std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(pg.dir.path())
            .status()
            .unwrap();
        assert!(chown.success());
        pg.run(
            "initdb",
            &["-A", "trust", "-U", "postgres", "--no-sync", "-D"],
        );
        pg.start_server();
        Some(pg)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `tool args… <data dir>` as `postgres`.
    fn run(&self, tool: &str, args: &[&str]) -> std::process::Output {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .arg(self.dir.path().join("data"))
            .current_dir("/")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        let log = log.to_str().unwrap();
        self.run("pg_ctl", &["-w", "-l", log, "-o", &options, "start", "-D"]);
    }

    /// A fast shutdown: sessions are ended, the server exits.
    fn stop_server(&self) {
        self.run("pg_ctl", &["-w", "-m", "fast", "stop", "-D"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-m", "immediate", "stop", "-D"])
            .arg(self.dir.path().join("data"))
            .current_dir("/")
            .output();
    }
}

fn ready(ca: &CaProcess) -> bool {
    http_get(&ca.health_addr, "/readyz").is_some_and(|(code, _)| code == 200)
}

fn wait_until(what: &str, limit: Duration, cond: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

#[test]
fn while_postgres_restarts_the_replicas_are_not_ready_keep_signing_and_recover_by_themselves() {
    if fresh_database().is_none() {
        return;
    }
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };

    step(
        1,
        "two replicas on a PostgreSQL server of the test's own; the agent knows both, attaches to A",
    );
    let root_dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(&pg.url(), root_dir.path());
    let (agent, node) = agent_attached_to(&a, &b, &[]);
    create_entry(&a, &node, "short", "6");
    let fetch = served;
    wait_until("the first SVID", Duration::from_secs(10), || {
        !fetch(&agent).is_empty()
    });
    let jwt = |audience: &str| agent.svid_cli(&["jwt", "--audience", audience], None);
    let out = jwt("before");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    step(2, "PostgreSQL stopped: both replicas report not ready");
    pg.stop_server();
    let took = wait_until("both replicas not ready", Duration::from_secs(5), || {
        !ready(&a) && !ready(&b)
    });
    println!("  both not ready {took:?} after the server stopped");

    step(
        3,
        "for 15 s the workload asks every 200 ms: always a valid SVID, rotation goes on",
    );
    let mut expiries = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(15);
    let mut writes_checked = false;
    while Instant::now() < until {
        let now = unix_now();
        let served = fetch(&agent);
        assert_eq!(served.len(), 1, "the workload got no SVID at {now}");
        assert!(
            served[0].1 > now,
            "served an SVID that expired at {} (now {now})",
            served[0].1
        );
        expiries.insert(served[0].1);
        if !writes_checked {
            // What needs a write fails, clearly; a JWT-SVID needs none.
            let out = try_create_entry(&a, &node, "during", "60");
            assert!(
                !out.status.success(),
                "an entry was created with the database down"
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("datastore unavailable"), "{err}");
            let out = jwt("during");
            assert!(
                out.status.success(),
                "no JWT-SVID while the database is down: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            writes_checked = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        expiries.len() >= 4,
        "only {} distinct SVIDs in 15 s: signing stopped with the database",
        expiries.len()
    );
    assert_eq!(metric_value(&a.health_addr, "ward_ca_datastore_up"), 0.0);
    assert!(metric_value(&a.health_addr, "ward_ca_cached_reads_total") > 0.0);
    assert!(!ready(&a) && !ready(&b));

    step(
        4,
        "PostgreSQL started again: both replicas ready again by themselves",
    );
    pg.start_server();
    let took = wait_until("both replicas ready", Duration::from_secs(10), || {
        ready(&a) && ready(&b)
    });
    println!("  both ready {took:?} after the server started");
    assert_eq!(metric_value(&a.health_addr, "ward_ca_datastore_up"), 1.0);
    for ca in [&a, &b] {
        let log = ca.wait_log(|l| l.contains("the datastore answers again"));
        assert_eq!(
            log.matches("the datastore does not answer").count(),
            1,
            "the outage is logged once:\n{log}"
        );
        assert!(log.contains("the datastore answers again"), "{log}");
    }

    step(
        5,
        "changes flow again: an entry created through each replica reaches the agent within a second",
    );
    for (ca, name) in [(&a, "after-a"), (&b, "after-b")] {
        let created = Instant::now();
        create_entry(ca, &node, name, "60");
        let took = wait_until(&format!("{name} served"), Duration::from_secs(1), || {
            fetch(&agent).iter().any(|(id, _)| id.ends_with(name))
        });
        println!(
            "  {name}: served {took:?} after the create call returned ({:?} in all)",
            created.elapsed()
        );
    }
}

#[test]
fn a_signing_request_in_flight_when_its_replica_dies_is_retried_on_the_other_once() {
    let Some(db) = fresh_database() else { return };

    step(
        1,
        "two replicas; the agent (syncing only on notices) attaches to A; a workload with 8 s SVIDs",
    );
    let root_dir = tempfile::tempdir().unwrap();
    let (mut a, b) = two_replicas(&db, root_dir.path());
    let (agent, node) = agent_attached_to(&a, &b, &["--sync-interval", "300s"]);
    create_entry(&a, &node, "short", "8");
    wait_until("the first SVID", Duration::from_secs(10), || {
        !served(&agent).is_empty()
    });

    step(
        2,
        "right after a rotation A is frozen (SIGSTOP): the next signing request waits in A's socket",
    );
    let first = served(&agent)[0].1;
    wait_until("a rotation", Duration::from_secs(10), || {
        served(&agent)[0].1 != first
    });
    let issued_at = Instant::now();
    let before_freeze = served(&agent)[0].1;
    let pid = a.child.as_ref().unwrap().id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let issued_by_a = a.audit_lines("x509_svid_issued");
    let sign_errors = |agent: &AgentProcess| {
        metric_value(
            &agent.health_addr,
            "ward_agent_ca_errors_total{kind=\"sign\"}",
        )
    };
    assert_eq!(sign_errors(&agent), 0.0);

    step(
        3,
        "meanwhile 20 entries are created through B (the agent hears nothing: A is its CA)",
    );
    for i in 0..20 {
        create_entry(&b, &node, &format!("new-{i}"), "300");
    }

    step(
        4,
        "once the rotation request has waited 1.5 s, A is killed (-9)",
    );
    // Rotation is due at half the 8 s lifetime.
    std::thread::sleep(Duration::from_millis(5500).saturating_sub(issued_at.elapsed()));
    assert_eq!(
        served(&agent).len(),
        1,
        "the agent learnt of B's entries without its CA"
    );
    a.kill9();
    assert_eq!(
        a.audit_lines("x509_svid_issued"),
        issued_by_a,
        "A signed while frozen"
    );

    step(
        5,
        "the request is retried on B: the workload's SVID never expires and B's entries arrive",
    );
    let expected: std::collections::BTreeSet<String> = std::iter::once("short".to_owned())
        .chain((0..20).map(|i| format!("new-{i}")))
        .map(|n| format!("spiffe://example.org/tenant/acme/ns/prod/sa/{n}"))
        .collect();
    let killed = Instant::now();
    loop {
        let now = unix_now();
        let svids = served(&agent);
        let short = svids
            .iter()
            .find(|(id, _)| id.ends_with("/short"))
            .unwrap_or_else(|| panic!("the workload lost its SVID at {now}"));
        assert!(
            short.1 > now,
            "served an expired SVID ({short:?}, now {now})"
        );
        let ids: Vec<&String> = svids.iter().map(|(id, _)| id).collect();
        let distinct: std::collections::BTreeSet<String> =
            ids.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            ids.len(),
            distinct.len(),
            "an identity served twice: {ids:?}"
        );
        if distinct == expected && short.1 > before_freeze {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "10 s after the kill the agent serves {ids:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("  all 21 served {:?} after the kill", killed.elapsed());
    assert!(
        sign_errors(&agent) >= 1.0,
        "no signing request failed: none was in flight when A died"
    );
    assert!(agent
        .wait_log(|l| l.contains("failed over to another CA"))
        .contains("failed over to another CA"));

    step(
        6,
        "nothing signed twice: B issued each new entry's SVID once, A none of them",
    );
    let issued = |log: &str, i: usize| {
        let id = format!("spiffe_id=spiffe://example.org/tenant/acme/ns/prod/sa/new-{i} ");
        log.lines()
            .filter(|l| l.contains("x509_svid_issued") && l.contains(&id))
            .count()
    };
    // The agent serves all 21, so B has issued each: wait for its lines.
    let b_log = b.wait_log(|l| (0..20).all(|i| issued(l, i) >= 1));
    let a_log = a.log_text();
    for i in 0..20 {
        assert_eq!(issued(&b_log, i), 1, "new-{i} issued by B");
        assert_eq!(issued(&a_log, i), 0, "new-{i} issued by A");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_evicted_through_one_replica_is_not_signed_for_from_the_others_memory() {
    if fresh_database().is_none() {
        return;
    }
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };

    step(
        1,
        "two agents attested through A; B signs for both (and keeps what it read)",
    );
    let root_dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(&pg.url(), root_dir.path());
    let mut kept = attest(&a).await;
    let mut evicted = attest(&a).await;
    let mut entries = Vec::new();
    for (node, name) in [(&mut kept, "kept"), (&mut evicted, "evicted")] {
        let id = format!("spiffe://example.org/tenant/acme/ns/prod/sa/{name}");
        let entry = a.create_entry(&id, &node.id.to_string());
        node.reconnect(&b).await.unwrap();
        let key = KeyPair::generate().unwrap();
        node.sign(&entry, csr(&key, &[&id])).await.unwrap();
        entries.push((entry, id));
    }

    step(2, "one of them is evicted through A");
    let out = a.cli(&["agent", "evict", &evicted.id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    step(
        3,
        "PostgreSQL stopped: B signs for the other from memory, never for the evicted one",
    );
    pg.stop_server();
    let (kept_entry, kept_id) = &entries[0];
    let (evicted_entry, evicted_id) = &entries[1];
    let key = KeyPair::generate().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    // The first call may be the one that finds the database gone (≤ 2 s).
    while let Err(e) = kept.sign(kept_entry, csr(&key, &[kept_id])).await {
        assert!(Instant::now() < deadline, "B stopped signing: {e}");
    }
    assert_eq!(metric_value(&b.health_addr, "ward_ca_datastore_up"), 0.0);
    let Err(refused) = evicted.sign(evicted_entry, csr(&key, &[evicted_id])).await else {
        panic!("B signed for an evicted agent from memory")
    };
    println!(
        "  evicted agent: {:?}: {}",
        refused.code(),
        refused.message()
    );
    // Signed from memory for one, nothing issued for the other.
    assert_eq!(
        b.wait_audit_lines(&format!("spiffe_id={evicted_id} "), 1),
        1,
        "{}",
        b.log_text()
    );
}

#[test]
fn an_agent_leaves_a_frozen_replica_when_its_calls_time_out() {
    let Some(db) = fresh_database() else { return };

    step(
        1,
        "two replicas; the agent (CA calls time out after 2 s) attaches to A; 12 s SVIDs",
    );
    let root_dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(&db, root_dir.path());
    let (agent, node) = agent_attached_to(&a, &b, &["--ca-call-timeout", "2s"]);
    create_entry(&a, &node, "short", "12");
    wait_until("the first SVID", Duration::from_secs(10), || {
        !served(&agent).is_empty()
    });

    step(
        2,
        "A is frozen (SIGSTOP: its sockets stay open, nothing answers), for good",
    );
    let pid = a.child.as_ref().unwrap().id().to_string();
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success())
    };
    signal("-STOP");
    let frozen_at = served(&agent)[0].1;

    step(
        3,
        "for 16 s the workload asks every 200 ms: always a valid SVID, the next ones from B",
    );
    let expiries = always_served(&agent, Duration::from_secs(16), || {});
    signal("-CONT");
    assert!(
        expiries.iter().filter(|&&e| e > frozen_at).count() >= 1,
        "no rotation after A froze: {expiries:?}"
    );
    let log = agent.wait_log(|l| l.contains("failed over to another CA"));
    assert!(log.contains("failed over to another CA"), "{log}");
    let timed_out: f64 = ["sync", "sign"]
        .iter()
        .map(|k| {
            metric_value(
                &agent.health_addr,
                &format!("ward_agent_ca_errors_total{{kind=\"{k}\"}}"),
            )
        })
        .sum();
    assert!(timed_out >= 1.0, "no call to A failed");
    assert!(
        b.wait_audit_lines("x509_svid_issued", 1) >= 1,
        "B signed nothing"
    );
}

/// Asks the agent for the workload's SVID every 200 ms for `how_long`
/// (calling `each` after each answer): one must be served every time, and
/// it must not have expired. Returns the expiries seen.
fn always_served(
    agent: &AgentProcess,
    how_long: Duration,
    mut each: impl FnMut(),
) -> std::collections::BTreeSet<i64> {
    let mut expiries = std::collections::BTreeSet::new();
    let until = Instant::now() + how_long;
    while Instant::now() < until {
        let now = unix_now();
        let svids = served(agent);
        assert_eq!(svids.len(), 1, "the workload got no SVID at {now}");
        assert!(svids[0].1 > now, "served an expired SVID at {now}");
        expiries.insert(svids[0].1);
        each();
        std::thread::sleep(Duration::from_millis(200));
    }
    expiries
}

/// A TCP relay to `upstream` that can turn into a black hole: it then cuts
/// the connections it carries and accepts new ones without ever answering,
/// as an address does whose process hangs, or a load balancer without a
/// backend.
struct Relay {
    addr: String,
    black_hole: std::sync::Arc<std::sync::atomic::AtomicBool>,
    carried: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start(upstream: &str) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let relay = Relay {
            addr,
            black_hole: Default::default(),
            carried: Default::default(),
        };
        let (black_hole, carried) = (relay.black_hole.clone(), relay.carried.clone());
        let upstream = upstream.to_owned();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if black_hole.load(Ordering::SeqCst) {
                    held.push(conn);
                    continue;
                }
                let Ok(up) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let mut c = carried.lock().unwrap();
                c.push(conn.try_clone().unwrap());
                c.push(up.try_clone().unwrap());
                for (mut from, mut to) in [
                    (conn.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, conn),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        relay
    }

    /// From now on nothing through the relay is answered.
    fn black_hole(&self) {
        self.black_hole
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.carried.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn an_agent_leaves_a_replica_address_that_accepts_but_never_answers() {
    let Some(db) = fresh_database() else { return };

    step(
        1,
        "two replicas; the agent reaches A through a relay, and knows B; 20 s SVIDs",
    );
    let root_dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(&db, root_dir.path());
    let relay = Relay::start(&a.node_addr);
    let (agent, node) = agent_at(&a, vec![relay.addr.clone(), b.node_addr.clone()], &[]);
    create_entry(&a, &node, "short", "20");
    wait_until("the first SVID", Duration::from_secs(10), || {
        !served(&agent).is_empty()
    });

    step(
        2,
        "the relay cuts the agent's connection and then takes new ones without answering: a reconnection there never completes",
    );
    relay.black_hole();
    let cut = Instant::now();
    let cut_at = served(&agent)[0].1;

    step(
        3,
        "for 25 s the workload asks every 200 ms: always a valid SVID, the next ones from B, within 15 s (a reconnection gets 5 s)",
    );
    let mut moved = None;
    let expiries = always_served(&agent, Duration::from_secs(25), || {
        if moved.is_none() && agent.log_text().contains("failed over to another CA") {
            moved = Some(cut.elapsed());
        }
    });
    assert!(
        expiries.iter().filter(|&&e| e > cut_at).count() >= 1,
        "no rotation after the relay went silent: {expiries:?}"
    );
    let moved = moved.unwrap_or_else(|| panic!("never failed over:\n{}", agent.log_text()));
    println!("  failed over {moved:?} after the relay went silent");
    assert!(
        moved < Duration::from_secs(15),
        "failed over only {moved:?} after the relay went silent"
    );
    assert!(
        b.wait_audit_lines("x509_svid_issued", 1) >= 1,
        "B signed nothing"
    );
}
