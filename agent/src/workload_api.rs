//! The SPIFFE Workload API on the agent's Unix socket.
//!
//! Each call is attested from the socket's peer credentials; the caller gets
//! what the entries its selectors match grant. Streams send the full state at
//! once, then again whenever the cache publishes a change that concerns the
//! caller. Every request must carry `workload.spiffe.io: true`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::{Code, Request, Response, Status};
use ward_spec::proto::node::v1 as node_pb;
use ward_spec::proto::workload as pb;
use ward_spec::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use ward_spec::SpiffeId;

use crate::attestor::{Attestor, PeerCred, ProcDir};
use crate::ca_client::CaClient;
use crate::manager::{unix_now, CachedEntry, Snapshot};
use crate::metrics::Metrics;

/// How long a call waits for the agent's first sync after a start.
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(15);

/// A Workload API connection, and who opened it as learnt when it was
/// accepted: the kernel's credentials and the caller's `/proc` directory.
pub struct CallerStream {
    io: UnixStream,
    info: Option<CallerInfo>,
}

/// Who opened a connection (None: the kernel did not say).
#[derive(Clone)]
pub struct CallerInfo {
    cred: PeerCred,
    /// Its `/proc` directory; None if the kernel gave no pid.
    proc: Option<Arc<ProcDir>>,
    /// The kernel gave a pid, but that process was gone at accept.
    gone: bool,
}

impl CallerStream {
    pub fn accept(io: UnixStream) -> Self {
        let info = io.peer_cred().ok().map(|c| {
            // 0: the caller is in a pid namespace the agent cannot see into.
            let pid = c.pid().filter(|p| *p > 0);
            let proc = pid.map(ProcDir::open);
            CallerInfo {
                cred: PeerCred {
                    pid,
                    uid: c.uid(),
                    gid: c.gid(),
                },
                gone: matches!(proc, Some(Err(_))),
                proc: proc.and_then(Result::ok).map(Arc::new),
            }
        });
        CallerStream { io, info }
    }
}

