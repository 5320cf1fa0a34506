//! What the CA does, independent of transport: attestation, renewal, entry
//! administration, and signing. The gRPC layers (`node_api`, `admin_api`) only
//! translate to and from these calls.
//!
//! Every decision that grants or refuses an identity writes one audit line
//! (tracing target `audit`).

use std::sync::Arc;
use std::time::Duration;

use ring::digest;
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::Code;
use ward_spec::{Selector, SpiffeId, TrustBundle, TrustDomain};

use crate::authority::Authority;
use ward_authz::{AdminAction, AdminPrincipal, AdminResource};

use crate::datastore::{
    AgentRecord, BundleDeleteMode, Datastore, Entry, EntryFilter, FederatedBundleRecord,
    JoinTokenRecord, PolicySetRecord, SigningEntry, StoreChange, StoreError, SyncPage, TokenUse,
};
use crate::metrics::Metrics;
use crate::policies::{self, AdminPolicy};
use crate::read_cache::ReadCache;
use crate::x509::{self, check_csr, CsrError};

/// A refusal or failure, with the gRPC code the APIs report it as.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CaError {
    pub code: Code,
    pub message: String,
    /// The database did not answer (the CA still signs for what it knows).
    pub datastore_down: bool,
}

impl CaError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        CaError {
            code,
            message: message.into(),
            datastore_down: false,
        }
    }
    fn invalid(m: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, m)
    }
    fn denied(m: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, m)
    }
}

impl From<StoreError> for CaError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => CaError::new(Code::NotFound, format!("not found: {m}")),
            StoreError::Conflict(m) => CaError::new(Code::AlreadyExists, m),
            StoreError::InUse(m) => CaError::new(Code::FailedPrecondition, m),
            StoreError::Stale(m) => CaError::new(Code::Aborted, m),
            // Logged once per outage by the read cache.
            other if crate::datastore::unavailable(&other) => {
                tracing::debug!(error = %other, "datastore unavailable");
                CaError {
                    datastore_down: true,
                    ..CaError::new(Code::Unavailable, "datastore unavailable")
                }
            }
            // Two writers raced for one key (two replicas numbering a
            // policy set, say): the caller may retry.
            StoreError::Db(sqlx::Error::Database(d)) if d.is_unique_violation() => CaError::new(
                Code::Aborted,
                format!("a concurrent change won: {}", d.message()),
            ),
            other => {
                tracing::error!(error = %other, "datastore failure");
                CaError::new(Code::Internal, "datastore failure (logged by the CA)")
            }
        }
    }
}

impl From<CsrError> for CaError {
    fn from(e: CsrError) -> Self {
        match e {
            CsrError::ForeignTrustDomain { .. } => CaError::denied(e.to_string()),
            _ => CaError::invalid(e.to_string()),
        }
    }
}

impl From<CaError> for tonic::Status {
    fn from(e: CaError) -> Self {
        let mut status = tonic::Status::new(e.code, e.message);
        if e.datastore_down {
            status.metadata_mut().insert(
                ward_spec::grpc::DATASTORE_UNAVAILABLE,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        status
    }
}

pub type CaResult<T> = Result<T, CaError>;

/// TTLs the CA applies.
#[derive(Debug, Clone)]
pub struct Ttls {
    pub x509_svid: Duration,
    pub jwt_svid: Duration,
    pub node_svid: Duration,
    pub join_token: Duration,
}

/// The node SVID a caller presented on its TLS connection.
#[derive(Debug, Clone, Default)]
pub struct NodeSvid {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// `new_serial` of agents attested before serials were tracked: the first
/// node SVID such an agent presents becomes its current one (the CA then
/// stored the newest serial it issued, whose answer may have been lost).
const ANY_SERIAL: &str = "*";

/// An issued X509-SVID.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub spiffe_id: SpiffeId,
    /// DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub expires_at: i64,
    pub serial: String,
}

pub struct Ca {
    pub authority: Arc<Authority>,
    pub store: Arc<dyn Datastore>,
    pub ttls: Ttls,
    pub metrics: Arc<Metrics>,
    /// What signing reads, kept for when the database does not answer.
    reads: ReadCache,
    /// What agents watch: the newest entry revision, bundle sequence and
    /// policy set version.
    notices: watch::Sender<Notice>,
    /// Which agents' entries changed, change by change (see [`EntryChange`]).
    entry_changes: tokio::sync::broadcast::Sender<EntryChange>,
    /// Agents whose record changed (evicted, renewed), by SPIFFE ID, here
    /// or at another replica.
    agent_changes: tokio::sync::broadcast::Sender<String>,
    /// (revision, parent) pairs already announced (a replica hears its own
    /// writes again through the database, perhaps in several notices).
    announced: std::sync::Mutex<Announced>,
    /// Decides admin calls by the active policy set.
    admin_policy: AdminPolicy,
    /// The bundles of the trust domains we federate with, by trust domain.
    federated: std::sync::RwLock<Arc<Vec<TrustBundle>>>,
    /// The same, with their bundle endpoints.
    federations: std::sync::RwLock<Arc<Vec<Federation>>>,
    federation_reload: tokio::sync::Mutex<()>,
    /// One policy push or rollback at a time, so versions and the installed
    /// set move together.
    policy_writes: tokio::sync::Mutex<()>,
}

/// Entries under these parents changed (None: any agent may be concerned,
/// e.g. after notices were missed).
#[derive(Debug, Clone)]
pub struct EntryChange {
    pub revision: u64,
    pub parents: Option<Arc<Vec<String>>>,
}

/// The state agents follow; a change to any field is news.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notice {
    pub entry_revision: u64,
    pub bundle_sequence: u64,
    pub policy_version: u64,
    /// Moves on every change of the federated bundles.
    pub federation_version: u64,
}

/// What an entry call adds: trust domains to its federation, DNS names to
/// its SVIDs (policies see both in `context`).
#[derive(Clone, Copy, Default)]
struct Added<'a> {
    federation: &'a [TrustDomain],
    dns_names: &'a [String],
    /// The call marks the entry admin (it was not, or had another ID).
    admin: bool,
}

/// At most this many selectors, DNS names, or federated trust domains per
/// entry, and this many bytes in a selector or the hint: an entry stays
/// under about 50 KiB, a sync page of 1,000 under the 64 MiB agents read.
pub const MAX_ENTRY_LIST: usize = 32;
pub const MAX_ENTRY_TEXT: usize = 1024;

/// The path agents attested by join token get: `/ward/agent/join_token/<id>`.
pub const JOIN_TOKEN_ATTESTOR: &str = "join_token";

/// A trust domain we federate with: its bundle, and its bundle endpoint
/// (empty URL: the bundle is only set by hand).
#[derive(Debug, Clone)]
pub struct Federation {
    pub bundle: TrustBundle,
    pub endpoint_url: String,
    pub endpoint_spiffe_id: String,
    /// The record as stored (a refresh replaces only this).
    pub stored: FederatedBundleRecord,
}

/// The stored federations; one whose bundle does not parse is left out, logged.
async fn load_federated(store: &dyn Datastore) -> CaResult<Vec<Federation>> {
    let mut out = Vec::new();
    for r in store.list_federated_bundles().await? {
        let parsed = TrustDomain::new(&r.trust_domain)
            .map_err(|e| e.to_string())
            .and_then(|t| TrustBundle::from_jwks(t, &r.jwks).map_err(|e| e.to_string()));
        match parsed {
            Ok(bundle) => out.push(Federation {
                bundle,
                endpoint_url: r.endpoint_url.clone(),
                endpoint_spiffe_id: r.endpoint_spiffe_id.clone(),
                stored: r,
            }),
            Err(e) => {
                tracing::error!(trust_domain = r.trust_domain, error = %e, "ignoring a stored federated bundle")
            }
        }
    }
    Ok(out)
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn hash_token(token: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, token.as_bytes()))
}

