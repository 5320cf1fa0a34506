//! Fails fast while the database does not answer.
//!
//! Every call goes through to the database until one fails because the
//! database does not answer (see [`unavailable`]; a pool that hands out no
//! connection in time counts only when it is not simply busy, see
//! [`Datastore::busy`]). From then on calls fail at
//! once with [`StoreError::Unavailable`], instead of each waiting for a
//! connection that cannot be made, and a background probe pings the database
//! every 500 ms; the first answer closes the breaker again. The change is
//! logged once each way and exported as `ward_ca_datastore_up`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::broadcast;
use ward_spec::{SpiffeId, TrustDomain};

use super::{
    AgentRecord, AgentStanding, BundleDeleteMode, BundleDeleted, Datastore, Entry, EntryFilter,
    FederatedBundleRecord, JoinTokenRecord, PolicySetRecord, PrunedChanges, Result, SigningEntry,
    StoreChange, StoreError, SyncPage, TokenUse,
};
use crate::metrics::Metrics;

const PROBE_INTERVAL: Duration = Duration::from_millis(500);

pub struct Breaker {
    inner: Arc<dyn Datastore>,
    /// When the breaker opened (None: closed).
    open_since: Arc<Mutex<Option<Instant>>>,
    metrics: Arc<Metrics>,
}

impl Breaker {
    pub fn new(inner: Arc<dyn Datastore>, metrics: Arc<Metrics>) -> Self {
        metrics.datastore_up.set(1);
        Breaker {
            inner,
            open_since: Arc::default(),
            metrics,
        }
    }

    fn check(&self) -> Result<()> {
        if self.open_since().is_some() {
            return Err(StoreError::Unavailable(
                "it stopped answering; probing every 500 ms".into(),
            ));
        }
        Ok(())
    }

    fn open_since(&self) -> Option<Instant> {
        *self.open_since.lock().expect("breaker lock")
    }

    fn observe<T>(&self, r: Result<T>) -> Result<T> {
        match &r {
            // Every connection in use: load, not an outage.
            Err(StoreError::Db(sqlx::Error::PoolTimedOut)) if self.inner.busy() => {}
            Err(e) if unavailable(e) => self.trip(e),
            _ => {}
        }
        r
    }

    fn trip(&self, e: &StoreError) {
        {
            let mut since = self.open_since.lock().expect("breaker lock");
            if since.is_some() {
                return;
            }
            *since = Some(Instant::now());
        }
        self.metrics.datastore_up.set(0);
        tracing::warn!(error = %e, "the datastore does not answer: signing from what was last read, writes fail until it returns");
        let (inner, open, metrics) = (
            self.inner.clone(),
            self.open_since.clone(),
            self.metrics.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                if inner.ping().await.is_ok() {
                    *open.lock().expect("breaker lock") = None;
                    metrics.datastore_up.set(1);
                    tracing::info!("the datastore answers again");
                    return;
                }
            }
        });
    }
}

/// Whether `e` means the database does not answer (as opposed to refusing a
/// statement): connection and pool failures, and PostgreSQL's connection
/// exception (08) and operator intervention (57P: shutting down) classes.
pub fn unavailable(e: &StoreError) -> bool {
    match e {
        StoreError::Unavailable(_) => true,
        StoreError::Db(e) => match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(d) => d
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            _ => false,
        },
        _ => false,
    }
}

/// `self.inner.$call`, unless the breaker is open; trips it on an
/// unavailable database.
macro_rules! guarded {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {{
        $self.check()?;
        let r = $self.inner.$method($($arg),*).await;
        $self.observe(r)
    }};
}

#[async_trait]
impl Datastore for Breaker {
    async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<()> {
        guarded!(self.create_join_token(token))
    }
    async fn join_token_state(&self, token_hash: &str, now: i64) -> Result<TokenUse> {
        guarded!(self.join_token_state(token_hash, now))
    }
    async fn redeem_join_token(
        &self,
        token_hash: &str,
        now: i64,
        agent: &AgentRecord,
    ) -> Result<TokenUse> {
        guarded!(self.redeem_join_token(token_hash, now, agent))
    }
    async fn upsert_agent(&self, agent: &AgentRecord) -> Result<()> {
        guarded!(self.upsert_agent(agent))
    }
    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>> {
        guarded!(self.get_agent(id))
    }
    async fn renew_agent(&self, read: &AgentRecord, renewed: &AgentRecord) -> Result<bool> {
        guarded!(self.renew_agent(read, renewed))
    }

