//! A simulated fleet against two CA replicas on one PostgreSQL database.
//!
//! Run: `WARD_TEST_POSTGRES_URL=postgres://USER:PASSWORD@HOST/DB cargo bench --bench ca_fleet`
//! (`WARD_BENCH_AGENTS`, default 1,000, and `WARD_BENCH_ENTRIES`, default 50
//! per agent, shrink it.)
//!
//! 1. Two `ward ca serve` replicas (release build) share a fresh database and
//!    an upstream root. 1,000 light simulated agents in this process attest
//!    with join tokens (alternately to each replica) and hold their node
//!    SVIDs; 50 entries are registered per agent (50,000).
//! 2. Cold start: every agent syncs its entries, makes a key per entry and has
//!    them signed in batches, all at once; the time until all 50,000 SVIDs are
//!    issued.
//! 3. Steady state: each agent keeps the change stream open and syncs on
//!    every notice and every 5 s (as `ward agent run` does); for 30 s with no
//!    change, database transactions per second (`pg_stat_database`) and the
//!    replicas' CPU.
//! 4. Propagation: 200 entries created one by one through replica A, each for
//!    a random agent; from the create call's return until that agent's sync
//!    has it, p50 / p99 / max.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair, SanType};
use ward_spec::proto::admin::v1 as admin;
use ward_spec::proto::admin::v1::admin_client::AdminClient;
use ward_spec::proto::node::v1 as node;
use ward_spec::proto::node::v1::node_client::NodeClient;
use ward_spec::proto::types::v1 as types;
use ward_spec::tls::{PeerPolicy, RootStore, SpiffeServerVerifier, SvidResolver};
use ward_spec::{SpiffeId, TrustBundle, TrustDomain};

mod common;
use common::*;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .arg(url)
        .args(["-Atq", "-c", sql])
        .output()
        .expect("psql is needed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

struct Replica {
    child: Killed,
    node_addr: String,
    socket: std::path::PathBuf,
}

fn start_replica(dir: &std::path::Path, name: &str, db: &str, cert: &str, key: &str) -> Replica {
    let node_addr = format!("127.0.0.1:{}", port());
    let health = format!("127.0.0.1:{}", port());
    let data = dir.join(name);
    let child = Command::new(env!("CARGO_BIN_EXE_ward"))
        .args(["ca", "serve", "--trust-domain", TD, "--data-dir"])
        .arg(&data)
        .args(["--bind-address", &node_addr, "--health-address", &health])
        .args([
            "--datastore",
            db,
            "--upstream-cert",
            cert,
            "--upstream-key",
            key,
        ])
        .env("WARD_LOG", "warn,audit=off")
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .unwrap();
    wait_ready(&health);
    Replica {
        child: Killed(child),
        node_addr,
        socket: data.join("admin.sock"),
    }
}

fn csr(key: &KeyPair, id: &str) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.serialize_request(key).unwrap().der().to_vec()
}

/// A simulated agent: its node identity and what it has synced and signed.
struct SimAgent {
    id: String,
    client: NodeClient<tonic::transport::Channel>,
    revision: u64,
    entries: HashMap<String, String>,
}

async fn attest(addr: &str, roots: &RootStore, token: &str) -> SimAgent {
    let ca_id = SpiffeId::parse(&format!("spiffe://{TD}/ward/ca")).unwrap();
    let verifier =
        || SpiffeServerVerifier::new(roots.clone(), PeerPolicy::OneOf(vec![ca_id.clone()]));
    let anon = ward_spec::grpc::tls_channel(
        addr,
        Arc::new(ward_spec::tls::client_config(None, verifier())),
    )
    .await
    .unwrap();
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let resp = NodeClient::new(anon)
        .attest(node::AttestRequest {
            join_token: token.to_owned(),
            csr,
        })
        .await
        .unwrap()
        .into_inner();
    let resolver = SvidResolver::default();
    resolver
        .set(&resp.svid_chain, key.serialized_der())
        .unwrap();
    let ch = ward_spec::grpc::tls_channel(
        addr,
        Arc::new(ward_spec::tls::client_config(Some(resolver), verifier())),
    )
    .await
    .unwrap();
    SimAgent {
        id: resp.spiffe_id,
        client: NodeClient::new(ch),
        revision: 0,
        entries: HashMap::new(),
    }
}

