//! Ward's control plane: a certificate authority that issues SPIFFE identities.
//!
//! Data flows like this. [`server`] opens the [`datastore`] (SQLite) and the
//! [`authority`] (root, rotating intermediate + JWT key slots, the trust
//! bundle), then serves two gRPC APIs over the transport-free [`service::Ca`]:
//! - [`node_api`], over mutual TLS: an agent spends a join token for a node
//!   SVID, renews it, syncs the registration entries parented to it by
//!   revision, and has workload CSRs signed ([`x509`] checks each CSR and builds
//!   the certificate from its own template);
//! - [`admin_api`], over a 0600 Unix socket: entries, join tokens, agents,
//!   forced rotation, the bundle.
//!
//! Signing reads (the caller's standing, its entries) go through
//! [`read_cache`], which answers them from memory while the database is down.
//!
//! Every issuance, refusal, attestation and admin change is one structured
//! log line with target `audit`; counters are exported by [`metrics`].
#![forbid(unsafe_code)]

pub mod admin_api;
pub mod authority;
pub mod config;
pub mod datastore;
pub mod federation;
pub mod metrics;
pub mod node_api;
pub mod policies;
pub mod read_cache;
pub mod server;
pub mod service;
pub mod x509;

pub use config::CaConfig;
pub use service::Ca;