/// New-entry input, before the store assigns id and revision.
#[derive(Debug, Clone)]
pub struct EntrySpec {
    pub id: Option<String>,
    pub spiffe_id: String,
    pub parent_id: String,
    pub selectors: Vec<String>,
    pub x509_ttl: i64,
    pub jwt_ttl: i64,
    pub dns_names: Vec<String>,
    pub hint: String,
    pub admin: bool,
    /// Trust domains (`name` or `spiffe://name`) whose bundles its workloads receive.
    pub federates_with: Vec<String>,
}

impl Ca {
    pub async fn new(
        authority: Arc<Authority>,
        store: Arc<dyn Datastore>,
        ttls: Ttls,
        template: ward_authz::IdTemplate,
        metrics: Arc<Metrics>,
    ) -> CaResult<Self> {
        let revision = store.entry_revision().await?;
        let active = store.get_policy_set(None).await?;
        let (notices, _) = watch::channel(Notice {
            entry_revision: revision,
            bundle_sequence: authority.bundle().sequence,
            policy_version: active.as_ref().map_or(0, |p| p.version),
            federation_version: 0,
        });
        let federations = load_federated(store.as_ref()).await?;
        let federated = federations.iter().map(|f| f.bundle.clone()).collect();
        Ok(Ca {
            admin_policy: AdminPolicy::new(active.as_ref(), template),
            reads: ReadCache::new(store.clone(), metrics.clone()),
            federated: std::sync::RwLock::new(Arc::new(federated)),
            federations: std::sync::RwLock::new(Arc::new(federations)),
            federation_reload: tokio::sync::Mutex::new(()),
            authority,
            store,
            ttls,
            metrics,
            notices,
            entry_changes: tokio::sync::broadcast::channel(4096).0,
            agent_changes: tokio::sync::broadcast::channel(256).0,
            announced: Default::default(),
            policy_writes: tokio::sync::Mutex::new(()),
        })
    }