impl Connected for CallerStream {
    type ConnectInfo = Option<CallerInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for CallerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CallerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

type Snap = Option<Arc<Snapshot>>;

struct CachedJwt {
    token: String,
    expires_at: i64,
    refresh_at: i64,
    /// When it was last handed out (Unix seconds): the cache gives up the
    /// least recently used first.
    used_at: i64,
}

/// Whether the CA refused a call because the node SVID it came with has been
/// superseded (see `Ca::check_agent`).
fn superseded(s: &Status) -> bool {
    s.code() == Code::PermissionDenied
        && s.message().contains(ward_spec::grpc::SUPERSEDED_NODE_SVID)
}

/// Streams (calls) one connection to the Workload API has open at once, at
/// most; a client's next one waits for one to end.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// JWT-SVIDs kept for reuse, at most, and of one entry (audiences).
const MAX_CACHED_JWTS: usize = 4096;
const MAX_CACHED_JWTS_PER_ENTRY: usize = 256;

/// Makes room in `cache` for one more token of `entry`: the least recently
/// used of that entry's goes once it has its share, else the least recently
/// used of all once the cache is full. A workload asking for ever new audiences replaces its own
/// tokens, not other workloads'.
fn make_room(cache: &mut HashMap<JwtKey, CachedJwt>, entry: &str) {
    let oldest = |of_entry: bool| {
        cache
            .iter()
            .filter(|(k, _)| !of_entry || k.0 == entry)
            .min_by_key(|(_, c)| c.used_at)
            .map(|(k, _)| k.clone())
    };
    let own = cache.keys().filter(|k| k.0 == entry).count();
    let evict = if own >= MAX_CACHED_JWTS_PER_ENTRY {
        oldest(true)
    } else if cache.len() >= MAX_CACHED_JWTS {
        oldest(false)
    } else {
        None
    };
    if let Some(k) = evict {
        cache.remove(&k);
    }
}

/// Attestations running at once, at most (each on a blocking thread).
const ATTESTING: usize = 8;
/// Attestations of one uid's callers running at once, at most.
const ATTESTING_PER_UID: usize = 2;

/// Turns to attest a caller, taken before a blocking thread is: callers
/// waiting for one wait as futures (a cancelled call gives up its place), so
/// a user flooding the socket with calls whose executables take long to hash
/// holds a few blocking threads, not the pool that signing keys are made on,
/// and at most two of the turns every other user's callers share.
struct AttestTurns {
    any: Arc<tokio::sync::Semaphore>,
    per_uid: Arc<std::sync::Mutex<PerUid>>,
}

type PerUid = HashMap<u32, Arc<tokio::sync::Semaphore>>;

impl Default for AttestTurns {
    fn default() -> Self {
        AttestTurns {
            any: Arc::new(tokio::sync::Semaphore::new(ATTESTING)),
            per_uid: Arc::default(),
        }
    }
}

/// A turn, held by the blocking attestation until it is done.
struct AttestTurn {
    uid: u32,
    per_uid: Arc<std::sync::Mutex<PerUid>>,
    mine: Option<tokio::sync::OwnedSemaphorePermit>,
    _any: tokio::sync::OwnedSemaphorePermit,
}

impl AttestTurns {
    async fn take(&self, uid: u32) -> AttestTurn {
        let mine = {
            let mut m = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(uid)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(ATTESTING_PER_UID)))
                .clone()
        };
        // Held as the turn's (a dropped future gives its place up).
        let mine = mine.acquire_owned().await.expect("never closed");
        let any = self
            .any
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        AttestTurn {
            uid,
            per_uid: self.per_uid.clone(),
            mine: Some(mine),
            _any: any,
        }
    }

    /// Uids with turns taken or waited for (for tests).
    #[cfg(test)]
    fn uids(&self) -> usize {
        self.per_uid.lock().unwrap().len()
    }
}

impl Drop for AttestTurn {
    /// The last of a uid's turns out forgets its semaphore.
    fn drop(&mut self) {
        let mine = self.mine.take().expect("held until dropped");
        let mut m = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        let last = m.get(&self.uid).is_some_and(|s| Arc::strong_count(s) == 2);
        drop(mine);
        if last {
            m.remove(&self.uid);
        }
    }
}

/// A cached JWT-SVID's key: (entry ID, its SPIFFE ID, audience). An entry
/// given another SPIFFE ID gets a token of its own, not the one minted for
/// the old ID.
type JwtKey = (String, String, Vec<String>);

