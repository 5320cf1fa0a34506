//! Control plane, end to end: a real `ward ca serve` process, the `ward` CLI,
//! the node API over mutual TLS, and `openssl` as an independent verifier.

mod common;

use std::process::Command;

use common::*;
use rcgen::KeyPair;
use tonic::Code;
use ward_spec::proto::node::v1::{
    BatchSignX509SvidRequest, FetchBundleRequest, MintJwtSvidRequest, RenewNodeSvidRequest,
    SignX509SvidRequest, WatchChangesRequest,
};

on_both_backends! {
    async fn issued_leaf_verifies_with_openssl_against_the_cli_bundle_and_shows_the_svid_profile() {
        let ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let entry = ca.create_entry(
            "spiffe://example.org/tenant/acme/ns/prod/sa/web",
            &node.id.to_string(),
        );
        let key = KeyPair::generate().unwrap();
        let chain = node
            .sign(
                &entry,
                csr(&key, &["spiffe://example.org/tenant/acme/ns/prod/sa/web"]),
            )
            .await
            .unwrap();
        assert_eq!(chain.len(), 2, "leaf + intermediate");
        ward_spec::svid::check_leaf(&chain[0]).unwrap();
        ward_spec::svid::check_signing_cert(&chain[1]).unwrap();

        // The PEM bundle as an operator gets it from the CLI.
        let out = ca.cli(&["bundle", "show"]);
        assert!(out.status.success());
        let roots =
            ward_spec::bundle::pem_to_ders("CERTIFICATE", &String::from_utf8(out.stdout).unwrap())
                .unwrap();
        assert!(!roots.is_empty());
        let (ok, msg) = openssl_verify(&ca.dir, &roots, &chain);
        assert!(ok, "openssl verify failed: {msg}");
        assert!(msg.contains("leaf.pem: OK"), "{msg}");
        // The same PEM, in JSON when asked.
        let shown = ca.cli_json(&["bundle", "show"]);
        let pem = shown["x509_authorities_pem"].as_str().unwrap();
        assert_eq!(ward_spec::bundle::pem_to_ders("CERTIFICATE", pem).unwrap(), roots);
        assert_eq!(shown["trust_domain"], "example.org");
        // A join token TTL under a second (which the CA would read as its
        // 10 min default) is refused, not rounded.
        for ttl in ["500ms", "0s"] {
            let out = ca.cli(&["token", "create", "--ttl", ttl]);
            assert!(!out.status.success(), "{ttl} accepted");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("at least 1 s"), "{err}");
        }

        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(ca.dir.join("leaf.pem"))
            .output()
            .unwrap();
        let text = String::from_utf8(text.stdout).unwrap();
        assert_eq!(text.matches("URI:").count(), 1, "{text}");
        assert!(
            text.contains("URI:spiffe://example.org/tenant/acme/ns/prod/sa/web"),
            "{text}"
        );
        assert!(text.contains("CA:FALSE"), "{text}");
        assert!(text.contains("X509v3 Key Usage: critical"), "{text}");
        assert!(text.contains("Digital Signature"), "{text}");
        assert!(!text.contains("Certificate Sign"), "{text}");
        assert!(
            text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
            "{text}"
        );
        // The node SVID fits the profile and verifies too.
        let (ok, msg) = openssl_verify(&ca.dir, &roots, &node.chain);
        assert!(ok, "node SVID: {msg}");
        assert_eq!(ca.wait_audit_lines("x509_svid_issued", 1), 1);
    }
}

