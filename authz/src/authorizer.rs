//! Decisions: Cedar over per-request entities, with an atomically swapped policy set.
//!
//! Readers take the active set with one `ArcSwap` load, so a swap never blocks
//! them and never shows them half a set. Entities are built for each request
//! from the two SPIFFE IDs (no global entity store), so the cost of a decision
//! does not grow with the number of workloads.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer as CedarAuthorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, PolicySet, Request, RestrictedExpression, Schema,
};
use serde::Serialize;
use ward_spec::SpiffeId;

use crate::log::DecisionLog;
use crate::policy::{compile, CompiledPolicies, PolicyError, SourceFile};
use crate::template::IdTemplate;

/// Enforce decisions, or only log them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Enforce,
    DryRun,
}

/// What the caller knows about a connection besides the two identities.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectContext {
    pub destination_port: u16,
    pub source_address: IpAddr,
    /// Decide as of this Unix time instead of now (for policy tests and explain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<i64>,
}

/// An admin action on the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminAction {
    CreateEntry,
    UpdateEntry,
    DeleteEntry,
    CreateJoinToken,
}

impl AdminAction {
    fn name(self) -> &'static str {
        match self {
            AdminAction::CreateEntry => "create_entry",
            AdminAction::UpdateEntry => "update_entry",
            AdminAction::DeleteEntry => "delete_entry",
            AdminAction::CreateJoinToken => "create_join_token",
        }
    }
}

/// Who asks for an admin action.
#[derive(Debug, Clone)]
pub enum AdminPrincipal {
    /// The operator on the local socket.
    Operator,
    /// A remote caller presenting an admin SVID.
    Admin(SpiffeId),
}

/// One decision.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// What Cedar decided.
    pub allowed: bool,
    /// What the caller must do: in dry-run mode always true.
    pub permitted: bool,
    /// The `@id`s of the policies that determined the decision.
    pub policies: Vec<String>,
    /// Evaluation errors; any error makes the decision a deny.
    pub errors: Vec<String>,
    pub decision_id: String,
    pub duration_us: f64,
}

struct Active {
    /// Policies not bound to one tenant by their principal scope.
    unscoped: PolicySet,
    /// For each tenant named in a principal scope (`principal in Ward::Tenant::"t"`):
    /// the unscoped policies plus that tenant's. A principal of tenant `t`
    /// cannot match a policy scoped to another tenant, so evaluating this
    /// slice gives the same decision as the whole set, in less time.
    by_tenant: HashMap<String, PolicySet>,
    exceptions: PolicySet,
    exception_ids: Vec<String>,
    version: u64,
}

impl Active {
    fn slice(&self, tenant: &str, templated: bool) -> &PolicySet {
        if templated {
            if let Some(s) = self.by_tenant.get(tenant) {
                return s;
            }
        }
        &self.unscoped
    }
}

/// Splits a policy set by the tenant its principal scope names, if any.
fn slice_by_tenant(all: &PolicySet) -> (PolicySet, HashMap<String, PolicySet>) {
    use cedar_policy::PrincipalConstraint as P;
    let tenant_of = |p: &cedar_policy::Policy| match p.principal_constraint() {
        P::In(u) | P::IsIn(_, u) if u.type_name().to_string() == "Ward::Tenant" => {
            Some(u.id().unescaped().to_owned())
        }
        _ => None,
    };
    let mut unscoped = PolicySet::new();
    let mut scoped: HashMap<String, Vec<cedar_policy::Policy>> = HashMap::new();
    for p in all.policies() {
        match tenant_of(p) {
            Some(t) => scoped.entry(t).or_default().push(p.clone()),
            None => {
                let _ = unscoped.add(p.clone());
            }
        }
    }
    let by_tenant = scoped
        .into_iter()
        .map(|(t, ps)| {
            let mut set = unscoped.clone();
            for p in ps {
                let _ = set.add(p);
            }
            (t, set)
        })
        .collect();
    (unscoped, by_tenant)
}

