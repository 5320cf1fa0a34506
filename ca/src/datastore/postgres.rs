//! PostgreSQL backend: several CA replicas on one database.
//!
//! The queries and migrations are the SQLite backend's ([`super::sql`]);
//! replicas starting together take an advisory lock so one of them migrates.
//! The pool reconnects by itself: while the database is unreachable calls
//! fail (and `/readyz` says so), and they succeed again when it returns.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::Row;
use tokio::sync::broadcast;
use ward_spec::{Selector, SpiffeId, TrustBundle, TrustDomain};

use super::sql::{
    sql_store, AGENT_COLUMNS, ENTRY_COLUMNS, MIGRATIONS, NOTICE_PARENTS_MAX, POLICY_SET_COLUMNS,
};
use super::{
    AgentRecord, AgentStanding, BundleDeleteMode, BundleDeleted, Datastore, Entry, EntryFilter,
    FederatedBundleRecord, JoinTokenRecord, PolicySetRecord, PrunedChanges, Result, SigningEntry,
    StoreChange, StoreError, SyncPage, TokenUse,
};

/// Serializes migrations of replicas that start at the same time.
const MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(7780633800)";
/// The channel every replica announces its committed changes on.
const CHANNEL: &str = "ward_changes";
const NOTIFY: &str = "SELECT pg_notify('ward_changes', $1)";
const MAX_CONNECTIONS: u32 = 16;

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    changes: broadcast::Sender<StoreChange>,
}

#[cfg(test)]
impl PgStore {
    /// The pool, for tests that hold a transaction open against the store.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://…`) and runs pending migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(2))
            .connect(url)
            .await?;
        let (changes, _) = broadcast::channel(1024);
        let store = PgStore { pool, changes };
        store.migrate().await?;
        let listener = subscribe_notices(&store.pool).await?;
        tokio::spawn(listen(store.pool.clone(), listener, store.changes.clone()));
        Ok(store)
    }
}

impl PgStore {
    fn subscribe(&self) -> Option<broadcast::Receiver<StoreChange>> {
        Some(self.changes.subscribe())
    }

    /// Every connection open and taken.
    fn pool_busy(&self) -> bool {
        self.pool.size() >= MAX_CONNECTIONS && self.pool.num_idle() == 0
    }
}

/// Forwards the replicas' notices. When the connection is lost, `Lost` is
/// sent at once; this task then reconnects by itself and sends `Resync` the
/// moment notices flow again (what was announced in between is not heard).
async fn listen(pool: PgPool, mut listener: PgListener, out: broadcast::Sender<StoreChange>) {
    loop {
        let lost = match listener.try_recv().await {
            Ok(Some(n)) => {
                match parse_notice(n.payload()) {
                    Some(c) => {
                        let _ = out.send(c);
                    }
                    None => tracing::warn!(
                        payload = n.payload(),
                        "ignoring an unknown datastore notice"
                    ),
                }
                continue;
            }
            Ok(None) => "the connection was closed".to_owned(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(
            error = lost,
            "lost the datastore's change notices; reconnecting"
        );
        let _ = out.send(StoreChange::Lost);
        listener = loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            match subscribe_notices(&pool).await {
                Ok(l) => break l,
                Err(e) => tracing::debug!(error = %e, "change notices still unavailable"),
            }
        };
        tracing::info!("datastore change notices resumed");
        let _ = out.send(StoreChange::Resync);
    }
}

async fn subscribe_notices(pool: &PgPool) -> Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// `entries:REV:PARENT PARENT…`, `policy:V`, `bundle:SEQ`, `agent:ID` or
/// `agent:ID SERIAL NEW_SERIAL`, `federation:TD`.
fn parse_notice(payload: &str) -> Option<StoreChange> {
    match payload.split_once(':')? {
        ("entries", v) => {
            let (rev, parents) = v.split_once(':').unwrap_or((v, ""));
            let parents = parents.split(' ').filter(|p| !p.is_empty());
            rev.parse()
                .ok()
                .map(|r| StoreChange::Entries(r, parents.map(str::to_owned).collect()))
        }
        ("policy", v) => v.parse().ok().map(StoreChange::Policy),
        ("bundle", v) => v.parse().ok().map(StoreChange::Bundle),
        ("agent", v) => {
            let mut parts = v.split(' ');
            let id = parts.next()?.to_owned();
            let serials = match (parts.next(), parts.next()) {
                (Some(s), Some(n)) => Some((s.to_owned(), n.to_owned())),
                _ => None,
            };
            Some(StoreChange::Agent(id, serials))
        }
        ("federation", _) => Some(StoreChange::Federation),
        _ => None,
    }
}

sql_store!(
    PgStore,
    sqlx::postgres::PgRow,
    sqlx::PgConnection,
    Some(MIGRATION_LOCK),
    Some(NOTIFY),
    Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
    "BEGIN"
);

/// `url` with any password replaced by `***`, for messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_notices_carry_the_serials_stored_if_any() {
        let id = "spiffe://td/ward/agent/join_token/a";
        assert_eq!(
            parse_notice(&format!("agent:{id} 0a1b *")),
            Some(StoreChange::Agent(
                id.into(),
                Some(("0a1b".into(), "*".into()))
            ))
        );
        assert_eq!(
            parse_notice(&format!("agent:{id}")),
            Some(StoreChange::Agent(id.into(), None))
        );
    }

    #[test]
    fn a_change_to_many_parents_is_told_in_notices_that_fit_and_name_them_all() {
        let entries: Vec<Entry> = (0..400)
            .map(|i| {
                Entry::bare(
                    format!("e{i}"),
                    SpiffeId::parse("spiffe://td/w").unwrap(),
                    SpiffeId::parse(&format!("spiffe://td/ward/agent/join_token/{i:040}")).unwrap(),
                )
            })
            .collect();
        let notices = entries_notices(7, &entries);
        assert!(notices.len() > 1, "{} notices", notices.len());
        let mut named = Vec::new();
        for n in &notices {
            assert!(n.len() < 8000, "{} bytes", n.len());
            match parse_notice(n) {
                Some(StoreChange::Entries(7, parents)) => named.extend(parents),
                other => panic!("{n}: {other:?}"),
            }
        }
        let mut all: Vec<String> = entries.iter().map(|e| e.parent_id.to_string()).collect();
        all.sort();
        named.sort();
        assert_eq!(named, all);
    }

    #[test]
    fn passwords_never_appear_in_messages() {
        assert_eq!(
            super::redacted("postgres://ward:s3cret@db:5432/ward"),
            "postgres://ward:***@db:5432/ward"
        );
        assert_eq!(
            super::redacted("postgres://ward@db/ward"),
            "postgres://ward@db/ward"
        );
        assert_eq!(super::redacted("postgres://db/ward"), "postgres://db/ward");
    }
}
