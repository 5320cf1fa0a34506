//! The datastore's behaviour, checked on every backend: SQLite always, and
//! PostgreSQL when `WARD_TEST_POSTGRES_URL` names a server (each test gets a
//! database of its own there). `.ci/run` starts one and sets
//! `WARD_REQUIRE_POSTGRES=1`, which turns a missing server into a failure.

use super::sql::{FEDERATES_WITH_MIGRATION, MIGRATIONS};
use super::*;

/// A fresh store of each backend this machine has.
async fn stores() -> Vec<(&'static str, Box<dyn Datastore>)> {
    let mut v: Vec<(&'static str, Box<dyn Datastore>)> =
        vec![("sqlite", Box::new(SqliteStore::in_memory().await.unwrap()))];
    match std::env::var("WARD_TEST_POSTGRES_URL") {
        Ok(url) => v.push(("postgres", Box::new(fresh_postgres(&url).await))),
        Err(_) if std::env::var_os("WARD_REQUIRE_POSTGRES").is_some() => {
            panic!("WARD_REQUIRE_POSTGRES is set but WARD_TEST_POSTGRES_URL is not")
        }
        Err(_) => println!("PostgreSQL not tested here: WARD_TEST_POSTGRES_URL is not set"),
    }
    v
}

/// A new, empty database on the server at `url`, migrated.
pub async fn fresh_postgres(url: &str) -> PgStore {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {}: {e}", redacted(url)));
    let name = format!("ward_test_{}", crate::x509::hex_id(8));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let (base, _) = url
        .rsplit_once('/')
        .expect("a postgres URL names a database");
    PgStore::connect(&format!("{base}/{name}")).await.unwrap()
}

/// The PostgreSQL server tests may use, if any (a missing one fails the
/// test when `WARD_REQUIRE_POSTGRES` is set).
fn postgres_url() -> Option<String> {
    let url = std::env::var("WARD_TEST_POSTGRES_URL").ok();
    if url.is_none() {
        assert!(
            std::env::var_os("WARD_REQUIRE_POSTGRES").is_none(),
            "WARD_REQUIRE_POSTGRES is set but WARD_TEST_POSTGRES_URL is not"
        );
        println!("PostgreSQL not tested here: WARD_TEST_POSTGRES_URL is not set");
    }
    url
}

/// An agent attested with a join token, serial `a1`.
fn agent_n1() -> AgentRecord {
    AgentRecord {
        spiffe_id: id("spiffe://td/ward/agent/join_token/n1"),
        attestation_type: "join_token".into(),
        serial: "a1".into(),
        new_serial: String::new(),
        expires_at: 100,
        evicted: false,
        attested_at: 1,
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A federated bundle with no keys, for `td`.
fn empty_bundle(td: &str) -> FederatedBundleRecord {
    FederatedBundleRecord {
        trust_domain: td.into(),
        jwks: b"{\"keys\":[]}".to_vec(),
        endpoint_url: String::new(),
        endpoint_spiffe_id: String::new(),
    }
}

/// Entry `n` (SPIFFE ID `spiffe://td/N`, selector `unix:uid:1`) under `parent`.
pub(super) fn entry(n: &str, parent: &str) -> Entry {
    Entry {
        selectors: vec![Selector::parse("unix:uid:1").unwrap()],
        dns_names: vec!["a.example".into()],
        ..Entry::bare(n.into(), id(&format!("spiffe://td/{n}")), id(parent))
    }
}

#[tokio::test]
async fn sync_reports_creates_moves_and_deletes_per_parent_incrementally() {
    for (backend, s) in stores().await {
        println!("backend: {backend}");
        sync_reports_creates_moves_and_deletes_per_parent_incrementally_on(s.as_ref()).await;
    }
}

async fn sync_reports_creates_moves_and_deletes_per_parent_incrementally_on(s: &dyn Datastore) {
    let a = id("spiffe://td/ward/agent/x/a");
    let b = id("spiffe://td/ward/agent/x/b");
    s.create_entry(entry("e1", "spiffe://td/ward/agent/x/a"), 1)
        .await
        .unwrap();
    s.create_entry(entry("e2", "spiffe://td/ward/agent/x/a"), 1)
        .await
        .unwrap();
    s.create_entry(entry("e3", "spiffe://td/ward/agent/x/b"), 1)
        .await
        .unwrap();
    let p = s.sync_entries(&a, 0, 100).await.unwrap();
    assert_eq!(
        p.entries.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e1", "e2"]
    );
    assert_eq!(p.revision, 3);
    assert!(!p.more);
    // Nothing new since.
    let again = s.sync_entries(&a, p.revision, 100).await.unwrap();
    assert!(again.entries.is_empty() && again.deleted.is_empty());
    // Move e2 to b, delete e1: a learns both as deletions, b sees e2.
    let mut e2 = s.get_entry("e2").await.unwrap().unwrap();
    e2.parent_id = b.clone();
    s.update_entry(e2).await.unwrap();
    s.delete_entry("e1", 0).await.unwrap();
    let pa = s.sync_entries(&a, p.revision, 100).await.unwrap();
    assert!(pa.entries.is_empty());
    let mut deleted = pa.deleted.clone();
    deleted.sort();
    assert_eq!(deleted, ["e1", "e2"]);
    let pb = s.sync_entries(&b, 3, 100).await.unwrap();
    assert_eq!(
        pb.entries.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e2"]
    );
}

#[tokio::test]
async fn pruning_keeps_live_entries_forgets_old_deletions_and_tells_callers_behind_to_restart() {
    for (backend, s) in stores().await {
        println!("backend: {backend}");
        pruning_keeps_live_entries_forgets_old_deletions_and_tells_callers_behind_to_restart_on(
            s.as_ref(),
        )
        .await;
    }
}

async fn pruning_keeps_live_entries_forgets_old_deletions_and_tells_callers_behind_to_restart_on(
    s: &dyn Datastore,
) {
    let a = id("spiffe://td/ward/agent/x/a");
    let b = id("spiffe://td/ward/agent/x/b");
    for n in ["e1", "e2"] {
        s.create_entry(entry(n, "spiffe://td/ward/agent/x/a"), 1)
            .await
            .unwrap();
    }
    s.create_entry(entry("e3", "spiffe://td/ward/agent/x/b"), 1)
        .await
        .unwrap();
    let first = s.sync_entries(&a, 0, 100).await.unwrap();
    // Each write keeps only an entry's newest change: nothing is superseded.
    for ttl in 1..=5 {
        let mut e2 = s.get_entry("e2").await.unwrap().unwrap();
        e2.x509_ttl = ttl;
        s.update_entry(e2).await.unwrap();
    }
    let none = s.prune_entry_changes(0).await.unwrap();
    assert_eq!(none, PrunedChanges::default(), "nothing is that old");
    let deleted = s.delete_entry("e1", 0).await.unwrap().revision;

    // Before pruning, a caller behind the deletion hears of it.
    let behind = s.sync_entries(&a, first.revision, 100).await.unwrap();
    assert_eq!(behind.deleted, ["e1"]);
    assert!(!behind.restart);

    let now = unix_now() + 10;
    let pruned = s.prune_entry_changes(now).await.unwrap();
    assert_eq!(
        pruned,
        PrunedChanges {
            superseded: 0,
            deletions: 1,
            floor: deleted
        }
    );
    // Now it is told to restart instead; from 0 it gets exactly what exists.
    let behind = s.sync_entries(&a, first.revision, 100).await.unwrap();
    assert!(
        behind.restart,
        "a caller behind a pruned deletion must restart"
    );
    let full = s.sync_entries(&a, 0, 100).await.unwrap();
    assert!(!full.restart);
    assert_eq!(
        full.entries
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        ["e2"]
    );
    assert_eq!(full.entries[0].x509_ttl, 5);
    assert!(full.deleted.is_empty());
    // A caller at or past the pruned deletion carries on incrementally; one
    // inside its revision (a page ended there) may have missed it.
    let current = s.sync_entries(&a, deleted, 100).await.unwrap();
    assert!(!current.restart && current.entries.is_empty() && current.deleted.is_empty());
    let inside = s.sync_entries_after(&a, deleted, "e0", 100).await.unwrap();
    assert!(inside.restart);
    // A caller ahead of the database (restored from a backup, or failed
    // over to a standby that had not all the changes) holds what may be
    // gone, and revisions that will be given again to other changes.
    let ahead = s.sync_entries(&a, current.revision + 5, 100).await.unwrap();
    assert!(ahead.restart);
    assert_eq!(ahead.revision, current.revision);
    // The other parent's entry was never a deletion and stays.
    let pb = s.sync_entries(&b, 0, 100).await.unwrap();
    assert_eq!(
        pb.entries.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e3"]
    );
    // Pruning again finds nothing and keeps the floor.
    let again = s.prune_entry_changes(now).await.unwrap();
    assert_eq!((again.deletions, again.floor), (0, deleted));
}

#[tokio::test]
async fn sync_pages_keep_every_entry_of_a_revision_many_share() {
    for (backend, s) in stores().await {
        println!("backend: {backend}");
        sync_pages_keep_every_entry_of_a_revision_many_share_on(s.as_ref()).await;
    }
}

async fn sync_pages_keep_every_entry_of_a_revision_many_share_on(s: &dyn Datastore) {
    const A: &str = "spiffe://td/ward/agent/x/a";
    let a = id(A);
    s.set_federated_bundle(&empty_bundle("p.test"), 1)
        .await
        .unwrap();
    for i in 0..4 {
        s.create_entry(entry(&format!("alone{i}"), A), 1)
            .await
            .unwrap();
    }
    for i in 0..15 {
        let mut e = entry(&format!("shared{i:02}"), A);
        e.federates_with = vec![TrustDomain::new("p.test").unwrap()];
        s.create_entry(e, 1).await.unwrap();
    }
    let before = s.entry_revision().await.unwrap();
    s.create_entry(entry("after0", A), 1).await.unwrap();
    // One revision changes all 15 (and a later one more): pages of 10 end
    // inside it, and the next goes on from there.
    s.delete_federated_bundle("p.test", BundleDeleteMode::Dissociate)
        .await
        .unwrap();
    s.create_entry(entry("after1", A), 1).await.unwrap();
    for (since, expect) in [(0, 21), (before, 17)] {
        let (mut seen, _) = sync_in_pages(s, &a, since, 10).await;
        let pages = seen.len();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), expect, "{seen:?}");
        assert_eq!(pages, expect, "an entry came twice");
    }
}

/// Syncs `parent` from `since` in pages of `limit`, as an agent does: the
/// entry IDs reported, and the revision reached.
async fn sync_in_pages(
    s: &dyn Datastore,
    parent: &SpiffeId,
    mut since: u64,
    limit: u32,
) -> (Vec<String>, u64) {
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let p = s
            .sync_entries_after(parent, since, &after, limit)
            .await
            .unwrap();
        assert!(p.entries.len() + p.deleted.len() <= limit as usize);
        seen.extend(p.entries.into_iter().map(|e| e.id));
        (since, after) = (p.revision, p.after);
        if !p.more {
            return (seen, since);
        }
    }
}