impl SimAgent {
    /// Syncs to the newest revision; returns the entry IDs that arrived.
    async fn sync(&mut self) -> Vec<String> {
        let mut new = Vec::new();
        let mut after = String::new();
        loop {
            let page = self
                .client
                .sync_entries(node::SyncEntriesRequest {
                    since_revision: self.revision,
                    after_entry_id: std::mem::take(&mut after),
                })
                .await
                .unwrap()
                .into_inner();
            for e in page.entries {
                new.push(e.id.clone());
                self.entries.insert(e.id, e.spiffe_id);
            }
            for d in page.deleted_entry_ids {
                self.entries.remove(&d);
            }
            self.revision = page.revision;
            after = page.after_entry_id;
            if !page.more {
                return new;
            }
        }
    }

    /// A key per entry, signed in batches of up to 500; returns how many.
    async fn sign(&mut self, ids: &[String]) -> usize {
        let mut signed = 0;
        for chunk in ids.chunks(500) {
            let requests = chunk
                .iter()
                .map(|id| node::SignX509SvidRequest {
                    entry_id: id.clone(),
                    csr: csr(&KeyPair::generate().unwrap(), &self.entries[id]),
                })
                .collect();
            let r = self
                .client
                .batch_sign_x509_svid(node::BatchSignX509SvidRequest { requests })
                .await
                .unwrap()
                .into_inner();
            signed += r.results.iter().filter(|x| x.code == 0).count();
        }
        signed
    }
}

