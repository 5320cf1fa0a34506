//! Versioned Cedar policy sets, and the admin decisions they make.
//!
//! An operator pushes a set of `.cedar` files; the CA validates it strictly
//! against the schema and stores it as the next version, which becomes the
//! active one. Agents fetch the active version with their sync and hand it on
//! to proxies. The same set decides the CA's own admin calls: creating,
//! changing and deleting entries and join tokens ([`AdminAction`]). Until a
//! set is pushed, a bootstrap set lets the operator on the local socket do
//! everything and remote admins nothing. Pushing, rolling back and reading
//! policy sets are the local operator's alone (and not subject to Cedar), so
//! no set can lock the operator out of repairing it.

use ring::digest;
use ward_authz::policy::{compile, CompiledPolicies, PolicyError, SourceFile};
use ward_authz::{
    AdminAction, AdminPrincipal, AdminResource, Authorizer, Decision, IdTemplate, Mode,
};
use ward_spec::SpiffeId;

use crate::datastore::PolicySetRecord;

/// Active until the first push.
pub const BOOTSTRAP_POLICY: &str = r#"// Built in: active until a policy set is pushed.
@id("ward-bootstrap-local-operator")
permit (
  principal is Ward::Operator,
  action in
    [Ward::Action::"create_entry",
     Ward::Action::"update_entry",
     Ward::Action::"delete_entry",
     Ward::Action::"create_join_token"],
  resource
);
"#;

/// The CA's authorizer for admin calls, following the active set.
pub struct AdminPolicy {
    authz: Authorizer,
    template: IdTemplate,
}

impl AdminPolicy {
    /// Starts from `active` (the stored active set) or the bootstrap set.
    /// A stored set that no longer validates (a schema change) is reported
    /// and the bootstrap set decides instead: remote admins are refused.
    /// `template` reads tenants from SPIFFE IDs.
    pub fn new(active: Option<&PolicySetRecord>, template: IdTemplate) -> Self {
        let authz = Authorizer::new(
            ward_authz::default_schema(),
            template.clone(),
            Mode::Enforce,
            None,
        );
        let p = AdminPolicy { authz, template };
        let loaded = active.map(|set| match p.validate(&set.files) {
            Ok(c) => {
                p.authz.install(c);
                true
            }
            Err(errors) => {
                tracing::error!(version = set.version, errors = %joined(&errors), "the stored policy set does not validate; only the local operator may administer until a valid set is pushed");
                false
            }
        });
        if loaded != Some(true) {
            p.authz
                .load(&[SourceFile {
                    name: "bootstrap.cedar (built in)".into(),
                    text: BOOTSTRAP_POLICY.into(),
                }])
                .expect("the bootstrap policy validates");
        }
        p
    }

    /// Parses and validates a set strictly against the schema.
    pub fn validate(
        &self,
        files: &[(String, String)],
    ) -> Result<CompiledPolicies, Vec<PolicyError>> {
        compile(&sources(files), self.authz.schema())
    }

    /// Makes a validated set the one that decides admin calls.
    pub fn install(&self, c: CompiledPolicies) {
        self.authz.install(c);
    }

    /// The tenant a workload ID names through the template ("" if none).
    pub fn tenant_of(&self, id: &SpiffeId) -> String {
        self.template.read(id).map(|p| p.tenant).unwrap_or_default()
    }

    pub fn decide(
        &self,
        caller: &AdminPrincipal,
        action: AdminAction,
        resource: &AdminResource,
    ) -> Decision {
        self.authz.decide_admin(caller, action, resource)
    }
}

fn sources(files: &[(String, String)]) -> Vec<SourceFile> {
    files
        .iter()
        .map(|(name, text)| SourceFile {
            name: name.clone(),
            text: text.clone(),
        })
        .collect()
}