#[tokio::test]
async fn sync_pages_by_revision_without_losing_entries() {
    for (backend, s) in stores().await {
        println!("backend: {backend}");
        sync_pages_by_revision_without_losing_entries_on(s.as_ref()).await;
    }
}

async fn sync_pages_by_revision_without_losing_entries_on(s: &dyn Datastore) {
    let a = id("spiffe://td/ward/agent/x/a");
    for i in 0..25 {
        s.create_entry(entry(&format!("e{i:02}"), "spiffe://td/ward/agent/x/a"), 1)
            .await
            .unwrap();
    }
    let (seen, since) = sync_in_pages(s, &a, 0, 10).await;
    assert_eq!(seen.len(), 25);
    assert_eq!(since, 25);
}

#[tokio::test]
async fn join_token_is_spent_once_and_not_after_expiry() {
    for (backend, s) in stores().await {
        println!("backend: {backend}");
        join_token_is_spent_once_and_not_after_expiry_on(s.as_ref()).await;
    }
}

async fn join_token_is_spent_once_and_not_after_expiry_on(s: &dyn Datastore) {
    let agent = agent_n1();
    for (hash, exp) in [("h1", 100), ("h2", 10)] {
        s.create_join_token(&JoinTokenRecord {
            token_hash: hash.into(),
            agent_id: agent.spiffe_id.clone(),
            expires_at: exp,
            created_at: 0,
        })
        .await
        .unwrap();
    }
    let accepted = TokenUse::Accepted(agent.spiffe_id.clone());
    // Looking spends nothing.
    assert_eq!(s.join_token_state("h1", 50).await.unwrap(), accepted);
    assert_eq!(s.join_token_state("h1", 50).await.unwrap(), accepted);
    assert_eq!(s.get_agent(&agent.spiffe_id).await.unwrap(), None);
    // Not for another agent than the one it names.
    let other = AgentRecord {
        spiffe_id: id("spiffe://td/ward/agent/join_token/n2"),
        ..agent.clone()
    };
    assert_ne!(
        s.redeem_join_token("h1", 50, &other).await.unwrap(),
        accepted
    );
    assert_eq!(s.get_agent(&other.spiffe_id).await.unwrap(), None);
    // Spent with its agent saved.
    assert_eq!(
        s.redeem_join_token("h1", 50, &agent).await.unwrap(),
        accepted
    );
    assert_eq!(
        s.get_agent(&agent.spiffe_id).await.unwrap(),
        Some(agent.clone())
    );
    assert_eq!(
        s.redeem_join_token("h1", 51, &agent).await.unwrap(),
        TokenUse::AlreadyUsed
    );
    assert_eq!(
        s.join_token_state("h1", 51).await.unwrap(),
        TokenUse::AlreadyUsed
    );
    assert_eq!(
        s.join_token_state("h2", 50).await.unwrap(),
        TokenUse::Expired
    );
    assert_eq!(
        s.redeem_join_token("h2", 50, &agent).await.unwrap(),
        TokenUse::Expired
    );
    assert_eq!(
        s.join_token_state("nope", 50).await.unwrap(),
        TokenUse::Unknown
    );
    // Revoked before use: unknown from then on; a used one is kept.
    s.create_join_token(&JoinTokenRecord {
        token_hash: "h3".into(),
        agent_id: other.spiffe_id.clone(),
        expires_at: 100,
        created_at: 0,
    })
    .await
    .unwrap();
    assert_eq!(s.revoke_join_tokens(&other.spiffe_id, 50).await.unwrap(), 1);
    assert_eq!(
        s.join_token_state("h3", 50).await.unwrap(),
        TokenUse::Unknown
    );
    // (h2, expired unused, goes but does not count; h1, used, stays.)
    assert_eq!(s.revoke_join_tokens(&agent.spiffe_id, 50).await.unwrap(), 0);
    assert_eq!(
        s.join_token_state("h2", 50).await.unwrap(),
        TokenUse::Unknown
    );
    assert_eq!(
        s.join_token_state("h1", 50).await.unwrap(),
        TokenUse::AlreadyUsed
    );
}

