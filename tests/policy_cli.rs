//! `ward policy …` on the repository's schema, example policies and cases, and
//! the same files checked by an independent Cedar implementation (cedarpy).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn ward(args: &[&str]) -> Output {
    Command::new(ward_bin())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A copy of the example policy directory to modify.
fn copy_policies() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(repo("policies")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}

#[test]
fn the_schema_and_example_policies_validate_with_ward_and_with_cedarpy() {
    let o = ward(&["policy", "validate", "policies"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("OK: "), "{}", text(&o));
    let script = r#"
import glob, sys, cedarpy
schema = open(sys.argv[1] + "/ward.cedarschema").read()
policies = "\n".join(open(f).read() for f in sorted(glob.glob(sys.argv[1] + "/*.cedar")))
r = cedarpy.validate_policies(policies, schema)
print("passed" if r.validation_passed else "failed", [str(e) for e in r.errors])
sys.exit(0 if r.validation_passed else 1)
"#;
    let o = Command::new(py_spiffe())
        .args(["-c", script])
        .arg(repo("policies"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cedarpy rejects the example policies: {}",
        text(&o)
    );
    // And cedarpy rejects what Ward rejects.
    let dir = copy_policies();
    std::fs::write(dir.path().join("typo.cedar"), "permit (principal, action == Ward::Action::\"connect\", resource) when { resource.servce == \"x\" };\n").unwrap();
    let o = Command::new(py_spiffe())
        .args(["-c", script])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "cedarpy should reject the typo: {}",
        text(&o)
    );
}

#[test]
fn policy_test_runs_every_case_with_a_line_each() {
    let o = ward(&["policy", "test"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("ok    acme web may call acme api"), "{t}");
    let summary = t
        .lines()
        .find(|l| l.ends_with("0 failed"))
        .expect("summary line");
    let passed: usize = summary.split_whitespace().next().unwrap().parse().unwrap();
    assert!(passed >= 20, "{summary}");
    // A wrong expectation fails the run, naming the case.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("wrong.toml");
    std::fs::write(&f, "[[case]]\nname = \"cross-tenant allowed?\"\nprincipal = \"spiffe://example.org/tenant/acme/ns/prod/sa/web\"\nresource = \"spiffe://example.org/tenant/globex/ns/prod/sa/api\"\ndecision = \"allow\"\n").unwrap();
    let o = ward(&["policy", "test", f.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("FAIL  cross-tenant allowed?: expected allow, got deny"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("0 passed, 1 failed"), "{}", text(&o));
}

/// The examples commented in tenant-admins.cedar do what their comments
/// say once uncommented: the federation one lets acme's admins add the
/// partner and nothing else (no DNS name with it), the DNS one its own name
/// and nothing else (no federation with it).
#[test]
fn the_commented_tenant_admin_examples_grant_only_what_they_say() {
    let dir = copy_policies();
    let path = dir.path().join("tenant-admins.cedar");
    let text_in = std::fs::read_to_string(&path).unwrap();
    let mut examples = String::new();
    let mut inside = false;
    for line in text_in.lines() {
        let code = line.strip_prefix("//   ");
        inside = match code {
            Some(c) if c.starts_with("@id(\"acme-may-") => true,
            Some(_) => inside,
            None => false,
        };
        if inside {
            examples.push_str(code.unwrap());
            examples.push('\n');
        }
    }
    assert_eq!(examples.matches("@id(").count(), 2, "{examples}");
    std::fs::write(dir.path().join("examples.cedar"), &examples).unwrap();
    let case = |name: &str, context: &str, decision: &str| {
        format!(
            "[[case]]\nname = \"{name}\"\nprincipal = \"spiffe://example.org/tenant/acme/ns/admin/sa/ops\"\naction = \"create_entry\"\nresource = \"spiffe://example.org/tenant/acme/ns/prod/sa/web\"\ncontext = {{ {context} }}\ndecision = \"{decision}\"\n\n"
        )
    };
    let cases = [
        case(
            "the partner",
            r#"federates_with = ["partner.example"], federation_added = ["partner.example"]"#,
            "allow",
        ),
        case(
            "the partner and a DNS name",
            r#"federates_with = ["partner.example"], federation_added = ["partner.example"], dns_names = ["login.bank.example"], dns_names_added = ["login.bank.example"]"#,
            "deny",
        ),
        case(
            "its own name",
            r#"dns_names = ["api.acme.example"], dns_names_added = ["api.acme.example"]"#,
            "allow",
        ),
        case(
            "its own name and another trust domain",
            r#"dns_names = ["api.acme.example"], dns_names_added = ["api.acme.example"], federates_with = ["evil.example"], federation_added = ["evil.example"]"#,
            "deny",
        ),
    ]
    .concat();
    let f = dir.path().join("examples.toml");
    std::fs::write(&f, cases).unwrap();
    let policies = dir.path().to_str().unwrap();
    let o = ward(&[
        "policy",
        "test",
        "--policies",
        policies,
        f.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}\n{examples}", text(&o));
    assert!(text(&o).contains("4 passed, 0 failed"), "{}", text(&o));
}

#[test]
fn explain_names_the_deciding_policies() {
    let o = ward(&[
        "policy",
        "explain",
        "--principal",
        "spiffe://example.org/tenant/acme/ns/prod/sa/web",
        "--resource",
        "spiffe://example.org/tenant/globex/ns/prod/sa/api",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Decision:  DENY") && text(&o).contains("tenant-isolation"),
        "{}",
        text(&o)
    );
    let o = ward(&[
        "policy",
        "explain",
        "--principal",
        "spiffe://example.org/tenant/acme/ns/prod/sa/api",
        "--resource",
        "spiffe://example.org/tenant/acme/ns/prod/sa/db",
        "--context",
        "{\"destination_port\": 5432}",
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["allowed"], true);
    assert_eq!(v["policies"][0], "acme-api-to-db");
}

#[test]
fn matrix_shows_only_covered_cross_tenant_allows_and_fails_on_an_uncovered_one() {
    let o = ward(&[
        "policy",
        "matrix",
        "--workloads",
        "policies/demo-workloads.txt",
        "--port",
        "8080",
        "--port",
        "5432",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("acme/prod/web → acme/prod/api"), "{t}");
    // One pair, allowed on both ports (each port is told on its own).
    assert!(t.contains("Tenant isolation: 2 cross-tenant allows"), "{t}");
    for port in [8080, 5432] {
        assert!(t.contains(&format!("exception  spiffe://example.org/tenant/acme/ns/prod/sa/billing → spiffe://example.org/tenant/globex/ns/prod/sa/invoices (port {port})")), "{t}");
    }
    assert!(!t.contains("VIOLATION"), "{t}");

    // Without the guard, a plain permit opens a cross-tenant pair: reported, non-zero exit.
    let dir = copy_policies();
    std::fs::remove_file(dir.path().join("tenant-isolation.cedar")).unwrap();
    std::fs::write(dir.path().join("leak.cedar"), "@id(\"leak\")\npermit (principal, action == Ward::Action::\"connect\", resource) when { principal is Ward::Workload && resource is Ward::Workload && principal.service == \"web\" && resource.service == \"api\" };\n").unwrap();
    let o = ward(&[
        "policy",
        "matrix",
        "--workloads",
        "policies/demo-workloads.txt",
        "--policies",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("VIOLATION"), "{}", text(&o));
}

#[test]
fn validate_reports_file_line_and_column_and_fmt_check_finds_unformatted_files() {
    let dir = copy_policies();
    std::fs::write(dir.path().join("zz-bad.cedar"), "// comment\n\npermit (principal, action == Ward::Action::\"connect\", resource)\n  when { resource.servce == \"x\" };\n").unwrap();
    let o = ward(&["policy", "validate", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    let line = t
        .lines()
        .find(|l| l.contains("zz-bad.cedar:"))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(line.contains("zz-bad.cedar:4:"), "{line}");
    assert!(line.contains("servce"), "{line}");

    let o = ward(&["policy", "fmt", "--check", "policies"]);
    assert!(
        o.status.success(),
        "example policies must be formatted: {}",
        text(&o)
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ugly.cedar"),
        "permit(principal,action,resource)when{true};",
    )
    .unwrap();
    let o = ward(&["policy", "fmt", "--check", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("ugly.cedar"), "{}", text(&o));
    let o = ward(&["policy", "fmt", dir.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = ward(&["policy", "fmt", "--check", dir.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

/// `--output json` gives JSON on stdout for `policy fmt` and `policy test`
/// too (what they did, each case's outcome), with the same exit status as
/// without; a file `fmt` rewrites keeps its permissions.
#[test]
fn fmt_and_test_report_in_json_when_asked() {
    use std::os::unix::fs::PermissionsExt;
    let json = |o: &Output| -> serde_json::Value {
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
    };
    let dir = tempfile::tempdir().unwrap();
    let ugly = dir.path().join("ugly.cedar");
    std::fs::write(&ugly, "permit(principal,action,resource)when{true};").unwrap();
    std::fs::set_permissions(&ugly, std::fs::Permissions::from_mode(0o640)).unwrap();
    let d = dir.path().to_str().unwrap();
    let o = ward(&["policy", "fmt", "--check", "--output", "json", d]);
    assert!(!o.status.success());
    let unformatted = json(&o)["unformatted"].clone();
    assert_eq!(unformatted.as_array().unwrap().len(), 1, "{unformatted}");
    assert!(unformatted[0].as_str().unwrap().ends_with("ugly.cedar"));
    let o = ward(&["policy", "fmt", "--output", "json", d]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&o)["formatted"].as_array().unwrap().len(), 1);
    let mode = std::fs::metadata(&ugly).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let o = ward(&["policy", "fmt", "--output", "json", d]);
    assert_eq!(json(&o)["formatted"], serde_json::json!([]));

    let o = ward(&["policy", "test", "--output", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let report = json(&o);
    let cases = report["cases"].as_array().unwrap();
    assert!(cases.len() > 10, "{report}");
    assert_eq!(report["passed"].as_u64().unwrap() as usize, cases.len());
    assert_eq!(report["failed"], 0);
    assert!(cases
        .iter()
        .all(|c| c["passed"] == true && c["name"].is_string()));
}
