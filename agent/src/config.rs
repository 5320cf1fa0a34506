//! `ward agent run` configuration: a TOML file, every key also a flag.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use ward_spec::TrustDomain;

pub use ward_spec::config::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub trust_domain: TrustDomain,
    /// CA node API addresses (`host:port`), tried in order; the agent fails over.
    pub ca_addresses: Vec<String>,
    /// PEM roots to trust the CA with before the first attestation.
    pub trust_bundle: Option<PathBuf>,
    /// One-time join token (only needed until the agent has a node SVID).
    pub join_token: Option<String>,
    pub data_dir: PathBuf,
    /// Workload API Unix socket.
    pub socket_path: PathBuf,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub health_address: SocketAddr,
    /// Entry sync interval (changes are also pushed by the CA).
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub sync_interval: Duration,
    /// A call to the CA without an answer for this long fails, and the next
    /// one goes to the next CA address.
    #[serde(deserialize_with = "ward_spec::duration::deserialize")]
    pub ca_call_timeout: Duration,
    pub log_format: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            trust_domain: TrustDomain::new("example.org").expect("valid"),
            ca_addresses: vec!["127.0.0.1:8081".into()],
            trust_bundle: None,
            join_token: None,
            data_dir: PathBuf::from(".ward/agent"),
            socket_path: PathBuf::from(".ward/agent/workload.sock"),
            health_address: "127.0.0.1:8083".parse().expect("valid"),
            sync_interval: Duration::from_secs(5),
            ca_call_timeout: Duration::from_secs(15),
            log_format: "text".into(),
        }
    }
}

impl AgentConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        ward_spec::config::load_toml(path)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ca_addresses.is_empty() {
            return Err(ConfigError::Invalid {
                key: "ca_addresses",
                message: "at least one CA address is needed".into(),
            });
        }
        if self.ca_call_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                key: "ca_call_timeout",
                message: "must be greater than zero".into(),
            });
        }
        if self.sync_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "sync_interval",
                message: "must be greater than zero".into(),
            });
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid {
                key: "log_format",
                message: format!("{:?}: use text or json", self.log_format),
            });
        }
        Ok(())
    }
}

pub use ward_spec::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "ca_adresses = [\"127.0.0.1:8081\"]\n").unwrap();
        let e = AgentConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("ca_adresses"), "{e}");
        std::fs::write(&p, "sync_interval = \"soon\"\n").unwrap();
        let e = AgentConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("soon"), "{e}");
        std::fs::write(&p, "ca_addresses = []\n").unwrap();
        let e = AgentConfig::from_file(&p)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca_addresses"), "{e}");
        std::fs::write(
            &p,
            "ca_addresses = [\"10.0.0.1:8081\", \"10.0.0.2:8081\"]\nsync_interval = \"2s\"\n",
        )
        .unwrap();
        let c = AgentConfig::from_file(&p).unwrap();
        assert_eq!(c.ca_addresses.len(), 2);
        assert_eq!(c.sync_interval, Duration::from_secs(2));
    }
}
