//! Policy slices: for each request, the few policies that can apply to it.
//!
//! Cedar evaluates every policy of the set it is given, at a cost of about a
//! microsecond each. Most policies in a mesh are allow-lists that name the
//! principal's tenant in their scope (`principal in Ward::Tenant::"acme"`) and
//! the principal's service in the first test of their condition
//! (`when { principal.service == "web" && … }`). A request whose principal is
//! of another tenant, or another service, cannot be permitted, forbidden or
//! made to fail by such a policy: the scope is false, or Cedar's `&&` stops at
//! the false first test before anything that could error. So the authorizer
//! evaluates only the slice for the principal's (tenant, service), which gives
//! the same decision, the same determining policies and the same errors as the
//! whole set.
//!
//! A policy is indexed by service only when that test cannot itself error:
//! the action scope is `connect` (so the principal is a `Workload`, which the
//! authorizer always builds with these attributes) and every test before it is
//! a comparison of a principal or resource attribute with a literal.

use std::collections::{BTreeSet, HashMap};

use cedar_policy::{Policy, PolicySet, PrincipalConstraint};
use serde_json::Value;

/// Attributes every `Workload` entity the authorizer builds carries.
const WORKLOAD_ATTRS: &[&str] = &[
    "spiffe_id",
    "trust_domain",
    "tenant",
    "namespace",
    "service",
    "templated",
];

/// Where a policy can apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reach {
    /// `Some(t)`: only to principals in `Ward::Tenant::"t"`.
    pub tenant: Option<String>,
    /// `Some(s)`: only to connections whose principal's service is `s`.
    pub service: Option<String>,
}

/// Reads a policy's scope and first condition to find where it can apply.
pub(crate) fn reach(p: &Policy) -> Reach {
    let tenant = match p.principal_constraint() {
        PrincipalConstraint::In(u) | PrincipalConstraint::IsIn(_, u)
            if u.type_name().to_string() == "Ward::Tenant" =>
        {
            Some(u.id().unescaped().to_owned())
        }
        _ => None,
    };
    let service = p.to_json().ok().and_then(|est| principal_service(&est));
    Reach { tenant, service }
}

/// The literal `s` of a leading `principal.service == "s"` test that nothing
/// before it can make fail, in a policy on the `connect` action.
fn principal_service(est: &Value) -> Option<String> {
    let action = est.get("action")?;
    let connect = action.get("op")? == "=="
        && action.pointer("/entity/type")? == "Ward::Action"
        && action.pointer("/entity/id")? == "connect";
    if !connect {
        return None;
    }
    let first = est.get("conditions")?.as_array()?.first()?;
    if first.get("kind")? != "when" {
        return None;
    }
    let mut conjuncts = Vec::new();
    flatten_and(first.get("body")?, &mut conjuncts);
    for c in conjuncts {
        let (l, r) = cannot_error_equality(c)?;
        for (a, b) in [(l, r), (r, l)] {
            if let (Operand::Attr("principal", "service"), Operand::Literal(v)) = (a, b) {
                return v.as_str().map(str::to_owned);
            }
        }
    }
    None
}

#[derive(Clone, Copy)]
enum Operand<'a> {
    /// `principal.attr` or `resource.attr`, for an attribute every workload has.
    Attr(&'a str, &'a str),
    Literal(&'a Value),
}

/// The two sides of an `a == b` whose evaluation cannot error: each side a
/// literal or an attribute every workload has (`==` itself never errors).
fn cannot_error_equality(e: &Value) -> Option<(Operand<'_>, Operand<'_>)> {
    let eq = e.get("==")?;
    Some((operand(eq.get("left")?)?, operand(eq.get("right")?)?))
}

fn operand(x: &Value) -> Option<Operand<'_>> {
    if let Some(v) = x.get("Value") {
        return Some(Operand::Literal(v));
    }
    let dot = x.get(".")?;
    let var = dot.pointer("/left/Var")?.as_str()?;
    let attr = dot.get("attr")?.as_str()?;
    (matches!(var, "principal" | "resource") && WORKLOAD_ATTRS.contains(&attr))
        .then_some(Operand::Attr(var, attr))
}

