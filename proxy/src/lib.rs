//! Ward's tunneling sidecar: `ward proxy run`.
//!
//! Data flows like this. [`identity`] follows the agent's Workload API stream
//! and keeps this workload's X509-SVID and trust bundle in the resolver and
//! root store that every TLS config shares (a rotation changes new handshakes
//! only). Nothing listens until the first SVID arrives. An application's TCP
//! connection to an [`outbound`] route listener (or to the HTTP CONNECT
//! listener) becomes an HTTP/2 `CONNECT` stream on a mutual-TLS connection from
//! the [`pool`], to a peer proxy that must present one of the route's SPIFFE
//! IDs. At the peer, the [`inbound`] HBONE listener (port 15008) verifies our
//! certificate, asks `ward-authz` whether our SPIFFE ID may connect to its
//! workload, and answers `403` or connects the stream to its application
//! (starting that connection with a [`proxy_protocol`] header if asked);
//! peers and applications named by host name are looked up by [`resolve`]. The
//! bytes of each stream are carried by [`pump`] with HTTP/2 flow control as
//! back-pressure. [`metrics`] and the health endpoints are served on their own
//! port (with [`status`]'s `/config_dump`); SIGTERM drains: the inbound
//! listener closes, inbound connections stop taking streams, and open streams
//! get until the drain deadline to finish; the outbound listeners go on
//! taking the application's connections until the inbound side is done and
//! no stream is open (it may still call out as it finishes its work).
//!
//! The HTTP/2 layer is `h2` (hyper's HTTP/2 implementation) used directly, so
//! that an idle tunneled stream holds no buffers and data moves as `Bytes`
//! without an extra copy or task hop.
// One system call has no safe wrapper in the crates used: asking a socket
// what it has not had acknowledged (`bufio::unacknowledged`).
#![deny(unsafe_code)]

pub mod access_log;
pub mod agent_policy;
pub mod bufio;
pub mod config;
pub mod hbone;
pub mod identity;
pub mod inbound;
pub mod limit;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod proxy_protocol;
pub mod pump;
pub mod resolve;
pub mod status;

use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use ward_authz::log::DecisionLog;
use ward_authz::{Authorizer, IdTemplate, Mode};
use ward_spec::tls::SpiffeClientVerifier;

pub use config::ProxyConfig;

use crate::identity::Identity;
use crate::metrics::{Direction, Metrics};

/// The schema used when the policy directory has none (the repository's).
pub use ward_authz::DEFAULT_SCHEMA;