pub struct WorkloadApi {
    snapshots: watch::Receiver<Snap>,
    ca: Arc<Mutex<CaClient>>,
    attestor: Arc<Attestor>,
    turns: AttestTurns,
    jwts: Mutex<HashMap<JwtKey, CachedJwt>>,
    metrics: Arc<Metrics>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl WorkloadApi {
    pub fn new(
        snapshots: watch::Receiver<Snap>,
        ca: Arc<Mutex<CaClient>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        WorkloadApi {
            snapshots,
            ca,
            attestor: Arc::new(Attestor::counting(metrics.executables_hashed.clone())),
            turns: AttestTurns::default(),
            jwts: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Checks the security header and attests the caller. Reading `/proc`
    /// and hashing the caller's executable (a large one takes a while) is
    /// blocking work: it runs off the threads that serve everyone else.
    async fn caller<T>(&self, req: &Request<T>) -> Result<Attested, Status> {
        let CallerInfo { cred, proc, gone } = Self::peer(req)?;
        let attestor = self.attestor.clone();
        // (Before the first sync nothing says: hashed, to be safe.)
        let exe_hashed = self
            .snapshots
            .borrow()
            .as_ref()
            .is_none_or(|s| s.hashes_executables);
        let turn = self.turns.take(cred.uid).await;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let selectors = Attested {
                selectors: attestor.selectors(cred, proc.as_deref(), exe_hashed),
                exe_hashed,
            };
            match proc {
                _ if gone => {
                    tracing::warn!(pid = ?cred.pid, uid = cred.uid, "refused a Workload API call: the process that opened the connection had exited before it was accepted");
                    Err(Status::permission_denied(
                        "the process that opened this connection has exited",
                    ))
                }
                Some(p) if !p.alive() => {
                    tracing::warn!(pid = ?cred.pid, uid = cred.uid, "refused a Workload API call: the process that opened the connection has exited");
                    Err(Status::permission_denied(
                        "the process that opened this connection has exited",
                    ))
                }
                Some(p) if !p.same_program() => {
                    tracing::warn!(pid = ?cred.pid, uid = cred.uid, "refused a Workload API call: the process that opened the connection has executed another program since");
                    Err(Status::permission_denied(
                        "the process that opened this connection has executed another program since",
                    ))
                }
                _ => Ok(selectors),
            }
        })
        .await
        .map_err(|e| Status::internal(format!("attesting the caller failed: {e}")))?
    }

    /// Who opened the connection, once the security header is checked.
    fn peer<T>(req: &Request<T>) -> Result<CallerInfo, Status> {
        let header = req
            .metadata()
            .get("workload.spiffe.io")
            .and_then(|v| v.to_str().ok());
        if header != Some("true") {
            return Err(Status::invalid_argument(
                "security header missing from request: set metadata workload.spiffe.io: true",
            ));
        }
        req.extensions()
            .get::<Option<CallerInfo>>()
            .cloned()
            .flatten()
            .ok_or_else(|| Status::permission_denied("cannot determine the caller's credentials"))
    }

    async fn snapshot(&self) -> Result<Arc<Snapshot>, Status> {
        let mut rx = self.snapshots.clone();
        let got = tokio::time::timeout(FIRST_SNAPSHOT_WAIT, rx.wait_for(|s| s.is_some())).await;
        match got {
            Ok(Ok(s)) => Ok(s.clone().expect("waited for Some")),
            _ => Err(Status::unavailable(
                "the agent has not synced with the CA yet",
            )),
        }
    }

    /// Attests the caller and checks it matches at least one entry (for the
    /// agent's own services beside the Workload API).
    pub async fn attested_caller<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
    ) -> Result<(), Status> {
        let r = async {
            let selectors = self.caller(req).await?;
            let snap = self.snapshot().await?;
            if matching(&snap, &selectors).is_empty() {
                return Err(no_identity());
            }
            Ok(())
        }
        .await;
        self.record(method, r)
    }

    fn record<T>(&self, method: &'static str, r: Result<T, Status>) -> Result<T, Status> {
        let code = r.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
        self.metrics.api_call(method, code);
        if let Err(s) = &r {
            if s.code() == Code::PermissionDenied {
                tracing::info!(method, reason = %s.message(), "Workload API call denied");
            }
        }
        r
    }
}

/// Entries the caller's selectors match, in entry-ID order.
fn matching(snap: &Snapshot, selectors: &[String]) -> Vec<Arc<CachedEntry>> {
    snap.matching(selectors)
}

/// `entries` without those whose hint an older entry of them has (the
/// oldest by creation, then by ID, is kept), as SPIRE serves them: a hint
/// names one of a workload's identities for it to choose by.
fn unique_hints(mut entries: Vec<Arc<CachedEntry>>) -> Vec<Arc<CachedEntry>> {
    let mut first: HashMap<&str, &CachedEntry> = HashMap::new();
    for e in entries.iter().filter(|e| !e.hint.is_empty()) {
        let kept = first.entry(&e.hint).or_insert(e);
        if (e.created_at, &e.id) < (kept.created_at, &kept.id) {
            *kept = e;
        }
    }
    let losers: Vec<String> = entries
        .iter()
        .filter(|e| !e.hint.is_empty() && !std::ptr::eq(first[e.hint.as_str()], e.as_ref()))
        .map(|e| e.id.clone())
        .collect();
    if !losers.is_empty() {
        tracing::debug!(entries = ?losers, "not serving entries whose hint an older entry of the caller's has");
        entries.retain(|e| !losers.contains(&e.id));
    }
    entries
}