/// The operands of `a && b && …`, in evaluation order.
fn flatten_and<'a>(e: &'a Value, out: &mut Vec<&'a Value>) {
    match e.get("&&") {
        Some(and) => {
            if let (Some(l), Some(r)) = (and.get("left"), and.get("right")) {
                flatten_and(l, out);
                flatten_and(r, out);
            } else {
                out.push(e);
            }
        }
        None => out.push(e),
    }
}

/// A policy set cut into slices by [`Reach`].
pub(crate) struct Slices {
    /// Policies that apply to every request.
    base: PolicySet,
    /// `base` plus the unscoped policies for one principal service.
    by_service: HashMap<String, PolicySet>,
    /// `base` plus a tenant's policies not bound to one service.
    by_tenant: HashMap<String, PolicySet>,
    /// Everything that can apply to a principal of (tenant, service).
    by_tenant_service: HashMap<(String, String), PolicySet>,
    largest: usize,
}

impl Slices {
    pub(crate) fn empty() -> Self {
        Slices {
            base: PolicySet::new(),
            by_service: HashMap::new(),
            by_tenant: HashMap::new(),
            by_tenant_service: HashMap::new(),
            largest: 0,
        }
    }

    pub(crate) fn new(all: &PolicySet) -> Self {
        let mut base = Vec::new();
        let mut unscoped_service: HashMap<String, Vec<Policy>> = HashMap::new();
        let mut tenant_base: HashMap<String, Vec<Policy>> = HashMap::new();
        let mut tenant_service: HashMap<String, HashMap<String, Vec<Policy>>> = HashMap::new();
        for p in all.policies() {
            let r = reach(p);
            match (r.tenant, r.service) {
                (None, None) => base.push(p.clone()),
                (None, Some(s)) => unscoped_service.entry(s).or_default().push(p.clone()),
                (Some(t), None) => tenant_base.entry(t).or_default().push(p.clone()),
                (Some(t), Some(s)) => tenant_service
                    .entry(t)
                    .or_default()
                    .entry(s)
                    .or_default()
                    .push(p.clone()),
            }
        }
        let set = |parts: &[&[Policy]]| {
            let mut s = PolicySet::new();
            for p in parts.iter().flat_map(|ps| ps.iter()) {
                // Ids are unique in `all`, so adding cannot fail.
                let _ = s.add(p.clone());
            }
            s
        };
        let none: Vec<Policy> = Vec::new();
        let tenants: BTreeSet<&String> = tenant_base.keys().chain(tenant_service.keys()).collect();
        let mut by_tenant = HashMap::new();
        let mut by_tenant_service = HashMap::new();
        for t in tenants {
            let tb = tenant_base.get(t).unwrap_or(&none);
            by_tenant.insert(t.clone(), set(&[&base, tb]));
            let own = tenant_service.get(t);
            let services: BTreeSet<&String> = unscoped_service
                .keys()
                .chain(own.into_iter().flat_map(|m| m.keys()))
                .collect();
            for s in services {
                let us = unscoped_service.get(s).unwrap_or(&none);
                let ts = own.and_then(|m| m.get(s)).unwrap_or(&none);
                by_tenant_service.insert((t.clone(), s.clone()), set(&[&base, us, tb, ts]));
            }
        }
        let by_service: HashMap<String, PolicySet> = unscoped_service
            .iter()
            .map(|(s, us)| (s.clone(), set(&[&base, us])))
            .collect();
        let largest = by_tenant_service
            .values()
            .chain(by_tenant.values())
            .chain(by_service.values())
            .map(|s| s.policies().count())
            .max()
            .unwrap_or(0)
            .max(base.len());
        Slices {
            base: set(&[&base]),
            by_service,
            by_tenant,
            by_tenant_service,
            largest,
        }
    }

