//! `ward ca serve`: opens the store and keys, then serves the node API (mutual
//! TLS), the admin API (Unix socket) and the health/metrics endpoint until
//! shutdown, advancing the key schedule in the background.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::http::StatusCode;
use axum::routing::get;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::server::Connected;
use ward_spec::proto::admin::v1::admin_server::AdminServer;
use ward_spec::proto::node::v1::node_server::NodeServer;
use ward_spec::tls::{RootStore, SpiffeClientVerifier, SvidResolver};

use crate::admin_api::AdminApi;
use crate::authority::{Authority, AuthorityConfig};
use crate::config::CaConfig;
use crate::config::StoreUrl;
use crate::datastore::{redacted, Breaker, Datastore, PgStore, SqliteStore, StoreError};
use crate::metrics::Metrics;
use crate::node_api::{NodeApi, PeerIdentity};
use crate::service::{Ca, Ttls};
use crate::x509;
use ward_spec::files::create_private_dir;

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more wait in the accept queue.
const MAX_HANDSHAKES: usize = 512;
/// Lifetime of the CA's own serving SVID (always cut to the signing CA's expiry).
const SERVER_SVID_TTL: Duration = Duration::from_secs(3600);

/// Builds the CA from its configuration (store, keys, service).
pub async fn open(cfg: &CaConfig) -> anyhow::Result<Arc<Ca>> {
    cfg.validate()?;
    create_private_dir(&cfg.data_dir)
        .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
    let metrics = Arc::new(Metrics::default());
    let store: Arc<dyn Datastore> = match cfg.store()? {
        StoreUrl::Sqlite(db) => Arc::new(
            SqliteStore::open(&db)
                .await
                .with_context(|| format!("cannot open datastore {}", db.display()))?,
        ),
        StoreUrl::Postgres(url) => Arc::new(PgStore::connect(&url).await.with_context(|| {
            format!(
                "cannot reach the datastore {} (is PostgreSQL running and the database created?)",
                redacted(&url)
            )
        })?),
    };
    // Fails fast (and is probed) while the database does not answer.
    let store: Arc<dyn Datastore> = Arc::new(Breaker::new(store, metrics.clone()));
    let authority = Authority::open(
        AuthorityConfig {
            trust_domain: cfg.trust_domain.clone(),
            key_dir: cfg.data_dir.join("keys"),
            ca_ttl: time::Duration::try_from(cfg.ca_ttl)?,
            root_ttl: time::Duration::try_from(cfg.root_ttl)?,
            upstream: cfg.upstream_cert.clone().zip(cfg.upstream_key.clone()),
            refresh_hint_secs: (cfg.ca_ttl.as_secs() / 10).clamp(5, 300),
            check_interval: time::Duration::try_from(cfg.rotation_check_interval)?,
        },
        store.clone(),
    )
    .await
    .context("cannot load the CA keys")?;
    let ttls = Ttls {
        x509_svid: cfg.x509_svid_ttl,
        jwt_svid: cfg.jwt_svid_ttl,
        node_svid: cfg.node_svid_ttl,
        join_token: cfg.join_token_ttl,
    };
    let template = ward_authz::IdTemplate::parse(&cfg.id_template)
        .map_err(|e| anyhow::anyhow!("id_template: {e}"))?;
    let ca = Ca::new(authority, store, ttls, template, metrics)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the datastore: {e}"))?;
    let ca = Arc::new(ca);
    ca.follow_store();
    Ok(ca)
}

