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
//! federates with: `partner.example` or `spiffe://partner.example`; policies
//! see bare names) and `federation_added` (those the call adds) in
//! `context`. Without `federation_added`, a create adds every trust domain
//! it lists, an update (whose earlier list a case does not know) and a
//! delete none.

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
    /// Entry actions: the trust domains the call adds to its federation
    /// (default: all of `federates_with` for a create, none otherwise).
    #[serde(default)]
    pub federation_added: Option<Vec<String>>,
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
            federation_added: None,
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
        if !c.context.federates_with.is_empty() || c.context.federation_added.is_some() {
            return Err("federates_with and federation_added are for entry actions".into());
        }
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
    let federates_with = trust_domains(&c.context.federates_with)?;
    let federation_added = match &c.context.federation_added {
        Some(tds) => trust_domains(tds)?,
        None => federation_added(action, &federates_with),
    };
    if action == AdminAction::CreateJoinToken
        && !(federates_with.is_empty() && federation_added.is_empty())
    {
        return Err("federates_with and federation_added are for entry actions".into());
    }
    if action == AdminAction::DeleteEntry && !federation_added.is_empty() {
        return Err("a delete adds no federation: federation_added must be empty".into());
    }
    if let Some(td) = federation_added
        .iter()
        .find(|td| !federates_with.contains(td))
    {
        return Err(format!(
            "federation_added names {td}, which federates_with does not list"
        ));
    }
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
        federates_with,
        federation_added,
    };
    Ok(authz.decide_admin(&principal, action, &resource))
}

/// What a call adds to an entry's federation when a case does not say: a
/// create adds every trust domain the entry lists.
fn federation_added(action: AdminAction, federates_with: &[String]) -> Vec<String> {
    match action {
        AdminAction::CreateEntry => federates_with.to_vec(),
        _ => Vec::new(),
    }
}

/// Trust domain names as policies see them (`spiffe://` taken off).
fn trust_domains(names: &[String]) -> Result<Vec<String>, String> {
    names
        .iter()
        .map(|n| {
            ward_spec::TrustDomain::new(n)
                .map(|td| td.as_str().to_owned())
                .map_err(|e| format!("trust domain {n:?}: {e}"))
        })
        .collect()
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
