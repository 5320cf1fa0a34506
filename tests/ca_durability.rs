//! Control plane durability and key rotation, end to end.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rcgen::KeyPair;

/// Every file under the key directory with its contents.
fn key_files(ca: &CaProcess) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(ca.data_dir().join("keys"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

on_both_backends! {
    async fn kill_9_during_a_burst_of_writes_and_signings_loses_nothing_acknowledged() {
        let mut ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let node_entry = ca.create_entry("spiffe://example.org/signed", &node.id.to_string());
        let keys_before = key_files(&ca);
        let bundle_before = ca.cli(&["bundle", "show", "--format", "jwks"]).stdout;

        let acked_entries = Arc::new(Mutex::new(Vec::<String>::new()));
        let acked_tokens = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let socket = ca.socket();
        let mut writers = Vec::new();
        for w in 0..4 {
            let (entries, tokens, stop, socket) = (
                acked_entries.clone(),
                acked_tokens.clone(),
                stop.clone(),
                socket.clone(),
            );
            writers.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    i += 1;
                    let args: Vec<String> = if i % 3 == 0 {
                        vec!["token".into(), "create".into()]
                    } else {
                        vec![
                            "entry".into(),
                            "create".into(),
                            "--spiffe-id".into(),
                            format!("spiffe://example.org/burst/w{w}/n{i}"),
                            "--parent-id".into(),
                            "spiffe://example.org/ward/agent/x/y".into(),
                            "--selector".into(),
                            format!("unix:uid:{i}"),
                        ]
                    };
                    let out = Command::new(ward_bin())
                        .args(&args)
                        .args(["--output", "json"])
                        .env("WARD_ADMIN_SOCKET", &socket)
                        .output()
                        .unwrap();
                    if !out.status.success() {
                        continue; // not acknowledged: the CA may have died mid-call
                    }
                    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    if let Some(t) = v.get("token") {
                        tokens.lock().unwrap().push(t.as_str().unwrap().to_owned());
                    } else {
                        entries
                            .lock()
                            .unwrap()
                            .push(v["id"].as_str().unwrap().to_owned());
                    }
                }
            }));
        }
        // Signings run alongside the writes.
        let sign_deadline = Instant::now() + Duration::from_millis(1500);
        let mut signed = 0;
        while Instant::now() < sign_deadline {
            let key = KeyPair::generate().unwrap();
            if node.sign(&node_entry, csr(&key, &[])).await.is_ok() {
                signed += 1;
            }
        }
        ca.kill9();
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        let entries = acked_entries.lock().unwrap().clone();
        let tokens = acked_tokens.lock().unwrap().clone();
        assert!(
            entries.len() >= 10,
            "burst too small to mean anything: {} entries",
            entries.len()
        );
        assert!(signed >= 5, "only {signed} signings");

        ca.spawn();
        let listed = ca.cli_json(&["entry", "list"]);
        let stored: std::collections::HashSet<String> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        for id in &entries {
            assert!(
                stored.contains(id),
                "acknowledged entry {id} lost after kill -9"
            );
        }
        // Acknowledged tokens survive too: the last one still attests.
        if let Some(t) = tokens.last() {
            attest_with(&ca, t)
                .await
                .expect("acknowledged join token lost");
        }
        assert_eq!(
            key_files(&ca),
            keys_before,
            "CA keys changed across the crash"
        );
        assert_eq!(
            ca.cli(&["bundle", "show", "--format", "jwks"]).stdout,
            bundle_before,
            "bundle changed across the crash"
        );
        // The node still works after the restart.
        node.reconnect(&ca).await.unwrap();
        node.sign(&node_entry, csr(&KeyPair::generate().unwrap(), &[]))
            .await
            .unwrap();
        let db = ca.data_dir().join("datastore.sqlite3");
        let on_file = db.exists();
        let integrity = Command::new("sqlite3")
            .arg(&db)
            .arg("PRAGMA integrity_check;")
            .output();
        // (On PostgreSQL there is no file; the server checks its own pages.)
        if let (true, Ok(out)) = (on_file, integrity) {
            if out.status.success() {
                assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
            }
        }
    }
}

fn serial_of(der: &[u8]) -> String {
    ward_spec::svid::serial(der).unwrap()
}

