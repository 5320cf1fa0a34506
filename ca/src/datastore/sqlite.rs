//! SQLite backend: one file in the data directory, WAL journal, full sync.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use ward_spec::{Selector, SpiffeId, TrustBundle, TrustDomain};

use super::sql::{sql_store, ENTRY_COLUMNS, MIGRATIONS, NOTICE_PARENTS_MAX};
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
