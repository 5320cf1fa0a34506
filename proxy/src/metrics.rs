//! Prometheus metrics of the proxy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use ward_authz::reload::ReloadStats;
use ward_spec::SpiffeId;

use crate::access_log::AccessLog;

type Labels = Vec<(&'static str, &'static str)>;
/// Labels with a peer's SPIFFE ID.
type PeerLabels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// The most peers a direction's per-peer series name; the streams of any
/// further peer are counted as `peer_id="other"` (a label per peer would
/// otherwise grow without bound in a large mesh).
pub const PEERS_MAX: usize = 1000;

/// `stream_setup_seconds`: from 0.5 ms (a pooled tunnel) to 10 s (the
/// handshake and answer timeouts).
const SETUP_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// `stream_duration_seconds`: from a request of a few milliseconds to a
/// connection held for an hour or more.
const DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];

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
    peers: Arc<Mutex<Peers>>,
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

/// A direction's per-peer series: by the peer's SPIFFE ID (at most
/// [`PEERS_MAX`]), then `other`.
#[derive(Default)]
struct Peers {
    named: HashMap<SpiffeId, PeerSeries>,
    other: Option<PeerSeries>,
    capped_logged: bool,
}

/// One peer's series in one direction.
#[derive(Clone, Default)]
struct PeerSeries {
    streams: Counter,
    to_app: Counter,
    from_app: Counter,
}