pub struct Authorizer {
    schema: Schema,
    template: IdTemplate,
    trust_domain_attr: bool,
    mode: Mode,
    active: ArcSwap<Active>,
    cedar: CedarAuthorizer,
    log: Option<DecisionLog>,
    connect_action: EntityUid,
    workload_type: EntityTypeName,
    tenant_type: EntityTypeName,
}

fn type_name(s: &str) -> EntityTypeName {
    EntityTypeName::from_str(s).expect("static type name is valid")
}

fn uid(t: &EntityTypeName, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(t.clone(), EntityId::new(id))
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Authorizer {
    /// An authorizer with no policies (so it denies everything) until [`Authorizer::load`].
    pub fn new(schema: Schema, template: IdTemplate, mode: Mode, log: Option<DecisionLog>) -> Self {
        Authorizer {
            schema,
            template,
            trust_domain_attr: true,
            mode,
            active: ArcSwap::from_pointee(Active {
                unscoped: PolicySet::new(),
                by_tenant: HashMap::new(),
                exceptions: PolicySet::new(),
                exception_ids: Vec::new(),
                version: 0,
            }),
            cedar: CedarAuthorizer::new(),
            log,
            connect_action: uid(&type_name("Ward::Action"), "connect"),
            workload_type: type_name("Ward::Workload"),
            tenant_type: type_name("Ward::Tenant"),
        }
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Validates `files` and, only if they are valid, makes them the active
    /// set. On error the previous set stays active.
    pub fn load(&self, files: &[SourceFile]) -> Result<u64, Vec<PolicyError>> {
        let compiled = compile(files, &self.schema)?;
        Ok(self.install(compiled))
    }

    /// Makes an already validated set active; returns its version.
    pub fn install(&self, c: CompiledPolicies) -> u64 {
        let version = self.active.load().version + 1;
        let exception_ids = c
            .exceptions
            .policies()
            .map(|p| p.id().to_string())
            .collect();
        let (unscoped, by_tenant) = slice_by_tenant(&c.all);
        self.active.store(Arc::new(Active {
            unscoped,
            by_tenant,
            exceptions: c.exceptions,
            exception_ids,
            version,
        }));
        version
    }

    /// The ids of the active cross-tenant exception policies.
    pub fn exception_ids(&self) -> Vec<String> {
        self.active.load().exception_ids.clone()
    }

    /// The version of the active set (0: none loaded yet).
    pub fn version(&self) -> u64 {
        self.active.load().version
    }

    /// The entity for a workload ID, and its tenant's.
    pub fn workload_entities(&self, id: &SpiffeId) -> (EntityUid, Vec<Entity>, String, bool) {
        let parts = self.template.read(id);
        let templated = parts.is_some();
        let parts = parts.unwrap_or_default();
        let euid = uid(&self.workload_type, &id.to_string());
        let mut attrs = HashMap::with_capacity(6);
        attrs.insert(
            "spiffe_id".to_owned(),
            RestrictedExpression::new_string(id.to_string()),
        );
        if self.trust_domain_attr {
            attrs.insert(
                "trust_domain".to_owned(),
                RestrictedExpression::new_string(id.trust_domain().to_string()),
            );
        }
        attrs.insert(
            "tenant".to_owned(),
            RestrictedExpression::new_string(parts.tenant.clone()),
        );
        attrs.insert(
            "namespace".to_owned(),
            RestrictedExpression::new_string(parts.namespace),
        );
        attrs.insert(
            "service".to_owned(),
            RestrictedExpression::new_string(parts.service),
        );
        attrs.insert(
            "templated".to_owned(),
            RestrictedExpression::new_bool(templated),
        );
        let mut parents = HashSet::new();
        let mut out = Vec::with_capacity(2);
        if templated {
            let t = uid(&self.tenant_type, &parts.tenant);
            parents.insert(t.clone());
            out.push(Entity::new_no_attrs(t, HashSet::new()));
        }
        out.push(Entity::new(euid.clone(), attrs, parents).expect("attributes are plain values"));
        (euid, out, parts.tenant, templated)
    }

    /// May `principal` open a stream to `resource`?
    pub fn decide_connect(
        &self,
        principal: &SpiffeId,
        resource: &SpiffeId,
        ctx: &ConnectContext,
    ) -> Decision {
        let start = Instant::now();
        let active = self.active.load();
        let (p_uid, mut ents, p_tenant, p_templated) = self.workload_entities(principal);
        let (r_uid, r_ents, r_tenant, r_templated) = self.workload_entities(resource);
        for e in r_ents {
            if !ents.iter().any(|x| x.uid() == e.uid()) {
                ents.push(e);
            }
        }
        let mut errors = Vec::new();
        let entities = match Entities::from_entities(ents, None) {
            Ok(e) => e,
            Err(e) => {
                return self.finish(
                    start,
                    false,
                    vec![],
                    vec![e.to_string()],
                    principal,
                    "connect",
                    resource,
                    ctx,
                )
            }
        };
        let cross = !(p_templated && r_templated && p_tenant == r_tenant);
        let mut exception = false;
        if cross {
            // Only annotated exception permits can open a cross-tenant pair.
            match self.evaluate(&active.exceptions, &p_uid, &r_uid, ctx, false, &entities) {
                Ok((allowed, _, errs)) => {
                    exception = allowed && errs.is_empty();
                    errors.extend(errs);
                }
                Err(e) => errors.push(e),
            }
        }
        let set = active.slice(&p_tenant, p_templated);
        let (allowed, policies) =
            match self.evaluate(set, &p_uid, &r_uid, ctx, exception, &entities) {
                Ok((allowed, policies, errs)) => {
                    errors.extend(errs);
                    (allowed, policies)
                }
                Err(e) => {
                    errors.push(e);
                    (false, vec![])
                }
            };
        // A policy that errors fails closed: the request is denied.
        let allowed = allowed && errors.is_empty();
        self.finish(
            start, allowed, policies, errors, principal, "connect", resource, ctx,
        )
    }

    #[allow(clippy::type_complexity)]
    fn evaluate(
        &self,
        set: &PolicySet,
        p: &EntityUid,
        r: &EntityUid,
        ctx: &ConnectContext,
        exception: bool,
        entities: &Entities,
    ) -> Result<(bool, Vec<String>, Vec<String>), String> {
        let context = Context::from_pairs([
            (
                "destination_port".to_owned(),
                RestrictedExpression::new_long(ctx.destination_port.into()),
            ),
            (
                "source_address".to_owned(),
                RestrictedExpression::new_ip(ctx.source_address.to_string()),
            ),
            (
                "now".to_owned(),
                RestrictedExpression::new_long(ctx.at.unwrap_or_else(now_unix)),
            ),
            (
                "cross_tenant_exception".to_owned(),
                RestrictedExpression::new_bool(exception),
            ),
        ])
        .map_err(|e| e.to_string())?;
        let req = Request::new(
            p.clone(),
            self.connect_action.clone(),
            r.clone(),
            context,
            None,
        )
        .map_err(|e| e.to_string())?;
        let resp = self.cedar.is_authorized(&req, set, entities);
        let d = resp.diagnostics();
        Ok((
            resp.decision() == CedarDecision::Allow,
            d.reason().map(|id| id.to_string()).collect(),
            d.errors().map(|e| e.to_string()).collect(),
        ))
    }

    /// May `principal` perform an admin `action` on something of `tenant`?
    pub fn decide_admin(
        &self,
        principal: &AdminPrincipal,
        action: AdminAction,
        resource_tenant: &str,
        resource_id: &str,
    ) -> Decision {
        let start = Instant::now();
        let active = self.active.load();
        let tenant = uid(&self.tenant_type, resource_tenant);
        let mut ents = vec![Entity::new_no_attrs(tenant.clone(), HashSet::new())];
        let mut p_tenant = String::new();
        let (p_uid, p_name) = match principal {
            AdminPrincipal::Operator => {
                let u = uid(&type_name("Ward::Operator"), "local");
                ents.push(Entity::new_no_attrs(u.clone(), HashSet::new()));
                (u, "operator (local socket)".to_owned())
            }
            AdminPrincipal::Admin(id) => {
                let t = self.template.read(id).map(|p| p.tenant).unwrap_or_default();
                p_tenant = t.clone();
                let u = uid(&type_name("Ward::Admin"), &id.to_string());
                let mut parents = HashSet::new();
                if !t.is_empty() {
                    let tu = uid(&self.tenant_type, &t);
                    parents.insert(tu.clone());
                    if tu != tenant {
                        ents.push(Entity::new_no_attrs(tu, HashSet::new()));
                    }
                }
                let attrs = HashMap::from([
                    (
                        "spiffe_id".to_owned(),
                        RestrictedExpression::new_string(id.to_string()),
                    ),
                    ("tenant".to_owned(), RestrictedExpression::new_string(t)),
                ]);
                ents.push(Entity::new(u.clone(), attrs, parents).expect("plain attributes"));
                (u, id.to_string())
            }
        };
        let (r_type, r_attrs) = match action {
            AdminAction::CreateJoinToken => (
                "Ward::JoinToken",
                HashMap::from([(
                    "tenant".to_owned(),
                    RestrictedExpression::new_string(resource_tenant.to_owned()),
                )]),
            ),
            _ => (
                "Ward::Entry",
                HashMap::from([
                    (
                        "tenant".to_owned(),
                        RestrictedExpression::new_string(resource_tenant.to_owned()),
                    ),
                    (
                        "spiffe_id".to_owned(),
                        RestrictedExpression::new_string(resource_id.to_owned()),
                    ),
                ]),
            ),
        };
        let r_uid = uid(&type_name(r_type), resource_id);
        ents.push(
            Entity::new(r_uid.clone(), r_attrs, HashSet::from([tenant])).expect("plain attributes"),
        );
        let action_uid = uid(&type_name("Ward::Action"), action.name());
        let result = (|| {
            let entities = Entities::from_entities(ents, None).map_err(|e| e.to_string())?;
            let context = Context::from_pairs([(
                "now".to_owned(),
                RestrictedExpression::new_long(now_unix()),
            )])
            .map_err(|e| e.to_string())?;
            let req =
                Request::new(p_uid, action_uid, r_uid, context, None).map_err(|e| e.to_string())?;
            let set = active.slice(&p_tenant, !p_tenant.is_empty());
            let resp = self.cedar.is_authorized(&req, set, &entities);
            let d = resp.diagnostics();
            Ok::<_, String>((
                resp.decision() == CedarDecision::Allow,
                d.reason().map(|id| id.to_string()).collect::<Vec<_>>(),
                d.errors().map(|e| e.to_string()).collect::<Vec<_>>(),
            ))
        })();
        let (allowed, policies, errors) = match result {
            Ok(r) => r,
            Err(e) => (false, vec![], vec![e]),
        };
        let allowed = allowed && errors.is_empty();
        let ctx = serde_json::json!({ "tenant": resource_tenant });
        self.finish_json(
            start,
            allowed,
            policies,
            errors,
            &p_name,
            action.name(),
            resource_id,
            ctx,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        start: Instant,
        allowed: bool,
        policies: Vec<String>,
        errors: Vec<String>,
        principal: &SpiffeId,
        action: &str,
        resource: &SpiffeId,
        ctx: &ConnectContext,
    ) -> Decision {
        let ctx = serde_json::to_value(ctx).unwrap_or_default();
        self.finish_json(
            start,
            allowed,
            policies,
            errors,
            &principal.to_string(),
            action,
            &resource.to_string(),
            ctx,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_json(
        &self,
        start: Instant,
        allowed: bool,
        mut policies: Vec<String>,
        errors: Vec<String>,
        principal: &str,
        action: &str,
        resource: &str,
        ctx: serde_json::Value,
    ) -> Decision {
        policies.sort();
        let d = Decision {
            allowed,
            permitted: allowed || self.mode == Mode::DryRun,
            policies,
            errors,
            decision_id: crate::log::new_decision_id(),
            duration_us: start.elapsed().as_secs_f64() * 1e6,
        };
        if !d.errors.is_empty() {
            tracing::warn!(decision_id = %d.decision_id, errors = ?d.errors, "policy evaluation error: request denied");
        }
        if let Some(log) = &self.log {
            log.write(&d, self.mode, principal, action, resource, ctx);
        }
        d
    }
}
