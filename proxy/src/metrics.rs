//! Prometheus metrics of the proxy.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use ward_authz::reload::ReloadStats;

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

pub struct Metrics {
    registry: Registry,
    connections_open: Family<Labels, Gauge>,
    connections: Family<Labels, Counter>,
    streams_open: Family<Labels, Gauge>,
    streams: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    handshake_failures: Family<Labels, Counter>,
    decisions: Family<Labels, Counter>,
    svid_expiry: Gauge,
    policy_reloads: Family<Labels, Counter>,
    /// Unix seconds when the current SVID expires (0: none yet).
    pub svid_not_after: AtomicI64,
    pub reload_stats: Arc<ReloadStats>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ward_proxy");
        let m = Metrics {
            registry: Registry::default(),
            connections_open: Family::default(),
            connections: Family::default(),
            streams_open: Family::default(),
            streams: Family::default(),
            bytes: Family::default(),
            handshake_failures: Family::default(),
            decisions: Family::default(),
            svid_expiry: Gauge::default(),
            policy_reloads: Family::default(),
            svid_not_after: AtomicI64::new(0),
            reload_stats: Arc::new(ReloadStats::default()),
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
            "Tunneled streams opened, by direction",
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
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn connection_opened(&self, d: Direction) {
        let l = vec![("direction", d.label())];
        self.connections.get_or_create(&l).inc();
        self.connections_open.get_or_create(&l).inc();
    }

    pub fn connection_closed(&self, d: Direction) {
        self.connections_open
            .get_or_create(&vec![("direction", d.label())])
            .dec();
    }

    pub fn stream_opened(&self, d: Direction) {
        let l = vec![("direction", d.label())];
        self.streams.get_or_create(&l).inc();
        self.streams_open.get_or_create(&l).inc();
    }

    pub fn stream_closed(&self, d: Direction) {
        self.streams_open
            .get_or_create(&vec![("direction", d.label())])
            .dec();
    }

    pub fn streams_open(&self, d: Direction) -> i64 {
        self.streams_open
            .get_or_create(&vec![("direction", d.label())])
            .get()
    }

    /// `to_app`: bytes written to the application; `from_app`: read from it.
    pub fn bytes(&self, d: Direction, to_app: u64, from_app: u64) {
        for (flow, n) in [("to_app", to_app), ("from_app", from_app)] {
            self.bytes
                .get_or_create(&vec![("direction", d.label()), ("flow", flow)])
                .inc_by(n);
        }
    }

    pub fn handshake_failure(&self, d: Direction, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&vec![("direction", d.label()), ("reason", reason)])
            .inc();
    }

    pub fn decision(&self, decision: &'static str) {
        self.decisions
            .get_or_create(&vec![("decision", decision)])
            .inc();
    }

    pub fn render(&self) -> String {
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
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