/// A stream being handled (see [`Metrics::stream_task`]), or an inbound
/// connection in its handshake (see [`Metrics::inbound_handshake`]).
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
    peer_streams: Family<PeerLabels, Counter>,
    peer_bytes: Family<PeerLabels, Counter>,
    stream_setup: Histograms,
    stream_duration: Histograms,
    /// The two histograms' series, by direction (`Direction as usize`).
    setup: [Histogram; 2],
    duration: [Histogram; 2],
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
    stream_tasks: [Gauge; 2],
    /// Inbound connections accepted and still in their TLS or HTTP/2
    /// handshake: the drain waits for them too (a peer's stream may be on
    /// its way in the same flight as its handshake's end). Not exported.
    handshakes: Gauge,
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
        let histograms = |new: fn() -> Histogram| {
            let f: Histograms = Family::new_with_constructor(new);
            let by_direction = [Direction::Inbound, Direction::Outbound].map(|d| {
                let h = f.get_or_create(&vec![("direction", d.label())]).clone();
                h
            });
            (f, by_direction)
        };
        let (stream_setup, setup) = histograms(|| Histogram::new(SETUP_BUCKETS));
        let (stream_duration, duration) = histograms(|| Histogram::new(DURATION_BUCKETS));
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
            peer_streams: Family::default(),
            peer_bytes: Family::default(),
            stream_setup,
            stream_duration,
            setup,
            duration,
            handshake_failures: Family::default(),
            refused: Family::default(),
            streams_ended: Family::default(),
            decisions: Family::default(),
            svid_expiry: Gauge::default(),
            policy_reloads: Family::default(),
            log_lines_dropped: Family::default(),
            streams_revoked: Counter::default(),
            stream_tasks: Default::default(),
            handshakes: Gauge::default(),
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
            "peer_streams",
            "Streams set up (inbound: admitted; outbound: answered 200), by direction and the peer proxy's SPIFFE ID, counted as they end (past 1000 peers a direction, further ones as peer_id=\"other\")",
            m.peer_streams.clone(),
        );
        registry.register(
            "peer_bytes",
            "Application bytes carried by streams set up, by direction, the peer proxy's SPIFFE ID and flow, counted as streams end",
            m.peer_bytes.clone(),
        );
        registry.register(
            "stream_setup_seconds",
            "Time to set a stream up, by direction (outbound: from the application's connection, or its CONNECT request, to the peer's 200, the tunnel's connection and handshake included; inbound: from the peer's CONNECT to the application's connection, authorization included)",
            m.stream_setup.clone(),
        );
        registry.register(
            "stream_duration_seconds",
            "How long streams lasted from their set-up (inbound: admission; outbound: the peer's 200) to their end, by direction",
            m.stream_duration.clone(),
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
            "Open inbound streams closed because the policy set (new, or with a permit lapsed) now denies them",
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
                peers: Arc::default(),
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

    /// A stream was set up (outbound: the peer said 200; inbound: the
    /// application took its connection) `took` after it began.
    pub fn stream_set_up(&self, d: Direction, took: Duration) {
        self.setup[d as usize].observe(took.as_secs_f64());
    }

    /// A stream counted by [`Metrics::stream_opened`] ended, having
    /// written `to_app` bytes to the application and read `from_app` from
    /// it.
    pub fn stream_closed(&self, d: Direction, (to_app, from_app): (u64, u64)) {
        let s = self.series(d);
        s.streams_open.dec();
        s.to_app.inc_by(to_app);
        s.from_app.inc_by(from_app);
    }

    /// A stream that was set up (inbound: admitted; outbound: answered
    /// 200) ended, `lived` after its set-up, with `peer` (the peer proxy's
    /// verified ID) at the other end: its peer's series and its duration.
    pub fn stream_carried(
        &self,
        d: Direction,
        peer: Option<&SpiffeId>,
        (to_app, from_app): (u64, u64),
        lived: Duration,
    ) {
        self.duration[d as usize].observe(lived.as_secs_f64());
        let p = self.peer_series(d, peer);
        p.streams.inc();
        p.to_app.inc_by(to_app);
        p.from_app.inc_by(from_app);
    }

    /// `peer`'s series in direction `d`, made on its first stream; past
    /// [`PEERS_MAX`] peers (or without an ID), the `other` series.
    fn peer_series(&self, d: Direction, peer: Option<&SpiffeId>) -> PeerSeries {
        let s = self.series(d);
        let mut peers = s.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = peer.and_then(|p| peers.named.get(p)) {
            return p.clone();
        }
        let named = match peer {
            Some(p) if peers.named.len() < PEERS_MAX => Some(p),
            Some(_) if !peers.capped_logged => {
                peers.capped_logged = true;
                tracing::warn!(
                    direction = d.label(),
                    "per-peer metrics name {PEERS_MAX} peers already; further peers are counted as peer_id=\"other\""
                );
                None
            }
            _ => None,
        };
        if let (None, Some(other)) = (named, &peers.other) {
            return other.clone();
        }
        let id = named.map_or_else(|| "other".to_owned(), |p| p.to_string());
        let label = |flow: Option<&'static str>| {
            let mut l = vec![("direction", d.label().to_owned()), ("peer_id", id.clone())];
            l.extend(flow.map(|f| ("flow", f.to_owned())));
            l
        };
        // One statement per series (see `get` in `Default`).
        let streams = self.peer_streams.get_or_create(&label(None)).clone();
        let to_app = self
            .peer_bytes
            .get_or_create(&label(Some("to_app")))
            .clone();
        let from_app = self
            .peer_bytes
            .get_or_create(&label(Some("from_app")))
            .clone();
        let series = PeerSeries {
            streams,
            to_app,
            from_app,
        };
        match named {
            Some(p) => peers.named.insert(p.clone(), series.clone()),
            None => peers.other.replace(series.clone()),
        };
        series
    }

    /// Counts a stream from its accept until the guard is dropped.
    pub fn stream_task(&self, d: Direction) -> StreamTask {
        let g = &self.stream_tasks[d as usize];
        g.inc();
        StreamTask(g.clone())
    }

    /// Streams accepted and not yet ended, set-up included.
    pub fn stream_tasks(&self, d: Direction) -> i64 {
        self.stream_tasks[d as usize].get()
    }

    /// Counts an inbound connection in its handshake until the guard is
    /// dropped.
    pub fn inbound_handshake(&self) -> StreamTask {
        self.handshakes.inc();
        StreamTask(self.handshakes.clone())
    }

    /// Inbound connections in their handshake.
    pub fn inbound_handshakes(&self) -> i64 {
        self.handshakes.get()
    }

    pub fn connections_open(&self, d: Direction) -> i64 {
        self.series(d).connections_open.get()
    }

    pub fn streams_open(&self, d: Direction) -> i64 {
        self.series(d).streams_open.get()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Streams are counted by peer as they end, with their bytes, and
    /// their set-up and duration go into the direction's histograms.
    #[test]
    fn streams_are_counted_by_peer_with_their_bytes_and_durations() {
        let m = Metrics::default();
        let (a, b) = (
            SpiffeId::parse("spiffe://example.org/a").unwrap(),
            SpiffeId::parse("spiffe://example.org/b").unwrap(),
        );
        let ms = Duration::from_millis;
        for (peer, bytes, lived) in [
            (&a, (10, 1), ms(2)),
            (&a, (5, 0), ms(200)),
            (&b, (7, 3), ms(7000)),
        ] {
            m.stream_opened(Direction::Inbound);
            m.stream_set_up(Direction::Inbound, ms(3));
            m.stream_closed(Direction::Inbound, bytes);
            m.stream_carried(Direction::Inbound, Some(peer), bytes, lived);
        }
        m.stream_opened(Direction::Outbound);
        m.stream_closed(Direction::Outbound, (1, 1));
        m.stream_carried(Direction::Outbound, None, (1, 1), ms(1));
        let text = m.render(0);
        let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no {s} in:\n{text}"));
        let peer = |d: &str, id: &str| format!("{{direction=\"{d}\",peer_id=\"{id}\"");
        let a_in = peer("inbound", "spiffe://example.org/a");
        assert_eq!(v(&format!("ward_proxy_peer_streams_total{a_in}}}")), 2.0);
        assert_eq!(
            v(&format!(
                "ward_proxy_peer_bytes_total{a_in},flow=\"to_app\"}}"
            )),
            15.0
        );
        assert_eq!(
            v(&format!(
                "ward_proxy_peer_bytes_total{a_in},flow=\"from_app\"}}"
            )),
            1.0
        );
        let b_in = peer("inbound", "spiffe://example.org/b");
        assert_eq!(v(&format!("ward_proxy_peer_streams_total{b_in}}}")), 1.0);
        let other = peer("outbound", "other");
        assert_eq!(v(&format!("ward_proxy_peer_streams_total{other}}}")), 1.0);
        // The totals, as before.
        assert_eq!(
            v("ward_proxy_bytes_total{direction=\"inbound\",flow=\"to_app\"}"),
            22.0
        );
        assert_eq!(v("ward_proxy_streams_open{direction=\"inbound\"}"), 0.0);
        // Durations 2 ms, 200 ms and 7 s: one by 5 ms, two by 0.5 s, three by 10 s.
        let d = "ward_proxy_stream_duration_seconds";
        assert_eq!(v(&format!("{d}_count{{direction=\"inbound\"}}")), 3.0);
        assert_eq!(
            v(&format!("{d}_bucket{{le=\"0.005\",direction=\"inbound\"}}")),
            1.0
        );
        assert_eq!(
            v(&format!("{d}_bucket{{le=\"0.5\",direction=\"inbound\"}}")),
            2.0
        );
        assert_eq!(
            v(&format!("{d}_bucket{{le=\"5.0\",direction=\"inbound\"}}")),
            2.0
        );
        assert_eq!(
            v(&format!("{d}_bucket{{le=\"10.0\",direction=\"inbound\"}}")),
            3.0
        );
        assert_eq!(v(&format!("{d}_count{{direction=\"outbound\"}}")), 1.0);
        let s = "ward_proxy_stream_setup_seconds";
        assert_eq!(v(&format!("{s}_count{{direction=\"inbound\"}}")), 3.0);
        assert_eq!(
            v(&format!(
                "{s}_bucket{{le=\"0.0025\",direction=\"inbound\"}}"
            )),
            0.0
        );
        assert_eq!(
            v(&format!("{s}_bucket{{le=\"0.005\",direction=\"inbound\"}}")),
            3.0
        );
        assert_eq!(v(&format!("{s}_count{{direction=\"outbound\"}}")), 0.0);
    }

    /// Renders at once (scrapes from several clients, on several worker
    /// threads) bring the reload counter up to date once: each adds what it
    /// is behind by, which two at once would both add.
    #[test]
    fn renders_at_once_count_reloads_once() {
        let m = Arc::new(Metrics::default());
        let loaded = "ward_proxy_policy_reloads_total{result=\"loaded\"}";
        for round in 1..=5000u64 {
            m.reload_stats.loaded.fetch_add(1, Ordering::Relaxed);
            let start = Arc::new(std::sync::Barrier::new(4));
            let renders: Vec<_> = (0..4)
                .map(|_| {
                    let (m, start) = (m.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        m.render(0)
                    })
                })
                .collect();
            for r in renders {
                r.join().unwrap();
            }
            assert_eq!(
                value(&m.render(0), loaded),
                Some(round as f64),
                "round {round}"
            );
        }
    }

    /// Past [`PEERS_MAX`] peers a direction, further peers share `other`:
    /// the series stay bounded however many workloads call.
    #[test]
    fn per_peer_series_are_bounded() {
        let m = Metrics::default();
        let extra = 5;
        for i in 0..PEERS_MAX + extra {
            let id = SpiffeId::parse(&format!("spiffe://example.org/w{i}")).unwrap();
            m.stream_opened(Direction::Outbound);
            m.stream_carried(Direction::Outbound, Some(&id), (1, 0), Duration::ZERO);
        }
        // A peer named before the cap keeps its own series.
        let first = SpiffeId::parse("spiffe://example.org/w0").unwrap();
        m.stream_opened(Direction::Outbound);
        m.stream_carried(Direction::Outbound, Some(&first), (1, 0), Duration::ZERO);
        let text = m.render(0);
        let named = text
            .lines()
            .filter(|l| l.starts_with("ward_proxy_peer_streams_total{"))
            .count();
        assert_eq!(named, PEERS_MAX + 1, "the named peers and other");
        let series = |id: &str| {
            let s =
                format!("ward_proxy_peer_streams_total{{direction=\"outbound\",peer_id=\"{id}\"}}");
            value(&text, &s)
        };
        assert_eq!(series("other"), Some(extra as f64));
        assert_eq!(series("spiffe://example.org/w0"), Some(2.0));
        assert_eq!(
            series(&format!("spiffe://example.org/w{}", PEERS_MAX)),
            None
        );
    }
}
