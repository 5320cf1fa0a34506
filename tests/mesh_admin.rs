//! End to end: the control plane obeys the same policy language. A tenant
//! admin (an SVID whose entry is marked `admin`) calls the CA's admin API
//! remotely over mutual TLS; Cedar lets it manage entries and join tokens of
//! its own tenant only, and every refusal is audited.

mod common;

use std::process::{Command, Output};

use common::{count_audit_lines, ward_bin, AgentProcess, CaProcess, TD};

fn step(n: u32, what: &str) {
    println!("step {n}: {what}");
}

const ACME_ADMIN_UID: u32 = 1006;
const ACME_TOOL_UID: u32 = 1007;

/// `ward ARGS` as `uid`, calling the CA remotely with that workload's SVID.
fn remote(ca: &CaProcess, agent: &AgentProcess, uid: u32, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    Command::new(ward_bin())
        .args(args)
        .args([
            "--ca-address",
            &ca.node_addr,
            "--workload-socket",
            &agent.endpoint(),
        ])
        .uid(uid)
        .gid(uid)
        .current_dir("/")
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

fn entry_args<'a>(spiffe_id: &'a str, parent: &'a str) -> Vec<&'a str> {
    vec![
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:2000",
    ]
}

#[test]
fn a_tenant_admin_manages_only_its_own_tenant_and_every_refusal_is_audited() {
    step(
        1,
        "a CA, an agent; a broken policy set is refused, the repository's is pushed",
    );
    let ca = CaProcess::start(&[]);
    let agent = AgentProcess::start(&ca);
    let parent = ca.first_agent();
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    // A set that does not validate is refused with every error, and nothing is stored.
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(
        broken.path().join("typo.cedar"),
        "permit (principal, action, resource)\nwhen { principal.tenant == resource.tennant };\n",
    )
    .unwrap();
    let out = ca.cli(&["policy", "push", broken.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("typo.cedar:2:"), "{}", text(&out));
    assert_eq!(ca.cli_json(&["policy", "history"]), serde_json::json!([]));
    let out = ca.cli(&["policy", "push", policies]);
    assert!(out.status.success(), "{}", text(&out));

    step(
        2,
        "acme's admin identity (an entry marked admin) and a plain acme workload",
    );
    let admin_id = format!("spiffe://{TD}/tenant/acme/ns/ops/sa/admin");
    let tool_id = format!("spiffe://{TD}/tenant/acme/ns/ops/sa/tool");
    let out = ca.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        &admin_id,
        "--parent-id",
        &parent,
        "--selector",
        &format!("unix:uid:{ACME_ADMIN_UID}"),
        "--admin",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    ca.register(&tool_id, &parent, &format!("unix:uid:{ACME_TOOL_UID}"));
    // Wait until the agent serves both.
    for uid in [ACME_ADMIN_UID, ACME_TOOL_UID] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !agent.svid_cli(&["fetch"], Some(uid)).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "uid {uid} got no SVID"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    step(
        3,
        "acme's admin creating an entry for globex is refused, and audited",
    );
    let globex = format!("spiffe://{TD}/tenant/globex/ns/prod/sa/api");
    let refused_before = ca.audit_lines("refused");
    let out = remote(&ca, &agent, ACME_ADMIN_UID, &entry_args(&globex, &parent));
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("PermissionDenied") && msg.contains("create_entry") && msg.contains("globex"),
        "{msg}"
    );
    let names_both = |log: &str| {
        log.lines().any(|l| {
            l.contains("refused an admin call") && l.contains(&admin_id) && l.contains("globex")
        })
    };
    let log = ca.wait_log(names_both);
    assert!(
        count_audit_lines(&log, "refused") > refused_before,
        "no audit line for the refusal"
    );
    assert!(
        names_both(&log),
        "the audit line names neither the caller nor the tenant:\n{log}"
    );

    step(4, "the same call inside acme succeeds");
    let acme = format!("spiffe://{TD}/tenant/acme/ns/prod/sa/api");
    let out = remote(&ca, &agent, ACME_ADMIN_UID, &entry_args(&acme, &parent));
    assert!(out.status.success(), "{}", text(&out));
    let created = |log: &str| {
        log.lines()
            .any(|l| l.contains("entry_created") && l.contains(&admin_id))
    };
    assert!(created(&ca.wait_log(created)));

    step(5, "join tokens: for globex refused, for acme issued");
    let out = remote(
        &ca,
        &agent,
        ACME_ADMIN_UID,
        &["token", "create", "--tenant", "globex"],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("create_join_token"), "{}", text(&out));
    let out = remote(
        &ca,
        &agent,
        ACME_ADMIN_UID,
        &["token", "create", "--tenant", "acme"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Token:"));

    step(
        6,
        "the admin sees only acme's entries; it may not push policies or evict agents",
    );
    let out = remote(
        &ca,
        &agent,
        ACME_ADMIN_UID,
        &["entry", "list", "--output", "json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains(&acme) && !listed.contains("globex"),
        "{listed}"
    );
    let out = remote(&ca, &agent, ACME_ADMIN_UID, &["policy", "push", policies]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("local admin socket only"),
        "{}",
        text(&out)
    );

    step(
        7,
        "a workload whose entry is not marked admin is refused outright",
    );
    let out = remote(&ca, &agent, ACME_TOOL_UID, &entry_args(&acme, &parent));
    assert!(!out.status.success());
    assert!(text(&out).contains("is not an admin"), "{}", text(&out));

    step(
        8,
        "the operator on the local socket still manages every tenant",
    );
    let out = ca.cli(&entry_args(&globex, &parent));
    assert!(out.status.success(), "{}", text(&out));
    // To acme's admin that entry does not exist: changing it is answered
    // as reading it is, without its SPIFFE ID or tenant.
    let globex_id = ca
        .cli_json(&["entry", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["spiffe_id"] == globex.as_str())
        .expect("the operator's globex entry is listed")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for args in [
        vec!["entry", "delete", &globex_id],
        vec!["entry", "show", &globex_id],
        vec![
            "entry",
            "update",
            &globex_id,
            "--spiffe-id",
            &acme,
            "--parent-id",
            &parent,
            "--selector",
            "unix:uid:2000",
        ],
    ] {
        let out = remote(&ca, &agent, ACME_ADMIN_UID, &args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("NotFound") && !text(&out).contains("globex"),
            "{args:?}: {}",
            text(&out)
        );
    }

    step(
        9,
        "federation is the operator's: acme's admin may keep or drop an entry's federation, not add one",
    );
    let files = tempfile::tempdir().unwrap();
    let pem = files.path().join("partner.pem");
    std::fs::write(&pem, ca.cli(&["bundle", "show"]).stdout).unwrap();
    let out = ca.cli(&[
        "bundle",
        "set",
        "--trust-domain",
        "partner.test",
        "--file",
        pem.to_str().unwrap(),
        "--format",
        "pem",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // `ward entry VERB [ID] …` with `flag` given once per value.
    let entry_with = |verb: &str,
                      id: Option<&str>,
                      spiffe_id: &str,
                      selector: &str,
                      flag: &str,
                      values: &[&str]| {
        let mut args = vec!["entry", verb];
        args.extend(id);
        args.extend([
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            &parent,
            "--selector",
            selector,
        ]);
        for v in values {
            args.extend([flag, *v]);
        }
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let federating_as =
        |verb: &str, id: Option<&str>, spiffe_id: &str, selector: &str, tds: &[&str]| {
            entry_with(verb, id, spiffe_id, selector, "--federates-with", tds)
        };
    let federating = |verb: &str, id: Option<&str>, spiffe_id: &str, tds: &[&str]| {
        federating_as(verb, id, spiffe_id, "unix:uid:2001", tds)
    };
    let as_admin = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        remote(&ca, &agent, ACME_ADMIN_UID, &args)
    };
    let refused = |out: Output, action: &str| {
        assert!(!out.status.success(), "accepted");
        let msg = text(&out);
        assert!(
            msg.contains("PermissionDenied") && msg.contains(action),
            "{msg}"
        );
    };
    let web = format!("spiffe://{TD}/tenant/acme/ns/prod/sa/web");
    refused(
        as_admin(federating("create", None, &web, &["partner.test"])),
        "create_entry",
    );
    let api_entry = ca
        .cli_json(&["entry", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["spiffe_id"] == acme.as_str())
        .expect("acme's api entry")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = Some(api_entry.as_str());
    refused(
        as_admin(federating("update", id, &acme, &["partner.test"])),
        "update_entry",
    );
    // The operator federates it; the tenant's admin may then change the
    // entry while keeping that federation (not give it to another SPIFFE ID),
    // and may drop it, but not put it back.
    let out = ca.cli(
        &federating("update", id, &acme, &["partner.test"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = as_admin(federating_as(
        "update",
        id,
        &acme,
        "unix:uid:2002",
        &["partner.test"],
    ));
    assert!(out.status.success(), "{}", text(&out));
    let stored = ca.cli_json(&["entry", "show", &api_entry]);
    assert_eq!(
        stored["selectors"],
        serde_json::json!(["unix:uid:2002"]),
        "{stored}"
    );
    let renamed = format!("spiffe://{TD}/tenant/acme/ns/prod/sa/other");
    refused(
        as_admin(federating("update", id, &renamed, &["partner.test"])),
        "update_entry",
    );
    let out = as_admin(federating("update", id, &acme, &[]));
    assert!(out.status.success(), "{}", text(&out));
    refused(
        as_admin(federating("update", id, &acme, &["partner.test"])),
        "update_entry",
    );
    let stored = ca.cli_json(&["entry", "show", &api_entry]);
    assert_eq!(stored["federates_with"], serde_json::json!([]), "{stored}");

    step(
        10,
        "DNS names are the operator's too: acme's admin may keep or drop an entry's, not add one",
    );
    let naming = |verb: &str, id: Option<&str>, spiffe_id: &str, selector: &str, names: &[&str]| {
        entry_with(verb, id, spiffe_id, selector, "--dns-name", names)
    };
    let out = as_admin(naming(
        "create",
        None,
        &web,
        "unix:uid:2003",
        &["pay.globex.test"],
    ));
    assert!(
        text(&out).contains("adding DNS names pay.globex.test"),
        "{}",
        text(&out)
    );
    refused(out, "create_entry");
    let out = ca.cli(
        &naming("update", id, &acme, "unix:uid:2002", &["api.acme.test"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = as_admin(naming(
        "update",
        id,
        &acme,
        "unix:uid:2004",
        &["api.acme.test"],
    ));
    assert!(out.status.success(), "{}", text(&out));
    refused(
        as_admin(naming(
            "update",
            id,
            &acme,
            "unix:uid:2004",
            &["api.acme.test", "pay.globex.test"],
        )),
        "update_entry",
    );
    refused(
        as_admin(naming(
            "update",
            id,
            &renamed,
            "unix:uid:2004",
            &["api.acme.test"],
        )),
        "update_entry",
    );
    let out = as_admin(naming("update", id, &acme, "unix:uid:2004", &[]));
    assert!(out.status.success(), "{}", text(&out));
    refused(
        as_admin(naming(
            "update",
            id,
            &acme,
            "unix:uid:2004",
            &["api.acme.test"],
        )),
        "update_entry",
    );
    let stored = ca.cli_json(&["entry", "show", &api_entry]);
    assert_eq!(stored["dns_names"], serde_json::json!([]), "{stored}");
    assert_eq!(
        stored["selectors"],
        serde_json::json!(["unix:uid:2004"]),
        "{stored}"
    );

    step(
        11,
        "policies see an entry's parent and admin mark: a set that keeps tenant admins from making admins",
    );
    let stricter = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(policies).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "cedar") {
            std::fs::copy(&f, stricter.path().join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(
        stricter.path().join("no-tenant-made-admins.cedar"),
        format!(
            r#"@id("no-tenant-made-admins")
forbid (principal is Ward::Admin, action, resource is Ward::Entry)
when {{ context.admin_added || resource.parent_id != "{parent}" }};
"#
        ),
    )
    .unwrap();
    let out = ca.cli(&["policy", "push", stricter.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let deputy = format!("spiffe://{TD}/tenant/acme/ns/ops/sa/deputy");
    let mut made_admin = entry_args(&deputy, &parent);
    made_admin.push("--admin");
    refused(
        remote(&ca, &agent, ACME_ADMIN_UID, &made_admin),
        "create_entry",
    );
    let elsewhere = format!("spiffe://{TD}/ward/agent/elsewhere");
    refused(
        remote(
            &ca,
            &agent,
            ACME_ADMIN_UID,
            &entry_args(&deputy, &elsewhere),
        ),
        "create_entry",
    );
    let out = remote(&ca, &agent, ACME_ADMIN_UID, &entry_args(&deputy, &parent));
    assert!(out.status.success(), "{}", text(&out));
    let listed = ca.cli_json(&["entry", "list", "--spiffe-id", &deputy]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["admin"], serde_json::json!(false), "{listed}");
}
