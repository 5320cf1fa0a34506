//! The CA's datastore: one trait, two backends: SQLite (embedded, WAL) and
//! PostgreSQL (several CA replicas on one database).
//!
//! Everything the CA acknowledges is committed here first. The SQL is kept
//! portable (numbered `$N` parameters, `RETURNING`, no SQLite-only functions):
//! both backends run the same statements (`sql`).
//!
//! Registration entries carry a global revision. Each write appends one row per
//! affected parent to `entry_changes`, so an agent can ask "what changed under
//! me since revision R" with one indexed range scan, and learns about entries
//! moved away from it or deleted without any tombstone in `entries`.

mod breaker;
mod postgres;
mod sql;
mod sqlite;
#[cfg(test)]
mod tests;

pub use breaker::{unavailable, Breaker};
pub use postgres::{redacted, PgStore};
pub use sql::unix_now;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use ward_spec::{Selector, SpiffeId, TrustBundle, TrustDomain};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the database does not answer: {0}")]
    Unavailable(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    Conflict(String),
    /// The change would leave other records pointing at nothing.
    #[error("{0}")]
    InUse(String),
    /// The record changed since the caller read it.
    #[error("{0}")]
    Stale(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A registration entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub spiffe_id: SpiffeId,
    pub parent_id: SpiffeId,
    pub selectors: Vec<Selector>,
    /// Seconds; 0 means the CA default.
    pub x509_ttl: i64,
    pub jwt_ttl: i64,
    pub dns_names: Vec<String>,
    pub hint: String,
    pub admin: bool,
    pub revision: u64,
    pub created_at: i64,
    /// Trust domains whose bundles the entry's workloads receive, sorted.
    pub federates_with: Vec<TrustDomain>,
}

#[cfg(test)]
impl Entry {
    /// An entry for tests: `id` names `spiffe_id` under `parent_id`, with
    /// no selectors, DNS names or federation, and default TTLs.
    pub(crate) fn bare(id: String, spiffe_id: SpiffeId, parent_id: SpiffeId) -> Entry {
        Entry {
            id,
            spiffe_id,
            parent_id,
            selectors: vec![],
            x509_ttl: 0,
            jwt_ttl: 0,
            dns_names: vec![],
            hint: String::new(),
            admin: false,
            revision: 0,
            created_at: 0,
            federates_with: vec![],
        }
    }
}

/// What signing needs of an entry (a narrow read on the hot path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningEntry {
    pub id: String,
    pub spiffe_id: SpiffeId,
    pub dns_names: Vec<String>,
    pub x509_ttl: i64,
}

/// What the signing path checks of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStanding {
    pub evicted: bool,
    /// Its current node SVID's serial.
    pub serial: String,
}

/// A node agent the CA has attested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub spiffe_id: SpiffeId,
    pub attestation_type: String,
    /// Serial number (hex) of the node SVID the agent last proved it holds
    /// (by attesting, or by presenting it to renew).
    pub serial: String,
    /// Serial number of the node SVID its last renewal issued, until the
    /// agent presents it (then it becomes `serial`); empty if none.
    pub new_serial: String,
    pub expires_at: i64,
    pub evicted: bool,
    pub attested_at: i64,
}

/// A join token as stored: only its hash.
#[derive(Debug, Clone)]
pub struct JoinTokenRecord {
    pub token_hash: String,
    pub agent_id: SpiffeId,
    pub expires_at: i64,
    pub created_at: i64,
}

/// What became of an attempt to use a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenUse {
    /// The token is valid (or, redeemed, is now spent) for this agent.
    Accepted(SpiffeId),
    Unknown,
    AlreadyUsed,
    Expired,
}

/// One page of changes for an agent.
#[derive(Debug, Clone, Default)]
pub struct SyncPage {
    pub entries: Vec<Entry>,
    pub deleted: Vec<String>,
    pub revision: u64,
    /// With `more`: the page's last entry; the next page goes on after it
    /// (`revision` may have more entries).
    pub after: String,
    pub more: bool,
    /// Deletions after the caller's revision may have been pruned (see
    /// [`Datastore::prune_entry_changes`]): the caller must sync again from
    /// revision 0 and drop what that sync does not return.
    pub restart: bool,
}

/// What [`Datastore::prune_entry_changes`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrunedChanges {
    /// Rows a newer change of the same entry under the same parent replaced.
    pub superseded: u64,
    /// Deletions (an entry gone from a parent) older than the cut-off.
    pub deletions: u64,
    /// The newest revision pruned so far: a sync from an older revision
    /// (other than 0) is told to restart.
    pub floor: u64,
}

#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    pub parent_id: Option<SpiffeId>,
    pub spiffe_id: Option<SpiffeId>,
}