/// Every error, one per line.
pub fn joined(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Hex SHA-256 over the files, in the order given (name, NUL, text, NUL).
pub fn digest_of(files: &[(String, String)]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for (name, text) in files {
        ctx.update(name.as_bytes());
        ctx.update(&[0]);
        ctx.update(text.as_bytes());
        ctx.update(&[0]);
    }
    hex::encode(ctx.finish())
}

/// Checks a pushed set's shape (names and sizes) before it is parsed, and
/// sorts it by name.
pub fn normalize(mut files: Vec<(String, String)>) -> Result<Vec<(String, String)>, String> {
    const MAX_FILES: usize = 1000;
    const MAX_BYTES: usize = 16 << 20;
    if files.is_empty() {
        return Err("the policy set has no files".into());
    }
    if files.len() > MAX_FILES {
        return Err(format!(
            "the policy set has {} files; at most {MAX_FILES}",
            files.len()
        ));
    }
    let total: usize = files.iter().map(|(n, t)| n.len() + t.len()).sum();
    if total > MAX_BYTES {
        return Err(format!(
            "the policy set is {total} bytes; at most {MAX_BYTES}"
        ));
    }
    for (name, _) in &files {
        if !name.ends_with(".cedar")
            || name.contains('/')
            || name.contains('\\')
            || name.starts_with('.')
        {
            return Err(format!(
                "file name {name:?}: a policy file is a plain `NAME.cedar` name"
            ));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = files.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!("file name {:?} appears twice", w[0].0));
    }
    Ok(files)
}

/// How many policies a validated set holds.
pub fn count(c: &CompiledPolicies) -> usize {
    c.all.policies().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(files: &[(&str, &str)]) -> Vec<(String, String)> {
        files
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn bootstrap_lets_only_the_local_operator_administer() {
        let p = AdminPolicy::new(None, IdTemplate::default());
        let admin = AdminPrincipal::Admin(
            SpiffeId::parse("spiffe://example.org/tenant/acme/ns/ops/sa/admin").unwrap(),
        );
        let acme = AdminResource {
            tenant: "acme".into(),
            id: "x".into(),
            ..Default::default()
        };
        let op = p.decide(&AdminPrincipal::Operator, AdminAction::CreateEntry, &acme);
        assert!(op.allowed, "{op:?}");
        assert_eq!(op.policies, vec!["ward-bootstrap-local-operator"]);
        assert!(!p.decide(&admin, AdminAction::CreateEntry, &acme).allowed);
    }

    #[test]
    fn tenants_are_read_through_the_configured_template() {
        let id = SpiffeId::parse("spiffe://example.org/acme/web").unwrap();
        assert_eq!(
            AdminPolicy::new(None, IdTemplate::default()).tenant_of(&id),
            ""
        );
        let p = AdminPolicy::new(None, IdTemplate::parse("/{tenant}/{service}").unwrap());
        assert_eq!(p.tenant_of(&id), "acme");
    }

    #[test]
    fn a_stored_set_that_does_not_validate_falls_back_to_bootstrap() {
        let bad = PolicySetRecord {
            version: 3,
            files: set(&[(
                "a.cedar",
                "permit (principal, action, resource) when { principal.nope };",
            )]),
            digest: String::new(),
            comment: String::new(),
            created_at: 0,
            policies: 1,
        };
        let p = AdminPolicy::new(Some(&bad), IdTemplate::default());
        let x = AdminResource {
            id: "x".into(),
            ..Default::default()
        };
        let d = p.decide(&AdminPrincipal::Operator, AdminAction::DeleteEntry, &x);
        assert_eq!(d.policies, vec!["ward-bootstrap-local-operator"]);
    }

    #[test]
    fn normalize_sorts_and_refuses_bad_names_and_duplicates() {
        let ok = normalize(set(&[("b.cedar", ""), ("a.cedar", "")])).unwrap();
        assert_eq!(ok[0].0, "a.cedar");
        for bad in ["../x.cedar", "x.txt", ".hidden.cedar"] {
            let e = normalize(set(&[(bad, "")])).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        let e = normalize(set(&[("a.cedar", ""), ("a.cedar", "x")])).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert!(normalize(vec![]).is_err());
    }

    #[test]
    fn digest_changes_with_any_byte_of_names_or_texts() {
        let a = digest_of(&set(&[("a.cedar", "x")]));
        assert_eq!(a.len(), 64);
        assert_ne!(a, digest_of(&set(&[("a.cedar", "y")])));
        assert_ne!(a, digest_of(&set(&[("b.cedar", "x")])));
        assert_ne!(
            digest_of(&set(&[("a.cedar", "x"), ("b.cedar", "")])),
            digest_of(&set(&[("a.cedar", ""), ("b.cedar", "x")]))
        );
    }
}
