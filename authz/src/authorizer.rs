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

use crate::index::Slices;
use crate::log::DecisionLog;
use crate::policy::{compile, CompiledPolicies, PolicyError, SourceFile};
use crate::template::IdTemplate;
use crate::time_limits::TimeLimits;

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
    /// Decide as of this Unix time instead of now (for policy tests and
    /// explain). Logged as `now`: the instant every decision used.
    #[serde(rename = "now", skip_serializing_if = "Option::is_none")]
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
    pub fn name(self) -> &'static str {
        match self {
            AdminAction::CreateEntry => "create_entry",
            AdminAction::UpdateEntry => "update_entry",
            AdminAction::DeleteEntry => "delete_entry",
            AdminAction::CreateJoinToken => "create_join_token",
        }
    }
}

/// What an admin call touches, as its policies see it.
#[derive(Debug, Clone, Default)]
pub struct AdminResource {
    /// The tenant it belongs to ("" when none).
    pub tenant: String,
    /// An entry's SPIFFE ID, or what names a join token.
    pub id: String,
    /// Entries: the trust domains whose bundles the entry's workloads receive.
    pub federates_with: Vec<String>,
    /// Entries: the trust domains this call adds to the entry's federation
    /// (all it lists on create, the new ones on update, none on delete).
    pub federation_added: Vec<String>,
    /// Entries: the DNS names its X.509 SVIDs carry.
    pub dns_names: Vec<String>,
    /// Entries: the DNS names this call gives the entry's SPIFFE ID (as
    /// `federation_added`).
    pub dns_names_added: Vec<String>,
    /// Entries: the SPIFFE ID of the node (or entry) whose workloads it
    /// names.
    pub parent_id: String,
    /// Entries: whether its SVIDs may call the CA as an admin.
    pub admin: bool,
    /// Entries: whether this call marks it admin (a create of one marked
    /// admin; an update that marks it, or gives a marked one another
    /// SPIFFE ID).
    pub admin_added: bool,
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

/// A workload's Cedar entities, built from its SPIFFE ID.
pub struct WorkloadEntities {
    pub uid: EntityUid,
    /// The workload and, if the ID matches the template, its tenant.
    pub entities: Vec<Entity>,
    /// The tenant, if the ID matches the template.
    pub tenant: Option<String>,
    /// The service ("" if the ID does not match the template).
    pub service: String,
}

/// The request context for a connection. Building one evaluates its values
/// (and parses the `ip` extension's name), which costs more than the rest of
/// a small decision, so each thread keeps the contexts it built last: the
/// streams of one peer to one port within the same second share one. The map
/// is bounded; a miss costs only the build.
fn connect_context(ctx: &ConnectContext, now: i64, exception: bool) -> Result<Context, String> {
    type Key = (u16, IpAddr, i64, bool);
    thread_local! {
        static CACHE: std::cell::RefCell<HashMap<Key, Context>> =
            std::cell::RefCell::new(HashMap::new());
    }
    // An IPv4 peer of a dual-stack listener arrives as `::ffff:a.b.c.d`,
    // which Cedar's `ip()` refuses: policies see the IPv4 address.
    let source = ctx.source_address.to_canonical();
    let key = (ctx.destination_port, source, now, exception);
    if let Some(c) = CACHE.with(|c| c.borrow().get(&key).cloned()) {
        return Ok(c);
    }
    let context = Context::from_pairs([
        (
            "destination_port".to_owned(),
            RestrictedExpression::new_long(ctx.destination_port.into()),
        ),
        (
            "source_address".to_owned(),
            RestrictedExpression::new_ip(source.to_string()),
        ),
        ("now".to_owned(), RestrictedExpression::new_long(now)),
        (
            "cross_tenant_exception".to_owned(),
            RestrictedExpression::new_bool(exception),
        ),
    ])
    .map_err(|e| e.to_string())?;
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= 256 {
            c.clear();
        }
        c.insert(key, context.clone());
    });
    Ok(context)
}

