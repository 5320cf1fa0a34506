//! The admin API: what operators ask of the CA.
//!
//! It is served twice. On the local Unix socket (mode 0600) the caller is the
//! operator. On the node API's mutual-TLS port the caller is a remote admin:
//! its client certificate must be an SVID whose SPIFFE ID has an entry marked
//! `admin`. Every change (entries, join tokens) is decided by the active
//! Cedar policy set for either caller, and refusals are audited; a remote admin
//! sees only its tenant's entries and may not touch agents, keys or policies.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use ward_spec::proto::admin::v1 as pb;
use ward_spec::proto::admin::v1::admin_server::Admin;
use ward_spec::proto::types::v1 as types;
use ward_spec::SpiffeId;

use ward_authz::AdminPrincipal;

use crate::datastore::{BundleDeleteMode, EntryFilter, PolicySetRecord};
use crate::node_api::{entry_to_pb, policy_set_to_pb};
use crate::service::{Ca, EntrySpec};

pub struct AdminApi {
    pub ca: Arc<Ca>,
    /// Served over mutual TLS to remote admins (else the local socket).
    pub remote: bool,
}

impl AdminApi {
    /// Who is calling: the operator on the local socket, or a remote admin.
    async fn caller<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
    ) -> Result<AdminPrincipal, Status> {
        if !self.remote {
            return Ok(AdminPrincipal::Operator);
        }
        let (id, _) = crate::node_api::peer_svid(req, "admin SVID")?;
        let filter = EntryFilter {
            parent_id: None,
            spiffe_id: Some(id.clone()),
        };
        // Every entry with this ID is looked at (one per node it runs on,
        // perhaps, only some of them marked admin) until one marked admin.
        let fetch = |after: Option<String>| {
            let filter = &filter;
            async move { self.ca.list_entries(filter, after.as_deref(), 500).await }
        };
        let admin = visible_page(fetch, |e| e.admin, None, 500, 1).await?;
        if admin.is_empty() {
            self.ca
                .refuse_admin(method, &id, "no entry marked admin has this SPIFFE ID");
            return Err(Status::permission_denied(format!(
                "{id} is not an admin: no registration entry marked admin has this SPIFFE ID"
            )));
        }
        Ok(AdminPrincipal::Admin(id))
    }

    /// Calls only the local operator may make.
    async fn operator_only<T>(&self, req: &Request<T>, method: &'static str) -> Result<(), Status> {
        match self.caller(req, method).await? {
            AdminPrincipal::Operator => Ok(()),
            AdminPrincipal::Admin(id) => {
                self.ca
                    .refuse_admin(method, &id, "only the local operator may call this");
                Err(Status::permission_denied(format!(
                    "{method} is for the operator on the CA's local admin socket only"
                )))
            }
        }
    }

    /// For a remote admin, an entry outside its tenant does not exist: a
    /// refusal to change one (decided by the policy set and audited, as
    /// any) is answered as reading it is, `NotFound`, not with the refusal's
    /// message, which names the entry's SPIFFE ID and tenant.
    async fn hide_refusal<T>(
        &self,
        caller: &AdminPrincipal,
        id: &str,
        r: Result<T, crate::service::CaError>,
    ) -> Result<T, Status> {
        match r {
            Err(e)
                if e.code == tonic::Code::PermissionDenied
                    && matches!(caller, AdminPrincipal::Admin(_)) =>
            {
                match self.ca.get_entry(id).await {
                    Ok(old) if !self.visible(caller, &old) => Err(no_such_entry(id)),
                    _ => Err(e.into()),
                }
            }
            r => r.map_err(Into::into),
        }
    }

    /// A remote admin reads only its own tenant's entries.
    fn visible(&self, caller: &AdminPrincipal, e: &crate::datastore::Entry) -> bool {
        match caller {
            AdminPrincipal::Operator => true,
            AdminPrincipal::Admin(id) => {
                let mine = self.ca.tenant_of(id);
                !mine.is_empty() && self.ca.tenant_of(&e.spiffe_id) == mine
            }
        }
    }
}

