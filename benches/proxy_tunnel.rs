//! Tunnel performance on loopback: Ward's proxies against stunnel4 and
//! HAProxy set up the same way, and against no tunnel, all in one run.
//!
//! Run: `cargo bench --bench proxy_tunnel` (needs `stunnel4`, `haproxy` and
//! `iperf3` from Debian; `.ci/run` installs them).
//!
//! Topology for each: client → client-side proxy → mutual TLS 1.3 (ECDSA
//! P-256) → server-side proxy → server. Ward: `ward proxy run` route listener
//! → HBONE → `ward proxy run` inbound (Cedar-authorized, decision log on).
//! stunnel4 and HAProxy: a client-mode and a server-mode process each,
//! verifying each other's certificates against one CA.
//!
//! Measurements interleave the tunnels round by round, each round starting
//! with the next tunnel, so that a slow spell of the (shared, noisy) machine,
//! or the load of the tunnel measured just before, hits them alike.
//!
//! 1. Single-stream bulk throughput: `iperf3 -c` for 5 s, 5 rounds
//!    (`WARD_BENCH_ROUNDS`), median, and in how many rounds Ward reached
//!    1.3 × the better peer of that round. Also the CPU time the tunnel's
//!    two processes spent per GB carried (`/proc/PID/stat`), median round.
//! 2. 1 KiB request/response over one persistent connection: 20 rounds of
//!    2,000 round trips per tunnel, the tunnels taking turns round trip by
//!    round trip (`WARD_BENCH_RR_BLOCK` for longer turns); pooled p50/p99,
//!    what each adds over direct, and in how many rounds Ward's p99 was
//!    below each peer's.
//! 3. New application connections per second: 16 clients for 2 s, each
//!    connecting, echoing one byte and closing; 5 rounds
//!    (`WARD_BENCH_ROUNDS`), median.
//! 4. Ward proxy RSS when idle and with 10,000 idle tunneled streams.
//!
//! For profiling: `WARD_BENCH_HOLD=SECONDS` sets everything up, prints where
//! each tunnel listens and the Ward proxies' pids, and measures nothing;
//! `WARD_BENCH_WARD_BIN=PATH` runs another `ward` build (two holds side by
//! side compare two builds).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::*;

const WEB: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/web";
const API: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/api";

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `ward` binary under test: this build's, or `WARD_BENCH_WARD_BIN` (to
/// hold two builds side by side for an A/B comparison).
fn ward() -> Command {
    Command::new(
        std::env::var_os("WARD_BENCH_WARD_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_ward").into()),
    )
}

/// A tunnel under test: where the client connects.
struct Tunnel {
    name: &'static str,
    entry: u16,
    procs: Vec<Killed>,
}

impl Tunnel {
    /// The tunnel's own processes (none for direct).
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.0.id()).collect()
    }
}

// ---------------------------------------------------------------- servers

/// An echo server on `port` (a one-thread tokio runtime), until `stop`.
fn echo_server(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let Ok(Ok((mut s, _))) =
                    tokio::time::timeout(Duration::from_millis(100), l.accept()).await
                else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        })
    })
}

// ---------------------------------------------------------------- measurements

/// One `iperf3` run through `port`: bits per second, and the CPU seconds the
/// tunnel's processes (`pids`) spent per gigabyte received.
fn iperf(port: u16, pids: &[u32]) -> (f64, f64) {
    let cpu = cpu_seconds(pids);
    let out = Command::new("iperf3")
        .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", "5", "-J"])
        .output()
        .unwrap();
    let cpu = cpu_seconds(pids) - cpu;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let got = &v["end"]["sum_received"];
    match (got["bits_per_second"].as_f64(), got["bytes"].as_f64()) {
        (Some(bps), Some(bytes)) => (bps, cpu / (bytes / 1e9)),
        _ => panic!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout)),
    }
}

/// CPU time (user and system, every thread) that processes have used so
/// far, in seconds, from `/proc/PID/stat` (in clock ticks of 1/100 s: Linux's
/// `USER_HZ`).
fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After the command name (which may hold spaces): utime and stime
            // are the 12th and 13th fields.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|f| f.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    ticks as f64 / 100.0
}

