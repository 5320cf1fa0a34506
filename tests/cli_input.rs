//! Command-line input to `ward`: bad input gets a clear error naming the
//! problem and exit status 1, never a panic (101) or a silently different
//! meaning; a flag wins over the environment.

mod common;

use std::process::Command;

use common::*;

/// Runs `ward ARGS` with nothing to connect to; (exit code, stderr).
fn ward(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(ward_bin())
        .args(args)
        .env("WARD_ADMIN_SOCKET", dir.path().join("none.sock"))
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn bad_input_is_named_and_exits_1_without_a_panic() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "proxy",
                "run",
                "--forward",
                "127.0.0.1:9",
                "--worker-threads",
                "0",
            ],
            "`worker_threads`: must be from 1 to 1024",
        ),
        (
            &["proxy", "run", "--inbound-listen", "127.0.0.1:15008"],
            "--inbound-listen needs an inbound",
        ),
        (
            &["token", "create", "--ttl", "10000000000000000h"],
            "is too large",
        ),
        (
            &["token", "create", "--ttl", "5124095576030432h"],
            "is too large",
        ),
        (
            &["proxy", "run", "--drain-timeout", "99999999999999d"],
            "is too large",
        ),
        (
            &[
                "proxy",
                "run",
                "--route",
                "listen=127.0.0.1:9,destination=10.0.0.2:15008,id=spiffe://example.org/api,target=db",
            ],
            "`outbound.target`: route 0: \"db\" has no port",
        ),
        (
            &[
                "proxy",
                "run",
                "--route",
                "destination=10.0.0.2:15008,id=spiffe://example.org/api",
            ],
            "nothing can reach it",
        ),
        (
            &[
                "proxy",
                "run",
                "--forward",
                "127.0.0.1:9",
                "--policy-dir",
                "/nonexistent/policies",
            ],
            "`policy.dir`: /nonexistent/policies: no such directory",
        ),
        (
            &["proxy", "run", "--forward", "127.0.0.1:9", "--inbound-port", "admin=127.0.0.1:9"],
            "\"admin\" is not a port",
        ),
        (
            &["proxy", "run", "--inbound-port", "9090=127.0.0.1:9090"],
            "--inbound-port needs an inbound",
        ),
        (
            &["proxy", "run", "--proxy-protocol"],
            "--proxy-protocol needs an inbound",
        ),
        (
            &["proxy", "run", "--forward", "127.0.0.1:9", "--policy-reload-interval", "0s"],
            "`policy.reload_interval`: must be greater than zero",
        ),
        (
            &["proxy", "run", "--forward", "127.0.0.1:9", "--max-inbound-streams", "0"],
            "`limits.max_inbound_streams`: must be greater than zero",
        ),
        (
            &["proxy", "run", "--forward", "127.0.0.1:9", "--keepalive-timeout", "0s"],
            "`limits.keepalive_timeout`: must be greater than zero",
        ),
        (
            &["proxy", "run", "--forward", "127.0.0.1:9", "--max-streams-per-connection", "0"],
            "`limits.max_streams_per_connection`: must be greater than zero",
        ),
        (
            &["proxy", "run", "--forward", "http://127.0.0.1:8080"],
            "`inbound.forward`: \"http://127.0.0.1:8080\" is not host:port",
        ),
        (
            &["proxy", "run", "--forward", "app", "--service-port", "8080"],
            "`inbound.forward`: \"app\" has no port",
        ),
        (
            &["proxy", "run", "--forward", "127.0.0.1:9", "--socket", "tcp://127.0.0.1:8081"],
            "`workload_api_socket`: \"tcp://127.0.0.1:8081\": only a Unix socket",
        ),
    ];
    for (args, said) in cases {
        let (code, err) = ward(args);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.contains(said), "{args:?}: {err}");
        assert!(
            matches!(code, Some(1) | Some(2)),
            "{args:?} exited {code:?}: {err}"
        );
    }
}