    async fn list_agents(&self, after: Option<&str>, limit: u32) -> Result<Vec<AgentRecord>> {
        guarded!(self.list_agents(after, limit))
    }
    async fn evict_agent(&self, id: &SpiffeId) -> Result<bool> {
        guarded!(self.evict_agent(id))
    }
    async fn revoke_join_tokens(&self, id: &SpiffeId, now: i64) -> Result<u64> {
        guarded!(self.revoke_join_tokens(id, now))
    }
    async fn create_entry(&self, entry: Entry, now: i64) -> Result<Entry> {
        guarded!(self.create_entry(entry, now))
    }
    async fn update_entry(&self, entry: Entry) -> Result<Entry> {
        guarded!(self.update_entry(entry))
    }
    async fn delete_entry(&self, id: &str, expected_revision: u64) -> Result<Entry> {
        guarded!(self.delete_entry(id, expected_revision))
    }
    async fn entry_revision(&self) -> Result<u64> {
        guarded!(self.entry_revision())
    }
    async fn get_entry(&self, id: &str) -> Result<Option<Entry>> {
        guarded!(self.get_entry(id))
    }
    async fn get_entries(&self, ids: &[String]) -> Result<Vec<Entry>> {
        guarded!(self.get_entries(ids))
    }
    async fn signing_entries(
        &self,
        parent: &SpiffeId,
        ids: &[String],
    ) -> Result<Vec<SigningEntry>> {
        guarded!(self.signing_entries(parent, ids))
    }
    async fn agent_standing(&self, id: &SpiffeId) -> Result<Option<AgentStanding>> {
        guarded!(self.agent_standing(id))
    }
    async fn list_entries(
        &self,
        filter: &EntryFilter,
        after_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Entry>> {
        guarded!(self.list_entries(filter, after_id, limit))
    }
    async fn sync_entries_after(
        &self,
        parent: &SpiffeId,
        since: u64,
        after: &str,
        limit: u32,
    ) -> Result<SyncPage> {
        guarded!(self.sync_entries_after(parent, since, after, limit))
    }
    async fn prune_entry_changes(&self, before: i64) -> Result<PrunedChanges> {
        guarded!(self.prune_entry_changes(before))
    }
    async fn get_bundle(&self, trust_domain: &str) -> Result<Option<(Vec<u8>, u64)>> {
        guarded!(self.get_bundle(trust_domain))
    }
    async fn publish_bundle_part(
        &self,
        trust_domain: &TrustDomain,
        replica: &str,
        part: &[u8],
        expires_at: i64,
        now: i64,
    ) -> Result<(Vec<u8>, u64)> {
        guarded!(self.publish_bundle_part(trust_domain, replica, part, expires_at, now))
    }
    async fn add_policy_set(&self, set: &PolicySetRecord) -> Result<u64> {
        guarded!(self.add_policy_set(set))
    }
    async fn get_policy_set(&self, version: Option<u64>) -> Result<Option<PolicySetRecord>> {
        guarded!(self.get_policy_set(version))
    }
    async fn list_policy_sets(
        &self,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<PolicySetRecord>> {
        guarded!(self.list_policy_sets(before, limit))
    }
    async fn set_federated_bundle(&self, bundle: &FederatedBundleRecord, now: i64) -> Result<()> {
        guarded!(self.set_federated_bundle(bundle, now))
    }
    async fn refresh_federated_bundle(
        &self,
        read: &FederatedBundleRecord,
        jwks: &[u8],
        now: i64,
    ) -> Result<bool> {
        guarded!(self.refresh_federated_bundle(read, jwks, now))
    }
    async fn delete_federated_bundle(
        &self,
        trust_domain: &str,
        mode: BundleDeleteMode,
    ) -> Result<BundleDeleted> {
        guarded!(self.delete_federated_bundle(trust_domain, mode))
    }
    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundleRecord>> {
        guarded!(self.list_federated_bundles())
    }
    fn changes(&self) -> Option<broadcast::Receiver<StoreChange>> {
        self.inner.changes()
    }
    fn busy(&self) -> bool {
        self.inner.busy()
    }
    fn down_for(&self) -> Option<Duration> {
        self.open_since().map(|t| t.elapsed())
    }
    async fn ping(&self) -> Result<()> {
        guarded!(self.ping())
    }
}