/// One round of request/response: a persistent connection through each tunnel
/// in `ports`, 200 warm-up round trips on each, then `trips` timed 1 KiB round
/// trips on each, taken in blocks of `block` and rotating from tunnel to
/// tunnel, so that a slow spell of the machine falls on all of them alike.
fn request_response(ports: &[u16], trips: usize, block: usize) -> Vec<Vec<Duration>> {
    let msg = [7u8; 1024];
    let mut buf = [0u8; 1024];
    let mut trip = |s: &mut TcpStream| {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut buf).unwrap();
        t.elapsed()
    };
    let mut conns: Vec<TcpStream> = ports
        .iter()
        .map(|p| {
            let mut s = TcpStream::connect(("127.0.0.1", *p)).unwrap();
            s.set_nodelay(true).unwrap();
            for _ in 0..200 {
                trip(&mut s);
            }
            s
        })
        .collect();
    let mut times = vec![Vec::with_capacity(trips); ports.len()];
    let block = block.clamp(1, trips.max(1));
    for b in 0..trips.div_ceil(block) {
        let n = block.min(trips - b * block);
        for i in turns(conns.len(), b) {
            for _ in 0..n {
                times[i].push(trip(&mut conns[i]));
            }
        }
    }
    times
}

fn connections_per_second(port: u16, clients: usize, secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                    s.set_nodelay(true).unwrap();
                    s.write_all(b"x").unwrap();
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

/// The order of the tunnels in round `round`: each round starts with the
/// next one, so none always runs first or right after the same neighbour.
fn turns(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (round + k) % n)
}

/// A count from the environment, or `default`.
fn env_count(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: f64) -> String {
    format!("{d:.1} µs")
}

// ---------------------------------------------------------------- set-up

/// A CA and certificates for the stunnel and HAProxy pairs (ECDSA P-256).
fn peer_certs(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "bench CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    for (name, eku) in [
        ("server", rcgen::ExtendedKeyUsagePurpose::ServerAuth),
        ("client", rcgen::ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![format!("{name}.test")]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name}.test"));
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        std::fs::write(
            dir.join(format!("{name}-bundle.pem")),
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )
        .unwrap();
    }
}

fn stunnel(dir: &Path, app: u16) -> Tunnel {
    let (entry, mid) = (port(), port());
    let d = dir.display();
    let common = "foreground = yes\npid =\ndebug = 3\n";
    let server = format!(
        "{common}[server]\naccept = 127.0.0.1:{mid}\nconnect = 127.0.0.1:{app}\ncert = {d}/server.pem\nkey = {d}/server.key\nCAfile = {d}/ca.pem\nverifyChain = yes\nsslVersionMin = TLSv1.3\n"
    );
    let client = format!(
        "{common}[client]\nclient = yes\naccept = 127.0.0.1:{entry}\nconnect = 127.0.0.1:{mid}\ncert = {d}/client.pem\nkey = {d}/client.key\nCAfile = {d}/ca.pem\nverifyChain = yes\nsslVersionMin = TLSv1.3\n"
    );
    let pair = [("stunnel-server", server), ("stunnel-client", client)];
    peer_pair(dir, "stunnel4", "stunnel4", &[], pair, "conf", (entry, mid))
}

