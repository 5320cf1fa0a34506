//! What signing reads, remembered, so a CA keeps signing while its database
//! is down.
//!
//! Signing an SVID writes nothing; it only reads the caller's standing and the
//! entries it asks for. Every such read goes to the database as usual and its
//! answer is kept here. When the database stops answering (a PostgreSQL
//! restart, a lost network path), the same reads are answered from what was
//! kept, without waiting on the database, until a background probe finds it
//! answering again (the store's breaker, [`crate::datastore::Breaker`]).
//! Writes (entries, tokens, attestation, renewal of node SVIDs) still fail
//! while it is down, and `/readyz` says so.
//!
//! What is kept stays true: nothing can change in a database that does not
//! answer, and every change committed before is forgotten here as it is heard
//! of (this replica's own writes, the other replicas' notices). While notices
//! do not flow, nothing is kept, and what was kept is forgotten unless the
//! database is down too; when they resume, everything is forgotten. A read
//! that raced with a change is not kept. Only what exists is kept: an unknown
//! agent or entry is asked of the database every time.
//!
//! One case escapes that reasoning: a replica cut off from a database that
//! the others still reach (a network partition) does not hear their changes.
//! So cached answers are served for at most [`MAX_STALE`] of an outage; then
//! signing fails here too and agents move to a replica that reaches the
//! database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ward_spec::SpiffeId;

use crate::datastore::{
    unavailable, AgentRecord, AgentStanding, Datastore, Entry, SigningEntry, StoreError,
};
use crate::metrics::Metrics;

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How long into an outage cached answers are served.
pub const MAX_STALE: Duration = Duration::from_secs(600);

pub struct ReadCache {
    store: Arc<dyn Datastore>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Changes are heard of (false while notices do not flow).
    following: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Moves on every forget, so a read that raced with a change is not kept.
    generation: u64,
    agents: HashMap<String, AgentRecord>,
    /// Signing views of entries, by parent, then by entry id.
    signing: HashMap<String, HashMap<String, SigningEntry>>,
    entries: HashMap<String, Entry>,
}

/// Entries for a signing batch: those found, and whether they come from the
/// cache (then a missing one may exist but is unknown here).
pub struct SigningView {
    pub entries: HashMap<String, SigningEntry>,
    pub from_cache: bool,
}

impl ReadCache {
    pub fn new(store: Arc<dyn Datastore>, metrics: Arc<Metrics>) -> Self {
        ReadCache {
            store,
            metrics,
            state: Mutex::default(),
            following: AtomicBool::new(true),
        }
    }

    /// Whether changes are heard of; while not, reads are not kept.
    pub fn follow(&self, following: bool) {
        self.following.store(following, Ordering::Relaxed);
    }

    /// Cached answers may be served: the database is down, not for too long.
    fn serving_from_cache(&self) -> bool {
        self.store.down_for().is_some_and(|d| d < MAX_STALE)
    }

    /// The agent record (None: not an attested agent).
    pub async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>> {
        let key = id.to_string();
        self.read(
            |s| s.agents.get(&key).cloned().map(Some),
            self.store.get_agent(id),
            |s, a| match a {
                Some(a) => {
                    s.agents.insert(key.clone(), a.clone());
                }
                None => {
                    s.agents.remove(&key);
                }
            },
        )
        .await
    }

    /// Whether `id` is an attested agent that is not evicted (None: unknown).
    pub async fn agent_standing(&self, id: &SpiffeId) -> Result<Option<AgentStanding>> {
        let key = id.to_string();
        let standing = |a: &AgentRecord| AgentStanding {
            evicted: a.evicted,
            serial: a.serial.clone(),
        };
        if !self.lock().agents.contains_key(&key) {
            // The full record once per agent, kept for an outage; then the
            // narrow query, which keeps the hot path cheap.
            return Ok(self.get_agent(id).await?.as_ref().map(standing));
        }
        self.read(
            |s| s.agents.get(&key).map(|a| Some(standing(a))),
            self.store.agent_standing(id),
            |s, read| match (s.agents.get(&key), read) {
                // Evicted, or its serials changed: the full record is read
                // again next time.
                (Some(a), Some(r)) if a.evicted == r.evicted && a.serial == r.serial => {}
                _ => {
                    s.agents.remove(&key);
                }
            },
        )
        .await
    }

    /// The entries among `ids` parented to `parent`, as signing needs them.
    pub async fn signing_entries(&self, parent: &SpiffeId, ids: &[String]) -> Result<SigningView> {
        let key = parent.to_string();
        let cached = |s: &State| {
            let mine = s.signing.get(&key)?;
            let found: HashMap<String, SigningEntry> = ids
                .iter()
                .filter_map(|id| mine.get(id).map(|e| (id.clone(), e.clone())))
                .collect();
            (!found.is_empty()).then_some(SigningView {
                entries: found,
                from_cache: true,
            })
        };
        let fetch = async {
            let found = self.store.signing_entries(parent, ids).await?;
            Ok(SigningView {
                entries: found.into_iter().map(|e| (e.id.clone(), e)).collect(),
                from_cache: false,
            })
        };
        self.read(cached, fetch, |s, v: &SigningView| {
            let mine = s.signing.entry(key.clone()).or_default();
            // Asked for and not found: gone, or not the caller's.
            for id in ids {
                if !v.entries.contains_key(id) {
                    mine.remove(id);
                }
            }
            mine.extend(v.entries.iter().map(|(k, e)| (k.clone(), e.clone())));
        })
        .await
    }