    /// The policies that can apply to a principal of `tenant` (if the ID
    /// matched the template) and, for `connect`, of `service`.
    pub(crate) fn get(&self, tenant: Option<&str>, service: Option<&str>) -> &PolicySet {
        if let Some(t) = tenant {
            if self.by_tenant.contains_key(t) {
                if let Some(s) = service {
                    if let Some(set) = self.by_tenant_service.get(&(t.to_owned(), s.to_owned())) {
                        return set;
                    }
                }
                return &self.by_tenant[t];
            }
        }
        service
            .and_then(|s| self.by_service.get(s))
            .unwrap_or(&self.base)
    }

    /// The number of policies in the largest slice.
    pub(crate) fn largest(&self) -> usize {
        self.largest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn policy(text: &str) -> Policy {
        Policy::from_str(text).unwrap()
    }

    #[test]
    fn reads_tenant_scope_and_leading_service_test() {
        let r = reach(&policy(
            r#"permit (principal is Ward::Workload in Ward::Tenant::"acme", action == Ward::Action::"connect", resource)
               when { resource.tenant == "acme" && principal.service == "web" && resource.service == "api" };"#,
        ));
        assert_eq!(r.tenant.as_deref(), Some("acme"));
        assert_eq!(r.service.as_deref(), Some("web"));
        // Literal on the left works too.
        let r = reach(&policy(
            r#"permit (principal, action == Ward::Action::"connect", resource) when { "db" == principal.service };"#,
        ));
        assert_eq!((r.tenant, r.service.as_deref()), (None, Some("db")));
    }

    #[test]
    fn does_not_index_what_could_error_or_other_actions() {
        for text in [
            // A test that can error comes first: skipping the policy would hide the error.
            r#"permit (principal, action == Ward::Action::"connect", resource) when { principal.missing == 1 && principal.service == "web" };"#,
            // Not a plain equality.
            r#"permit (principal, action == Ward::Action::"connect", resource) when { principal.service like "w*" };"#,
            // An `unless` first.
            r#"permit (principal, action == Ward::Action::"connect", resource) unless { principal.service == "web" };"#,
            // Not only `connect`: the principal may be an admin without a service.
            r#"permit (principal, action, resource) when { principal.service == "web" };"#,
            // `||` is not `&&`.
            r#"permit (principal, action == Ward::Action::"connect", resource) when { principal.service == "web" || true };"#,
        ] {
            assert_eq!(reach(&policy(text)).service, None, "{text}");
        }
    }

    #[test]
    fn slices_hold_exactly_what_can_apply() {
        let all = PolicySet::from_str(
            r#"
            @id("guard") forbid (principal, action, resource) unless { principal.tenant == resource.tenant };
            @id("any-web") permit (principal, action == Ward::Action::"connect", resource) when { principal.service == "web" };
            @id("acme-all") permit (principal in Ward::Tenant::"acme", action, resource);
            @id("acme-api") permit (principal in Ward::Tenant::"acme", action == Ward::Action::"connect", resource) when { principal.service == "api" };
            @id("globex-db") permit (principal in Ward::Tenant::"globex", action == Ward::Action::"connect", resource) when { principal.service == "db" };
            "#,
        )
        .unwrap();
        let s = Slices::new(&all);
        let ids = |set: &PolicySet| {
            let mut v: Vec<String> = set
                .policies()
                .map(|p| p.annotation("id").unwrap().to_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            ids(s.get(Some("acme"), Some("api"))),
            ["acme-all", "acme-api", "guard"]
        );
        assert_eq!(
            ids(s.get(Some("acme"), Some("web"))),
            ["acme-all", "any-web", "guard"]
        );
        assert_eq!(ids(s.get(Some("acme"), None)), ["acme-all", "guard"]);
        assert_eq!(
            ids(s.get(Some("globex"), Some("db"))),
            ["globex-db", "guard"]
        );
        assert_eq!(
            ids(s.get(Some("globex"), Some("web"))),
            ["any-web", "guard"]
        );
        assert_eq!(
            ids(s.get(Some("initech"), Some("web"))),
            ["any-web", "guard"]
        );
        assert_eq!(ids(s.get(None, Some("db"))), ["guard"]);
        assert_eq!(s.largest(), 3);
    }
}