/// Runs the CA until `shutdown` resolves.
pub async fn serve(
    cfg: CaConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ca = open(&cfg).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    // The CA's own serving identity, and the roots it verifies agents with.
    let resolver = SvidResolver::default();
    let roots = RootStore::new(&ca.authority.bundle()).context("bundle roots")?;
    let mut own = refresh_server_svid(&ca, &resolver, None)?;
    publish_gauges(&ca);

    let node_listener = TcpListener::bind(cfg.bind_address)
        .await
        .with_context(|| format!("cannot listen on {} (node API)", cfg.bind_address))?;
    let health_listener = TcpListener::bind(cfg.health_address)
        .await
        .with_context(|| format!("cannot listen on {} (health)", cfg.health_address))?;
    let admin_path = cfg.admin_socket();
    let admin_listener = bind_admin_socket(&admin_path)?;

    let tls = Arc::new(ward_spec::tls::server_config(
        resolver.clone(),
        SpiffeClientVerifier::new(roots.clone(), false),
    ));
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(64);
    let unauthenticated = Unauthenticated {
        timeout: cfg.unauthenticated_timeout,
        limit: cfg.max_unauthenticated_connections,
        permits: Arc::new(Semaphore::new(cfg.max_unauthenticated_connections)),
        at_limit: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        metrics: ca.metrics.clone(),
    };
    tokio::spawn(accept_tls(
        node_listener,
        tls,
        conn_tx,
        unauthenticated,
        stop_rx.clone(),
    ));

    // Agents and remote admins share the mutual-TLS port.
    let node = tonic::transport::Server::builder()
        .add_service(NodeServer::new(NodeApi {
            ca: ca.clone(),
            change_streams: crate::node_api::ChangeStreams::new(ca.metrics.change_streams.clone()),
        }))
        .add_service(AdminServer::new(AdminApi {
            ca: ca.clone(),
            remote: true,
        }))
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), wait(stop_rx.clone()));
    let admin = tonic::transport::Server::builder()
        .add_service(AdminServer::new(AdminApi {
            ca: ca.clone(),
            remote: false,
        }))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(admin_listener),
            wait(stop_rx.clone()),
        );
    let health_service =
        health_router(ca.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let health =
        axum::serve(health_listener, health_service).with_graceful_shutdown(wait(stop_rx.clone()));
    if let Some(addr) = cfg.federation_address {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (bundle endpoint)"))?;
        tokio::spawn(crate::federation::serve_bundle_endpoint(
            listener,
            ca.clone(),
            resolver.clone(),
            stop_rx.clone(),
        ));
        tracing::info!(address = %addr, "serving the bundle endpoint (https_spiffe)");
    }
    tokio::spawn(crate::federation::refresh_bundles(
        ca.clone(),
        cfg.federation_refresh_interval,
        stop_rx.clone(),
    ));
    tokio::spawn(prune_entry_changes(
        ca.store.clone(),
        cfg.entry_change_retention,
        stop_rx.clone(),
    ));

    // The key schedule: advance slots, follow bundle changes, renew our SVID.
    let schedule = {
        let ca = ca.clone();
        let mut stop = stop_rx.clone();
        let interval = cfg.rotation_check_interval;
        async move {
            let mut seq = ca.authority.bundle().sequence;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => break,
                }
                // A failing step of the schedule (the database refusing a
                // write, a key file unreadable) is retried at the next
                // check; the rest goes on meanwhile: other replicas' roots
                // still reach the node API, and the serving SVID is renewed.
                if let Err(e) = ca.authority.tick(OffsetDateTime::now_utc()).await {
                    tracing::error!(error = %e, "key schedule failed; retrying");
                }
                let bundle = ca.authority.bundle();
                if bundle.sequence != seq {
                    seq = bundle.sequence;
                    ca.bundle_changed();
                    if let Err(e) = roots.update(&bundle) {
                        tracing::error!(error = %e, "new bundle has an unusable root");
                    }
                }
                match refresh_server_svid(&ca, &resolver, Some(&own)) {
                    Ok(s) => own = s,
                    Err(e) => tracing::error!(error = %e, "cannot renew the CA's serving SVID"),
                }
                publish_gauges(&ca);
            }
        }
    };

    tracing::info!(
        trust_domain = %cfg.trust_domain,
        node_api = %cfg.bind_address,
        admin_socket = %admin_path.display(),
        health = %cfg.health_address,
        bundle_sequence = ca.authority.bundle().sequence,
        "CA ready"
    );
    let (n, a, h, _) = tokio::join!(node, admin, health, schedule);
    let _ = std::fs::remove_file(&admin_path);
    n.context("node API server")?;
    a.context("admin API server")?;
    h.context("health server")?;
    tracing::info!("CA stopped");
    Ok(())
}