#[tokio::main]
async fn main() {
    let Ok(base) = std::env::var("WARD_TEST_POSTGRES_URL") else {
        println!("set WARD_TEST_POSTGRES_URL (a PostgreSQL server) to run this benchmark");
        return;
    };
    let agents_n = env_usize("WARD_BENCH_AGENTS", 1000);
    let per_agent = env_usize("WARD_BENCH_ENTRIES", 50);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // 1. Database, shared root, two replicas.
    let name = format!("ward_fleet_{}", std::process::id());
    psql(&base, &format!("CREATE DATABASE {name}"));
    let (prefix, _) = base.rsplit_once('/').unwrap();
    let db = format!("{prefix}/{name}");
    let (cert, key) = (dir.join("root.crt"), dir.join("root.key"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "30", "-subj", "/CN=Fleet root"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .args(["-addext", &format!("subjectAltName=URI:spiffe://{TD}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(ok.status.success());
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let a = start_replica(dir, "a", &db, cert, key);
    let b = start_replica(dir, "b", &db, cert, key);
    let admin_ch = ward_spec::grpc::unix_channel(&a.socket).await.unwrap();
    let mut admin = AdminClient::new(admin_ch);
    let bundle = admin
        .get_bundle(admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let roots = RootStore::new(
        &TrustBundle::from_jwks(TrustDomain::new(TD).unwrap(), &bundle.jwks).unwrap(),
    )
    .unwrap();

    let t = Instant::now();
    let mut tokens = Vec::new();
    for _ in 0..agents_n {
        tokens.push(
            admin
                .create_join_token(admin::CreateJoinTokenRequest {
                    ttl: 3600,
                    tenant: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .token,
        );
    }
    let mut set = tokio::task::JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let addr = if i % 2 == 0 {
            a.node_addr.clone()
        } else {
            b.node_addr.clone()
        };
        let roots = roots.clone();
        set.spawn(async move { (i, attest(&addr, &roots, &token).await) });
    }
    let mut agents: Vec<Option<SimAgent>> = (0..agents_n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, agent) = r.unwrap();
        agents[i] = Some(agent);
    }
    let mut agents: Vec<SimAgent> = agents.into_iter().map(Option::unwrap).collect();
    println!(
        "{agents_n} agents attested in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let parents: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..8 {
        let mut c = admin.clone();
        let parents = parents.clone();
        set.spawn(async move {
            for (i, parent) in parents.iter().enumerate().skip(w).step_by(8) {
                for j in 0..per_agent {
                    c.create_entry(admin::CreateEntryRequest {
                        entry: Some(types::Entry {
                            spiffe_id: format!("spiffe://{TD}/tenant/t{}/ns/n{i}/sa/s{j}", i % 20),
                            parent_id: parent.clone(),
                            selectors: vec![types::Selector {
                                r#type: "unix".into(),
                                value: format!("uid:{}", 10_000 + j),
                            }],
                            ..Default::default()
                        }),
                    })
                    .await
                    .unwrap();
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let total = agents_n * per_agent;
    println!(
        "{total} entries registered in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // 2. Cold start: every agent syncs and has all its SVIDs signed.
    let cpu0 = (cpu_seconds(a.child.0.id()), cpu_seconds(b.child.0.id()));
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for mut agent in agents.drain(..) {
        set.spawn(async move {
            let ids = agent.sync().await;
            let n = agent.sign(&ids).await;
            (agent, n)
        });
    }
    let mut issued = 0;
    while let Some(r) = set.join_next().await {
        let (agent, n) = r.unwrap();
        issued += n;
        agents.push(agent);
    }
    let cold = t.elapsed();
    let cold_cpu = (cpu_seconds(a.child.0.id()) - cpu0.0) + (cpu_seconds(b.child.0.id()) - cpu0.1);
    assert_eq!(issued, total, "not every SVID was issued");
    println!(
        "cold start: {issued} SVIDs issued in {:.1} s ({:.0}/s), replicas' CPU {:.1} s",
        cold.as_secs_f64(),
        issued as f64 / cold.as_secs_f64(),
        cold_cpu
    );

    // 3. Steady state: change streams open, sync on notice and every 5 s.
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut set = tokio::task::JoinSet::new();
    for (i, mut agent) in agents.into_iter().enumerate() {
        let arrivals = arrivals.clone();
        set.spawn(async move {
            let mut stream = agent
                .client
                .watch_changes(node::WatchChangesRequest {})
                .await
                .unwrap()
                .into_inner();
            // Spread the 5 s syncs over the interval, as independent agents are.
            let mut every = tokio::time::interval_at(
                tokio::time::Instant::now()
                    + Duration::from_millis((i as u64 * 5_000) / 1_000 % 5_000),
                Duration::from_secs(5),
            );
            loop {
                tokio::select! {
                    n = stream.message() => if n.ok().flatten().is_none() { return },
                    _ = every.tick() => {}
                }
                for id in agent.sync().await {
                    arrivals.lock().unwrap().insert(id, Instant::now());
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let xacts = || -> f64 {
        psql(
            &base,
            &format!(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{name}'"
            ),
        )
        .parse()
        .unwrap()
    };
    let (x0, c0) = (
        xacts(),
        cpu_seconds(a.child.0.id()) + cpu_seconds(b.child.0.id()),
    );
    let window = Duration::from_secs(30);
    tokio::time::sleep(window).await;
    let (x1, c1) = (
        xacts(),
        cpu_seconds(a.child.0.id()) + cpu_seconds(b.child.0.id()),
    );
    let qps = (x1 - x0) / window.as_secs_f64();
    let cpu = (c1 - c0) / window.as_secs_f64();
    println!(
        "steady state, no changes: {qps:.0} database transactions/s, replicas' CPU {:.1} % of one core",
        cpu * 100.0
    );

    // 4. Propagation of single changes through A to agents of either replica.
    let mut lat = Vec::new();
    let (x2, c2) = (
        xacts(),
        cpu_seconds(a.child.0.id()) + cpu_seconds(b.child.0.id()),
    );
    let t_changes = Instant::now();
    for k in 0..200usize {
        let target = &parents[(k * 7919) % parents.len()];
        let created = admin
            .create_entry(admin::CreateEntryRequest {
                entry: Some(types::Entry {
                    spiffe_id: format!("spiffe://{TD}/tenant/t0/ns/late/sa/s{k}"),
                    parent_id: target.clone(),
                    selectors: vec![types::Selector {
                        r#type: "unix".into(),
                        value: "uid:1".into(),
                    }],
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        let returned = Instant::now();
        let deadline = returned + Duration::from_secs(10);
        loop {
            if let Some(at) = arrivals.lock().unwrap().get(&created.id) {
                lat.push(at.saturating_duration_since(returned));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "entry {} never arrived",
                created.id
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let span = t_changes.elapsed().as_secs_f64();
    let (x3, c3) = (
        xacts(),
        cpu_seconds(a.child.0.id()) + cpu_seconds(b.child.0.id()),
    );
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "one entry change to its agent: p50 {:?}, p99 {:?}, max {:?} (200 changes; goal p99 < 1 s)",
        pct(0.5),
        pct(0.99),
        lat.last().unwrap()
    );
    println!(
        "while changing (one change every ~{:.0} ms): {:.0} database transactions/s, replicas' CPU {:.1} % of one core",
        span * 1000.0 / 200.0,
        (x3 - x2) / span,
        (c3 - c2) / span * 100.0
    );
    set.abort_all();
    drop((a, b));
    psql(
        &base,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    );
}
