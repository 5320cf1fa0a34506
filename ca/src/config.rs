//! `ward ca serve` configuration: a TOML file, every key also a flag.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use ward_spec::TrustDomain;

pub use ward_spec::config::ConfigError;

/// Where the CA keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    /// A `postgres://` URL (it may hold a password: print it `redacted`).
    Postgres(String),
}

/// Every setting of the CA, with the defaults of DESIGN.md.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaConfig {
    pub trust_domain: TrustDomain,
    pub data_dir: PathBuf,
    /// Node API (mutual TLS gRPC).
    pub bind_address: SocketAddr,
    /// Admin API Unix socket; default `<data_dir>/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub health_address: SocketAddr,
    /// `sqlite://PATH` or `postgres://USER:PASSWORD@HOST:PORT/DB`; default
    /// `sqlite://<data_dir>/datastore.sqlite3`.
    pub datastore: Option<String>,
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub ca_ttl: Duration,
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub root_ttl: Duration,
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub x509_svid_ttl: Duration,
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub jwt_svid_ttl: Duration,
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub node_svid_ttl: Duration,
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub join_token_ttl: Duration,
    /// How often the slot schedule is checked.
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub rotation_check_interval: Duration,
    /// How long a deletion of an entry is kept for agents to sync. An
    /// agent further behind syncs every entry again.
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub entry_change_retention: Duration,
    pub upstream_cert: Option<PathBuf>,
    pub upstream_key: Option<PathBuf>,
    /// Serves our bundle as a SPIFFE bundle endpoint (https_spiffe) here.
    pub federation_address: Option<SocketAddr>,
    /// How often federated bundles are fetched from their endpoints;
    /// default: as each bundle's refresh hint says (5 s to 5 min).
    #[serde(default, deserialize_with = "ward_spec::duration::deserialize_opt")]
    pub federation_refresh_interval: Option<Duration>,
    /// Which path segments of this trust domain's SPIFFE IDs name the
    /// tenant, namespace and service (admin policies see the tenant).
    pub id_template: String,
    pub log_format: LogFormat,
    /// How long a node API connection whose client presented no certificate
    /// (an agent attesting with a join token, which needs one call) stays open.
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub unauthenticated_timeout: Duration,
    /// How many such connections may be open at once; more are closed as soon
    /// as their handshake is done.
    pub max_unauthenticated_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            trust_domain: TrustDomain::new("example.org").expect("valid"),
            data_dir: PathBuf::from(".ward/ca"),
            bind_address: "127.0.0.1:8081".parse().expect("valid"),
            admin_socket: None,
            health_address: "127.0.0.1:8082".parse().expect("valid"),
            datastore: None,
            ca_ttl: Duration::from_secs(24 * 3600),
            root_ttl: Duration::from_secs(365 * 24 * 3600),
            x509_svid_ttl: Duration::from_secs(3600),
            jwt_svid_ttl: Duration::from_secs(300),
            node_svid_ttl: Duration::from_secs(3600),
            join_token_ttl: Duration::from_secs(600),
            rotation_check_interval: Duration::from_secs(10),
            entry_change_retention: Duration::from_secs(24 * 3600),
            upstream_cert: None,
            upstream_key: None,
            federation_address: None,
            federation_refresh_interval: None,
            id_template: ward_authz::template::DEFAULT_TEMPLATE.into(),
            log_format: LogFormat::Text,
            unauthenticated_timeout: Duration::from_secs(30),
            max_unauthenticated_connections: 1024,
        }
    }
}

impl CaConfig {
    /// Reads a TOML file; unknown keys and bad values are errors naming the key.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        ward_spec::config::load_toml(path)
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }

    /// Which datastore `datastore` names.
    pub fn store(&self) -> Result<StoreUrl, ConfigError> {
        match &self.datastore {
            None => Ok(StoreUrl::Sqlite(self.data_dir.join("datastore.sqlite3"))),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(StoreUrl::Postgres(url.clone()))
            }
            Some(url) => url
                .strip_prefix("sqlite://")
                .map(|p| StoreUrl::Sqlite(PathBuf::from(p)))
                .ok_or_else(|| ConfigError::Invalid {
                    key: "datastore",
                    message: format!(
                        "{:?} is not supported; use sqlite://PATH or postgres://…",
                        crate::datastore::redacted(url)
                    ),
                }),
        }
    }

    /// Checks relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("ca_ttl", self.ca_ttl),
            ("root_ttl", self.root_ttl),
            ("x509_svid_ttl", self.x509_svid_ttl),
            ("jwt_svid_ttl", self.jwt_svid_ttl),
            ("node_svid_ttl", self.node_svid_ttl),
            ("join_token_ttl", self.join_token_ttl),
            ("rotation_check_interval", self.rotation_check_interval),
            ("entry_change_retention", self.entry_change_retention),
            ("unauthenticated_timeout", self.unauthenticated_timeout),
        ];
        for (key, d) in positive {
            if d.is_zero() {
                return Err(ConfigError::Invalid {
                    key,
                    message: "must be greater than zero".into(),
                });
            }
        }
        if self.max_unauthenticated_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "max_unauthenticated_connections",
                message: "must be at least 1 (agents attest over such a connection)".into(),
            });
        }
        if self.ca_ttl > self.root_ttl {
            return Err(ConfigError::Invalid {
                key: "ca_ttl",
                message: "must not exceed root_ttl".into(),
            });
        }
        if let Err(e) = ward_authz::IdTemplate::parse(&self.id_template) {
            return Err(ConfigError::Invalid {
                key: "id_template",
                message: e.to_string(),
            });
        }
        if self.upstream_cert.is_some() != self.upstream_key.is_some() {
            return Err(ConfigError::Invalid {
                key: "upstream_cert",
                message: "upstream_cert and upstream_key go together".into(),
            });
        }
        self.store()?;
        for (key, ttl) in [
            ("x509_svid_ttl", self.x509_svid_ttl),
            ("node_svid_ttl", self.node_svid_ttl),
        ] {
            if ttl > self.ca_ttl / 6 {
                tracing::warn!(
                    key,
                    "SVID TTL exceeds 1/6 of ca_ttl: SVIDs near a rotation will be cut short to the signing CA's expiry"
                );
            }
        }
        Ok(())
    }
}

pub use ward_spec::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_config_file_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.toml");
        std::fs::write(&p, "trust_domain = \"example.org\"\nca_ttll = \"1h\"\n").unwrap();
        let e = CaConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("ca_ttll"), "{e}");
        std::fs::write(&p, "ca_ttl = \"forever\"\n").unwrap();
        let e = CaConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("forever"), "{e}");
        std::fs::write(&p, "trust_domain = \"Bad:Domain\"\n").unwrap();
        let e = CaConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("trust domain"), "{e}");
    }
}
