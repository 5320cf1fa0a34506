//! The node API (gRPC over mutual TLS): what agents ask of the CA.
//!
//! The caller's identity is the SPIFFE ID of the client certificate the TLS
//! layer verified ([`PeerIdentity`]); only `Attest` may be called without one.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use ward_spec::proto::node::v1 as pb;
use ward_spec::proto::node::v1::node_server::Node;
use ward_spec::proto::types::v1 as types;
use ward_spec::SpiffeId;

use crate::datastore::{Entry, PolicySetRecord};
use crate::service::{Ca, NodeSvid, Notice};

/// The verified SPIFFE ID of the peer of a TLS connection, if it sent a
/// certificate, and that certificate's serial number and expiry.
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Option<SpiffeId>, pub NodeSvid);

pub struct NodeApi {
    pub ca: Arc<Ca>,
    pub change_streams: ChangeStreams,
}

/// The most change streams one agent holds open: it needs one, and one
/// more while it replaces a stream whose connection it gave up on.
pub const MAX_CHANGE_STREAMS_PER_AGENT: usize = 4;

/// The change streams open at this replica, by agent. A new stream beyond
/// [`MAX_CHANGE_STREAMS_PER_AGENT`] ends the agent's oldest: an agent whose
/// old connections died unseen (no FIN reached the CA) is always served
/// on its newest, and no agent holds more.
#[derive(Clone)]
pub struct ChangeStreams {
    inner: Arc<std::sync::Mutex<ChangeStreamsInner>>,
    /// How many are open (`ward_ca_change_streams`).
    gauge: prometheus_client::metrics::gauge::Gauge<i64, std::sync::atomic::AtomicI64>,
}

#[derive(Default)]
struct ChangeStreamsInner {
    next: u64,
    open: std::collections::HashMap<
        String,
        std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>,
    >,
}

/// One open change stream; notified when a newer one supersedes it.
struct ChangeStream {
    streams: ChangeStreams,
    agent: String,
    serial: u64,
    superseded: Arc<tokio::sync::Notify>,
}

impl ChangeStreams {
    /// None open yet; `gauge` counts those that will be.
    pub fn new(
        gauge: prometheus_client::metrics::gauge::Gauge<i64, std::sync::atomic::AtomicI64>,
    ) -> ChangeStreams {
        ChangeStreams {
            inner: Arc::default(),
            gauge,
        }
    }

    fn open(&self, agent: &str) -> ChangeStream {
        let superseded = Arc::new(tokio::sync::Notify::new());
        self.gauge.inc();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.next += 1;
        let serial = inner.next;
        let open = inner.open.entry(agent.to_owned()).or_default();
        open.push_back((serial, superseded.clone()));
        if open.len() > MAX_CHANGE_STREAMS_PER_AGENT {
            if let Some((_, oldest)) = open.pop_front() {
                oldest.notify_one();
            }
        }
        ChangeStream {
            streams: self.clone(),
            agent: agent.to_owned(),
            serial,
            superseded,
        }
    }
}

impl Drop for ChangeStream {
    fn drop(&mut self) {
        self.streams.gauge.dec();
        let mut inner = self.streams.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = inner.open.get_mut(&self.agent) {
            open.retain(|(serial, _)| *serial != self.serial);
            if open.is_empty() {
                inner.open.remove(&self.agent);
            }
        }
    }
}

/// How long from now until the end of Unix second `secs`.
fn until_unix(secs: i64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(secs.saturating_add(1).max(0) as u64).saturating_sub(now)
}

/// The caller's SPIFFE ID and the node SVID it presented (see [`peer_svid`]).
fn caller_svid<T>(req: &Request<T>) -> Result<(SpiffeId, NodeSvid), Status> {
    peer_svid(req, "node SVID")
}

