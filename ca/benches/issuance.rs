//! SVID issuance throughput: Ward's full signing path against the raw work.
//!
//! - `raw`: rcgen parses the CSR and verifies its signature, then signs a leaf
//!   with the intermediate (ring underneath). Nothing else.
//! - `ward`: `Ca::sign_batch` on batches of 100 CSRs: agent check and entry
//!   lookup in SQLite (one query each per batch), CSR checks, authorization
//!   against the entry, leaf from Ward's template, SVID profile check of the
//!   result, one audit line per SVID (formatted as JSON to a sink).
//!
//! Both run on one thread (a current-thread runtime) and process 100 CSRs per
//! iteration, so criterion's per-iteration time / 100 is the per-CSR cost.
//!
//! Run: `cargo bench -p ward-ca --bench issuance`

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rcgen::{CertificateSigningRequestParams, KeyPair, SanType};
use ward_ca::authority::{Authority, AuthorityConfig};
use ward_ca::datastore::{AgentRecord, Datastore, SqliteStore};
use ward_ca::metrics::Metrics;
use ward_ca::service::{Ca, EntrySpec, NodeSvid, Ttls};
use ward_spec::{SpiffeId, TrustDomain};

const BATCH: usize = 100;

struct Fixture {
    ca: Arc<Ca>,
    agent: SpiffeId,
    /// The node SVID the agent presents (its current one).
    svid: NodeSvid,
    requests: Vec<(String, Vec<u8>)>,
    _dir: tempfile::TempDir,
}

fn csr_for(id: &str) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.serialize_request(&key).unwrap().der().to_vec()
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let store: Arc<dyn Datastore> = Arc::new(
        SqliteStore::open(&dir.path().join("db.sqlite3"))
            .await
            .unwrap(),
    );
    let authority = Authority::open(
        AuthorityConfig {
            trust_domain: td.clone(),
            key_dir: dir.path().join("keys"),
            ca_ttl: time::Duration::hours(24),
            root_ttl: time::Duration::days(365),
            upstream: None,
            refresh_hint_secs: 300,
            check_interval: time::Duration::seconds(10),
        },
        store.clone(),
    )
    .await
    .unwrap();
    let ttls = Ttls {
        x509_svid: Duration::from_secs(3600),
        jwt_svid: Duration::from_secs(300),
        node_svid: Duration::from_secs(3600),
        join_token: Duration::from_secs(600),
    };
    let ca = Arc::new(
        Ca::new(
            authority,
            store.clone(),
            ttls,
            ward_authz::IdTemplate::default(),
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap(),
    );
    let agent = td.id("/ward/agent/join_token/bench").unwrap();
    store
        .upsert_agent(&AgentRecord {
            spiffe_id: agent.clone(),
            attestation_type: "join_token".into(),
            serial: "01".into(),
            new_serial: String::new(),
            expires_at: i64::MAX,
            evicted: false,
            attested_at: 0,
        })
        .await
        .unwrap();
    let mut requests = Vec::new();
    for i in 0..BATCH {
        let id = format!(
            "spiffe://example.org/tenant/t{}/ns/default/sa/svc{i}",
            i % 5
        );
        let e = ca
            .create_entry(
                &ward_authz::AdminPrincipal::Operator,
                EntrySpec {
                    id: None,
                    spiffe_id: id.clone(),
                    parent_id: agent.to_string(),
                    selectors: vec![format!("unix:uid:{}", 1000 + i)],
                    x509_ttl: 0,
                    jwt_ttl: 0,
                    dns_names: vec![],
                    hint: String::new(),
                    admin: false,
                    federates_with: vec![],
                },
            )
            .await
            .unwrap();
        requests.push((e.id, csr_for(&id)));
    }
    Fixture {
        ca,
        agent,
        svid: NodeSvid {
            serial: "01".into(),
            not_after: i64::MAX,
        },
        requests,
        _dir: dir,
    }
}

fn issuance(c: &mut Criterion) {
    // Audit lines are formatted for real, then discarded.
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::sink)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fx = rt.block_on(fixture());
    let signer = fx.ca.authority.signer();

    let mut g = c.benchmark_group("svid_issuance");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(10));

    g.bench_function("raw_rcgen_ring_100", |b| {
        b.iter(|| {
            for (_, der) in &fx.requests {
                let now = time::OffsetDateTime::now_utc();
                // The same certificate Ward issues: template extensions, random serial.
                let mut csr =
                    CertificateSigningRequestParams::from_der(&der.as_slice().into()).unwrap();
                csr.params.not_before = now;
                csr.params.not_after = now + time::Duration::hours(1);
                csr.params.distinguished_name = rcgen::DistinguishedName::new();
                csr.params.is_ca = rcgen::IsCa::ExplicitNoCa;
                csr.params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
                csr.params.extended_key_usages = vec![
                    rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                    rcgen::ExtendedKeyUsagePurpose::ClientAuth,
                ];
                csr.params.use_authority_key_identifier_extension = true;
                csr.params.serial_number = Some(ward_ca::x509::random_serial());
                let cert = csr.signed_by(&signer.issuer).unwrap();
                std::hint::black_box(cert.der());
            }
        })
    });

    g.bench_function("ward_sign_batch_100", |b| {
        b.iter(|| {
            let results = rt
                .block_on(fx.ca.sign_batch(&fx.agent, &fx.svid, fx.requests.clone()))
                .unwrap();
            assert!(results.iter().all(|r| r.is_ok()));
            std::hint::black_box(results);
        })
    });
    g.finish();

    // Where Ward's extra time goes, per 100 CSRs.
    let mut parts = c.benchmark_group("svid_issuance_parts");
    parts.throughput(Throughput::Elements(BATCH as u64));
    parts.sample_size(30);
    let leaves: Vec<Vec<u8>> = rt
        .block_on(fx.ca.sign_batch(&fx.agent, &fx.svid, fx.requests.clone()))
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().chain.remove(0))
        .collect();
    parts.bench_function("profile_check_100", |b| {
        b.iter(|| {
            for l in &leaves {
                std::hint::black_box(ward_spec::svid::check_leaf(l).unwrap());
            }
        })
    });
    let ids: Vec<String> = fx.requests.iter().map(|(id, _)| id.clone()).collect();
    parts.bench_function("agent_check_and_entry_lookup_100", |b| {
        b.iter(|| {
            rt.block_on(async {
                fx.ca
                    .check_agent_standing(&fx.agent, &fx.svid, "bench")
                    .await
                    .unwrap();
                std::hint::black_box(fx.ca.store.signing_entries(&fx.agent, &ids).await.unwrap());
            })
        })
    });
    parts.bench_function("audit_lines_100", |b| {
        b.iter(|| {
            for (id, _) in &fx.requests {
                tracing::info!(target: "audit", event = "x509_svid_issued", agent_id = %fx.agent, entry_id = %id, spiffe_id = "spiffe://example.org/tenant/t1/ns/default/sa/svc1", serial = "0123456789abcdef0123456789abcdef", expires_at = 1_800_000_000i64, "issued an X509-SVID");
            }
        })
    });
    parts.finish();
}

criterion_group!(benches, issuance);
criterion_main!(benches);
