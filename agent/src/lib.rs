//! Ward's node agent.
//!
//! Data flows like this. [`run`] loads the node identity from the data
//! directory ([`state`]) or attests with a join token, then starts the
//! [`manager`]: one task that renews the node SVID, syncs the registration
//! entries parented to this node from the CA ([`ca_client`], node API over
//! mutual TLS, woken by the CA's change notices), generates a key per entry
//! locally, has the CA sign them in batches, and rotates each SVID at half of
//! its life. It publishes an immutable snapshot of the cache; the SPIFFE
//! Workload API ([`workload_api`]) serves callers from it, matching each caller
//! by the selectors the [`attestor`] derives from the socket's peer credentials.
//! The sync also fetches the CA's active Cedar policy set when its version
//! changes; it is stored beside the node identity and streamed to proxies by
//! the [`policy_api`] on the same socket.
#![forbid(unsafe_code)]

pub mod attestor;
pub mod ca_client;
pub mod config;
pub mod manager;
pub mod metrics;
pub mod policy_api;
pub mod state;
pub mod workload_api;

use std::future::Future;
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::http::StatusCode;
use axum::routing::get;
use rcgen::KeyPair;
use tokio::sync::{mpsc, watch, Mutex};
use ward_spec::proto::agent::v1::policy_server::PolicyServer;
use ward_spec::proto::node::v1 as pb;
use ward_spec::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use ward_spec::tls::{RootStore, SvidResolver};
use ward_spec::TrustBundle;

pub use config::AgentConfig;

use crate::ca_client::CaClient;
use crate::manager::{unix_now, Manager, Snapshot};
use crate::metrics::Metrics;
use crate::policy_api::PolicyApi;
use crate::state::{NodeIdentity, StateDir};
use crate::workload_api::WorkloadApi;

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let state = StateDir::open(&cfg.data_dir)?;
    let td = cfg.trust_domain.clone();

    let bundle = match state.load_bundle(&td)? {
        Some(b) => b,
        None => bootstrap_bundle(&cfg)?,
    };
    let roots = RootStore::new(&bundle).context("trust bundle")?;
    let resolver = SvidResolver::default();
    let mut ca = CaClient::new(cfg.ca_addresses.clone(), roots.clone(), resolver.clone())
        .with_call_timeout(cfg.ca_call_timeout);

    let stored = match state.load_identity() {
        Ok(stored) => stored,
        // A join token starts over: the broken file is kept aside.
        Err(state::StateError::Corrupt { path, reason }) if cfg.join_token.is_some() => {
            let aside = path.with_extension(format!("corrupt-{}", unix_now()));
            std::fs::rename(&path, &aside)
                .with_context(|| format!("cannot move {} aside", path.display()))?;
            tracing::warn!(path = %path.display(), aside = %aside.display(), reason, "the stored node identity is corrupt; moved it aside and attesting with the join token");
            None
        }
        Err(e @ state::StateError::Corrupt { .. }) => {
            bail!("{e}; start the agent with a new join token (--join-token) to attest anew")
        }
        Err(e) => return Err(e.into()),
    };
    let (node, bundle) = match stored {
        Some(id) if id.not_after > unix_now() => {
            tracing::info!(spiffe_id = %id.spiffe_id, expires_at = id.not_after, "resuming with the stored node SVID");
            (id, bundle)
        }
        stored => {
            if let Some(expired) = &stored {
                if cfg.join_token.is_none() {
                    bail!(
                        "the stored node SVID of {} expired at {}; create a new join token (`ward token create`) and start the agent with --join-token",
                        expired.spiffe_id,
                        expired.not_after
                    );
                }
            }
            let Some(token) = &cfg.join_token else {
                bail!("this agent has no node identity yet: pass a join token (`ward token create` on the CA) with --join-token");
            };
            attest(&mut ca, &state, token, &td).await?
        }
    };
    roots.update(&bundle)?;
    resolver.set(&node.chain, &node.key)?;

    let metrics = Arc::new(Metrics::default());
    let ca = Arc::new(Mutex::new(ca));
    let (manager, snapshots) = Manager::new(
        ca.clone(),
        state,
        node,
        resolver,
        bundle,
        cfg.sync_interval,
        metrics.clone(),
    );
    let policy_rx = manager.policy();
    let (notice_tx, notice_rx) = mpsc::channel(1);
    tokio::spawn(manager::watch_notices(ca.clone(), notice_tx));
    tokio::spawn(manager.run(notice_rx));

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let socket = bind_socket(&cfg.socket_path)?;
    let health = tokio::net::TcpListener::bind(cfg.health_address)
        .await
        .with_context(|| format!("cannot listen on {} (health)", cfg.health_address))?;
    tracing::info!(
        socket = %cfg.socket_path.display(),
        health = %cfg.health_address,
        cas = ?cfg.ca_addresses,
        "agent started"
    );
    let api = Arc::new(WorkloadApi::new(snapshots.clone(), ca, metrics.clone()));
    let policy = PolicyApi {
        workload: api.clone(),
        policy: policy_rx,
    };
    let workload = tonic::transport::Server::builder()
        // A client needs a few: one per watcher, and a call now and then.
        .max_concurrent_streams(Some(workload_api::MAX_STREAMS_PER_CONNECTION))
        .add_service(SpiffeWorkloadApiServer::from_arc(api))
        .add_service(PolicyServer::new(policy))
        .serve_with_incoming_shutdown(
            tokio_stream::StreamExt::map(
                tokio_stream::wrappers::UnixListenerStream::new(socket),
                |accepted| accepted.map(workload_api::CallerStream::accept),
            ),
            wait(stop_rx.clone()),
        );
    let health_service = health_router(snapshots, metrics)
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let health = axum::serve(health, health_service).with_graceful_shutdown(wait(stop_rx));
    let (w, h) = tokio::join!(workload, health);
    let _ = std::fs::remove_file(&cfg.socket_path);
    w.context("Workload API server")?;
    h.context("health server")?;
    tracing::info!("agent stopped");
    Ok(())
}

