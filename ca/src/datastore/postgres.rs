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

use super::sql::{sql_store, ENTRY_COLUMNS, MIGRATIONS};
use super::{
    AgentRecord, Datastore, Entry, EntryFilter, JoinTokenRecord, PolicySetRecord, Result,
    SigningEntry, StoreChange, StoreError, SyncPage, TokenUse,
};

/// Serializes migrations of replicas that start at the same time.
const MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(7780633800)";
/// The channel every replica announces its committed changes on.
const CHANNEL: &str = "ward_changes";
const NOTIFY: &str = "SELECT pg_notify('ward_changes', $1)";

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    changes: broadcast::Sender<StoreChange>,
}

impl PgStore {
    /// Connects to `url` (`postgres://…`) and runs pending migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(2))
            .connect(url)
            .await?;
        let (changes, _) = broadcast::channel(1024);
        let store = PgStore { pool, changes };
        store.migrate().await?;
        let mut listener = PgListener::connect_with(&store.pool).await?;
        listener.listen(CHANNEL).await?;
        tokio::spawn(listen(listener, store.changes.clone()));
        Ok(store)
    }
}

impl PgStore {
    fn subscribe(&self) -> Option<broadcast::Receiver<StoreChange>> {
        Some(self.changes.subscribe())
    }
}

/// Forwards the replicas' notices until the store is dropped. The listener
/// reconnects by itself after a lost connection; what was announced in the
/// meantime is lost, so a `Resync` follows.
async fn listen(mut listener: PgListener, out: broadcast::Sender<StoreChange>) {
    let mut lost = false;
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) => {
                if std::mem::take(&mut lost) {
                    let _ = out.send(StoreChange::Resync);
                }
                let change = match n.payload().split_once(':') {
                    Some(("entries", v)) => {
                        let (rev, parents) = v.split_once(':').unwrap_or((v, ""));
                        rev.parse().ok().map(|r| {
                            StoreChange::Entries(r, parents.split(' ').map(str::to_owned).collect())
                        })
                    }
                    Some(("policy", v)) => v.parse().ok().map(StoreChange::Policy),
                    Some(("bundle", v)) => v.parse().ok().map(StoreChange::Bundle),
                    Some(("agent", v)) => Some(StoreChange::Agent(v.to_owned())),
                    Some(("federation", _)) => Some(StoreChange::Federation),
                    _ => None,
                };
                match change {
                    Some(c) => {
                        let _ = out.send(c);
                    }
                    None => tracing::warn!(
                        payload = n.payload(),
                        "ignoring an unknown datastore notice"
                    ),
                }
            }
            // The connection was lost; the next call reconnects.
            Ok(None) => {
                if !lost {
                    tracing::warn!("lost the datastore's change notices; reconnecting");
                }
                lost = true;
            }
            Err(e) => {
                if !lost {
                    tracing::warn!(error = %e, "datastore change notices unavailable; retrying");
                }
                lost = true;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

sql_store!(
    PgStore,
    sqlx::postgres::PgRow,
    sqlx::PgConnection,
    Some(MIGRATION_LOCK),
    Some(NOTIFY)
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
