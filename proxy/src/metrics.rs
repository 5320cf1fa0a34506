//! Prometheus metrics of the proxy.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use ward_authz::reload::ReloadStats;

use crate::access_log::AccessLog;

type Labels = Vec<(&'static str, &'static str)>;

/// Which way a connection or stream goes, seen from this proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a peer proxy to the local application.
    Inbound,
    /// From the local application to a peer proxy.
    Outbound,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// The per-direction series, resolved once (streams update them often).
#[derive(Clone, Default)]
struct Series {
    connections_open: Gauge,
    connections: Counter,
    streams_open: Gauge,
    streams: Counter,
    to_app: Counter,
    from_app: Counter,
    /// `streams_ended` by outcome, made at start (a stream's end then
    /// takes no lookup or allocation).
    ended: Vec<(&'static str, Counter)>,
}

/// The outcomes a stream ends with (the access log's).
const OUTCOMES: [&str; 10] = [
    "ok",
    "denied",
    "refused",
    "revoked",
    "untrusted",
    "expired",
    "cancelled",
    "unreachable",
    "error",
    "cut",
];

/// A stream being handled (see [`Metrics::stream_task`]).
pub struct StreamTask(Gauge);

impl Drop for StreamTask {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct Metrics {
    registry: Registry,
    inbound: Series,
    outbound: Series,
    allow: Counter,
    deny: Counter,
    deny_dry_run: Counter,
    connections_open: Family<Labels, Gauge>,
    connections: Family<Labels, Counter>,
    streams_open: Family<Labels, Gauge>,
    streams: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    handshake_failures: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    streams_ended: Family<Labels, Counter>,
    decisions: Family<Labels, Counter>,
    svid_expiry: Gauge,
    policy_reloads: Family<Labels, Counter>,
    log_lines_dropped: Family<Labels, Counter>,
    streams_revoked: Counter,
    /// Streams being handled, from their accept (set-up included: the
    /// peer's answer, authorization, the connection to the application)
    /// until they end: what a drain waits for. Not exported.
    stream_tasks: Gauge,
    /// Unix seconds when the current SVID expires (0: none yet).
    pub svid_not_after: AtomicI64,
    pub reload_stats: Arc<ReloadStats>,
    /// One line per stream as it ends, if configured.
    pub access_log: Option<Arc<AccessLog>>,
    /// One render at a time: each brings counters kept elsewhere up to
    /// date by adding the difference, which two at once would add twice.
    rendering: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ward_proxy");
        let m = Metrics {
            registry: Registry::default(),
            inbound: Series::default(),
            outbound: Series::default(),
            allow: Counter::default(),
            deny: Counter::default(),
            deny_dry_run: Counter::default(),
            connections_open: Family::default(),
            connections: Family::default(),
            streams_open: Family::default(),
            streams: Family::default(),
            bytes: Family::default(),
            handshake_failures: Family::default(),
            refused: Family::default(),
            streams_ended: Family::default(),
            decisions: Family::default(),
            svid_expiry: Gauge::default(),
            policy_reloads: Family::default(),
            log_lines_dropped: Family::default(),
            streams_revoked: Counter::default(),
            stream_tasks: Gauge::default(),
            svid_not_after: AtomicI64::new(0),
            reload_stats: Arc::new(ReloadStats::default()),
            access_log: None,
            rendering: std::sync::Mutex::new(()),
        };
        registry.register(
            "connections_open",
            "TLS connections open, by direction",
            m.connections_open.clone(),
        );
        registry.register(
            "connections",
            "TLS connections established, by direction",
            m.connections.clone(),
        );
        registry.register(
            "streams_open",
            "Tunneled streams open, by direction",
            m.streams_open.clone(),
        );
        registry.register(
            "streams",
            "Tunneled streams carried, by direction (inbound: each one admitted; outbound: a route's from its CONNECT on, an HTTP CONNECT client's once the peer answered)",
            m.streams.clone(),
        );
        registry.register(
            "bytes",
            "Application bytes carried, by direction and flow (to_app or from_app)",
            m.bytes.clone(),
        );
        registry.register(
            "handshake_failures",
            "TLS or HTTP/2 handshakes that failed, by direction and reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "streams_ended",
            "Streams ended, by direction and outcome (as the access log's: ok, denied, refused, revoked, untrusted, expired, cancelled, unreachable, error)",
            m.streams_ended.clone(),
        );
        registry.register(
            "refused",
            "Connections closed as soon as accepted (inbound: from peers, before any handshake; outbound: from applications), by direction and reason",
            m.refused.clone(),
        );
        registry.register(
            "authorization_decisions",
            "Inbound stream authorizations, by decision",
            m.decisions.clone(),
        );
        registry.register(
            "svid_expiry_seconds",
            "Seconds until this proxy's X509-SVID expires",
            m.svid_expiry.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy set loads, by result (loaded or rejected: the previous set stays)",
            m.policy_reloads.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Decision and access log lines dropped because the log's destination was not taking them, by log",
            m.log_lines_dropped.clone(),
        );
        registry.register(
            "streams_revoked",
            "Open inbound streams closed because a new policy set denies them",
            m.streams_revoked.clone(),
        );
        // One statement per series: a lookup's read guard lives to the end of
        // its statement, and the next lookup may need the write lock.
        fn get<M: Clone + Default>(
            f: &Family<Vec<(&'static str, &'static str)>, M>,
            l: Vec<(&'static str, &'static str)>,
        ) -> M {
            let m = f.get_or_create(&l).clone();
            m
        }
        let series = |d: Direction| {
            let l = vec![("direction", d.label())];
            let with_flow = |flow| vec![("direction", d.label()), ("flow", flow)];
            Series {
                connections_open: get(&m.connections_open, l.clone()),
                connections: get(&m.connections, l.clone()),
                streams_open: get(&m.streams_open, l.clone()),
                streams: get(&m.streams, l),
                to_app: get(&m.bytes, with_flow("to_app")),
                from_app: get(&m.bytes, with_flow("from_app")),
                ended: OUTCOMES
                    .iter()
                    .map(|&o| {
                        let l = vec![("direction", d.label()), ("outcome", o)];
                        (o, get(&m.streams_ended, l))
                    })
                    .collect(),
            }
        };
        let decision = |d: &'static str| get(&m.decisions, vec![("decision", d)]);
        Metrics {
            registry,
            inbound: series(Direction::Inbound),
            outbound: series(Direction::Outbound),
            allow: decision("allow"),
            deny: decision("deny"),
            deny_dry_run: decision("deny_dry_run"),
            ..m
        }
    }
}

impl Metrics {
    fn series(&self, d: Direction) -> &Series {
        match d {
            Direction::Inbound => &self.inbound,
            Direction::Outbound => &self.outbound,
        }
    }

