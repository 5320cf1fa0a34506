//! The admin API (gRPC over the local Unix socket, mode 0600): what operators
//! ask of the CA. Access is whoever can open the socket.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use ward_spec::proto::admin::v1 as pb;
use ward_spec::proto::admin::v1::admin_server::Admin;
use ward_spec::proto::types::v1 as types;
use ward_spec::SpiffeId;

use crate::datastore::EntryFilter;
use crate::node_api::entry_to_pb;
use crate::service::{Ca, EntrySpec};

pub struct AdminApi {
    pub ca: Arc<Ca>,
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

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let ttl = req.into_inner().ttl;
        if ttl < 0 {
            return Err(Status::invalid_argument("ttl must not be negative"));
        }
        let ttl = (ttl > 0).then(|| Duration::from_secs(ttl as u64));
        let (token, agent_id, expires_at) = self.ca.create_join_token(ttl).await?;
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
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let created = self.ca.create_entry(spec_from_pb(e, false)).await?;
        Ok(Response::new(entry_to_pb(&created)))
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let updated = self.ca.update_entry(spec_from_pb(e, true)).await?;
        Ok(Response::new(entry_to_pb(&updated)))
    }

    async fn delete_entry(
        &self,
        req: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        self.ca.delete_entry(&req.into_inner().id).await?;
        Ok(Response::new(pb::DeleteEntryResponse {}))
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let e = self.ca.get_entry(&req.into_inner().id).await?;
        Ok(Response::new(entry_to_pb(&e)))
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let r = req.into_inner();
        let filter = EntryFilter {
            parent_id: optional_id("parent_id", &r.parent_id)?,
            spiffe_id: optional_id("spiffe_id", &r.spiffe_id)?,
        };
        let limit = match r.page_size {
            0 => 500,
            n => n.min(5000),
        };
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let entries = self.ca.list_entries(&filter, after, limit).await?;
        let next_page_token = if entries.len() == limit as usize {
            entries.last().map(|e| e.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(entry_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self.ca.list_agents().await?;
        Ok(Response::new(pb::ListAgentsResponse {
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
        self.ca.evict_agent(&req.into_inner().spiffe_id).await?;
        Ok(Response::new(pb::EvictAgentResponse {}))
    }

    async fn rotate(
        &self,
        _req: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
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
        let b = self.ca.authority.bundle();
        Ok(Response::new(types::Bundle {
            trust_domain: b.trust_domain.to_string(),
            jwks: b.to_jwks(),
            sequence: b.sequence,
        }))
    }
}
