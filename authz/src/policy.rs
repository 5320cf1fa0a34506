//! Policy sets: read from `.cedar` files, named by their `@id` annotations,
//! validated in strict mode against the schema before anything uses them.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{PolicyId, PolicySet, Schema, ValidationMode, Validator};
use miette::Diagnostic;

/// The annotation that marks a permit as a cross-tenant exception.
pub const EXCEPTION_ANNOTATION: &str = "cross_tenant_exception";

/// One problem in one file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: String,
    /// 1-based; 0 when the problem has no position.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        } else {
            write!(f, "{}: {}", self.file, self.message)
        }
    }
}

/// A policy source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

/// A validated policy set, and which policy came from which file.
#[derive(Debug, Clone)]
pub struct CompiledPolicies {
    pub all: PolicySet,
    /// The permits annotated as cross-tenant exceptions.
    pub exceptions: PolicySet,
    /// (policy id, file name), for messages.
    pub origins: Vec<(String, String)>,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

fn located(file: &SourceFile, d: &dyn Diagnostic, message: String) -> PolicyError {
    let offset = d.labels().and_then(|mut l| l.next()).map(|l| l.offset());
    let (line, column) = offset.map_or((0, 0), |o| line_col(&file.text, o));
    PolicyError {
        file: file.name.clone(),
        line,
        column,
        message,
    }
}

/// Every `.cedar` file of a directory, sorted by name.
pub fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, PolicyError> {
    let err = |m: String| PolicyError {
        file: dir.display().to_string(),
        line: 0,
        column: 0,
        message: m,
    };
    // An entry that cannot be listed fails the read: a set missing a file
    // is not the directory's set.
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(e.to_string()))?
        .map(|e| e.map(|e| e.path()).map_err(|e| err(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).map_err(|e| err(format!("{}: {e}", p.display())))?;
            Ok(SourceFile {
                name: p.display().to_string(),
                text,
            })
        })
        .collect()
}

/// Reads and parses a schema file.
pub fn read_schema(path: &Path) -> Result<Schema, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        message: e.to_string(),
    })?;
    parse_schema(&path.display().to_string(), &text)
}

pub fn parse_schema(name: &str, text: &str) -> Result<Schema, PolicyError> {
    let file = SourceFile {
        name: name.into(),
        text: text.into(),
    };
    Schema::from_cedarschema_str(text)
        .map(|(s, _warnings)| s)
        .map_err(|e| located(&file, &e, e.to_string()))
}

/// Parses every file, names each policy by its `@id` (or `file#n`), and
/// validates the whole set strictly against `schema`. All problems are
/// reported, each with file, line and column.
pub fn compile(
    files: &[SourceFile],
    schema: &Schema,
) -> Result<CompiledPolicies, Vec<PolicyError>> {
    let mut errors = Vec::new();
    let mut all = PolicySet::new();
    let mut exceptions = PolicySet::new();
    let mut origins = Vec::new();
    let mut seen = HashSet::new();
    for file in files {
        let parsed = match PolicySet::from_str(&file.text) {
            Ok(p) => p,
            Err(e) => {
                for d in e.iter() {
                    errors.push(located(file, d, d.to_string()));
                }
                if e.iter().next().is_none() {
                    errors.push(located(file, &e, e.to_string()));
                }
                continue;
            }
        };
        if parsed.templates().next().is_some() {
            errors.push(PolicyError {
                file: file.name.clone(),
                line: 0,
                column: 0,
                message: "policy templates are not supported".into(),
            });
        }
        for (n, p) in parsed.policies().enumerate() {
            let id = p
                .annotation("id")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{}#{n}", short_name(&file.name)));
            if !seen.insert(id.clone()) {
                errors.push(PolicyError {
                    file: file.name.clone(),
                    line: 0,
                    column: 0,
                    message: format!("policy id {id:?} is used twice"),
                });
                continue;
            }
            let named = p.new_id(PolicyId::new(&id));
            if named.annotation(EXCEPTION_ANNOTATION).is_some() {
                if named.effect() != cedar_policy::Effect::Permit {
                    errors.push(PolicyError {
                        file: file.name.clone(),
                        line: 0,
                        column: 0,
                        message: format!(
                            "@{EXCEPTION_ANNOTATION} on {id:?}: only a permit can be an exception"
                        ),
                    });
                }
                let _ = exceptions.add(named.clone());
            }
            if let Err(e) = all.add(named) {
                errors.push(PolicyError {
                    file: file.name.clone(),
                    line: 0,
                    column: 0,
                    message: e.to_string(),
                });
            }
            origins.push((id, file.name.clone()));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let result = Validator::new(schema.clone()).validate(&all, ValidationMode::Strict);
    for e in result.validation_errors() {
        let id = e.policy_id().to_string();
        let file = origins
            .iter()
            .find(|(pid, _)| *pid == id)
            .and_then(|(_, f)| files.iter().find(|s| &s.name == f))
            .cloned()
            .unwrap_or(SourceFile {
                name: "?".into(),
                text: String::new(),
            });
        errors.push(located(&file, e, format!("policy {id:?}: {e}")));
    }
    if errors.is_empty() {
        Ok(CompiledPolicies {
            all,
            exceptions,
            origins,
        })
    } else {
        Err(errors)
    }
}

fn short_name(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

/// Formats policy text the way `cedar format` does.
pub fn format(text: &str) -> Result<String, String> {
    let config = cedar_policy_formatter::Config {
        line_width: 100,
        indent_width: 2,
    };
    cedar_policy_formatter::policies_str_to_pretty(text, &config).map_err(|e| e.to_string())
}
