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
    let node = b.cli_json(&["agent", "list"])[0]["spiffe_id"]
        .as_str()
        .unwrap()
        .to_owned();

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
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
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
    let token = a.join_token();
    let mut agent = AgentProcess::prepare(vec![a.node_addr.clone(), b.node_addr.clone()]);
    std::fs::write(
        agent.dir.join("bundle.pem"),
        a.cli(&["bundle", "show"]).stdout,
    )
    .unwrap();
    agent.spawn(Some(&token));
    agent.wait_ready();
    let node = a.cli_json(&["agent", "list"])[0]["spiffe_id"]
        .as_str()
        .unwrap()
        .to_owned();

    step(2, "a workload with 6 s SVIDs (rotated every ~3 s)");
    let out = a.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/tenant/acme/ns/prod/sa/short",
        "--parent-id",
        &node,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
        "--x509-ttl",
        "6",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entry: serde_json::Value =
        serde_json::from_slice(&a.cli(&["entry", "list", "--output", "json"]).stdout).unwrap();
    let entry_id = entry[0]["id"].as_str().unwrap().to_owned();
    // Every answer the workload gets: (when asked, the SVID's expiry).
    let fetch = |agent: &AgentProcess| -> Option<i64> {
        let out = agent.svid_cli(&["fetch", "--output", "json"], None);
        out.status.success().then(|| {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v[0]["expires_at"].as_i64().unwrap()
        })
    };
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
        agent.log_text().contains("failed over to another CA"),
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