/// A database that fails to save the agent leaves its join token as it
/// was: the agent can attest with it again.
#[tokio::test]
async fn a_join_token_is_not_spent_when_its_agent_is_not_saved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let s = SqliteStore::open(&path).await.unwrap();
    let agent = agent_n1();
    s.create_join_token(&JoinTokenRecord {
        token_hash: "h".into(),
        agent_id: agent.spiffe_id.clone(),
        expires_at: 100,
        created_at: 0,
    })
    .await
    .unwrap();
    let mut admin = {
        use sqlx::ConnectOptions;
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .connect()
            .await
            .unwrap()
    };
    sqlx::query(
        "CREATE TRIGGER refuse BEFORE INSERT ON agents BEGIN SELECT RAISE(ABORT, 'refused'); END",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    assert!(s.redeem_join_token("h", 50, &agent).await.is_err());
    sqlx::query("DROP TRIGGER refuse")
        .execute(&mut admin)
        .await
        .unwrap();
    let accepted = TokenUse::Accepted(agent.spiffe_id.clone());
    assert_eq!(s.join_token_state("h", 51).await.unwrap(), accepted);
    assert_eq!(
        s.redeem_join_token("h", 51, &agent).await.unwrap(),
        accepted
    );
}

#[tokio::test]
async fn policy_sets_get_increasing_versions_and_the_newest_is_active() {
    for (backend, s) in stores().await {
        println!("backend: {backend}");
        policy_sets_on(s.as_ref()).await;
    }
}