fn no_identity() -> Status {
    Status::permission_denied("no identity issued: no registration entry matches the caller")
}

/// The X.509 response for a caller, and a fingerprint to tell changes apart.
fn x509_response(
    snap: &Snapshot,
    selectors: &[String],
) -> Result<(pb::X509svidResponse, Vec<usize>), Status> {
    let entries = matching(snap, selectors);
    if entries.is_empty() {
        return Err(no_identity());
    }
    let now = unix_now();
    let bundle = snap.bundle.x509_der_concat();
    let mut fp = bundles_fingerprint(snap, &entries);
    let svids: Vec<pb::X509svid> = unique_hints(entries.clone())
        .iter()
        .filter_map(|e| {
            // An SVID signed before the entry was given another SPIFFE ID is
            // not served for it (until the new one is signed, none is).
            snap.svids
                .get(&e.id)
                .filter(|s| !s.expired(now) && s.spiffe_id == e.spiffe_id)
                .map(|s| (e, s))
        })
        .map(|(e, s)| {
            fp.push(Arc::as_ptr(s) as usize);
            pb::X509svid {
                spiffe_id: s.spiffe_id.to_string(),
                x509_svid: s.chain.clone(),
                x509_svid_key: s.key.clone(),
                bundle: bundle.clone(),
                hint: e.hint.clone(),
            }
        })
        .collect();
    if svids.is_empty() {
        return Err(Status::unavailable(
            "the caller's SVIDs are not issued yet; retry",
        ));
    }
    Ok((
        pb::X509svidResponse {
            svids,
            crl: Vec::new(),
            federated_bundles: snap
                .bundles_for(&entries)
                .skip(1)
                .map(|b| (b.trust_domain.id_string(), b.x509_der_concat()))
                .collect(),
        },
        fp,
    ))
}

/// What a caller's bundles depend on: ours and the federated set (by
/// identity), and which of them its entries federate with.
fn bundles_fingerprint(snap: &Snapshot, entries: &[Arc<CachedEntry>]) -> Vec<usize> {
    let mut fp = vec![
        Arc::as_ptr(&snap.bundle) as usize,
        Arc::as_ptr(&snap.federated) as usize,
    ];
    fp.extend(snap.federated.iter().enumerate().filter_map(|(i, b)| {
        entries
            .iter()
            .any(|e| e.federates_with.contains(&b.trust_domain))
            .then_some(i)
    }));
    fp
}

/// A caller's selectors, and whether its executable's hash is among them.
struct Attested {
    selectors: Vec<String>,
    exe_hashed: bool,
}

impl std::ops::Deref for Attested {
    type Target = [String];

    fn deref(&self) -> &[String] {
        &self.selectors
    }
}

