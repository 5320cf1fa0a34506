//! Prometheus metrics of the agent.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    pub cached_svids: Gauge,
    pub rotations: Counter,
    pub executables_hashed: Counter,
    ca_errors: Family<Labels, Counter>,
    api_calls: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ward_agent");
        let cached_svids = Gauge::default();
        let rotations = Counter::default();
        let executables_hashed = Counter::default();
        let ca_errors = Family::<Labels, Counter>::default();
        let api_calls = Family::<Labels, Counter>::default();
        registry.register(
            "cached_svids",
            "X509-SVIDs in the cache",
            cached_svids.clone(),
        );
        registry.register(
            "svid_rotations",
            "X509-SVIDs replaced by rotation",
            rotations.clone(),
        );
        registry.register(
            "executables_hashed",
            "Callers' executables read and hashed (for unix:sha256 selectors)",
            executables_hashed.clone(),
        );
        registry.register(
            "ca_errors",
            "Failed calls to the CA, by kind",
            ca_errors.clone(),
        );
        registry.register(
            "workload_api_calls",
            "Workload API calls, by method and status",
            api_calls.clone(),
        );
        Metrics {
            registry,
            cached_svids,
            rotations,
            executables_hashed,
            ca_errors,
            api_calls,
        }
    }
}

impl Metrics {
    pub fn ca_error(&self, kind: &'static str) {
        self.ca_errors
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc();
    }

    pub fn api_call(&self, method: &'static str, code: tonic::Code) {
        self.api_calls
            .get_or_create(&vec![
                ("method", method.to_owned()),
                ("status", format!("{code:?}")),
            ])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
