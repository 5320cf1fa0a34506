//! Ward's authorizer: Cedar decisions for every connection and admin action.
//!
//! Data flows like this. Policy files (`.cedar`) are parsed, named by their
//! `@id` annotations and validated in strict mode against
//! `policies/ward.cedarschema` ([`policy`]); only a valid set becomes active,
//! swapped in atomically ([`authorizer`]), and a directory can be hot-reloaded
//! ([`reload`]). A decision builds Cedar entities from the two SPIFFE IDs
//! through the trust domain's ID [`template`] (tenant, namespace, service),
//! evaluates the slice of the active set that can apply to the principal's
//! tenant and service (`index`, built once per set), and denies on any
//! evaluation error. Cross-tenant
//! requests are first put to the annotated exception policies alone, whose
//! verdict reaches the tenant-isolation guard as `context.cross_tenant_exception`.
//! A set whose policies read `context.now` can change its decisions with
//! time alone, at instants found in its policies ([`time_limits`]).
//! Every decision can be written as one JSON line ([`log`]). The `ward policy`
//! commands use [`testcase`] and [`matrix`].
#![forbid(unsafe_code)]

pub mod authorizer;
mod index;
pub mod log;
pub mod matrix;
pub mod policy;
pub mod reload;
pub mod template;
pub mod testcase;
pub mod time_limits;

pub use authorizer::{
    AdminAction, AdminPrincipal, AdminResource, Authorizer, ConnectContext, Decision, Mode,
    WorkloadEntities,
};
pub use cedar_policy::Schema;
pub use template::IdTemplate;

/// The schema every part validates against unless told otherwise
/// (`policies/ward.cedarschema`, built in).
pub const DEFAULT_SCHEMA: &str = include_str!("../../policies/ward.cedarschema");

/// [`DEFAULT_SCHEMA`], parsed.
pub fn default_schema() -> Schema {
    policy::parse_schema("ward.cedarschema (built in)", DEFAULT_SCHEMA)
        .expect("the built-in schema parses")
}