/// A first policy set: one file, `a.cedar`, holding one policy.
fn first_policy_set() -> PolicySetRecord {
    PolicySetRecord {
        version: 0,
        files: vec![("a.cedar".into(), "// one".into())],
        digest: "d1".into(),
        comment: "first".into(),
        created_at: 10,
        policies: 1,
    }
}

async fn policy_sets_on(s: &dyn Datastore) {
    assert_eq!(s.get_policy_set(None).await.unwrap(), None);
    let mut set = first_policy_set();
    assert_eq!(s.add_policy_set(&set).await.unwrap(), 1);
    set.files.push(("b.cedar".into(), "// two".into()));
    set.comment = "second".into();
    assert_eq!(s.add_policy_set(&set).await.unwrap(), 2);
    let active = s.get_policy_set(None).await.unwrap().unwrap();
    assert_eq!((active.version, active.files.len()), (2, 2));
    assert_eq!(active.comment, "second");
    let first = s.get_policy_set(Some(1)).await.unwrap().unwrap();
    assert_eq!(
        first.files,
        vec![("a.cedar".to_string(), "// one".to_string())]
    );
    assert_eq!(s.get_policy_set(Some(3)).await.unwrap(), None);
    let versions = |v: Vec<PolicySetRecord>| v.iter().map(|p| p.version).collect::<Vec<_>>();
    assert_eq!(
        versions(s.list_policy_sets(None, 10).await.unwrap()),
        [2, 1]
    );
    // In pages: the newest first, then those older than the page's last.
    assert_eq!(versions(s.list_policy_sets(None, 1).await.unwrap()), [2]);
    assert_eq!(versions(s.list_policy_sets(Some(2), 1).await.unwrap()), [1]);
    assert!(s.list_policy_sets(Some(1), 1).await.unwrap().is_empty());
}

#[tokio::test]
async fn federated_bundles_are_set_replaced_listed_and_deleted() {
    for (name, s) in stores().await {
        println!("backend: {name}");
        federated_bundles_on(s.as_ref()).await;
    }
}

