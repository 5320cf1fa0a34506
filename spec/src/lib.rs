//! The contract every part of Ward shares.
//!
//! Values cross crate boundaries as the types defined here, parsed once at the
//! edge: [`SpiffeId`] and [`TrustDomain`] ([`id`]), [`Selector`] ([`selector`]).
//! Certificates are checked against the X509-SVID profile by [`svid`], trust
//! bundles travel as SPIFFE JWKS documents ([`bundle`]), and every mutual-TLS
//! endpoint verifies its peer with the SPIFFE verifiers in [`tls`]. The gRPC
//! node and admin APIs are generated from `proto/` into [`proto`]. Decision
//! and access logs are written off the serving threads by [`linelog`]; the
//! process's log filter is changed at run time through [`log_level`].
#![forbid(unsafe_code)]

pub mod bundle;
pub mod config;
pub mod duration;
pub mod files;
pub mod grpc;
pub mod id;
pub mod jwt;
pub mod linelog;
pub mod log_level;
pub mod proto;
pub mod selector;
pub mod svid;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod tls;

pub use bundle::TrustBundle;
pub use id::{IdError, SpiffeId, TrustDomain};
pub use selector::Selector;
