//! The access log: one JSON line per tunneled stream, written when it ends
//! (as Envoy's and ztunnel's connection logs): which way it went, who was on
//! the other end, what the `CONNECT` was answered, how it ended, the bytes
//! each way and how long it lasted. Lines are written out every second (and
//! when the proxy stops) off the serving thread, through a
//! [`LineLog`](ward_spec::linelog::LineLog); off unless `access_log` names a place.
//!
//! A stream's line is a [`StreamLog`], boxed and made only when there is a
//! log, so a stream costs one pointer when there is none. A stream dropped
//! before it ended (cut at the drain deadline, or while being set up when
//! the proxy stopped) is logged with the outcome `cut`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use ward_spec::linelog::LineLog;
use ward_spec::SpiffeId;

use crate::metrics::{Direction, Metrics};

pub struct AccessLog {
    out: LineLog,
}

impl AccessLog {
    /// `stdout`, or a file to append to; `off` is no log.
    pub fn open(place: &str) -> std::io::Result<Option<Arc<AccessLog>>> {
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
        Ok(Some(Arc::new(AccessLog {
            out: LineLog::spawn("access", out, Duration::from_secs(1)),
        })))
    }

    /// Writes out every line so far, waiting (a few seconds at most) for the
    /// destination to take them.
    pub fn flush(&self) {
        self.out.flush();
    }

    /// Lines dropped because the destination was not taking them.
    pub fn dropped(&self) -> u64 {
        self.out.dropped()
    }

    fn write(&self, line: serde_json::Value) {
        self.out.push(line, false);
    }
}

/// How a stream ended, for its line.
pub struct End<'a> {
    /// The `CONNECT` answer (sent inbound, received outbound); 0 if none.
    pub status: u16,
    /// `ok`, `denied`, `refused`, `revoked` (the policy set, new or with a permit lapsed, now denies it),
    /// `untrusted` (its peer is no longer trusted), `cancelled` (the peer
    /// reset it before it was answered), `unreachable` or `error`.
    pub outcome: &'static str,
    pub error: Option<&'a dyn std::fmt::Display>,
    /// (to the application, from the application); None: not known.
    pub bytes: Option<(u64, u64)>,
}

impl<'a> End<'a> {
    /// The end of a stream that carried nothing (refused, or never opened).
    pub fn empty(
        status: u16,
        outcome: &'static str,
        error: Option<&'a dyn std::fmt::Display>,
    ) -> End<'a> {
        End {
            status,
            outcome,
            error,
            bytes: Some((0, 0)),
        }
    }
}

/// One stream's line, written once: by [`StreamLog::end`], or as `cut` if
/// the stream is dropped first.
pub struct StreamLog {
    log: Arc<AccessLog>,
    direction: Direction,
    /// Inbound: the peer proxy's address; outbound: the application's.
    source: SocketAddr,
    /// The peer proxy's verified SPIFFE ID (outbound: once a connection
    /// is chosen).
    peer_id: Option<SpiffeId>,
    /// Outbound: the address the destination resolved to, of the chosen
    /// connection.
    peer_address: Option<SocketAddr>,
    /// Inbound: the authorization's id, as in the decision log.
    decision_id: Option<String>,
    /// Inbound: the local application; outbound: the peer proxy.
    destination: String,
    /// Outbound: the `CONNECT` target.
    target: Option<String>,
    started: Instant,
    written: bool,
}

impl StreamLog {
    /// A line for a stream starting now, if `metrics` has a log.
    pub fn start(
        metrics: &Metrics,
        direction: Direction,
        source: SocketAddr,
        peer_id: Option<&SpiffeId>,
        destination: &str,
        target: Option<&str>,
    ) -> Option<Box<StreamLog>> {
        let log = metrics.access_log.clone()?;
        Some(Box::new(StreamLog {
            log,
            direction,
            source,
            peer_id: peer_id.cloned(),
            peer_address: None,
            decision_id: None,
            destination: destination.to_owned(),
            target: target.map(str::to_owned),
            started: Instant::now(),
            written: false,
        }))
    }

    /// Counts a stream that ended as `end` says (metric `streams_ended`,
    /// by outcome) and writes its line, if there is a log.
    pub fn end(
        metrics: &Metrics,
        direction: Direction,
        this: Option<Box<StreamLog>>,
        end: End<'_>,
    ) {
        metrics.stream_ended(direction, end.outcome);
        if let Some(mut s) = this {
            s.write(&end);
        }
    }

    /// Outbound streams learn their destination once a route is chosen.
    pub fn set_route(this: &mut Option<Box<StreamLog>>, destination: &str, target: &str) {
        if let Some(s) = this {
            s.destination = destination.to_owned();
            s.target = Some(target.to_owned());
        }
    }

    /// Inbound streams to a listed port of their own go to its address.
    pub fn set_destination(this: &mut Option<Box<StreamLog>>, destination: &str) {
        if let Some(s) = this {
            s.destination = destination.to_owned();
        }
    }

    /// Outbound streams learn their peer once a connection is chosen.
    pub fn set_peer(
        this: &mut Option<Box<StreamLog>>,
        peer_id: Option<&SpiffeId>,
        address: SocketAddr,
    ) {
        if let Some(s) = this {
            s.peer_id = peer_id.cloned();
            s.peer_address = Some(address);
        }
    }

    /// Inbound streams: the decision that admitted or denied them.
    pub fn set_decision(this: &mut Option<Box<StreamLog>>, decision_id: &str) {
        if let Some(s) = this {
            s.decision_id = Some(decision_id.to_owned());
        }
    }

    fn write(&mut self, end: &End<'_>) {
        self.written = true;
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        self.log.write(json!({
            "time": time,
            "log": "access",
            "direction": self.direction.label(),
            // (An IPv4 peer of a dual-stack listener as IPv4.)
            "source": SocketAddr::new(self.source.ip().to_canonical(), self.source.port()).to_string(),
            "peer_id": self.peer_id.as_ref().map(|id| id.to_string()),
            "peer_address": self.peer_address.map(|a| a.to_string()),
            "decision_id": self.decision_id,
            "destination": self.destination,
            "target": self.target,
            "status": end.status,
            "outcome": end.outcome,
            "error": end.error.map(|e| e.to_string()),
            "bytes_to_app": end.bytes.map(|b| b.0),
            "bytes_from_app": end.bytes.map(|b| b.1),
            "duration_ms": (self.started.elapsed().as_secs_f64() * 1e4).round() / 10.0,
        }));
    }
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        if !self.written {
            // The bytes it carried went with the stream's own state.
            self.write(&End {
                status: 0,
                outcome: "cut",
                error: None,
                bytes: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 peer reaching a dual-stack listener (`[::]`) is logged as
    /// IPv4, as policies and PROXY protocol headers see it.
    #[test]
    fn an_ipv4_mapped_source_is_logged_as_ipv4() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut metrics = Metrics::default();
        metrics.access_log = AccessLog::open(path.to_str().unwrap()).unwrap();
        for source in ["[::ffff:10.0.0.1]:4000", "[2001:db8::1]:4000"] {
            let log = StreamLog::start(
                &metrics,
                Direction::Inbound,
                source.parse().unwrap(),
                None,
                "127.0.0.1:8080",
                None,
            );
            StreamLog::end(
                &metrics,
                Direction::Inbound,
                log,
                End::empty(403, "denied", None),
            );
        }
        metrics.access_log.as_ref().unwrap().flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let sources: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["source"].to_string())
            .collect();
        assert_eq!(sources, ["\"10.0.0.1:4000\"", "\"[2001:db8::1]:4000\""]);
    }
}
