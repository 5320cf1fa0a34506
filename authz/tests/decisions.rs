//! The authorizer's semantics, on the repository's schema and example policies.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ward_authz::policy::{read_dir, read_schema, SourceFile};
use ward_authz::reload::{load_and_watch, ReloadStats};
use ward_authz::testcase::{run, CaseFile};
use ward_authz::{
    AdminAction, AdminPrincipal, AdminResource, Authorizer, ConnectContext, IdTemplate, Mode,
};
use ward_spec::SpiffeId;

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn schema() -> cedar_policy::Schema {
    read_schema(&policies_dir().join("ward.cedarschema")).unwrap()
}

fn authz(mode: Mode) -> Authorizer {
    Authorizer::new(schema(), IdTemplate::default(), mode, None)
}

fn file(name: &str, text: &str) -> SourceFile {
    SourceFile {
        name: name.into(),
        text: text.into(),
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn w(tenant: &str, svc: &str) -> SpiffeId {
    id(&format!(
        "spiffe://example.org/tenant/{tenant}/ns/prod/sa/{svc}"
    ))
}

fn ctx(port: u16) -> ConnectContext {
    ConnectContext {
        destination_port: port,
        source_address: IpAddr::from([10, 0, 0, 1]),
        at: None,
    }
}

#[test]
fn example_policies_validate_and_every_policy_test_case_passes() {
    let a = authz(Mode::Enforce);
    a.load(&read_dir(&policies_dir()).unwrap()).unwrap();
    let mut total = 0;
    for f in ["connections.toml", "admin.toml"] {
        let text = std::fs::read_to_string(policies_dir().join("tests").join(f)).unwrap();
        let cases: CaseFile = toml::from_str(&text).unwrap();
        for r in run(&a, &cases.cases, &IdTemplate::default()) {
            assert!(r.passed, "{f}: {}: {}", r.name, r.detail);
            total += 1;
        }
    }
    assert!(total >= 15);
}

/// A dual-stack listener's IPv4 peers (`::ffff:10.1.2.3`) are decided on
/// as the IPv4 addresses they are.
#[test]
fn an_ipv4_peer_of_a_dual_stack_listener_is_seen_as_ipv4() {
    let a = authz(Mode::Enforce);
    a.load(&[file(
        "net.cedar",
        r#"permit (principal, action == Ward::Action::"connect", resource)
           when { context.source_address.isInRange(ip("10.0.0.0/8")) };"#,
    )])
    .unwrap();
    let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
    let outside: IpAddr = "::ffff:192.168.1.1".parse().unwrap();
    let decide = |source_address| {
        a.decide_connect(
            &w("acme", "web"),
            &w("acme", "api"),
            &ConnectContext {
                destination_port: 80,
                source_address,
                at: None,
            },
        )
    };
    let d = decide(mapped);
    assert!(d.allowed && d.errors.is_empty(), "{d:?}");
    let d = decide(outside);
    assert!(!d.allowed && d.errors.is_empty(), "{d:?}");
}

/// A schema that puts actions in a group: `action in` the group matches.
#[test]
fn a_forbid_on_an_action_group_applies_to_its_actions() {
    let text = std::fs::read_to_string(policies_dir().join("ward.cedarschema")).unwrap();
    let grouped = text.replace(
        "  action connect appliesTo {",
        "  action all_connects;\n  action connect in [all_connects] appliesTo {",
    );
    assert_ne!(text, grouped);
    let (schema, _) = cedar_policy::Schema::from_cedarschema_str(&grouped).unwrap();
    let a = Authorizer::new(schema, IdTemplate::default(), Mode::Enforce, None);
    a.load(&[file(
        "p.cedar",
        r#"permit (principal, action == Ward::Action::"connect", resource);
           forbid (principal, action in Ward::Action::"all_connects", resource)
           when { resource.service == "db" };"#,
    )])
    .unwrap();
    assert!(
        a.decide_connect(&w("acme", "web"), &w("acme", "api"), &ctx(80))
            .allowed
    );
    let d = a.decide_connect(&w("acme", "web"), &w("acme", "db"), &ctx(80));
    assert!(!d.allowed, "the group's forbid did not apply: {d:?}");
}

/// `ward policy test` decides an admin case as of its `now`, as it does a
/// connection case.
#[test]
fn an_admin_case_is_decided_as_of_its_now() {
    let a = authz(Mode::Enforce);
    a.load(&[file(
        "tokens.cedar",
        r#"@id("until-1000") permit (principal is Ward::Admin, action == Ward::Action::"create_join_token", resource)
           when { context.now < 1000 };"#,
    )])
    .unwrap();
    let cases: CaseFile = toml::from_str(
        r#"
        [[case]]
        name = "before"
        principal = "spiffe://example.org/tenant/acme/ns/admin/sa/ops"
        action = "create_join_token"
        resource = "acme"
        context = { now = 999 }
        decision = "allow"

        [[case]]
        name = "after"
        principal = "spiffe://example.org/tenant/acme/ns/admin/sa/ops"
        action = "create_join_token"
        resource = "acme"
        context = { now = 1000 }
        decision = "deny"
        "#,
    )
    .unwrap();
    for r in run(&a, &cases.cases, &IdTemplate::default()) {
        assert!(r.passed, "{}: {}", r.name, r.detail);
    }
}

/// Entry policies see the entry's parent, whether it is marked admin and
/// whether the call marks it: a tenant admin kept from making admins, and
/// from registering workloads under nodes outside its cluster, is kept
/// from both (in a case as in a call), and can still do the rest (update
/// an entry marked admin before).
#[test]
fn entry_policies_see_the_parent_and_the_admin_mark() {
    let a = authz(Mode::Enforce);
    a.load(&[file(
        "entries.cedar",
        r#"@id("own-tenant-own-cluster") permit (principal is Ward::Admin, action in [Ward::Action::"create_entry", Ward::Action::"update_entry"], resource)
           when { resource.tenant == principal.tenant &&
                  resource.parent_id like "spiffe://example.org/agent/east/*" };
           @id("no-new-admins") forbid (principal is Ward::Admin, action, resource is Ward::Entry)
           when { context.admin_added };"#,
    )])
    .unwrap();
    let admin = AdminPrincipal::Admin(id("spiffe://example.org/tenant/acme/ns/admin/sa/ops"));
    let entry = |parent: &str, is_admin: bool, made_admin: bool| AdminResource {
        tenant: "acme".into(),
        id: "spiffe://example.org/tenant/acme/ns/prod/sa/web".into(),
        parent_id: parent.into(),
        admin: is_admin,
        admin_added: made_admin,
        ..Default::default()
    };
    let east = "spiffe://example.org/agent/east/n1";
    let west = "spiffe://example.org/agent/west/n1";
    for (action, resource, allowed) in [
        (AdminAction::CreateEntry, entry(east, false, false), true),
        (AdminAction::CreateEntry, entry(west, false, false), false),
        (AdminAction::CreateEntry, entry(east, true, true), false),
        (AdminAction::UpdateEntry, entry(east, true, true), false),
        (AdminAction::UpdateEntry, entry(east, true, false), true),
    ] {
        let d = a.decide_admin(&admin, action, &resource);
        assert_eq!(d.allowed, allowed, "{action:?} {resource:?}: {d:?}");
    }
    let cases: CaseFile = toml::from_str(&format!(
        r#"
        [[case]]
        name = "east"
        principal = "spiffe://example.org/tenant/acme/ns/admin/sa/ops"
        action = "create_entry"
        resource = "spiffe://example.org/tenant/acme/ns/prod/sa/web"
        context = {{ parent_id = "{east}" }}
        decision = "allow"
        policies = ["own-tenant-own-cluster"]

        [[case]]
        name = "east, marked admin"
        principal = "spiffe://example.org/tenant/acme/ns/admin/sa/ops"
        action = "create_entry"
        resource = "spiffe://example.org/tenant/acme/ns/prod/sa/web"
        context = {{ parent_id = "{east}", admin = true }}
        decision = "deny"
        policies = ["no-new-admins"]

        [[case]]
        name = "an entry marked admin before, updated"
        principal = "spiffe://example.org/tenant/acme/ns/admin/sa/ops"
        action = "update_entry"
        resource = "spiffe://example.org/tenant/acme/ns/prod/sa/web"
        context = {{ parent_id = "{east}", admin = true }}
        decision = "allow"

        [[case]]
        name = "an update that marks it admin"
        principal = "spiffe://example.org/tenant/acme/ns/admin/sa/ops"
        action = "update_entry"
        resource = "spiffe://example.org/tenant/acme/ns/prod/sa/web"
        context = {{ parent_id = "{east}", admin = true, admin_added = true }}
        decision = "deny"

        [[case]]
        name = "no parent given"
        principal = "spiffe://example.org/tenant/acme/ns/admin/sa/ops"
        action = "create_entry"
        resource = "spiffe://example.org/tenant/acme/ns/prod/sa/web"
        decision = "deny"
        "#
    ))
    .unwrap();
    for r in run(&a, &cases.cases, &IdTemplate::default()) {
        assert!(r.passed, "{}: {}", r.name, r.detail);
    }
    // A parent that is no SPIFFE ID, or one given to a join token, is the
    // case's mistake.
    for (action, resource, context) in [
        (
            "create_entry",
            "spiffe://example.org/tenant/acme/ns/prod/sa/web",
            r#"{ parent_id = "east" }"#,
        ),
        ("create_join_token", "acme", r#"{ admin = true }"#),
        (
            "create_entry",
            "spiffe://example.org/tenant/acme/ns/prod/sa/web",
            r#"{ admin_added = true }"#,
        ),
    ] {
        let cases: CaseFile = toml::from_str(&format!(
            r#"
            [[case]]
            name = "c"
            principal = "spiffe://example.org/tenant/acme/ns/admin/sa/ops"
            action = "{action}"
            resource = "{resource}"
            context = {context}
            decision = "deny"
            "#
        ))
        .unwrap();
        let r = &run(&a, &cases.cases, &IdTemplate::default())[0];
        assert!(!r.passed, "{context}: passed");
    }
}

/// An entry case's resource is the entry's SPIFFE ID: one that is none (a
/// bare tenant name, a trailing slash) fails the case, whatever decision it
/// expects, instead of being decided as if it named a tenant.
#[test]
fn an_entry_case_whose_resource_is_no_spiffe_id_fails() {
    let a = authz(Mode::Enforce);
    a.load(&[file(
        "entries.cedar",
        r#"@id("own-tenant") permit (principal is Ward::Admin, action == Ward::Action::"create_entry", resource)
           when { resource.tenant == principal.tenant };"#,
    )])
    .unwrap();
    for (resource, decision) in [
        ("acme", "allow"),
        ("spiffe://example.org/tenant/acme/ns/prod/sa/web/", "deny"),
    ] {
        let cases: CaseFile = toml::from_str(&format!(
            r#"
            [[case]]
            name = "c"
            principal = "spiffe://example.org/tenant/acme/ns/admin/sa/ops"
            action = "create_entry"
            resource = "{resource}"
            decision = "{decision}"
            "#
        ))
        .unwrap();
        let r = &run(&a, &cases.cases, &IdTemplate::default())[0];
        assert!(!r.passed, "{resource}: passed");
        assert!(r.detail.contains("resource:"), "{resource}: {}", r.detail);
    }
}

/// The matrix counts a federated workload as in none of our tenants, as the
/// authorizer does: its allow to a same-named tenant here is cross-tenant.
#[test]
fn the_matrix_flags_a_federated_workloads_allow_as_cross_tenant() {
    let a = authz(Mode::Enforce);
    a.load(&[file(
        "open.cedar",
        r#"permit (principal, action == Ward::Action::"connect", resource);"#,
    )])
    .unwrap();
    let partner = id("spiffe://partner.example/tenant/globex/ns/prod/sa/web");
    let ours = w("globex", "api");
    let m = ward_authz::matrix::compute(&a, &[partner.clone(), ours.clone()], &[8080]);
    let pair = m
        .pairs
        .iter()
        .find(|p| p.principal == partner && p.resource == ours)
        .expect("the open set allows it");
    assert!(pair.cross_tenant && !pair.covered_by_exception);
    assert_eq!(m.violations().count(), 2);
}

/// Each port is decided on its own: an exception that allows a pair on
/// one port does not hide an allow on another that no exception covers,
/// whatever order the ports are given in.
#[test]
fn the_matrix_reports_an_uncovered_allow_on_a_port_after_a_covered_one() {
    let a = authz(Mode::Enforce);
    a.load(&[file(
        "loose.cedar",
        r#"@id("exception-on-443")
@cross_tenant_exception("billing")
permit (principal, action == Ward::Action::"connect", resource)
when { context.destination_port == 443 };

@id("anything-on-8080")
permit (principal, action == Ward::Action::"connect", resource)
when { context.destination_port == 8080 };"#,
    )])
    .unwrap();
    let (acme, globex) = (w("acme", "billing"), w("globex", "invoices"));
    for ports in [[443, 8080], [8080, 443]] {
        let m = ward_authz::matrix::compute(&a, &[acme.clone(), globex.clone()], &ports);
        let bad: Vec<u16> = m
            .violations()
            .filter(|v| v.principal == acme)
            .map(|v| v.port)
            .collect();
        assert_eq!(bad, [8080], "ports {ports:?}");
        let covered = m
            .pairs
            .iter()
            .any(|p| p.port == 443 && p.covered_by_exception);
        assert!(covered, "ports {ports:?}");
    }
}

#[test]
fn no_policy_means_deny() {
    let a = authz(Mode::Enforce);
    let d = a.decide_connect(&w("acme", "web"), &w("acme", "api"), &ctx(80));
    assert!(!d.allowed && d.policies.is_empty() && d.errors.is_empty());
}

#[test]
fn a_workload_of_a_federated_trust_domain_is_never_in_one_of_our_tenants() {
    let a = authz(Mode::Enforce);
    a.load(&read_dir(&policies_dir()).unwrap()).unwrap();
    let partner_web = id("spiffe://partner.test/tenant/acme/ns/prod/sa/web");
    // The same path in our trust domain is acme's web, which may call api.
    assert!(
        a.decide_connect(&w("acme", "web"), &w("acme", "api"), &ctx(8080))
            .allowed
    );
    let d = a.decide_connect(&partner_web, &w("acme", "api"), &ctx(8080));
    assert!(!d.allowed, "a partner's path made it a member of acme");
    // A policy that names the trust domain admits it.
    a.load(&[file(
        "partner.cedar",
        r#"@id("partner-web") permit (principal is Ward::Workload, action == Ward::Action::"connect", resource is Ward::Workload)
           when { principal.trust_domain == "partner.test" && principal.service == "web" && !principal.templated && principal.tenant == "" };"#,
    )])
    .unwrap();
    let d = a.decide_connect(&partner_web, &w("acme", "api"), &ctx(8080));
    assert!(d.allowed);
    assert_eq!(d.policies, ["partner-web"]);
}

#[test]
fn forbid_wins_over_permit() {
    let a = authz(Mode::Enforce);
    a.load(&[file("p.cedar", r#"
        @id("all") permit (principal, action == Ward::Action::"connect", resource);
        @id("no-db") forbid (principal, action == Ward::Action::"connect", resource is Ward::Workload) when { resource.service == "db" };
    "#)])
    .unwrap();
    assert!(
        a.decide_connect(&w("acme", "web"), &w("acme", "api"), &ctx(80))
            .allowed
    );
    let d = a.decide_connect(&w("acme", "web"), &w("acme", "db"), &ctx(80));
    assert!(!d.allowed);
    assert_eq!(d.policies, ["no-db"]);
}

#[test]
fn a_policy_that_errors_denies_and_the_error_is_logged() {
    let out = Arc::new(Mutex::new(Vec::<u8>::new()));
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = ward_authz::log::DecisionLog::new(Box::new(Sink(out.clone())));
    let a = Authorizer::new(schema(), IdTemplate::default(), Mode::Enforce, Some(log));
    // The forbid overflows at evaluation. Cedar alone would skip it and allow.
    a.load(&[file(
        "p.cedar",
        r#"
        @id("all") permit (principal, action == Ward::Action::"connect", resource);
        @id("overflow") forbid (principal, action == Ward::Action::"connect", resource)
          when { context.destination_port * 9223372036854775807 > 0 };
    "#,
    )])
    .unwrap();
    let d = a.decide_connect(&w("acme", "web"), &w("acme", "api"), &ctx(443));
    assert!(!d.allowed, "an erroring policy must fail closed");
    assert_eq!(d.errors.len(), 1, "{:?}", d.errors);
    assert!(d.errors[0].contains("overflow"), "{:?}", d.errors);
    // The permit matched, but the deny is the error's: it is not named.
    assert!(d.policies.is_empty(), "{:?}", d.policies);
    // Lines are written by the log's own thread; wait until it has.
    a.flush_log();
    let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["decision"], "deny");
    assert_eq!(
        line["principal"],
        "spiffe://example.org/tenant/acme/ns/prod/sa/web"
    );
    assert_eq!(line["action"], "connect");
    assert_eq!(
        line["resource"],
        "spiffe://example.org/tenant/acme/ns/prod/sa/api"
    );
    assert_eq!(line["context"]["destination_port"], 443);
    // The instant the decision used (policies' `context.now`).
    let now = line["context"]["now"].as_i64().expect("context.now logged");
    assert!((now - time_now()).abs() <= 5, "{line}");
    assert!(line["errors"][0].as_str().unwrap().contains("overflow"));
    assert_eq!(line["policies"], serde_json::json!([]), "{line}");
    for key in ["time", "decision_id", "policies", "duration_us", "mode"] {
        assert!(
            line.get(key).is_some(),
            "decision log line lacks {key}: {line}"
        );
    }
    // A dual-stack listener's IPv4 peer is logged as policies saw it.
    let mapped = ConnectContext {
        source_address: "::ffff:10.0.0.9".parse().unwrap(),
        ..ctx(443)
    };
    a.decide_connect(&w("acme", "web"), &w("acme", "api"), &mapped);
    a.flush_log();
    let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["context"]["source_address"], "10.0.0.9", "{line}");
}

#[test]
fn an_invalid_policy_set_is_refused_with_positions_and_the_previous_set_stays() {
    let a = authz(Mode::Enforce);
    a.load(&[file("good.cedar", r#"@id("web-api") permit (principal, action == Ward::Action::"connect", resource) when { resource.service == "api" };"#)])
        .unwrap();
    let v = a.version();
    let errs = a
        .load(&[file("bad.cedar", "\n\n@id(\"typo\") permit (principal, action == Ward::Action::\"connect\", resource) when { resource.servce == \"api\" };")])
        .unwrap_err();
    assert_eq!(errs[0].file, "bad.cedar");
    assert_eq!(errs[0].line, 3, "{}", errs[0]);
    assert!(errs[0].column > 1, "{}", errs[0]);
    assert!(errs[0].message.contains("servce"), "{}", errs[0]);
    let syntax = a
        .load(&[file("syntax.cedar", "permit (principal, action, resource")])
        .unwrap_err();
    assert_eq!(syntax[0].line, 1, "{}", syntax[0]);
    assert_eq!(a.version(), v, "the rejected sets never became active");
    assert!(
        a.decide_connect(&w("acme", "web"), &w("acme", "api"), &ctx(80))
            .allowed
    );
}

#[test]
fn dry_run_decides_and_logs_but_lets_the_request_through() {
    let a = authz(Mode::DryRun);
    let d = a.decide_connect(&w("acme", "web"), &w("globex", "api"), &ctx(80));
    assert!(!d.allowed);
    assert!(d.permitted);
    let e = authz(Mode::Enforce).decide_connect(&w("acme", "web"), &w("globex", "api"), &ctx(80));
    assert!(!e.permitted);
}

/// Two sets whose policies both apply to the same request: a decision must
/// name exactly one set's pair, never a mix.
#[test]
fn hot_swaps_under_load_never_show_a_mixed_set() {
    let set = |tag: &str| {
        vec![file(&format!("{tag}.cedar"), &format!(
            "@id(\"{tag}-1\") permit (principal, action == Ward::Action::\"connect\", resource);\n\
             @id(\"{tag}-2\") permit (principal, action == Ward::Action::\"connect\", resource) when {{ context.destination_port > 0 }};"
        ))]
    };
    let a = Arc::new(authz(Mode::Enforce));
    a.load(&set("a")).unwrap();
    let compiled_a = ward_authz::policy::compile(&set("a"), a.schema()).unwrap();
    let compiled_b = ward_authz::policy::compile(&set("b"), a.schema()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let decisions = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..3 {
        let (a, stop, decisions) = (a.clone(), stop.clone(), decisions.clone());
        threads.push(std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let d = a.decide_connect(&w("acme", "web"), &w("acme", "api"), &ctx(80));
                assert!(d.errors.is_empty(), "{:?}", d.errors);
                assert!(d.allowed);
                let ok = d.policies == ["a-1", "a-2"] || d.policies == ["b-1", "b-2"];
                assert!(ok, "mixed or partial set: {:?}", d.policies);
                decisions.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for i in 0..400 {
        a.install(if i % 2 == 0 {
            compiled_b.clone()
        } else {
            compiled_a.clone()
        });
        std::thread::sleep(Duration::from_micros(500));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a deciding thread saw an inconsistent set");
    }
    assert!(decisions.load(Ordering::Relaxed) > 1000);
    assert_eq!(a.version(), 401);
}

#[test]
fn a_watched_directory_reloads_good_sets_and_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.cedar");
    std::fs::write(&p, r#"@id("deny-all-but-api") permit (principal, action == Ward::Action::"connect", resource) when { resource.service == "api" };"#).unwrap();
    let a = Arc::new(authz(Mode::Enforce));
    let stats = Arc::new(ReloadStats::default());
    let (loaded, _watch) = load_and_watch(
        a.clone(),
        dir.path().to_owned(),
        Duration::from_millis(50),
        stats.clone(),
    );
    assert!(loaded);
    assert!(
        !a.decide_connect(&w("acme", "web"), &w("acme", "db"), &ctx(80))
            .allowed
    );
    std::fs::write(&p, r#"@id("db-too") permit (principal, action == Ward::Action::"connect", resource) when { resource.service == "db" };"#).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a
        .decide_connect(&w("acme", "web"), &w("acme", "db"), &ctx(80))
        .allowed
    {
        assert!(Instant::now() < deadline, "new set not picked up");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(
        &p,
        "permit (principal, action, resource) when { nonsense };",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.rejected.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "bad set not noticed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        a.decide_connect(&w("acme", "web"), &w("acme", "db"), &ctx(80))
            .allowed,
        "last good set stays"
    );

    // A rewrite of the same size with the old mtime put back is a change
    // too: what the files say is compared, not their sizes and times.
    let db = r#"@id("db-web") permit (principal, action == Ward::Action::"connect", resource) when { resource.service == "db" };"#;
    let web = r#"@id("db-web") permit (principal, action == Ward::Action::"connect", resource) when { resource.service == "web" };"#;
    assert_ne!(db.len(), web.len());
    let web = web.replace("\"web\"", "\"web\" ");
    let db = db.replace("\"db\"", "\"db\"  ");
    assert_eq!(db.len(), web.len());
    std::fs::write(&p, &db).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a
        .decide_connect(&w("acme", "web"), &w("acme", "db"), &ctx(80))
        .allowed
        || stats.loaded.load(Ordering::Relaxed) < 3
    {
        assert!(Instant::now() < deadline, "db-web set not picked up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
    std::fs::write(&p, &web).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a
        .decide_connect(&w("acme", "web"), &w("acme", "db"), &ctx(80))
        .allowed
    {
        assert!(
            Instant::now() < deadline,
            "a same-size rewrite not picked up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        a.decide_connect(&w("acme", "api"), &w("acme", "web"), &ctx(80))
            .allowed
    );
}

mod isolation {
    use super::*;
    use proptest::prelude::*;

    const SERVICES: &[&str] = &[
        "web",
        "api",
        "db",
        "billing",
        "invoices",
        "oncall-debug",
        "cache",
        "auth",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3))]
        /// Every ordered pair of a generated population (≥ 100 workloads, ≥ 5
        /// tenants, the demo tenants among them) against the example policies:
        /// no cross-tenant allow except through an annotated exception.
        #[test]
        fn no_cross_tenant_allow_outside_the_annotated_exceptions(
            extra_tenants in proptest::collection::vec("[a-z]{3,8}", 3..6),
            picks in proptest::collection::vec((0usize..8, 0usize..8, "[a-z]{1,6}"), 100..120),
        ) {
            let a = authz(Mode::Enforce);
            a.load(&read_dir(&policies_dir()).unwrap()).unwrap();
            let mut tenants = vec!["acme".to_string(), "globex".to_string()];
            tenants.extend(extra_tenants);
            tenants.sort();
            tenants.dedup();
            prop_assume!(tenants.len() >= 5);
            let workloads: Vec<SpiffeId> = picks
                .iter()
                .map(|(t, s, ns)| id(&format!("spiffe://example.org/tenant/{}/ns/{ns}/sa/{}", tenants[t % tenants.len()], SERVICES[*s])))
                .collect();
            let exceptions = a.exception_ids();
            let m = ward_authz::matrix::compute(&a, &workloads, &[8080, 5432]);
            for pair in &m.pairs {
                if pair.cross_tenant {
                    prop_assert!(pair.policies.iter().any(|p| exceptions.contains(p)),
                        "cross-tenant allow without exception: {} -> {} by {:?}", pair.principal, pair.resource, pair.policies);
                }
            }
            prop_assert_eq!(m.violations().count(), 0);
        }
    }
}

/// The authorizer evaluates only the policies that can apply to a request
/// (its principal's tenant and service slice). Over every ordered pair of a
/// population, and policies of every shape the slicing treats differently
/// (tenant-scoped or not, a leading service test or not, a service test after
/// one that errors), it must give what raw Cedar gives on the whole set: the
/// same decision, the same determining policies, and an error where Cedar
/// reports one.
#[test]
fn slices_decide_exactly_as_the_whole_set() {
    use cedar_policy::{Context, Entities, EntityUid, Request, RestrictedExpression};
    use std::str::FromStr;
    let text = r#"
        @id("guard") forbid (principal is Ward::Workload, action == Ward::Action::"connect", resource is Ward::Workload)
          unless { principal.tenant == resource.tenant && principal.templated } unless { context.cross_tenant_exception };
        @id("acme-web-api") permit (principal in Ward::Tenant::"acme", action == Ward::Action::"connect", resource)
          when { principal.service == "web" && resource.service == "api" };
        @id("acme-tenant-then-service") permit (principal in Ward::Tenant::"acme", action == Ward::Action::"connect", resource)
          when { principal.tenant == resource.tenant && principal.service == "api" && resource.service == "db" };
        @id("acme-any-to-cache") permit (principal in Ward::Tenant::"acme", action == Ward::Action::"connect", resource)
          when { resource.service == "cache" };
        @id("globex-web-api-443") permit (principal in Ward::Tenant::"globex", action == Ward::Action::"connect", resource)
          when { principal.service == "web" && context.destination_port == 443 };
        @id("any-tenant-db-to-db") permit (principal, action == Ward::Action::"connect", resource)
          when { principal.service == "db" && resource.service == "db" };
        @id("errors-before-service") forbid (principal, action == Ward::Action::"connect", resource)
          when { context.destination_port * 9223372036854775807 > 0 && principal.service == "cache" };
        @id("errors-after-service") forbid (principal in Ward::Tenant::"initech", action == Ward::Action::"connect", resource)
          when { principal.service == "web" && context.destination_port * 9223372036854775807 > 0 };
        @id("untemplated-ops") permit (principal, action == Ward::Action::"connect", resource)
          when { principal.spiffe_id == "spiffe://example.org/ops" };
    "#;
    let a = authz(Mode::Enforce);
    a.load(&[file("p.cedar", text)]).unwrap();
    let all = ward_authz::policy::compile(&[file("p.cedar", text)], &schema())
        .unwrap()
        .all;
    let mut population = vec![id("spiffe://example.org/ops"), id("spiffe://other.org/x")];
    for t in ["acme", "globex", "initech"] {
        for s in ["web", "api", "db", "cache"] {
            population.push(w(t, s));
        }
    }
    let cedar = cedar_policy::Authorizer::new();
    let connect = EntityUid::from_str(r#"Ward::Action::"connect""#).unwrap();
    let (mut compared, mut allowed, mut errored) = (0, 0, 0);
    for port in [443u16, 0] {
        let c = ctx(port);
        for p in &population {
            for r in &population {
                let d = a.decide_connect(p, r, &c);
                let (pe, re) = a.connect_entities(p, r);
                let mut ents = pe.entities;
                for e in re.entities {
                    if !ents.iter().any(|x| x.uid() == e.uid()) {
                        ents.push(e);
                    }
                }
                let entities = Entities::from_entities(ents, None).unwrap();
                let context = Context::from_pairs([
                    (
                        "destination_port".into(),
                        RestrictedExpression::new_long(port.into()),
                    ),
                    (
                        "source_address".into(),
                        RestrictedExpression::new_ip("10.0.0.1"),
                    ),
                    ("now".into(), RestrictedExpression::new_long(time_now())),
                    (
                        "cross_tenant_exception".into(),
                        RestrictedExpression::new_bool(false),
                    ),
                ])
                .unwrap();
                let req = Request::new(pe.uid, connect.clone(), re.uid, context, None).unwrap();
                let resp = cedar.is_authorized(&req, &all, &entities);
                let mut reasons: Vec<String> =
                    resp.diagnostics().reason().map(|r| r.to_string()).collect();
                reasons.sort();
                let errors = resp.diagnostics().errors().count();
                let cedar_allowed = resp.decision() == cedar_policy::Decision::Allow;
                let raw_allowed = cedar_allowed && errors == 0;
                // An allow an error turns into a deny names no permit.
                if cedar_allowed && errors > 0 {
                    reasons.clear();
                }
                assert_eq!(d.allowed, raw_allowed, "{p} -> {r} port {port}: {d:?}");
                assert_eq!(d.policies, reasons, "{p} -> {r} port {port}");
                assert_eq!(
                    d.errors.len(),
                    errors,
                    "{p} -> {r} port {port}: {:?}",
                    d.errors
                );
                compared += 1;
                allowed += d.allowed as usize;
                errored += (errors > 0) as usize;
            }
        }
    }
    // The population exercises allows, denies and errors, not only one of them.
    assert_eq!(compared, 2 * 14 * 14);
    assert!(
        allowed >= 5 && errored >= 10,
        "allowed {allowed}, errored {errored}"
    );
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
