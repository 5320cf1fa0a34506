//! The agent's policy service (`ward.agent.v1.Policy`), on the Workload API
//! socket: proxies on this node receive the CA's active Cedar policy set from
//! here, now and on every change, instead of each polling the CA.
//!
//! The caller is attested as for the Workload API (security header, peer
//! credentials) and must match at least one registration entry.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use ward_spec::proto::agent::v1 as pb;
use ward_spec::proto::agent::v1::policy_server::Policy;
use ward_spec::proto::types::v1::PolicySet;

use crate::workload_api::WorkloadApi;

pub struct PolicyApi {
    pub workload: Arc<WorkloadApi>,
    pub policy: watch::Receiver<Option<Arc<PolicySet>>>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Policy for PolicyApi {
    type WatchPolicyStream = BoxStream<PolicySet>;

    async fn watch_policy(
        &self,
        req: Request<pb::WatchPolicyRequest>,
    ) -> Result<Response<Self::WatchPolicyStream>, Status> {
        self.workload.attested_caller(&req, "watch_policy").await?;
        let mut policy = self.policy.clone();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                let current = policy.borrow_and_update().clone();
                if let Some(set) = current {
                    if tx.send(Ok(set.as_ref().clone())).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = policy.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
