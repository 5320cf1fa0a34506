//! The agent's cache manager: one task that keeps the node SVID renewed, the
//! registration entries in sync, and an SVID for every entry, rotating each at
//! half of its life (±10 %). It publishes the whole state as an immutable
//! [`Snapshot`] on a `watch` channel; the Workload API serves from the latest
//! snapshot and never waits on the CA.
//!
//! When the CA cannot be reached the cache keeps serving what it has (expired
//! SVIDs are never served: readers filter them), retries with back-off, and
//! logs the outage once when it starts and once when it ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::{mpsc, watch, Mutex};
use tokio::time::Instant;
use ward_spec::grpc::DATASTORE_UNAVAILABLE;
use ward_spec::proto::node::v1 as pb;
use ward_spec::proto::types::v1::PolicySet;
use ward_spec::tls::SvidResolver;
use ward_spec::{SpiffeId, TrustBundle, TrustDomain};

use crate::ca_client::{jitter, Backoff, CaClient};
use crate::metrics::Metrics;
use crate::state::{NodeIdentity, StateDir};

/// Signing requests per batch (the CA accepts up to 1000).
const SIGN_BATCH: usize = 500;
/// How long an entry whose signing the CA refused waits before it is asked
/// for again.
const REFUSED_RETRY: Duration = Duration::from_secs(5);

/// A registration entry as the agent keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedEntry {
    pub id: String,
    pub spiffe_id: SpiffeId,
    /// `type:value`, sorted.
    pub selectors: Vec<String>,
    pub hint: String,
    pub revision: u64,
    /// Unix seconds (which of two entries with one hint is served).
    pub created_at: i64,
    /// Trust domains whose bundles its workloads receive besides ours.
    pub federates_with: Vec<TrustDomain>,
}

/// An X509-SVID in the cache.
pub struct CachedSvid {
    pub entry_id: String,
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first, concatenated (the Workload API form).
    pub chain: Vec<u8>,
    /// PKCS#8 DER. Generated here; never leaves the node except to the workload.
    pub key: Vec<u8>,
    pub not_after: i64,
    rotate_at: i64,
    revision: u64,
}

impl CachedSvid {
    pub fn expired(&self, now: i64) -> bool {
        self.not_after <= now
    }
}

/// Everything the Workload API serves, at one moment. The maps are shared
/// with the manager until it changes them (copy on write).
pub struct Snapshot {
    pub entries: Arc<HashMap<String, Arc<CachedEntry>>>,
    pub svids: Arc<HashMap<String, Arc<CachedSvid>>>,
    /// Selector → IDs of the entries that require it: a caller's candidate
    /// entries are found from its few selectors, not by scanning every entry.
    pub by_selector: Arc<HashMap<String, Vec<String>>>,
    /// Whether an entry selects by executable hash (`unix:sha256`): only
    /// then is a caller's executable read and hashed.
    pub hashes_executables: bool,
    pub bundle: Arc<TrustBundle>,
    /// The bundles of the trust domains ours federates with.
    pub federated: Arc<Vec<TrustBundle>>,
}

impl Snapshot {
    /// Our bundle, then the federated ones of the trust domains any of
    /// `entries` (a caller's) federates with, as SPIRE serves them.
    pub fn bundles_for<'a>(
        &'a self,
        entries: &'a [Arc<CachedEntry>],
    ) -> impl Iterator<Item = &'a TrustBundle> + 'a {
        std::iter::once(self.bundle.as_ref()).chain(self.federated.iter().filter(|b| {
            entries
                .iter()
                .any(|e| e.federates_with.contains(&b.trust_domain))
        }))
    }

    /// Entries whose selectors are all among the caller's (sorted `selectors`), in ID order.
    pub fn matching(&self, selectors: &[String]) -> Vec<Arc<CachedEntry>> {
        let mut ids: Vec<&String> = selectors
            .iter()
            .filter_map(|s| self.by_selector.get(s))
            .flatten()
            .collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| self.entries.get(id))
            .filter(|e| crate::attestor::matches(&e.selectors, selectors))
            .cloned()
            .collect()
    }
}

pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn unix_now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// When to rotate something received at `from` and valid until `na` (Unix
/// seconds): at half of that life, ±10 %, in Unix milliseconds. Measured from
/// receipt, not `notBefore`, which the CA backdates for clock skew.
fn rotation_point_ms(from: i64, na: i64) -> i64 {
    let life_ms = ((na - from).max(1) * 1000) as u64;
    let half = jitter(Duration::from_millis(life_ms / 2), 0.1);
    from * 1000 + half.as_millis() as i64
}