/// The caller's SPIFFE ID and the SVID (`kind`: a node's, an admin's) it
/// presented, which must not have expired since its connection's handshake
/// (a connection outlives the certificate it was made with; its calls do not).
pub(crate) fn peer_svid<T>(req: &Request<T>, kind: &str) -> Result<(SpiffeId, NodeSvid), Status> {
    let Some(PeerIdentity(Some(id), svid)) = req.extensions().get::<PeerIdentity>() else {
        return Err(Status::unauthenticated(format!(
            "this call needs the caller's {kind} as client certificate"
        )));
    };
    if svid.not_after <= time::OffsetDateTime::now_utc().unix_timestamp() {
        return Err(Status::unauthenticated(format!(
            "the {kind} this connection was made with (serial {}) has expired: connect again with the current one",
            svid.serial
        )));
    }
    Ok((id.clone(), svid.clone()))
}

pub fn policy_set_to_pb(p: &PolicySetRecord) -> types::PolicySet {
    types::PolicySet {
        version: p.version,
        files: p
            .files
            .iter()
            .map(|(name, text)| types::PolicyFile {
                name: name.clone(),
                text: text.clone(),
            })
            .collect(),
        created_at: p.created_at,
        comment: p.comment.clone(),
        digest: p.digest.clone(),
    }
}

pub fn entry_to_pb(e: &Entry) -> types::Entry {
    types::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e
            .selectors
            .iter()
            .map(|s| types::Selector {
                r#type: s.kind.clone(),
                value: s.value.clone(),
            })
            .collect(),
        x509_ttl: e.x509_ttl,
        jwt_ttl: e.jwt_ttl,
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        admin: e.admin,
        revision: e.revision,
        created_at: e.created_at,
        federates_with: e.federates_with.iter().map(|t| t.id_string()).collect(),
    }
}

/// Our bundle, with the federated ones.
pub fn bundle_pb(ca: &Ca) -> types::Bundle {
    let b = ca.authority.bundle();
    types::Bundle {
        trust_domain: b.trust_domain.to_string(),
        jwks: b.to_jwks(),
        sequence: b.sequence,
        federated: ca
            .federated_bundles()
            .iter()
            .map(|f| (f.trust_domain.to_string(), f.to_jwks()))
            .collect(),
        ..Default::default()
    }
}

impl NodeApi {
    pub fn bundle_pb(&self) -> types::Bundle {
        bundle_pb(&self.ca)
    }
}

#[tonic::async_trait]
impl Node for NodeApi {
    async fn attest(
        &self,
        req: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let r = req.into_inner();
        let svid = self.ca.attest(&r.join_token, &r.csr).await?;
        Ok(Response::new(pb::AttestResponse {
            spiffe_id: svid.spiffe_id.to_string(),
            svid_chain: svid.chain,
            bundle: Some(self.bundle_pb()),
        }))
    }

    async fn renew_node_svid(
        &self,
        req: Request<pb::RenewNodeSvidRequest>,
    ) -> Result<Response<pb::RenewNodeSvidResponse>, Status> {
        let (id, presented) = caller_svid(&req)?;
        let svid = self
            .ca
            .renew(&id, &presented, &req.into_inner().csr)
            .await?;
        Ok(Response::new(pb::RenewNodeSvidResponse {
            svid_chain: svid.chain,
        }))
    }

    async fn sync_entries(
        &self,
        req: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        let (id, presented) = caller_svid(&req)?;
        let r = req.into_inner();
        let page = self
            .ca
            .sync(&id, &presented, r.since_revision, &r.after_entry_id)
            .await?;
        Ok(Response::new(pb::SyncEntriesResponse {
            entries: page.entries.iter().map(entry_to_pb).collect(),
            deleted_entry_ids: page.deleted,
            revision: page.revision,
            more: page.more,
            restart: page.restart,
            after_entry_id: page.after,
        }))
    }

    async fn sign_x509_svid(
        &self,
        req: Request<pb::SignX509SvidRequest>,
    ) -> Result<Response<pb::SignX509SvidResponse>, Status> {
        let (id, presented) = caller_svid(&req)?;
        let r = req.into_inner();
        let mut results = self
            .ca
            .sign_batch(&id, &presented, vec![(r.entry_id, r.csr)])
            .await?;
        let svid = results.pop().expect("one result per request")?;
        Ok(Response::new(pb::SignX509SvidResponse {
            svid_chain: svid.chain,
            expires_at: svid.expires_at,
        }))
    }