async fn federated_bundles_on(s: &dyn Datastore) {
    let record = |td: &str, jwks: &str, url: &str| FederatedBundleRecord {
        trust_domain: td.into(),
        jwks: jwks.as_bytes().to_vec(),
        endpoint_url: url.into(),
        endpoint_spiffe_id: if url.is_empty() {
            String::new()
        } else {
            format!("spiffe://{td}/ward/ca")
        },
    };
    assert!(s.list_federated_bundles().await.unwrap().is_empty());
    s.set_federated_bundle(&record("b.test", "{\"keys\":[]}", ""), 1)
        .await
        .unwrap();
    s.set_federated_bundle(&record("a.test", "{\"keys\":[1]}", "https://a:8443"), 1)
        .await
        .unwrap();
    // Replacing keeps one row per trust domain, with the new endpoint.
    s.set_federated_bundle(&record("b.test", "{\"keys\":[2]}", "https://b"), 2)
        .await
        .unwrap();
    assert_eq!(
        s.list_federated_bundles().await.unwrap(),
        vec![
            record("a.test", "{\"keys\":[1]}", "https://a:8443"),
            record("b.test", "{\"keys\":[2]}", "https://b"),
        ]
    );
    assert!(restrict(s, "a.test").await.unwrap());
    assert!(!restrict(s, "a.test").await.unwrap());
    assert_eq!(s.list_federated_bundles().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_refreshed_bundle_replaces_only_the_record_it_was_fetched_for() {
    for (name, s) in stores().await {
        println!("backend: {name}");
        let s = s.as_ref();
        let record = |jwks: &str, url: &str| FederatedBundleRecord {
            trust_domain: "b.test".into(),
            jwks: jwks.as_bytes().to_vec(),
            endpoint_url: url.into(),
            endpoint_spiffe_id: "spiffe://b.test/ward/ca".into(),
        };
        let read = record("{\"keys\":[1]}", "https://b");
        s.set_federated_bundle(&read, 1).await.unwrap();
        assert!(s
            .refresh_federated_bundle(&read, b"{\"keys\":[2]}", 2)
            .await
            .unwrap());
        let refreshed = record("{\"keys\":[2]}", "https://b");
        assert_eq!(
            s.list_federated_bundles().await.unwrap(),
            std::slice::from_ref(&refreshed)
        );
        // Read before that refresh: refused, the stored record stays.
        assert!(!s
            .refresh_federated_bundle(&read, b"{\"keys\":[3]}", 3)
            .await
            .unwrap());
        // The operator points the federation elsewhere meanwhile: refused.
        let moved = record("{\"keys\":[2]}", "https://b2");
        s.set_federated_bundle(&moved, 4).await.unwrap();
        assert!(!s
            .refresh_federated_bundle(&refreshed, b"{\"keys\":[3]}", 5)
            .await
            .unwrap());
        assert_eq!(
            s.list_federated_bundles().await.unwrap(),
            std::slice::from_ref(&moved)
        );
        // Deleted meanwhile: not brought back.
        s.delete_federated_bundle("b.test", BundleDeleteMode::Restrict)
            .await
            .unwrap();
        assert!(!s
            .refresh_federated_bundle(&moved, b"{\"keys\":[3]}", 6)
            .await
            .unwrap());
        assert!(s.list_federated_bundles().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_federated_bundle_entries_federate_with_is_kept_until_they_stop() {
    for (name, s) in stores().await {
        println!("backend: {name}");
        let s = s.as_ref();
        let td = |t: &str| TrustDomain::new(t).unwrap();
        for t in ["a_b.test", "axb.test", "c.test"] {
            s.set_federated_bundle(&empty_bundle(t), 1).await.unwrap();
        }
        // Only a trust domain there is a bundle for.
        let mut e = entry("fed", "spiffe://td/node");
        e.federates_with = vec![td("axb.test"), td("nowhere.test")];
        let err = s.create_entry(e.clone(), 5).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::InUse(m) if m.contains("nowhere.test")),
            "{err}"
        );
        e.federates_with = vec![td("axb.test"), td("c.test")];
        let e = s.create_entry(e, 5).await.unwrap();
        // The list round-trips.
        let got = s.get_entry("fed").await.unwrap().unwrap();
        assert_eq!(got.federates_with, vec![td("axb.test"), td("c.test")]);
        // A name the entry does not list is free to go, even one that
        // matches a listed one as a LIKE pattern (`_`).
        assert!(restrict(s, "a_b.test").await.unwrap());
        let err = restrict(s, "c.test").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::InUse(m) if m.contains("1 entry federate with c.test (fed)")),
            "{err}"
        );
        assert_eq!(s.list_federated_bundles().await.unwrap().len(), 2);
        let mut e = s.get_entry(&e.id).await.unwrap().unwrap();
        e.federates_with = vec![td("axb.test")];
        s.update_entry(e).await.unwrap();
        assert!(restrict(s, "c.test").await.unwrap());
    }
}

#[tokio::test]
async fn an_update_applies_only_to_the_revision_it_was_made_from() {
    for (name, s) in stores().await {
        println!("backend: {name}");
        let s = s.as_ref();
        let e = s
            .create_entry(entry("e", "spiffe://td/node"), 1)
            .await
            .unwrap();
        let read = e.clone();
        let mut first = e.clone();
        first.x509_ttl = 60;
        s.update_entry(first).await.unwrap();
        // Made from what was read before the first update: refused, and the
        // first update stays.
        let mut second = read;
        second.x509_ttl = 90;
        let err = s.update_entry(second).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Stale(m) if m.contains("entry e changed")),
            "{err}"
        );
        assert_eq!(s.get_entry("e").await.unwrap().unwrap().x509_ttl, 60);
    }
}

/// An entry with another's SPIFFE ID, parent and selectors is refused,
/// created or updated into one, as SPIRE refuses it; one that differs in any
/// of them (or only in its TTLs, which are not compared, on its own entry)
/// is not.
#[tokio::test]
async fn an_entry_repeating_anothers_id_parent_and_selectors_is_refused() {
    for (name, s) in stores().await {
        println!("backend: {name}");
        let s = s.as_ref();
        let first = s
            .create_entry(entry("e", "spiffe://td/node"), 1)
            .await
            .unwrap();
        let mut copy = entry("e", "spiffe://td/node");
        copy.id = "copy".into();
        copy.x509_ttl = 60;
        let err = s.create_entry(copy.clone(), 2).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Conflict(m) if m.contains("entry e already has SPIFFE ID spiffe://td/e")),
            "{err}"
        );
        assert!(s.get_entry("copy").await.unwrap().is_none());
        // Another parent, then another selector: both are other entries.
        copy.parent_id = id("spiffe://td/other-node");
        let moved = s.create_entry(copy, 2).await.unwrap();
        let mut other = entry("e", "spiffe://td/node");
        other.id = "other".into();
        other.selectors.push(Selector::parse("unix:gid:1").unwrap());
        s.create_entry(other, 3).await.unwrap();
        // Moved onto the first one's parent: the same copy, refused.
        let mut onto = moved.clone();
        onto.parent_id = first.parent_id.clone();
        let err = s.update_entry(onto).await.unwrap_err();
        assert!(matches!(&err, StoreError::Conflict(_)), "{err}");
        assert_eq!(
            s.get_entry("copy").await.unwrap().unwrap().parent_id,
            moved.parent_id
        );
        // An entry updated in place is no copy of itself.
        let mut longer = first;
        longer.x509_ttl = 120;
        s.update_entry(longer).await.unwrap();
    }
}