/// Forgets entry deletions older than `retention`, every quarter of it (at
/// most hourly). Every replica does it; the deletes are idempotent.
async fn prune_entry_changes(
    store: Arc<dyn crate::datastore::Datastore>,
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let before = crate::datastore::unix_now() - retention.as_secs() as i64;
        match store.prune_entry_changes(before).await {
            Ok(p) if p.deletions + p.superseded > 0 => tracing::info!(
                deletions = p.deletions,
                superseded = p.superseded,
                floor = p.floor,
                "pruned entry changes; an agent that last synced before revision {} syncs every entry again",
                p.floor
            ),
            Ok(_) => {}
            // The store's breaker says when the database does not answer.
            Err(e) if crate::datastore::unavailable(&e) => {}
            Err(e) => tracing::warn!(error = %e, "cannot prune entry changes; trying again later"),
        }
    }
}

async fn wait(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn bind_admin_socket(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        // A live CA would answer; a stale socket file from a crash would not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "admin socket {} is in use: is another CA running with this data directory?",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The serving SVID: (serial of the signer that issued it, expiry, issued at).
#[derive(Clone)]
struct OwnSvid {
    signer_serial: String,
    issued_at: i64,
    expires_at: i64,
}

/// Issues a new serving SVID when there is none, when the signing slot
/// changed, or at half of its life.
fn refresh_server_svid(
    ca: &Ca,
    resolver: &SvidResolver,
    current: Option<&OwnSvid>,
) -> anyhow::Result<OwnSvid> {
    let signer = ca.authority.signer();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    if let Some(c) = current {
        let half = c.issued_at + (c.expires_at - c.issued_at) / 2;
        if c.signer_serial == signer.serial && now < half {
            return Ok(c.clone());
        }
    }
    let key = rcgen::KeyPair::generate()?;
    let spki = x509::check_csr(
        key.serialize_request_der_for_ca()?.as_slice(),
        ca.trust_domain(),
    )?;
    let svid = ca.issue(&ca.server_id(), &[], &spki.key, SERVER_SVID_TTL)?;
    resolver.set(&svid.chain, key.serialized_der())?;
    tracing::info!(serial = %svid.serial, expires_at = svid.expires_at, "CA serving SVID issued");
    Ok(OwnSvid {
        signer_serial: signer.serial.clone(),
        issued_at: now,
        expires_at: svid.expires_at,
    })
}

trait CsrForCa {
    fn serialize_request_der_for_ca(&self) -> Result<Vec<u8>, rcgen::Error>;
}

impl CsrForCa for rcgen::KeyPair {
    fn serialize_request_der_for_ca(&self) -> Result<Vec<u8>, rcgen::Error> {
        Ok(rcgen::CertificateParams::default()
            .serialize_request(self)?
            .der()
            .to_vec())
    }
}

fn publish_gauges(ca: &Ca) {
    ca.metrics
        .bundle_sequence
        .set(ca.authority.bundle().sequence as i64);
    ca.metrics
        .signing_ca_expiry
        .set(ca.authority.signer().not_after.unix_timestamp());
}

/// What a node API connection whose client presented no certificate may
/// hold: it can only attest (one call), so it gets a short life, and only so
/// many are open at once (anyone who can reach the port can open one).
#[derive(Clone)]
struct Unauthenticated {
    timeout: Duration,
    limit: usize,
    permits: Arc<Semaphore>,
    /// Whether one was refused for the limit and fewer than half the places
    /// have been free since (the limit is logged once per spell).
    at_limit: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Unauthenticated {
    /// A place for one more connection, or None (logged once per spell at
    /// the limit).
    fn admit(&self, addr: std::net::SocketAddr) -> Option<UnauthenticatedSlot> {
        use std::sync::atomic::Ordering;
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                // Admitted again once half the places are free: a flood that
                // keeps them taken is logged once, not at every place freed.
                if self.permits.available_permits() >= self.limit / 2
                    && self.at_limit.swap(false, Ordering::Relaxed)
                {
                    tracing::info!("node API connections without a certificate are admitted again");
                }
                self.metrics.unauthenticated_connections.inc();
                Some(UnauthenticatedSlot {
                    _permit: permit,
                    deadline: Box::pin(tokio::time::sleep(self.timeout)),
                    expired: false,
                    metrics: self.metrics.clone(),
                })
            }
            Err(_) => {
                self.metrics.node_connection_closed("unauthenticated_limit");
                if !self.at_limit.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%addr, limit = self.limit, "node API connections without a client certificate are at their limit (max_unauthenticated_connections): closing new ones until some end");
                }
                None
            }
        }
    }
}