pub struct Manager {
    pub ca: Arc<Mutex<CaClient>>,
    pub state: StateDir,
    pub node: NodeIdentity,
    pub resolver: SvidResolver,
    pub sync_interval: Duration,
    pub metrics: Arc<Metrics>,
    entries: Arc<HashMap<String, Arc<CachedEntry>>>,
    svids: Arc<HashMap<String, Arc<CachedSvid>>>,
    by_selector: Arc<HashMap<String, Vec<String>>>,
    hashes_executables: bool,
    /// Entries changed since the selector index was built.
    entries_changed: bool,
    bundle: Arc<TrustBundle>,
    federated: Arc<Vec<TrustBundle>>,
    /// Where the entry sync stands: every change up to `revision` is in
    /// hand, and of `revision` itself those up to entry `sync_after` if set
    /// (a page ended inside it).
    revision: u64,
    sync_after: String,
    node_renew_at: i64,
    ca_up: bool,
    backoff: Backoff,
    retry_at: Option<Instant>,
    /// Renewal and sync failed while signing worked: they wait until then,
    /// backing off on their own.
    deferred_until: Option<Instant>,
    deferred_backoff: Backoff,
    /// Entries whose signing the CA refused: not asked for again before then
    /// (Unix milliseconds). Otherwise an SVID past its rotation point would
    /// be asked for on every pass of the loop, a hundred times a second.
    refused_until: HashMap<String, i64>,
    /// The cache changed since the last published snapshot.
    dirty: bool,
    /// Entries have been synced from the CA since the process started.
    /// Until then nothing is published: a caller is told the agent is not
    /// ready (`Unavailable`, and `/readyz` 503), not that no entry names it,
    /// which an empty cache would say while the CA is out of reach.
    synced: bool,
    published: watch::Sender<Option<Arc<Snapshot>>>,
    /// The policy set from the CA, for proxies (through [`crate::policy_api`]).
    policy: watch::Sender<Option<Arc<PolicySet>>>,
}

