//! Node API behaviour an agent relies on: entry sync by revision, JWT-SVIDs
//! published keys can verify, TLS 1.3 only, metrics, upstream roots.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rcgen::KeyPair;
use tonic::Code;
use ward_spec::proto::node::v1::{FetchBundleRequest, MintJwtSvidRequest, SyncEntriesRequest};

on_both_backends! {
    async fn entry_sync_is_incremental_by_revision_and_reports_updates_and_deletions() {
        let ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let other = attest(&ca).await;
        let parent = node.id.to_string();
        let e1 = ca.create_entry("spiffe://example.org/one", &parent);
        let e2 = ca.create_entry("spiffe://example.org/two", &parent);
        ca.create_entry("spiffe://example.org/elsewhere", &other.id.to_string());

        let full = node
            .client
            .sync_entries(SyncEntriesRequest {
                since_revision: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut ids: Vec<_> = full.entries.iter().map(|e| e.id.clone()).collect();
        ids.sort();
        let mut want = vec![e1.clone(), e2.clone()];
        want.sort();
        assert_eq!(ids, want, "only the caller's entries");
        let rev = full.revision;

        let none = node
            .client
            .sync_entries(SyncEntriesRequest {
                since_revision: rev,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(none.entries.is_empty() && none.deleted_entry_ids.is_empty());

        // An update through the CLI and a deletion show up in the next incremental sync.
        let out = ca.cli(&[
            "entry",
            "update",
            &e1,
            "--spiffe-id",
            "spiffe://example.org/one-renamed",
            "--parent-id",
            &parent,
            "--selector",
            "unix:uid:7",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = ca.cli(&["entry", "delete", &e2]);
        assert!(out.status.success());
        let delta = node
            .client
            .sync_entries(SyncEntriesRequest {
                since_revision: rev,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(delta.entries.len(), 1);
        assert_eq!(
            delta.entries[0].spiffe_id,
            "spiffe://example.org/one-renamed"
        );
        assert_eq!(delta.entries[0].selectors[0].value, "uid:7");
        assert_eq!(delta.deleted_entry_ids, vec![e2]);
        assert!(delta.revision > rev);
        let shown = ca.cli_json(&["entry", "show", &e1]);
        assert_eq!(
            shown["revision"].as_u64().unwrap(),
            delta.entries[0].revision
        );
    }
}

on_both_backends! {
    async fn jwt_svid_is_es256_and_verifies_with_the_key_the_bundle_publishes() {
        let ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let entry = ca.create_entry("spiffe://example.org/api", &node.id.to_string());
        let r = node
            .client
            .mint_jwt_svid(MintJwtSvidRequest {
                entry_id: entry.clone(),
                audience: vec!["db".into()],
                spiffe_id: "spiffe://example.org/api".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let header = jsonwebtoken::decode_header(&r.token).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
        let kid = header.kid.expect("kid names the signing key");

        let bundle = node
            .client
            .fetch_bundle(FetchBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        let bundle =
            ward_spec::TrustBundle::from_jwks(ward_spec::TrustDomain::new(TD).unwrap(), &bundle.jwks)
                .unwrap();
        let key = bundle
            .jwt_authority(&kid)
            .expect("signing key is in the bundle");
        let ward_spec::bundle::JwtPublicKey::Ec { x, y, .. } = &key.key else {
            panic!("EC key expected")
        };
        let dk = jsonwebtoken::DecodingKey::from_ec_components(x, y).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&["db"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(&r.token, &dk, &v).unwrap();
        assert_eq!(data.claims["sub"], "spiffe://example.org/api");
        assert_eq!(data.claims["exp"].as_i64().unwrap(), r.expires_at);
        // A wrong audience does not validate.
        let mut wrong = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        wrong.set_audience(&["other"]);
        assert!(jsonwebtoken::decode::<serde_json::Value>(&r.token, &dk, &wrong).is_err());

        // No audience, or an entry of another agent: refused.
        let e = node
            .client
            .mint_jwt_svid(MintJwtSvidRequest {
                entry_id: entry.clone(),
                audience: vec![],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let mut stranger = attest(&ca).await;
        let foreign = ca.create_entry("spiffe://example.org/secret", &node.id.to_string());
        let e = stranger
            .client
            .mint_jwt_svid(MintJwtSvidRequest {
                entry_id: foreign,
                audience: vec!["x".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);

        // An agent that knows the entry by another SPIFFE ID (it has not
        // synced a rename yet): refused, naming both.
        let e = node
            .client
            .mint_jwt_svid(MintJwtSvidRequest {
                entry_id: entry,
                audience: vec!["db".into()],
                spiffe_id: "spiffe://example.org/old-name".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(
            e.message().contains("asks for spiffe://example.org/old-name")
                && e.message().contains("grants spiffe://example.org/api"),
            "{}",
            e.message()
        );
    }
}

on_both_backends! {
    async fn node_api_speaks_only_tls_1_3_and_admin_socket_is_private() {
        let ca = CaProcess::start(&[]);
        let mode = std::fs::metadata(ca.socket()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let try_version = |flag: &str| {
            Command::new("openssl")
                .args(["s_client", "-connect", &ca.node_addr, flag])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        };
        let v12 = try_version("-tls1_2");
        assert!(!v12.status.success(), "TLS 1.2 must be refused");
        let v13 = try_version("-tls1_3");
        let text = String::from_utf8_lossy(&v13.stdout);
        assert!(text.contains("TLSv1.3"), "{text}");
        // The CA presents its own SVID.
        assert!(
            text.contains("spiffe://example.org/ward/ca")
                || {
                    let certs = Command::new("sh").arg("-c").arg(format!(
                "echo | openssl s_client -connect {} -tls1_3 2>/dev/null | openssl x509 -noout -ext subjectAltName", ca.node_addr)).output().unwrap();
                    String::from_utf8_lossy(&certs.stdout).contains("URI:spiffe://example.org/ward/ca")
                }
        );
    }
}

on_both_backends! {
    async fn metrics_count_issuances_refusals_and_admin_changes() {
        let ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let entry = ca.create_entry("spiffe://example.org/m", &node.id.to_string());
        node.sign(&entry, csr(&KeyPair::generate().unwrap(), &[]))
            .await
            .unwrap();
        let _ = node
            .sign("no-such-entry", csr(&KeyPair::generate().unwrap(), &[]))
            .await;
        let (code, body) = http_get(&ca.health_addr, "/metrics").unwrap();
        assert_eq!(code, 200);
        assert!(
            body.contains("ward_ca_svids_issued_total{kind=\"x509\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("ward_ca_refusals_total{method=\"sign\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("ward_ca_attestations_total{outcome=\"ok\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("ward_ca_admin_changes_total{operation=\"create_entry\"} 1"),
            "{body}"
        );
        assert_eq!(http_get(&ca.health_addr, "/readyz").unwrap().0, 200);
    }
}

on_both_backends! {
    async fn upstream_root_from_files_signs_the_intermediates_and_is_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = upstream_root(dir.path());
        let ca = CaProcess::start(&[
            "--upstream-cert",
            &cert,
            "--upstream-key",
            &key,
        ]);
        let up_der =
            ward_spec::bundle::pem_to_ders("CERTIFICATE", &std::fs::read_to_string(&cert).unwrap())
                .unwrap();
        assert_eq!(
            ca.bundle().x509_authorities,
            up_der,
            "the bundle is exactly the upstream root"
        );
        let mut node = attest(&ca).await;
        let entry = ca.create_entry("spiffe://example.org/up", &node.id.to_string());
        let chain = node
            .sign(&entry, csr(&KeyPair::generate().unwrap(), &[]))
            .await
            .unwrap();
        let (ok, msg) = openssl_verify(&ca.dir, &up_der, &chain);
        assert!(ok, "{msg}");
        assert!(
            !ca.data_dir().join("keys/root-0.key").exists(),
            "no self-signed root is minted"
        );
    }
}

/// The code `stream` ends with, within 15 s of waiting for `what`.
async fn ending(
    stream: &mut tonic::Streaming<ward_spec::proto::node::v1::ChangeNotice>,
    what: &str,
) -> tonic::Code {
    let ended = tokio::time::timeout(std::time::Duration::from_secs(15), stream.message())
        .await
        .unwrap_or_else(|_| panic!("the stream outlived {what}"));
    ended.expect_err("the stream ended without an error").code()
}

/// `node`'s change stream, its first notice taken.
async fn watching(node: &mut Node) -> tonic::Streaming<ward_spec::proto::node::v1::ChangeNotice> {
    let mut stream = node
        .client
        .watch_changes(ward_spec::proto::node::v1::WatchChangesRequest {})
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    stream
}

// A change stream ends when the node SVID it was opened with expires
// (Unauthenticated), and when its agent is evicted (PermissionDenied, at
// once): neither keeps hearing of changes on a connection made while it
// could. The agent's renewal (the stream's node SVID superseded) does not
// end it, nor is it logged as a refusal.
on_both_backends! {
    async fn a_change_stream_ends_with_its_node_svid_and_with_eviction() {
        let ca = CaProcess::start(&["--node-svid-ttl", "4s"]);
        let mut node = attest(&ca).await;
        let mut stream = watching(&mut node).await;
        assert_eq!(ending(&mut stream, "its node SVID").await, tonic::Code::Unauthenticated);

        let ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let mut stream = watching(&mut node).await;
        let out = ca.cli(&["agent", "evict", &node.id.to_string()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(ending(&mut stream, "its agent's eviction").await, tonic::Code::PermissionDenied);

        // A renewal, its SVID in use on another connection.
        let ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let mut stream = watching(&mut node).await;
        let key = KeyPair::generate().unwrap();
        let renewed = node
            .client
            .renew_node_svid(ward_spec::proto::node::v1::RenewNodeSvidRequest {
                csr: csr(&key, &[]),
            })
            .await
            .unwrap()
            .into_inner()
            .svid_chain;
        node.resolver.set(&renewed, key.serialized_der()).unwrap();
        node.reconnect(&ca).await.unwrap();
        node.client
            .sync_entries(SyncEntriesRequest::default())
            .await
            .unwrap();
        // (Longer than a stream once took to look at its SVID again.)
        tokio::time::sleep(std::time::Duration::from_secs(11)).await;
        ca.create_entry("spiffe://example.org/after-renewal", &node.id.to_string());
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), stream.message())
            .await
            .expect("no notice on the stream after the renewal");
        assert!(next.unwrap().is_some());
        assert_eq!(ca.audit_lines("refused"), 0, "{}", ca.log_text());
    }
}

/// An agent holds at most 4 change streams: a fifth ends its oldest
/// (`ResourceExhausted`), and the four newest still hear of changes. One
/// it closes makes room: the next one ends none.
#[tokio::test]
async fn an_agent_holds_at_most_four_change_streams_and_a_new_one_ends_the_oldest() {
    let ca = CaProcess::start(&[]);
    let mut node = attest(&ca).await;
    let mut oldest = watching(&mut node).await;
    let mut newer = Vec::new();
    for _ in 0..4 {
        newer.push(watching(&mut node).await);
    }
    assert_eq!(
        ending(&mut oldest, "four newer streams").await,
        tonic::Code::ResourceExhausted
    );
    let open = || metric_value(&ca.health_addr, "ward_ca_change_streams");
    assert_eq!(open(), 4.0);
    drop(newer.remove(1));
    // (The CA hears of the reset, and ends that stream, on its own time.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while open() != 3.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(open(), 3.0, "the dropped stream is still open at the CA");
    newer.push(watching(&mut node).await);
    ca.create_entry("spiffe://example.org/w", &node.id.to_string());
    for (i, stream) in newer.iter_mut().enumerate() {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap_or_else(|_| panic!("stream {i}: no notice of the new entry"));
        assert!(next.unwrap().is_some(), "stream {i} ended");
    }
}

on_both_backends! {
    async fn watch_changes_pushes_a_notice_for_a_new_entry_within_a_second() {
        use ward_spec::proto::node::v1::WatchChangesRequest;
        let ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let mut stream = node
            .client
            .watch_changes(WatchChangesRequest {})
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        // Another agent's entry is not this agent's news.
        ca.create_entry(
            "spiffe://example.org/elsewhere",
            "spiffe://example.org/ward/agent/join_token/other",
        );
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(500), stream.message())
                .await
                .is_err(),
            "a notice for an entry under another agent"
        );
        let start = Instant::now();
        ca.create_entry("spiffe://example.org/pushed", &node.id.to_string());
        let next = tokio::time::timeout(std::time::Duration::from_secs(1), stream.message())
            .await
            .expect("notice within 1 s")
            .unwrap()
            .unwrap();
        assert!(next.entry_revision > first.entry_revision);
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        let delta = node
            .client
            .sync_entries(SyncEntriesRequest {
                since_revision: first.entry_revision,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(delta.entries[0].spiffe_id, "spiffe://example.org/pushed");
        // A forced rotation is pushed too.
        ca.cli_json(&["ca", "rotate"]);
        let rot = tokio::time::timeout(std::time::Duration::from_secs(2), stream.message())
            .await
            .expect("bundle notice")
            .unwrap()
            .unwrap();
        assert!(rot.bundle_sequence > first.bundle_sequence);
    }
}

/// An entry's SVID lifetimes are bounded (ten years): a tenant admin's
/// absurd TTL is refused with a clear error (it used to be stored, and every
/// signing batch its entry was in then failed, for every workload of that
/// node), and the CA goes on serving. A join token's lifetime is bounded too.
#[test]
fn entry_lifetimes_over_ten_years_are_refused_and_the_ca_goes_on() {
    let ca = CaProcess::start(&[]);
    let parent = "spiffe://example.org/ward/agent/join_token/some-node";
    for flag in ["--x509-ttl", "--jwt-ttl"] {
        let out = ca.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/forever",
            "--parent-id",
            parent,
            "--selector",
            "unix:uid:7",
            flag,
            "9223372036854775807",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}: accepted");
        let name = flag.trim_start_matches("--").replace('-', "_");
        assert!(
            stderr.contains(&format!("{name} 9223372036854775807 is over")),
            "{flag}: {stderr}"
        );
    }
    // Join tokens are bounded too (a year).
    let out = ca.cli(&["token", "create", "--ttl", "400d"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a 400-day join token was accepted");
    assert!(stderr.contains("ttl 34560000 is over"), "{stderr}");
    // Ten years exactly is fine, and the CA answers as before.
    let out = ca.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/decade",
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:7",
        "--x509-ttl",
        "315360000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Anyone who can reach the node API can open a TLS connection without a
/// client certificate (agents attest over one): the CA holds at most
/// `--max-unauthenticated-connections` of them (more are closed right after
/// their handshake, and it says so once) and closes each after
/// `--unauthenticated-timeout`, while agents with node SVIDs are served on;
/// an agent turned away at the limit tries again until it gets in.
#[tokio::test(flavor = "multi_thread")]
async fn connections_without_a_certificate_are_limited_in_number_and_time() {
    let ca = CaProcess::start(&[
        "--unauthenticated-timeout",
        "6s",
        "--max-unauthenticated-connections",
        "3",
    ]);
    let mut node = attest(&ca).await;
    let open = || metric_value(&ca.health_addr, "ward_ca_node_unauthenticated_connections");
    let until_open = |n: f64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while open() != n {
            assert!(Instant::now() < deadline, "{what}: {} open", open());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The attestation's own connection goes once its client is dropped.
    until_open(0.0, "the attestation's connection stayed open");

    let mut held: Vec<_> = (0..3).map(|_| anonymous_tls(&ca)).collect();
    until_open(3.0, "three connections were not admitted");
    let mut fourth = anonymous_tls(&ca);
    assert!(
        closed_within(&mut fourth, Duration::from_secs(2)),
        "a connection beyond the limit was kept"
    );
    for c in &mut held {
        assert!(
            !closed_within(c, Duration::from_millis(200)),
            "a connection within the limit was closed early"
        );
    }
    // Agents are served meanwhile: a connection with a certificate does not
    // count.
    node.client
        .fetch_bundle(FetchBundleRequest {})
        .await
        .expect("an agent was refused while the limit was reached");
    // An agent starting now is turned away, tries again, and is in once the
    // held connections have had their time.
    let _agent = AgentProcess::start(&ca);
    for c in &mut held {
        assert!(
            closed_within(c, Duration::from_secs(10)),
            "a connection without a certificate outlived its timeout"
        );
    }
    assert_eq!(ca.cli_json(&["agent", "list"]).as_array().unwrap().len(), 2);
    let closed = |reason: &str| {
        metric_value(
            &ca.health_addr,
            &format!("ward_ca_node_connections_closed_total{{reason=\"{reason}\"}}"),
        )
    };
    // The fourth, and the new agent's first attempt at least.
    assert!(closed("unauthenticated_limit") >= 2.0);
    // The held ones were closed for their time, not for anything else.
    assert_eq!(closed("unauthenticated_timeout"), 3.0);
    let log = ca.log_text();
    assert_eq!(
        log.matches("node API connections without a client certificate are at their limit")
            .count(),
        1,
        "the limit is logged once: {log}"
    );
}
