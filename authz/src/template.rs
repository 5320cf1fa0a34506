//! Workload ID templates: which SPIFFE ID path segments name the tenant, the
//! namespace and the service.
//!
//! A template is a path pattern such as `/tenant/{tenant}/ns/{namespace}/sa/{service}`
//! (the default): literal segments must match exactly, `{name}` segments
//! capture. An ID that does not match still authenticates; it just carries no
//! tenant, namespace or service.

use ward_spec::SpiffeId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template {0:?} must start with '/'")]
    NoSlash(String),
    #[error("template {template:?}: unknown variable {{{var}}} (use tenant, namespace, service)")]
    UnknownVar { template: String, var: String },
    #[error("template {0:?} must capture {{tenant}} and {{service}}")]
    Missing(String),
    #[error("template {0:?} has an empty segment (a SPIFFE ID's path has none: no '//', no trailing '/')")]
    EmptySegment(String),
    #[error("template {template:?} captures {{{var}}} twice")]
    Repeated { template: String, var: String },
    #[error("template {template:?}: segment {segment:?} can be no SPIFFE ID's: {reason}")]
    BadLiteral {
        template: String,
        segment: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Tenant,
    Namespace,
    Service,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdTemplate {
    segs: Vec<Seg>,
}

/// What a template reads from an ID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdParts {
    pub tenant: String,
    pub namespace: String,
    pub service: String,
}

pub const DEFAULT_TEMPLATE: &str = "/tenant/{tenant}/ns/{namespace}/sa/{service}";

impl Default for IdTemplate {
    fn default() -> Self {
        IdTemplate::parse(DEFAULT_TEMPLATE).expect("default template is valid")
    }
}

impl IdTemplate {
    pub fn parse(t: &str) -> Result<Self, TemplateError> {
        let path = t
            .strip_prefix('/')
            .ok_or_else(|| TemplateError::NoSlash(t.into()))?;
        // A template that no ID can follow would leave every workload
        // without a tenant: refused here, not found out as an outage.
        let mut segs: Vec<Seg> = Vec::new();
        for s in path.split('/') {
            let seg = match s.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
                Some("tenant") => Seg::Tenant,
                Some("namespace") => Seg::Namespace,
                Some("service") => Seg::Service,
                Some(var) => {
                    return Err(TemplateError::UnknownVar {
                        template: t.into(),
                        var: var.into(),
                    })
                }
                None if s.is_empty() => return Err(TemplateError::EmptySegment(t.into())),
                None => {
                    ward_spec::id::validate_segment(s).map_err(|e| TemplateError::BadLiteral {
                        template: t.into(),
                        segment: s.into(),
                        reason: e.to_string(),
                    })?;
                    Seg::Lit(s.to_owned())
                }
            };
            if !matches!(seg, Seg::Lit(_)) && segs.contains(&seg) {
                return Err(TemplateError::Repeated {
                    template: t.into(),
                    var: s.trim_matches(['{', '}']).into(),
                });
            }
            segs.push(seg);
        }
        if !segs.contains(&Seg::Tenant) || !segs.contains(&Seg::Service) {
            return Err(TemplateError::Missing(t.into()));
        }
        Ok(IdTemplate { segs })
    }

    /// The parts of `id`, or None when the ID does not follow the template.
    pub fn read(&self, id: &SpiffeId) -> Option<IdParts> {
        let mut parts = IdParts::default();
        let mut segs = id.segments();
        for want in &self.segs {
            let got = segs.next()?;
            match want {
                Seg::Lit(l) if l == got => {}
                Seg::Lit(_) => return None,
                Seg::Tenant => parts.tenant = got.to_owned(),
                Seg::Namespace => parts.namespace = got.to_owned(),
                Seg::Service => parts.service = got.to_owned(),
            }
        }
        segs.next().is_none().then_some(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_template_reads_tenant_namespace_and_service() {
        let t = IdTemplate::default();
        let id = SpiffeId::parse("spiffe://td/tenant/acme/ns/prod/sa/web").unwrap();
        assert_eq!(
            t.read(&id),
            Some(IdParts {
                tenant: "acme".into(),
                namespace: "prod".into(),
                service: "web".into()
            })
        );
        for other in [
            "spiffe://td/web",
            "spiffe://td/tenant/acme/ns/prod/sa/web/extra",
            "spiffe://td/tenant/acme/namespace/prod/sa/web",
        ] {
            assert_eq!(t.read(&SpiffeId::parse(other).unwrap()), None, "{other}");
        }
    }

    #[test]
    fn custom_templates_and_errors() {
        let t = IdTemplate::parse("/{tenant}/{service}").unwrap();
        let p = t
            .read(&SpiffeId::parse("spiffe://td/acme/api").unwrap())
            .unwrap();
        assert_eq!(
            (p.tenant.as_str(), p.service.as_str(), p.namespace.as_str()),
            ("acme", "api", "")
        );
        assert!(matches!(
            IdTemplate::parse("/{team}/{service}"),
            Err(TemplateError::UnknownVar { .. })
        ));
        assert!(matches!(
            IdTemplate::parse("/x/{service}"),
            Err(TemplateError::Missing(_))
        ));
        for t in [
            "/tenant/{tenant}/sa/{service}/",
            "/tenant//{tenant}/{service}",
        ] {
            assert!(
                matches!(IdTemplate::parse(t), Err(TemplateError::EmptySegment(_))),
                "{t}"
            );
        }
        assert!(matches!(
            IdTemplate::parse("/{tenant}/{tenant}/{service}"),
            Err(TemplateError::Repeated { var, .. }) if var == "tenant"
        ));
        for t in [
            "/te nant/{tenant}/{service}",
            "/../{tenant}/{service}",
            "/a%2f/{tenant}/{service}",
        ] {
            assert!(
                matches!(IdTemplate::parse(t), Err(TemplateError::BadLiteral { .. })),
                "{t}"
            );
        }
        // Literal segments may repeat; these are what IDs can have.
        IdTemplate::parse("/x/{tenant}/x/{service}/a-b_c.d").unwrap();
        assert!(matches!(
            IdTemplate::parse("x/{tenant}/{service}"),
            Err(TemplateError::NoSlash(_))
        ));
    }
}
