//! End to end across machines: the CA in one network namespace and two
//! "nodes", each with its own agent, proxy and application in a namespace of
//! its own, joined by veth links on a bridge. Traffic from node 1's `web` to
//! node 2's `api` crosses the links inside the mutual-TLS tunnel; the
//! application on node 2 listens on its loopback only, so nothing but the
//! tunnel reaches it.
//!
//! Needs root and `ip netns`; elsewhere the suite says why and passes nothing
//! off as tested.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::{hash_app, http_get, ward_bin, ClientReport, TD};

fn step(n: u32, what: &str) {
    println!("step {n}: {what}");
}

const WEB: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/web";
const API: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/api";

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Three namespaces (CA, node 1, node 2) on a bridge in the root namespace.
struct Net {
    namespaces: Vec<String>,
    bridge: String,
    /// 10.200.S.0/24; the CA is .1, node 1 .2, node 2 .3, the root namespace .254.
    subnet: u8,
}

impl Net {
    fn create() -> Result<Net, String> {
        let tag = std::process::id() % 10_000;
        let mut net = Net {
            namespaces: vec![],
            bridge: format!("wbr{tag}"),
            subnet: (std::process::id() % 250) as u8,
        };
        sh(&["ip", "link", "add", &net.bridge, "type", "bridge"])?;
        let gw = format!("{}/24", net.addr(254));
        sh(&["ip", "addr", "add", &gw, "dev", &net.bridge])?;
        sh(&["ip", "link", "set", &net.bridge, "up"])?;
        for (i, name) in ["ca", "n1", "n2"].iter().enumerate() {
            let ns = format!("ward-{name}-{tag}");
            sh(&["ip", "netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            let (outer, inner) = (format!("wv{i}o{tag}"), format!("wv{i}i{tag}"));
            sh(&[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            sh(&["ip", "link", "set", &inner, "netns", &ns])?;
            sh(&["ip", "link", "set", &outer, "master", &net.bridge, "up"])?;
            let ip = format!("{}/24", net.addr(i as u8 + 1));
            for cmd in [
                vec!["ip", "addr", "add", &ip, "dev", &inner],
                vec!["ip", "link", "set", &inner, "up"],
                vec!["ip", "link", "set", "lo", "up"],
            ] {
                let mut full = vec!["ip", "netns", "exec", &ns];
                full.extend(cmd);
                sh(&full)?;
            }
        }
        Ok(net)
    }

    fn addr(&self, host: u8) -> String {
        format!("10.200.{}.{host}", self.subnet)
    }

    /// `program args…` inside namespace `i` (0: CA, 1: node 1, 2: node 2).
    fn spawn(&self, i: usize, program: &str, args: &[&str], log: &Path) -> Child {
        let f = std::fs::File::create(log).unwrap();
        Command::new("ip")
            .args(["netns", "exec", &self.namespaces[i], program])
            .args(args)
            .env("WARD_LOG", "info")
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap()
    }

    fn run(&self, i: usize, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.namespaces[i], program])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        let _ = sh(&["ip", "link", "del", &self.bridge]);
    }
}

/// Why this machine cannot run the suite, if it cannot.
fn unsupported() -> Option<String> {
    if common::my_uid() != 0 {
        return Some("not running as root".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the `ip` command (iproute2) is missing".into());
    }
    None
}

/// Children killed (in reverse order) at the end.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        while let Some(mut c) = self.0.pop() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_ready(what: &str, addr: &str, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "{what} exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if http_get(addr, "/readyz").is_some_and(|(c, _)| c == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ward_ok(admin: &Path, args: &[&str]) -> String {
    let out = Command::new(ward_bin())
        .args(args)
        .env("WARD_ADMIN_SOCKET", admin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ward {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn traffic_between_two_nodes_crosses_the_links_inside_the_tunnel() {
    if let Some(why) = unsupported() {
        println!(
            "SKIPPED: the multi-node suite needs root and `ip netns` ({why}); nothing was tested"
        );
        return;
    }
    step(
        1,
        "three network namespaces on a bridge: the CA, node 1, node 2",
    );
    let net = match Net::create() {
        Ok(n) => n,
        Err(e) => {
            println!("SKIPPED: cannot create network namespaces here ({e}); nothing was tested");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut procs = Procs(vec![]);

    step(2, "the CA listens on its own link");
    let ca_addr = format!("{}:8081", net.addr(1));
    let ca_health = format!("{}:8082", net.addr(1));
    let admin = dir.join("ca/admin.sock");
    let log = dir.join("ca.log");
    let mut ca = net.spawn(
        0,
        ward_bin(),
        &[
            "ca",
            "serve",
            "--trust-domain",
            TD,
            "--data-dir",
            dir.join("ca").to_str().unwrap(),
            "--admin-socket",
            admin.to_str().unwrap(),
            "--bind-address",
            &ca_addr,
            "--health-address",
            &ca_health,
        ],
        &log,
    );
    wait_ready("CA", &ca_health, &mut ca, &log);
    procs.0.push(ca);
    std::fs::write(dir.join("bundle.pem"), ward_ok(&admin, &["bundle", "show"])).unwrap();
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    ward_ok(&admin, &["policy", "push", policies]);

    step(
        3,
        "an agent on each node attests to the CA across the links",
    );
    let mut sockets: Vec<PathBuf> = vec![];
    let mut node_ids = vec![];
    for node in [1usize, 2] {
        let token: serde_json::Value =
            serde_json::from_str(&ward_ok(&admin, &["token", "create", "--output", "json"]))
                .unwrap();
        let socket = dir.join(format!("n{node}/workload.sock"));
        let health = format!("{}:8083", net.addr(node as u8 + 1));
        let log = dir.join(format!("agent{node}.log"));
        let mut agent = net.spawn(
            node,
            ward_bin(),
            &[
                "agent",
                "run",
                "--trust-domain",
                TD,
                "--data-dir",
                dir.join(format!("n{node}/data")).to_str().unwrap(),
                "--socket-path",
                socket.to_str().unwrap(),
                "--health-address",
                &health,
                "--ca-address",
                &ca_addr,
                "--trust-bundle",
                dir.join("bundle.pem").to_str().unwrap(),
                "--join-token",
                token["token"].as_str().unwrap(),
            ],
            &log,
        );
        wait_ready(&format!("agent on node {node}"), &health, &mut agent, &log);
        procs.0.push(agent);
        sockets.push(socket);
        node_ids.push(token["agent_id"].as_str().unwrap().to_owned());
    }

    step(
        4,
        "web is registered on node 1, api on node 2 (each the node's root processes)",
    );
    for (id, node) in [(WEB, &node_ids[0]), (API, &node_ids[1])] {
        ward_ok(
            &admin,
            &[
                "entry",
                "create",
                "--spiffe-id",
                id,
                "--parent-id",
                node,
                "--selector",
                "unix:uid:0",
            ],
        );
    }

    step(
        5,
        "node 2: the application on its loopback, api's proxy on the link; node 1: web's proxy",
    );
    let app_log = dir.join("app.log");
    let mut app = net.spawn(
        2,
        "python3",
        &[
            hash_app().to_str().unwrap(),
            "serve",
            "--port",
            "8080",
            "--log",
            app_log.to_str().unwrap(),
        ],
        &dir.join("app.out"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while net
        .run(
            2,
            "python3",
            &[
                "-c",
                "import socket; socket.create_connection(('127.0.0.1', 8080)).close()",
            ],
        )
        .status
        .code()
        != Some(0)
    {
        assert!(
            Instant::now() < deadline,
            "the application on node 2 did not start: {}",
            std::fs::read_to_string(dir.join("app.out")).unwrap_or_default()
        );
        assert!(app.try_wait().unwrap().is_none(), "the application exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    procs.0.push(app);
    let api_inbound = format!("{}:15008", net.addr(3));
    let api_health = format!("{}:15020", net.addr(3));
    let decisions = dir.join("api.decisions.jsonl");
    let log = dir.join("api.log");
    let mut api = net.spawn(
        2,
        ward_bin(),
        &[
            "proxy",
            "run",
            "--socket",
            sockets[1].to_str().unwrap(),
            "--inbound-listen",
            &api_inbound,
            "--forward",
            "127.0.0.1:8080",
            "--health-address",
            &api_health,
            "--decision-log",
            decisions.to_str().unwrap(),
        ],
        &log,
    );
    wait_ready("api's proxy", &api_health, &mut api, &log);
    procs.0.push(api);
    let web_health = format!("{}:15020", net.addr(2));
    let route = format!("listen=127.0.0.1:9001,destination={api_inbound},id={API},target=api:8080");
    let log = dir.join("web.log");
    let mut web = net.spawn(
        1,
        ward_bin(),
        &[
            "proxy",
            "run",
            "--socket",
            sockets[0].to_str().unwrap(),
            "--route",
            &route,
            "--health-address",
            &web_health,
        ],
        &log,
    );
    wait_ready("web's proxy", &web_health, &mut web, &log);
    procs.0.push(web);

    step(
        6,
        "nothing reaches node 2's application except through the tunnel",
    );
    let direct = net.run(
        1,
        "python3",
        &[
            "-c",
            &format!(
                "import socket; socket.create_connection(('{}', 8080), timeout=2)",
                net.addr(3)
            ),
        ],
    );
    assert!(
        !direct.status.success(),
        "node 1 reached node 2's application directly"
    );

    step(
        7,
        "web on node 1 → api on node 2: 16 streams of 1 MiB, SHA-256 checked at both ends",
    );
    let wait_policy = Instant::now() + Duration::from_secs(10);
    let report: ClientReport = loop {
        let out = net.run(
            1,
            "python3",
            &[
                hash_app().to_str().unwrap(),
                "client",
                "--port",
                "9001",
                "--size",
                "1048576",
                "--streams",
                "16",
                "--seconds",
                "0",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: ClientReport = serde_json::from_slice(&out.stdout).unwrap();
        // The policy set may still be on its way to node 2's proxy.
        if r.ok == 16 || Instant::now() > wait_policy {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.ok, 16);
    assert_eq!(report.bytes_received, 16 * 1024 * 1024);

    step(
        8,
        "api's proxy saw web's SPIFFE ID arrive from node 1's address",
    );
    // Allowed streams' lines are written out every second.
    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&decisions)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut lines = read();
    while lines.iter().filter(|d| d["decision"] == "allow").count() < 16
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
        lines = read();
    }
    let allowed: Vec<_> = lines.iter().filter(|d| d["decision"] == "allow").collect();
    assert!(allowed.len() >= 16, "{lines:?}");
    for d in &allowed {
        assert_eq!(d["principal"], WEB);
        assert_eq!(d["context"]["source_address"], net.addr(2).as_str());
        assert_eq!(d["policies"][0], "acme-web-to-api");
    }
    let crossed = common::metric_value(
        &api_health,
        "ward_proxy_connections_total{direction=\"inbound\"}",
    );
    assert!(crossed >= 1.0);
}