/// Runs the proxy until `shutdown` resolves (or `POST /quitquitquit`),
/// waits out the drain delay, then drains until the drain deadline, or
/// until `cut` resolves (a second signal: the operator wants it gone now).
pub async fn run(
    cfg: ProxyConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    cut: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let mut metrics = Metrics::default();
    metrics.access_log = access_log::AccessLog::open(&cfg.access_log)
        .with_context(|| format!("cannot open the access log {}", cfg.access_log))?;
    let metrics = Arc::new(metrics);
    let authz = Arc::new(authorizer(&cfg)?);
    let _watch = cfg.policy.dir.as_ref().map(|dir| {
        ward_authz::reload::load_and_watch(
            authz.clone(),
            dir.clone(),
            cfg.policy.reload_interval,
            metrics.reload_stats.clone(),
        )
    });
    let mut identity = Identity::follow(
        cfg.workload_api_socket.clone(),
        cfg.spiffe_id.clone(),
        metrics.clone(),
    );
    // Open inbound streams are decided again whenever the active set changes.
    let policy_epoch = policy_epoch(authz.clone(), identity.current.clone());

    let (drain_tx, drain) = watch::channel(false);
    // Outbound listeners close once the drain has no stream left, not when
    // it starts (see `drain_streams`).
    let (exit_tx, exit) = watch::channel(false);
    let stopping = Arc::new(AtomicBool::new(false));
    let status = Arc::new(status::Status::new(
        &cfg,
        identity.clone(),
        authz.clone(),
        stopping.clone(),
    ));
    if cfg.policy.dir.is_none() {
        tracing::info!("policy from the control plane (through the agent); until it arrives every inbound stream is denied");
        tokio::spawn(agent_policy::follow(
            cfg.workload_api_socket.clone(),
            authz.clone(),
            metrics.clone(),
            status.clone(),
        ));
    }
    let stop_flag = stopping.clone();
    // Set once asked to stop: whether on `/quitquitquit`.
    let (stop_tx, mut stop_rx) = watch::channel(None);
    // `POST /quitquitquit` drains as SIGTERM does (but for the outbound
    // listeners' minimum: the application that asked is done).
    let quit = Arc::new(tokio::sync::Notify::new());
    let quit_asked = quit.clone();
    tokio::spawn(async move {
        let by_quit = tokio::select! {
            () = shutdown => false,
            () = quit_asked.notified() => {
                tracing::info!("shutting down: asked on /quitquitquit");
                true
            }
        };
        stop_flag.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(Some(by_quit));
    });

    let inbound_socket = cfg
        .inbound
        .as_ref()
        .map(|i| reserve(i.listen, "inbound"))
        .transpose()?;
    let mut route_sockets = Vec::new();
    for r in &cfg.outbound {
        let what = format!("route to {}", r.destination);
        route_sockets.push(r.listen.map(|a| reserve(a, &what)).transpose()?);
    }
    let connect_socket = cfg
        .connect
        .as_ref()
        .map(|c| reserve(c.listen, "HTTP CONNECT"))
        .transpose()?;
    let outbound_listens = cfg.outbound.iter().filter_map(|r| r.listen);
    for addr in outbound_listens.chain(cfg.connect.as_ref().map(|c| c.listen)) {
        if !addr.ip().to_canonical().is_loopback() {
            tracing::warn!(listen = %addr, "an outbound listener on an address other hosts can reach: whoever reaches it tunnels as this workload");
        }
    }

    let listening = Arc::new(AtomicBool::new(false));
    let health = TcpListener::bind(cfg.health_address)
        .await
        .with_context(|| format!("cannot listen on {} (health)", cfg.health_address))?;
    let router = health_router(
        identity.clone(),
        cfg.inbound.is_some() && cfg.policy.mode == "enforce",
        listening.clone(),
        stopping.clone(),
        metrics.clone(),
        authz.clone(),
        status.clone(),
    )
    .route("/quitquitquit", quit_route(quit));
    // The health server answers until the drain is over (`/healthz` ok,
    // `/readyz` 503 while draining), so that a liveness probe does not
    // fail a proxy that is finishing its streams.
    let (_health_stop, health_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let router = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let _ = axum::serve(health, router)
            .with_graceful_shutdown(async move {
                let _ = health_stopped.await;
            })
            .await;
    });
    tracing::info!(socket = %cfg.workload_api_socket.display(), health = %cfg.health_address, "proxy waiting for its SVID");

    let current = tokio::select! {
        c = identity.ready() => c,
        _ = stop_rx.wait_for(Option::is_some) => return Ok(()),
    };
    let pool = pool::Pool::new(
        identity.clone(),
        metrics.clone(),
        cfg.limits.max_streams_per_connection as usize,
        cfg.limits.connect_timeout,
        cfg.limits.handshake_timeout,
        cfg.limits.idle_timeout,
        cfg.limits.keepalive(),
    );
    let _ = status.pool.set(pool.clone());

    if let (Some(inb), Some(socket)) = (&cfg.inbound, inbound_socket) {
        let verifier = SpiffeClientVerifier::new(current.roots.clone(), true);
        let tls = ward_spec::tls::server_config(identity.resolver.clone(), verifier);
        let listener = listen(socket, "inbound")?;
        let state = Arc::new(inbound::Inbound {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            forward: inb.forward.clone(),
            service_port: inb.service_port().map_err(anyhow::Error::msg)?,
            ports: inb
                .ports
                .iter()
                .map(|p| (p.port, p.forward.clone()))
                .collect(),
            authz: authz.clone(),
            identity: identity.clone(),
            metrics: metrics.clone(),
            max_streams: cfg.limits.max_streams_per_connection,
            stream_slots: limit::Limit::new(cfg.limits.max_inbound_streams),
            handshake_timeout: cfg.limits.handshake_timeout,
            idle_timeout: cfg.limits.idle_timeout,
            connect_timeout: cfg.limits.connect_timeout,
            resolver: resolve::Resolver::new(resolve::system_lookup(), resolve::DNS_REFRESH),
            keepalive: cfg.limits.keepalive(),
            proxy_protocol: inb.proxy_protocol,
            policy_epoch: policy_epoch.clone(),
            redecisions: inbound::Redecisions::default(),
        });
        tracing::info!(listen = %inb.listen, forward = %inb.forward, service_port = state.service_port, "inbound listening");
        tokio::spawn(inbound::serve(
            listener,
            state,
            cfg.limits.max_connections,
            drain.clone(),
        ));
    }
    let routes: Vec<Arc<config::Route>> = cfg.outbound.iter().cloned().map(Arc::new).collect();
    // Application connections to every outbound listener, at most.
    let app_slots = Arc::new(limit::Limit::new(cfg.limits.max_connections));
    for (r, socket) in routes.iter().zip(route_sockets) {
        if let (Some(addr), Some(socket)) = (r.listen, socket) {
            let listener = listen(socket, &format!("route to {}", r.destination))?;
            tracing::info!(listen = %addr, destination = %r.destination, target = r.target(), "route listening");
            tokio::spawn(outbound::serve_route(
                listener,
                r.clone(),
                pool.clone(),
                metrics.clone(),
                app_slots.clone(),
                exit.clone(),
            ));
        }
    }
    if let (Some(c), Some(socket)) = (&cfg.connect, connect_socket) {
        let listener = listen(socket, "HTTP CONNECT")?;
        tracing::info!(listen = %c.listen, "HTTP CONNECT listening");
        tokio::spawn(outbound::serve_connect(
            listener,
            Arc::new(routes.clone()),
            pool.clone(),
            metrics.clone(),
            app_slots.clone(),
            exit.clone(),
        ));
    }
    // The outbound listeners hold the only receivers left: the drain
    // knows they have stopped once all are gone.
    drop(exit);
    listening.store(true, Ordering::Release);
    tracing::info!(spiffe_id = %current.spiffe_id, "proxy ready");

    let by_quit = stop_rx
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|s| *s);
    listening.store(false, Ordering::Release);
    tokio::pin!(cut);
    let delay = cfg.limits.drain_delay;
    let mut cut_in_delay = false;
    if !delay.is_zero() {
        tracing::info!(
            ?delay,
            "not ready; serving on for the drain delay before draining"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut cut => cut_in_delay = true,
        }
    }
    let times = DrainTimes {
        deadline: cfg.limits.drain_timeout,
        outbound: match by_quit {
            Some(true) => Duration::ZERO,
            _ => cfg.limits.outbound_drain,
        },
    };
    if cut_in_delay {
        // (`cut` has resolved: it may not be polled again.)
        let now = std::future::ready(());
        drain_streams(&drain_tx, &exit_tx, &metrics, &pool, times, now).await;
    } else {
        drain_streams(&drain_tx, &exit_tx, &metrics, &pool, times, cut).await;
    }
    // What the logs hold is written out (waiting a few seconds at most for
    // their destinations) off the runtime thread.
    let access = metrics.access_log.clone();
    let _ = tokio::task::spawn_blocking(move || {
        authz.flush_log();
        if let Some(log) = access {
            log.flush();
        }
    })
    .await;
    Ok(())
}

