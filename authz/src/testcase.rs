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
//! delete none. `dns_names` and `dns_names_added` work the same way for the
//! DNS names the entry's SVIDs carry. `parent_id` (a SPIFFE ID; default
//! none, which policies see as "") and `admin` (default false) are the
//! entry's; `admin_added` (whether the call marks it admin) defaults to
//! `admin` for a create, false otherwise.

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
    /// Entry actions: the DNS names the entry's SVIDs carry.
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// Entry actions: the DNS names the call gives the entry (default as
    /// `federation_added`).
    #[serde(default)]
    pub dns_names_added: Option<Vec<String>>,
    /// Entry actions: the entry's parent (node) SPIFFE ID.
    #[serde(default)]
    pub parent_id: Option<String>,
    /// Entry actions: whether the entry is marked admin.
    #[serde(default)]
    pub admin: bool,
    /// Entry actions: whether the call marks it admin.
    #[serde(default)]
    pub admin_added: Option<bool>,
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
            dns_names: Vec::new(),
            dns_names_added: None,
            parent_id: None,
            admin: false,
            admin_added: None,
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
    let ctx = &c.context;
    let entry_only = !ctx.federates_with.is_empty()
        || ctx.federation_added.is_some()
        || !ctx.dns_names.is_empty()
        || ctx.dns_names_added.is_some()
        || ctx.parent_id.is_some()
        || ctx.admin
        || ctx.admin_added.is_some();
    const ENTRY_ONLY: &str = "federates_with, federation_added, dns_names, dns_names_added, \
         parent_id, admin and admin_added are for entry actions";
    if c.action == "connect" {
        if entry_only {
            return Err(ENTRY_ONLY.into());
        }
        let p = SpiffeId::parse(&c.principal).map_err(|e| format!("principal: {e}"))?;
        let r = SpiffeId::parse(&c.resource).map_err(|e| format!("resource: {e}"))?;
        let ctx = ConnectContext {
            destination_port: ctx.destination_port,
            source_address: ctx.source_address,
            at: ctx.now,
        };
        return Ok(authz.decide_connect(&p, &r, &ctx));
    }
    let action = admin_action(&c.action).ok_or_else(|| format!("unknown action {:?}", c.action))?;
    if action == AdminAction::CreateJoinToken && entry_only {
        return Err(ENTRY_ONLY.into());
    }
    let federates_with = trust_domains(&ctx.federates_with)?;
    let federation_added = added(
        action,
        ("federates_with", &federates_with),
        (
            "federation_added",
            ctx.federation_added
                .as_deref()
                .map(trust_domains)
                .transpose()?,
        ),
    )?;
    let dns_names_added = added(
        action,
        ("dns_names", &ctx.dns_names),
        ("dns_names_added", ctx.dns_names_added.clone()),
    )?;
    let principal = if c.principal == "operator" {
        AdminPrincipal::Operator
    } else {
        AdminPrincipal::Admin(SpiffeId::parse(&c.principal).map_err(|e| format!("principal: {e}"))?)
    };
    // An entry action's resource is the entry's SPIFFE ID (one that is none
    // is the case's mistake, not a tenant); a join token's, its tenant.
    let (tenant, id) = match SpiffeId::parse(&c.resource) {
        Ok(id) => (
            template.read(&id).map(|p| p.tenant).unwrap_or_default(),
            id.to_string(),
        ),
        Err(e) if action != AdminAction::CreateJoinToken => {
            return Err(format!(
                "resource: {e} ({} names the entry's SPIFFE ID)",
                c.action
            ))
        }
        Err(_) => (c.resource.clone(), c.resource.clone()),
    };
    let parent_id = match &ctx.parent_id {
        Some(p) => SpiffeId::parse(p)
            .map_err(|e| format!("parent_id: {e}"))?
            .to_string(),
        None => String::new(),
    };
    let admin_added = ctx
        .admin_added
        .unwrap_or(action == AdminAction::CreateEntry && ctx.admin);
    if admin_added && !ctx.admin {
        return Err("admin_added: the entry is not marked admin (admin = true)".into());
    }
    if admin_added && action == AdminAction::DeleteEntry {
        return Err("a delete adds nothing: admin_added must be false".into());
    }
    let resource = AdminResource {
        tenant,
        id,
        federates_with,
        federation_added,
        dns_names: ctx.dns_names.clone(),
        dns_names_added,
        parent_id,
        admin: ctx.admin,
        admin_added,
    };
    Ok(authz.decide_admin_at(&principal, action, &resource, ctx.now))
}

/// What a call adds to one of an entry's lists (`all`): what the case
/// gives, or when it does not say, every item for a create and none
/// otherwise (an update's earlier list is not known). A delete adds nothing,
/// and nothing the list lacks can be added.
fn added(
    action: AdminAction,
    (all_name, all): (&str, &[String]),
    (added_name, given): (&str, Option<Vec<String>>),
) -> Result<Vec<String>, String> {
    let added = given.unwrap_or_else(|| match action {
        AdminAction::CreateEntry => all.to_vec(),
        _ => Vec::new(),
    });
    if action == AdminAction::DeleteEntry && !added.is_empty() {
        return Err(format!("a delete adds nothing: {added_name} must be empty"));
    }
    if let Some(item) = added.iter().find(|a| !all.contains(a)) {
        return Err(format!(
            "{added_name} names {item}, which {all_name} does not list"
        ));
    }
    Ok(added)
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
