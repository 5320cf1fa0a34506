//! End to end: `ward up` is a newcomer's first command. It must bring up the
//! whole demo mesh from nothing, show the demo calls and the policies that
//! decided them, follow policy pushes and rollbacks within seconds, keep the
//! tenants apart, and stop cleanly on Ctrl-C.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_ports, ward_bin};

fn step(n: u32, what: &str) {
    println!("step {n}: {what}");
}

/// A running `ward up`, its stdout collected line by line.
struct Up {
    child: Option<Child>,
    out: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
    base: u16,
}

/// Each `ward up` gets its own block of ports (it uses base + 0..=70),
/// reserved against every other test as [`free_port`]'s are.
fn base_port() -> u16 {
    free_ports(80)
}

/// What the output reads once `ward up` has closed its standard output.
const EXITED: &str = "(standard output closed)";

impl Up {
    /// `ward up`, once it is up.
    fn start() -> Up {
        let up = Up::spawn();
        up.wait_line("Ctrl-C stops the mesh", Duration::from_secs(120));
        up
    }

    /// `ward up`, just started.
    fn spawn() -> Up {
        Up::spawn_in(Command::new(ward_bin()))
    }

    /// `ward up` run by `cmd` (`ward`, or a program that runs it).
    fn spawn_in(mut cmd: Command) -> Up {
        let dir = tempfile::tempdir().unwrap();
        let base = base_port();
        let mut child = cmd
            .args(["up", "--dir"])
            .arg(dir.path())
            .args(["--base-port", &base.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("  | {line}");
                sink.lock().unwrap().push(line);
            }
            sink.lock().unwrap().push(EXITED.to_owned());
        });
        Up {
            child: Some(child),
            out,
            dir,
            base,
        }
    }

    fn text(&self) -> String {
        self.out.lock().unwrap().join("\n")
    }

    /// Waits for a stdout line containing `needle`; returns it.
    fn wait_line(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.out.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline && !self.text().ends_with(EXITED),
                "`ward up` never printed {needle:?}; it printed:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn port(&self, offset: u16) -> String {
        format!("127.0.0.1:{}", self.base + offset)
    }

    /// acme/web's route to acme/api (the first route of the first service).
    fn web_to_api(&self) -> String {
        self.port(14)
    }

    /// acme/web's HTTP CONNECT listener.
    fn web_connect(&self) -> String {
        self.port(13)
    }

    fn ward(&self, args: &[&str]) -> std::process::Output {
        Command::new(ward_bin())
            .args(args)
            .env("WARD_ADMIN_SOCKET", self.dir.path().join("ca/admin.sock"))
            .output()
            .unwrap()
    }

    fn ward_ok(&self, args: &[&str]) -> String {
        let out = self.ward(args);
        assert!(
            out.status.success(),
            "ward {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn decisions(&self, service: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("logs/{service}.decisions.jsonl")),
        )
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
    }

    /// SIGINT, as Ctrl-C sends; returns the exit status.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        Command::new("kill")
            .args(["-INT", &c.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "`ward up` did not stop on SIGINT"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An HTTP GET through a route listener: Some(body) on 200, None if the
/// tunnel was refused (the proxy closes the application's connection, which
/// a write can already find reset).
fn get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if let Err(e) = s.write_all(request.as_bytes()) {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
        return None;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
        .then(|| buf.split_once("\r\n\r\n").unwrap().1.to_owned())
}

/// The status line an HTTP CONNECT listener answers for `target`.
fn connect_status(addr: &str, target: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    line.trim().to_owned()
}

fn repo_policies_with(extra: Option<(&str, &str)>) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "cedar") {
            std::fs::copy(&p, d.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    if let Some((name, text)) = extra {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

const FREEZE: &str = r#"@id("freeze-acme-web-to-api")
forbid (
  principal is Ward::Workload in Ward::Tenant::"acme",
  action == Ward::Action::"connect",
  resource is Ward::Workload in Ward::Tenant::"acme"
)
when { principal.service == "web" && resource.service == "api" };
"#;

#[test]
fn ward_up_runs_the_demo_and_follows_policy_pushes_and_rollbacks() {
    step(1, "`ward up` starts the whole mesh in a fresh directory");
    let mut up = Up::start();
    let text = up.text();
    for part in [
        "CA",
        "policies",
        "agent",
        "acme/web",
        "acme/api",
        "acme/db",
        "globex/web",
        "globex/api",
    ] {
        assert!(
            text.contains(&format!("✓ {part}")),
            "no progress line for {part}:\n{text}"
        );
    }

    step(
        2,
        "the demo calls: in-tenant calls allowed, the rest denied, each with its deciding policy",
    );
    let demo = |caller: &str, callee: &str| {
        text.lines()
            .find(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() > 3 && w[0] == caller && w[2] == callee
            })
            .unwrap_or_else(|| panic!("no demo line for {caller} → {callee}:\n{text}"))
            .to_owned()
    };
    for (caller, callee, verdict, policy) in [
        ("acme/web", "acme/api", "ALLOW", "acme-web-to-api"),
        ("acme/api", "acme/db", "ALLOW", "acme-api-to-db"),
        ("globex/web", "globex/api", "ALLOW", "globex-web-to-api"),
        ("acme/web", "acme/db", "DENY", "default deny"),
        ("acme/web", "globex/api", "DENY", "tenant-isolation"),
        ("globex/web", "acme/api", "DENY", "tenant-isolation"),
    ] {
        let line = demo(caller, callee);
        assert!(line.contains(verdict) && line.contains(policy), "{line}");
        if verdict == "ALLOW" {
            assert!(line.contains(&format!("hello from {callee}")), "{line}");
        }
    }
    up.wait_line(
        "demo stream acme/web → acme/api open",
        Duration::from_secs(10),
    );

    step(
        3,
        "a stream of our own acme/web → acme/api is open and ticking",
    );
    let mut stream = TcpStream::connect(up.web_to_api()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    step(
        4,
        "push a set that forbids acme/web → acme/api: the open stream is closed within 2 s",
    );
    let freeze = repo_policies_with(Some(("freeze.cedar", FREEZE)));
    let pushed = up.ward_ok(&[
        "policy",
        "push",
        freeze.path().to_str().unwrap(),
        "--comment",
        "freeze",
    ]);
    assert!(pushed.contains("version 2 is active"), "{pushed}");
    let pushed_at = Instant::now();
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(
                pushed_at.elapsed() < Duration::from_secs(2),
                "the open stream still carries data 2 s after the push"
            ),
        }
    }
    let closed_after = pushed_at.elapsed();
    assert!(
        closed_after < Duration::from_secs(2),
        "closed only after {closed_after:?}"
    );
    println!("  the open stream closed {closed_after:?} after the push");
    let closed = up
        .decisions("acme-api")
        .into_iter()
        .filter(|d| d["decision"] == "deny")
        .filter(|d| d["policies"].to_string().contains("freeze-acme-web-to-api"))
        .count();
    assert!(closed >= 1, "no deny line names the new policy");
    up.wait_line(
        "demo stream acme/web → acme/api closed",
        Duration::from_secs(5),
    );

    step(
        5,
        "the next attempt gets 403, and the application never answers",
    );
    assert_eq!(
        connect_status(&up.web_connect(), "acme-api:8080"),
        "HTTP/1.1 403 Forbidden"
    );
    assert_eq!(get(&up.web_to_api(), "/"), None);

    step(
        6,
        "the history shows both versions; rollback to 1 lets acme/web in again",
    );
    let history = up.ward_ok(&["policy", "history"]);
    assert!(
        history.contains("freeze") && history.contains("demo set"),
        "{history}"
    );
    let rolled = up.ward_ok(&["policy", "rollback", "1"]);
    assert!(rolled.contains("version 3 is active"), "{rolled}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let body = loop {
        if let Some(b) = get(&up.web_to_api(), "/") {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "still refused 5 s after the rollback"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(body.trim(), "hello from acme/api");
    assert!(connect_status(&up.web_connect(), "acme-api:8080").contains("200"));

    step(
        7,
        "the matrix over the CA's active set and the demo workloads has no cross-tenant allow",
    );
    let active = tempfile::tempdir().unwrap();
    // A file of another set, left there, goes: the directory holds this set.
    let stale = active.path().join("freeze.cedar");
    std::fs::write(&stale, "forbid (principal, action, resource);").unwrap();
    let written: serde_json::Value = serde_json::from_str(&up.ward_ok(&[
        "policy",
        "show",
        "--write",
        active.path().to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
    let files = written["files"].as_array().unwrap();
    assert!(!files.is_empty(), "{written}");
    for f in files {
        assert!(active.path().join(f.as_str().unwrap()).is_file(), "{f}");
    }
    assert!(!stale.exists(), "{written}");
    assert_eq!(written["removed"], serde_json::json!(["freeze.cedar"]));
    // It validates as the CA validated it (no schema file: the built-in one).
    let valid: serde_json::Value = serde_json::from_str(&up.ward_ok(&[
        "policy",
        "validate",
        active.path().to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(valid["schema"], "the built-in schema", "{valid}");
    let workloads = up.dir.path().join("workloads.txt");
    let m: serde_json::Value = serde_json::from_str(&up.ward_ok(&[
        "policy",
        "matrix",
        "--workloads",
        workloads.to_str().unwrap(),
        "--policies",
        active.path().to_str().unwrap(),
        "--port",
        "8080",
        "--port",
        "5432",
        "--output",
        "json",
    ]))
    .unwrap();
    let allowed = m["allowed"].as_array().unwrap();
    assert!(
        allowed.iter().all(|a| a["cross_tenant"] == false),
        "cross-tenant allows: {allowed:?}"
    );
    let pairs: std::collections::BTreeSet<(String, String)> = allowed
        .iter()
        .map(|a| {
            let short =
                |s: &serde_json::Value| s.as_str().unwrap().rsplit('/').next().unwrap().to_owned();
            let tenant =
                |s: &serde_json::Value| s.as_str().unwrap().split('/').nth(4).unwrap().to_owned();
            (
                format!("{}/{}", tenant(&a["principal"]), short(&a["principal"])),
                format!("{}/{}", tenant(&a["resource"]), short(&a["resource"])),
            )
        })
        .collect();
    for want in [
        ("acme/web", "acme/api"),
        ("acme/api", "acme/db"),
        ("globex/web", "globex/api"),
    ] {
        assert!(
            pairs.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} missing from {pairs:?}"
        );
    }
    assert_eq!(pairs.len(), 3, "{pairs:?}");

    step(
        8,
        "Ctrl-C stops every part, none needing to be killed, and frees every port",
    );
    let status = up.interrupt();
    assert!(status.success(), "ward up exited with {status}");
    assert!(up.text().contains("Stopped."));
    assert!(!up.text().contains("did not stop"), "{}", up.text());
    for offset in [0u16, 1, 2, 10, 11, 12, 13, 14, 21, 31, 41, 51] {
        let addr = up.port(offset);
        assert!(
            std::net::TcpListener::bind(&addr).is_ok(),
            "{addr} still in use after ward up stopped"
        );
    }
}

/// Under `nohup`, the terminal's hang-up leaves the mesh running; a `ward
/// up` killed outright (kill -9: no chance to stop anything) still takes
/// its parts with it, and frees every port.
#[test]
fn nohup_keeps_the_mesh_and_kill_9_takes_its_parts_with_it() {
    let mut nohup = Command::new("nohup");
    nohup.arg(ward_bin());
    let mut up = Up::spawn_in(nohup);
    up.wait_line("Ctrl-C stops the mesh", Duration::from_secs(120));
    let mut c = up.child.take().unwrap();
    let pid = c.id().to_string();
    let signal = |name: &str| {
        let ok = Command::new("kill").args([name, &pid]).status().unwrap();
        assert!(ok.success());
    };
    signal("-HUP");
    std::thread::sleep(Duration::from_secs(2));
    assert!(c.try_wait().unwrap().is_none(), "{}", up.text());
    assert!(!up.text().contains("Stopping"), "{}", up.text());
    assert!(!up
        .ward_ok(&["entry", "list", "--output", "json"])
        .is_empty());
    signal("-KILL");
    c.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for offset in [0u16, 1, 2, 10, 11, 12, 13, 14, 21, 31, 41, 51] {
        let addr = up.port(offset);
        while std::net::TcpListener::bind(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "{addr} still in use 30 s after ward up was killed"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Ctrl-C while the mesh is still starting (the CA up, the rest on its
/// way) stops what was started: nothing is left running on its ports.
#[test]
fn ctrl_c_during_startup_stops_the_parts_already_started() {
    let mut up = Up::spawn();
    up.wait_line("✓ CA", Duration::from_secs(60));
    let status = up.interrupt();
    assert!(status.success(), "ward up exited with {status}");
    assert!(up.text().contains("Stopped."), "{}", up.text());
    assert!(
        !up.text().contains("Up in"),
        "it was already up:\n{}",
        up.text()
    );
    for offset in [0u16, 1, 2, 10, 11, 12, 13, 14, 21, 31, 41, 51] {
        let addr = up.port(offset);
        assert!(
            std::net::TcpListener::bind(&addr).is_ok(),
            "{addr} still in use after ward up stopped"
        );
    }
}

/// `ward up --once` in `dir`, on ports of its own, its output piped.
fn up_once(dir: &std::path::Path) -> Child {
    Command::new(ward_bin())
        .args(["up", "--once", "--dir"])
        .arg(dir)
        .args(["--base-port", &base_port().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `ward up --once | head -1`: the reader takes its line and goes; `ward up`
/// runs the demo to its end and stops cleanly instead of panicking on its
/// next line.
#[test]
fn a_reader_that_stops_early_does_not_stop_ward_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = up_once(dir.path());
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("ward up: a local mesh"), "{first}");
    // (The reader is gone: the pipe is closed.)
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`ward up --once` did not stop");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "ward up exited with {status}:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    // It ran the demo after the reader left: acme/web's call was allowed.
    let log = std::fs::read_to_string(dir.path().join("logs/acme-api.decisions.jsonl"))
        .unwrap_or_default();
    let allowed = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|d| d["decision"] == "allow");
    assert!(allowed, "acme/api allowed no call:\n{log}");
}

/// `ward up` again after its CA's data was removed (to start the policies
/// over, say) while the agent's was kept: the agent's node identity, which
/// the new CA never issued, is dropped and the agent attests anew; the
/// mesh comes up and the demo calls go as before.
#[test]
fn a_ca_started_over_gets_the_agent_attested_anew() {
    let dir = tempfile::tempdir().unwrap();
    let once = || {
        let done = up_once(dir.path()).wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&done.stdout).into_owned();
        let err = String::from_utf8_lossy(&done.stderr);
        assert!(
            done.status.success(),
            "ward up --once: {}\n{out}\n{err}",
            done.status
        );
        out
    };
    let first = once();
    assert!(!first.contains("attesting anew"), "{first}");
    std::fs::remove_dir_all(dir.path().join("ca")).unwrap();
    let second = once();
    assert!(second.contains("attesting anew"), "{second}");
    assert!(second.contains("Up in"), "{second}");
}