/// How often (seconds) open streams are decided again under a set that
/// reads the time other than by comparing it with numbers.
pub(crate) const TIME_REDECIDE_EVERY: i64 = 30;

/// A watch that changes whenever the authorizer's active set does, or the
/// time reaches an instant at which its decisions may change, or this
/// proxy's own SPIFFE ID (from `identity`) changes: the resource of every
/// decision (checked every 200 ms, whichever source loaded the set).
pub(crate) fn policy_epoch(
    authz: Arc<Authorizer>,
    identity: watch::Receiver<Option<identity::Current>>,
) -> watch::Receiver<inbound::PolicyEpoch> {
    let (tx, rx) = watch::channel(inbound::PolicyEpoch {
        version: authz.version(),
        clock: 0,
    });
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(200));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when decisions are known not to have changed with time.
        let mut since = identity::unix_now();
        let own_id = || identity.borrow().as_ref().map(|c| c.spiffe_id.clone());
        let mut me = own_id();
        loop {
            every.tick().await;
            let version = authz.version();
            let now = identity::unix_now();
            // (A clock set back: the instants between are to come again.)
            since = since.min(now);
            let mut crossed = authz.time_may_change_decisions(since, now, TIME_REDECIDE_EVERY);
            if crossed {
                since = now;
            }
            // An ID that changed (the workload registered as another
            // service) was not what open streams were decided for.
            let now_me = own_id();
            if now_me != me {
                crossed |= me.is_some();
                me = now_me;
            }
            tx.send_if_modified(|epoch| {
                let was = *epoch;
                epoch.version = version;
                epoch.clock += u64::from(crossed);
                *epoch != was
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// An address taken at start: bound, not listening (a connection to it is
/// refused) until [`listen`], so that an address already in use is an error
/// at once, not once the SVID arrives. (Best effort: with SO_REUSEADDR,
/// another program that sets it too may still bind it meanwhile, and then
/// `listen` fails.)
fn reserve(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpSocket> {
    let bound = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok::<_, std::io::Error>(socket)
    };
    bound().with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Listens with a deep accept queue (the kernel caps it at
/// `net.core.somaxconn`): a burst of connections waits in the queue instead
/// of having its SYNs dropped and retried a second or more later.
fn listen(socket: tokio::net::TcpSocket, what: &str) -> anyhow::Result<TcpListener> {
    let addr = socket.local_addr();
    socket.listen(65_535).with_context(|| match addr {
        Ok(a) => format!("cannot listen on {a} ({what})"),
        Err(_) => format!("cannot listen ({what})"),
    })
}

/// Resolves once `drain` turns true (or its sender is gone).
pub(crate) async fn drained(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|d| *d).await;
}

/// The next connection to `listener` (the `what` listener), or None once
/// `drain` has turned true: that is tried first, so that once it has, no
/// connection waiting to be accepted is taken, however many are waiting. A
/// failed accept (out of file descriptors and the like) is logged and tried
/// again 50 ms later: the listener keeps serving.
pub(crate) async fn accept_until_drained(
    listener: &TcpListener,
    drain: &mut watch::Receiver<bool>,
    what: &'static str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            biased;
            _ = drained(drain) => return None,
            r = listener.accept() => match r {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// How long a drain takes at most, and how long at least the outbound
/// listeners stay.
#[derive(Clone, Copy)]
struct DrainTimes {
    deadline: Duration,
    outbound: Duration,
}

/// Drains, in turn, until `times.deadline` (or `cut`):
/// 1. Inbound: the listener closes and each inbound connection tells its
///    peer to open no more streams (GOAWAY); the drain waits for their
///    streams to end and for them to close (once the peer has seen the
///    GOAWAY), so a peer's stream sent meanwhile is refused in a way it can
///    retry elsewhere, not cut by the process's exit. Connections still in
///    their handshake are waited for too (within the handshake timeout):
///    a peer's first stream may already be on its way behind it. The outbound
///    listeners go on accepting meanwhile, and until no outbound stream is
///    open either (as Istio's sidecar drains inbound only), and for at least
///    `times.outbound` (half the deadline at most, which leaves the rest
///    its time): an application finishing its work may still need to call
///    out.
/// 2. Outbound: `exit` closes the outbound listeners, and the drain waits
///    for them to stop (every receiver of `exit` dropped), then for every
///    stream, set-up included, to end.
/// 3. The pool's connections are closed, and waited for: a stream's last
///    bytes may still be queued in its connection (the peer slow to read)
///    when the stream is done, and leaving then would lose them.
async fn drain_streams(
    drain: &watch::Sender<bool>,
    exit: &watch::Sender<bool>,
    metrics: &Metrics,
    pool: &pool::Pool,
    times: DrainTimes,
    cut: impl Future<Output = ()>,
) {
    let deadline = times.deadline;
    #[derive(PartialEq)]
    enum Phase {
        Inbound,
        Listeners,
        Streams,
        Pool,
    }
    let _ = drain.send(true);
    tokio::pin!(cut);
    // Streams still being set up (waiting for their tunnel, their
    // authorization or their application) count as open.
    let streams =
        || metrics.stream_tasks(Direction::Inbound) + metrics.stream_tasks(Direction::Outbound);
    let left = || {
        (
            streams(),
            metrics.connections_open(Direction::Inbound),
            metrics.connections_open(Direction::Outbound),
        )
    };
    tracing::info!(open_streams = streams(), deadline = ?deadline, "draining");
    let start = Instant::now();
    let mut cut_short = false;
    let mut phase = Phase::Inbound;
    while start.elapsed() < deadline {
        // (Checked after a tick: a connection accepted as the drain began
        // has its stream counted by then.)
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            () = &mut cut => {
                cut_short = true;
                break;
            }
        }
        if phase == Phase::Inbound
            && start.elapsed() >= times.outbound.min(deadline / 2)
            && streams() == 0
            && metrics.connections_open(Direction::Inbound) == 0
            && metrics.inbound_handshakes() == 0
        {
            let _ = exit.send(true);
            phase = Phase::Listeners;
        }
        if phase == Phase::Listeners && exit.is_closed() {
            phase = Phase::Streams;
        }
        if phase == Phase::Streams && streams() == 0 {
            pool.close();
            phase = Phase::Pool;
        }
        // (A socket still lingering holds the end of what was sent.)
        if phase == Phase::Pool && left() == (0, 0, 0) && bufio::lingering() == 0 {
            break;
        }
    }
    let _ = exit.send(true);
    let (streams, connections, outbound) = left();
    let lingering = bufio::lingering();
    if (streams, connections, outbound, lingering) != (0, 0, 0, 0) {
        let why = if cut_short {
            "drain cut short by a second signal; closing open streams and connections"
        } else {
            "drain deadline reached; closing open streams and connections"
        };
        tracing::warn!(
            open_streams = streams,
            inbound_connections = connections,
            outbound_connections = outbound,
            closing_sockets = lingering,
            "{why}"
        );
    } else {
        tracing::info!("drained");
    }
}

fn authorizer(cfg: &ProxyConfig) -> anyhow::Result<Authorizer> {
    let p = &cfg.policy;
    let schema_path = p
        .schema
        .clone()
        .or_else(|| p.dir.as_ref().map(|d| d.join("ward.cedarschema")));
    let schema = match schema_path {
        Some(path) if path.exists() || p.schema.is_some() => {
            ward_authz::policy::read_schema(&path).map_err(|e| anyhow::anyhow!("{e}"))?
        }
        _ => ward_authz::policy::parse_schema("ward.cedarschema (built in)", DEFAULT_SCHEMA)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let mode = if p.mode == "dry-run" {
        Mode::DryRun
    } else {
        Mode::Enforce
    };
    let log: Option<Box<dyn Write + Send>> = match p.decision_log.as_str() {
        "off" => None,
        "stdout" => Some(Box::new(std::io::stdout())),
        path => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the decision log {path}"))?,
        )),
    };
    let template = IdTemplate::parse(&p.id_template)
        .map_err(|e| anyhow::anyhow!("policy.id_template: {e}"))?;
    Ok(Authorizer::new(
        schema,
        template,
        mode,
        log.map(DecisionLog::buffered),
    ))
}

/// `POST /quitquitquit`: drains, as SIGTERM does. Only from this host
/// (as Istio's): the health port may listen where other workloads reach it,
/// for probes.
fn quit_route(quit: Arc<tokio::sync::Notify>) -> axum::routing::MethodRouter {
    use axum::extract::ConnectInfo;
    axum::routing::post(
        move |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
              headers: axum::http::HeaderMap| async move {
            // As `/logging`.
            if let Err(why) = ward_spec::log_level::local_request(peer, &headers, "stop the proxy")
            {
                return (StatusCode::FORBIDDEN, why);
            }
            quit.notify_one();
            (StatusCode::OK, "draining\n".to_owned())
        },
    )
}

/// `/readyz` is 200 once the proxy has a usable SVID, listens, and (if it
/// takes inbound tunnels and enforces policy) has a policy set: before one,
/// every inbound stream would be denied.
fn health_router(
    identity: Identity,
    needs_policy: bool,
    listening: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    authz: Arc<Authorizer>,
    status: Arc<status::Status>,
) -> axum::Router {
    let authz_ready = authz.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/logging", ward_spec::log_level::route())
        .route(
            "/readyz",
            get(move || {
                let usable = identity.usable().is_some();
                let policy = !needs_policy || authz_ready.version() > 0;
                let draining = stopping.load(Ordering::Acquire);
                let ready = usable && policy && listening.load(Ordering::Acquire) && !draining;
                let why = if draining {
                    "not ready: draining\n"
                } else if !usable {
                    "not ready: no usable SVID yet\n"
                } else if !policy {
                    "not ready: no policy set yet (every inbound stream would be denied)\n"
                } else {
                    "not ready: not listening yet\n"
                };
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, why)
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render(authz.log_dropped());
                async move { body }
            }),
        )
        .route(
            "/config_dump",
            get(move || {
                let mut body =
                    serde_json::to_string_pretty(&status.dump()).expect("a JSON value serializes");
                body.push('\n');
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/quitquitquit` stops the proxy when asked from this host, by a
    /// request that is not a browser's; from elsewhere it is refused.
    #[tokio::test]
    async fn quitquitquit_is_taken_from_this_host_only() {
        use tower::ServiceExt;
        let quit = Arc::new(tokio::sync::Notify::new());
        let app = axum::Router::new().route("/quitquitquit", quit_route(quit.clone()));
        let ask = |from: &str, origin: bool| {
            let req = ward_spec::test_util::request_from("POST", "/quitquitquit", from, origin);
            let app = app.clone();
            async move { app.oneshot(req).await.unwrap().status() }
        };
        assert_eq!(ask("10.0.0.5:4000", false).await, StatusCode::FORBIDDEN);
        assert_eq!(ask("127.0.0.1:4000", true).await, StatusCode::FORBIDDEN);
        let asked = tokio::time::timeout(Duration::from_millis(100), quit.notified());
        assert!(asked.await.is_err(), "a refused request stopped the proxy");
        assert_eq!(ask("[::ffff:127.0.0.1]:4000", false).await, StatusCode::OK);
        let asked = tokio::time::timeout(Duration::from_secs(1), quit.notified());
        asked.await.expect("the proxy was not told to stop");
    }

    /// `/readyz` says not ready once the proxy drains, even while its
    /// listeners are still flagged up (a stop during start-up).
    #[tokio::test]
    async fn readyz_is_not_ready_while_draining() {
        use tower::ServiceExt;
        let (bundle, root) = ward_spec::test_util::root("example.org");
        let api = "spiffe://example.org/tenant/acme/ns/prod/sa/api";
        let current = identity::Current {
            spiffe_id: ward_spec::SpiffeId::parse(api).unwrap(),
            not_after: identity::unix_now() + 3600,
            generation: 1,
            roots: ward_spec::tls::RootStore::new(&bundle).unwrap(),
        };
        let (_tx, current) = watch::channel(Some(current));
        let identity = Identity {
            resolver: ward_spec::test_util::svid(api, &root),
            current,
        };
        let authz = Arc::new(authorizer(&ProxyConfig::default()).unwrap());
        let (listening, stopping) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(false)),
        );
        let status = status::Status::new(
            &ProxyConfig::default(),
            identity.clone(),
            authz.clone(),
            stopping.clone(),
        );
        let app = health_router(
            identity,
            false,
            listening,
            stopping.clone(),
            Arc::new(Metrics::default()),
            authz,
            Arc::new(status),
        );
        let ready = || {
            let req = ward_spec::test_util::request_from("GET", "/readyz", "127.0.0.1:4000", false);
            let app = app.clone();
            async move { app.oneshot(req).await.unwrap().status() }
        };
        assert_eq!(ready().await, StatusCode::OK);
        stopping.store(true, Ordering::Relaxed);
        assert_eq!(ready().await, StatusCode::SERVICE_UNAVAILABLE);
    }

    /// The configured ID template decides what policies see as tenant and
    /// service.
    #[test]
    fn policies_read_ids_through_the_configured_template() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.cedar"),
            r#"permit (principal, action == Ward::Action::"connect", resource)
               when { principal.tenant == "acme" && resource.service == "api" };"#,
        )
        .unwrap();
        let mut cfg = ProxyConfig::default();
        cfg.policy.dir = Some(dir.path().to_owned());
        cfg.policy.decision_log = "off".into();
        let id = |s: &str| ward_spec::SpiffeId::parse(s).unwrap();
        let (web, api) = (
            id("spiffe://example.org/acme/web"),
            id("spiffe://example.org/acme/api"),
        );
        let ctx = ward_authz::ConnectContext {
            destination_port: 80,
            source_address: std::net::IpAddr::from([127, 0, 0, 1]),
            at: None,
        };
        let decide = |cfg: &ProxyConfig| {
            let a = authorizer(cfg).unwrap();
            a.load(&ward_authz::policy::read_dir(dir.path()).unwrap())
                .unwrap();
            a.decide_connect(&web, &api, &ctx).allowed
        };
        assert!(
            !decide(&cfg),
            "the default template does not read these IDs"
        );
        cfg.policy.id_template = "/{tenant}/{service}".into();
        assert!(decide(&cfg));
        cfg.policy.id_template = "/{team}/{service}".into();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("policy.id_template"), "{e}");
    }
}
