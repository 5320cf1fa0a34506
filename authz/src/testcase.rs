//! `ward policy test`: readable test cases run against a policy directory.
//!
//! A case file is TOML:
//!
//! ```toml
//! [[case]]
//! name = "acme web may call acme api"
//! principal = "spiffe://example.org/tenant/acme/ns/prod/sa/web"
//! resource = "spiffe://example.org/tenant/acme/ns/prod/sa/api"
//! action = "connect"                 # or create_entry, update_entry, delete_entry, create_join_token
//! context = { destination_port = 8080, source_address = "10.0.0.7" }  # and `now` (Unix seconds)
//! decision = "allow"                 # or "deny"
//! policies = ["acme-web-to-api"]     # optional: the determining policy ids, exactly
//! ```
//!
//! For admin actions, `principal` is an admin SPIFFE ID or `operator`, and
//! `resource` is the SPIFFE ID of the entry (or the tenant of a join token).
//! An entry case may give `federates_with` (the trust domains the entry
//! federates with) and `federation_added` (those the call adds) in `context`.

use std::net::IpAddr;

use serde::Deserialize;
use ward_spec::SpiffeId;

use crate::authorizer::{
    AdminAction, AdminPrincipal, AdminResource, Authorizer, ConnectContext, Decision,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    #[serde(rename = "case")]
    pub cases: Vec<Case>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub principal: String,
    pub resource: String,
    #[serde(default = "connect")]
    pub action: String,
    #[serde(default)]
    pub context: CaseContext,
    pub decision: String,
    pub policies: Option<Vec<String>>,
}

fn connect() -> String {
    "connect".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseContext {
    #[serde(default = "default_port")]
    pub destination_port: u16,
    #[serde(default = "default_addr")]
    pub source_address: IpAddr,
    /// Decide as of this Unix time (default: now).
    #[serde(default)]
    pub now: Option<i64>,
    /// Entry actions: the trust domains the entry federates with.
    #[serde(default)]
    pub federates_with: Vec<String>,
    /// Entry actions: the trust domains the call adds to its federation.
    #[serde(default)]
    pub federation_added: Vec<String>,
}

fn default_port() -> u16 {
    8080
}

fn default_addr() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

impl Default for CaseContext {
    fn default() -> Self {
        CaseContext {
            destination_port: default_port(),
            source_address: default_addr(),
            now: None,
            federates_with: Vec::new(),
            federation_added: Vec::new(),
        }
    }
}

/// The outcome of one case.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    /// What went wrong (empty when passed).
    pub detail: String,
}

fn admin_action(s: &str) -> Option<AdminAction> {
    Some(match s {
        "create_entry" => AdminAction::CreateEntry,
        "update_entry" => AdminAction::UpdateEntry,
        "delete_entry" => AdminAction::DeleteEntry,
        "create_join_token" => AdminAction::CreateJoinToken,
        _ => return None,
    })
}

/// Decides one case.
pub fn decide(
    authz: &Authorizer,
    c: &Case,
    template: &crate::template::IdTemplate,
) -> Result<Decision, String> {
    if c.action == "connect" {
        let p = SpiffeId::parse(&c.principal).map_err(|e| format!("principal: {e}"))?;
        let r = SpiffeId::parse(&c.resource).map_err(|e| format!("resource: {e}"))?;
        let ctx = ConnectContext {
            destination_port: c.context.destination_port,
            source_address: c.context.source_address,
            at: c.context.now,
        };
        return Ok(authz.decide_connect(&p, &r, &ctx));
    }
    let action = admin_action(&c.action).ok_or_else(|| format!("unknown action {:?}", c.action))?;
    let principal = if c.principal == "operator" {
        AdminPrincipal::Operator
    } else {
        AdminPrincipal::Admin(SpiffeId::parse(&c.principal).map_err(|e| format!("principal: {e}"))?)
    };
    let (tenant, id) = match SpiffeId::parse(&c.resource) {
        Ok(id) => (
            template.read(&id).map(|p| p.tenant).unwrap_or_default(),
            id.to_string(),
        ),
        Err(_) => (c.resource.clone(), c.resource.clone()),
    };
    let resource = AdminResource {
        tenant,
        id,
        federates_with: c.context.federates_with.clone(),
        federation_added: c.context.federation_added.clone(),
    };
    Ok(authz.decide_admin(&principal, action, &resource))
}

pub fn run(
    authz: &Authorizer,
    cases: &[Case],
    template: &crate::template::IdTemplate,
) -> Vec<CaseResult> {
    cases
        .iter()
        .map(|c| {
            let fail = |detail: String| CaseResult {
                name: c.name.clone(),
                passed: false,
                detail,
            };
            let want_allow = match c.decision.as_str() {
                "allow" => true,
                "deny" => false,
                other => return fail(format!("decision must be allow or deny, not {other:?}")),
            };
            let d = match decide(authz, c, template) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            let mut problems = Vec::new();
            if d.allowed != want_allow {
                problems.push(format!(
                    "expected {}, got {}",
                    c.decision,
                    if d.allowed { "allow" } else { "deny" }
                ));
            }
            if let Some(want) = &c.policies {
                let mut want = want.clone();
                want.sort();
                if want != d.policies {
                    problems.push(format!("expected policies {want:?}, got {:?}", d.policies));
                }
            }
            if !d.errors.is_empty() {
                problems.push(format!("evaluation errors: {:?}", d.errors));
            }
            CaseResult {
                name: c.name.clone(),
                passed: problems.is_empty(),
                detail: problems.join("; "),
            }
        })
        .collect()
}
