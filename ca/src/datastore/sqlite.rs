//! SQLite backend: one file in the data directory, WAL journal, full sync.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use ward_spec::{Selector, SpiffeId, TrustBundle, TrustDomain};

use super::sql::{
    sql_store, AGENT_COLUMNS, ENTRY_COLUMNS, MIGRATIONS, NOTICE_PARENTS_MAX, POLICY_SET_COLUMNS,
};
use super::{
    AgentRecord, AgentStanding, BundleDeleteMode, BundleDeleted, Datastore, Entry, EntryFilter,
    FederatedBundleRecord, JoinTokenRecord, PolicySetRecord, PrunedChanges, Result, SigningEntry,
    StoreError, SyncPage, TokenUse,
};

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs pending migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        let store = SqliteStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// An in-memory database, for tests of code above the store.
    pub async fn in_memory() -> Result<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        let store = SqliteStore { pool };
        store.migrate().await?;
        Ok(store)
    }
}

impl SqliteStore {
    /// Nobody else writes an embedded database.
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<super::StoreChange>> {
        None
    }

    fn pool_busy(&self) -> bool {
        false
    }
}

sql_store!(
    SqliteStore,
    sqlx::sqlite::SqliteRow,
    sqlx::SqliteConnection,
    None,
    None,
    None,
    "BEGIN IMMEDIATE"
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::sql::list_entries_sql;

    /// Copies stored before they were refused (an upgraded database) can
    /// still be changed in what does not make them copies (a TTL, a hint),
    /// and deleted.
    #[tokio::test]
    async fn copies_stored_before_they_were_refused_can_still_be_changed() {
        let store = SqliteStore::in_memory().await.unwrap();
        let e = crate::datastore::tests::entry("e", "spiffe://td/node");
        store.create_entry(e, 1).await.unwrap();
        // What an older CA let through: a second row with the same ID,
        // parent and selectors.
        sqlx::query(&format!(
            "INSERT INTO entries ({ENTRY_COLUMNS}) SELECT 'copy', spiffe_id, parent_id, selectors, x509_ttl, jwt_ttl, dns_names, hint, admin, revision, created_at, federates_with FROM entries WHERE id = 'e'"
        ))
        .execute(&store.pool)
        .await
        .unwrap();
        let mut copy = store.get_entry("copy").await.unwrap().unwrap();
        copy.x509_ttl = 300;
        copy.hint = "legacy".into();
        copy.revision = 0;
        assert_eq!(store.update_entry(copy).await.unwrap().x509_ttl, 300);
        store.delete_entry("copy", 0).await.unwrap();
    }

    /// Listing entries by parent or by SPIFFE ID (as every remote admin
    /// call does for its caller) searches an index, never every entry.
    #[tokio::test]
    async fn a_filtered_entry_list_searches_an_index() {
        let store = SqliteStore::in_memory().await.unwrap();
        let id = || Some(SpiffeId::parse("spiffe://td/x").unwrap());
        for (filter, index) in [
            (
                EntryFilter {
                    parent_id: id(),
                    spiffe_id: None,
                },
                "entries_parent_page",
            ),
            (
                EntryFilter {
                    parent_id: None,
                    spiffe_id: id(),
                },
                "entries_spiffe_id_page",
            ),
            (
                EntryFilter {
                    parent_id: id(),
                    spiffe_id: id(),
                },
                "_page",
            ),
        ] {
            let sql = format!("EXPLAIN QUERY PLAN {}", list_entries_sql(&filter));
            let mut q = sqlx::query(&sql).bind("");
            for v in [&filter.parent_id, &filter.spiffe_id].into_iter().flatten() {
                q = q.bind(v.to_string());
            }
            let plan: Vec<String> = q
                .bind(10i64)
                .fetch_all(&store.pool)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>("detail"))
                .collect();
            let plan = plan.join("; ");
            assert!(
                plan.starts_with("SEARCH") && plan.contains(index) && !plan.contains("TEMP B-TREE"),
                "{sql}: {plan}"
            );
        }
    }
}
