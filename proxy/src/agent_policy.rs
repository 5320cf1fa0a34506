//! The policy set from the control plane: the agent streams the CA's active
//! set (`ward.agent.v1.Policy/WatchPolicy` on the Workload API socket) and
//! each version is validated and swapped into the authorizer. A set that does
//! not validate here is reported and the previous one stays active. If the
//! agent goes away the current set stays and the stream is reopened with
//! backoff; the set a reopened stream starts with is loaded only if it
//! differs from the active one.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use ward_authz::policy::SourceFile;
use ward_authz::Authorizer;
use ward_spec::proto::agent::v1 as pb;
use ward_spec::proto::agent::v1::policy_client::PolicyClient;

use crate::metrics::Metrics;
use crate::status::Status;

/// Follows the agent's policy stream for as long as the process runs.
pub async fn follow(
    socket: PathBuf,
    authz: Arc<Authorizer>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
) {
    let mut delay = Duration::from_millis(200);
    let mut outage_logged = false;
    let mut active = None;
    loop {
        // An outage is logged once, and its end (in `stream_once`) too.
        let result = stream_once(
            &socket,
            &authz,
            &metrics,
            &status,
            &mut delay,
            &mut outage_logged,
            &mut active,
        )
        .await;
        match result {
            Ok(()) => {}
            Err(e) if !outage_logged => {
                tracing::warn!(socket = %socket.display(), error = %e, "policy stream from the agent unavailable; keeping the current set and retrying");
                outage_logged = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn stream_once(
    socket: &std::path::Path,
    authz: &Authorizer,
    metrics: &Metrics,
    status: &Status,
    delay: &mut Duration,
    outage_logged: &mut bool,
    active: &mut Option<Vec<ward_spec::proto::types::v1::PolicyFile>>,
) -> Result<(), String> {
    let channel = ward_spec::grpc::unix_channel(socket.to_path_buf())
        .await
        .map_err(|e| e.to_string())?;
    let mut client = PolicyClient::new(channel);
    let mut req = tonic::Request::new(pb::WatchPolicyRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", MetadataValue::from_static("true"));
    let mut stream = client
        .watch_policy(req)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    loop {
        let set = match stream.message().await {
            Ok(Some(s)) => s,
            Ok(None) => return Err("the agent closed the policy stream".into()),
            Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
        };
        *delay = Duration::from_millis(200);
        if std::mem::take(outage_logged) {
            tracing::info!(socket = %socket.display(), "policy stream from the agent available again");
        }
        // A reopened stream starts with the set that is most often active
        // already: loading it again would have every open stream decided
        // again (and logged) for nothing.
        let origin = || {
            *status.control_plane_policy.lock().expect("status lock") =
                Some((set.version, set.digest.clone()));
        };
        if active.as_ref() == Some(&set.files) {
            origin();
            tracing::debug!(
                version = set.version,
                "the policy set from the control plane is already active"
            );
            continue;
        }
        let files: Vec<SourceFile> = set
            .files
            .iter()
            .map(|f| SourceFile {
                name: f.name.clone(),
                text: f.text.clone(),
            })
            .collect();
        match authz.load(&files) {
            Ok(_) => {
                metrics.reload_stats.loaded.fetch_add(1, Ordering::Relaxed);
                tracing::info!(version = set.version, digest = %set.digest, "policy set from the control plane active");
                origin();
                *active = Some(set.files);
            }
            Err(errors) => {
                metrics
                    .reload_stats
                    .rejected
                    .fetch_add(1, Ordering::Relaxed);
                for e in &errors {
                    tracing::error!(version = set.version, error = %e, "policy set from the control plane rejected; the previous set stays active");
                }
            }
        }
    }
}
