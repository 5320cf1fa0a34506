//! Node agent and the SPIFFE Workload API, end to end: real `ward ca` and
//! `ward agent` processes, and clients we did not write (the Rust `spiffe`
//! crate and py-spiffe).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ward_spec::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ward_spec::proto::workload::{X509svidRequest, X509svidResponse};

fn agent_id(ca: &CaProcess) -> String {
    ca.first_agent()
}

/// Registers `id` under the (only) agent for this test process's uid, the
/// workload in these tests; returns the agent's ID.
fn register_self(ca: &CaProcess, id: &str) -> String {
    let parent = agent_id(ca);
    ca.register(id, &parent, &format!("unix:uid:{}", my_uid()));
    parent
}

/// Waits until `agent` serves this test process an SVID.
async fn first_fetch(agent: &AgentProcess) {
    eventually("first fetch", || async {
        let out = agent.svid_cli(&["fetch"], None);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await;
}

/// `agent` serves this test process an SVID for `id` now.
fn serves(agent: &AgentProcess, id: &str) {
    let out = agent.svid_cli(&["fetch", "--output", "json"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(id));
}

/// Our own raw client (no header added unless asked).
async fn raw_client(agent: &AgentProcess) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    SpiffeWorkloadApiClient::new(ward_spec::grpc::unix_channel(&agent.socket).await.unwrap())
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// Waits until `f` succeeds (entries reach the agent asynchronously).
async fn eventually<T, E: std::fmt::Debug, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(Instant::now() < deadline, "{what}: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn verify_with_openssl(dir: &std::path::Path, chain_pem: &str, bundle_pem: &str) -> (bool, String) {
    let chain = ward_spec::bundle::pem_to_ders("CERTIFICATE", chain_pem).unwrap();
    let roots = ward_spec::bundle::pem_to_ders("CERTIFICATE", bundle_pem).unwrap();
    openssl_verify(dir, &roots, &chain)
}

#[tokio::test]
async fn independent_clients_get_verifiable_svids_and_validate_each_others_jwts() {
    let ca = CaProcess::start(&[]);
    let agent = AgentProcess::start(&ca);
    let id = "spiffe://example.org/tenant/acme/ns/prod/sa/web";
    register_self(&ca, id);

    // The Rust `spiffe` crate.
    let client = eventually("spiffe crate X509-SVID", || async {
        let c = spiffe::WorkloadApiClient::connect_to(agent.endpoint()).await?;
        c.fetch_x509_svid().await.map(|s| (c, s))
    })
    .await;
    let (client, svid) = client;
    assert_eq!(svid.spiffe_id().to_string(), id);
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let bundle = bundles.get(&td).expect("bundle for our trust domain");
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let roots: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let (ok, msg) = openssl_verify(&agent.dir, &roots, &chain);
    assert!(
        ok,
        "spiffe crate SVID does not verify against its bundle: {msg}"
    );
    // The key it received is the key of its certificate.
    let key = rcgen::KeyPair::try_from(svid.private_key().as_ref()).expect("PKCS#8 key");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    // py-spiffe.
    let out_dir = agent.dir.join("py");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = py_client(&["x509", &agent.endpoint(), out_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "py-spiffe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
    let (ok, msg) = verify_with_openssl(
        &out_dir,
        &std::fs::read_to_string(out_dir.join("chain.pem")).unwrap(),
        &std::fs::read_to_string(out_dir.join("bundle.pem")).unwrap(),
    );
    assert!(
        ok,
        "py-spiffe SVID does not verify against its bundle: {msg}"
    );

    // A JWT fetched by one client validates through the other, both ways.
    let rust_jwt = client.fetch_jwt_token(["db"], None).await.unwrap();
    let out = py_client(&["validate", &agent.endpoint(), "db", &rust_jwt]);
    assert!(
        out.status.success(),
        "py-spiffe validate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
    let out = py_client(&["jwt", &agent.endpoint(), "db"]);
    assert!(
        out.status.success(),
        "py-spiffe jwt: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py_jwt = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let validated = client.validate_jwt_token("db", &py_jwt).await.unwrap();
    assert_eq!(validated.spiffe_id().to_string(), id);
    // The wrong audience does not validate.
    assert!(client.validate_jwt_token("other", &py_jwt).await.is_err());
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(jwt_bundles.get(&td).is_some());

    // `ward svid validate -` takes the token from standard input, where no
    // other user sees it; `-` with nothing there is refused.
    let validate = |stdin: &str, audience: &str| {
        use std::io::Write;
        let mut child = Command::new(ward_bin())
            .args(["svid", "validate", "--audience", audience, "-", "--socket"])
            .arg(agent.endpoint())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = validate(&format!("{py_jwt}\n"), "db");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(id));
    assert!(!validate(&py_jwt, "other").status.success());
    let out = validate("", "db");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token"));
}

#[tokio::test]
async fn a_caller_gets_only_what_its_uid_is_registered_for() {
    let ca = CaProcess::start(&[]);
    let agent = AgentProcess::start(&ca);
    let parent = agent_id(&ca);
    ca.register("spiffe://example.org/svc-a", &parent, "unix:uid:1001");
    ca.register("spiffe://example.org/svc-b", &parent, "unix:uid:1002");
    // A selector no caller's can equal is refused, not stored to never match.
    let out = ca.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/svc-c",
        "--parent-id",
        &parent,
        "--selector",
        "unix:uid:01003",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("leading zeros"),
        "{err}"
    );

    let fetch_as = |uid: u32| {
        let out = agent.svid_cli(&["fetch", "--output", "json"], Some(uid));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Each entry reaches the agent with a sync of its own: wait for each.
    let fetch_when_served = |uid: u32| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = fetch_as(uid);
            if r.0 || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let a = fetch_when_served(1001).await;
    assert!(a.0, "uid 1001 should get its SVID: {}", a.2);
    let ids: serde_json::Value = serde_json::from_str(&a.1).unwrap();
    assert_eq!(
        ids.as_array().unwrap().len(),
        1,
        "uid 1001 gets exactly its own identity"
    );
    assert_eq!(ids[0]["spiffe_id"], "spiffe://example.org/svc-a");
    let b = fetch_when_served(1002).await;
    assert!(b.0, "{}", b.2);
    assert!(b.1.contains("svc-b") && !b.1.contains("svc-a"), "{}", b.1);
    // uid 1003 has no entry at all.
    let none = fetch_as(1003);
    assert!(!none.0);
    assert!(none.2.contains("PermissionDenied"), "{}", none.2);
    // JWT-SVIDs follow the same rule.
    let jwt = agent.svid_cli(
        &[
            "jwt",
            "--audience",
            "x",
            "--spiffe-id",
            "spiffe://example.org/svc-b",
        ],
        Some(1001),
    );
    assert!(!jwt.status.success());
    assert!(String::from_utf8_lossy(&jwt.stderr).contains("PermissionDenied"));
    // A requested ID that is no SPIFFE ID is the caller's mistake.
    let jwt = agent.svid_cli(
        &["jwt", "--audience", "x", "--spiffe-id", "svc-a"],
        Some(1001),
    );
    let err = String::from_utf8_lossy(&jwt.stderr);
    assert!(!jwt.status.success());
    assert!(
        err.contains("InvalidArgument") && err.contains("invalid requested SPIFFE ID"),
        "{err}"
    );

    // No security header: InvalidArgument, before anything else.
    let mut raw = raw_client(&agent).await;
    let e = raw.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // With the header, this test process (no entry for its uid) is denied.
    let e = raw
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

/// Serves a connection to the agent on another socket (tests/py/handoff_relay.py):
/// `stay` keeps the process that opened it alive, `exit` hands it to a child
/// and exits. Returns the relay process (or its child, once `ready`).
fn handoff(agent: &AgentProcess, listen: &std::path::Path, mode: &str) -> std::process::Child {
    use std::io::BufRead;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/handoff_relay.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(&agent.socket)
        .arg(listen)
        .arg(mode)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "the relay did not start");
    child
}

/// The SPIFFE ID of the first X509-SVID the Workload API streams to `client`.
async fn first_svid_id(
    mut client: SpiffeWorkloadApiClient<tonic::transport::Channel>,
) -> Result<String, tonic::Status> {
    let (_, first) = x509_stream(&mut client).await?;
    Ok(first.svids[0].spiffe_id.clone())
}

/// A `FetchX509SVID` stream opened on `client`, and its first response.
async fn x509_stream(
    client: &mut SpiffeWorkloadApiClient<tonic::transport::Channel>,
) -> Result<(tonic::Streaming<X509svidResponse>, X509svidResponse), tonic::Status> {
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await?
        .into_inner();
    let first = stream.message().await?.expect("a response");
    Ok((stream, first))
}

/// An agent the CA evicts says so, once, as a refusal (not as the CA being
/// away), and keeps serving its cached SVIDs.
#[tokio::test]
async fn an_evicted_agent_says_the_ca_refuses_it_and_keeps_serving_its_cache() {
    let ca = CaProcess::start(&[]);
    let agent = AgentProcess::start(&ca);
    let parent = register_self(&ca, "spiffe://example.org/cached");
    let client = raw_client(&agent).await;
    eventually("an SVID", || first_svid_id(client.clone())).await;
    let out = ca.cli(&["agent", "evict", &parent]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = "the CA refuses this agent";
    let log = agent.wait_log(|l| l.contains(said));
    assert_eq!(log.matches(said).count(), 1, "{log}");
    assert!(log.contains("evicted"), "{log}");
    assert!(!log.contains("CA unreachable"), "{log}");
    assert_eq!(
        first_svid_id(client).await.unwrap(),
        "spiffe://example.org/cached"
    );
}

/// A process that opens a connection and exits, leaving it to another
/// (which may then wait for a privileged process to get the old pid): calls
/// on it are refused, though the same relay is served while its opener lives.
#[tokio::test]
async fn a_connection_whose_opener_has_exited_is_refused() {
    let ca = CaProcess::start(&[]);
    let agent = AgentProcess::start(&ca);
    register_self(&ca, "spiffe://example.org/relayed");
    let dir = tempfile::tempdir().unwrap();
    let fetch = first_svid_id;

    let staying = dir.path().join("stay.sock");
    let mut relay = handoff(&agent, &staying, "stay");
    let client =
        SpiffeWorkloadApiClient::new(ward_spec::grpc::unix_channel(&staying).await.unwrap());
    let id = eventually("an SVID through the relay", || fetch(client.clone())).await;
    assert_eq!(id, "spiffe://example.org/relayed");
    let _ = relay.kill();
    let _ = relay.wait();

    let handed = dir.path().join("handed.sock");
    let mut opener = handoff(&agent, &handed, "exit");
    opener.wait().unwrap();
    let client =
        SpiffeWorkloadApiClient::new(ward_spec::grpc::unix_channel(&handed).await.unwrap());
    let e = fetch(client).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("has exited"), "{}", e.message());
    // Gone by the agent's accept, or only by the call: either way, one line.
    let said = "refused a Workload API call: the process that opened the connection ha";
    let log = agent.wait_log(|l| l.contains(said));
    assert_eq!(log.matches(said).count(), 1, "{log}");
    assert!(log.contains(" exited"), "{log}");
}

/// Reads X509-SVID responses from a stream, recording (time seen, not_after, serial).
async fn next_svid(stream: &mut tonic::Streaming<X509svidResponse>) -> (i64, i64, String) {
    let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("a response within 30 s")
        .expect("stream error")
        .expect("stream ended");
    let chain = ward_spec::svid::split_der_chain(&resp.svids[0].x509_svid).unwrap();
    let (_, na) = ward_spec::svid::validity(&chain[0]).unwrap();
    (unix_now(), na, ward_spec::svid::serial(&chain[0]).unwrap())
}

#[tokio::test]
async fn with_a_10s_ttl_a_streaming_client_gets_a_fresh_svid_before_each_expiry() {
    // The node SVID is short too: the agent must renew it while it streams.
    let ca = CaProcess::start(&["--x509-svid-ttl", "10s", "--node-svid-ttl", "10s"]);
    let agent = AgentProcess::start(&ca);
    register_self(&ca, "spiffe://example.org/short");
    let mut stream = eventually("stream", || async {
        let mut c = raw_client(&agent).await;
        c.fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .map(|r| r.into_inner())
    })
    .await;
    // Seven SVIDs in a row: six rotations, each checked below.
    let mut seen = vec![next_svid(&mut stream).await];
    while seen.len() < 7 {
        let s = next_svid(&mut stream).await;
        let prev = seen.last().unwrap();
        assert_ne!(s.2, prev.2, "a new message carries a new SVID");
        assert!(
            s.0 < prev.1,
            "new SVID at {} arrived after the old one expired at {}",
            s.0,
            prev.1
        );
        assert!(s.1 > s.0, "served SVID is already expired");
        // Rotation at half-life (±10 %), not constant re-issuing.
        assert!(
            s.0 - prev.0 >= 3,
            "rotated after only {} s of a 10 s SVID",
            s.0 - prev.0
        );
        seen.push(s);
    }
    let renewals = agent
        .wait_log(|l| l.matches("renewed the node SVID").count() >= 3)
        .matches("renewed the node SVID")
        .count();
    assert!(
        renewals >= 3,
        "node SVID renewed {renewals} times in ~30 s with a 10 s TTL"
    );
    assert_eq!(
        ca.cli_json(&["agent", "list"]).as_array().unwrap().len(),
        1,
        "renewal, not re-attestation"
    );
}

#[tokio::test]
async fn with_the_ca_stopped_cached_svids_keep_flowing_and_rotation_resumes_after() {
    let mut ca = CaProcess::start(&["--x509-svid-ttl", "16s"]);
    let agent = AgentProcess::start(&ca);
    register_self(&ca, "spiffe://example.org/steady");
    let mut stream = eventually("stream", || async {
        let mut c = raw_client(&agent).await;
        c.fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .map(|r| r.into_inner())
    })
    .await;
    let first = next_svid(&mut stream).await;
    ca.kill9();
    // With the CA gone, new callers still get the cached SVID, never an expired one.
    let stop_until = Instant::now() + Duration::from_secs(5);
    let mut served = 0;
    while Instant::now() < stop_until {
        let out = agent.svid_cli(&["fetch", "--output", "json"], None);
        assert!(
            out.status.success(),
            "cached SVID not served during the outage: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            v[0]["expires_at"].as_i64().unwrap() > unix_now(),
            "served an expired SVID"
        );
        served += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(served >= 5);
    ca.spawn();
    // Rotation resumes: a newer SVID arrives on the open stream, still before the old one expires.
    let next = loop {
        let s = next_svid(&mut stream).await;
        assert!(s.1 > s.0, "served an expired SVID");
        if s.2 != first.2 {
            break s;
        }
    };
    assert!(next.1 > first.1);
    assert!(
        next.0 < first.1,
        "rotation came after the cached SVID expired"
    );
    let log = agent.wait_log(|l| l.contains("CA reachable again"));
    assert_eq!(
        log.matches("CA unreachable").count(),
        1,
        "outage logged once:\n{log}"
    );
    assert!(log.contains("CA reachable again"), "{log}");
}

#[tokio::test]
async fn a_restarted_agent_keeps_its_node_identity_without_a_new_token() {
    let ca = CaProcess::start(&[]);
    let mut agent = AgentProcess::start(&ca);
    let parent = register_self(&ca, "spiffe://example.org/restart");
    first_fetch(&agent).await;
    agent.kill9();
    // No join token this time, and a dead CA address listed first: the agent
    // fails over to the live one.
    agent.ca_addrs = vec![format!("127.0.0.1:{}", free_port()), ca.node_addr.clone()];
    agent.spawn(None);
    agent.wait_ready();
    let log = agent.wait_log(|l| {
        l.contains("failed over to another CA") && l.contains("resuming with the stored node SVID")
    });
    assert!(log.contains("failed over to another CA"), "{log}");
    let agents = ca.cli_json(&["agent", "list"]);
    assert_eq!(agents.as_array().unwrap().len(), 1, "no second attestation");
    assert_eq!(agents[0]["spiffe_id"], parent.as_str());
    assert!(log.contains("resuming with the stored node SVID"), "{log}");
    serves(&agent, "spiffe://example.org/restart");
}

/// An agent restarted while no CA answers has no SVID to serve (workload
/// keys are never stored): until its first sync it says it is not ready
/// (`Unavailable`, `/readyz` 503), not that no entry names the caller, and
/// serves as soon as the CA is back.
#[tokio::test]
async fn an_agent_restarted_while_the_ca_is_down_is_unavailable_until_it_syncs() {
    let mut ca = CaProcess::start(&[]);
    let mut agent = AgentProcess::start(&ca);
    register_self(&ca, "spiffe://example.org/restarted");
    first_fetch(&agent).await;
    agent.kill9();
    ca.kill9();
    agent.spawn(None);
    // Up (its health port answers), its first sync failed.
    agent.wait_log(|l| l.contains("CA unreachable"));
    let (status, body) = http_get(&agent.health_addr, "/readyz").expect("health port");
    assert_eq!(status, 503, "{body}");
    let out = agent.svid_cli(&["fetch"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served with no CA: {err}");
    assert!(err.contains("not synced with the CA"), "{err}");
    assert!(!err.contains("no registration entry"), "{err}");
    ca.spawn();
    agent.wait_ready();
    serves(&agent, "spiffe://example.org/restarted");
}

/// Two of a caller's entries share a hint: only the older one's SVIDs are
/// served, X.509 and JWT (as SPIRE does: a hint names one identity for the
/// workload to choose by); entries without a hint are all served.
#[tokio::test]
async fn of_two_entries_with_one_hint_only_the_older_is_served() {
    let ca = CaProcess::start(&[]);
    let agent = AgentProcess::start(&ca);
    let parent = agent_id(&ca);
    let selector = format!("unix:uid:{}", my_uid());
    let create = |id: &str, hint: &str| {
        ca.cli_json(&[
            "entry",
            "create",
            "--spiffe-id",
            id,
            "--parent-id",
            &parent,
            "--selector",
            &selector,
            "--hint",
            hint,
        ]);
    };
    create("spiffe://example.org/older", "db");
    // (Creation times are in seconds.)
    std::thread::sleep(Duration::from_millis(1100));
    create("spiffe://example.org/younger", "db");
    create("spiffe://example.org/plain", "");
    // Until the agent holds an SVID for each of the three entries.
    eventually("three SVIDs cached", || async {
        match http_get(&agent.health_addr, "/metrics") {
            Some((200, m)) if m.contains("ward_agent_cached_svids 3") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let ids = |args: &[&str]| {
        let out = agent.svid_cli(args, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let want = ["spiffe://example.org/older", "spiffe://example.org/plain"];
    assert_eq!(ids(&["fetch", "--output", "json"]), want);
    assert_eq!(ids(&["jwt", "--audience", "x", "--output", "json"]), want);
    // Not by its ID either.
    let out = agent.svid_cli(
        &[
            "jwt",
            "--audience",
            "x",
            "--spiffe-id",
            "spiffe://example.org/younger",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("PermissionDenied"),
        "{err}"
    );
}

/// Each renewal of the node SVID goes over a connection presenting the
/// newest one, so the CA sees it used (and holds it as the agent's current
/// SVID): the agent is never refused as holding a superseded one.
#[tokio::test]
async fn the_agent_renews_with_its_newest_node_svid_and_is_never_refused() {
    let ca = CaProcess::start(&["--node-svid-ttl", "3s"]);
    let _agent = AgentProcess::start(&ca);
    let serial = || {
        ca.cli_json(&["agent", "list"])[0]["serial_number"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let attested = serial();
    // Renewed twice: each renewed SVID was presented (and made current)
    // before the next renewal, which is what allows that one.
    assert!(ca.wait_audit_lines("node_svid_renewed", 2) >= 2);
    assert!(ca.wait_audit_lines("node_svid_in_use", 2) >= 2);
    assert_ne!(
        serial(),
        attested,
        "the CA never saw a renewed node SVID presented"
    );
    assert_eq!(ca.audit_lines("is not this agent's current one"), 0);
}

#[tokio::test]
async fn an_agent_whose_stored_node_svid_expired_asks_for_a_new_token() {
    let ca = CaProcess::start(&["--node-svid-ttl", "3s"]);
    let mut agent = AgentProcess::start(&ca);
    agent.kill9();
    std::thread::sleep(Duration::from_secs(4));
    agent.spawn(None);
    let status = agent.child.as_mut().unwrap().wait().unwrap();
    assert!(!status.success());
    let log = agent.wait_log(|l| l.contains("expired") && l.contains("join token"));
    assert!(
        log.contains("expired") && log.contains("join token"),
        "{log}"
    );
    // Without any stored identity and no token, the message says what to do.
    let out = Command::new(ward_bin())
        .args(["agent", "run", "--trust-domain", TD, "--data-dir"])
        .arg(agent.dir.join("empty"))
        .arg("--trust-bundle")
        .arg(agent.dir.join("bundle.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--join-token"));
}

/// A stored node identity whose key is not its certificate's (a crash of
/// an older agent between its two files could leave one): without a token
/// the agent says to use one; with one, it sets the file aside and attests.
#[tokio::test]
async fn a_corrupt_stored_identity_is_set_aside_by_a_new_join_token() {
    let ca = CaProcess::start(&[]);
    let mut agent = AgentProcess::start(&ca);
    agent.kill9();
    // Only the one-file identity (the older agents' pair is removed).
    for f in ["node.key", "node.crt"] {
        std::fs::remove_file(agent.dir.join("data").join(f)).unwrap();
    }
    let node = agent.dir.join("data/node.pem");
    let pem = std::fs::read_to_string(&node).unwrap();
    let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let cert_start = pem.find("-----BEGIN CERTIFICATE-----").unwrap();
    std::fs::write(&node, format!("{other}{}", &pem[cert_start..])).unwrap();

    agent.spawn(None);
    let status = agent.child.as_mut().unwrap().wait().unwrap();
    assert!(!status.success());
    let log = agent.wait_log(|l| l.contains("do not go together"));
    assert!(
        log.contains("is corrupt") && log.contains("--join-token"),
        "{log}"
    );

    agent.spawn(Some(&ca.join_token()));
    agent.wait_ready();
    let log = agent.wait_log(|l| l.contains("attested to the CA") && l.contains("moved it aside"));
    assert!(log.contains("moved it aside"), "{log}");
    let aside: Vec<_> = std::fs::read_dir(agent.dir.join("data"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("node.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept aside");
    assert_eq!(ca.cli_json(&["agent", "list"]).as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_new_entry_reaches_the_agent_in_under_a_second() {
    let ca = CaProcess::start(&[]);
    let agent = AgentProcess::start(&ca);
    let parent = agent_id(&ca);
    // Let the first sync settle, so only the CA's push can beat the 5 s interval.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = metric_value(&agent.health_addr, "ward_agent_cached_svids");
    let start = Instant::now();
    ca.register("spiffe://example.org/fresh", &parent, "unix:uid:4242");
    let created = start.elapsed();
    loop {
        if metric_value(&agent.health_addr, "ward_agent_cached_svids") > before {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "entry not synced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reached = start.elapsed() - created;
    assert!(
        reached < Duration::from_secs(1),
        "new entry reached the agent (and was signed) after {reached:?}"
    );
}

#[tokio::test]
async fn an_agent_further_behind_than_the_cas_retention_of_deletions_syncs_every_entry_again() {
    // The CA keeps an entry's deletion for 1 s, then only the entries that exist.
    let ca = CaProcess::start(&["--entry-change-retention", "1s"]);
    let agent = AgentProcess::start(&ca);
    let parent = agent_id(&ca);
    let uid = format!("unix:uid:{}", my_uid());
    ca.register("spiffe://example.org/stays", &parent, &uid);
    let goes = ca.register("spiffe://example.org/goes", &parent, &uid);
    let served = || {
        let out = agent.svid_cli(&["fetch", "--output", "json"], None);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    eventually("both entries served", || async {
        let s = served();
        match s.contains("example.org/stays") && s.contains("example.org/goes") {
            true => Ok(()),
            false => Err(s),
        }
    })
    .await;

    // The agent hears nothing while one entry is deleted and the CA forgets
    // the deletion.
    let signal = |sig: &str| {
        let pid = agent.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    let out = ca.cli(&["entry", "delete", &goes]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pruned = |log: &str| {
        log.lines()
            .any(|l| l.contains("pruned entry changes") && l.contains("deletions=1"))
    };
    let log = ca.wait_log(pruned);
    signal("-CONT");
    assert!(pruned(&log), "{log}");

    // Its next sync starts over and drops the deleted entry.
    eventually("the deleted entry dropped", || async {
        let s = served();
        match s.contains("example.org/stays") && !s.contains("example.org/goes") {
            true => Ok(()),
            false => Err(s),
        }
    })
    .await;
    let log = agent.wait_log(|l| l.contains("synced every entry again"));
    assert!(
        log.contains("syncing every entry again") && log.contains("dropped=1"),
        "{log}"
    );
}

/// The `sub` of a JWT-SVID (its signature is checked elsewhere).
fn jwt_subject(token: &str) -> String {
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.insecure_disable_signature_validation();
    v.validate_aud = false;
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(&[]),
        &v,
    )
    .unwrap()
    .claims;
    claims["sub"].as_str().unwrap().to_owned()
}

/// An entry given another SPIFFE ID: the next JWT-SVID for it carries the
/// new ID, not the token the agent cached for the old one (which it would
/// otherwise serve until half its life had passed).
#[tokio::test]
async fn an_entry_given_another_spiffe_id_gets_jwt_svids_for_the_new_one() {
    use ward_spec::proto::workload::JwtsvidRequest;
    let ca = CaProcess::start(&[]);
    let agent = AgentProcess::start(&ca);
    let parent = agent_id(&ca);
    // This test process is the workload.
    let (old, new) = (
        "spiffe://example.org/old-name",
        "spiffe://example.org/new-name",
    );
    let uid = format!("unix:uid:{}", my_uid());
    let entry = ca.register(old, &parent, &uid);
    let client = raw_client(&agent).await;
    let fetch = move || {
        let mut client = client.clone();
        async move {
            let svids = client
                .fetch_jwtsvid(with_header(JwtsvidRequest {
                    audience: vec!["db".into()],
                    spiffe_id: String::new(),
                }))
                .await?
                .into_inner()
                .svids;
            Ok::<_, tonic::Status>(svids.into_iter().next().expect("one JWT-SVID"))
        }
    };
    let first = eventually("a JWT-SVID for the entry", &fetch).await;
    assert_eq!(
        (first.spiffe_id.as_str(), jwt_subject(&first.svid).as_str()),
        (old, old)
    );

    ca.cli_json(&[
        "entry",
        "update",
        &entry,
        "--spiffe-id",
        new,
        "--parent-id",
        &parent,
        "--selector",
        &uid,
    ]);
    let renamed = eventually("the entry's new SPIFFE ID at the agent", || {
        let f = fetch();
        async move {
            let s = f.await?;
            if s.spiffe_id == new {
                Ok(s)
            } else {
                Err(tonic::Status::unavailable(format!("still {}", s.spiffe_id)))
            }
        }
    })
    .await;
    assert_eq!(
        jwt_subject(&renamed.svid),
        new,
        "a token for the old ID was served"
    );
    assert_ne!(renamed.svid, first.svid);
}

/// The agent reads and hashes a caller's executable only while an entry
/// selects by one (`unix:sha256`). A stream opened before the first such
/// entry ends with `Unavailable` when it comes (clients open another), and
/// the caller, attested anew, gets the SVID the hash selects.
#[tokio::test]
async fn a_stream_opened_before_any_hash_selector_is_attested_anew_when_one_comes() {
    let ca = CaProcess::start(&[]);
    let agent = AgentProcess::start(&ca);
    let parent = register_self(&ca, "spiffe://example.org/by-uid");
    first_fetch(&agent).await;
    let hashed = || metric_value(&agent.health_addr, "ward_agent_executables_hashed_total");
    let (mut stream, _) = x509_stream(&mut raw_client(&agent).await).await.unwrap();
    assert_eq!(
        hashed(),
        0.0,
        "an executable was hashed with no entry asking"
    );

    let exe = std::env::current_exe().unwrap();
    let sum = Command::new("sha256sum").arg(&exe).output().unwrap();
    let hash = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    const BY_HASH: &str = "spiffe://example.org/by-hash";
    ca.register(BY_HASH, &parent, &format!("unix:sha256:{hash}"));
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream was not ended when a hash selector came");
    assert_eq!(ended.unwrap_err().code(), tonic::Code::Unavailable);

    let ids = eventually("the SVID the hash selects", || async {
        let (_, first) = x509_stream(&mut raw_client(&agent).await).await?;
        let ids: Vec<String> = first.svids.into_iter().map(|s| s.spiffe_id).collect();
        if ids.iter().any(|id| id == BY_HASH) {
            Ok(ids)
        } else {
            Err(tonic::Status::not_found(format!("{ids:?}")))
        }
    })
    .await;
    assert!(
        ids.contains(&"spiffe://example.org/by-uid".to_string()),
        "{ids:?}"
    );
    assert!(hashed() >= 1.0);
}

/// One connection has at most 100 streams open at the agent: the 101st
/// waits until one ends.
#[tokio::test]
async fn a_connection_holds_at_most_100_streams() {
    let ca = CaProcess::start(&[]);
    let agent = AgentProcess::start(&ca);
    register_self(&ca, "spiffe://example.org/many");
    first_fetch(&agent).await;
    let mut client = raw_client(&agent).await;
    let mut open = Vec::new();
    for _ in 0..100 {
        open.push(x509_stream(&mut client).await.unwrap().0);
    }
    let mut more = client.clone();
    let next = tokio::spawn(async move { x509_stream(&mut more).await.unwrap().0 });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!next.is_finished(), "a 101st stream was served");
    drop(open.pop());
    tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("the 101st stream was not served once one ended")
        .unwrap();
}