impl Manager {
    pub fn new(
        ca: Arc<Mutex<CaClient>>,
        state: StateDir,
        node: NodeIdentity,
        resolver: SvidResolver,
        bundle: TrustBundle,
        sync_interval: Duration,
        metrics: Arc<Metrics>,
    ) -> (Self, watch::Receiver<Option<Arc<Snapshot>>>) {
        let (published, rx) = watch::channel(None);
        // The last set received, until the CA says otherwise.
        let stored = state.load_policy().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring the stored policy set");
            None
        });
        let (policy, _) = watch::channel(stored.map(Arc::new));
        let federated = state.load_federated().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring the stored federated bundles");
            Vec::new()
        });
        let node_renew_at = rotation_point_ms(node.not_before, node.not_after);
        (
            Manager {
                ca,
                state,
                node,
                resolver,
                sync_interval,
                metrics,
                entries: Arc::default(),
                svids: Arc::default(),
                by_selector: Arc::default(),
                hashes_executables: false,
                entries_changed: true,
                bundle: Arc::new(bundle),
                federated: Arc::new(federated),
                revision: 0,
                sync_after: String::new(),
                node_renew_at,
                ca_up: true,
                backoff: Backoff::default(),
                retry_at: None,
                deferred_until: None,
                deferred_backoff: Backoff::default(),
                refused_until: HashMap::new(),
                dirty: true,
                synced: false,
                published,
                policy,
            },
            rx,
        )
    }

    /// The policy set from the CA: the stored one first, then each new one.
    pub fn policy(&self) -> watch::Receiver<Option<Arc<PolicySet>>> {
        self.policy.subscribe()
    }

    /// Runs until the process ends. `notices` wakes it when the CA pushes a change.
    pub async fn run(mut self, mut notices: mpsc::Receiver<()>) {
        let mut next_sync = Instant::now();
        loop {
            let now_ms = unix_now_ms();
            let backing_off = self.retry_at.is_some_and(|t| Instant::now() < t);
            let deferred = self.deferred_until.is_some_and(|t| Instant::now() < t);
            if !backing_off {
                let mut ok = true;
                if !deferred {
                    if now_ms >= self.node_renew_at {
                        let r = self.renew_node().await;
                        ok &= self.outcome("renew", r);
                    }
                    if ok && Instant::now() >= next_sync {
                        let r = self.sync().await;
                        ok &= self.outcome("sync", r);
                        if ok {
                            next_sync = Instant::now() + self.sync_interval;
                            self.synced = true;
                        }
                    }
                }
                // Signing writes nothing at the CA: try it even when renewal or
                // sync failed (a CA whose database is down still signs for the
                // entries it knows), unless no CA could be reached at all.
                let signed = if ok || !self.ca.lock().await.unreachable() {
                    let r = self.sign_due().await;
                    self.outcome("sign", r)
                } else {
                    false
                };
                match (ok, signed) {
                    (true, true) if !deferred => {
                        self.retry_at = None;
                        self.deferred_until = None;
                        self.backoff.reset();
                        self.deferred_backoff.reset();
                    }
                    (true, true) => {
                        self.retry_at = None;
                        self.backoff.reset();
                    }
                    // Only renewal or sync failed: rotation keeps its schedule,
                    // they are retried with back-off.
                    (false, true) => {
                        self.retry_at = None;
                        self.backoff.reset();
                        self.deferred_until =
                            Some(Instant::now() + self.deferred_backoff.next_delay());
                    }
                    (_, false) => {
                        self.retry_at = Some(Instant::now() + self.backoff.next_delay());
                    }
                }
            }
            self.drop_expired();
            self.publish();

            let wake = self.next_wake(next_sync);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                n = notices.recv() => {
                    if n.is_some() {
                        next_sync = Instant::now();
                        // A push is fresh news: try now even if backing off.
                        self.retry_at = None;
                        self.deferred_until = None;
                    }
                }
            }
        }
    }

    /// Records the CA's reachability; logs only when it changes.
    fn outcome(&mut self, what: &'static str, r: Result<(), String>) -> bool {
        match r {
            Ok(()) => {
                if !self.ca_up {
                    tracing::info!("CA reachable again; resuming rotation");
                    self.ca_up = true;
                }
                true
            }
            Err(e) => {
                self.metrics.ca_error(what);
                if self.ca_up && e.starts_with(REFUSED) {
                    tracing::error!(error = %e, what, "the CA refuses this agent; serving cached SVIDs until they expire, and retrying with back-off (an evicted agent needs a new join token)");
                    self.ca_up = false;
                } else if self.ca_up {
                    tracing::warn!(error = %e, "CA unreachable; serving cached SVIDs and retrying with back-off");
                    self.ca_up = false;
                } else {
                    tracing::debug!(error = %e, what, "CA still unreachable or refusing");
                }
                false
            }
        }
    }

    fn next_wake(&self, next_sync: Instant) -> Instant {
        let now_ms = unix_now_ms();
        let at = |ms: i64| Instant::now() + Duration::from_millis((ms - now_ms).max(0) as u64);
        let mut wake = match self.retry_at {
            Some(retry) if retry > Instant::now() => retry,
            _ => {
                // An SVID is due at its rotation point, or once the CA's
                // refusal has waited long enough; an entry without one, at
                // the latter.
                let rotate = self
                    .svids
                    .iter()
                    .map(|(id, s)| s.rotate_at.max(*self.refused_until.get(id).unwrap_or(&0)))
                    .chain(
                        self.refused_until
                            .iter()
                            .filter(|(id, _)| !self.svids.contains_key(*id))
                            .map(|(_, t)| *t),
                    )
                    .min()
                    .map(at);
                // Renewal and sync wait while deferred; rotation never does.
                let other = match self.deferred_until {
                    Some(d) if d > Instant::now() => d,
                    _ => next_sync.min(at(self.node_renew_at)),
                };
                rotate.map_or(other, |r| r.min(other))
            }
        };
        // Never sleep past an SVID's expiry, so it leaves the snapshot on time.
        if let Some(exp) = self.svids.values().map(|s| s.not_after).min() {
            wake = wake.min(at(exp * 1000));
        }
        wake.max(Instant::now() + Duration::from_millis(10))
    }

    async fn client(
        &self,
    ) -> Result<
        ward_spec::proto::node::v1::node_client::NodeClient<tonic::transport::Channel>,
        String,
    > {
        self.ca.lock().await.get().await
    }

    /// Fails over to the next CA after a call that another CA might answer.
    /// A CA whose database is down still signs from memory, so a failed
    /// renewal or sync there is no reason to leave it, unless `leave` (a
    /// failed signing, an urgent renewal).
    async fn call_failed(&self, e: tonic::Status, leave: bool) -> String {
        let datastore_down = e.metadata().contains_key(DATASTORE_UNAVAILABLE);
        if matches!(
            e.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
        ) && (leave || !datastore_down)
        {
            self.ca.lock().await.failed();
        }
        let refused = matches!(
            e.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        );
        format!(
            "{}{}: {}",
            if refused { REFUSED } else { "" },
            e.code(),
            e.message()
        )
    }

    async fn renew_node(&mut self) -> Result<(), String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let csr = csr_for(&key, &self.node.spiffe_id)?;
        let mut c = self.client().await?;
        let chain = match c.renew_node_svid(pb::RenewNodeSvidRequest { csr }).await {
            Ok(r) => r.into_inner().svid_chain,
            Err(e) => {
                // Past three quarters of its life, the node SVID is renewed
                // wherever possible, even away from a CA that still signs.
                let urgent = unix_now()
                    >= self.node.not_before + (self.node.not_after - self.node.not_before) * 3 / 4;
                return Err(self.call_failed(e, urgent).await);
            }
        };
        let node = NodeIdentity::from_parts(chain, key.serialized_der().to_vec())?;
        self.state.save_identity(&node).map_err(|e| e.to_string())?;
        self.resolver
            .set(&node.chain, &node.key)
            .map_err(|e| e.to_string())?;
        self.node_renew_at = rotation_point_ms(unix_now(), node.not_after);
        self.ca.lock().await.reconnect();
        tracing::info!(spiffe_id = %node.spiffe_id, expires_at = node.not_after, "renewed the node SVID");
        self.node = node;
        Ok(())
    }

    /// Drops an entry the CA no longer gives this agent, and its SVID.
    fn forget_entry(&mut self, id: &str) {
        Arc::make_mut(&mut self.entries).remove(id);
        Arc::make_mut(&mut self.svids).remove(id);
        self.dirty = true;
        self.entries_changed = true;
    }

    async fn sync(&mut self) -> Result<(), String> {
        let mut c = self.client().await?;
        let mut relisted: Option<Relisting> = None;
        loop {
            let page = match c
                .sync_entries(pb::SyncEntriesRequest {
                    since_revision: self.revision,
                    after_entry_id: self.sync_after.clone(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    if let Some(r) = relisted {
                        (self.revision, self.sync_after) = r.from;
                    }
                    return Err(self.call_failed(e, false).await);
                }
            };
            if page.restart && relisted.is_none() {
                tracing::info!(
                    revision = self.revision,
                    "the CA no longer holds every deletion since this agent's last sync; syncing every entry again"
                );
                relisted = Some(Relisting {
                    seen: Default::default(),
                    from: (self.revision, std::mem::take(&mut self.sync_after)),
                });
                self.revision = 0;
                continue;
            }
            for e in page.entries {
                if let Some(r) = relisted.as_mut() {
                    r.seen.insert(e.id.clone());
                }
                match to_cached(e) {
                    Ok(e) => {
                        // A changed entry is asked for at once, refused or not.
                        self.refused_until.remove(&e.id);
                        Arc::make_mut(&mut self.entries).insert(e.id.clone(), Arc::new(e));
                        self.dirty = true;
                        self.entries_changed = true;
                    }
                    Err(err) => tracing::warn!(error = %err, "ignoring an entry the CA sent"),
                }
            }
            for id in page.deleted_entry_ids {
                self.forget_entry(&id);
            }
            self.revision = page.revision;
            self.sync_after = page.after_entry_id;
            if !page.more {
                break;
            }
        }
        if let Some(r) = relisted {
            let gone: Vec<String> = self
                .entries
                .keys()
                .filter(|id| !r.seen.contains(*id))
                .cloned()
                .collect();
            for id in &gone {
                self.forget_entry(id);
            }
            tracing::info!(
                entries = self.entries.len(),
                dropped = gone.len(),
                "synced every entry again"
            );
        }
        let b = match c.fetch_bundle(pb::FetchBundleRequest {}).await {
            Ok(r) => r.into_inner(),
            Err(e) => return Err(self.call_failed(e, false).await),
        };
        if b.sequence != self.bundle.sequence {
            let bundle = TrustBundle::from_jwks(self.bundle.trust_domain.clone(), &b.jwks)
                .map_err(|e| format!("CA sent a bad bundle: {e}"))?;
            self.ca
                .lock()
                .await
                .roots()
                .update(&bundle)
                .map_err(|e| e.to_string())?;
            self.state.save_bundle(&bundle).map_err(|e| e.to_string())?;
            tracing::info!(sequence = bundle.sequence, "trust bundle updated");
            self.bundle = Arc::new(bundle);
            self.dirty = true;
        }
        let (federated, errors) = crate::state::federated_from_pb(&b.federated);
        for e in errors {
            tracing::warn!(error = %e, "ignoring a federated bundle from the CA");
        }
        if federated != *self.federated {
            self.state
                .save_federated(&federated)
                .map_err(|e| e.to_string())?;
            let tds: Vec<String> = federated
                .iter()
                .map(|b| b.trust_domain.to_string())
                .collect();
            tracing::info!(trust_domains = ?tds, "federated bundles updated");
            self.federated = Arc::new(federated);
            self.dirty = true;
        }
        self.sync_policy(&mut c).await
    }

    /// Fetches the active policy set if the CA has a newer one than ours,
    /// stores it (so a restart with the CA down still has it) and publishes it.
    async fn sync_policy(
        &mut self,
        c: &mut ward_spec::proto::node::v1::node_client::NodeClient<tonic::transport::Channel>,
    ) -> Result<(), String> {
        let known = self.policy.borrow().as_ref().map_or(0, |p| p.version);
        let resp = match c
            .fetch_policy(pb::FetchPolicyRequest {
                known_version: known,
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => return Err(self.call_failed(e, false).await),
        };
        if let Some(set) = resp.policy_set.filter(|p| p.version != known) {
            if let Err(e) = self.state.save_policy(&set) {
                tracing::warn!(error = %e, "cannot store the policy set; serving it from memory");
            }
            tracing::info!(version = set.version, digest = %set.digest, files = set.files.len(), "policy set received from the CA");
            self.policy.send_replace(Some(Arc::new(set)));
        }
        Ok(())
    }

    /// Signs SVIDs for entries that have none, changed, or reached their rotation point.
    async fn sign_due(&mut self) -> Result<(), String> {
        let now_ms = unix_now_ms();
        let due: Vec<Arc<CachedEntry>> = self
            .entries
            .values()
            .filter(|e| self.refused_until.get(&e.id).is_none_or(|t| now_ms >= *t))
            .filter(|e| match self.svids.get(&e.id) {
                None => true,
                Some(s) => s.revision != e.revision || now_ms >= s.rotate_at,
            })
            .cloned()
            .collect();
        for batch in due.chunks(SIGN_BATCH) {
            // Key generation is CPU work: keep it off the threads that answer workloads.
            let wanted: Vec<(String, SpiffeId)> = batch
                .iter()
                .map(|e| (e.id.clone(), e.spiffe_id.clone()))
                .collect();
            let (keys, requests) = tokio::task::spawn_blocking(move || {
                let mut keys = Vec::with_capacity(wanted.len());
                let mut requests = Vec::with_capacity(wanted.len());
                for (entry_id, id) in wanted {
                    let key = KeyPair::generate().map_err(|e| e.to_string())?;
                    requests.push(pb::SignX509SvidRequest {
                        entry_id,
                        csr: csr_for(&key, &id)?,
                    });
                    keys.push(key);
                }
                Ok::<_, String>((keys, requests))
            })
            .await
            .map_err(|e| e.to_string())??;
            let mut c = self.client().await?;
            let results = match c
                .batch_sign_x509_svid(pb::BatchSignX509SvidRequest { requests })
                .await
            {
                Ok(r) => r.into_inner().results,
                Err(e) => return Err(self.call_failed(e, true).await),
            };
            let mut unavailable = None;
            for ((entry, key), r) in batch.iter().zip(keys).zip(results) {
                if r.code != 0 {
                    tracing::warn!(entry_id = %entry.id, code = r.code, message = %r.message, "CA refused to sign");
                    self.refused_until.insert(
                        entry.id.clone(),
                        unix_now_ms() + REFUSED_RETRY.as_millis() as i64,
                    );
                    if r.code == tonic::Code::Unavailable as i32 {
                        unavailable = Some(r.message);
                    }
                    continue;
                }
                self.refused_until.remove(&entry.id);
                let Some(leaf) = r.svid_chain.first() else {
                    continue;
                };
                let (_, na) = ward_spec::svid::validity(leaf).map_err(|e| e.to_string())?;
                let rotated = self.svids.contains_key(&entry.id);
                self.dirty = true;
                Arc::make_mut(&mut self.svids).insert(
                    entry.id.clone(),
                    Arc::new(CachedSvid {
                        entry_id: entry.id.clone(),
                        spiffe_id: entry.spiffe_id.clone(),
                        chain: r.svid_chain.concat(),
                        key: key.serialized_der().to_vec(),
                        not_after: na,
                        rotate_at: rotation_point_ms(unix_now(), na),
                        revision: entry.revision,
                    }),
                );
                if rotated {
                    self.metrics.rotations.inc();
                }
            }
            // A replica that cannot sign (its datastore is down) is left for
            // another, as when a whole call fails.
            if let Some(message) = unavailable {
                self.call_failed(tonic::Status::unavailable(message), true)
                    .await;
            }
        }
        Ok(())
    }

    fn drop_expired(&mut self) {
        let now = unix_now();
        let entries = &self.entries;
        let stale = |id: &String, s: &Arc<CachedSvid>| s.expired(now) || !entries.contains_key(id);
        self.refused_until.retain(|id, _| entries.contains_key(id));
        if self.svids.iter().any(|(id, s)| stale(id, s)) {
            Arc::make_mut(&mut self.svids).retain(|id, s| !stale(id, s));
            self.dirty = true;
        }
    }

    /// Publishes a new snapshot if anything changed since the last one.
    fn publish(&mut self) {
        if !self.dirty || !self.synced {
            return;
        }
        self.dirty = false;
        if self.entries_changed {
            let mut index: HashMap<String, Vec<String>> = HashMap::new();
            for e in self.entries.values() {
                for sel in &e.selectors {
                    index.entry(sel.clone()).or_default().push(e.id.clone());
                }
            }
            self.hashes_executables = index
                .keys()
                .any(|s| s.starts_with(crate::attestor::EXE_HASH_SELECTOR));
            self.by_selector = Arc::new(index);
            self.entries_changed = false;
        }
        self.metrics.cached_svids.set(self.svids.len() as i64);
        self.published.send_replace(Some(Arc::new(Snapshot {
            entries: self.entries.clone(),
            svids: self.svids.clone(),
            by_selector: self.by_selector.clone(),
            hashes_executables: self.hashes_executables,
            bundle: self.bundle.clone(),
            federated: self.federated.clone(),
        })));
    }
}

fn to_cached(e: ward_spec::proto::types::v1::Entry) -> Result<CachedEntry, String> {
    let spiffe_id =
        SpiffeId::parse(&e.spiffe_id).map_err(|err| format!("entry {}: {err}", e.id))?;
    let mut selectors: Vec<String> = e
        .selectors
        .iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    selectors.sort();
    let federates_with = e
        .federates_with
        .iter()
        .map(|t| {
            TrustDomain::new(t)
                .map_err(|err| format!("entry {}: federates_with {t:?}: {err}", e.id))
        })
        .collect::<Result<_, _>>()?;
    Ok(CachedEntry {
        id: e.id,
        spiffe_id,
        selectors,
        hint: e.hint,
        revision: e.revision,
        created_at: e.created_at,
        federates_with,
    })
}

/// A CSR for `id` with `key` (the CA uses only the key and checks the ID).
pub fn csr_for(key: &KeyPair, id: &SpiffeId) -> Result<Vec<u8>, String> {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(
        id.to_string()
            .try_into()
            .map_err(|e: rcgen::Error| e.to_string())?,
    )];
    Ok(p.serialize_request(key)
        .map_err(|e| e.to_string())?
        .der()
        .to_vec())
}

/// How an error the CA refused the agent with begins (as `call_failed`
/// words it): the agent is evicted, unknown, or its node SVID superseded or
/// expired, not the CA away.
const REFUSED: &str = "refused by the CA: ";

/// Keeps a change stream open to the CA and forwards a wake-up per notice.
pub async fn watch_notices(ca: Arc<Mutex<CaClient>>, out: mpsc::Sender<()>) {
    let mut backoff = Backoff::default();
    loop {
        let client = ca.lock().await.get().await;
        if let Ok(mut c) = client {
            if let Ok(resp) = c.watch_changes(pb::WatchChangesRequest {}).await {
                backoff.reset();
                let mut stream = resp.into_inner();
                while let Ok(Some(_notice)) = stream.message().await {
                    if out.try_send(()).is_err() && out.is_closed() {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// A sync of every entry again from revision 0, made when the CA no longer
/// holds all the deletions since the agent's revision.
struct Relisting {
    /// The entries it returned; the others are dropped at its end.
    seen: std::collections::HashSet<String>,
    /// Where the sync stood before (revision, entry): gone back to if it is
    /// cut short, so the next sync starts it again.
    from: (u64, String),
}