#[tokio::test]
async fn a_delete_applies_only_to_the_revision_it_was_made_from() {
    for (name, s) in stores().await {
        println!("backend: {name}");
        let s = s.as_ref();
        let read = s
            .create_entry(entry("e", "spiffe://td/node"), 1)
            .await
            .unwrap();
        let mut moved = read.clone();
        moved.parent_id = id("spiffe://td/other");
        let moved = s.update_entry(moved).await.unwrap();
        // Made from what was read before the update: refused, the entry stays.
        let err = s.delete_entry("e", read.revision).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Stale(m) if m.contains("entry e changed")),
            "{err}"
        );
        assert!(s.get_entry("e").await.unwrap().is_some());
        let gone = s.delete_entry("e", moved.revision).await.unwrap();
        assert!(gone.revision > moved.revision);
        assert!(s.get_entry("e").await.unwrap().is_none());
        let err = s.delete_entry("e", 0).await.unwrap_err();
        assert!(matches!(&err, StoreError::NotFound(_)), "{err}");
    }
}

/// PostgreSQL: an entry update holds the revision counter, uncommitted,
/// while a bundle delete dissociates the entry; the delete must act on the
/// entry as the update leaves it, not as it was before.
#[tokio::test]
async fn dissociating_a_bundle_acts_on_the_entry_a_concurrent_update_leaves() {
    let Some(url) = postgres_url() else {
        return;
    };
    let s = std::sync::Arc::new(fresh_postgres(&url).await);
    let td = |t: &str| TrustDomain::new(t).unwrap();
    for t in ["p.test", "q.test"] {
        s.set_federated_bundle(&empty_bundle(t), 1).await.unwrap();
    }
    let mut e = entry("e", "spiffe://td/node-a");
    e.federates_with = vec![td("p.test"), td("q.test")];
    s.create_entry(e, 1).await.unwrap();
    // What `update_entry` does, held open: the counter, then the row (moved
    // to another parent, now listing p only).
    let mut update = s.pool().begin().await.unwrap();
    let rev: i64 = sqlx::query_scalar(
        "UPDATE counters SET value = value + 1 WHERE name = 'entry_revision' RETURNING value",
    )
    .fetch_one(&mut *update)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE entries SET parent_id = 'spiffe://td/node-b', federates_with = '[\"p.test\"]', revision = $1 WHERE id = 'e'",
    )
    .bind(rev)
    .execute(&mut *update)
    .await
    .unwrap();
    let deleting = {
        let s = s.clone();
        tokio::spawn(async move {
            s.delete_federated_bundle("q.test", BundleDeleteMode::Dissociate)
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    update.commit().await.unwrap();
    let done = deleting.await.unwrap().unwrap();
    // The entry no longer lists q: the delete leaves it alone.
    assert!(done.entries.is_empty(), "{:?}", done.entries);
    let stored = s.get_entry("e").await.unwrap().unwrap();
    assert_eq!(stored.federates_with, vec![td("p.test")]);
    assert_eq!(stored.parent_id.to_string(), "spiffe://td/node-b");
}

/// Deletes a bundle in restrict mode: whether there was one.
async fn restrict(s: &dyn Datastore, td: &str) -> Result<bool> {
    Ok(s.delete_federated_bundle(td, BundleDeleteMode::Restrict)
        .await?
        .found)
}

#[tokio::test]
async fn deleting_a_bundle_can_dissociate_or_delete_the_entries_that_use_it() {
    for (name, s) in stores().await {
        println!("backend: {name}");
        let s = s.as_ref();
        let td = |t: &str| TrustDomain::new(t).unwrap();
        for t in ["p.test", "q.test"] {
            s.set_federated_bundle(&empty_bundle(t), 1).await.unwrap();
        }
        let mut both = entry("both", "spiffe://td/node-a");
        both.federates_with = vec![td("p.test"), td("q.test")];
        let mut only_p = entry("only-p", "spiffe://td/node-b");
        only_p.federates_with = vec![td("p.test")];
        let mut only_q = entry("only-q", "spiffe://td/node-a");
        only_q.federates_with = vec![td("q.test")];
        let unrelated = entry("none", "spiffe://td/node-c");
        for e in [both, only_p, only_q, unrelated] {
            s.create_entry(e, 1).await.unwrap();
        }
        let before = s.entry_revision().await.unwrap();

        // Dissociate: p.test leaves the two entries that list it, in one
        // new revision recorded under both their parents; nothing else moves.
        let done = s
            .delete_federated_bundle("p.test", BundleDeleteMode::Dissociate)
            .await
            .unwrap();
        assert!(done.found);
        let ids: Vec<&str> = done.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["both", "only-p"]);
        let rev = done.revision.expect("a revision for the changed entries");
        assert_eq!(rev, before + 1);
        let both = s.get_entry("both").await.unwrap().unwrap();
        assert_eq!(both.federates_with, vec![td("q.test")]);
        assert_eq!(both.revision, rev);
        assert!(s
            .get_entry("only-p")
            .await
            .unwrap()
            .unwrap()
            .federates_with
            .is_empty());
        assert_eq!(s.get_entry("none").await.unwrap().unwrap().revision, before);
        for node in ["spiffe://td/node-a", "spiffe://td/node-b"] {
            let page = s
                .sync_entries(&SpiffeId::parse(node).unwrap(), before, 100)
                .await
                .unwrap();
            assert_eq!(page.revision, rev, "{node}");
            assert!(!page.entries.is_empty(), "{node} sees no change");
        }
        assert_eq!(s.list_federated_bundles().await.unwrap().len(), 1);

        // Delete: the entries that list q.test go with it.
        let done = s
            .delete_federated_bundle("q.test", BundleDeleteMode::Delete)
            .await
            .unwrap();
        let ids: Vec<&str> = done.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["both", "only-q"]);
        assert!(s.get_entry("both").await.unwrap().is_none());
        assert!(s.get_entry("only-q").await.unwrap().is_none());
        let page = s
            .sync_entries(&SpiffeId::parse("spiffe://td/node-a").unwrap(), rev, 100)
            .await
            .unwrap();
        let mut deleted = page.deleted.clone();
        deleted.sort();
        assert_eq!(deleted, ["both", "only-q"]);
        assert!(s.get_entry("only-p").await.unwrap().is_some());
        assert!(s.get_entry("none").await.unwrap().is_some());
        assert!(s.list_federated_bundles().await.unwrap().is_empty());

        // No bundle, nothing touched; no users, no revision.
        let done = s
            .delete_federated_bundle("q.test", BundleDeleteMode::Delete)
            .await
            .unwrap();
        assert_eq!(done, BundleDeleted::default());
    }
}

