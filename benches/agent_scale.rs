//! Agent scale and Workload API latency, on real processes (release build).
//!
//! Run: `cargo bench --bench agent_scale`
//!
//! 1. Agent A holds 1,000 cached entries (one for this process's uid, the rest
//!    for other uids). Latency of FetchX509SVID to its first response, and of
//!    a cached FetchJWTSVID, over one established connection.
//! 2. Agent B is started with 10,000 entries already registered (40 s SVIDs):
//!    time until every SVID is cached, resident memory per cached SVID
//!    (B minus A, per extra SVID), and the longest FetchX509SVID call while all
//!    10,000 SVIDs rotate (at about 20 s).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ward_spec::proto::admin::v1 as admin;
use ward_spec::proto::admin::v1::admin_client::AdminClient;
use ward_spec::proto::types::v1 as types;
use ward_spec::proto::workload as wl;
use ward_spec::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

mod common;
use common::*;

fn start_agent(
    dir: &Path,
    name: &str,
    ca: &str,
    token: &str,
) -> (Killed, String, std::path::PathBuf) {
    let health = format!("127.0.0.1:{}", port());
    let socket = dir.join(format!("{name}.sock"));
    let child = Command::new(env!("CARGO_BIN_EXE_ward"))
        .args([
            "agent",
            "run",
            "--trust-domain",
            TD,
            "--ca-address",
            ca,
            "--join-token",
            token,
        ])
        .arg("--trust-bundle")
        .arg(dir.join("bundle.pem"))
        .arg("--data-dir")
        .arg(dir.join(name))
        .arg("--socket-path")
        .arg(&socket)
        .args(["--health-address", &health])
        .env("WARD_LOG", "warn,audit=off")
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .unwrap();
    (Killed(child), health, socket)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

async fn create_entries(
    admin: &AdminClient<tonic::transport::Channel>,
    parent: &str,
    n: usize,
    my_uid: u32,
    x509_ttl: i64,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8 {
        let mut c = admin.clone();
        let parent = parent.to_owned();
        tasks.spawn(async move {
            for i in (w..n).step_by(8) {
                let uid = if i == 0 { my_uid } else { 100_000 + i as u32 };
                let sel = types::Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{uid}"),
                };
                c.create_entry(admin::CreateEntryRequest {
                    entry: Some(types::Entry {
                        spiffe_id: format!("spiffe://{TD}/tenant/t{}/ns/default/sa/svc{i}", i % 10),
                        parent_id: parent.clone(),
                        selectors: vec![sel],
                        x509_ttl,
                        ..Default::default()
                    }),
                })
                .await
                .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

fn header<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

async fn x509_latency(c: &mut SpiffeWorkloadApiClient<tonic::transport::Channel>) -> Duration {
    let t = Instant::now();
    let mut s = c
        .fetch_x509svid(header(wl::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let m = s.message().await.unwrap().unwrap();
    let d = t.elapsed();
    assert_eq!(m.svids.len(), 1);
    d
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ca_addr = format!("127.0.0.1:{}", port());
    let ca_health = format!("127.0.0.1:{}", port());
    let _ca = Killed(
        Command::new(env!("CARGO_BIN_EXE_ward"))
            .args([
                "ca",
                "serve",
                "--trust-domain",
                TD,
                "--bind-address",
                &ca_addr,
                "--health-address",
                &ca_health,
            ])
            .arg("--data-dir")
            .arg(dir.join("ca"))
            .env("WARD_LOG", "warn,audit=off")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready(&ca_health);
    let mut admin = AdminClient::new(
        ward_spec::grpc::unix_channel(dir.join("ca/admin.sock"))
            .await
            .unwrap(),
    );
    let b = admin
        .get_bundle(admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let bundle =
        ward_spec::TrustBundle::from_jwks(ward_spec::TrustDomain::new(TD).unwrap(), &b.jwks)
            .unwrap();
    std::fs::write(dir.join("bundle.pem"), bundle.x509_pem()).unwrap();
    let my_uid = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").unwrap().uid()
    };

    // ---- Agent A: 1,000 entries ----
    let tok = admin
        .create_join_token(admin::CreateJoinTokenRequest {
            ttl: 0,
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    create_entries(&admin, &tok.agent_id, 1_000, my_uid, 0).await;
    let (agent_a, health_a, sock_a) = start_agent(dir, "a", &ca_addr, &tok.token);
    wait_ready(&health_a);
    while metric(&health_a, "ward_agent_cached_svids") < 1_000.0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client =
        SpiffeWorkloadApiClient::new(ward_spec::grpc::unix_channel(&sock_a).await.unwrap());
    for _ in 0..200 {
        x509_latency(&mut client).await;
    }
    let mut lat: Vec<Duration> = Vec::new();
    for _ in 0..3_000 {
        lat.push(x509_latency(&mut client).await);
    }
    lat.sort();
    println!(
        "FetchX509SVID first response, 1,000 entries cached, 3,000 calls: p50 {} p99 {} max {}",
        us(percentile(&lat, 0.5)),
        us(percentile(&lat, 0.99)),
        us(*lat.last().unwrap())
    );
    let jwt = |c: &mut SpiffeWorkloadApiClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move {
            let t = Instant::now();
            let r = c
                .fetch_jwtsvid(header(wl::JwtsvidRequest {
                    audience: vec!["bench".into()],
                    spiffe_id: String::new(),
                }))
                .await
                .unwrap();
            assert_eq!(r.into_inner().svids.len(), 1);
            t.elapsed()
        }
    };
    let first_jwt = jwt(&mut client).await;
    let mut jl = Vec::new();
    for _ in 0..3_000 {
        jl.push(jwt(&mut client).await);
    }
    jl.sort();
    println!(
        "FetchJWTSVID: first (minted by the CA) {}; cached, 3,000 calls: p50 {} p99 {} max {}",
        us(first_jwt),
        us(percentile(&jl, 0.5)),
        us(percentile(&jl, 0.99)),
        us(*jl.last().unwrap())
    );
    let rss_a = rss_kib(agent_a.0.id(), "VmRSS:");

    // ---- Agent B: 10,000 entries, 40 s SVIDs ----
    let tok = admin
        .create_join_token(admin::CreateJoinTokenRequest {
            ttl: 0,
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let t = Instant::now();
    create_entries(&admin, &tok.agent_id, 10_000, my_uid, 40).await;
    println!(
        "registered 10,000 entries through the admin API in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let (agent_b, health_b, sock_b) = start_agent(dir, "b", &ca_addr, &tok.token);
    wait_ready(&health_b);
    while metric(&health_b, "ward_agent_cached_svids") < 10_000.0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not all SVIDs issued within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let issue_time = start.elapsed();
    let issued_at = Instant::now();
    println!(
        "agent B cold start to 10,000 SVIDs cached: {:.2} s",
        issue_time.as_secs_f64()
    );
    let pid_b = agent_b.0.id();
    let rss_b = rss_kib(pid_b, "VmRSS:");
    println!(
        "RSS: agent A (1,000 SVIDs) {} KiB; agent B (10,000 SVIDs) {} KiB, peak {} KiB; per extra cached SVID {:.2} KiB",
        rss_a, rss_b, rss_kib(pid_b, "VmHWM:"), (rss_b as f64 - rss_a as f64) / 9_000.0
    );

    // The longest call while the 10,000 SVIDs rotate (due at 18-22 s after issue).
    let mut client =
        SpiffeWorkloadApiClient::new(ward_spec::grpc::unix_channel(&sock_b).await.unwrap());
    let rot0 = metric(&health_b, "ward_agent_svid_rotations_total");
    let mut worst = Duration::ZERO;
    let mut all = Vec::new();
    while issued_at.elapsed() < Duration::from_secs(30) {
        let d = x509_latency(&mut client).await;
        worst = worst.max(d);
        all.push(d);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rotated = metric(&health_b, "ward_agent_svid_rotations_total") - rot0;
    all.sort();
    println!(
        "during the mass rotation ({rotated} SVIDs rotated in the window), {} calls: p50 {} p99 {} longest {}",
        all.len(), us(percentile(&all, 0.5)), us(percentile(&all, 0.99)), us(worst)
    );
    println!(
        "peak RSS of agent B after rotation: {} KiB",
        rss_kib(pid_b, "VmHWM:")
    );
}
