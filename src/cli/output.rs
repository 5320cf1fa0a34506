//! Human and JSON output for client commands.

use clap::ValueEnum;
use serde_json::{json, Value};
use ward_spec::proto::types::v1 as types;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Human,
    Json,
}

pub fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON value serializes")
    );
}

pub fn time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

pub fn entry_json(e: &types::Entry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_ttl": e.x509_ttl,
        "jwt_ttl": e.jwt_ttl,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "admin": e.admin,
        "revision": e.revision,
        "created_at": e.created_at,
        "federates_with": e.federates_with,
    })
}

pub fn entry_human(e: &types::Entry) -> String {
    let mut s = format!(
        "Entry ID:   {}\nSPIFFE ID:  {}\nParent ID:  {}\nRevision:   {}\nCreated:    {}\n",
        e.id,
        e.spiffe_id,
        e.parent_id,
        e.revision,
        time(e.created_at)
    );
    for sel in &e.selectors {
        s.push_str(&format!("Selector:   {}:{}\n", sel.r#type, sel.value));
    }
    for d in &e.dns_names {
        s.push_str(&format!("DNS name:   {d}\n"));
    }
    for t in &e.federates_with {
        s.push_str(&format!("Federates:  {t}\n"));
    }
    if e.x509_ttl > 0 {
        s.push_str(&format!("X509 TTL:   {}s\n", e.x509_ttl));
    }
    if e.jwt_ttl > 0 {
        s.push_str(&format!("JWT TTL:    {}s\n", e.jwt_ttl));
    }
    if !e.hint.is_empty() {
        s.push_str(&format!("Hint:       {}\n", e.hint));
    }
    if e.admin {
        s.push_str("Admin:      true\n");
    }
    s
}
