//! `ward policy …`: author, check, test and explain Cedar policies.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::json;
use ward_authz::policy::{format, read_dir, read_schema, PolicyError};
use ward_authz::testcase::{run as run_cases, CaseFile};
use ward_authz::{Authorizer, IdTemplate, Mode};

use ward_spec::proto::admin::v1 as admin_pb;
use ward_spec::proto::types::v1 as types;

use super::output::{self, print_json};
use super::{admin, AdminTarget, Output};

fn summary_json(s: &admin_pb::PolicySetSummary) -> serde_json::Value {
    json!({
        "version": s.version, "created_at": s.created_at, "comment": s.comment, "digest": s.digest,
        "files": s.files, "policies": s.policies, "active": s.active,
    })
}

#[derive(clap::Args, Clone)]
pub struct PolicySource {
    /// Policy directory (`.cedar` files).
    #[arg(long = "policies", default_value = "policies")]
    dir: PathBuf,
    /// Cedar schema. Default: ward.cedarschema in the policy directory.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// Workload ID template of the trust domain: the id_template the proxies
    /// (and the CA, for admin policies) are configured with.
    #[arg(long, default_value = ward_authz::template::DEFAULT_TEMPLATE)]
    template: String,
}

impl PolicySource {
    /// The schema given, else the directory's, else the built-in one.
    fn schema(&self) -> anyhow::Result<ward_authz::Schema> {
        let path = match &self.schema {
            Some(p) => p.clone(),
            None => self.dir.join("ward.cedarschema"),
        };
        if self.schema.is_none() && !path.exists() {
            return Ok(ward_authz::default_schema());
        }
        read_schema(&path).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// An authorizer with this directory's policies loaded, or every error.
    fn authorizer(&self) -> anyhow::Result<(Authorizer, IdTemplate)> {
        let template = IdTemplate::parse(&self.template)?;
        let schema = self.schema()?;
        let authz = Authorizer::new(schema, template.clone(), Mode::Enforce, None);
        let files = read_dir(&self.dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        authz.load(&files).map_err(report)?;
        Ok((authz, template))
    }
}

fn report(errors: Vec<PolicyError>) -> anyhow::Error {
    for e in &errors {
        eprintln!("{e}");
    }
    anyhow::anyhow!(
        "{} error{} in the policy set",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    )
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Parse and validate (strict mode) a policy directory against the schema.
    #[command(after_help = "Example:\n  ward policy validate policies/")]
    Validate {
        /// Policy directory (default: policies).
        dir: Option<PathBuf>,
        /// Cedar schema. Default: ward.cedarschema in the directory, else the built-in one.
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Format policy files (or, with --check, list those that are not formatted).
    #[command(after_help = "Example:\n  ward policy fmt --check policies/")]
    Fmt {
        dir: Option<PathBuf>,
        #[arg(long)]
        check: bool,
    },
    /// Run policy test cases (TOML) against a policy directory.
    #[command(
        after_help = "Example:\n  ward policy test policies/tests/*.toml --policies policies/"
    )]
    Test {
        /// Case files. Default: <policies>/tests/*.toml
        files: Vec<PathBuf>,
        #[command(flatten)]
        source: PolicySource,
    },
    /// Decide one request and show the policies that determined it.
    #[command(
        after_help = "Example:\n  ward policy explain --principal spiffe://example.org/tenant/acme/ns/prod/sa/web \\\n    --resource spiffe://example.org/tenant/acme/ns/prod/sa/api --context '{\"destination_port\": 8080}'"
    )]
    Explain {
        #[arg(long)]
        principal: String,
        #[arg(long)]
        resource: String,
        #[arg(long, default_value = "connect")]
        action: String,
        /// JSON: destination_port, source_address, now (Unix seconds); for
        /// entry actions federates_with and federation_added (lists of trust
        /// domains), dns_names and dns_names_added (lists of DNS names).
        #[arg(long)]
        context: Option<String>,
        #[command(flatten)]
        source: PolicySource,
    },
    /// Validate a policy directory's .cedar files and store them in the CA as
    /// the new active version; agents and proxies receive it within a second.
    #[command(
        after_help = "Example:\n  ward policy push policies/ --comment \"allow web to api\""
    )]
    Push {
        /// Policy directory (its .cedar files; the schema is the CA's).
        dir: PathBuf,
        /// A note kept in the history.
        #[arg(long, default_value = "")]
        comment: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// The policy set versions stored in the CA, newest (active) first.
    #[command(after_help = "Example:\n  ward policy history\n  ward policy history --output json")]
    History {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Make an earlier version active again (stored as a new version).
    #[command(after_help = "Example:\n  ward policy rollback 3")]
    Rollback {
        version: u64,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Print a stored version's files (default: the active version), or
    /// write them into a directory.
    #[command(after_help = "Example:\n  ward policy show 3\n  ward policy show --write active/")]
    Show {
        version: Option<u64>,
        /// Write the files into this directory instead of printing them.
        #[arg(long)]
        write: Option<PathBuf>,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Who may connect to whom among listed workloads, and a tenant-isolation report.
    #[command(
        after_help = "Example:\n  ward policy matrix --workloads policies/demo-workloads.txt --port 8080 --port 5432"
    )]
    Matrix {
        /// A file with one SPIFFE ID per line.
        #[arg(long)]
        workloads: PathBuf,
        /// Destination ports to evaluate (a pair is allowed if any port is). Default 8080
        #[arg(long = "port")]
        ports: Vec<u16>,
        #[command(flatten)]
        source: PolicySource,
    },
}

pub async fn run(cmd: PolicyCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Push {
            dir,
            comment,
            target,
        } => {
            let files = read_dir(&dir).map_err(|e| anyhow::anyhow!("{e}"))?;
            if files.is_empty() {
                bail!("{} holds no .cedar files", dir.display());
            }
            let files = files
                .into_iter()
                .map(|f| types::PolicyFile {
                    name: Path::new(&f.name)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or(f.name),
                    text: f.text,
                })
                .collect();
            let mut c = admin::client(&target).await?;
            let s = c
                .push_policy(admin_pb::PushPolicyRequest { files, comment })
                .await
                .map_err(|e| {
                    if e.code() == tonic::Code::InvalidArgument {
                        eprintln!("{}", e.message());
                        anyhow::anyhow!("the CA refused the policy set")
                    } else {
                        admin::status(e)
                    }
                })?
                .into_inner();
            match out {
                Output::Json => print_json(&summary_json(&s)),
                Output::Human => println!(
                    "Policy set version {} is active: {} policies in {} files (sha256 {}).",
                    s.version,
                    s.policies,
                    s.files,
                    &s.digest[..12.min(s.digest.len())]
                ),
            }
        }
        PolicyCommand::History { target } => {
            let c = admin::client(&target).await?;
            let versions = admin::all_pages(|page_token| {
                let mut c = c.clone();
                async move {
                    let req = admin_pb::ListPoliciesRequest {
                        page_token,
                        page_size: 0,
                    };
                    let r = c.list_policies(req).await?.into_inner();
                    Ok((r.versions, r.next_page_token))
                }
            })
            .await?;
            match out {
                Output::Json => print_json(&json!(versions
                    .iter()
                    .map(summary_json)
                    .collect::<Vec<_>>())),
                Output::Human => {
                    if versions.is_empty() {
                        println!("No policy set has been pushed yet (`ward policy push DIR`).");
                    }
                    for s in &versions {
                        println!(
                            "{} {:>4}  {}  {:>3} policies  {:>3} files  {}  {}",
                            if s.active { "*" } else { " " },
                            s.version,
                            output::time(s.created_at),
                            s.policies,
                            s.files,
                            &s.digest[..12.min(s.digest.len())],
                            s.comment
                        );
                    }
                }
            }
        }
        PolicyCommand::Rollback { version, target } => {
            let mut c = admin::client(&target).await?;
            let s = c
                .rollback_policy(admin_pb::RollbackPolicyRequest { version })
                .await
                .map_err(admin::status)?
                .into_inner();
            match out {
                Output::Json => print_json(&summary_json(&s)),
                Output::Human => println!(
                    "Policy set version {} is active: version {version}'s {} policies (sha256 {}).",
                    s.version,
                    s.policies,
                    &s.digest[..12.min(s.digest.len())]
                ),
            }
        }
        PolicyCommand::Show {
            version,
            write,
            target,
        } => {
            let mut c = admin::client(&target).await?;
            let p = c
                .get_policy(admin_pb::GetPolicyRequest {
                    version: version.unwrap_or(0),
                })
                .await
                .map_err(admin::status)?
                .into_inner();
            if let Some(dir) = write {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                for f in &p.files {
                    if f.name.contains('/') || f.name.starts_with('.') {
                        bail!("the CA sent a policy file named {:?}", f.name);
                    }
                    let path = dir.join(&f.name);
                    ward_spec::files::write_atomic(&path, f.text.as_bytes(), false)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                // The directory holds that set, no more: a policy file of
                // another version left beside it would be read with it.
                let mut removed = Vec::new();
                let listing = std::fs::read_dir(&dir)
                    .with_context(|| format!("cannot read {}", dir.display()))?;
                for e in listing {
                    let path = e
                        .with_context(|| format!("cannot read {}", dir.display()))?
                        .path();
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    let Some(name) = name.filter(|n| n.ends_with(".cedar") && path.is_file())
                    else {
                        continue;
                    };
                    if !p.files.iter().any(|f| f.name == name) {
                        std::fs::remove_file(&path)
                            .with_context(|| format!("cannot remove {}", path.display()))?;
                        removed.push(name);
                    }
                }
                removed.sort();
                match out {
                    Output::Json => print_json(&json!({
                        "version": p.version,
                        "written_to": dir.display().to_string(),
                        "files": p.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
                        "removed": removed,
                    })),
                    Output::Human => {
                        println!(
                            "Wrote policy set version {} ({} files) to {}",
                            p.version,
                            p.files.len(),
                            dir.display()
                        );
                        if !removed.is_empty() {
                            println!("Removed what it does not hold: {}", removed.join(", "));
                        }
                    }
                }
                return Ok(());
            }
            match out {
                Output::Json => print_json(&json!({
                    "version": p.version, "created_at": p.created_at, "comment": p.comment, "digest": p.digest,
                    "files": p.files.iter().map(|f| json!({"name": f.name, "text": f.text})).collect::<Vec<_>>(),
                })),
                Output::Human => {
                    println!("// policy set version {} ({})", p.version, p.comment);
                    for f in &p.files {
                        println!("// ---- {} ----\n{}", f.name, f.text.trim_end());
                    }
                }
            }
        }
        PolicyCommand::Validate { dir, schema } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("policies"));
            // As the other commands, and the CA a set is pushed to: the
            // schema given, else the directory's, else the built-in one.
            let own = dir.join("ward.cedarschema");
            let (schema, schema_name) = match schema {
                None if !own.exists() => (
                    ward_authz::default_schema(),
                    "the built-in schema".to_owned(),
                ),
                path => {
                    let path = path.unwrap_or(own);
                    let schema = read_schema(&path).map_err(|e| report(vec![e]))?;
                    (schema, path.display().to_string())
                }
            };
            let files = read_dir(&dir).map_err(|e| report(vec![e]))?;
            let compiled = ward_authz::policy::compile(&files, &schema).map_err(report)?;
            let n = compiled.origins.len();
            match out {
                Output::Json => print_json(
                    &json!({"valid": true, "policies": n, "files": files.len(), "schema": schema_name}),
                ),
                Output::Human => println!(
                    "OK: {n} policies in {} files validate against {schema_name}",
                    files.len(),
                ),
            }
        }
        PolicyCommand::Fmt { dir, check } => fmt(
            &dir.unwrap_or_else(|| PathBuf::from("policies")),
            check,
            out,
        )?,
        PolicyCommand::Test { files, source } => {
            let (authz, template) = source.authorizer()?;
            let files = if files.is_empty() {
                default_cases(&source.dir)?
            } else {
                files
            };
            let (mut passed, mut failed, mut shown) = (0, 0, Vec::new());
            for f in &files {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                let cases: CaseFile =
                    toml::from_str(&text).with_context(|| format!("{}", f.display()))?;
                for r in run_cases(&authz, &cases.cases, &template) {
                    if r.passed {
                        passed += 1;
                    } else {
                        failed += 1;
                    }
                    match out {
                        Output::Json => shown.push(json!({
                            "file": f.display().to_string(), "name": r.name,
                            "passed": r.passed, "detail": r.detail,
                        })),
                        Output::Human if r.passed => println!("ok    {}", r.name),
                        Output::Human => println!("FAIL  {}: {}", r.name, r.detail),
                    }
                }
            }
            match out {
                Output::Json => print_json(&json!({
                    "passed": passed, "failed": failed, "cases": shown,
                })),
                Output::Human => println!("{passed} passed, {failed} failed"),
            }
            if failed > 0 {
                bail!(
                    "{failed} policy test case{} failed",
                    if failed == 1 { "" } else { "s" }
                );
            }
        }
        PolicyCommand::Explain {
            principal,
            resource,
            action,
            context,
            source,
        } => {
            let (authz, template) = source.authorizer()?;
            let ctx: ward_authz::testcase::CaseContext = match context {
                Some(c) => serde_json::from_str(&c)
                    .context("--context must be JSON like {\"destination_port\": 8080}")?,
                None => Default::default(),
            };
            let case = ward_authz::testcase::Case {
                name: String::new(),
                principal,
                resource,
                action,
                context: ctx,
                decision: String::new(),
                policies: None,
            };
            let d = ward_authz::testcase::decide(&authz, &case, &template)
                .map_err(anyhow::Error::msg)?;
            match out {
                Output::Json => print_json(&serde_json::to_value(&d)?),
                Output::Human => {
                    println!("Decision:  {}", if d.allowed { "ALLOW" } else { "DENY" });
                    if d.policies.is_empty() && d.errors.is_empty() {
                        println!("Policies:  none matched (default deny)");
                    } else if d.policies.is_empty() {
                        println!("Policies:  none decided it; a policy failed to evaluate (below)");
                    }
                    for p in &d.policies {
                        println!("Policy:    {p}");
                    }
                    for e in &d.errors {
                        println!("Error:     {e}");
                    }
                }
            }
        }
        PolicyCommand::Matrix {
            workloads,
            ports,
            source,
        } => {
            let (authz, template) = source.authorizer()?;
            let text = std::fs::read_to_string(&workloads)
                .with_context(|| format!("cannot read {}", workloads.display()))?;
            let list = ward_authz::matrix::parse_workloads(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", workloads.display()))?;
            let ports = if ports.is_empty() { vec![8080] } else { ports };
            let m = ward_authz::matrix::compute(&authz, &list, &ports);
            let violations: Vec<_> = m.violations().collect();
            match out {
                Output::Json => print_json(&json!({
                    "allowed": m.pairs.iter().map(|a| json!({
                        "principal": a.principal.to_string(), "resource": a.resource.to_string(), "port": a.port,
                        "policies": a.policies, "cross_tenant": a.cross_tenant, "covered_by_exception": a.covered_by_exception,
                    })).collect::<Vec<_>>(),
                    "violations": violations.len(),
                })),
                Output::Human => {
                    print!("{}", ward_authz::matrix::render(&m, &template));
                    println!("\nAllowed connections ({}):", m.pairs.len());
                    for a in &m.pairs {
                        println!(
                            "  {} → {} (port {}): {}",
                            ward_authz::matrix::label(&template, &a.principal),
                            ward_authz::matrix::label(&template, &a.resource),
                            a.port,
                            a.policies.join(", ")
                        );
                    }
                    let cross: Vec<_> = m.pairs.iter().filter(|a| a.cross_tenant).collect();
                    println!(
                        "\nTenant isolation: {} cross-tenant allow{}",
                        cross.len(),
                        if cross.len() == 1 { "" } else { "s" }
                    );
                    for a in &cross {
                        println!(
                            "  {} {} → {} (port {})",
                            if a.covered_by_exception {
                                "exception "
                            } else {
                                "VIOLATION "
                            },
                            a.principal,
                            a.resource,
                            a.port
                        );
                    }
                }
            }
            if !violations.is_empty() {
                bail!(
                    "{} cross-tenant allow{} not covered by an @cross_tenant_exception policy",
                    violations.len(),
                    if violations.len() == 1 { "" } else { "s" }
                );
            }
        }
    }
    Ok(())
}