on_both_backends! {
    async fn intermediate_rotates_on_schedule_and_svids_from_both_slots_verify() {
        // A 12 s signing CA: prepared at 6 s, activated at 10 s.
        let ca = CaProcess::start(&[
            "--ca-ttl",
            "12s",
            "--rotation-check-interval",
            "1s",
            "--x509-svid-ttl",
            "1h",
            "--node-svid-ttl",
            "1h",
        ]);
        let mut node = attest(&ca).await;
        let entry = ca.create_entry("spiffe://example.org/rot", &node.id.to_string());
        let before = node
            .sign(&entry, csr(&KeyPair::generate().unwrap(), &[]))
            .await
            .unwrap();
        let seq_before = ca.bundle().sequence;

        let deadline = Instant::now() + Duration::from_secs(30);
        let after = loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The CA's serving SVID follows the slot; reconnect to pick it up.
            let _ = node.reconnect(&ca).await;
            if let Ok(chain) = node
                .sign(&entry, csr(&KeyPair::generate().unwrap(), &[]))
                .await
            {
                if serial_of(&chain[1]) != serial_of(&before[1]) {
                    break chain;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no rotation within 30 s; log:\n{}",
                ca.log_text()
            );
        };
        let bundle = ca.bundle();
        assert!(
            bundle.sequence > seq_before,
            "a new JWT key must have been published"
        );
        for (name, chain) in [("before", &before), ("after", &after)] {
            let (ok, msg) = openssl_verify(&ca.dir, &bundle.x509_authorities, chain);
            assert!(ok, "{name} rotation: {msg}");
            let (_, leaf_end) = ward_spec::svid::validity(&chain[0]).unwrap();
            let (_, issuer_end) = ward_spec::svid::validity(&chain[1]).unwrap();
            assert!(leaf_end <= issuer_end, "{name}: SVID outlives its issuer");
            // The 1 h TTL was cut to the 12 s issuer.
            let (nb, _) = ward_spec::svid::validity(&chain[0]).unwrap();
            assert!(leaf_end - nb < 60, "{name}: TTL not capped");
        }
        assert!(ca.wait_audit_lines("slot_prepared", 1) >= 1);
        assert!(ca.wait_audit_lines("slot_activated", 1) >= 1);
    }
}

on_both_backends! {
    async fn a_ca_restarted_after_its_signing_slot_expired_rotates_before_it_signs() {
        // A 4 s slot, and no scheduled check for an hour: only the start can
        // notice that the slot ran out while the CA was down.
        let mut ca = CaProcess::start(&[
            "--ca-ttl",
            "4s",
            "--rotation-check-interval",
            "1h",
        ]);
        let node = attest(&ca).await;
        let old_issuer = node.chain[1].clone();
        ca.kill9();
        std::thread::sleep(Duration::from_secs(5));
        ca.spawn();
        let mut node = attest(&ca).await;
        let entry = ca.create_entry("spiffe://example.org/late", &node.id.to_string());
        let chain = node
            .sign(&entry, csr(&KeyPair::generate().unwrap(), &[]))
            .await
            .unwrap();
        assert_ne!(serial_of(&chain[1]), serial_of(&old_issuer), "a new slot signs");
        let now = unix_now();
        for der in &chain[..2] {
            let (_, not_after) = ward_spec::svid::validity(der).unwrap();
            assert!(not_after > now, "issued already expired");
        }
    }
}

on_both_backends! {
    async fn forced_rotation_publishes_the_bundle_first_and_keeps_old_svids_valid() {
        let ca = CaProcess::start(&[]);
        let mut node = attest(&ca).await;
        let entry = ca.create_entry("spiffe://example.org/forced", &node.id.to_string());
        let old = node
            .sign(&entry, csr(&KeyPair::generate().unwrap(), &[]))
            .await
            .unwrap();
        let b1 = ca.bundle();
        let r = ca.cli_json(&["ca", "rotate"]);
        let b2 = ca.bundle();
        assert_eq!(r["bundle_sequence"].as_u64().unwrap(), b2.sequence);
        assert!(b2.sequence > b1.sequence);
        assert_eq!(
            b2.jwt_authorities.len(),
            b1.jwt_authorities.len() + 1,
            "new JWT key published, old one kept"
        );
        let new = node
            .sign(&entry, csr(&KeyPair::generate().unwrap(), &[]))
            .await
            .unwrap();
        assert_ne!(serial_of(&old[1]), serial_of(&new[1]));
        assert_eq!(r["active_serial"].as_str().unwrap(), serial_of(&new[1]));
        for chain in [&old, &new] {
            let (ok, msg) = openssl_verify(&ca.dir, &b2.x509_authorities, chain);
            assert!(ok, "{msg}");
        }
        // The log shows the bundle change before the activation.
        let log = ca.wait_log(|l| l.contains("rotated the signing slot"));
        let published = log.rfind("published a new trust bundle").unwrap();
        let activated = log.rfind("rotated the signing slot").unwrap();
        assert!(
            published < activated,
            "bundle must change before the new key signs"
        );
    }
}