/// A connection without a client certificate: its place among those
/// allowed, and when it is closed.
struct UnauthenticatedSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: bool,
    metrics: Arc<crate::metrics::Metrics>,
}

impl UnauthenticatedSlot {
    /// An error once the connection's time is up (which closes it).
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if !self.expired && self.deadline.as_mut().poll(cx).is_pending() {
            return None;
        }
        if !self.expired {
            self.expired = true;
            self.metrics
                .node_connection_closed("unauthenticated_timeout");
            tracing::debug!(
                "closed a node API connection without a client certificate: its time is up"
            );
        }
        Some(io::Error::new(
            io::ErrorKind::TimedOut,
            "a connection without a client certificate is closed after unauthenticated_timeout",
        ))
    }
}

impl Drop for UnauthenticatedSlot {
    fn drop(&mut self) {
        self.metrics.unauthenticated_connections.dec();
    }
}

async fn accept_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    out: tokio::sync::mpsc::Sender<io::Result<TlsConn>>,
    unauthenticated: Unauthenticated,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let acceptor = acceptor.clone();
        let out = out.clone();
        let unauthenticated = unauthenticated.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let leaf = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|leaf| ward_spec::svid::check_leaf(leaf).ok());
                    let (peer, slot) = match leaf {
                        Some(l) => (
                            PeerIdentity(
                                Some(l.spiffe_id),
                                crate::service::NodeSvid {
                                    serial: l.serial,
                                    not_after: l.not_after,
                                },
                            ),
                            None,
                        ),
                        None => match unauthenticated.admit(addr) {
                            Some(slot) => (PeerIdentity(None, Default::default()), Some(slot)),
                            // Dropped: closed.
                            None => return,
                        },
                    };
                    let _ = out
                        .send(Ok(TlsConn {
                            inner: tls,
                            peer,
                            unauthenticated: slot,
                        }))
                        .await;
                }
                Ok(Err(e)) => {
                    unauthenticated
                        .metrics
                        .node_connection_closed("handshake_failed");
                    tracing::debug!(%addr, error = %e, "TLS handshake failed")
                }
                Err(_) => {
                    unauthenticated
                        .metrics
                        .node_connection_closed("handshake_timeout");
                    tracing::debug!(%addr, "TLS handshake timed out")
                }
            }
        });
    }
}

/// A TLS connection and the verified identity of its peer (and, for a peer
/// without a certificate, its place among those allowed and its deadline).
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    peer: PeerIdentity,
    unauthenticated: Option<UnauthenticatedSlot>,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerIdentity;
    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl TlsConn {
    /// An error once a connection without a client certificate has had its time.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.unauthenticated
            .as_mut()
            .and_then(|s| s.poll_expired(cx))
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn health_router(ca: Arc<Ca>) -> axum::Router {
    let ready = ca.clone();
    let metrics = ca.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/logging", ward_spec::log_level::route())
        .route(
            "/readyz",
            get(move || {
                let ca = ready.clone();
                async move {
                    let signer_ok = ca.authority.signer().not_after > OffsetDateTime::now_utc();
                    // A database that does not answer within 2 s is down for readiness.
                    let ping = tokio::time::timeout(Duration::from_secs(2), ca.store.ping())
                        .await
                        .unwrap_or_else(|_| {
                            Err(StoreError::Unavailable("no answer within 2 s".into()))
                        });
                    match ping {
                        Ok(()) if signer_ok => (StatusCode::OK, "ready\n".to_string()),
                        Ok(()) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "signing CA expired\n".to_string(),
                        ),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("datastore: {e}\n")),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let ca = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        ca.metrics.render(),
                    )
                }
            }),
        )
}