/// Starts a server-side and a client-side process of a peer tunnel, each with
/// its config file, and waits until both listen.
fn peer_pair(
    dir: &Path,
    name: &'static str,
    program: &str,
    args: &[&str],
    pair: [(&'static str, String); 2],
    ext: &str,
    (entry, mid): (u16, u16),
) -> Tunnel {
    let procs = pair
        .into_iter()
        .map(|(file, cfg)| {
            let path = dir.join(format!("{file}.{ext}"));
            std::fs::write(&path, cfg).unwrap();
            Killed(
                Command::new(program)
                    .args(args)
                    .arg(&path)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.join(format!("{file}.log"))).unwrap())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    wait_listening(mid);
    wait_listening(entry);
    Tunnel { name, entry, procs }
}

fn haproxy(dir: &Path, app: u16) -> Tunnel {
    let (entry, mid) = (port(), port());
    let d = dir.display();
    let common = "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n";
    let server = format!(
        "{common}frontend tls_in\n  bind 127.0.0.1:{mid} ssl crt {d}/server-bundle.pem ca-file {d}/ca.pem verify required ssl-min-ver TLSv1.3\n  default_backend app\nbackend app\n  server app 127.0.0.1:{app}\n"
    );
    let client = format!(
        "{common}frontend plain_in\n  bind 127.0.0.1:{entry}\n  default_backend tls_out\nbackend tls_out\n  server s 127.0.0.1:{mid} ssl crt {d}/client-bundle.pem ca-file {d}/ca.pem verify required verifyhost server.test ssl-min-ver TLSv1.3\n"
    );
    let pair = [("haproxy-server", server), ("haproxy-client", client)];
    peer_pair(
        dir,
        "HAProxy",
        "haproxy",
        &["-db", "-f"],
        pair,
        "cfg",
        (entry, mid),
    )
}

struct WardMesh {
    _ca: Killed,
    _agent: Killed,
    tunnel: Tunnel,
    web_pid: u32,
    api_pid: u32,
    web_health: String,
    api_health: String,
}

fn ward_mesh(dir: &Path, app: u16) -> WardMesh {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(dir).unwrap();
    for d in [dir, dir.parent().unwrap()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let ca_addr = format!("127.0.0.1:{}", port());
    let ca_health = format!("127.0.0.1:{}", port());
    let ca = Killed(
        ward()
            .args([
                "ca",
                "serve",
                "--trust-domain",
                TD,
                "--bind-address",
                &ca_addr,
            ])
            .args(["--health-address", &ca_health, "--data-dir"])
            .arg(dir.join("ca"))
            .env("WARD_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready(&ca_health);
    let admin_sock = dir.join("ca/admin.sock");
    let cli = |args: &[&str]| -> serde_json::Value {
        let out = ward()
            .args(args)
            .args(["--output", "json"])
            .env("WARD_ADMIN_SOCKET", &admin_sock)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let bundle = ward()
        .args(["bundle", "show"])
        .env("WARD_ADMIN_SOCKET", &admin_sock)
        .output()
        .unwrap();
    std::fs::write(dir.join("bundle.pem"), bundle.stdout).unwrap();
    let token = cli(&["token", "create"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent_health = format!("127.0.0.1:{}", port());
    let socket = dir.join("agent.sock");
    let agent = Killed(
        ward()
            .args([
                "agent",
                "run",
                "--trust-domain",
                TD,
                "--ca-address",
                &ca_addr,
            ])
            .args(["--join-token", &token, "--health-address", &agent_health])
            .arg("--trust-bundle")
            .arg(dir.join("bundle.pem"))
            .arg("--data-dir")
            .arg(dir.join("agent"))
            .arg("--socket-path")
            .arg(&socket)
            .env("WARD_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready(&agent_health);
    let node = cli(&["agent", "list"])[0]["spiffe_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (id, uid) in [(WEB, 1001), (API, 1002)] {
        cli(&[
            "entry",
            "create",
            "--spiffe-id",
            id,
            "--parent-id",
            &node,
            "--selector",
            &format!("unix:uid:{uid}"),
        ]);
    }
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let (inbound, entry) = (port(), port());
    let (web_health, api_health) = (
        format!("127.0.0.1:{}", port()),
        format!("127.0.0.1:{}", port()),
    );
    let proxy = |uid: u32, health: &str, args: Vec<String>, log: &str| {
        Killed(
            ward()
                .args(["proxy", "run", "--socket"])
                .arg(&socket)
                .args(["--health-address", health])
                .args(args)
                .env("WARD_LOG", "warn")
                .env(
                    "WARD_WORKER_THREADS",
                    std::env::var("WARD_BENCH_PROXY_THREADS").unwrap_or_default(),
                )
                .uid(uid)
                .gid(uid)
                .current_dir("/")
                .stdout(std::fs::File::create(dir.join(format!("{log}.decisions"))).unwrap())
                .stderr(std::fs::File::create(dir.join(format!("{log}.log"))).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let api = proxy(
        1002,
        &api_health,
        vec![
            "--inbound-listen".into(),
            format!("127.0.0.1:{inbound}"),
            "--forward".into(),
            format!("127.0.0.1:{app}"),
            "--policy-dir".into(),
            policies.display().to_string(),
            "--decision-log".into(),
            std::env::var("WARD_BENCH_DECISION_LOG").unwrap_or_else(|_| "stdout".into()),
            "--max-connections".into(),
            "200000".into(),
        ],
        "api",
    );
    let web = proxy(
        1001,
        &web_health,
        vec![
            "--route".into(),
            format!("listen=127.0.0.1:{entry},destination=127.0.0.1:{inbound},id={API}"),
        ],
        "web",
    );
    wait_ready_or_show(&api_health, Some(&dir.join("api.log")));
    wait_ready_or_show(&web_health, Some(&dir.join("web.log")));
    WardMesh {
        web_pid: web.0.id(),
        api_pid: api.0.id(),
        _ca: ca,
        _agent: agent,
        tunnel: Tunnel {
            name: "Ward",
            entry,
            procs: vec![web, api],
        },
        web_health,
        api_health,
    }
}

fn main() {
    if let Ok(port) = std::env::var("WARD_BENCH_ECHO_PORT") {
        let stop = Arc::new(AtomicBool::new(false));
        echo_server(port.parse().unwrap(), stop).join().unwrap();
        return;
    }
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    for tool in ["stunnel4", "haproxy", "iperf3"] {
        assert!(
            Command::new("which")
                .arg(tool)
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is not installed (apt-get install stunnel4 haproxy iperf3)"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().to_owned();
    peer_certs(&dir);
    let app = port();
    let ward = ward_mesh(&dir.join("ward"), app);
    let tunnels = [
        Tunnel {
            name: "direct",
            entry: app,
            procs: vec![],
        },
        stunnel(&dir, app),
        haproxy(&dir, app),
    ];
    let all: Vec<&Tunnel> = tunnels.iter().chain([&ward.tunnel]).collect();
    // `WARD_BENCH_HOLD=SECONDS` keeps the tunnels (and an echo server) up
    // for that long and measures nothing: for profiling with outside tools.
    if let Some(secs) = std::env::var("WARD_BENCH_HOLD")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let _echo = Killed(
            Command::new(std::env::current_exe().unwrap())
                .env("WARD_BENCH_ECHO_PORT", app.to_string())
                .spawn()
                .unwrap(),
        );
        for t in &all {
            println!("holding {:>9}: 127.0.0.1:{}", t.name, t.entry);
        }
        println!(
            "holding Ward proxies: client side pid {}, server side pid {}",
            ward.web_pid, ward.api_pid
        );
        std::thread::sleep(Duration::from_secs(secs));
        return;
    }
    // `WARD_BENCH_ONLY=Ward` measures only that tunnel (for profiling), or a
    // comma-separated list of them.
    let only = std::env::var("WARD_BENCH_ONLY").ok();
    let skip = |t: &Tunnel| {
        only.as_deref()
            .is_some_and(|o| o.split(',').all(|n| n.trim() != t.name))
    };
    let idle_rss = (
        rss_kib(ward.web_pid, "VmRSS:"),
        rss_kib(ward.api_pid, "VmRSS:"),
    );

    // `WARD_BENCH_PHASES=rr,cps` runs only those (of throughput, rr, cps, rss).
    let phases =
        std::env::var("WARD_BENCH_PHASES").unwrap_or_else(|_| "throughput,rr,cps,rss".into());
    let phase = |p: &str| phases.split(',').any(|x| x.trim() == p);
    // Interleaved rounds of throughput and connections per second.
    let rounds = env_count("WARD_BENCH_ROUNDS", 5);
    let mut gbps = [f64::NAN; 4];
    // CPU seconds the tunnel's two processes spend per GB carried.
    let mut cpu_per_gb = [f64::NAN; 4];
    let mut rr = [(f64::NAN, f64::NAN); 4];
    let mut cps = [f64::NAN; 4];
    // RSS right before the 10,000 streams open: the earlier phases leave the
    // allocator holding some memory, which is not the streams' cost.
    let (mut before_rss, mut loaded_rss, mut conns) = ((0, 0), (0, 0), f64::NAN);
    let cps_clients: usize = std::env::var("WARD_BENCH_CPS_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);

    // 1. Throughput: iperf3's server on the application port.
    if phase("throughput") {
        let iperf_server = Killed(
            Command::new("iperf3")
                .args(["-s", "-p", &app.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_listening(app);
        // Rounds interleave the tunnels (each round starting with the next
        // one), so a slow spell of this shared machine hits them alike; the
        // median round counts.
        let mut runs = vec![Vec::new(); all.len()];
        let mut cpu = vec![Vec::new(); all.len()];
        for r in 0..rounds {
            for i in turns(all.len(), r).filter(|i| !skip(all[*i])) {
                let (bps, cpu_per_gb) = iperf(all[i].entry, &all[i].pids());
                runs[i].push(bps / 1e9);
                cpu[i].push(cpu_per_gb);
            }
        }
        // Round by round: Ward against the better peer of the same round.
        if only.is_none() {
            let ratios: Vec<f64> = (0..rounds)
                .map(|r| runs[3][r] / runs[1][r].max(runs[2][r]))
                .collect();
            let met = ratios.iter().filter(|x| **x >= 1.3).count();
            println!(
                "throughput rounds with Ward ≥ 1.3 × the better peer: {met} of {rounds} (ratios: {ratios:.2?})"
            );
        }
        for (i, t) in all.iter().enumerate().filter(|(_, t)| !skip(t)) {
            gbps[i] = median(&mut runs[i]);
            cpu_per_gb[i] = median(&mut cpu[i]);
            println!(
                "throughput {:>9}: {:.2} Gbit/s (rounds: {:.2?}), {:.3} CPU s per GB (rounds: {:.3?})",
                t.name, gbps[i], runs[i], cpu_per_gb[i], cpu[i]
            );
        }
        drop(iperf_server);
        std::thread::sleep(Duration::from_millis(300));
    }

    // 2, 3 and 4: an echo server on the application port, in a process of its own.
    let _echo = Killed(
        Command::new(std::env::current_exe().unwrap())
            .env("WARD_BENCH_ECHO_PORT", app.to_string())
            .spawn()
            .unwrap(),
    );
    wait_listening(app);
    // Per round, each tunnel's p99 (to compare tunnels round by round).
    let mut round_p99: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
    if phase("rr") {
        // Rounds (`WARD_BENCH_RR_ROUNDS`, default 20) of 2,000 round trips
        // per tunnel (`WARD_BENCH_RR_TRIPS`), pooled. Within a round the
        // tunnels take turns every `WARD_BENCH_RR_BLOCK` round trips (default
        // 1), so the machine's slow and fast spells fall on all of them alike.
        let (rounds, trips) = (
            env_count("WARD_BENCH_RR_ROUNDS", 20),
            env_count("WARD_BENCH_RR_TRIPS", 2_000),
        );
        let block = env_count("WARD_BENCH_RR_BLOCK", 1);
        let measured: Vec<usize> = (0..all.len()).filter(|i| !skip(all[*i])).collect();
        let ports: Vec<u16> = measured.iter().map(|i| all[*i].entry).collect();
        let mut times = vec![Vec::new(); all.len()];
        for _ in 0..rounds {
            for (mut round, i) in request_response(&ports, trips, block)
                .into_iter()
                .zip(&measured)
            {
                round.sort();
                round_p99[*i].push(pct(&round, 0.99).as_secs_f64() * 1e6);
                times[*i].extend(round);
            }
        }
        for (i, t) in all.iter().enumerate().filter(|(_, t)| !skip(t)) {
            times[i].sort();
            let (p50, p99) = (pct(&times[i], 0.5), pct(&times[i], 0.99));
            println!("1 KiB rr   {:>9}: p50 {:?} p99 {:?}", t.name, p50, p99);
            rr[i] = (p50.as_secs_f64() * 1e6, p99.as_secs_f64() * 1e6);
        }
    }
    if phase("cps") {
        let mut runs = vec![Vec::new(); all.len()];
        for r in 0..rounds {
            for i in turns(all.len(), r).filter(|i| !skip(all[*i])) {
                runs[i].push(connections_per_second(all[i].entry, cps_clients, 2));
            }
        }
        for (i, t) in all.iter().enumerate().filter(|(_, t)| !skip(t)) {
            cps[i] = median(&mut runs[i]);
            println!(
                "conn/s     {:>9}: {:.0} (rounds: {:.0?})",
                t.name, cps[i], runs[i]
            );
        }
    }

    // 4. 10,000 idle tunneled streams through Ward.
    if phase("rss") {
        before_rss = (
            rss_kib(ward.web_pid, "VmRSS:"),
            rss_kib(ward.api_pid, "VmRSS:"),
        );
        let mut idle = Vec::with_capacity(10_000);
        for _ in 0..10_000 {
            idle.push(TcpStream::connect(("127.0.0.1", ward.tunnel.entry)).unwrap());
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let open =
            |h: &str, d: &str| metric(h, &format!("ward_proxy_streams_open{{direction=\"{d}\"}}"));
        let opened = || {
            (
                open(&ward.web_health, "outbound"),
                open(&ward.api_health, "inbound"),
            )
        };
        while opened() != (10_000.0, 10_000.0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(opened(), (10_000.0, 10_000.0), "streams did not all open");
        std::thread::sleep(Duration::from_secs(2));
        loaded_rss = (
            rss_kib(ward.web_pid, "VmRSS:"),
            rss_kib(ward.api_pid, "VmRSS:"),
        );
        conns = metric(
            &ward.web_health,
            "ward_proxy_connections_open{direction=\"outbound\"}",
        );
        drop(idle);
    }

    // Report.
    let (d, s, h, w) = (0, 1, 2, 3);
    let better_peer = gbps[s].max(gbps[h]);
    println!();
    println!("| | direct | stunnel4 | HAProxy | Ward | Ward / goal |");
    println!("|---|---|---|---|---|---|");
    // Only the rows of the phases that ran.
    if phase("throughput") {
        println!(
            "| single-stream throughput (iperf3) | {:.2} Gbit/s | {:.2} Gbit/s | {:.2} Gbit/s | {:.2} Gbit/s | {:.2} × the better peer (goal ≥ 1.3) |",
            gbps[d], gbps[s], gbps[h], gbps[w], gbps[w] / better_peer
        );
        println!(
            "| CPU per GB carried, both tunnel processes (median round) | – | {:.3} s | {:.3} s | {:.3} s | {:.2} × the more frugal peer's |",
            cpu_per_gb[s],
            cpu_per_gb[h],
            cpu_per_gb[w],
            cpu_per_gb[w] / cpu_per_gb[s].min(cpu_per_gb[h])
        );
    }
    if phase("rr") {
        for (name, p99) in [("p50", false), ("p99", true)] {
            let [dd, ss, hh, ww] = [d, s, h, w].map(|i| us(if p99 { rr[i].1 } else { rr[i].0 }));
            println!("| 1 KiB request/response {name} | {dd} | {ss} | {hh} | {ww} | |");
        }
        let added = |i: usize| (rr[i].0 - rr[d].0, rr[i].1 - rr[d].1);
        println!(
            "| p50 / p99 added over direct | – | {} / {} | {} / {} | {} / {} | p99 added {:.3} ms (goal ≤ 0.2 ms and below both peers) |",
            us(added(s).0), us(added(s).1), us(added(h).0), us(added(h).1), us(added(w).0), us(added(w).1),
            added(w).1 / 1000.0
        );
        // Round by round: in how many rounds was Ward's p99 below the peer's?
        let below = |peer: usize| {
            let pairs = round_p99[w].iter().zip(&round_p99[peer]);
            let n = pairs.clone().count();
            (pairs.filter(|(a, b)| a < b).count(), n)
        };
        println!(
            "| rounds with Ward's p99 below the peer's | – | {} of {} | {} of {} | – | |",
            below(s).0,
            below(s).1,
            below(h).0,
            below(h).1
        );
    }
    if phase("cps") {
        println!(
            "| new connections per second ({cps_clients} clients) | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} × stunnel4 (goal ≥ 5) |",
            cps[d], cps[s], cps[h], cps[w], cps[w] / cps[s]
        );
    }
    if !phase("rss") {
        drop(ward);
        return;
    }
    let per_stream = |idle: u64, loaded: u64| (loaded.saturating_sub(idle)) as f64 / 10_000.0;
    println!();
    println!(
        "Ward proxy RSS: client side {} KiB idle at start, {} KiB idle after the other phases, {} KiB with 10,000 idle streams ({:.2} KiB per stream, {} TLS connections); server side {} KiB idle at start, {} KiB after the other phases, {} KiB ({:.2} KiB per stream). Goal ≤ 4 KiB per idle stream.",
        idle_rss.0,
        before_rss.0,
        loaded_rss.0,
        per_stream(before_rss.0, loaded_rss.0),
        conns,
        idle_rss.1,
        before_rss.1,
        loaded_rss.1,
        per_stream(before_rss.1, loaded_rss.1),
    );
    println!(
        "Per stream counted from the RSS at start instead: client side {:.2} KiB, server side {:.2} KiB.",
        per_stream(idle_rss.0, loaded_rss.0),
        per_stream(idle_rss.1, loaded_rss.1),
    );
    drop(ward);
}