#[tokio::test]
async fn upgrading_keeps_existing_entries_federating_with_every_bundle_held() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ward.db");
    // A database as the previous version left it: migrations up to the one
    // before `federates_with`, an entry and a federated bundle.
    {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE schema_version (version BIGINT NOT NULL)")
            .execute(&mut c)
            .await
            .unwrap();
        for (i, sql) in MIGRATIONS[..FEDERATES_WITH_MIGRATION - 1]
            .iter()
            .enumerate()
        {
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
            sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                .bind((i + 1) as i64)
                .execute(&mut c)
                .await
                .unwrap();
        }
        sqlx::query(
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors, x509_ttl, jwt_ttl, dns_names, hint, admin, revision, created_at)
             VALUES ('old', 'spiffe://td/old', 'spiffe://td/node', '[\"unix:uid:1\"]', 0, 0, '[]', '', FALSE, 1, 1)",
        )
        .execute(&mut c)
        .await
        .unwrap();
        sqlx::query("UPDATE counters SET value = 1 WHERE name = 'entry_revision'")
            .execute(&mut c)
            .await
            .unwrap();
        // Its change, and the deletion of an entry `gone`.
        sqlx::query(
            "INSERT INTO entry_changes (revision, parent_id, entry_id)
             VALUES (1, 'spiffe://td/node', 'old'), (1, 'spiffe://td/node', 'gone')",
        )
        .execute(&mut c)
        .await
        .unwrap();
        // An agent, whose stored serial is the newest one issued to it.
        sqlx::query(
            "INSERT INTO agents (spiffe_id, attestation_type, serial, expires_at, evicted, attested_at)
             VALUES ('spiffe://td/node', 'join_token', 'ab', 100, FALSE, 1)",
        )
        .execute(&mut c)
        .await
        .unwrap();
        for td in ["b.test", "a.test"] {
            sqlx::query("INSERT INTO federated_bundles (trust_domain, jwks, updated_at) VALUES ($1, '{\"keys\":[]}', 1)")
                .bind(td)
                .execute(&mut c)
                .await
                .unwrap();
        }
    }
    let s = SqliteStore::open(&path).await.unwrap();
    let e = s.get_entry("old").await.unwrap().unwrap();
    let td = |t: &str| TrustDomain::new(t).unwrap();
    assert_eq!(e.federates_with, vec![td("a.test"), td("b.test")]);
    // A new revision, so agents that hold the entry fetch it again.
    assert_eq!(e.revision, 2);
    assert_eq!(s.entry_revision().await.unwrap(), 2);
    let node = SpiffeId::parse("spiffe://td/node").unwrap();
    // Whatever node SVID that agent presents first becomes its current one.
    let agent = s.get_agent(&node).await.unwrap().unwrap();
    assert_eq!(
        (agent.serial.as_str(), agent.new_serial.as_str()),
        ("ab", "*")
    );
    let page = s.sync_entries(&node, 1, 100).await.unwrap();
    assert!(
        format!("{page:?}").contains("\"old\""),
        "the upgrade's revision is not in the node's changes: {page:?}"
    );
    // The previous version kept every change: `old`'s first change, which
    // the upgrade's supersedes, goes at the first pruning; the deletion is
    // dated to the upgrade and kept for the retention.
    let pruned = s.prune_entry_changes(unix_now() - 3600).await.unwrap();
    assert_eq!(
        pruned,
        PrunedChanges {
            superseded: 1,
            deletions: 0,
            floor: 0
        }
    );
    let pruned = s.prune_entry_changes(unix_now() + 10).await.unwrap();
    assert_eq!(
        pruned,
        PrunedChanges {
            superseded: 0,
            deletions: 1,
            floor: 1
        }
    );
    let page = s.sync_entries(&node, 0, 100).await.unwrap();
    assert_eq!(
        page.entries
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        ["old"]
    );
    assert!(page.deleted.is_empty(), "{page:?}");
}