/// A stored policy set version. `files` are (name, text), in name order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySetRecord {
    pub version: u64,
    pub files: Vec<(String, String)>,
    pub digest: String,
    pub comment: String,
    pub created_at: i64,
    /// How many policies the files hold.
    pub policies: u64,
}

/// The bundle of a trust domain we federate with, and where to refresh it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FederatedBundleRecord {
    pub trust_domain: String,
    /// SPIFFE JWKS.
    pub jwks: Vec<u8>,
    /// Its SPIFFE bundle endpoint (`https://…`, profile `https_spiffe`), or
    /// empty when the bundle is only set by hand.
    pub endpoint_url: String,
    /// The SPIFFE ID the endpoint's server must present.
    pub endpoint_spiffe_id: String,
}

/// What deleting a federated bundle does to the entries that federate with
/// it (SPIRE's `bundle delete -mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BundleDeleteMode {
    /// Refuse while any entry federates with it.
    #[default]
    Restrict,
    /// Remove the trust domain from those entries' `federates_with`.
    Dissociate,
    /// Delete those entries.
    Delete,
}

/// The outcome of a federated bundle delete.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BundleDeleted {
    /// There was a bundle for that trust domain.
    pub found: bool,
    /// The entries changed (dissociated) or deleted, as they were before.
    pub entries: Vec<Entry>,
    /// The entry revision of those changes (none if no entry changed).
    pub revision: Option<u64>,
}

/// A change committed by any process sharing the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChange {
    /// Entries under these parents (node SPIFFE IDs) changed, up to this revision.
    Entries(u64, Vec<String>),
    /// This policy set version is now the active one.
    Policy(u64),
    /// The published bundle moved to this sequence.
    Bundle(u64),
    /// This agent changed: evicted (no serials), or attested or renewed
    /// (its serial and new serial as now stored).
    Agent(String, Option<(String, String)>),
    /// A federated bundle was set or deleted.
    Federation,
    /// Notices stopped (the connection was lost): until `Resync`, changes
    /// may go unheard.
    Lost,
    /// Notices flow again after some may have been missed: read again.
    Resync,
}

/// The bundle made of the replicas' parts: every root and JWT key of each,
/// without duplicates, in part order; the refresh hint of the first part.
pub fn merge_bundle_parts(td: &TrustDomain, parts: &[Vec<u8>]) -> Result<TrustBundle> {
    let mut merged = TrustBundle::new(td.clone());
    for p in parts {
        let b = TrustBundle::from_jwks(td.clone(), p)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        merged.refresh_hint = merged.refresh_hint.or(b.refresh_hint);
        for r in b.x509_authorities {
            if !merged.x509_authorities.contains(&r) {
                merged.x509_authorities.push(r);
            }
        }
        for k in b.jwt_authorities {
            if !merged.jwt_authorities.iter().any(|m| m.kid == k.kid) {
                merged.jwt_authorities.push(k);
            }
        }
    }
    Ok(merged)
}