/// What a remote admin is told of an entry outside its tenant (as of one
/// that does not exist: the same words).
fn no_such_entry(id: &str) -> Status {
    Status::not_found(format!("entry {id:?} does not exist"))
}

fn summary(p: &PolicySetRecord, active: bool) -> pb::PolicySetSummary {
    pb::PolicySetSummary {
        version: p.version,
        created_at: p.created_at,
        comment: p.comment.clone(),
        digest: p.digest.clone(),
        files: p.files.len() as u32,
        policies: p.policies as u32,
        active,
    }
}

/// A page of the policy history (newest first). The newest version is the
/// active one: it heads the first page.
fn policy_page(sets: &[PolicySetRecord], first_page: bool, limit: u32) -> pb::ListPoliciesResponse {
    pb::ListPoliciesResponse {
        versions: sets
            .iter()
            .enumerate()
            .map(|(i, p)| summary(p, first_page && i == 0))
            .collect(),
        next_page_token: next_page(sets, limit, |p| p.version.to_string()),
    }
}

fn spec_from_pb(e: types::Entry, with_id: bool) -> EntrySpec {
    EntrySpec {
        id: (with_id || !e.id.is_empty())
            .then_some(e.id)
            .filter(|i| !i.is_empty()),
        spiffe_id: e.spiffe_id,
        parent_id: e.parent_id,
        selectors: e
            .selectors
            .into_iter()
            .map(|s| format!("{}:{}", s.r#type, s.value))
            .collect(),
        x509_ttl: e.x509_ttl,
        jwt_ttl: e.jwt_ttl,
        dns_names: e.dns_names,
        hint: e.hint,
        admin: e.admin,
        federates_with: e.federates_with,
    }
}

/// A list call's page: the key to start after, and how many (0 means 500,
/// at most 5,000).
fn page(token: &str, size: u32) -> (Option<&str>, u32) {
    let limit = match size {
        0 => 500,
        n => n.min(5000),
    };
    ((!token.is_empty()).then_some(token), limit)
}

/// The token of the page after `items`: its last key if the page is full
/// (there may be more), empty if this was the last page.
fn next_page<T>(items: &[T], limit: u32, key: impl Fn(&T) -> String) -> String {
    match items.last() {
        Some(last) if items.len() == limit as usize => key(last),
        _ => String::new(),
    }
}

/// A page of up to `limit` entries the caller may see, after the ID
/// `after`: batches of every entry (from `fetch`, given the ID to go on
/// after; `batch` entries unless none are left) are read until `limit` are
/// found or none are left. A tenant admin's pages are then full however
/// many entries other tenants have between its own, and its next page
/// token is one of its own entries' IDs.
async fn visible_page<F, Fut, E>(
    mut fetch: F,
    visible: impl Fn(&crate::datastore::Entry) -> bool,
    after: Option<&str>,
    batch: u32,
    limit: u32,
) -> Result<Vec<crate::datastore::Entry>, E>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<crate::datastore::Entry>, E>>,
{
    let (mut after, limit) = (after.map(str::to_owned), limit as usize);
    let mut shown = Vec::new();
    loop {
        let read = fetch(after.take()).await?;
        let more = read.len() == batch as usize;
        after = read.last().map(|e| e.id.clone());
        let room = limit - shown.len();
        shown.extend(read.into_iter().filter(|e| visible(e)).take(room));
        if shown.len() == limit || !more {
            return Ok(shown);
        }
    }
}

fn optional_id(field: &str, s: &str) -> Result<Option<SpiffeId>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    SpiffeId::parse(s)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// The longest a join token may wait to be used: a year.
const MAX_JOIN_TOKEN_TTL_SECS: i64 = 365 * 24 * 3600;

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let caller = self.caller(&req, "create_join_token").await?;
        let r = req.into_inner();
        if r.ttl < 0 {
            return Err(Status::invalid_argument("ttl must not be negative"));
        }
        if r.ttl > MAX_JOIN_TOKEN_TTL_SECS {
            return Err(Status::invalid_argument(format!(
                "ttl {} is over {MAX_JOIN_TOKEN_TTL_SECS} seconds (a year)",
                r.ttl
            )));
        }
        let ttl = (r.ttl > 0).then(|| Duration::from_secs(r.ttl as u64));
        let (token, agent_id, expires_at) =
            self.ca.create_join_token(&caller, ttl, &r.tenant).await?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            agent_id: agent_id.to_string(),
            expires_at,
        }))
    }

    async fn create_entry(
        &self,
        req: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let caller = self.caller(&req, "create_entry").await?;
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let created = self
            .ca
            .create_entry(&caller, spec_from_pb(e, false))
            .await?;
        Ok(Response::new(entry_to_pb(&created)))
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let caller = self.caller(&req, "update_entry").await?;
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let id = e.id.clone();
        let updated = self.ca.update_entry(&caller, spec_from_pb(e, true)).await;
        let updated = self.hide_refusal(&caller, &id, updated).await?;
        Ok(Response::new(entry_to_pb(&updated)))
    }

    async fn delete_entry(
        &self,
        req: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let caller = self.caller(&req, "delete_entry").await?;
        let id = req.into_inner().id;
        let deleted = self.ca.delete_entry(&caller, &id).await;
        self.hide_refusal(&caller, &id, deleted).await?;
        Ok(Response::new(pb::DeleteEntryResponse {}))
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let caller = self.caller(&req, "get_entry").await?;
        let id = req.into_inner().id;
        let e = self.ca.get_entry(&id).await?;
        if !self.visible(&caller, &e) {
            return Err(no_such_entry(&id));
        }
        Ok(Response::new(entry_to_pb(&e)))
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let caller = self.caller(&req, "list_entries").await?;
        let r = req.into_inner();
        let filter = EntryFilter {
            parent_id: optional_id("parent_id", &r.parent_id)?,
            spiffe_id: optional_id("spiffe_id", &r.spiffe_id)?,
        };
        let (after, limit) = page(&r.page_token, r.page_size);
        // Read in batches of 500 at least: a caller asking for pages of one
        // does not make a query per entry between its own.
        let batch = limit.max(500);
        let fetch = |after: Option<String>| {
            let filter = &filter;
            async move { self.ca.list_entries(filter, after.as_deref(), batch).await }
        };
        let visible = |e: &crate::datastore::Entry| self.visible(&caller, e);
        let entries = visible_page(fetch, visible, after, batch, limit).await?;
        Ok(Response::new(pb::ListEntriesResponse {
            next_page_token: next_page(&entries, limit, |e| e.id.clone()),
            entries: entries.iter().map(entry_to_pb).collect(),
        }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.operator_only(&req, "list_agents").await?;
        let r = req.into_inner();
        let (after, limit) = page(&r.page_token, r.page_size);
        let agents = self.ca.list_agents(after, limit).await?;
        let next_page_token = next_page(&agents, limit, |a| a.spiffe_id.to_string());
        Ok(Response::new(pb::ListAgentsResponse {
            next_page_token,
            agents: agents
                .into_iter()
                .map(|a| types::Agent {
                    spiffe_id: a.spiffe_id.to_string(),
                    attestation_type: a.attestation_type,
                    serial_number: a.serial,
                    expires_at: a.expires_at,
                    evicted: a.evicted,
                    attested_at: a.attested_at,
                })
                .collect(),
        }))
    }

    async fn evict_agent(
        &self,
        req: Request<pb::EvictAgentRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        self.operator_only(&req, "evict_agent").await?;
        self.ca.evict_agent(&req.into_inner().spiffe_id).await?;
        Ok(Response::new(pb::EvictAgentResponse {}))
    }

    async fn rotate(
        &self,
        req: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        self.operator_only(&req, "rotate").await?;
        let signer = self.ca.authority.rotate_now().await.map_err(|e| {
            tracing::error!(error = %e, "forced rotation failed");
            Status::internal(format!("rotation failed: {e}"))
        })?;
        self.ca.metrics.admin_change("rotate");
        self.ca.bundle_changed();
        Ok(Response::new(pb::RotateResponse {
            active_serial: signer.serial.clone(),
            active_not_after: signer.not_after.unix_timestamp(),
            bundle_sequence: self.ca.authority.bundle().sequence,
        }))
    }

    async fn get_bundle(
        &self,
        _req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        Ok(Response::new(crate::node_api::bundle_pb(&self.ca)))
    }

    async fn set_federated_bundle(
        &self,
        req: Request<types::Bundle>,
    ) -> Result<Response<types::Bundle>, Status> {
        self.operator_only(&req, "set_federated_bundle").await?;
        let r = req.into_inner();
        let b = self
            .ca
            .set_federated_bundle(
                &r.trust_domain,
                &r.jwks,
                &r.endpoint_url,
                &r.endpoint_spiffe_id,
            )
            .await?;
        Ok(Response::new(types::Bundle {
            trust_domain: b.trust_domain.to_string(),
            jwks: b.to_jwks(),
            endpoint_url: r.endpoint_url,
            ..Default::default()
        }))
    }

    async fn list_federated_bundles(
        &self,
        req: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        self.operator_only(&req, "list_federated_bundles").await?;
        Ok(Response::new(pb::ListFederatedBundlesResponse {
            bundles: self
                .ca
                .federations()
                .iter()
                .map(|f| types::Bundle {
                    trust_domain: f.bundle.trust_domain.to_string(),
                    jwks: f.bundle.to_jwks(),
                    endpoint_url: f.endpoint_url.clone(),
                    endpoint_spiffe_id: f.endpoint_spiffe_id.clone(),
                    ..Default::default()
                })
                .collect(),
        }))
    }

    async fn delete_federated_bundle(
        &self,
        req: Request<pb::DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::DeleteFederatedBundleResponse>, Status> {
        self.operator_only(&req, "delete_federated_bundle").await?;
        let req = req.into_inner();
        let mode = match pb::BundleDeleteMode::try_from(req.mode) {
            Ok(pb::BundleDeleteMode::Restrict) => BundleDeleteMode::Restrict,
            Ok(pb::BundleDeleteMode::Dissociate) => BundleDeleteMode::Dissociate,
            Ok(pb::BundleDeleteMode::Delete) => BundleDeleteMode::Delete,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown bundle delete mode {}",
                    req.mode
                )))
            }
        };
        let entries = self
            .ca
            .delete_federated_bundle(&req.trust_domain, mode)
            .await?;
        Ok(Response::new(pb::DeleteFederatedBundleResponse {
            entry_ids: entries.into_iter().map(|e| e.id).collect(),
        }))
    }

    async fn push_policy(
        &self,
        req: Request<pb::PushPolicyRequest>,
    ) -> Result<Response<pb::PolicySetSummary>, Status> {
        self.operator_only(&req, "push_policy").await?;
        let r = req.into_inner();
        let files = r.files.into_iter().map(|f| (f.name, f.text)).collect();
        let set = self.ca.push_policy(files, &r.comment).await?;
        Ok(Response::new(summary(&set, true)))
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.operator_only(&req, "list_policies").await?;
        let r = req.into_inner();
        let (token, limit) = page(&r.page_token, r.page_size);
        let before = token
            .map(|t| {
                t.parse::<u64>().map_err(|_| {
                    Status::invalid_argument(format!("page_token {t:?} is not one this CA gave"))
                })
            })
            .transpose()?;
        let sets = self.ca.list_policies(before, limit).await?;
        Ok(Response::new(policy_page(&sets, before.is_none(), limit)))
    }

    async fn rollback_policy(
        &self,
        req: Request<pb::RollbackPolicyRequest>,
    ) -> Result<Response<pb::PolicySetSummary>, Status> {
        self.operator_only(&req, "rollback_policy").await?;
        let set = self.ca.rollback_policy(req.into_inner().version).await?;
        Ok(Response::new(summary(&set, true)))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<types::PolicySet>, Status> {
        self.operator_only(&req, "get_policy").await?;
        let v = req.into_inner().version;
        match self.ca.get_policy((v != 0).then_some(v)).await? {
            Some(p) => Ok(Response::new(policy_set_to_pb(&p))),
            None if v == 0 => Err(Status::not_found("no policy set has been pushed yet")),
            None => Err(Status::not_found(format!(
                "policy set version {v} does not exist"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(version: u64) -> PolicySetRecord {
        PolicySetRecord {
            version,
            files: vec![("a.cedar".into(), "// a".into())],
            digest: format!("d{version}"),
            comment: String::new(),
            created_at: 1,
            policies: 0,
        }
    }

    /// A tenant admin's entry pages hold only its own entries and are full
    /// however many of another tenant's lie between them; each page token
    /// is one of its own entries' IDs, and following them lists each of
    /// its entries once. The operator's pages hold every entry.
    #[tokio::test]
    async fn entry_pages_are_full_of_what_the_caller_may_see() {
        let entry = |n: usize, tenant: &str| {
            crate::datastore::Entry::bare(
                format!("{n:04}"),
                SpiffeId::parse(&format!("spiffe://example.org/tenant/{tenant}/sa/s{n}")).unwrap(),
                SpiffeId::parse("spiffe://example.org/node").unwrap(),
            )
        };
        // acme's entries are 0, 7, 14, ...: globex's six lie between each two.
        let all: Vec<_> = (0..40)
            .map(|n| entry(n, if n % 7 == 0 { "acme" } else { "globex" }))
            .collect();
        let reads = std::cell::Cell::new(0);
        let fetch = |batch: usize| {
            let (all, reads) = (&all, &reads);
            move |after: Option<String>| {
                reads.set(reads.get() + 1);
                let page: Vec<_> = all
                    .iter()
                    .filter(|e| after.as_deref().is_none_or(|a| e.id.as_str() > a))
                    .take(batch)
                    .cloned()
                    .collect();
                async move { Ok::<_, Status>(page) }
            }
        };
        let acme = |e: &crate::datastore::Entry| e.spiffe_id.path().starts_with("/tenant/acme/");
        let mine: Vec<_> = all
            .iter()
            .filter(|e| acme(e))
            .map(|e| e.id.clone())
            .collect();
        // Read in batches of the page's size, and of more than it.
        for batch in [3, 7] {
            let (mut listed, mut token) = (Vec::new(), None::<String>);
            loop {
                let got = visible_page(fetch(batch), acme, token.as_deref(), batch as u32, 3)
                    .await
                    .unwrap();
                assert!(got.iter().all(acme));
                let next = next_page(&got, 3, |e| e.id.clone());
                listed.extend(got.iter().map(|e| e.id.clone()));
                if next.is_empty() {
                    break;
                }
                assert_eq!(got.len(), 3, "a page not full: {got:?}");
                assert_eq!(&next, listed.last().unwrap());
                token = Some(next);
            }
            assert_eq!(listed, mine, "batches of {batch}");
        }
        assert!(reads.get() > 4, "{}", reads.get());
        // The operator sees every entry, a page from one read.
        reads.set(0);
        let got = visible_page(fetch(3), |_| true, None, 3, 3).await.unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(reads.get(), 1);
    }

    /// The history comes in pages, newest first: the first page's first
    /// version is the active one and no other is; a full page names the
    /// next one's start, the last page none.
    #[test]
    fn the_policy_history_is_paged_and_marks_only_the_newest_active() {
        let first = policy_page(&[set(5), set(4)], true, 2);
        let active: Vec<(u64, bool)> = first
            .versions
            .iter()
            .map(|v| (v.version, v.active))
            .collect();
        assert_eq!(active, [(5, true), (4, false)]);
        assert_eq!(first.next_page_token, "4");
        let (token, limit) = page(&first.next_page_token, 2);
        assert_eq!((token, limit), (Some("4"), 2));
        let last = policy_page(&[set(3)], false, 2);
        assert!(!last.versions[0].active);
        assert_eq!(last.next_page_token, "");
    }
}