/// Runs `build` now and after every snapshot change (and at the next SVID
/// expiry), sending each result that differs from the last. A caller
/// attested without its executable's hash (no entry selected by one) is
/// told to open the stream again once an entry does: `Unavailable`, which
/// Workload API clients retry.
fn follow<T, F>(mut snapshots: watch::Receiver<Snap>, selectors: Attested, build: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: Fn(&Snapshot, &[String]) -> Result<(T, Vec<usize>), Status> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        // The fingerprint (addresses of what the message was built from)
        // and the snapshot holding those objects alive, so no address is
        // reused by something new while it is compared against.
        let mut last: Option<(Vec<usize>, Arc<Snapshot>)> = None;
        loop {
            let snap = snapshots.borrow_and_update().clone();
            let Some(snap) = snap else { return };
            if snap.hashes_executables && !selectors.exe_hashed {
                let _ = tx.try_send(Err(Status::unavailable(
                    "an entry now selects by executable hash (unix:sha256): open the stream again to be attested anew",
                )));
                return;
            }
            match build(&snap, &selectors) {
                Ok((msg, fp)) => {
                    if last.as_ref().map(|(f, _)| f) != Some(&fp) && tx.send(Ok(msg)).await.is_err()
                    {
                        return;
                    }
                    // The newest snapshot holds what the message was built
                    // from as well (the same addresses are the same live
                    // objects): an older one, kept, would keep a copy of
                    // every map the manager has changed since.
                    last = Some((fp, snap.clone()));
                }
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
            let now = unix_now();
            let next_expiry = snap
                .svids
                .values()
                .map(|s| s.not_after)
                .filter(|&t| t > now)
                .min();
            let expiry_wait = Duration::from_secs(next_expiry.map_or(3600, |t| (t - now) as u64));
            tokio::select! {
                r = snapshots.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
                _ = tokio::time::sleep(expiry_wait) => {}
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn json_to_prost(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_prost).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_prost(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let r = async {
            let selectors = self.caller(&req).await?;
            let snap = self.snapshot().await?;
            // Refuse at once, not inside the stream, when nothing matches.
            if matching(&snap, &selectors).is_empty() {
                return Err(no_identity());
            }
            Ok(Response::new(follow(
                self.snapshots.clone(),
                selectors,
                x509_response,
            )))
        }
        .await;
        self.record("FetchX509SVID", r)
    }

    type FetchX509BundlesStream = BoxStream<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let r = self
            .bundle_stream(&req, |snap, entries| pb::X509BundlesResponse {
                crl: Vec::new(),
                bundles: snap
                    .bundles_for(entries)
                    .map(|b| (b.trust_domain.id_string(), b.x509_der_concat()))
                    .collect(),
            })
            .await;
        self.record("FetchX509Bundles", r)
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let r = async {
            let selectors = self.caller(&req).await?;
            let body = req.get_ref();
            if let Some(why) = ward_spec::jwt::audience_problem(&body.audience) {
                return Err(Status::invalid_argument(format!("audience: {why}")));
            }
            // A requested ID that is none is the caller's mistake (as SPIRE
            // says), not a missing identity.
            let wanted = match body.spiffe_id.as_str() {
                "" => None,
                id => Some(SpiffeId::parse(id).map_err(|e| {
                    Status::invalid_argument(format!("invalid requested SPIFFE ID {id:?}: {e}"))
                })?),
            };
            let snap = self.snapshot().await?;
            // (An entry whose hint an older one has is not the caller's to
            // ask for by its ID either.)
            let mut entries = unique_hints(matching(&snap, &selectors));
            if let Some(wanted) = &wanted {
                entries.retain(|e| &e.spiffe_id == wanted);
            }
            if entries.is_empty() {
                return Err(no_identity());
            }
            let mut audience = body.audience.clone();
            audience.sort();
            audience.dedup();
            let mut svids = Vec::new();
            for e in entries {
                let token = self.jwt_for(&e, &audience).await?;
                svids.push(pb::Jwtsvid {
                    spiffe_id: e.spiffe_id.to_string(),
                    svid: token,
                    hint: e.hint.clone(),
                });
            }
            Ok(Response::new(pb::JwtsvidResponse { svids }))
        }
        .await;
        self.record("FetchJWTSVID", r)
    }

    type FetchJWTBundlesStream = BoxStream<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let r = self
            .bundle_stream(&req, |snap, entries| pb::JwtBundlesResponse {
                bundles: snap
                    .bundles_for(entries)
                    .map(|b| (b.trust_domain.id_string(), b.to_jwt_jwks()))
                    .collect(),
            })
            .await;
        self.record("FetchJWTBundles", r)
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let r = async {
            let selectors = self.caller(&req).await?;
            let body = req.get_ref();
            if body.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if body.svid.is_empty() {
                return Err(Status::invalid_argument("svid must be specified"));
            }
            let snap = self.snapshot().await?;
            let entries = matching(&snap, &selectors);
            if entries.is_empty() {
                return Err(no_identity());
            }
            let (id, claims) = ward_spec::jwt::validate_any(
                &body.svid,
                &body.audience,
                snap.bundles_for(&entries),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let fields = match json_to_prost(&claims).kind {
                Some(prost_types::value::Kind::StructValue(s)) => Some(s),
                _ => None,
            };
            Ok(Response::new(pb::ValidateJwtsvidResponse {
                spiffe_id: id.to_string(),
                claims: fields,
            }))
        }
        .await;
        self.record("ValidateJWTSVID", r)
    }
}

impl WorkloadApi {
    /// A stream of `render(snapshot, caller's entries)` for a caller with an
    /// identity: now, and on every change of its bundles; it ends with
    /// PermissionDenied if the caller loses its last entry.
    async fn bundle_stream<Req, T>(
        &self,
        req: &Request<Req>,
        render: fn(&Snapshot, &[Arc<CachedEntry>]) -> T,
    ) -> Result<Response<BoxStream<T>>, Status>
    where
        T: Send + 'static,
    {
        let selectors = self.caller(req).await?;
        let snap = self.snapshot().await?;
        if matching(&snap, &selectors).is_empty() {
            return Err(no_identity());
        }
        Ok(Response::new(follow(
            self.snapshots.clone(),
            selectors,
            move |snap, sel| {
                let entries = matching(snap, sel);
                if entries.is_empty() {
                    return Err(no_identity());
                }
                Ok((render(snap, &entries), bundles_fingerprint(snap, &entries)))
            },
        )))
    }

    /// A cached JWT-SVID until half of its life, else a fresh one from the CA.
    async fn jwt_for(&self, e: &CachedEntry, audience: &[String]) -> Result<String, Status> {
        let key = (e.id.clone(), e.spiffe_id.to_string(), audience.to_vec());
        let now = unix_now();
        if let Some(c) = self.jwts.lock().await.get_mut(&key) {
            if now < c.refresh_at {
                c.used_at = now;
                return Ok(c.token.clone());
            }
        }
        let mint = || async {
            let mut client = self
                .ca
                .lock()
                .await
                .get()
                .await
                .map_err(Status::unavailable)?;
            client
                .mint_jwt_svid(node_pb::MintJwtSvidRequest {
                    entry_id: e.id.clone(),
                    audience: audience.to_vec(),
                    spiffe_id: e.spiffe_id.to_string(),
                })
                .await
                .map(|r| r.into_inner())
        };
        let mut minted = mint().await;
        // Sent on the connection made with the node SVID a renewal has just
        // replaced, the moment a call on the new connection made the new one
        // current: the client now holds the new connection, so once more.
        if matches!(&minted, Err(s) if superseded(s)) {
            minted = mint().await;
        }
        let mut cache = self.jwts.lock().await;
        match minted {
            Ok(m) => {
                let token = m.token.clone();
                cache.retain(|_, c| c.expires_at > now);
                if !cache.contains_key(&key) {
                    make_room(&mut cache, &e.id);
                }
                cache.insert(
                    key,
                    CachedJwt {
                        token: m.token,
                        expires_at: m.expires_at,
                        refresh_at: now + (m.expires_at - now) / 2,
                        used_at: now,
                    },
                );
                Ok(token)
            }
            Err(status) => {
                let away = !refused(status.code());
                match cache.get(&key) {
                    // The CA is away: a still-valid cached token is better than none.
                    Some(c) if away && c.expires_at > now => Ok(c.token.clone()),
                    _ => {
                        // A refusal (the entry was deleted or renamed at the
                        // CA) ends what was cached for it, and is passed on.
                        if !away {
                            cache.remove(&key);
                            return Err(mint_failed(&status));
                        }
                        drop(cache);
                        if status.code() == Code::Unavailable {
                            self.ca.lock().await.failed();
                        }
                        Err(mint_failed(&status))
                    }
                }
            }
        }
    }
}

/// What a workload is told when the CA did not mint its token: `Unavailable`
/// whatever the CA said, as SPIRE's agent answers. A workload reads
/// `PermissionDenied` as "no identity here" and `InvalidArgument` as its own
/// mistake; a refusal at the CA (the entry deleted or renamed there, and
/// not yet here) is neither, and clears once the agent has synced: the
/// workload's retry then gets the agent's own answer.
fn mint_failed(status: &Status) -> Status {
    Status::unavailable(format!(
        "cannot mint a JWT-SVID: the CA answered {:?}: {}",
        status.code(),
        status.message()
    ))
}

/// Whether the CA's answer to a mint is a refusal of this entry's token (it
/// was deleted or renamed, or the request was wrong), which ends what was
/// cached for it. Anything else (the CA unreachable, overloaded, failing
/// inside) is the CA's trouble: a cached token still valid is served, as
/// SPIRE's agent answers `Unavailable` rather than pass the CA's code on.
fn refused(code: Code) -> bool {
    matches!(
        code,
        Code::PermissionDenied | Code::NotFound | Code::InvalidArgument | Code::FailedPrecondition
    )
}

#[cfg(test)]
mod mint_tests {
    use super::*;

    /// Only what says the entry's token is not to be had drops the cached
    /// one; the CA's own trouble does not.
    #[test]
    fn only_a_refusal_ends_a_cached_token() {
        for code in [
            Code::PermissionDenied,
            Code::NotFound,
            Code::InvalidArgument,
            Code::FailedPrecondition,
        ] {
            assert!(refused(code), "{code:?}");
        }
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Unknown,
            Code::Internal,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Unauthenticated,
        ] {
            assert!(!refused(code), "{code:?}");
        }
        // Either way the workload is told the agent cannot answer now.
        let told = mint_failed(&Status::permission_denied("entry e1 does not exist"));
        assert_eq!(told.code(), Code::Unavailable);
        assert!(
            told.message().contains("entry e1 does not exist"),
            "{told:?}"
        );
    }
}

#[cfg(test)]
mod jwt_cache_tests {
    use super::*;

    /// A workload asking for ever new audiences replaces its own least
    /// recently used tokens once it has its share; the others' stay. A full
    /// cache gives up its least recently used token, not one in use.
    #[test]
    fn one_entrys_flood_of_audiences_replaces_only_its_own_tokens() {
        let mut cache = HashMap::new();
        let put = |cache: &mut HashMap<JwtKey, CachedJwt>, entry: &str, n: i64| {
            make_room(cache, entry);
            let key = (
                entry.to_owned(),
                "spiffe://td/w".to_owned(),
                vec![n.to_string()],
            );
            let jwt = CachedJwt {
                token: String::new(),
                expires_at: n + 10,
                refresh_at: n + 5,
                used_at: n,
            };
            cache.insert(key, jwt);
        };
        put(&mut cache, "other", 0);
        for n in 1..=1000 {
            put(&mut cache, "flood", n);
        }
        let of = |cache: &HashMap<JwtKey, CachedJwt>, entry: &str| {
            cache.keys().filter(|k| k.0 == entry).count()
        };
        assert_eq!(of(&cache, "flood"), MAX_CACHED_JWTS_PER_ENTRY);
        assert_eq!(of(&cache, "other"), 1, "another entry's token was dropped");
        // The flood kept its newest.
        let newest = (
            "flood".to_owned(),
            "spiffe://td/w".to_owned(),
            vec!["1000".to_owned()],
        );
        assert!(cache.contains_key(&newest));
        // The flood's oldest token, handed out again, is in use.
        let oldest_kept = (
            "flood".to_owned(),
            "spiffe://td/w".to_owned(),
            vec![(1001 - MAX_CACHED_JWTS_PER_ENTRY).to_string()],
        );
        cache.get_mut(&oldest_kept).unwrap().used_at = 1_000_000;
        // Many entries fill the cache: the least recently used go.
        for n in 0..MAX_CACHED_JWTS as i64 {
            put(&mut cache, &format!("e{n}"), 2000 + n);
        }
        assert_eq!(cache.len(), MAX_CACHED_JWTS);
        assert_eq!(of(&cache, "other"), 0, "the least recently used stayed");
        assert!(
            cache.contains_key(&oldest_kept),
            "a token in use was given up"
        );
    }
}

#[cfg(test)]
mod turn_tests {
    use super::*;

    /// Whether `take` gets a turn within 100 ms.
    async fn gets_one(turns: &AttestTurns, uid: u32) -> Option<AttestTurn> {
        tokio::time::timeout(Duration::from_millis(100), turns.take(uid))
            .await
            .ok()
    }

    /// One uid's callers hold two turns at most, and all callers eight; a
    /// waiting caller gets a turn as one is given back; the last of a uid's
    /// turns out forgets that uid.
    #[tokio::test]
    async fn attestations_take_turns_two_per_uid_and_eight_in_all() {
        let turns = AttestTurns::default();
        let mut flood = vec![
            gets_one(&turns, 1000).await.unwrap(),
            gets_one(&turns, 1000).await.unwrap(),
        ];
        assert!(
            gets_one(&turns, 1000).await.is_none(),
            "a third turn for one uid"
        );
        let mut others = Vec::new();
        for uid in 1..=6 {
            others.push(gets_one(&turns, uid).await.expect("another uid waited"));
        }
        assert!(gets_one(&turns, 7).await.is_none(), "a ninth turn in all");
        others.pop();
        assert!(
            gets_one(&turns, 7).await.is_some(),
            "a turn given back went to no one"
        );
        flood.pop();
        let third = gets_one(&turns, 1000)
            .await
            .expect("the uid's turn was not given back");
        drop((flood, others, third));
        assert_eq!(turns.uids(), 0, "uids without turns are remembered");
    }
}

#[cfg(test)]
mod follow_tests {
    use super::*;
    use tokio_stream::StreamExt;
    use ward_spec::TrustBundle;

    /// A snapshot with no entries or SVIDs, sharing `bundle`.
    fn snapshot(bundle: &Arc<TrustBundle>) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            entries: Arc::default(),
            svids: Arc::default(),
            by_selector: Arc::default(),
            hashes_executables: false,
            bundle: bundle.clone(),
            federated: Arc::default(),
        })
    }

    /// A stream whose message is unchanged by a new snapshot sends nothing
    /// and keeps no older snapshot than the newest alive (which would keep
    /// a copy of every map changed since).
    #[tokio::test]
    async fn a_stream_keeps_only_the_newest_snapshot() {
        let bundle = Arc::new(TrustBundle::new(
            ward_spec::TrustDomain::new("example.org").unwrap(),
        ));
        let first = snapshot(&bundle);
        let (tx, rx) = watch::channel(Some(first.clone()));
        let caller = Attested {
            selectors: vec![],
            exe_hashed: true,
        };
        let mut stream = follow(rx, caller, |snap, _| {
            Ok(((), vec![Arc::as_ptr(&snap.bundle) as usize]))
        });
        stream.next().await.unwrap().unwrap();
        tx.send_replace(Some(snapshot(&bundle)));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&first) > 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stream still holds the first snapshot"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sent = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
        assert!(sent.is_err(), "an unchanged message was sent again");
    }
}