on_both_backends! {
    async fn agent_cannot_obtain_an_svid_for_an_entry_parented_to_another_agent() {
        let ca = CaProcess::start(&[]);
        let mut a = attest(&ca).await;
        let mut b = attest(&ca).await;
        let entry = ca.create_entry("spiffe://example.org/db", &a.id.to_string());
        let key = KeyPair::generate().unwrap();
        let err = b
            .sign(&entry, csr(&key, &["spiffe://example.org/db"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("not parented"), "{}", err.message());
        // The rightful parent still gets it.
        a.sign(&entry, csr(&key, &["spiffe://example.org/db"]))
            .await
            .unwrap();
        // A CSR asking for another ID than the entry grants is refused too.
        let other = a
            .sign(&entry, csr(&key, &["spiffe://example.org/admin"]))
            .await
            .unwrap_err();
        assert_eq!(other.code(), Code::PermissionDenied);
        let refused = |l: &str| {
            count_audit_lines(l, "\"refused\"") + count_audit_lines(l, "event=refused")
        };
        let log = ca.wait_log(|l| refused(l) >= 2);
        assert!(refused(&log) >= 2, "{log}");
    }
}

on_both_backends! {
    async fn bad_csrs_are_refused_with_a_clear_status_and_an_audit_line() {
        let ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let entry = ca.create_entry("spiffe://example.org/web", &node.id.to_string());
        let key = KeyPair::generate().unwrap();

        let foreign = node
            .sign(&entry, csr(&key, &["spiffe://evil.org/web"]))
            .await
            .unwrap_err();
        assert_eq!(foreign.code(), Code::PermissionDenied);
        assert!(
            foreign.message().contains("outside trust domain"),
            "{}",
            foreign.message()
        );

        let two = node
            .sign(
                &entry,
                csr(
                    &key,
                    &["spiffe://example.org/web", "spiffe://example.org/x"],
                ),
            )
            .await
            .unwrap_err();
        assert_eq!(two.code(), Code::InvalidArgument);
        assert!(two.message().contains("2 URI SANs"), "{}", two.message());

        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org/web".try_into().unwrap(),
        )];
        let ca_csr = p.serialize_request(&key).unwrap().der().to_vec();
        let asks_ca = node.sign(&entry, ca_csr).await.unwrap_err();
        assert_eq!(asks_ca.code(), Code::InvalidArgument);
        assert!(
            asks_ca.message().contains("CA certificate"),
            "{}",
            asks_ca.message()
        );

        let mut bad_sig = csr(&key, &["spiffe://example.org/web"]);
        let n = bad_sig.len();
        bad_sig[n - 4] ^= 0xff;
        let sig = node.sign(&entry, bad_sig).await.unwrap_err();
        assert_eq!(sig.code(), Code::InvalidArgument);
        assert!(sig.message().contains("signature"), "{}", sig.message());

        let garbage = node
            .sign(&entry, b"garbage bytes, not a CSR".to_vec())
            .await
            .unwrap_err();
        assert_eq!(garbage.code(), Code::InvalidArgument);
        assert!(
            garbage.message().contains("not a DER PKCS#10"),
            "{}",
            garbage.message()
        );

        assert_eq!(
            ca.wait_audit_lines("refused a request", 5),
            5,
            "{}",
            ca.log_text()
        );
        // Batch signing reports each refusal in place and still signs the good one.
        let r = node
            .client
            .batch_sign_x509_svid(BatchSignX509SvidRequest {
                requests: vec![
                    SignX509SvidRequest {
                        entry_id: entry.clone(),
                        csr: b"junk".to_vec(),
                    },
                    SignX509SvidRequest {
                        entry_id: entry.clone(),
                        csr: csr(&key, &["spiffe://example.org/web"]),
                    },
                ],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.results[0].code, Code::InvalidArgument as i32);
        assert_eq!(r.results[1].code, 0);
        assert_eq!(r.results[1].svid_chain.len(), 2);

        // An entry ID no entry can have (here 1 MiB) is refused as such,
        // and neither its answer nor the log repeats it whole.
        let huge = "x".repeat(1 << 20);
        let e = node.sign(&huge, csr(&key, &[])).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("entry id must be"), "{}", &e.message()[..200.min(e.message().len())]);
        assert!(e.message().len() < 1024, "{} bytes", e.message().len());
        let mut c = node.client.clone();
        let e = c
            .mint_jwt_svid(MintJwtSvidRequest {
                entry_id: huge.clone(),
                audience: vec!["a".into()],
                spiffe_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().len() < 1024, "{} bytes", e.message().len());
        assert!(!ca.log_text().contains(&huge[..4096]));
    }
}

on_both_backends! {
    async fn join_token_works_exactly_once_and_not_after_its_ttl() {
        let ca = CaProcess::start(&[]);
        let token = ca.join_token();
        attest_with(&ca, &token).await.unwrap();
        let again = attest_with(&ca, &token)
            .await
            .err()
            .expect("second use must fail");
        assert_eq!(again.code(), Code::PermissionDenied);
        assert!(
            again.message().contains("already used"),
            "{}",
            again.message()
        );

        let short = ca.cli_json(&["token", "create", "--ttl", "1s"])["token"]
            .as_str()
            .unwrap()
            .to_owned();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let late = attest_with(&ca, &short)
            .await
            .err()
            .expect("expired token must fail");
        assert_eq!(late.code(), Code::PermissionDenied);
        assert!(late.message().contains("expired"), "{}", late.message());

        let unknown = attest_with(&ca, "not-a-token").await.err().unwrap();
        assert_eq!(unknown.code(), Code::PermissionDenied);

        // Its agent evicted before it is used (a leaked token), the token is
        // revoked; an agent that is nowhere cannot be evicted.
        let created = ca.cli_json(&["token", "create"]);
        let (leaked, agent) = (
            created["token"].as_str().unwrap(),
            created["agent_id"].as_str().unwrap(),
        );
        let out = ca.cli(&["agent", "evict", agent]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let revoked = attest_with(&ca, leaked).await.err().expect("a revoked token attested");
        assert_eq!(revoked.code(), Code::PermissionDenied);
        assert!(revoked.message().contains("not known"), "{}", revoked.message());
        assert_eq!(ca.wait_audit_lines("join_token_revoked", 1), 1);
        let out = ca.cli(&["agent", "evict", agent]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no agent"), "{err}");
        assert_eq!(ca.wait_audit_lines("agent_attested", 1), 1);
    }
}

on_both_backends! {
    async fn evicted_agent_can_neither_renew_nor_sign() {
        let ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let entry = ca.create_entry("spiffe://example.org/web", &node.id.to_string());
        let key = KeyPair::generate().unwrap();
        // Before eviction both work.
        node.client
            .renew_node_svid(RenewNodeSvidRequest {
                csr: csr(&node.key, &[]),
            })
            .await
            .unwrap();
        node.sign(&entry, csr(&key, &[])).await.unwrap();

        let agents = ca.cli_json(&["agent", "list"]);
        assert_eq!(agents[0]["spiffe_id"], node.id.to_string());
        let out = ca.cli(&["agent", "evict", &node.id.to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let renew = node
            .client
            .renew_node_svid(RenewNodeSvidRequest {
                csr: csr(&node.key, &[]),
            })
            .await
            .unwrap_err();
        assert_eq!(renew.code(), Code::PermissionDenied);
        assert!(renew.message().contains("evicted"), "{}", renew.message());
        let sign = node.sign(&entry, csr(&key, &[])).await.unwrap_err();
        assert_eq!(sign.code(), Code::PermissionDenied);
        assert_eq!(ca.cli_json(&["agent", "list"])[0]["evicted"], true);
        assert_eq!(ca.wait_audit_lines("agent_evicted", 1), 1);
    }
}

/// Renews the node SVID over `node`'s connection with a fresh key.
async fn renew(node: &mut Node) -> Result<(Vec<Vec<u8>>, KeyPair), tonic::Status> {
    let key = KeyPair::generate().unwrap();
    let r = node
        .client
        .renew_node_svid(RenewNodeSvidRequest {
            csr: csr(&key, &[]),
        })
        .await?;
    Ok((r.into_inner().svid_chain, key))
}

/// `node` presents `svid` on its connections from now on.
async fn present(node: &mut Node, ca: &CaProcess, svid: &(Vec<Vec<u8>>, KeyPair)) {
    node.resolver.set(&svid.0, svid.1.serialized_der()).unwrap();
    node.reconnect(ca).await.unwrap();
}

on_both_backends! {
    async fn a_node_svid_superseded_by_one_its_agent_has_used_is_refused() {
        let ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let entry = ca.create_entry("spiffe://example.org/web", &node.id.to_string());
        let key = KeyPair::generate().unwrap();
        let a = (node.chain.clone(), KeyPair::try_from(node.key.serialized_der()).unwrap());
        let bundle = |node: &mut Node| {
            let mut c = node.client.clone();
            async move { c.fetch_bundle(FetchBundleRequest {}).await.map(|_| ()) }
        };
        // The superseded SVID's holder signs nothing and hears no changes.
        let assert_refused = |r: Result<(), tonic::Status>, what: &str| {
            let e = r.expect_err(what);
            assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
            assert!(e.message().contains("is not this agent's current one"), "{what}: {e:?}");
        };
        node.sign(&entry, csr(&key, &[])).await.unwrap();
        // Renewals over the first SVID work as long as the agent has not
        // used what they issued (a lost answer is simply asked again).
        let _b = renew(&mut node).await.unwrap();
        let c = renew(&mut node).await.unwrap();
        // The agent's first call with C makes C current: A is superseded,
        // for every call.
        present(&mut node, &ca, &c).await;
        bundle(&mut node).await.unwrap();
        assert_eq!(ca.wait_audit_lines("node_svid_in_use", 1), 1);
        present(&mut node, &ca, &a).await;
        let refused = bundle(&mut node).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(
            refused.message().contains("is not this agent's current one"),
            "{}",
            refused.message()
        );
        assert_eq!(
            renew(&mut node).await.unwrap_err().code(),
            Code::PermissionDenied
        );
        assert_refused(
            node.sign(&entry, csr(&key, &[])).await.map(|_| ()),
            "an X509-SVID signed",
        );
        let mut client = node.client.clone();
        assert_refused(
            client.batch_sign_x509_svid(BatchSignX509SvidRequest {
                requests: vec![SignX509SvidRequest {
                    entry_id: entry.clone(),
                    csr: csr(&key, &[]),
                }],
            })
            .await
            .map(|_| ()),
            "a batch signed",
        );
        assert_refused(
            client.watch_changes(WatchChangesRequest {}).await.map(|_| ()),
            "changes watched",
        );
        // With C, signing works.
        present(&mut node, &ca, &c).await;
        node.sign(&entry, csr(&key, &[])).await.unwrap();
        // A renewal with C issues D; renewing with D makes it current, and
        // then C is refused too.
        present(&mut node, &ca, &c).await;
        let d = renew(&mut node).await.unwrap();
        present(&mut node, &ca, &d).await;
        renew(&mut node).await.unwrap();
        present(&mut node, &ca, &c).await;
        assert_eq!(
            renew(&mut node).await.unwrap_err().code(),
            Code::PermissionDenied
        );
        let refusal = "is not this agent's current one";
        let log = ca.wait_log(|l| l.contains(refusal));
        let line = log.lines().find(|l| l.contains(refusal)).unwrap();
        assert!(line.contains(&node.id.to_string()), "{line}");
    }
}

/// An agent attested by a CA from before serials were tracked: that CA
/// stored the newest serial it issued (here one whose answer was lost), and
/// the upgrade marks the agent to take the first node SVID it presents as
/// its current one; from then on the others are refused as usual.
#[tokio::test]
async fn after_the_upgrade_an_agent_first_node_svid_becomes_current() {
    let ca = CaProcess::start(&[]);
    let mut node = attest(&ca).await;
    let a = (
        node.chain.clone(),
        KeyPair::try_from(node.key.serialized_der()).unwrap(),
    );
    let b = renew(&mut node).await.unwrap();
    // The row as the upgrade leaves it.
    let db = ca.data_dir().join("datastore.sqlite3");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], timeout=10)\n\
             c.execute(\"UPDATE agents SET serial = 'lost', new_serial = '*'\")\n\
             c.commit()",
        ])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A, still held over the first connection, becomes current.
    renew(&mut node).await.unwrap();
    assert_eq!(ca.wait_audit_lines("node_svid_in_use", 1), 1);
    let listed = ca.cli_json(&["agent", "list"]);
    let current = ward_spec::svid::serial(&a.0[0]).unwrap();
    assert_eq!(listed[0]["serial_number"], current.as_str(), "{listed}");
    // B, issued before the upgrade and never used, is refused now.
    present(&mut node, &ca, &b).await;
    assert_eq!(
        renew(&mut node).await.unwrap_err().code(),
        Code::PermissionDenied
    );
}

on_both_backends! {
    async fn expired_node_svid_is_refused() {
        let ca = CaProcess::start(&["--node-svid-ttl", "2s"]);
        let mut node = attest(&ca).await;
        let (_, not_after) = ward_spec::svid::validity(&node.chain[0]).unwrap();
        // Valid now: a fresh handshake and a renewal work.
        node.reconnect(&ca).await.unwrap();
        let mut held = node.client.clone();
        held.fetch_bundle(FetchBundleRequest {}).await.unwrap();
        node.client
            .renew_node_svid(RenewNodeSvidRequest {
                csr: csr(&node.key, &[]),
            })
            .await
            .unwrap();
        // Wait out the original SVID ...
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        std::thread::sleep(std::time::Duration::from_secs(
            (not_after - now + 2).max(0) as u64
        ));
        // ... the connection made with it serves no more calls ...
        let late = held.fetch_bundle(FetchBundleRequest {}).await.unwrap_err();
        assert_eq!(late.code(), Code::Unauthenticated, "{late:?}");
        assert!(late.message().contains("has expired"), "{}", late.message());
        // ... and a new connection presenting it is refused.
        let result = match node.reconnect(&ca).await {
            Err(e) => Err(e),
            Ok(()) => node
                .client
                .renew_node_svid(RenewNodeSvidRequest {
                    csr: csr(&node.key, &[]),
                })
                .await
                .map(|_| ())
                .map_err(|s| s.to_string()),
        };
        let err = result.expect_err("an expired node SVID must be refused");
        assert!(!err.is_empty());
        let log = ca.wait_log(|l| l.contains("refused client certificate"));
        assert!(log.contains("refused client certificate"), "{log}");
    }
}

on_both_backends! {
    async fn malformed_input_gets_clear_errors_and_the_ca_keeps_serving() {
        let ca = CaProcess::start(&[]);
        let long = format!("spiffe://example.org/{}", "a".repeat(3000));
        let out = ca.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            &long,
            "--parent-id",
            "spiffe://example.org/n",
            "--selector",
            "unix:uid:1",
        ]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("2048-byte limit"), "{err}");

        let out = ca.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--parent-id",
            "spiffe://example.org/n",
            "--selector",
            "docker:label:x",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("unknown selector type \"docker\""), "{err}");

        // Entries stay small enough for an agent's sync page.
        let uids: Vec<String> = (0..33).map(|u| format!("unix:uid:{u}")).collect();
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--parent-id",
            "spiffe://example.org/n",
        ];
        for u in &uids {
            args.extend(["--selector", u.as_str()]);
        }
        let out = ca.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("selectors: 33, at most 32"), "{err}");
        let long_path = format!("unix:path:/{}", "p".repeat(1100));
        let out = ca.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--parent-id",
            "spiffe://example.org/n",
            "--selector",
            &long_path,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("a selector's length (bytes)"), "{err}");

        // Garbage as the attestation CSR: refused, and the token is not burnt.
        let token = ca.join_token();
        let mut anon = anonymous_client(&ca).await;
        let e = anon
            .attest(ward_spec::proto::node::v1::AttestRequest {
                join_token: token.clone(),
                csr: vec![0x30, 0x03, 1, 2, 3],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        attest_with(&ca, &token).await.unwrap();

        // A bad config file: a clear error naming the key, and no process left running.
        let cfg = ca.dir.join("bad.toml");
        std::fs::write(
            &cfg,
            "trust_domain = \"example.org\"\nnode_svid_tll = \"1h\"\n",
        )
        .unwrap();
        let out = Command::new(ward_bin())
            .args(["ca", "serve", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("node_svid_tll"), "{err}");

        // The running CA still serves everyone else.
        let mut node = attest(&ca).await;
        let entry = ca.create_entry("spiffe://example.org/ok", &node.id.to_string());
        node.sign(&entry, csr(&KeyPair::generate().unwrap(), &[]))
            .await
            .unwrap();
        assert_eq!(http_get(&ca.health_addr, "/healthz").unwrap().0, 200);
    }
}

/// `ward ca serve` logging at `trace` (every HTTP/2 frame, every SQL
/// statement) into a stderr pipe nobody reads: the pipe fills after 64 KiB,
/// yet the CA keeps answering; lines past the log's limit are dropped, and
/// once the pipe is read the CA says how many.
#[test]
fn a_stderr_pipe_nobody_reads_does_not_stall_the_ca() {
    use std::io::BufRead;
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// The CA, killed however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let health = format!("127.0.0.1:{}", free_port());
    let mut ca = Killed(
        Command::new(ward_bin())
            .args(["ca", "serve", "--trust-domain", TD, "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--bind-address", &format!("127.0.0.1:{}", free_port())])
            .args(["--health-address", &health])
            .env("WARD_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(&health, "/readyz").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "the CA never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Admin calls, each traced at length: more log lines than the pipe and
    // the log's buffer (1 MiB) hold together.
    const CALLS: usize = 100;
    let socket = dir.path().join("data/admin.sock");
    for i in 0..CALLS {
        let (tx, rx) = mpsc::channel();
        let s = socket.clone();
        std::thread::spawn(move || {
            let _ = tx.send(
                Command::new(ward_bin())
                    .args(["token", "create"])
                    .env("WARD_ADMIN_SOCKET", s)
                    .output()
                    .unwrap(),
            );
        });
        let out = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("call {i} got no answer: the CA waits on its stderr?"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Now read the pipe: the backlog comes out, then the warning that says
    // how many lines were dropped.
    let (tx, rx) = mpsc::channel();
    let err = ca.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if line.contains("the stderr log's destination is taking lines again") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("no warning that lines were dropped");
    let dropped: u64 = line
        .split("dropped=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"));
    assert!(dropped > 0, "{line}");
}
