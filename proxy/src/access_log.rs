//! The access log: one JSON line per tunneled stream, written when it ends
//! (as Envoy's and ztunnel's connection logs): which way it went, who was on
//! the other end, what the `CONNECT` was answered, how it ended, the bytes
//! each way and how long it lasted. Lines are buffered and written out every
//! second (and when the proxy stops); off unless `access_log` names a place.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;
use ward_spec::SpiffeId;

use crate::metrics::Direction;

pub struct AccessLog {
    out: Mutex<std::io::BufWriter<Box<dyn Write + Send>>>,
}

/// One stream, as it ended.
pub struct StreamRecord<'a> {
    pub direction: Direction,
    /// Inbound: the peer proxy's address; outbound: the application's.
    pub source: Option<SocketAddr>,
    /// Inbound: the peer's verified SPIFFE ID.
    pub peer_id: Option<&'a SpiffeId>,
    /// Inbound: the local application; outbound: the peer proxy.
    pub destination: &'a str,
    /// Outbound: the `CONNECT` target sent to the peer.
    pub target: Option<&'a str>,
    /// The `CONNECT` answer (sent inbound, received outbound); 0 if none.
    pub status: u16,
    /// `ok`, `denied`, `revoked`, `refused`, `unreachable` or `error`.
    pub outcome: &'a str,
    pub error: Option<String>,
    pub bytes_to_app: u64,
    pub bytes_from_app: u64,
    pub started: Instant,
}

impl AccessLog {
    /// `stdout`, or a file to append to; `off` is no log.
    pub fn open(place: &str) -> std::io::Result<Option<AccessLog>> {
        let out: Box<dyn Write + Send> = match place {
            "off" | "" => return Ok(None),
            "stdout" => Box::new(std::io::stdout()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        Ok(Some(AccessLog {
            out: Mutex::new(std::io::BufWriter::with_capacity(64 * 1024, out)),
        }))
    }

    pub fn write(&self, r: &StreamRecord<'_>) {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let line = json!({
            "time": time,
            "direction": r.direction.label(),
            "source": r.source.map(|a| a.to_string()),
            "peer_id": r.peer_id.map(|id| id.to_string()),
            "destination": r.destination,
            "target": r.target,
            "status": r.status,
            "outcome": r.outcome,
            "error": r.error,
            "bytes_to_app": r.bytes_to_app,
            "bytes_from_app": r.bytes_from_app,
            "duration_ms": (r.started.elapsed().as_secs_f64() * 1e4).round() / 10.0,
        });
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{line}");
        }
    }

    pub fn flush(&self) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.flush();
        }
    }
}