/// A listen address in use is an error at start, before the proxy waits
/// for its SVID (here it would wait for good: there is no agent).
/// `ward proxy run` with one route listening on `listen` and a Workload
/// API socket that does not exist (it waits for its SVID for good), and
/// the directory that socket would be in.
fn proxy_without_agent(listen: &str) -> (Command, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let health = format!("127.0.0.1:{}", free_port());
    let route = format!("listen={listen},destination=10.0.0.2:15008,id=spiffe://example.org/api");
    let mut cmd = Command::new(ward_bin());
    cmd.args([
        "proxy",
        "run",
        "--health-address",
        &health,
        "--route",
        &route,
    ])
    .arg("--socket")
    .arg(dir.path().join("none.sock"))
    .stdin(std::process::Stdio::null());
    (cmd, dir)
}

#[test]
fn a_proxy_whose_listen_address_is_taken_exits_at_once_naming_it() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let (mut cmd, _dir) = proxy_without_agent(&addr);
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the proxy did not exit: it waits for its SVID with {addr} in use");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot listen on {addr} (route to 10.0.0.2:15008)"
        )),
        "{err}"
    );
}

/// `--worker-threads` wins over `WARD_WORKER_THREADS`: the runtime's worker
/// threads are counted in `/proc` while the proxy waits for its SVID.
#[test]
fn the_worker_threads_flag_wins_over_the_environment() {
    let threads = |flag: Option<&str>| {
        let (mut cmd, _dir) = proxy_without_agent(&format!("127.0.0.1:{}", free_port()));
        cmd.env("WARD_WORKER_THREADS", "4")
            .stderr(std::process::Stdio::null());
        if let Some(n) = flag {
            cmd.args(["--worker-threads", n]);
        }
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let n = std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .count();
        assert!(child.try_wait().unwrap().is_none(), "the proxy exited");
        let _ = child.kill();
        let _ = child.wait();
        n
    };
    let (env_only, flag_too) = (threads(None), threads(Some("1")));
    // The environment's 4 workers against the flag's single-thread runtime.
    assert!(
        flag_too + 3 <= env_only,
        "threads with --worker-threads 1: {flag_too}, with WARD_WORKER_THREADS=4 alone: {env_only}"
    );
}

/// `ward ca serve` for `trust_domain` with data in `dir` and the upstream
/// root `cert` (key `key`): its exit code and standard error.
fn serve_with_upstream(
    dir: &std::path::Path,
    trust_domain: &str,
    cert: &str,
    key: &str,
) -> (Option<i32>, String) {
    let data = dir.join("data");
    ward(&[
        "ca",
        "serve",
        "--trust-domain",
        trust_domain,
        "--data-dir",
        data.to_str().unwrap(),
        "--bind-address",
        "127.0.0.1:0",
        "--health-address",
        "127.0.0.1:0",
        "--upstream-cert",
        cert,
        "--upstream-key",
        key,
    ])
}

/// An upstream root that may sign no CA (path length 0) is refused at
/// start: the CA's intermediate under it would fail every validation.
#[test]
fn an_upstream_root_that_may_sign_no_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = upstream_root_with(dir.path(), "critical,CA:TRUE,pathlen:0");
    let (code, err) = serve_with_upstream(dir.path(), "example.org", &cert, &key);
    assert!(err.contains("path length constraint is 0"), "{err}");
    assert_eq!(code, Some(1), "{err}");
}

/// An upstream root must be of the CA's own trust domain.
#[test]
fn an_upstream_root_of_another_trust_domain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = upstream_root(dir.path());
    let (code, err) = serve_with_upstream(dir.path(), "other.org", &cert, &key);
    assert!(
        err.contains("for trust domain example.org, not other.org"),
        "{err}"
    );
    assert_eq!(code, Some(1), "{err}");
}

/// A reader that stops early (`ward policy test | head -1`) ends the
/// command quietly, as with any Unix tool, not with a panic.
#[test]
fn output_to_a_reader_that_stops_early_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(ward_bin())
        .args(["policy", "test", "--policies"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
        "{:?}: {err}",
        out.status
    );
}