#[async_trait]
pub trait Datastore: Send + Sync + 'static {
    async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<()>;
    /// Whether a token may be spent now (`Accepted`: by the agent named),
    /// spending nothing.
    async fn join_token_state(&self, token_hash: &str, now: i64) -> Result<TokenUse>;
    /// Spends a token for `agent` (the agent it names) and stores the
    /// agent's record, in one transaction: of two concurrent callers one
    /// wins, and a token is never spent without its agent saved.
    async fn redeem_join_token(
        &self,
        token_hash: &str,
        now: i64,
        agent: &AgentRecord,
    ) -> Result<TokenUse>;

    async fn upsert_agent(&self, agent: &AgentRecord) -> Result<()>;
    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>>;
    /// Stores a renewal's serials and expiry if the agent's record still
    /// has the serials of `read` and is not evicted; false otherwise.
    async fn renew_agent(&self, read: &AgentRecord, renewed: &AgentRecord) -> Result<bool>;
    /// Agents in SPIFFE ID order: at most `limit`, after `after` if given.
    async fn list_agents(&self, after: Option<&str>, limit: u32) -> Result<Vec<AgentRecord>>;
    /// Marks an agent evicted; false if no such agent.
    async fn evict_agent(&self, id: &SpiffeId) -> Result<bool>;
    /// Deletes the join tokens for agent `id` not used yet; how many of
    /// them were still valid at `now`.
    async fn revoke_join_tokens(&self, id: &SpiffeId, now: i64) -> Result<u64>;

    /// Stores a new entry (its `id`, `revision` and `created_at` are assigned here).
    async fn create_entry(&self, entry: Entry, now: i64) -> Result<Entry>;
    /// Replaces every field but `id` and `created_at`.
    async fn update_entry(&self, entry: Entry) -> Result<Entry>;
    /// Deletes an entry if it is still at `expected_revision` (the one the
    /// caller read and authorized against; 0: whatever it is at); returns
    /// it with `revision` set to the deletion's revision.
    async fn delete_entry(&self, id: &str, expected_revision: u64) -> Result<Entry>;
    /// The newest entry revision (of any parent).
    async fn entry_revision(&self) -> Result<u64>;
    async fn get_entry(&self, id: &str) -> Result<Option<Entry>>;
    /// The entries among `ids` that exist; one query.
    async fn get_entries(&self, ids: &[String]) -> Result<Vec<Entry>>;
    /// The entries among `ids` parented to `parent`, narrowed to what signing needs.
    async fn signing_entries(&self, parent: &SpiffeId, ids: &[String])
        -> Result<Vec<SigningEntry>>;
    /// Whether `id` is evicted, and its current node SVID serial (None:
    /// not an attested agent); the narrow read of the signing path.
    async fn agent_standing(&self, id: &SpiffeId) -> Result<Option<AgentStanding>>;
    /// Entries ordered by id, after `after_id`, at most `limit`.
    async fn list_entries(
        &self,
        filter: &EntryFilter,
        after_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Entry>>;
    /// Entries parented to `parent` changed after `since`, at most `limit`.
    async fn sync_entries(&self, parent: &SpiffeId, since: u64, limit: u32) -> Result<SyncPage> {
        self.sync_entries_after(parent, since, "", limit).await
    }
    /// The same, going on from a page that ended inside revision `since`,
    /// after entry `after` ([`SyncPage::after`]).
    async fn sync_entries_after(
        &self,
        parent: &SpiffeId,
        since: u64,
        after: &str,
        limit: u32,
    ) -> Result<SyncPage>;
    /// Forgets deletions recorded before `before` (Unix seconds), so
    /// `entry_changes` holds one row per live entry and parent plus the
    /// recent deletions, instead of growing with every write.
    async fn prune_entry_changes(&self, before: i64) -> Result<PrunedChanges>;

    /// The stored bundle document and its sequence.
    async fn get_bundle(&self, trust_domain: &str) -> Result<Option<(Vec<u8>, u64)>>;
    /// Stores one CA replica's part of the bundle (its roots and JWT keys,
    /// valid until `expires_at`), merges every part still valid at `now` into
    /// the published bundle, and returns that bundle (JWKS) and its sequence,
    /// which moves once per change of the merged content, whichever replica
    /// made it.
    async fn publish_bundle_part(
        &self,
        trust_domain: &TrustDomain,
        replica: &str,
        part: &[u8],
        expires_at: i64,
        now: i64,
    ) -> Result<(Vec<u8>, u64)>;

    /// Stores a policy set as the next version (the new active one) and
    /// returns that version.
    async fn add_policy_set(&self, set: &PolicySetRecord) -> Result<u64>;
    /// One version, or the newest (active) one when `version` is `None`.
    async fn get_policy_set(&self, version: Option<u64>) -> Result<Option<PolicySetRecord>>;
    /// Versions older than `before` (all if None), newest first, at most `limit`.
    async fn list_policy_sets(
        &self,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<PolicySetRecord>>;

    /// Stores (or replaces) the bundle of a trust domain we federate with.
    async fn set_federated_bundle(&self, bundle: &FederatedBundleRecord, now: i64) -> Result<()>;
    /// Replaces the bundle of `read.trust_domain` with `jwks` only if the
    /// stored record is still `read` (a bundle refreshed from its endpoint
    /// must not undo an operator's change made while it was fetched, nor
    /// bring back a deleted one); false if it is not.
    async fn refresh_federated_bundle(
        &self,
        read: &FederatedBundleRecord,
        jwks: &[u8],
        now: i64,
    ) -> Result<bool>;
    /// Deletes a federated bundle, doing `mode` to the entries that
    /// federate with it, in one transaction (nothing, if there is none).
    async fn delete_federated_bundle(
        &self,
        trust_domain: &str,
        mode: BundleDeleteMode,
    ) -> Result<BundleDeleted>;
    /// Every federated bundle, by trust domain.
    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundleRecord>>;

    /// Changes other processes (CA replicas) commit to the same database, as
    /// they commit; None for a store no other process writes.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<StoreChange>> {
        None
    }

    /// Whether every connection to the database is in use (a call that
    /// timed out waiting for one met load, not an outage).
    fn busy(&self) -> bool {
        false
    }

    /// For how long the database has been known not to answer (calls fail
    /// at once meanwhile); see [`Breaker`].
    fn down_for(&self) -> Option<std::time::Duration> {
        None
    }

    /// A cheap query that proves the database answers (for `/readyz`).
    async fn ping(&self) -> Result<()>;
}