    pub fn connection_opened(&self, d: Direction) {
        let s = self.series(d);
        s.connections.inc();
        s.connections_open.inc();
    }

    pub fn connection_closed(&self, d: Direction) {
        self.series(d).connections_open.dec();
    }

    pub fn stream_opened(&self, d: Direction) {
        let s = self.series(d);
        s.streams.inc();
        s.streams_open.inc();
    }

    pub fn stream_closed(&self, d: Direction) {
        self.series(d).streams_open.dec();
    }

    /// Counts a stream from its accept until the guard is dropped.
    pub fn stream_task(&self) -> StreamTask {
        self.stream_tasks.inc();
        StreamTask(self.stream_tasks.clone())
    }

    /// Streams accepted and not yet ended, set-up included.
    pub fn stream_tasks(&self) -> i64 {
        self.stream_tasks.get()
    }

    pub fn connections_open(&self, d: Direction) -> i64 {
        self.series(d).connections_open.get()
    }

    pub fn streams_open(&self, d: Direction) -> i64 {
        self.series(d).streams_open.get()
    }

    /// `to_app`: bytes written to the application; `from_app`: read from it.
    pub fn bytes(&self, d: Direction, to_app: u64, from_app: u64) {
        let s = self.series(d);
        s.to_app.inc_by(to_app);
        s.from_app.inc_by(from_app);
    }

    pub fn handshake_failure(&self, d: Direction, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&vec![("direction", d.label()), ("reason", reason)])
            .inc();
    }

    /// A stream (or an application connection that never became one) ended.
    pub fn stream_ended(&self, d: Direction, outcome: &'static str) {
        match self.series(d).ended.iter().find(|(o, _)| *o == outcome) {
            Some((_, c)) => {
                c.inc();
            }
            None => {
                self.streams_ended
                    .get_or_create(&vec![("direction", d.label()), ("outcome", outcome)])
                    .inc();
            }
        }
    }

    /// A connection closed as soon as it was accepted.
    pub fn refused(&self, d: Direction, reason: &'static str) {
        self.refused
            .get_or_create(&vec![("direction", d.label()), ("reason", reason)])
            .inc();
    }

    /// An inbound authorization: allowed, denied, or denied but let through (dry run).
    pub fn decision(&self, allowed: bool, permitted: bool) {
        match (allowed, permitted) {
            (true, _) => self.allow.inc(),
            (false, false) => self.deny.inc(),
            (false, true) => self.deny_dry_run.inc(),
        };
    }

    pub fn stream_revoked(&self) {
        self.streams_revoked.inc();
    }

    /// The metrics text; `decision_log_dropped` is the authorizer's count.
    pub fn render(&self, decision_log_dropped: u64) -> String {
        let _one_at_a_time = self.rendering.lock().unwrap_or_else(|e| e.into_inner());
        let not_after = self.svid_not_after.load(Ordering::Relaxed);
        if not_after > 0 {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            self.svid_expiry.set(not_after - now);
        }
        let s = &self.reload_stats;
        for (result, n) in [
            ("loaded", s.loaded.load(Ordering::Relaxed)),
            ("rejected", s.rejected.load(Ordering::Relaxed)),
        ] {
            let c = self.policy_reloads.get_or_create(&vec![("result", result)]);
            c.inc_by(n.saturating_sub(c.get()));
        }
        let access_dropped = self.access_log.as_ref().map_or(0, |l| l.dropped());
        for (log, n) in [
            ("decision", decision_log_dropped),
            ("access", access_dropped),
        ] {
            let c = self.log_lines_dropped.get_or_create(&vec![("log", log)]);
            c.inc_by(n.saturating_sub(c.get()));
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
