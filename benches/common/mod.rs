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
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(addr, "/readyz").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "{addr} not ready");
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