#[tokio::test]
async fn an_entry_and_the_delete_of_its_bundle_never_both_succeed() {
    for (name, s) in stores().await {
        println!("backend: {name}");
        let s = s.as_ref();
        let bundle = empty_bundle("race.test");
        let (mut created, mut deleted) = (0, 0);
        for i in 0..50 {
            s.set_federated_bundle(&bundle, 1).await.unwrap();
            let mut e = entry(&format!("race{i}"), "spiffe://td/node");
            e.federates_with = vec![TrustDomain::new("race.test").unwrap()];
            let (c, d) = tokio::join!(s.create_entry(e, 1), restrict(s, "race.test"));
            match (c, d) {
                (Ok(_), Ok(true)) => panic!("round {i}: an entry federates with a deleted bundle"),
                (Ok(e), _) => {
                    created += 1;
                    s.delete_entry(&e.id, 0).await.unwrap();
                }
                (Err(_), Ok(true)) => deleted += 1,
                other => panic!("round {i}: {other:?}"),
            }
        }
        println!("  {created} creates won, {deleted} deletes won");
    }
}

#[tokio::test]
async fn a_renewal_is_stored_only_over_the_serials_it_read() {
    for (backend, s) in stores().await {
        println!("backend: {backend}");
        let agent = agent_n1();
        s.upsert_agent(&agent).await.unwrap();
        let read = s.get_agent(&agent.spiffe_id).await.unwrap().unwrap();
        assert_eq!((read.serial.as_str(), read.new_serial.as_str()), ("a1", ""));
        let renewed = AgentRecord {
            new_serial: "b2".into(),
            expires_at: 200,
            ..read.clone()
        };
        assert!(s.renew_agent(&read, &renewed).await.unwrap());
        let now = s.get_agent(&agent.spiffe_id).await.unwrap().unwrap();
        assert_eq!(
            (now.serial.as_str(), now.new_serial.as_str(), now.expires_at),
            ("a1", "b2", 200)
        );
        // A second renewal from the same read (a concurrent one) is not stored.
        let other = AgentRecord {
            new_serial: "c3".into(),
            ..read.clone()
        };
        assert!(!s.renew_agent(&read, &other).await.unwrap());
        assert_eq!(
            s.get_agent(&agent.spiffe_id)
                .await
                .unwrap()
                .unwrap()
                .new_serial,
            "b2"
        );
        // Nor is one of an evicted agent.
        assert!(s.evict_agent(&agent.spiffe_id).await.unwrap());
        let promoted = AgentRecord {
            serial: "b2".into(),
            new_serial: "d4".into(),
            ..now.clone()
        };
        assert!(!s.renew_agent(&now, &promoted).await.unwrap());
        // Attesting again starts over with no renewal pending.
        s.upsert_agent(&agent).await.unwrap();
        let again = s.get_agent(&agent.spiffe_id).await.unwrap().unwrap();
        assert_eq!(
            (again.serial.as_str(), again.new_serial.as_str()),
            ("a1", "")
        );
    }
}

#[tokio::test]
async fn agents_are_listed_in_pages_in_spiffe_id_order() {
    for (backend, s) in stores().await {
        println!("backend: {backend}");
        for n in ["n3", "n1", "n2"] {
            s.upsert_agent(&AgentRecord {
                spiffe_id: id(&format!("spiffe://td/ward/agent/join_token/{n}")),
                attestation_type: "join_token".into(),
                serial: n.into(),
                new_serial: String::new(),
                expires_at: 100,
                evicted: false,
                attested_at: 1,
            })
            .await
            .unwrap();
        }
        let serials = |v: Vec<AgentRecord>| v.into_iter().map(|a| a.serial).collect::<Vec<_>>();
        let first = s.list_agents(None, 2).await.unwrap();
        let after = first[1].spiffe_id.to_string();
        assert_eq!(serials(first), ["n1", "n2"]);
        assert_eq!(
            serials(s.list_agents(Some(&after), 2).await.unwrap()),
            ["n3"]
        );
        assert_eq!(s.list_agents(None, 10).await.unwrap().len(), 3);
    }
}

/// PostgreSQL: a column another replica's migration adds to `agents` or
/// `policy_sets` (a rolling upgrade) does not break this replica's reads of
/// them on connections that ran them before (a statement prepared for `*`
/// is refused once the table's columns change).
#[tokio::test]
async fn reads_go_on_when_another_replica_adds_a_column() {
    let Some(url) = postgres_url() else {
        return;
    };
    let s = fresh_postgres(&url).await;
    let agent = agent_n1();
    s.upsert_agent(&agent).await.unwrap();
    let set = first_policy_set();
    s.add_policy_set(&set).await.unwrap();
    let read_all = || async {
        s.get_agent(&agent.spiffe_id).await?;
        s.list_agents(None, 10).await?;
        s.get_policy_set(None).await?;
        s.get_policy_set(Some(1)).await?;
        s.list_policy_sets(None, 10).await?;
        Ok::<_, StoreError>(())
    };
    // Each statement prepared on the pool's connections.
    for _ in 0..3 {
        read_all().await.unwrap();
    }
    for table in ["agents", "policy_sets"] {
        sqlx::query(&format!("ALTER TABLE {table} ADD COLUMN added_later TEXT"))
            .execute(s.pool())
            .await
            .unwrap();
    }
    for _ in 0..3 {
        read_all().await.unwrap();
    }
    assert_eq!(
        s.get_agent(&agent.spiffe_id).await.unwrap().unwrap().serial,
        "a1"
    );
}
