//! Prometheus metrics of the CA.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    issued: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    attestations: Family<Labels, Counter>,
    admin_changes: Family<Labels, Counter>,
    node_connections_closed: Family<Labels, Counter>,
    /// Node API connections open without a client certificate.
    pub unauthenticated_connections: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Agents' change streams open at this replica.
    pub change_streams: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub bundle_sequence: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub signing_ca_expiry: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub datastore_up: Gauge<i64, std::sync::atomic::AtomicI64>,
    cache_reads: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ward_ca");
        let issued = Family::<Labels, Counter>::default();
        let refused = Family::<Labels, Counter>::default();
        let attestations = Family::<Labels, Counter>::default();
        let admin_changes = Family::<Labels, Counter>::default();
        let node_connections_closed = Family::<Labels, Counter>::default();
        let unauthenticated_connections = Gauge::default();
        let change_streams = Gauge::default();
        let bundle_sequence = Gauge::default();
        let signing_ca_expiry = Gauge::default();
        let datastore_up = Gauge::default();
        let cache_reads = Counter::default();
        registry.register("svids_issued", "SVIDs issued, by kind", issued.clone());
        registry.register("refusals", "Requests refused, by method", refused.clone());
        registry.register(
            "attestations",
            "Node attestations, by outcome",
            attestations.clone(),
        );
        registry.register(
            "admin_changes",
            "Admin changes, by operation",
            admin_changes.clone(),
        );
        registry.register(
            "node_connections_closed",
            "Node API connections the CA closed, by reason",
            node_connections_closed.clone(),
        );
        registry.register(
            "node_unauthenticated_connections",
            "Node API connections open without a client certificate",
            unauthenticated_connections.clone(),
        );
        registry.register(
            "change_streams",
            "Agents' change streams open at this replica",
            change_streams.clone(),
        );
        registry.register(
            "bundle_sequence",
            "Sequence number of the published trust bundle",
            bundle_sequence.clone(),
        );
        registry.register(
            "signing_ca_expiry_timestamp_seconds",
            "Unix time at which the active intermediate expires",
            signing_ca_expiry.clone(),
        );
        registry.register(
            "datastore_up",
            "1 while the datastore answers, 0 while signing runs on cached reads",
            datastore_up.clone(),
        );
        registry.register(
            "cached_reads",
            "Signing reads answered from memory because the datastore did not answer",
            cache_reads.clone(),
        );
        Metrics {
            registry,
            issued,
            refused,
            attestations,
            admin_changes,
            node_connections_closed,
            unauthenticated_connections,
            change_streams,
            bundle_sequence,
            signing_ca_expiry,
            datastore_up,
            cache_reads,
        }
    }
}

impl Metrics {
    pub fn issued(&self, kind: &'static str) {
        self.issued.get_or_create(&vec![("kind", kind)]).inc();
    }
    pub fn refused(&self, method: &'static str) {
        self.refused.get_or_create(&vec![("method", method)]).inc();
    }
    pub fn attestation(&self, outcome: &'static str) {
        self.attestations
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }
    pub fn node_connection_closed(&self, reason: &'static str) {
        self.node_connections_closed
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }
    pub fn cache_read(&self) {
        self.cache_reads.inc();
    }
    pub fn admin_change(&self, op: &'static str) {
        self.admin_changes
            .get_or_create(&vec![("operation", op)])
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