struct Active {
    /// The set cut into slices by the principal's tenant and service; each
    /// request is evaluated against its slice only (see [`crate::index`]).
    slices: Slices,
    exceptions: PolicySet,
    exception_ids: Vec<String>,
    version: u64,
    /// When its decisions can change with time alone.
    time_limits: TimeLimits,
}

pub struct Authorizer {
    schema: Schema,
    /// The schema's actions, if any is in a group (`action in group` reads
    /// them); None when no action has one, so requests skip the copy.
    action_groups: Option<Entities>,
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
        let action_groups = schema
            .action_entities()
            .ok()
            .filter(|a| a.iter().any(|e| !e.clone().into_inner().2.is_empty()));
        Authorizer {
            schema,
            action_groups,
            template,
            trust_domain_attr: true,
            mode,
            active: ArcSwap::from_pointee(Active {
                slices: Slices::empty(),
                exceptions: PolicySet::new(),
                exception_ids: Vec::new(),
                version: 0,
                time_limits: TimeLimits::Never,
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

    /// What every request's entities start from: the schema's action
    /// groups, if it has any.
    fn base_entities(&self) -> Entities {
        self.action_groups.clone().unwrap_or_else(Entities::empty)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Writes out buffered decision log lines, waiting (a few seconds at
    /// most) for the log's destination to take them.
    pub fn flush_log(&self) {
        if let Some(log) = &self.log {
            log.flush();
        }
    }

    /// Decision log lines dropped because the log's destination was not
    /// taking them.
    pub fn log_dropped(&self) -> u64 {
        self.log.as_ref().map_or(0, |l| l.dropped())
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
        let slices = Slices::new(&c.all);
        let time_limits = TimeLimits::of(&c.all);
        tracing::debug!(
            version,
            policies = c.all.policies().count(),
            largest_slice = slices.largest(),
            "policy set installed"
        );
        self.active.store(Arc::new(Active {
            slices,
            exceptions: c.exceptions,
            exception_ids,
            version,
            time_limits,
        }));
        version
    }

    /// Whether a connect decision made at `then` can differ at `now` (Unix
    /// seconds) under the active set, its policies unchanged (see
    /// [`TimeLimits::crossed`]).
    pub fn time_may_change_decisions(&self, then: i64, now: i64, any_every: i64) -> bool {
        self.active.load().time_limits.crossed(then, now, any_every)
    }

    /// The ids of the active cross-tenant exception policies.
    pub fn exception_ids(&self) -> Vec<String> {
        self.active.load().exception_ids.clone()
    }

    /// The version of the active set (0: none loaded yet).
    pub fn version(&self) -> u64 {
        self.active.load().version
    }

    /// The entity for a workload ID of our trust domain, and its tenant's.
    pub fn workload_entities(&self, id: &SpiffeId) -> WorkloadEntities {
        self.entities(id, true)
    }

    /// The entities of a connection: the resource is the workload deciding,
    /// so its trust domain is ours, and a principal of another one is foreign.
    pub fn connect_entities(
        &self,
        principal: &SpiffeId,
        resource: &SpiffeId,
    ) -> (WorkloadEntities, WorkloadEntities) {
        let home = principal.is_member_of(resource.trust_domain());
        (
            self.entities(principal, home),
            self.entities(resource, true),
        )
    }

    /// The entity for a workload ID; `home` says whether it belongs to our
    /// trust domain. A workload of another (federated) trust domain is never
    /// a member of one of our tenants, whatever its path says: no tenant,
    /// `templated` false. Its namespace and service are read from the path
    /// as usual, so policies match it by `trust_domain` and `service`.
    fn entities(&self, id: &SpiffeId, home: bool) -> WorkloadEntities {
        let parts = self.template.read(id);
        let templated = home && parts.is_some();
        let mut parts = parts.unwrap_or_default();
        if !home {
            parts.tenant = String::new();
        }
        let id_string = id.to_string();
        let euid = uid(&self.workload_type, &id_string);
        let mut attrs = HashMap::with_capacity(6);
        attrs.insert(
            "spiffe_id".to_owned(),
            RestrictedExpression::new_string(id_string),
        );
        if self.trust_domain_attr {
            attrs.insert(
                "trust_domain".to_owned(),
                RestrictedExpression::new_string(id.trust_domain().as_str().to_owned()),
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
            RestrictedExpression::new_string(parts.service.clone()),
        );
        attrs.insert(
            "templated".to_owned(),
            RestrictedExpression::new_bool(templated),
        );
        // The tenant is only a parent: `principal in Ward::Tenant::"t"` reads
        // the workload's ancestors, so the tenant needs no entity of its own.
        let mut parents = HashSet::new();
        if templated {
            parents.insert(uid(&self.tenant_type, &parts.tenant));
        }
        let entities =
            vec![Entity::new(euid.clone(), attrs, parents).expect("attributes are plain values")];
        WorkloadEntities {
            uid: euid,
            entities,
            tenant: templated.then_some(parts.tenant),
            service: parts.service,
        }
    }

    /// May `principal` open a stream to `resource`?
    pub fn decide_connect(
        &self,
        principal: &SpiffeId,
        resource: &SpiffeId,
        ctx: &ConnectContext,
    ) -> Decision {
        let start = Instant::now();
        // One instant for the whole decision (the exception pass and the
        // main one read the time alike), and the log says which.
        let ctx = &ConnectContext {
            at: Some(ctx.at.unwrap_or_else(now_unix)),
            ..ctx.clone()
        };
        let active = self.active.load();
        let (p, r) = self.connect_entities(principal, resource);
        let mut ents = p.entities;
        if principal != resource {
            ents.extend(r.entities);
        }
        let mut errors = Vec::new();
        // `add_entities` repairs the hierarchy only around what it adds; for
        // two entities that is half the cost of `from_entities`.
        let entities = match self.base_entities().add_entities(ents, None) {
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
        let cross = p.tenant.is_none() || p.tenant != r.tenant;
        let mut exception = false;
        if cross {
            // Only annotated exception permits can open a cross-tenant pair.
            match self.evaluate(&active.exceptions, &p.uid, &r.uid, ctx, false, &entities) {
                Ok((allowed, _, errs)) => {
                    exception = allowed && errs.is_empty();
                    errors.extend(errs);
                }
                Err(e) => errors.push(e),
            }
        }
        let set = active.slices.get(p.tenant.as_deref(), Some(&p.service));
        let (allowed, policies) =
            match self.evaluate(set, &p.uid, &r.uid, ctx, exception, &entities) {
                Ok((allowed, policies, errs)) => {
                    errors.extend(errs);
                    (allowed, policies)
                }
                Err(e) => {
                    errors.push(e);
                    (false, vec![])
                }
            };
        let (allowed, policies) = fail_closed(allowed, policies, &errors);
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
        let context = connect_context(ctx, ctx.at.unwrap_or_else(now_unix), exception)?;
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

    /// May `principal` perform an admin `action` on `resource`?
    pub fn decide_admin(
        &self,
        principal: &AdminPrincipal,
        action: AdminAction,
        resource: &AdminResource,
    ) -> Decision {
        self.decide_admin_at(principal, action, resource, None)
    }

    /// [`Authorizer::decide_admin`] as of Unix time `at` (None: now), as
    /// `ward policy test` asks.
    pub fn decide_admin_at(
        &self,
        principal: &AdminPrincipal,
        action: AdminAction,
        resource: &AdminResource,
        at: Option<i64>,
    ) -> Decision {
        let start = Instant::now();
        let resource_tenant = resource.tenant.as_str();
        let resource_id = resource.id.as_str();
        let is_entry = action != AdminAction::CreateJoinToken;
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
                    (
                        "federates_with".to_owned(),
                        string_set(&resource.federates_with),
                    ),
                    ("dns_names".to_owned(), string_set(&resource.dns_names)),
                    (
                        "parent_id".to_owned(),
                        RestrictedExpression::new_string(resource.parent_id.clone()),
                    ),
                    (
                        "admin".to_owned(),
                        RestrictedExpression::new_bool(resource.admin),
                    ),
                ]),
            ),
        };
        let r_uid = uid(&type_name(r_type), resource_id);
        ents.push(
            Entity::new(r_uid.clone(), r_attrs, HashSet::from([tenant])).expect("plain attributes"),
        );
        let action_uid = uid(&type_name("Ward::Action"), action.name());
        let now = at.unwrap_or_else(now_unix);
        let result = (|| {
            let entities = self
                .base_entities()
                .add_entities(ents, None)
                .map_err(|e| e.to_string())?;
            let mut pairs = vec![("now".to_owned(), RestrictedExpression::new_long(now))];
            if is_entry {
                pairs.push((
                    "federation_added".to_owned(),
                    string_set(&resource.federation_added),
                ));
                pairs.push((
                    "dns_names_added".to_owned(),
                    string_set(&resource.dns_names_added),
                ));
                pairs.push((
                    "admin_added".to_owned(),
                    RestrictedExpression::new_bool(resource.admin_added),
                ));
            }
            let context = Context::from_pairs(pairs).map_err(|e| e.to_string())?;
            let req =
                Request::new(p_uid, action_uid, r_uid, context, None).map_err(|e| e.to_string())?;
            let tenant = (!p_tenant.is_empty()).then_some(p_tenant.as_str());
            let set = active.slices.get(tenant, None);
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
        let (allowed, policies) = fail_closed(allowed, policies, &errors);
        self.finish_json(start, allowed, policies, errors, action.name(), || {
            (
                p_name,
                resource_id.to_owned(),
                if is_entry {
                    serde_json::json!({
                        "tenant": resource_tenant,
                        "federates_with": resource.federates_with,
                        "federation_added": resource.federation_added,
                        "dns_names": resource.dns_names,
                        "dns_names_added": resource.dns_names_added,
                        "parent_id": resource.parent_id,
                        "admin": resource.admin,
                        "admin_added": resource.admin_added,
                        "now": now,
                    })
                } else {
                    serde_json::json!({ "tenant": resource_tenant, "now": now })
                },
            )
        })
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
        self.finish_json(start, allowed, policies, errors, action, || {
            // The address as policies saw it (an IPv4 peer of a dual-stack
            // listener arrives as `::ffff:a.b.c.d`).
            let seen = ConnectContext {
                source_address: ctx.source_address.to_canonical(),
                ..ctx.clone()
            };
            (
                principal.to_string(),
                resource.to_string(),
                serde_json::to_value(&seen).unwrap_or_default(),
            )
        })
    }

    /// Completes a decision and logs it; `log_fields` (principal, resource,
    /// context) is only called when there is a decision log.
    fn finish_json(
        &self,
        start: Instant,
        allowed: bool,
        mut policies: Vec<String>,
        errors: Vec<String>,
        action: &str,
        log_fields: impl FnOnce() -> (String, String, serde_json::Value),
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
            let (principal, resource, ctx) = log_fields();
            log.write(&d, self.mode, &principal, action, &resource, ctx);
        }
        d
    }
}

fn string_set(items: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(items.iter().cloned().map(RestrictedExpression::new_string))
}

/// A policy that errors fails closed: the request is denied. Cedar's own
/// verdict stands when it denied (its forbids decided); an allow turned
/// into a deny names no deciding policy: its permits did not decide it,
/// the errors did.
fn fail_closed(allowed: bool, policies: Vec<String>, errors: &[String]) -> (bool, Vec<String>) {
    match (allowed, errors.is_empty()) {
        (true, false) => (false, Vec::new()),
        _ => (allowed, policies),
    }
}