fn default_cases(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let tests = dir.join("tests");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&tests)
        .with_context(|| format!("no case files given and cannot read {}", tests.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    Ok(v)
}

fn fmt(dir: &Path, check: bool, out: Output) -> anyhow::Result<()> {
    let files = read_dir(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut formatted, mut unformatted) = (Vec::new(), Vec::new());
    for f in &files {
        let pretty = format(&f.text).map_err(|e| anyhow::anyhow!("{}: {e}", f.name))?;
        if pretty != f.text {
            if check {
                unformatted.push(f.name.clone());
            } else {
                ward_spec::files::rewrite_atomic(Path::new(&f.name), pretty.as_bytes())
                    .with_context(|| format!("cannot rewrite {}", f.name))?;
                formatted.push(f.name.clone());
            }
        }
    }
    match out {
        Output::Json if check => print_json(&json!({ "unformatted": unformatted })),
        Output::Json => print_json(&json!({ "formatted": formatted })),
        Output::Human => {
            for f in &formatted {
                println!("formatted {f}");
            }
            for f in &unformatted {
                println!("not formatted: {f}");
            }
        }
    }
    if !unformatted.is_empty() {
        bail!(
            "{} file{} need `ward policy fmt`",
            unformatted.len(),
            if unformatted.len() == 1 { "" } else { "s" }
        );
    }
    Ok(())
}