    /// One entry (None: it does not exist).
    pub async fn get_entry(&self, id: &str) -> Result<Option<Entry>> {
        self.read(
            |s| s.entries.get(id).cloned().map(Some),
            self.store.get_entry(id),
            |s, e| match e {
                Some(e) => {
                    s.entries.insert(id.to_owned(), e.clone());
                }
                None => {
                    s.entries.remove(id);
                }
            },
        )
        .await
    }

    /// Entries under these parents changed.
    pub fn forget_parents(&self, parents: &[String]) {
        let mut s = self.lock();
        s.generation += 1;
        for p in parents {
            s.signing.remove(p);
        }
        s.entries
            .retain(|_, e| !parents.contains(&e.parent_id.to_string()));
    }

    /// Moves on every forget (see [`ReadCache::remember_agent`]).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keeps `a`, read from or written to the database after the cache was
    /// at `generation`, unless something was forgotten since (a change
    /// heard of meanwhile may be newer) or changes are not heard of.
    pub fn remember_agent(&self, a: &AgentRecord, generation: u64) {
        let mut s = self.lock();
        if s.generation == generation && self.following.load(Ordering::Relaxed) {
            s.agents.insert(a.spiffe_id.to_string(), a.clone());
        }
    }

    /// An agent changed. A record that already has the serials the change
    /// stored (this replica made it) is kept; any other is forgotten.
    pub fn forget_agent(&self, id: &str, serials: Option<(String, String)>) {
        let mut s = self.lock();
        let current = match (s.agents.get(id), &serials) {
            (Some(a), Some((serial, new_serial))) => {
                !a.evicted && &a.serial == serial && &a.new_serial == new_serial
            }
            _ => false,
        };
        if !current {
            s.generation += 1;
            s.agents.remove(id);
        }
    }

    /// Changes may have been missed.
    pub fn forget_all(&self) {
        let mut s = self.lock();
        let generation = s.generation + 1;
        *s = State {
            generation,
            ..State::default()
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("read cache lock")
    }

    /// Answers from the cache while the database is down; otherwise asks it,
    /// keeps the answer, and falls back to the cache if it does not answer.
    async fn read<T>(
        &self,
        cached: impl Fn(&State) -> Option<T>,
        fetch: impl std::future::Future<Output = Result<T>>,
        keep: impl FnOnce(&mut State, &T),
    ) -> Result<T> {
        if self.store.down_for().is_some() {
            if !self.serving_from_cache() {
                return Err(StoreError::Unavailable(format!(
                    "down for more than {} s: no longer signing from memory",
                    MAX_STALE.as_secs()
                )));
            }
            if let Some(v) = cached(&self.lock()) {
                self.metrics.cache_read();
                return Ok(v);
            }
        }
        let generation = self.lock().generation;
        match fetch.await {
            Ok(v) => {
                let mut s = self.lock();
                if s.generation == generation && self.following.load(Ordering::Relaxed) {
                    keep(&mut s, &v);
                }
                Ok(v)
            }
            Err(e) if unavailable(&e) && self.serving_from_cache() => match cached(&self.lock()) {
                Some(v) => {
                    self.metrics.cache_read();
                    Ok(v)
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::SqliteStore;

    fn agent(serial: &str, new_serial: &str) -> AgentRecord {
        AgentRecord {
            spiffe_id: SpiffeId::parse("spiffe://td/ward/agent/join_token/a").unwrap(),
            attestation_type: "join_token".into(),
            serial: serial.into(),
            new_serial: new_serial.into(),
            expires_at: 100,
            evicted: false,
            attested_at: 1,
        }
    }

    /// A change notice for an agent keeps the record this replica holds if
    /// it has the serials the change stored (this replica made it), and
    /// forgets it otherwise, or when the notice names no serials (an
    /// eviction).
    #[tokio::test]
    async fn an_agent_notice_forgets_the_record_unless_it_is_the_one_stored() {
        let store: Arc<dyn Datastore> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let cache = ReadCache::new(store, Arc::new(Metrics::default()));
        cache.follow(true);
        let id = "spiffe://td/ward/agent/join_token/a";
        let held = |c: &ReadCache| c.lock().agents.get(id).map(|a| a.serial.clone());
        cache.remember_agent(&agent("b", ""), cache.generation());
        assert_eq!(held(&cache).as_deref(), Some("b"));
        cache.forget_agent(id, Some(("b".into(), "".into())));
        assert_eq!(
            held(&cache).as_deref(),
            Some("b"),
            "the stored record was forgotten"
        );
        cache.forget_agent(id, Some(("c".into(), "".into())));
        assert_eq!(
            held(&cache),
            None,
            "a record older than the change was kept"
        );
        cache.remember_agent(&agent("c", ""), cache.generation());
        cache.forget_agent(id, None);
        assert_eq!(held(&cache), None, "kept through an eviction");
    }
}