async fn wait(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn bootstrap_bundle(cfg: &AgentConfig) -> anyhow::Result<TrustBundle> {
    let path = cfg.trust_bundle.as_ref().context(
        "no trust bundle: pass --trust-bundle with the CA's roots (`ward bundle show > bundle.pem` on the CA)",
    )?;
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let roots = ward_spec::bundle::pem_to_ders("CERTIFICATE", &pem).map_err(anyhow::Error::msg)?;
    if roots.is_empty() {
        bail!("{} holds no CERTIFICATE", path.display());
    }
    let mut b = TrustBundle::new(cfg.trust_domain.clone());
    b.x509_authorities = roots;
    Ok(b)
}

async fn attest(
    ca: &mut CaClient,
    state: &StateDir,
    token: &str,
    td: &ward_spec::TrustDomain,
) -> anyhow::Result<(NodeIdentity, TrustBundle)> {
    let key = KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .der()
        .to_vec();
    let mut backoff = ca_client::Backoff::default();
    let resp = loop {
        let attempt = match ca.anonymous().await {
            Ok(mut c) => c
                .attest(pb::AttestRequest {
                    join_token: token.to_owned(),
                    csr: csr.clone(),
                })
                .await
                .map_err(|s| (s.code(), s.message().to_owned())),
            Err(e) => Err((tonic::Code::Unavailable, e)),
        };
        match attempt {
            Ok(r) => break r.into_inner(),
            // The CA did not answer (unreachable, or it closed the
            // connection: e.g. at its limit of connections without a
            // certificate): try again. Any answer it gave is final.
            Err((
                code @ (tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled),
                e,
            )) => {
                let d = backoff.next_delay();
                tracing::warn!(?code, error = %e, retry_in = ?d, "CA unreachable for attestation");
                tokio::time::sleep(d).await;
            }
            Err((code, msg)) => bail!("attestation refused ({code:?}): {msg}"),
        }
    };
    let node = NodeIdentity::from_parts(resp.svid_chain, key.serialized_der().to_vec())
        .map_err(anyhow::Error::msg)?;
    let bundle = match resp.bundle {
        Some(b) => TrustBundle::from_jwks(td.clone(), &b.jwks)?,
        None => bail!("the CA sent no bundle with the node SVID"),
    };
    state.save_identity(&node)?;
    state.save_bundle(&bundle)?;
    tracing::info!(spiffe_id = %node.spiffe_id, expires_at = node.not_after, "attested to the CA");
    Ok((node, bundle))
}

fn bind_socket(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "Workload API socket {} is in use: is another agent running?",
                path.display()
            );
        }
        std::fs::remove_file(path)?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind Workload API socket {}", path.display()))?;
    // Any local process may ask; attestation decides what it gets.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    // The directory must be reachable for other users too.
    if let Some(dir) = path.parent() {
        let mut mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o011 != 0o011 {
            mode |= 0o011;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(l)
}

fn health_router(
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    metrics: Arc<Metrics>,
) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/logging", ward_spec::log_level::route())
        .route(
            "/readyz",
            get(move || {
                let ready = snapshots.borrow().is_some();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not synced with the CA yet\n",
                        )
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
}
