//! Helpers the process-level benchmarks share: free ports, the health and
//! metrics endpoints, resident memory, and child processes killed on drop.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::Child;
use std::time::{Duration, Instant};

pub const TD: &str = "example.org";

pub fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some((
        buf.split_whitespace().nth(1)?.parse().ok()?,
        buf.split("\r\n\r\n").nth(1)?.to_owned(),
    ))
}

pub fn metric(addr: &str, name: &str) -> f64 {
    http_get(addr, "/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        })
        .unwrap_or(0.0)
}

pub fn wait_ready(addr: &str) {
    wait_ready_or_show(addr, None);
}

/// [`wait_ready`]; if it never is, the panic shows the end of `log` (the
/// process's own log, which the bench's temporary directory takes with it)
/// and what `/readyz` last said.
pub fn wait_ready_or_show(addr: &str, log: Option<&std::path::Path>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = http_get(addr, "/readyz");
        if ready.as_ref().map(|r| r.0) == Some(200) {
            return;
        }
        if Instant::now() >= deadline {
            let text = log
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{addr} not ready: {ready:?}; its log ends:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

pub struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