    /// Follows what other replicas commit to a shared database: their entry
    /// changes reach this replica's agents, and their policy sets decide this
    /// replica's admin calls and reach its agents, as if made here.
    pub fn follow_store(self: &Arc<Self>) {
        let Some(mut changes) = self.store.changes() else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let change = match changes.recv().await {
                    Ok(c) => c,
                    Err(RecvError::Lagged(_)) => StoreChange::Resync,
                    Err(RecvError::Closed) => return,
                };
                // A change that cannot be applied now (the database does not
                // answer) is tried again until it can; later ones wait (and
                // if too many pile up, a resync replaces them).
                let mut logged = false;
                loop {
                    let Some(ca) = weak.upgrade() else { return };
                    match ca.apply(change.clone()).await {
                        Ok(()) => break,
                        Err(e) if !logged => {
                            tracing::warn!(error = %e, ?change, "cannot follow a change made by another replica yet; retrying");
                            logged = true;
                        }
                        Err(_) => {}
                    }
                    drop(ca);
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        });
    }

    async fn apply(&self, change: StoreChange) -> CaResult<()> {
        match change {
            StoreChange::Entries(rev, parents) => self.entries_changed(rev, Some(parents)),
            StoreChange::Agent(id, serials) => {
                self.reads.forget_agent(&id, serials);
                let _ = self.agent_changes.send(id);
            }
            StoreChange::Federation => self.reload_federation().await?,
            StoreChange::Bundle(_) => self.follow_bundle().await?,
            StoreChange::Lost => {
                // Changes may go unheard until notices resume: what signing
                // reads is no longer kept. What is kept already stays only if
                // the database is down too (then nothing can change in it).
                self.reads.follow(false);
                if self.store.ping().await.is_ok() {
                    self.reads.forget_all();
                }
            }
            StoreChange::Policy(v) if v <= self.policy_version() => {}
            StoreChange::Policy(_) | StoreChange::Resync => {
                if change == StoreChange::Resync {
                    self.reads.forget_all();
                    self.reads.follow(true);
                    self.reload_federation().await?;
                    self.follow_bundle().await?;
                }
                self.entries_changed(self.store.entry_revision().await?, None);
                if let Some(set) = self.store.get_policy_set(None).await? {
                    // Checked and installed as a push installs: a newer set
                    // installed meanwhile is never replaced by this one.
                    let _one = self.policy_writes.lock().await;
                    if set.version > self.policy_version() {
                        match self.admin_policy.validate(&set.files) {
                            Ok(c) => self.admin_policy.install(c),
                            Err(errors) => {
                                tracing::error!(version = set.version, errors = %policies::joined(&errors), "a policy set stored by another replica does not validate here; admin calls keep the previous set")
                            }
                        }
                        self.policy_changed(set.version);
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes the bundle another replica published, if it is newer.
    async fn follow_bundle(&self) -> CaResult<()> {
        let newer = self
            .authority
            .follow_bundle()
            .await
            .map_err(|e| CaError::new(Code::Unavailable, format!("bundle: {e}")))?;
        if newer {
            self.bundle_changed();
        }
        Ok(())
    }

    /// Changes to entries, the bundle or the policy set: the current state
    /// first, then each change.
    pub fn watch_changes(&self) -> watch::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Entry changes, one by one, with the agents they concern.
    pub fn entry_changes(&self) -> tokio::sync::broadcast::Receiver<EntryChange> {
        self.entry_changes.subscribe()
    }

    /// The SPIFFE IDs of agents whose record changes, one by one.
    pub fn agent_changes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.agent_changes.subscribe()
    }

    /// Whether `id` is no longer an agent in good standing: evicted, or
    /// unknown. (A renewal, which supersedes the node SVID the caller
    /// presented earlier, is not a loss of standing.)
    pub async fn agent_gone(&self, id: &SpiffeId) -> CaResult<bool> {
        Ok(self
            .reads
            .agent_standing(id)
            .await?
            .is_none_or(|s| s.evicted))
    }

    fn entries_changed(&self, revision: u64, parents: Option<Vec<String>>) {
        if let Some(p) = &parents {
            self.reads.forget_parents(p);
        }
        // Only the parents not yet told of this revision.
        let parents = match parents {
            None => Some(None),
            Some(p) => {
                let fresh = self
                    .announced
                    .lock()
                    .expect("announced lock")
                    .fresh(revision, p);
                (!fresh.is_empty()).then(|| Some(Arc::new(fresh)))
            }
        };
        if let Some(parents) = parents {
            let _ = self.entry_changes.send(EntryChange { revision, parents });
        }
        self.notices.send_if_modified(|n| {
            let newer = revision > n.entry_revision;
            n.entry_revision = n.entry_revision.max(revision);
            newer
        });
    }

    /// Tells watchers about the current bundle sequence (after a rotation).
    pub fn bundle_changed(&self) {
        let seq = self.authority.bundle().sequence;
        self.notices.send_if_modified(|n| {
            let newer = seq != n.bundle_sequence;
            n.bundle_sequence = seq;
            newer
        });
    }

    fn policy_changed(&self, version: u64) {
        self.notices.send_if_modified(|n| {
            let newer = version > n.policy_version;
            n.policy_version = n.policy_version.max(version);
            newer
        });
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.authority.trust_domain()
    }

    /// The CA's own SPIFFE ID, presented on the node API.
    pub fn server_id(&self) -> SpiffeId {
        self.trust_domain()
            .id("/ward/ca")
            .expect("constant path is valid")
    }

    // ----- join tokens and node attestation -----

    pub async fn create_join_token(
        &self,
        caller: &AdminPrincipal,
        ttl: Option<Duration>,
        tenant: &str,
    ) -> CaResult<(String, SpiffeId, i64)> {
        let resource = AdminResource {
            tenant: tenant.to_owned(),
            id: "new".to_owned(),
            ..Default::default()
        };
        self.authorize_admin(caller, AdminAction::CreateJoinToken, &resource)?;
        let ttl = ttl.unwrap_or(self.ttls.join_token);
        let token = x509::hex_id(16);
        let hash = hash_token(&token);
        // The agent's ID derives from the token's hash, never the token itself.
        let agent_id = self
            .trust_domain()
            .id(&format!(
                "/ward/agent/{JOIN_TOKEN_ATTESTOR}/{}",
                &hash[..32]
            ))
            .expect("hex path is valid");
        let created = now().unix_timestamp();
        let expires_at = created + ttl.as_secs() as i64;
        self.store
            .create_join_token(&JoinTokenRecord {
                token_hash: hash,
                agent_id: agent_id.clone(),
                expires_at,
                created_at: created,
            })
            .await?;
        tracing::info!(target: "audit", event = "join_token_created", caller = %principal_name(caller), tenant, agent_id = %agent_id, expires_at, "created a join token");
        self.metrics.admin_change("create_join_token");
        Ok((token, agent_id, expires_at))
    }

    /// Spends a join token and issues the node SVID.
    pub async fn attest(&self, token: &str, csr: &[u8]) -> CaResult<IssuedSvid> {
        // Check the CSR first: a malformed request must not burn the token;
        // nor a CA that cannot sign now (its key expired).
        let checked = check_csr(csr, self.trust_domain()).inspect_err(|e| {
            self.refuse("attest", None, &e.to_string());
        })?;
        self.live_signer()?;
        let refused = |other: TokenUse| {
            let why = match other {
                TokenUse::AlreadyUsed => "join token was already used",
                TokenUse::Expired => "join token has expired",
                _ => "join token is not known",
            };
            self.metrics.attestation("refused");
            self.refuse("attest", None, why);
            CaError::denied(why)
        };
        // The token names the agent the SVID is for; it is spent, and the
        // agent saved, together once the SVID is made: a database that
        // fails in between leaves the token as it was.
        let hash = hash_token(token);
        let agent_id = match self
            .store
            .join_token_state(&hash, now().unix_timestamp())
            .await?
        {
            TokenUse::Accepted(id) => id,
            other => return Err(refused(other)),
        };
        let svid = self.issue(&agent_id, &[], &checked.key, self.ttls.node_svid)?;
        let agent = AgentRecord {
            spiffe_id: agent_id.clone(),
            attestation_type: JOIN_TOKEN_ATTESTOR.into(),
            serial: svid.serial.clone(),
            new_serial: String::new(),
            expires_at: svid.expires_at,
            evicted: false,
            attested_at: now().unix_timestamp(),
        };
        match self
            .store
            .redeem_join_token(&hash, now().unix_timestamp(), &agent)
            .await?
        {
            TokenUse::Accepted(_) => {}
            other => return Err(refused(other)),
        }
        self.metrics.attestation("ok");
        tracing::info!(target: "audit", event = "agent_attested", agent_id = %agent_id, serial = %svid.serial, expires_at = svid.expires_at, "attested a node");
        Ok(svid)
    }

    /// Refuses callers that are not attested agents in good standing, and
    /// agents presenting a node SVID a renewal has superseded (see
    /// [`Ca::current_agent`]).
    pub async fn check_agent(
        &self,
        caller: &SpiffeId,
        presented: &NodeSvid,
        method: &'static str,
    ) -> CaResult<AgentRecord> {
        match self.reads.get_agent(caller).await? {
            Some(a) if !a.evicted && a.serial == presented.serial => Ok(a),
            Some(a) if !a.evicted => self.current_agent(caller, presented, Some(a), method).await,
            other => Err(self.refuse_agent(caller, other.is_some(), method)),
        }
    }

    /// The agent's record from the database, once `presented` is its
    /// current node SVID. That is the one it attested with or last made
    /// current, or the one its last renewal issued: the first call with
    /// that one makes it current (as SPIRE does), and the one before can no
    /// longer be used. Any other is refused.
    ///
    /// While the database is down, the `cached` record decides: an SVID it
    /// names as issued, or one issued after its newest (a later expiry; the
    /// TLS layer has verified it is this CA's, for this agent), goes
    /// through.
    async fn current_agent(
        &self,
        caller: &SpiffeId,
        presented: &NodeSvid,
        cached: Option<AgentRecord>,
        method: &'static str,
    ) -> CaResult<AgentRecord> {
        let generation = self.reads.generation();
        let read = match self.store.get_agent(caller).await {
            Ok(a) => a,
            Err(e) => {
                return match cached {
                    Some(c)
                        if c.new_serial == presented.serial
                            || presented.not_after > c.expires_at =>
                    {
                        Ok(c)
                    }
                    _ => Err(e.into()),
                }
            }
        };
        let a = match read {
            Some(a) if !a.evicted => a,
            other => return Err(self.refuse_agent(caller, other.is_some(), method)),
        };
        self.reads.remember_agent(&a, generation);
        if a.serial == presented.serial {
            return Ok(a);
        }
        if a.new_serial != presented.serial && a.new_serial != ANY_SERIAL {
            return Err(self.superseded(caller, &presented.serial, &a, method));
        }
        let promoted = AgentRecord {
            serial: presented.serial.clone(),
            new_serial: String::new(),
            ..a.clone()
        };
        if self.store.renew_agent(&a, &promoted).await? {
            self.reads.remember_agent(&promoted, generation);
            tracing::info!(target: "audit", event = "node_svid_in_use", agent_id = %caller, serial = %presented.serial, "an agent uses its renewed node SVID; the one before can no longer be used");
            return Ok(promoted);
        }
        // Changed meanwhile: another call made it current, the agent renewed
        // again, or it was evicted.
        match self.store.get_agent(caller).await? {
            Some(now) if !now.evicted && now.serial == presented.serial => Ok(now),
            Some(now) if !now.evicted => {
                Err(self.superseded(caller, &presented.serial, &now, method))
            }
            other => Err(self.refuse_agent(caller, other.is_some(), method)),
        }
    }

    /// Refuses a caller that is evicted (`known`) or not an agent at all.
    pub(crate) fn refuse_agent(
        &self,
        caller: &SpiffeId,
        known: bool,
        method: &'static str,
    ) -> CaError {
        let why = if known {
            "agent has been evicted"
        } else {
            "caller is not an attested agent"
        };
        self.refuse(method, Some(caller), why);
        CaError::denied(format!("{caller}: {why}"))
    }

    /// Refuses a node SVID that is not the agent's current one.
    fn superseded(
        &self,
        caller: &SpiffeId,
        presented: &str,
        current: &AgentRecord,
        method: &'static str,
    ) -> CaError {
        let why = format!(
            "node SVID {presented} {} ({}): it was superseded by a renewal, or another holder of this identity renewed it",
            ward_spec::grpc::SUPERSEDED_NODE_SVID,
            current.serial
        );
        self.refuse(method, Some(caller), &why);
        CaError::denied(why)
    }

    /// Like [`Ca::check_agent`], reading only the eviction flag.
    pub async fn check_agent_standing(
        &self,
        caller: &SpiffeId,
        presented: &NodeSvid,
        method: &'static str,
    ) -> CaResult<()> {
        match self.reads.agent_standing(caller).await? {
            Some(s) if !s.evicted && s.serial == presented.serial => Ok(()),
            // Another serial (a renewal's, to be made current, or one
            // superseded): the full check decides.
            Some(s) if !s.evicted => self
                .check_agent(caller, presented, method)
                .await
                .map(|_| ()),
            known => Err(self.refuse_agent(caller, known.is_some(), method)),
        }
    }

    /// Renews the node SVID of `caller`, which presented `presented`: that
    /// must be its current one (see [`Ca::current_agent`]). The new SVID
    /// becomes current at the agent's first call with it. So of two holders
    /// of one agent identity (a copied key), the one left with a superseded
    /// SVID is refused, which shows the copy.
    pub async fn renew(
        &self,
        caller: &SpiffeId,
        presented: &NodeSvid,
        csr: &[u8],
    ) -> CaResult<IssuedSvid> {
        // From the database, not the read cache: the renewal is written
        // only over the serials read here.
        let generation = self.reads.generation();
        let agent = self.current_agent(caller, presented, None, "renew").await?;
        let checked = check_csr(csr, self.trust_domain()).inspect_err(|e| {
            self.refuse("renew", Some(caller), &e.to_string());
        })?;
        if let Some(req) = &checked.requested {
            if req != caller {
                let why = format!("CSR asks for {req}, caller is {caller}");
                self.refuse("renew", Some(caller), &why);
                return Err(CaError::denied(why));
            }
        }
        let svid = self.issue(caller, &[], &checked.key, self.ttls.node_svid)?;
        let renewed = AgentRecord {
            new_serial: svid.serial.clone(),
            expires_at: svid.expires_at,
            ..agent.clone()
        };
        if !self.store.renew_agent(&agent, &renewed).await? {
            return Err(CaError::new(
                Code::Aborted,
                format!("{caller}: the agent's record changed during the renewal (evicted, or renewed at the same time); try again"),
            ));
        }
        self.reads.remember_agent(&renewed, generation);
        tracing::info!(target: "audit", event = "node_svid_renewed", agent_id = %caller, serial = %svid.serial, expires_at = svid.expires_at, "renewed a node SVID");
        Ok(svid)
    }

    // ----- signing -----

    /// Builds and profile-checks a leaf for `id` from the active slot.
    /// The active slot's signer, unless it has expired (the schedule has
    /// not caught up): nothing is signed that would be born expired.
    fn live_signer(&self) -> CaResult<Arc<crate::authority::Signer>> {
        let signer = self.authority.signer();
        if signer.not_after <= now() + time::Duration::seconds(1) {
            return Err(CaError::new(
                Code::Unavailable,
                "this CA's signing key has expired; another replica, or this one after its next rotation, signs",
            ));
        }
        Ok(signer)
    }

    pub fn issue(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        key: &x509::CsrKey,
        ttl: Duration,
    ) -> CaResult<IssuedSvid> {
        let signer = self.live_signer()?;
        let t = now();
        // Never past the issuer's own expiry.
        let not_after = expiry(t, ttl, signer.not_after);
        let leaf = x509::new_leaf(id, dns_names, key, &signer.issuer, t, not_after)
            .map_err(|e| CaError::invalid(format!("cannot issue for {id}: {e}")))?;
        let info = ward_spec::svid::check_leaf(&leaf).map_err(|e| {
            tracing::error!(error = %e, spiffe_id = %id, "issued certificate failed the SVID profile check");
            CaError::new(Code::Internal, "issued certificate failed the SVID profile check")
        })?;
        let mut chain = Vec::with_capacity(1 + signer.chain_tail.len());
        chain.push(leaf);
        chain.extend(signer.chain_tail.iter().cloned());
        Ok(IssuedSvid {
            spiffe_id: info.spiffe_id,
            chain,
            expires_at: info.not_after,
            serial: info.serial,
        })
    }

    /// Signs workload CSRs for `caller`: each names an entry that must be
    /// parented to the caller, and the CSR may ask for nothing but that
    /// entry's SPIFFE ID. One result per request, in order.
    pub async fn sign_batch(
        &self,
        caller: &SpiffeId,
        presented: &NodeSvid,
        requests: Vec<(String, Vec<u8>)>,
    ) -> CaResult<Vec<CaResult<IssuedSvid>>> {
        self.check_agent_standing(caller, presented, "sign").await?;
        let ids: Vec<String> = requests
            .iter()
            .map(|(id, _)| id)
            .filter(|id| valid_entry_id(id))
            .cloned()
            .collect();
        let view = self.reads.signing_entries(caller, &ids).await?;
        let sign_all = || {
            requests
                .iter()
                .map(|(entry_id, csr)| match view.entries.get(entry_id) {
                    _ if !valid_entry_id(entry_id) => Err(bad_entry_id(entry_id)),
                    None if view.from_cache => Err(CaError::new(
                        Code::Unavailable,
                        format!("entry {entry_id:?} is not known here while the datastore is down"),
                    )),
                    entry => self.sign_one(caller, entry, entry_id, csr),
                })
                .collect()
        };
        // A large batch is CPU work for tens of milliseconds (a CSR check
        // and a signature each): the runtime's other tasks (handshakes, other
        // agents' calls) move to another thread meanwhile.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        Ok(if requests.len() >= BLOCKING_BATCH && multi_thread {
            tokio::task::block_in_place(sign_all)
        } else {
            sign_all()
        })
    }

    fn sign_one(
        &self,
        caller: &SpiffeId,
        entry: Option<&SigningEntry>,
        entry_id: &str,
        csr: &[u8],
    ) -> CaResult<IssuedSvid> {
        // `signing_entries` returned only entries parented to the caller.
        let entry = match entry {
            Some(e) => e,
            None => {
                let why =
                    format!("entry {entry_id:?} does not exist or is not parented to {caller}");
                self.refuse("sign", Some(caller), &why);
                return Err(CaError::denied(why));
            }
        };
        let checked = check_csr(csr, self.trust_domain()).inspect_err(|e| {
            self.refuse("sign", Some(caller), &format!("entry {entry_id}: {e}"));
        })?;
        if let Some(req) = &checked.requested {
            if req != &entry.spiffe_id {
                let why = format!(
                    "CSR asks for {req}, entry {entry_id} grants {}",
                    entry.spiffe_id
                );
                self.refuse("sign", Some(caller), &why);
                return Err(CaError::denied(why));
            }
        }
        let ttl = match entry.x509_ttl {
            t if t > 0 => Duration::from_secs(t as u64),
            _ => self.ttls.x509_svid,
        };
        let svid = self.issue(&entry.spiffe_id, &entry.dns_names, &checked.key, ttl)?;
        self.metrics.issued("x509");
        tracing::info!(target: "audit", event = "x509_svid_issued", agent_id = %caller, entry_id, spiffe_id = %svid.spiffe_id, serial = %svid.serial, expires_at = svid.expires_at, "issued an X509-SVID");
        Ok(svid)
    }

    /// Mints a JWT-SVID (ES256) for an entry parented to `caller`, if the
    /// entry still names `expected` (the SPIFFE ID the agent knows it by;
    /// empty: not checked). An agent behind a rename would otherwise hand
    /// its workload a token for an identity its cache does not show.
    pub async fn mint_jwt(
        &self,
        caller: &SpiffeId,
        presented: &NodeSvid,
        entry_id: &str,
        audience: &[String],
        expected: &str,
    ) -> CaResult<(String, i64)> {
        self.check_agent(caller, presented, "mint_jwt").await?;
        if let Some(why) = ward_spec::jwt::audience_problem(audience) {
            return Err(CaError::invalid(format!("a JWT-SVID's audience: {why}")));
        }
        if !valid_entry_id(entry_id) {
            return Err(bad_entry_id(entry_id));
        }
        if expected.len() > MAX_SPIFFE_ID_LEN {
            return Err(CaError::invalid(format!(
                "the SPIFFE ID asked for is {} bytes; at most {MAX_SPIFFE_ID_LEN}",
                expected.len()
            )));
        }
        let entry = match self.reads.get_entry(entry_id).await? {
            Some(e) if &e.parent_id == caller => e,
            _ => {
                let why =
                    format!("entry {entry_id:?} does not exist or is not parented to {caller}");
                self.refuse("mint_jwt", Some(caller), &why);
                return Err(CaError::denied(why));
            }
        };
        if !expected.is_empty() && expected != entry.spiffe_id.to_string() {
            let why = format!(
                "the agent asks for {expected}, entry {entry_id} grants {}",
                entry.spiffe_id
            );
            self.refuse("mint_jwt", Some(caller), &why);
            return Err(CaError::denied(why));
        }
        let signer = self.live_signer()?;
        let t = now();
        let ttl = match entry.jwt_ttl {
            s if s > 0 => Duration::from_secs(s as u64),
            _ => self.ttls.jwt_svid,
        };
        let exp = expiry(t, ttl, signer.not_after).unix_timestamp();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(signer.jwt_kid.clone());
        header.typ = Some("JWT".into());
        let claims = serde_json::json!({
            "sub": entry.spiffe_id.to_string(),
            "aud": audience,
            "exp": exp,
            "iat": t.unix_timestamp(),
        });
        let token = jsonwebtoken::encode(&header, &claims, &signer.jwt_key)
            .map_err(|e| CaError::new(Code::Internal, format!("JWT signing failed: {e}")))?;
        self.metrics.issued("jwt");
        tracing::info!(target: "audit", event = "jwt_svid_issued", agent_id = %caller, entry_id, spiffe_id = %entry.spiffe_id, audience = ?audience, expires_at = exp, "issued a JWT-SVID");
        Ok((token, exp))
    }

    pub async fn sync(
        &self,
        caller: &SpiffeId,
        presented: &NodeSvid,
        since: u64,
        after: &str,
    ) -> CaResult<SyncPage> {
        self.check_agent(caller, presented, "sync").await?;
        Ok(self
            .store
            .sync_entries_after(caller, since, after, 1000)
            .await?)
    }

    // ----- administration -----

    fn validate_entry(&self, spec: EntrySpec) -> CaResult<Entry> {
        let spiffe_id = SpiffeId::parse(&spec.spiffe_id).map_err(|e| {
            CaError::invalid(format!("spiffe_id {:?}: {e}", trunc(&spec.spiffe_id)))
        })?;
        let parent_id = SpiffeId::parse(&spec.parent_id).map_err(|e| {
            CaError::invalid(format!("parent_id {:?}: {e}", trunc(&spec.parent_id)))
        })?;
        for (name, id) in [("spiffe_id", &spiffe_id), ("parent_id", &parent_id)] {
            if !id.is_member_of(self.trust_domain()) {
                return Err(CaError::invalid(format!(
                    "{name} {id} is outside trust domain {}",
                    self.trust_domain()
                )));
            }
        }
        if spiffe_id.path().starts_with("/ward/") {
            return Err(CaError::invalid(format!(
                "spiffe_id {spiffe_id}: paths under /ward/ are reserved for Ward itself"
            )));
        }
        if spec.selectors.is_empty() {
            return Err(CaError::invalid("an entry needs at least one selector"));
        }
        // Bounded so that a sync page of 1,000 entries stays within what an
        // agent reads in one message (see MAX_ENTRY_LIST).
        let over = |what: &str, n: usize, max: usize| {
            (n > max).then(|| CaError::invalid(format!("{what}: {n}, at most {max}")))
        };
        let limits = [
            over("selectors", spec.selectors.len(), MAX_ENTRY_LIST),
            over("dns_names", spec.dns_names.len(), MAX_ENTRY_LIST),
            over("federates_with", spec.federates_with.len(), MAX_ENTRY_LIST),
            over("hint (bytes)", spec.hint.len(), MAX_ENTRY_TEXT),
            spec.selectors
                .iter()
                .find_map(|s| over("a selector's length (bytes)", s.len(), MAX_ENTRY_TEXT)),
        ];
        if let Some(e) = limits.into_iter().flatten().next() {
            return Err(e);
        }
        let mut selectors = spec
            .selectors
            .iter()
            .map(|s| {
                Selector::parse(s)
                    .and_then(|sel| sel.check_canonical().map(|()| sel))
                    .map_err(|e| CaError::invalid(format!("selector: {e}")))
            })
            .collect::<CaResult<Vec<_>>>()?;
        selectors.sort();
        selectors.dedup();
        for (name, v) in [("x509_ttl", spec.x509_ttl), ("jwt_ttl", spec.jwt_ttl)] {
            if v < 0 {
                return Err(CaError::invalid(format!("{name} must not be negative")));
            }
            if v > MAX_ENTRY_TTL_SECS {
                return Err(CaError::invalid(format!(
                    "{name} {v} is over {MAX_ENTRY_TTL_SECS} seconds (ten years); no SVID outlives the CA that signs it anyway"
                )));
            }
        }
        for d in &spec.dns_names {
            if rcgen::string::Ia5String::try_from(d.as_str()).is_err()
                || d.is_empty()
                || d.len() > 253
            {
                return Err(CaError::invalid(format!(
                    "dns_name {d:?} is not a DNS name"
                )));
            }
        }
        let mut federates_with = Vec::with_capacity(spec.federates_with.len());
        for t in &spec.federates_with {
            let td = TrustDomain::new(t)
                .map_err(|e| CaError::invalid(format!("federates_with {:?}: {e}", trunc(t))))?;
            if &td == self.trust_domain() {
                return Err(CaError::invalid(format!(
                    "federates_with {td}: that is this CA's own trust domain"
                )));
            }
            federates_with.push(td);
        }
        federates_with.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        federates_with.dedup();
        if let Some(id) = &spec.id {
            if !valid_entry_id(id) {
                return Err(CaError::invalid(ENTRY_ID_RULE));
            }
        }
        Ok(Entry {
            id: spec.id.unwrap_or_else(new_entry_id),
            spiffe_id,
            parent_id,
            selectors,
            x509_ttl: spec.x509_ttl,
            jwt_ttl: spec.jwt_ttl,
            dns_names: spec.dns_names,
            hint: spec.hint,
            admin: spec.admin,
            revision: 0,
            created_at: 0,
            federates_with,
        })
    }

    pub async fn create_entry(&self, caller: &AdminPrincipal, spec: EntrySpec) -> CaResult<Entry> {
        let entry = self.validate_entry(spec)?;
        let added = Added {
            federation: &entry.federates_with,
            dns_names: &entry.dns_names,
            admin: entry.admin,
        };
        self.authorize_entry(caller, AdminAction::CreateEntry, &entry, added)?;
        let e = self
            .store
            .create_entry(entry, now().unix_timestamp())
            .await?;
        self.entries_changed(e.revision, Some(vec![e.parent_id.to_string()]));
        self.metrics.admin_change("create_entry");
        tracing::info!(target: "audit", event = "entry_created", caller = %principal_name(caller), entry_id = %e.id, spiffe_id = %e.spiffe_id, parent_id = %e.parent_id, revision = e.revision, "created an entry");
        Ok(e)
    }

    pub async fn update_entry(&self, caller: &AdminPrincipal, spec: EntrySpec) -> CaResult<Entry> {
        let Some(id) = spec.id.clone() else {
            return Err(CaError::invalid("update needs the entry id"));
        };
        let mut entry = self.validate_entry(spec)?;
        // Both what the entry was and what it becomes must be the caller's.
        let old = self.get_entry(&id).await?;
        // Federation or a DNS name given to another identity is added, even
        // if the entry listed it before.
        fn new_in<T: PartialEq + Clone>(renamed: bool, now: &[T], before: &[T]) -> Vec<T> {
            now.iter()
                .filter(|x| renamed || !before.contains(x))
                .cloned()
                .collect()
        }
        let renamed = old.spiffe_id != entry.spiffe_id;
        let federation = new_in(renamed, &entry.federates_with, &old.federates_with);
        let dns_names = new_in(renamed, &entry.dns_names, &old.dns_names);
        let added = Added {
            federation: &federation,
            dns_names: &dns_names,
            admin: entry.admin && (renamed || !old.admin),
        };
        // What was authorized is what is replaced: the store refuses the
        // update if the entry moved on meanwhile.
        entry.revision = old.revision;
        self.authorize_entry(caller, AdminAction::UpdateEntry, &old, added)?;
        self.authorize_entry(caller, AdminAction::UpdateEntry, &entry, added)?;
        let e = self.store.update_entry(entry).await?;
        self.entries_changed(
            e.revision,
            Some(vec![e.parent_id.to_string(), old.parent_id.to_string()]),
        );
        self.metrics.admin_change("update_entry");
        tracing::info!(target: "audit", event = "entry_updated", caller = %principal_name(caller), entry_id = %e.id, spiffe_id = %e.spiffe_id, parent_id = %e.parent_id, revision = e.revision, "updated an entry");
        Ok(e)
    }

    pub async fn delete_entry(&self, caller: &AdminPrincipal, id: &str) -> CaResult<()> {
        let old = self.get_entry(id).await?;
        self.authorize_entry(caller, AdminAction::DeleteEntry, &old, Added::default())?;
        let e = self.store.delete_entry(id, old.revision).await?;
        self.entries_changed(e.revision, Some(vec![old.parent_id.to_string()]));
        self.metrics.admin_change("delete_entry");
        tracing::info!(target: "audit", event = "entry_deleted", caller = %principal_name(caller), entry_id = %e.id, spiffe_id = %e.spiffe_id, "deleted an entry");
        Ok(())
    }

    pub async fn get_entry(&self, id: &str) -> CaResult<Entry> {
        self.store
            .get_entry(id)
            .await?
            .ok_or_else(|| CaError::new(Code::NotFound, format!("entry {id:?} does not exist")))
    }

    pub async fn list_entries(
        &self,
        filter: &EntryFilter,
        after: Option<&str>,
        limit: u32,
    ) -> CaResult<Vec<Entry>> {
        Ok(self.store.list_entries(filter, after, limit).await?)
    }

    /// Agents in SPIFFE ID order, `limit` of them after `after`.
    pub async fn list_agents(&self, after: Option<&str>, limit: u32) -> CaResult<Vec<AgentRecord>> {
        Ok(self.store.list_agents(after, limit).await?)
    }

    pub async fn evict_agent(&self, id: &str) -> CaResult<()> {
        let id = SpiffeId::parse(id).map_err(|e| CaError::invalid(format!("agent id: {e}")))?;
        // An agent not attested yet is evicted by revoking its join token
        // (a token leaked before use, say).
        let revoked = self
            .store
            .revoke_join_tokens(&id, now().unix_timestamp())
            .await?;
        if revoked > 0 {
            tracing::info!(target: "audit", event = "join_token_revoked", agent_id = %id, tokens = revoked, "revoked the join token of an agent not attested yet");
        }
        if !self.store.evict_agent(&id).await? {
            if revoked > 0 {
                self.metrics.admin_change("evict_agent");
                return Ok(());
            }
            return Err(CaError::new(
                Code::NotFound,
                format!("no agent {id}, nor a join token for it not used yet"),
            ));
        }
        self.reads.forget_agent(&id.to_string(), None);
        let _ = self.agent_changes.send(id.to_string());
        self.metrics.admin_change("evict_agent");
        tracing::info!(target: "audit", event = "agent_evicted", agent_id = %id, "evicted an agent");
        Ok(())
    }

    // ----- federation -----

    /// The bundles of the trust domains we federate with.
    pub fn federated_bundles(&self) -> Arc<Vec<TrustBundle>> {
        self.federated.read().expect("federated lock").clone()
    }

    /// The trust domains we federate with, with their bundle endpoints.
    pub fn federations(&self) -> Arc<Vec<Federation>> {
        self.federations.read().expect("federated lock").clone()
    }

    /// Stores (or replaces) the bundle of a trust domain we federate with,
    /// and where to refresh it (`endpoint_url` empty: set by hand only);
    /// agents hear of it at once.
    pub async fn set_federated_bundle(
        &self,
        trust_domain: &str,
        jwks: &[u8],
        endpoint_url: &str,
        endpoint_spiffe_id: &str,
    ) -> CaResult<TrustBundle> {
        let td = TrustDomain::new(trust_domain)
            .map_err(|e| CaError::invalid(format!("trust domain {trust_domain:?}: {e}")))?;
        if &td == self.trust_domain() {
            return Err(CaError::invalid(format!(
                "{td} is this CA's own trust domain; its bundle is not set by hand"
            )));
        }
        let bundle = TrustBundle::from_jwks(td.clone(), jwks)
            .map_err(|e| CaError::invalid(format!("bundle of {td}: {e}")))?;
        if bundle.x509_authorities.is_empty() {
            return Err(CaError::invalid(format!(
                "bundle of {td} holds no X.509 authority"
            )));
        }
        ward_spec::tls::RootStore::new(&bundle)
            .map_err(|e| CaError::invalid(format!("bundle of {td}: {e}")))?;
        let endpoint_spiffe_id = match (endpoint_url, endpoint_spiffe_id) {
            ("", "") => String::new(),
            ("", _) => {
                return Err(CaError::invalid(
                    "an endpoint SPIFFE ID needs an endpoint URL",
                ))
            }
            (url, id) => {
                if !url.starts_with("https://") || url.len() <= "https://".len() {
                    return Err(CaError::invalid(format!(
                        "endpoint URL {url:?}: a bundle endpoint is https://HOST[:PORT][/PATH]"
                    )));
                }
                // A Ward CA serves its bundle endpoint with its own SVID.
                let id = match id {
                    "" => td.id_string() + "/ward/ca",
                    id => id.to_owned(),
                };
                let parsed = SpiffeId::parse(&id)
                    .map_err(|e| CaError::invalid(format!("endpoint SPIFFE ID: {e}")))?;
                if !parsed.is_member_of(&td) {
                    return Err(CaError::invalid(format!(
                        "endpoint SPIFFE ID {id} is not in {td}"
                    )));
                }
                id
            }
        };
        let record = FederatedBundleRecord {
            trust_domain: td.to_string(),
            jwks: bundle.to_jwks(),
            endpoint_url: endpoint_url.to_owned(),
            endpoint_spiffe_id,
        };
        self.store
            .set_federated_bundle(&record, now().unix_timestamp())
            .await?;
        self.reload_federation().await?;
        self.metrics.admin_change("set_federated_bundle");
        tracing::info!(target: "audit", event = "federated_bundle_set", trust_domain = %td, x509_authorities = bundle.x509_authorities.len(), jwt_authorities = bundle.jwt_authorities.len(), endpoint_url, "set a federated bundle");
        Ok(bundle)
    }

    /// Stores a bundle fetched from a federation's bundle endpoint if its
    /// authorities changed and the federation was not changed or deleted
    /// meanwhile; true if it was stored.
    pub async fn refresh_federated_bundle(
        &self,
        federation: &Federation,
        fetched: TrustBundle,
    ) -> CaResult<bool> {
        let current = &federation.bundle;
        if fetched.x509_authorities == current.x509_authorities
            && fetched.jwt_authorities == current.jwt_authorities
        {
            return Ok(false);
        }
        if fetched.x509_authorities.is_empty() {
            return Err(CaError::invalid(
                "the fetched bundle holds no X.509 authority",
            ));
        }
        ward_spec::tls::RootStore::new(&fetched).map_err(|e| CaError::invalid(e.to_string()))?;
        let stored = self
            .store
            .refresh_federated_bundle(
                &federation.stored,
                &fetched.to_jwks(),
                now().unix_timestamp(),
            )
            .await?;
        if !stored {
            tracing::info!(trust_domain = %fetched.trust_domain, "the federation changed while its bundle was fetched; the next refresh starts from the change");
            self.reload_federation().await?;
            return Ok(false);
        }
        self.reload_federation().await?;
        tracing::info!(target: "audit", event = "federated_bundle_refreshed", trust_domain = %fetched.trust_domain, x509_authorities = fetched.x509_authorities.len(), jwt_authorities = fetched.jwt_authorities.len(), endpoint_url = federation.endpoint_url, "refreshed a federated bundle from its endpoint");
        Ok(true)
    }

    /// Deletes a federated bundle; `mode` says what happens to the entries
    /// that federate with it. Returns those entries (changed or deleted).
    pub async fn delete_federated_bundle(
        &self,
        trust_domain: &str,
        mode: BundleDeleteMode,
    ) -> CaResult<Vec<Entry>> {
        let td = TrustDomain::new(trust_domain)
            .map_err(|e| CaError::invalid(format!("trust domain {trust_domain:?}: {e}")))?;
        let trust_domain = td.as_str();
        let done = self
            .store
            .delete_federated_bundle(trust_domain, mode)
            .await?;
        if !done.found {
            return Err(CaError::new(
                Code::NotFound,
                format!("no federated bundle for {trust_domain}"),
            ));
        }
        if let Some(rev) = done.revision {
            // A parent named twice is told once.
            let parents = done.entries.iter().map(|e| e.parent_id.to_string());
            self.entries_changed(rev, Some(parents.collect()));
        }
        self.reload_federation().await?;
        self.metrics.admin_change("delete_federated_bundle");
        // One line: the bundle, and what became of the entries that used it.
        let ids: Vec<&str> = done.entries.iter().map(|e| e.id.as_str()).collect();
        tracing::info!(target: "audit", event = "federated_bundle_deleted", trust_domain, mode = ?mode, entries = ?ids, revision = done.revision, "deleted a federated bundle");
        Ok(done.entries)
    }

    /// Reads the federated bundles again and tells agents.
    async fn reload_federation(&self) -> CaResult<()> {
        // One reload at a time, so the last one to finish read last.
        let _one = self.federation_reload.lock().await;
        let federations = load_federated(self.store.as_ref()).await?;
        let bundles = federations.iter().map(|f| f.bundle.clone()).collect();
        *self.federated.write().expect("federated lock") = Arc::new(bundles);
        *self.federations.write().expect("federated lock") = Arc::new(federations);
        self.notices.send_modify(|n| n.federation_version += 1);
        Ok(())
    }

    // ----- policy sets -----

    /// Validates `files` and stores them as the new active version.
    pub async fn push_policy(
        &self,
        files: Vec<(String, String)>,
        comment: &str,
    ) -> CaResult<PolicySetRecord> {
        let files = policies::normalize(files).map_err(CaError::invalid)?;
        self.store_policy(files, comment, "policy_pushed").await
    }

    /// Stores an earlier version's files again as the new active version.
    pub async fn rollback_policy(&self, version: u64) -> CaResult<PolicySetRecord> {
        let old = self
            .store
            .get_policy_set(Some(version))
            .await?
            .ok_or_else(|| {
                CaError::new(
                    Code::NotFound,
                    format!("policy set version {version} does not exist"),
                )
            })?;
        self.store_policy(
            old.files,
            &format!("rollback to {version}"),
            "policy_rolled_back",
        )
        .await
    }

    async fn store_policy(
        &self,
        files: Vec<(String, String)>,
        comment: &str,
        event: &'static str,
    ) -> CaResult<PolicySetRecord> {
        let compiled = self.admin_policy.validate(&files).map_err(|errors| {
            self.refuse(
                "push_policy",
                None,
                &format!("{} validation error(s)", errors.len()),
            );
            CaError::invalid(format!(
                "the policy set does not validate ({} error{}):\n{}",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" },
                policies::joined(&errors)
            ))
        })?;
        let policies = policies::count(&compiled);
        let digest = policies::digest_of(&files);
        let _one = self.policy_writes.lock().await;
        let mut set = PolicySetRecord {
            version: 0,
            files,
            digest,
            comment: comment.to_owned(),
            created_at: now().unix_timestamp(),
            policies: policies as u64,
        };
        set.version = self.store.add_policy_set(&set).await?;
        self.admin_policy.install(compiled);
        self.policy_changed(set.version);
        self.metrics.admin_change(event);
        tracing::info!(target: "audit", event, version = set.version, digest = %set.digest, files = set.files.len(), policies, comment, "activated a policy set");
        Ok(set)
    }

    /// One version, or the active one when `version` is `None`.
    pub async fn get_policy(&self, version: Option<u64>) -> CaResult<Option<PolicySetRecord>> {
        Ok(self.store.get_policy_set(version).await?)
    }

    /// Versions older than `before` (all if None), newest first, at most `limit`.
    pub async fn list_policies(
        &self,
        before: Option<u64>,
        limit: u32,
    ) -> CaResult<Vec<PolicySetRecord>> {
        Ok(self.store.list_policy_sets(before, limit).await?)
    }

    /// The active policy set version (0: none pushed).
    pub fn policy_version(&self) -> u64 {
        self.notices.borrow().policy_version
    }

    /// The tenant a workload ID names (empty if it follows no template).
    pub fn tenant_of(&self, id: &SpiffeId) -> String {
        self.admin_policy.tenant_of(id)
    }

    /// `added`: what the call adds to the entry (federation, DNS names).
    fn authorize_entry(
        &self,
        caller: &AdminPrincipal,
        action: AdminAction,
        e: &Entry,
        added: Added<'_>,
    ) -> CaResult<()> {
        let names = |tds: &[TrustDomain]| tds.iter().map(|td| td.to_string()).collect();
        let resource = AdminResource {
            tenant: self.tenant_of(&e.spiffe_id),
            id: e.spiffe_id.to_string(),
            federates_with: names(&e.federates_with),
            federation_added: names(added.federation),
            dns_names: e.dns_names.clone(),
            dns_names_added: added.dns_names.to_vec(),
            parent_id: e.parent_id.to_string(),
            admin: e.admin,
            admin_added: added.admin,
        };
        self.authorize_admin(caller, action, &resource)
    }

    /// Asks the active policy set; a refusal is audited and reported as
    /// `PermissionDenied`.
    pub fn authorize_admin(
        &self,
        caller: &AdminPrincipal,
        action: AdminAction,
        resource: &AdminResource,
    ) -> CaResult<()> {
        let d = self.admin_policy.decide(caller, action, resource);
        let (federation_added, dns_names_added) =
            (&resource.federation_added, &resource.dns_names_added);
        let (tenant, resource) = (resource.tenant.as_str(), resource.id.as_str());
        if d.permitted {
            return Ok(());
        }
        let why = if d.errors.is_empty() {
            "no policy permits it".to_owned()
        } else {
            format!("policy errors: {}", d.errors.join("; "))
        };
        let mut tenant_text = if tenant.is_empty() {
            "no tenant".to_owned()
        } else {
            format!("tenant {tenant:?}")
        };
        if !federation_added.is_empty() {
            tenant_text.push_str(&format!(
                ", adding federation with {}",
                federation_added.join(", ")
            ));
        }
        if !dns_names_added.is_empty() {
            tenant_text.push_str(&format!(
                ", adding DNS names {}",
                dns_names_added.join(", ")
            ));
        }
        let message = format!(
            "{} may not {} for {} ({}): {why}",
            principal_name(caller),
            action.name(),
            resource,
            tenant_text
        );
        self.metrics.refused(action.name());
        tracing::warn!(target: "audit", event = "refused", method = action.name(), caller = %principal_name(caller), tenant, resource, federation_added = ?federation_added, dns_names_added = ?dns_names_added, decision_id = %d.decision_id, policies = ?d.policies, reason = %why, "refused an admin call");
        Err(CaError::new(Code::PermissionDenied, message))
    }

    /// Audits a refused admin call of a remote caller.
    pub fn refuse_admin(&self, method: &'static str, caller: &SpiffeId, reason: &str) {
        self.refuse(method, Some(caller), reason);
    }

    /// One audit line for a refusal.
    fn refuse(&self, method: &'static str, caller: Option<&SpiffeId>, reason: &str) {
        self.metrics.refused(method);
        match caller {
            Some(c) => {
                tracing::warn!(target: "audit", event = "refused", method, caller = %c, reason, "refused a request")
            }
            None => {
                tracing::warn!(target: "audit", event = "refused", method, reason, "refused a request")
            }
        }
    }
}

/// The (revision, parent) pairs announced lately: the last 8,192.
#[derive(Default)]
struct Announced {
    seen: std::collections::HashSet<(u64, String)>,
    order: std::collections::VecDeque<(u64, String)>,
}

impl Announced {
    const KEEP: usize = 8192;

    /// Which of `parents` were not announced at `revision` yet (now they are).
    fn fresh(&mut self, revision: u64, parents: Vec<String>) -> Vec<String> {
        let mut fresh = Vec::new();
        for p in parents {
            let key = (revision, p);
            if self.seen.contains(&key) {
                continue;
            }
            if self.order.len() >= Self::KEEP {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
            self.seen.insert(key.clone());
            self.order.push_back(key.clone());
            fresh.push(key.1);
        }
        fresh
    }
}

/// How audit lines and errors name an admin caller.
pub fn principal_name(p: &AdminPrincipal) -> String {
    match p {
        AdminPrincipal::Operator => "the local operator".into(),
        AdminPrincipal::Admin(id) => id.to_string(),
    }
}

/// Batches of this many signing requests or more are signed off the
/// runtime's worker (see `Ca::sign_batch`).
const BLOCKING_BATCH: usize = 32;

/// The longest SPIFFE ID (the SPIFFE specification's limit).
const MAX_SPIFFE_ID_LEN: usize = 2048;

/// What an entry ID may be.
const ENTRY_ID_RULE: &str = "entry id must be 1-64 characters of [A-Za-z0-9_-]";

fn valid_entry_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An entry ID an agent sent that cannot be one: refused before it is
/// looked up or logged (it may be megabytes).
fn bad_entry_id(id: &str) -> CaError {
    CaError::invalid(format!("{ENTRY_ID_RULE}, not {}", trunc(id)))
}

fn trunc(s: &str) -> String {
    if s.len() <= 80 {
        s.to_owned()
    } else {
        let mut end = 80;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &s[..end], s.len())
    }
}

fn new_entry_id() -> String {
    let h = x509::hex_id(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The longest SVID lifetime an entry may ask for: ten years.
const MAX_ENTRY_TTL_SECS: i64 = 10 * 365 * 24 * 3600;

/// `ttl` after `t`, but never past `cap` (the signer's own expiry); a
/// lifetime beyond what time can count (an entry stored before TTLs were
/// bounded) is the cap.
fn expiry(t: OffsetDateTime, ttl: Duration, cap: OffsetDateTime) -> OffsetDateTime {
    time::Duration::try_from(ttl)
        .ok()
        .and_then(|d| t.checked_add(d))
        .map_or(cap, |end| end.min(cap))
}

#[cfg(test)]
mod tests {
    use super::{expiry, Announced};
    use std::time::Duration;
    use time::OffsetDateTime;

    #[test]
    fn an_expiry_is_the_ttl_after_now_capped_by_the_signer_even_past_what_time_can_count() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let cap = t + Duration::from_secs(3600);
        assert_eq!(
            expiry(t, Duration::from_secs(60), cap),
            t + Duration::from_secs(60)
        );
        assert_eq!(expiry(t, Duration::from_secs(7200), cap), cap);
        // An entry's i64::MAX seconds (stored before TTLs were bounded) used
        // to panic here, failing every signing of the batch it was in.
        assert_eq!(expiry(t, Duration::from_secs(i64::MAX as u64), cap), cap);
        assert_eq!(expiry(t, Duration::MAX, cap), cap);
    }

    #[test]
    fn each_parent_is_told_of_a_revision_once_however_the_notices_split_it() {
        let mut a = Announced::default();
        let v = |s: &[&str]| s.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        // The replica's own call names every parent; its notices come back
        // in parts, and tell nobody again.
        assert_eq!(a.fresh(7, v(&["a", "b", "c"])), v(&["a", "b", "c"]));
        assert!(a.fresh(7, v(&["a", "b"])).is_empty());
        assert!(a.fresh(7, v(&["c"])).is_empty());
        // A part heard first leaves the rest to be told.
        assert_eq!(a.fresh(8, v(&["b"])), v(&["b"]));
        assert_eq!(a.fresh(8, v(&["a", "b", "c"])), v(&["a", "c"]));
        // The same parent at another revision is news.
        assert_eq!(a.fresh(9, v(&["a"])), v(&["a"]));
    }
}