    async fn batch_sign_x509_svid(
        &self,
        req: Request<pb::BatchSignX509SvidRequest>,
    ) -> Result<Response<pb::BatchSignX509SvidResponse>, Status> {
        const MAX_BATCH: usize = 1000;
        let (id, presented) = caller_svid(&req)?;
        let requests = req.into_inner().requests;
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "batch of {} requests exceeds the limit of {MAX_BATCH}",
                requests.len()
            )));
        }
        let pairs: Vec<(String, Vec<u8>)> =
            requests.into_iter().map(|r| (r.entry_id, r.csr)).collect();
        let ids: Vec<String> = pairs.iter().map(|(id, _)| id.clone()).collect();
        let results = self.ca.sign_batch(&id, &presented, pairs).await?;
        Ok(Response::new(pb::BatchSignX509SvidResponse {
            results: results
                .into_iter()
                .zip(ids)
                .map(|(r, entry_id)| match r {
                    Ok(svid) => pb::SignResult {
                        entry_id,
                        code: 0,
                        message: String::new(),
                        svid_chain: svid.chain,
                        expires_at: svid.expires_at,
                    },
                    Err(e) => pb::SignResult {
                        entry_id,
                        code: e.code as i32,
                        message: e.message,
                        svid_chain: Vec::new(),
                        expires_at: 0,
                    },
                })
                .collect(),
        }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let (id, presented) = caller_svid(&req)?;
        let r = req.into_inner();
        let (token, expires_at) = self
            .ca
            .mint_jwt(&id, &presented, &r.entry_id, &r.audience, &r.spiffe_id)
            .await?;
        Ok(Response::new(pb::MintJwtSvidResponse { token, expires_at }))
    }

    type WatchChangesStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ChangeNotice, Status>> + Send>,
    >;

    async fn watch_changes(
        &self,
        req: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        use tokio::sync::broadcast::error::RecvError;
        let (id, presented) = caller_svid(&req)?;
        self.ca
            .check_agent_standing(&id, &presented, "watch_changes")
            .await?;
        // A notice at once; then one per change of the bundle or the policy
        // set, and one per entry change under this agent (or when changes
        // may have been missed), never for other agents' entries. The
        // stream ends when the node SVID it was opened with expires, when
        // the agent is evicted (looked at when its record changes, here or
        // at another replica), or when the agent opened more than
        // MAX_CHANGE_STREAMS_PER_AGENT after it: the agent opens another
        // with its current SVID, if it still may.
        let mut state = self.ca.watch_changes();
        let mut entries = self.ca.entry_changes();
        let mut agents = self.ca.agent_changes();
        let me = id.to_string();
        let slot = self.change_streams.open(&me);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let ca = self.ca.clone();
        let expired = tokio::time::sleep(until_unix(presented.not_after));
        tokio::spawn(async move {
            tokio::pin!(expired);
            let notice = |n: Notice| {
                Ok(pb::ChangeNotice {
                    entry_revision: n.entry_revision,
                    bundle_sequence: n.bundle_sequence,
                    policy_version: n.policy_version,
                    federation_version: n.federation_version,
                })
            };
            // A notice waits for room (the agent reads slowly), but not
            // past the stream's end: an agent whose connection died unseen
            // reads nothing, and its stream must still end.
            macro_rules! send_or_end {
                ($n:expr) => {
                    let delivered = tokio::select! {
                        r = tx.send($n) => r.is_ok(),
                        () = slot.superseded.notified() => false,
                        () = &mut expired => false,
                    };
                    if !delivered {
                        return;
                    }
                };
            }
            let mut sent = *state.borrow_and_update();
            send_or_end!(notice(sent));
            loop {
                let news = tokio::select! {
                    r = state.changed() => {
                        if r.is_err() {
                            return;
                        }
                        let n = *state.borrow_and_update();
                        n.bundle_sequence != sent.bundle_sequence
                            || n.policy_version != sent.policy_version
                            || n.federation_version != sent.federation_version
                    }
                    r = entries.recv() => match r {
                        Ok(c) => c.parents.as_ref().is_none_or(|p| p.contains(&me)),
                        Err(RecvError::Lagged(_)) => true,
                        Err(RecvError::Closed) => return,
                    },
                    _ = tx.closed() => return,
                    () = slot.superseded.notified() => {
                        tracing::info!(agent = %me, "a change stream ends: the agent opened {MAX_CHANGE_STREAMS_PER_AGENT} newer ones");
                        // (Its last word, if there is room: with none the
                        // agent is not reading, and the stream just ends.)
                        let _ = tx.try_send(Err(Status::resource_exhausted(format!(
                            "this agent opened {MAX_CHANGE_STREAMS_PER_AGENT} newer change streams; the oldest ends"
                        ))));
                        return;
                    }
                    () = &mut expired => {
                        let _ = tx.try_send(Err(Status::unauthenticated(
                            "the node SVID this stream was opened with has expired",
                        )));
                        return;
                    }
                    r = agents.recv() => {
                        let mine = match r {
                            Ok(changed) => changed == me,
                            Err(RecvError::Lagged(_)) => true,
                            Err(RecvError::Closed) => return,
                        };
                        // (A database that does not answer now is no
                        // eviction: the stream goes on.)
                        if mine && ca.agent_gone(&id).await.unwrap_or(false) {
                            let refused = ca.refuse_agent(&id, true, "watch_changes");
                            let _ = tx.try_send(Err(refused.into()));
                            return;
                        }
                        false
                    }
                };
                if news {
                    sent = *state.borrow();
                    send_or_end!(notice(sent));
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn fetch_policy(
        &self,
        req: Request<pb::FetchPolicyRequest>,
    ) -> Result<Response<pb::FetchPolicyResponse>, Status> {
        let (id, presented) = caller_svid(&req)?;
        self.ca.check_agent(&id, &presented, "fetch_policy").await?;
        let known = req.into_inner().known_version;
        // The common case, answered from memory: the caller is up to date.
        let current = self.ca.policy_version();
        if current == known {
            return Ok(Response::new(pb::FetchPolicyResponse {
                version: current,
                policy_set: None,
            }));
        }
        let active = self.ca.get_policy(None).await?;
        let version = active.as_ref().map_or(0, |p| p.version);
        Ok(Response::new(pb::FetchPolicyResponse {
            version,
            policy_set: active
                .filter(|p| p.version != known)
                .map(|p| policy_set_to_pb(&p)),
        }))
    }

    async fn fetch_bundle(
        &self,
        req: Request<pb::FetchBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        let (id, presented) = caller_svid(&req)?;
        self.ca.check_agent(&id, &presented, "fetch_bundle").await?;
        Ok(Response::new(self.bundle_pb()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presenting(not_after: i64) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut().insert(PeerIdentity(
            Some(SpiffeId::parse("spiffe://example.org/tenant/acme/ns/ops/sa/admin").unwrap()),
            NodeSvid {
                serial: "0a".into(),
                not_after,
            },
        ));
        req
    }

    /// A call on a connection whose client certificate has expired since
    /// its handshake is refused, whichever API it is for (the admin API's
    /// remote callers too); one without a certificate is told what to present.
    #[test]
    fn a_call_after_the_presented_svid_expired_is_refused() {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let (id, _) = peer_svid(&presenting(now + 60), "admin SVID").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://example.org/tenant/acme/ns/ops/sa/admin"
        );
        let e = peer_svid(&presenting(now - 1), "admin SVID").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(
            e.message().contains("admin SVID") && e.message().contains("serial 0a"),
            "{}",
            e.message()
        );
        let e = peer_svid(&Request::new(()), "admin SVID").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
}
