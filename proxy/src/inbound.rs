//! Inbound: the HBONE listener (default port 15008).
//!
//! Each TCP connection gets its own task: a mutual TLS 1.3 handshake (the
//! peer's chain must reach our trust domain's roots), then an HTTP/2
//! handshake, both within the handshake timeout. Every `CONNECT` stream on it
//! is put to the authorizer (principal: the peer's SPIFFE ID from its verified
//! certificate; resource: this workload; context: the port asked for and the
//! peer's address). A denied stream gets `403` and the application never sees
//! it; an allowed one gets a fresh TCP connection to the application and `200`.
//! A connection without streams for the idle timeout is closed (a stream
//! that was not admitted does not restart that clock: a peer cannot hold a
//! connection slot with denied streams); on drain,
//! connections stop taking streams (GOAWAY) and close when theirs are done.
//! When the roots change (a bundle rotated, a federation ended), each
//! connection's peer chain is verified again, as of its handshake, and a
//! connection whose peer is no longer trusted is closed with its streams
//! (their access log lines say `untrusted`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use ward_authz::{Authorizer, ConnectContext, Decision};
use ward_spec::tls::RootStore;
use ward_spec::SpiffeId;

use crate::access_log::{End, StreamLog};
use crate::hbone::{self, PeerChain};
use crate::identity::Identity;
use crate::metrics::{Direction, Metrics};
use crate::pump::{pump, AppConn, Carried};

pub struct Inbound {
    pub acceptor: TlsAcceptor,
    pub forward: String,
    /// The port policies see as `destination_port` (what `forward` serves).
    pub service_port: u16,
    /// Ports with an application of their own: (port, address).
    pub ports: Vec<(u16, String)>,
    pub authz: Arc<Authorizer>,
    pub identity: Identity,
    pub metrics: Arc<Metrics>,
    /// Streams per connection.
    pub max_streams: u32,
    /// Streams open at once, all connections together: a stream takes a
    /// slot as its `CONNECT` arrives and holds it to its end; one that finds
    /// none is answered 503 (`overloaded`) before anything else is done for
    /// it (no decision, no application connection).
    pub stream_slots: crate::limit::Limit,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Looks up applications named by host name (`localhost:8080`, or a
    /// container's name): once for many streams, not once each.
    pub resolver: crate::resolve::Resolver,
    /// PINGs to peers while their connections carry streams.
    pub keepalive: hbone::Keepalive,
    /// Each connection to the application starts with a PROXY protocol v2
    /// header ([`crate::proxy_protocol`]).
    pub proxy_protocol: bool,
    /// Changes when the active policy set does, or the time reaches an
    /// instant its decisions may change at: open streams are decided again.
    pub policy_epoch: watch::Receiver<PolicyEpoch>,
    /// Those decisions, shared by the open streams they are the same for.
    pub redecisions: Redecisions,
}

/// The decisions taken again for open streams at one policy epoch, by what
/// a decision depends on (the peer's ID and address, this proxy's ID, the
/// port): a policy change decides once for all the streams of one peer and
/// port, not once each, on the thread that moves every stream's bytes.
#[derive(Default)]
pub struct Redecisions(std::sync::Mutex<(PolicyEpoch, HashMap<RedecisionKey, Arc<Decision>>)>);

type RedecisionKey = (SpiffeId, SpiffeId, std::net::IpAddr, u16);

impl Redecisions {
    /// The decision at `epoch` for `key`, taken by `decide` if no stream
    /// has taken it yet.
    fn get(
        &self,
        epoch: PolicyEpoch,
        key: RedecisionKey,
        decide: impl FnOnce() -> Decision,
    ) -> Arc<Decision> {
        let mut memo = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if memo.0 != epoch {
            *memo = (epoch, HashMap::new());
        }
        memo.1
            .entry(key)
            .or_insert_with(|| Arc::new(decide()))
            .clone()
    }
}

/// What open streams are decided again on (see [`revoked`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyEpoch {
    /// The active policy set's version.
    pub version: u64,
    /// How many times the time has reached an instant at which the active
    /// set's decisions may change (a permit lapsing), or this proxy's own
    /// SPIFFE ID has changed.
    pub clock: u64,
}

impl Inbound {
    /// Where a stream whose `CONNECT` names `port` goes, and the port
    /// policies see: a listed port's own address and that port, any other
    /// port `forward` and the service port (so naming another port cannot
    /// dodge a rule).
    fn target(&self, port: u16) -> (&str, u16) {
        match self.ports.iter().find(|(p, _)| *p == port) {
            Some((p, forward)) => (forward, *p),
            None => (&self.forward, self.service_port),
        }
    }
}

/// Accepts connections until `drain` turns true.
pub async fn serve(
    listener: TcpListener,
    inbound: Arc<Inbound>,
    max_connections: usize,
    mut drain: watch::Receiver<bool>,
) {
    let slots = crate::limit::Limit::new(max_connections);
    loop {
        let Some((tcp, peer)) = crate::accept_until_drained(&listener, &mut drain, "inbound").await
        else {
            return;
        };
        let Some(slot) = slots.take(|| {
            tracing::warn!(
                max_connections,
                "inbound connection limit reached; closing new connections until some end"
            );
        }) else {
            inbound
                .metrics
                .refused(Direction::Inbound, "over_connection_limit");
            continue;
        };
        // Counted from here, not from the task's start: the drain waits for
        // connections in their handshake, and this one is in it already.
        let handshaking = inbound.metrics.inbound_handshake();
        let inbound = inbound.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            connection(tcp, peer, inbound, drain, handshaking).await;
            drop(slot);
        });
    }
}

/// Serves one inbound connection; `handshaking` counts it among those in
/// their handshake until that is over.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    inbound: Arc<Inbound>,
    mut drain: watch::Receiver<bool>,
    handshaking: crate::metrics::StreamTask,
) {
    hbone::tunnel_socket(&tcp);
    // The address the peer reached (a PROXY protocol header's destination).
    let local = tcp
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let metrics = &inbound.metrics;
    // Roots that change from here on get the peer verified again, those
    // that change during the handshake included: the handshake verified the
    // peer against the roots of its start.
    let mut roots_changed = inbound.identity.current.clone();
    // The roots' generation the handshake is checked against: a response
    // that leaves the roots as they were (an SVID rotation) checks nothing.
    let checked = roots_changed
        .borrow_and_update()
        .as_ref()
        .map_or(UNCHECKED, |c| c.roots.generation());
    let transport = crate::bufio::ReadBuffered::tunnel(tcp);
    let traffic = transport.traffic();
    let handshake = async {
        let mut tls = inbound.acceptor.accept(transport).await?;
        hbone::require_h2(tls.get_ref().1)?;
        tls.get_mut().1.set_buffer_limit(Some(hbone::TLS_BUFFER));
        let certs = tls.get_ref().1.peer_certificates();
        let peer_id = ward_spec::tls::peer_id(certs);
        let chain = PeerChain::new(certs);
        let conn = hbone::server_builder(inbound.max_streams)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(crate::pump::h2_io)?;
        Ok::<_, std::io::Error>((peer_id, chain, conn))
    };
    let (peer_id, chain, mut conn) =
        match tokio::time::timeout(inbound.handshake_timeout, handshake).await {
            Ok(Ok((Some(id), chain, conn))) => (id, chain, conn),
            Ok(Ok((None, ..))) => {
                metrics.handshake_failure(Direction::Inbound, "no_certificate");
                return;
            }
            Ok(Err(e)) => {
                let reason = hbone::handshake_failure_reason(&e);
                metrics.handshake_failure(Direction::Inbound, reason);
                tracing::debug!(%peer, reason, error = %e, "inbound handshake failed");
                return;
            }
            Err(_) => {
                metrics.handshake_failure(Direction::Inbound, "timeout");
                tracing::debug!(%peer, "inbound handshake timed out");
                return;
            }
        };
    metrics.connection_opened(Direction::Inbound);
    drop(handshaking);
    tracing::debug!(%peer, peer_id = %peer_id, "inbound connection");
    let verified = Arc::new(VerifiedPeer {
        id: peer_id,
        untrusted: AtomicBool::new(false),
        unresponsive: AtomicBool::new(false),
        served: AtomicBool::new(false),
        local,
        chain,
        checked: AtomicU64::new(checked),
    });
    let (active_tx, mut active_rx) = watch::channel(0usize);
    let active_tx = Arc::new(active_tx);
    let pinger: hbone::Pinger = Arc::new(tokio::sync::Mutex::new(conn.ping_pong()));
    let streams = active_tx.subscribe();
    let first_stream = active_tx.subscribe();
    let keepalive = hbone::unanswered_ping(
        inbound.keepalive,
        traffic.clone(),
        move || (*streams.borrow() > 0).then(|| pinger.clone()),
        move || {
            let mut first_stream = first_stream.clone();
            async move {
                if first_stream.wait_for(|n| *n > 0).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        },
    );
    tokio::pin!(keepalive);
    let mut shutting_down = false;
    // False once the identity watch has ended (it never does while the
    // proxy runs): an ended watch would resolve at once, again and again.
    let mut following = true;
    // One timer, set when the connection becomes idle after serving a stream
    // (the idle timeout) or is told to close (the close grace); other events
    // leave it running. Streams that were not admitted (denied, refused,
    // cancelled) leave it too: the idle timeout counts from the last
    // admitted stream's end (or the handshake).
    let timer = tokio::time::sleep(inbound.idle_timeout);
    tokio::pin!(timer);
    // Set with the timer when the connection is told to close.
    let mut grace = None;
    let mut was_idle = true;
    // When the peer's certificate expires the connection is told to close
    // (GOAWAY): its open streams go on, new ones need a new handshake.
    let expiry =
        tokio::time::sleep_until(until_unix(verified.chain.expires_at().saturating_add(1)));
    tokio::pin!(expiry);
    loop {
        let idle = *active_rx.borrow_and_update() == 0;
        if idle && !was_idle {
            let served = verified.served.swap(false, Ordering::AcqRel);
            if shutting_down {
                // From the last admitted stream's end. A peer that never
                // confirms the GOAWAY may go on opening streams; those
                // refused do not start the grace again, or one denied
                // every few seconds would hold the connection for good.
                if served || grace.is_none() {
                    grace = Some(hbone::CloseGrace::start(&traffic, timer.as_mut()));
                }
            } else if served {
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + inbound.idle_timeout);
            }
        }
        was_idle = idle;
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    active_tx.send_modify(|n| *n += 1);
                    let guard = ActiveGuard(active_tx.clone());
                    let task = metrics.stream_task(Direction::Inbound);
                    let slot = inbound.stream_slots.take(|| {
                        tracing::warn!(
                            max_inbound_streams = inbound.stream_slots.max(),
                            "inbound stream limit reached; answering new streams 503 until some end"
                        );
                    });
                    let inbound = inbound.clone();
                    let verified = verified.clone();
                    // Boxed: a request head is 240 bytes, which this task
                    // and `stream`'s future would each keep for the
                    // stream's life; the box is freed on admission.
                    let req = Box::new(req);
                    tokio::spawn(async move {
                        stream(req, respond, slot.is_some(), &verified, peer, &inbound).await;
                        drop((guard, task, slot));
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "inbound connection error");
                    break;
                }
                None => break,
            },
            // Wakes the loop, which sets the timer when the count reaches 0.
            _ = active_rx.changed() => {}
            () = &mut keepalive => {
                tracing::warn!(%peer, peer_id = %verified.id, timeout = ?inbound.keepalive.timeout, "the peer did not answer a PING; closing its connection and the streams on it");
                metrics.handshake_failure(Direction::Inbound, "ping_timeout");
                verified.unresponsive.store(true, Ordering::Release);
                break;
            }
            () = &mut timer, if idle => {
                if shutting_down {
                    // Still taking the last bytes (a slow link): wait on.
                    if let Some(at) = grace.as_mut().and_then(hbone::CloseGrace::next_check) {
                        timer.as_mut().reset(at);
                        continue;
                    }
                    tracing::debug!(%peer, "the peer did not finish closing; cut off");
                    break;
                }
                // A stream admitted and ended between two turns of this loop.
                if verified.served.swap(false, Ordering::AcqRel) {
                    timer.as_mut().reset(tokio::time::Instant::now() + inbound.idle_timeout);
                    continue;
                }
                tracing::debug!(%peer, "closing idle inbound connection");
                conn.graceful_shutdown();
                shutting_down = true;
                grace = Some(hbone::CloseGrace::start(&traffic, timer.as_mut()));
            }
            () = &mut expiry, if !shutting_down => {
                if !verified.chain.expired() {
                    // The wait is capped (see `until_unix`): wait on.
                    expiry.as_mut().reset(until_unix(verified.chain.expires_at().saturating_add(1)));
                    continue;
                }
                tracing::info!(%peer, peer_id = %verified.id, "the peer's certificate has expired; its connection takes no new streams");
                conn.graceful_shutdown();
                shutting_down = true;
                grace = Some(hbone::CloseGrace::start(&traffic, timer.as_mut()));
            }
            _ = crate::drained(&mut drain), if !shutting_down => {
                conn.graceful_shutdown();
                shutting_down = true;
                grace = Some(hbone::CloseGrace::start(&traffic, timer.as_mut()));
            }
            r = roots_changed.changed(), if following => {
                following = r.is_ok();
                let current = roots_changed.borrow_and_update().clone();
                if let (Ok(()), Some(current)) = (r, current) {
                    let generation = current.roots.generation();
                    if verified.checked.load(Ordering::Acquire) == generation {
                        continue;
                    }
                    if let Err(e) = verified.chain.verify_client(&current.roots) {
                        tracing::warn!(%peer, peer_id = %verified.id, error = %e, "closing a connection whose peer is no longer trusted");
                        metrics.handshake_failure(Direction::Inbound, "no_longer_trusted");
                        verified.untrusted.store(true, Ordering::Release);
                        break;
                    }
                    verified.checked.store(generation, Ordering::Release);
                }
            }
        }
    }
    // Closed (or set lingering, see `LingeringClose`) before it is counted
    // closed: the drain then sees either.
    drop(conn);
    metrics.connection_closed(Direction::Inbound);
}

/// Unix second `at` as a deadline (now if it has passed), at most a day
/// away: a timer that far out is set again when it fires.
fn until_unix(at: i64) -> tokio::time::Instant {
    let wait = at
        .saturating_sub(crate::identity::unix_now())
        .clamp(0, 24 * 3600);
    tokio::time::Instant::now() + Duration::from_secs(wait as u64)
}

/// A connection's peer, shared with its streams.
struct VerifiedPeer {
    /// The SPIFFE ID of its verified certificate.
    id: SpiffeId,
    /// Set before the connection is closed because the peer is no longer
    /// trusted: its streams then end as `untrusted`, not as errors.
    untrusted: AtomicBool,
    /// Set when a stream is admitted: the idle timeout restarts when the
    /// connection next has no streams.
    served: AtomicBool,
    /// This proxy's address the peer connected to.
    local: SocketAddr,
    /// Set before the connection is closed because the peer left a
    /// keepalive PING unanswered: its streams then end as `unreachable`.
    unresponsive: AtomicBool,
    /// Its certificates, verified again when the roots change.
    chain: PeerChain,
    /// The roots' generation it was last verified against.
    checked: AtomicU64,
}

/// No roots' generation: the peer is verified at the first chance.
const UNCHECKED: u64 = u64::MAX;

impl VerifiedPeer {
    /// Whether the peer is still trusted by `roots`. Streams ask this before
    /// they are admitted, so that none gets through in the moment between a
    /// change of the roots and its connection's check (which closes it; the
    /// connection alone decides that, so a refusal here marks nothing).
    fn trusted_by(&self, roots: &RootStore) -> bool {
        !self.untrusted.load(Ordering::Acquire)
            && (self.checked.load(Ordering::Acquire) == roots.generation()
                || self.chain.verify_client(roots).is_ok())
    }
}

struct ActiveGuard(Arc<watch::Sender<usize>>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Answers a stream `status` and ends it; the refusal, for the access log.
fn refuse<T>(
    respond: &mut SendResponse<Bytes>,
    status: StatusCode,
    outcome: &'static str,
) -> Result<T, Refusal> {
    respond_status(respond, status, outcome);
    Err((Some(status), outcome))
}

/// Answers `status`, saying why (`outcome`) in [`hbone::ERROR_HEADER`].
fn respond_status(respond: &mut SendResponse<Bytes>, status: StatusCode, outcome: &'static str) {
    let resp = Response::builder()
        .status(status)
        .header(hbone::ERROR_HEADER, outcome)
        .body(())
        .expect("a status-only response is valid");
    let _ = respond.send_response(resp, true);
}

#[allow(clippy::manual_async_fn)] // see the note in its body
fn stream<'a>(
    req: Box<Request<RecvStream>>,
    respond: SendResponse<Bytes>,
    has_slot: bool,
    verified: &'a VerifiedPeer,
    peer: SocketAddr,
    inbound: &'a Inbound,
) -> impl std::future::Future<Output = ()> + 'a {
    // An async block, not an async fn, as `revoked`'s: an async fn's
    // future would keep each argument twice.
    async move {
        let peer_id = &verified.id;
        let began = Instant::now();
        // The set's version is taken (by `admit`) before the decision: a set
        // that changes while the stream is admitted gets it decided again,
        // and one that the decision already used (the epoch follows the
        // authorizer a moment late) does not.
        let mut epoch = inbound.policy_epoch.clone();
        let clock = epoch.borrow_and_update().clock;
        let mut decided = 0;
        let metrics = &inbound.metrics;
        let mut log = StreamLog::start(
            metrics,
            Direction::Inbound,
            peer,
            Some(peer_id),
            &inbound.forward,
            None,
        );
        // Admission runs in its own allocation, freed before the long-lived part:
        // an open stream keeps only what the pump needs. (`req` is not even
        // looked at here: a local borrowed in this future stays in it for the
        // stream's life, moved or not.)
        let (mut app, send, body, port) = match Box::pin(admit(
            req,
            respond,
            has_slot,
            verified,
            peer,
            inbound,
            &mut log,
            &mut decided,
        ))
        .await
        {
            Ok(admitted) => admitted,
            Err((status, outcome)) => {
                let status = status.map_or(0, |s| s.as_u16());
                StreamLog::end(
                    metrics,
                    Direction::Inbound,
                    log,
                    End::empty(status, outcome, None),
                );
                return;
            }
        };
        metrics.stream_opened(Direction::Inbound);
        let opened = Instant::now();
        metrics.stream_set_up(Direction::Inbound, opened - began);
        verified.served.store(true, Ordering::Release);
        let body = std::future::ready(Ok(body));
        let carried = Carried::default();
        let result = tokio::select! {
            biased;
            // A stream the policy set now denies carries nothing more.
            // Dropping the pump resets the stream, and the application's
            // connection unless the stream's end had reached it.
            () = revoked(&mut epoch, (decided, clock), peer_id, peer, port, inbound) => Ok("revoked"),
            r = pump(&mut app, send, body, Bytes::new(), &carried) => r.map(|()| "ok"),
        };
        drop(app);
        let (to_app, from_app) = carried.totals();
        metrics.stream_closed(Direction::Inbound, (to_app, from_app));
        metrics.stream_carried(
            Direction::Inbound,
            Some(peer_id),
            (to_app, from_app),
            opened.elapsed(),
        );
        let (outcome, error) = match &result {
            Ok(outcome) => (*outcome, None),
            // The connection was closed under it: its peer is no longer trusted.
            Err(_) if verified.untrusted.load(Ordering::Acquire) => ("untrusted", None),
            // Its connection was closed: the peer stopped answering PINGs.
            Err(_) if verified.unresponsive.load(Ordering::Acquire) => {
                ("unreachable", Some(&UNRESPONSIVE as &dyn std::fmt::Display))
            }
            Err(e) => {
                tracing::debug!(principal = %peer_id, error = %e, "inbound stream ended with an error");
                ("error", Some(e as &dyn std::fmt::Display))
            }
        };
        let end = End {
            status: 200,
            outcome,
            error,
            bytes: Some((to_app, from_app)),
        };
        StreamLog::end(metrics, Direction::Inbound, log, end);
    }
}

/// Why a stream was not admitted: the status it was answered (none if the
/// peer reset it first), and the access log's outcome.
type Refusal = (Option<StatusCode>, &'static str);

/// Why a stream was answered 503 when the proxy had as many inbound
/// streams open as it takes ([`Inbound::stream_slots`]); its access log
/// outcome is `refused`.
pub const OVERLOADED: &str = "overloaded";

/// Why a stream whose peer stopped answering PINGs ended.
const UNRESPONSIVE: &str = "the peer did not answer a keepalive PING";

/// A peer that reset its stream before it was answered.
const CANCELLED: Refusal = (None, "cancelled");

/// Authorizes a stream and connects it to the application; answers the peer
/// (403, 502, … or 200) and returns what the pump needs when it may go on.
/// `decided`: the policy set version the decision was made under (or an
/// older one).
#[allow(clippy::too_many_arguments)]
async fn admit(
    req: Box<Request<RecvStream>>,
    mut respond: SendResponse<Bytes>,
    has_slot: bool,
    verified: &VerifiedPeer,
    peer: SocketAddr,
    inbound: &Inbound,
    log: &mut Option<Box<StreamLog>>,
    decided: &mut u64,
) -> Result<(AppConn, SendStream<Bytes>, RecvStream, u16), Refusal> {
    let peer_id = &verified.id;
    let metrics = &inbound.metrics;
    if !has_slot {
        metrics.refused(Direction::Inbound, "over_stream_limit");
        respond_status(&mut respond, StatusCode::SERVICE_UNAVAILABLE, OVERLOADED);
        return Err((Some(StatusCode::SERVICE_UNAVAILABLE), "refused"));
    }
    let (parts, body) = req.into_parts();
    if parts.method != Method::CONNECT {
        return refuse(&mut respond, StatusCode::METHOD_NOT_ALLOWED, "error");
    }
    let Some(named) = parts.uri.authority().and_then(|a| a.port_u16()) else {
        return refuse(&mut respond, StatusCode::BAD_REQUEST, "error");
    };
    let (forward, port) = inbound.target(named);
    if forward != inbound.forward {
        StreamLog::set_destination(log, forward);
    }
    let mut me = match admissible(inbound, verified, |me| me.spiffe_id.clone()) {
        Ok(me) => me,
        Err((status, outcome)) => return refuse(&mut respond, status, outcome),
    };
    // (The set's version is read before the decision: see `stream`.)
    *decided = inbound.authz.version();
    let decided_at = crate::identity::unix_now();
    let mut decision = decide(inbound, peer_id, &me, peer, port);
    metrics.decision(decision.allowed, decision.permitted);
    StreamLog::set_decision(log, &decision.decision_id);
    if !decision.permitted {
        tracing::info!(principal = %peer_id, decision_id = %decision.decision_id, policies = ?decision.policies, "stream denied");
        return refuse(&mut respond, StatusCode::FORBIDDEN, "denied");
    }
    // The lookup (of an application named by host name) and the connect
    // take a connect timeout together, as the peer expects (see the pool's
    // answer timeout); the lookup waits for half of it at most (the last
    // addresses serve if a lookup is slow), so it leaves the connect time.
    // An application that cannot be reached at its addresses may have
    // moved (a restarted container): its name is looked up again (for half
    // the time left at most), and its new addresses tried.
    let wait = inbound.connect_timeout;
    let deadline = Instant::now() + wait;
    let connect = tokio::time::timeout(wait, async {
        let addresses = inbound.resolver.addresses(forward, wait / 2).await?;
        let failed = match TcpStream::connect(addresses.as_slice()).await {
            Err(e) => e,
            connected => return connected,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let tried = addresses.as_slice();
        match inbound.resolver.moved(forward, tried, left / 2).await {
            Some(moved) => {
                tracing::debug!(forward, error = %failed, "trying the application's new addresses");
                TcpStream::connect(moved.as_slice()).await
            }
            None => Err(failed),
        }
    });
    // A peer that gives up meanwhile (resets the stream) stops the connect:
    // the application does not see a connection nobody will use.
    let connected = tokio::select! {
        r = connect => Some(r.unwrap_or_else(|_| {
            Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        })),
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => None,
    };
    let app = match connected {
        // Reset by the peer, or its connection closed under the stream.
        None => return Err(gone(verified)),
        Some(Ok(s)) => s,
        Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
            tracing::warn!(forward, error = %e, "reaching the application timed out");
            return refuse(&mut respond, StatusCode::GATEWAY_TIMEOUT, "unreachable");
        }
        Some(Err(e)) => {
            tracing::warn!(forward, error = %e, "cannot reach the application");
            return refuse(&mut respond, StatusCode::BAD_GATEWAY, "unreachable");
        }
    };
    // From here on, an application connection not handed to the pump is
    // reset when dropped: it must not pass for an empty stream.
    let mut app = AppConn::new(app);
    if verified.untrusted.load(Ordering::Acquire) {
        // Its connection is being closed: the application's is closed unused.
        return Err((None, "untrusted"));
    }
    // The roots may have changed, or the peer's certificate expired, while
    // the application was being connected: checked again before the answer
    // lets the peer's bytes through (the application's connection is
    // closed unused).
    let me_now = match admissible(inbound, verified, |me| me.spiffe_id.clone()) {
        Ok(me) => me,
        Err((status, outcome)) => return refuse(&mut respond, status, outcome),
    };
    // So may the policy set (or the time have passed an instant its
    // decisions change at): the stream is decided again before any byte
    // passes (open streams follow such changes only a moment later).
    let version = inbound.authz.version();
    let now = crate::identity::unix_now();
    let every = crate::TIME_REDECIDE_EVERY;
    if version != *decided
        || me_now != me
        || inbound
            .authz
            .time_may_change_decisions(decided_at, now, every)
    {
        *decided = version;
        me = me_now;
        decision = decide(inbound, peer_id, &me, peer, port);
        metrics.decision(decision.allowed, decision.permitted);
        StreamLog::set_decision(log, &decision.decision_id);
        if !decision.permitted {
            tracing::info!(principal = %peer_id, decision_id = %decision.decision_id, policies = ?decision.policies, "stream denied by the policy set as it is now");
            return refuse(&mut respond, StatusCode::FORBIDDEN, "denied");
        }
    }
    hbone::app_socket(app.tcp());
    if inbound.proxy_protocol {
        let header = crate::proxy_protocol::header(
            peer,
            SocketAddr::new(verified.local.ip(), port),
            &peer_id.to_string(),
            &decision.decision_id,
        );
        let wrote = tokio::time::timeout(
            inbound.connect_timeout,
            tokio::io::AsyncWriteExt::write_all(app.tcp(), &header),
        )
        .await;
        if !matches!(wrote, Ok(Ok(()))) {
            tracing::warn!(
                forward,
                "the application did not take the PROXY protocol header"
            );
            return refuse(&mut respond, StatusCode::BAD_GATEWAY, "unreachable");
        }
    }
    let ok = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("valid");
    // The peer may have reset the stream just now, or its connection been
    // closed under it.
    let send = respond
        .send_response(ok, false)
        .map_err(|_| gone(verified))?;
    Ok((app, send, body, port))
}

/// Why a stream being admitted is gone: its connection was closed because
/// the peer is no longer trusted, or because it left a PING unanswered;
/// else the peer reset it.
fn gone(verified: &VerifiedPeer) -> Refusal {
    if verified.untrusted.load(Ordering::Acquire) {
        (None, "untrusted")
    } else if verified.unresponsive.load(Ordering::Acquire) {
        (None, "unreachable")
    } else {
        CANCELLED
    }
}

/// Whether a stream may be admitted as far as identities go: this proxy
/// has a usable SVID (`then` takes what it needs of it, without a copy of
/// the rest: every admission allocates less) and the peer is still trusted
/// by its roots and its certificate has not expired; else the status and
/// outcome to refuse it with.
fn admissible<T>(
    inbound: &Inbound,
    verified: &VerifiedPeer,
    then: impl FnOnce(&crate::identity::Current) -> T,
) -> Result<T, (StatusCode, &'static str)> {
    let current = inbound.identity.current.borrow();
    let me = current
        .as_ref()
        .filter(|c| c.not_after > crate::identity::unix_now())
        .ok_or((StatusCode::SERVICE_UNAVAILABLE, "error"))?;
    if !verified.trusted_by(&me.roots) {
        return Err((StatusCode::FORBIDDEN, "untrusted"));
    }
    if verified.chain.expired() {
        return Err((StatusCode::FORBIDDEN, "expired"));
    }
    Ok(then(me))
}

/// May `peer_id`, connecting from `peer`, open a stream to port `port` of `me`?
fn decide(
    inbound: &Inbound,
    peer_id: &SpiffeId,
    me: &SpiffeId,
    peer: SocketAddr,
    port: u16,
) -> ward_authz::Decision {
    inbound.authz.decide_connect(
        peer_id,
        me,
        &ConnectContext {
            destination_port: port,
            source_address: peer.ip(),
            at: None,
        },
    )
}

/// Resolves when a set newer than version `decided` (the one the stream was
/// admitted under, or an older one), or the time past an instant the set's
/// decisions may change at (`clock` counts those), no longer permits an open
/// stream (the decision is logged like any other); pending for as long as
/// sets allow it.
#[allow(clippy::manual_async_fn)] // see the note in its body
fn revoked<'a>(
    epoch: &'a mut watch::Receiver<PolicyEpoch>,
    (mut decided, mut clock): (u64, u64),
    peer_id: &'a SpiffeId,
    peer: SocketAddr,
    port: u16,
    inbound: &'a Inbound,
) -> impl std::future::Future<Output = ()> + 'a {
    // An async block, not an async fn: every open stream's task holds this
    // future, and an async fn's would keep each argument twice (as passed,
    // and as its body's own copy).
    async move {
        while epoch.changed().await.is_ok() {
            let now = *epoch.borrow_and_update();
            if now.version <= decided && now.clock == clock {
                continue;
            }
            (decided, clock) = (decided.max(now.version), now.clock);
            // Decided for the SPIFFE ID this proxy has, even if its SVID has
            // expired meanwhile (the stream goes on): a change must not be lost.
            let Some(me) = inbound
                .identity
                .current
                .borrow()
                .as_ref()
                .map(|c| c.spiffe_id.clone())
            else {
                continue;
            };
            let key = (peer_id.clone(), me.clone(), peer.ip(), port);
            let decision = inbound
                .redecisions
                .get(now, key, || decide(inbound, peer_id, &me, peer, port));
            if !decision.permitted {
                inbound.metrics.stream_revoked();
                tracing::info!(principal = %peer_id, decision_id = %decision.decision_id, policies = ?decision.policies, "closed an open stream the policy set now denies");
                return;
            }
        }
        std::future::pending().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Current;
    use crate::resolve::testing::lookup_of;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use tokio_rustls::TlsConnector;
    use ward_spec::test_util::{root, svid};
    use ward_spec::tls::{PeerPolicy, SpiffeServerVerifier, SvidResolver};

    const API: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/api";
    const WEB: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/web";

    /// What this proxy is (`API`), per the identity watch: valid for an hour
    /// from `issued` seconds from now.
    fn current(issued: i64, generation: u64, roots: &RootStore) -> Current {
        Current {
            spiffe_id: SpiffeId::parse(API).unwrap(),
            not_after: crate::identity::unix_now() + issued + 3600,
            generation,
            roots: roots.clone(),
        }
    }

    /// The inbound side of `API`, with the SVID in `resolver`, following
    /// `identity` and `policy_epoch`, closing connections idle for
    /// `idle_timeout`; no policies (every stream is denied).
    fn inbound(
        resolver: SvidResolver,
        identity: watch::Receiver<Option<Current>>,
        policy_epoch: watch::Receiver<PolicyEpoch>,
        idle_timeout: Duration,
    ) -> Arc<Inbound> {
        let roots = identity.borrow().as_ref().unwrap().roots.clone();
        let verifier = ward_spec::tls::SpiffeClientVerifier::new(roots, true);
        let acceptor = TlsAcceptor::from(Arc::new(ward_spec::tls::server_config(
            resolver.clone(),
            verifier,
        )));
        let schema =
            ward_authz::policy::parse_schema("built in", ward_authz::DEFAULT_SCHEMA).unwrap();
        Arc::new(Inbound {
            acceptor,
            forward: "127.0.0.1:9".into(),
            service_port: 9,
            ports: Vec::new(),
            authz: Arc::new(Authorizer::new(
                schema,
                ward_authz::IdTemplate::default(),
                ward_authz::Mode::Enforce,
                None,
            )),
            identity: Identity {
                resolver,
                current: identity,
            },
            metrics: Arc::new(Metrics::default()),
            max_streams: 10,
            stream_slots: crate::limit::Limit::new(100),
            handshake_timeout: Duration::from_secs(30),
            idle_timeout,
            connect_timeout: Duration::from_secs(5),
            resolver: crate::resolve::Resolver::new(
                crate::resolve::system_lookup(),
                crate::resolve::DNS_REFRESH,
            ),
            keepalive: hbone::Keepalive {
                interval: Duration::from_secs(10),
                timeout: Duration::from_secs(20),
            },
            proxy_protocol: false,
            policy_epoch,
            redecisions: Redecisions::default(),
        })
    }

    /// A policy change while this proxy's SVID has expired (the agent is
    /// away) still gets open streams decided again: one the new set denies
    /// is closed. The set the stream was admitted under, reported by the
    /// epoch after the admission, is not decided again.
    #[tokio::test]
    async fn a_policy_change_while_the_svid_has_expired_still_closes_denied_streams() {
        let (bundle, root) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let expired = current(-7200, 1, &roots);
        assert!(expired.not_after < crate::identity::unix_now());
        let (_identity_tx, identity) = watch::channel(Some(expired));
        let (epoch_tx, epoch) = watch::channel(PolicyEpoch::default());
        let inbound = inbound(svid(API, &root), identity, epoch, Duration::from_secs(60));
        let mut seen = inbound.policy_epoch.clone();
        seen.borrow_and_update();
        let (web, _, peer) = web_to_api();
        let revoking = revoked(&mut seen, (1, 0), &web, peer, 9, &inbound);
        tokio::pin!(revoking);
        let version = |version| PolicyEpoch { version, clock: 0 };
        epoch_tx.send(version(1)).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut revoking)
                .await
                .is_err(),
            "the stream was closed for the set it was admitted under"
        );
        assert!(inbound
            .metrics
            .render(0)
            .contains("ward_proxy_streams_revoked_total 0"));
        epoch_tx.send(version(2)).unwrap();
        tokio::time::timeout(Duration::from_secs(10), revoking)
            .await
            .expect("the new policy set was never applied to the open stream");
        assert!(
            inbound
                .metrics
                .render(0)
                .contains("ward_proxy_streams_revoked_total 1"),
            "{}",
            inbound.metrics.render(0)
        );
    }

    /// [`fresh_inbound`] deciding by `policy` (whose version is returned),
    /// with its policy epoch following the set, the time and its identity.
    fn under_policy(
        policy: &str,
    ) -> (Arc<Inbound>, RootStore, watch::Sender<Option<Current>>, u64) {
        let (mut inbound, _root, roots, identity_tx) = fresh_inbound(Duration::from_secs(60));
        let serving = Arc::get_mut(&mut inbound).unwrap();
        let decided = serving.authz.load(&policies(policy)).unwrap();
        serving.policy_epoch =
            crate::policy_epoch(serving.authz.clone(), serving.identity.current.clone());
        (inbound, roots, identity_tx, decided)
    }

    /// A receiver of `inbound`'s policy epoch, and the epoch's clock now.
    fn watching(inbound: &Inbound) -> (watch::Receiver<PolicyEpoch>, u64) {
        let mut seen = inbound.policy_epoch.clone();
        let clock = seen.borrow_and_update().clock;
        (seen, clock)
    }

    /// The peer `WEB` at a client address, and `API`, the workload it calls.
    fn web_to_api() -> (SpiffeId, SpiffeId, SocketAddr) {
        let peer = "127.0.0.1:40000".parse().unwrap();
        (
            SpiffeId::parse(WEB).unwrap(),
            SpiffeId::parse(API).unwrap(),
            peer,
        )
    }

    /// At one policy epoch the streams of one peer and port share one
    /// decision; another peer, port or epoch is decided anew.
    #[test]
    fn open_streams_alike_are_decided_again_once_per_epoch() {
        let memo = Redecisions::default();
        let (web, api, peer) = web_to_api();
        let decided = std::cell::Cell::new(0);
        let decide = |permitted| {
            decided.set(decided.get() + 1);
            Decision {
                allowed: permitted,
                permitted,
                policies: vec![],
                errors: vec![],
                decision_id: format!("d{}", decided.get()),
                duration_us: 0.0,
            }
        };
        let key = |port| (web.clone(), api.clone(), peer.ip(), port);
        let epoch = |version| PolicyEpoch { version, clock: 0 };
        for _ in 0..1000 {
            assert!(memo.get(epoch(2), key(9), || decide(true)).permitted);
        }
        assert_eq!(decided.get(), 1);
        assert!(!memo.get(epoch(2), key(10), || decide(false)).permitted);
        assert!(!memo.get(epoch(3), key(9), || decide(false)).permitted);
        assert_eq!(decided.get(), 3);
    }

    /// A permit that lapses at an instant (a break-glass rule) closes the
    /// open streams it admitted once that instant comes, the policy set
    /// unchanged.
    #[tokio::test]
    async fn a_permit_that_lapses_closes_the_streams_it_admitted() {
        let lapses = crate::identity::unix_now() + 2;
        let permit =
            format!("permit (principal, action, resource) when {{ context.now < {lapses} }};");
        let (inbound, _roots, _identity_tx, decided) = under_policy(&permit);
        let (mut seen, clock) = watching(&inbound);
        let (web, api, peer) = web_to_api();
        assert!(decide(&inbound, &web, &api, peer, 9).permitted);
        let revoking = revoked(&mut seen, (decided, clock), &web, peer, 9, &inbound);
        tokio::time::timeout(Duration::from_secs(6), revoking)
            .await
            .expect("the lapsed permit still holds the open stream");
        assert!(crate::identity::unix_now() >= lapses);
        let text = inbound.metrics.render(0);
        assert!(
            text.contains("ward_proxy_streams_revoked_total 1"),
            "{text}"
        );
    }

    /// This proxy's own SPIFFE ID changing (the workload registered as
    /// another service) gets open streams decided again for the new one:
    /// one that policies allow only to the old ID is closed.
    #[tokio::test]
    async fn a_change_of_this_proxys_id_closes_streams_allowed_only_to_the_old_one() {
        let to_api = r#"permit (principal, action == Ward::Action::"connect", resource is Ward::Workload) when { resource.service == "api" };"#;
        let (inbound, roots, identity_tx, decided) = under_policy(to_api);
        let (mut seen, clock) = watching(&inbound);
        let (web, api, peer) = web_to_api();
        assert!(decide(&inbound, &web, &api, peer, 9).permitted);
        let revoking = revoked(&mut seen, (decided, clock), &web, peer, 9, &inbound);
        tokio::pin!(revoking);
        // A new SVID with the same ID changes nothing.
        identity_tx.send(Some(current(0, 2, &roots))).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(600), &mut revoking)
                .await
                .is_err(),
            "a rotation closed the stream"
        );
        let mut billing = current(0, 3, &roots);
        billing.spiffe_id =
            SpiffeId::parse("spiffe://example.org/tenant/acme/ns/prod/sa/billing").unwrap();
        identity_tx.send(Some(billing)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), revoking)
            .await
            .expect("the stream allowed to the old ID stayed open");
        let text = inbound.metrics.render(0);
        assert!(
            text.contains("ward_proxy_streams_revoked_total 1"),
            "{text}"
        );
    }

    /// The roots rotate (the peer's root is dropped) after the peer's TLS
    /// handshake and before its HTTP/2 preface: the connection is closed as
    /// no longer trusted once it is up, not kept for good.
    #[tokio::test]
    async fn roots_that_change_during_the_handshake_get_the_peer_verified_again() {
        let (old_bundle, old_root) = root("example.org");
        let (new_bundle, _) = root("example.org");
        let roots = RootStore::new(&old_bundle).unwrap();
        let resolver = svid(API, &old_root);
        let (identity_tx, identity_rx) = watch::channel(Some(current(0, 1, &roots)));
        let inbound = inbound(
            resolver,
            identity_rx,
            watch::channel(PolicyEpoch::default()).1,
            Duration::from_secs(60),
        );
        let metrics = inbound.metrics.clone();
        let (addr, server) = serve_one(inbound).await;

        // The peer: a TLS handshake with an SVID from the old root...
        let client_roots = RootStore::new(&old_bundle).unwrap();
        let client_cfg = ward_spec::tls::client_config(
            Some(svid(WEB, &old_root)),
            SpiffeServerVerifier::new(
                client_roots,
                PeerPolicy::OneOf(vec![SpiffeId::parse(API).unwrap()]),
            ),
        );
        let name = rustls::pki_types::ServerName::try_from("ward.invalid").unwrap();
        let tls = TlsConnector::from(Arc::new(client_cfg))
            .connect(name, TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        // ... which the server has finished when its HTTP/2 settings (sent
        // before the client's preface is read) arrive; the old root is
        // dropped then (as the identity watcher does when a bundle arrives) ...
        tls.get_ref().0.readable().await.unwrap();
        roots.update(&new_bundle).unwrap();
        identity_tx.send(Some(current(0, 2, &roots))).unwrap();
        // ... and only then the HTTP/2 preface.
        let (_client, conn) = crate::hbone::client_builder(10)
            .handshake::<_, Bytes>(tls)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the connection of a peer no longer trusted stayed open")
            .ok();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        let text = metrics.render(0);
        assert!(text.contains(r#"reason="no_longer_trusted"} 1"#), "{text}");
    }

    /// A peer that offers no ALPN (rustls lets such a handshake through) is
    /// refused: HBONE is HTTP/2 over TLS with ALPN `h2`.
    #[tokio::test]
    async fn a_peer_without_alpn_h2_is_refused() {
        let (inbound, root, roots, _identity_tx) = fresh_inbound(Duration::from_secs(60));
        let metrics = inbound.metrics.clone();
        let (addr, server) = serve_one(inbound).await;
        let mut cfg = ward_spec::tls::client_config(
            Some(svid(WEB, &root)),
            SpiffeServerVerifier::new(
                roots.clone(),
                PeerPolicy::OneOf(vec![SpiffeId::parse(API).unwrap()]),
            ),
        );
        cfg.alpn_protocols.clear();
        let name = rustls::pki_types::ServerName::try_from("ward.invalid").unwrap();
        let _tls = TlsConnector::from(Arc::new(cfg))
            .connect(name, TcpStream::connect(addr).await.unwrap())
            .await;
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("a connection without ALPN h2 was kept")
            .unwrap();
        let text = metrics.render(0);
        assert!(text.contains(r#"reason="incompatible"} 1"#), "{text}");
        assert!(
            text.contains("ward_proxy_connections_total{direction=\"inbound\"} 0"),
            "{text}"
        );
    }

    /// A peer's TLS client config (`WEB`, from `issuer`, expecting `API`).
    fn peer_client(issuer: &ward_spec::test_util::Issuer, roots: &RootStore) -> TlsConnector {
        let cfg = ward_spec::tls::client_config(
            Some(svid(WEB, issuer)),
            SpiffeServerVerifier::new(
                roots.clone(),
                PeerPolicy::OneOf(vec![SpiffeId::parse(API).unwrap()]),
            ),
        );
        TlsConnector::from(Arc::new(cfg))
    }

    /// The inbound side of `API` under a fresh root (no policies: every
    /// stream is denied), closing connections idle for `idle_timeout`; with
    /// that root, its roots and the identity watch's sender.
    fn fresh_inbound(
        idle_timeout: Duration,
    ) -> (
        Arc<Inbound>,
        ward_spec::test_util::Issuer,
        RootStore,
        watch::Sender<Option<Current>>,
    ) {
        let (bundle, root) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let (identity_tx, identity_rx) = watch::channel(Some(current(0, 1, &roots)));
        let inbound = inbound(
            svid(API, &root),
            identity_rx,
            watch::channel(PolicyEpoch::default()).1,
            idle_timeout,
        );
        (inbound, root, roots, identity_tx)
    }

    /// `inbound` serving one connection, from a peer (`WEB`, from `issuer`)
    /// whose HTTP/2 client and connection are returned.
    async fn connected_peer(
        inbound: Arc<Inbound>,
        issuer: &ward_spec::test_util::Issuer,
        roots: &RootStore,
    ) -> (
        h2::client::SendRequest<Bytes>,
        h2::client::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>,
    ) {
        let tls = peer_tls(inbound, issuer, roots).await;
        crate::hbone::client_builder(10)
            .handshake::<_, Bytes>(tls)
            .await
            .unwrap()
    }

    /// `inbound` serving one connection, from a peer (`WEB`, from `issuer`)
    /// whose TLS session is returned.
    async fn peer_tls(
        inbound: Arc<Inbound>,
        issuer: &ward_spec::test_util::Issuer,
        roots: &RootStore,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let (addr, _server) = serve_one(inbound).await;
        let name = rustls::pki_types::ServerName::try_from("ward.invalid").unwrap();
        peer_client(issuer, roots)
            .connect(name, TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap()
    }

    /// `inbound` serving the first connection to the address returned, on
    /// the task returned (which ends with the connection).
    async fn serve_one(inbound: Arc<Inbound>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (_drain_tx, drain_rx) = watch::channel(false);
            let (tcp, peer) = listener.accept().await.unwrap();
            let handshaking = inbound.metrics.inbound_handshake();
            connection(tcp, peer, inbound, drain_rx, handshaking).await;
        });
        (addr, server)
    }

    /// An application whose accept queue is full, so that a connect to
    /// it waits: its listener, its address, and the connection that fills
    /// the queue (all to be held).
    async fn full_application() -> (TcpListener, SocketAddr, TcpStream) {
        let app = tokio::net::TcpSocket::new_v4().unwrap();
        app.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let app = app.listen(0).unwrap();
        let addr = app.local_addr().unwrap();
        let queued = TcpStream::connect(addr).await.unwrap();
        (app, addr, queued)
    }

    /// An authorizer in dry-run mode with no policies: every stream is
    /// let through (and logged as one that would be denied).
    fn dry_run() -> Arc<Authorizer> {
        Arc::new(Authorizer::new(
            ward_authz::policy::parse_schema("built in", ward_authz::DEFAULT_SCHEMA).unwrap(),
            ward_authz::IdTemplate::default(),
            ward_authz::Mode::DryRun,
            None,
        ))
    }

    /// The application behind `inbound` named `app.test:PORT`, a name
    /// `lookup` answers; every stream admitted (dry run).
    fn forward_to_name(inbound: &mut Arc<Inbound>, port: u16, lookup: crate::resolve::Lookup) {
        let serving = Arc::get_mut(inbound).unwrap();
        serving.forward = format!("app.test:{port}");
        serving.resolver = crate::resolve::Resolver::new(lookup, crate::resolve::DNS_REFRESH);
        serving.authz = dry_run();
    }

    /// The application's next connection, within 5 s.
    async fn app_gets_stream(app: &TcpListener) -> TcpStream {
        let accepted = tokio::time::timeout(Duration::from_secs(5), app.accept()).await;
        accepted
            .expect("the application did not get the stream")
            .unwrap()
            .0
    }

    /// Asks `client` for a stream every `every`, `times` times or until
    /// the connection takes no more; the statuses answered.
    fn ask_every(
        mut client: h2::client::SendRequest<Bytes>,
        every: Duration,
        times: usize,
    ) -> tokio::task::JoinHandle<Vec<StatusCode>> {
        tokio::spawn(async move {
            let mut answered = Vec::new();
            for _ in 0..times {
                tokio::time::sleep(every).await;
                let Ok(ready) = client.ready().await else {
                    break;
                };
                client = ready;
                let req = Request::builder()
                    .method(Method::CONNECT)
                    .uri("127.0.0.1:9")
                    .body(())
                    .unwrap();
                let Ok((response, _)) = client.send_request(req, true) else {
                    break;
                };
                match response.await {
                    Ok(r) => answered.push(r.status()),
                    Err(_) => break,
                }
            }
            answered
        })
    }

    /// An application named by host name is looked up once for many
    /// streams (not once each, on a blocking thread), and reached at the
    /// address found.
    #[tokio::test]
    async fn an_application_named_by_host_name_is_looked_up_once_for_many_streams() {
        let (mut inbound, root, roots, _identity_tx) = fresh_inbound(Duration::from_secs(60));
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = app.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let lookup = lookup_of(Arc::new(Mutex::new(vec![addr])), calls.clone());
        forward_to_name(&mut inbound, addr.port(), lookup);
        let (client, conn) = connected_peer(inbound, &root, &roots).await;
        tokio::spawn(conn);
        let answered = ask_every(client, Duration::from_millis(10), 3)
            .await
            .unwrap();
        assert_eq!(answered, [StatusCode::OK; 3]);
        for _ in 0..3 {
            app_gets_stream(&app).await;
        }
        assert_eq!(calls.load(Ordering::Acquire), 1);
    }

    /// An application that moved (its name now stands for another address,
    /// and nothing listens at the old one) is reached at its new address by
    /// the next stream, without waiting for the name's next refresh.
    #[tokio::test]
    async fn an_application_that_moved_is_looked_up_again_when_it_cannot_be_reached() {
        let (mut inbound, root, roots, _identity_tx) = fresh_inbound(Duration::from_secs(60));
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = app.local_addr().unwrap();
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let old = gone.local_addr().unwrap();
        drop(gone);
        let (answer, calls) = (
            Arc::new(Mutex::new(vec![old])),
            Arc::new(AtomicUsize::new(0)),
        );
        forward_to_name(
            &mut inbound,
            addr.port(),
            lookup_of(answer.clone(), calls.clone()),
        );
        let (client, conn) = connected_peer(inbound, &root, &roots).await;
        tokio::spawn(conn);
        let statuses = ask_every(client.clone(), Duration::ZERO, 1).await.unwrap();
        assert_eq!(statuses, [StatusCode::BAD_GATEWAY]);
        // The application is back, at another address; a second on.
        *answer.lock().unwrap() = vec![addr];
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let statuses = ask_every(client, Duration::ZERO, 1).await.unwrap();
        assert_eq!(statuses, [StatusCode::OK], "the old address was used");
        app_gets_stream(&app).await;
        assert_eq!(calls.load(Ordering::Acquire), 2);
    }

    /// The PROXY protocol header names the port policies decided on: a
    /// `CONNECT` naming a port the workload does not list goes to
    /// `forward`, and the application is told the service port, not the
    /// port asked for (a peer cannot steer an application that routes on
    /// it around policy).
    #[tokio::test]
    async fn the_proxy_protocol_header_names_the_port_policies_saw() {
        use tokio::io::AsyncReadExt;
        let (mut inbound, root, roots, _identity_tx) = fresh_inbound(Duration::from_secs(60));
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let serving = Arc::get_mut(&mut inbound).unwrap();
        serving.forward = app.local_addr().unwrap().to_string();
        serving.service_port = 8080;
        serving.proxy_protocol = true;
        serving.authz = dry_run();
        let (client, conn) = connected_peer(inbound, &root, &roots).await;
        tokio::spawn(conn);
        // (`ask_every` names port 9.)
        let asking = ask_every(client, Duration::ZERO, 1);
        let mut tcp = app_gets_stream(&app).await;
        let mut bytes = vec![0u8; 16];
        tcp.read_exact(&mut bytes).await.unwrap();
        let rest = u16::from_be_bytes([bytes[14], bytes[15]]) as usize;
        bytes.resize(16 + rest, 0);
        tcp.read_exact(&mut bytes[16..]).await.unwrap();
        let header = ppp::v2::Header::try_from(&bytes[..]).expect("a PROXY v2 header");
        match header.addresses {
            ppp::v2::Addresses::IPv4(a) => assert_eq!(a.destination_port, 8080),
            other => panic!("{other:?}"),
        }
        assert_eq!(asking.await.unwrap(), [StatusCode::OK]);
    }

    /// Policies for tests: `text` as one file.
    fn policies(text: &str) -> Vec<ward_authz::policy::SourceFile> {
        vec![ward_authz::policy::SourceFile {
            name: "test.cedar".into(),
            text: text.into(),
        }]
    }

    /// A policy set that denies the stream, loaded while the application is
    /// being reached (here its name is being looked up), gets the stream
    /// answered 403: no byte passes under the set it was first admitted by.
    #[tokio::test]
    async fn a_deny_loaded_while_a_stream_is_admitted_refuses_it() {
        let (mut inbound, root, roots, _identity_tx) = fresh_inbound(Duration::from_secs(60));
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = app.local_addr().unwrap();
        let lookup = crate::resolve::testing::slow_lookup_of(
            Arc::new(Mutex::new(vec![addr])),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(400)),
        );
        let serving = Arc::get_mut(&mut inbound).unwrap();
        serving.forward = format!("app.test:{}", addr.port());
        serving.resolver = crate::resolve::Resolver::new(lookup, crate::resolve::DNS_REFRESH);
        let authz = serving.authz.clone();
        authz
            .load(&policies("permit (principal, action, resource);"))
            .unwrap();
        let (client, conn) = connected_peer(inbound, &root, &roots).await;
        tokio::spawn(conn);
        let asking = ask_every(client.clone(), Duration::ZERO, 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        authz
            .load(&policies("forbid (principal, action, resource);"))
            .unwrap();
        assert_eq!(asking.await.unwrap(), [StatusCode::FORBIDDEN]);
        // (And the set now in force denies the next stream at once.)
        let statuses = ask_every(client, Duration::ZERO, 1).await.unwrap();
        assert_eq!(statuses, [StatusCode::FORBIDDEN]);
    }

    /// A lookup of the application's name that takes longer than half the
    /// connect timeout, or a connect that takes longer than the rest of it,
    /// is answered 504, within that timeout.
    #[tokio::test]
    async fn an_application_lookup_or_connect_that_times_out_is_answered_504() {
        let (mut inbound, root, roots, _identity_tx) = fresh_inbound(Duration::from_secs(60));
        let (_app, addr, _queued) = full_application().await;
        // The lookup answers after 600 ms, twice the connect timeout, and
        // says when it has.
        let (calls, answered) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let lookup: crate::resolve::Lookup = {
            let (calls, answered) = (calls.clone(), answered.clone());
            Arc::new(move |_host| {
                calls.fetch_add(1, Ordering::AcqRel);
                let answered = answered.clone();
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    answered.store(true, Ordering::Release);
                    Ok(vec![addr])
                })
            })
        };
        forward_to_name(&mut inbound, addr.port(), lookup);
        Arc::get_mut(&mut inbound).unwrap().connect_timeout = Duration::from_millis(300);
        let (client, conn) = connected_peer(inbound, &root, &roots).await;
        tokio::spawn(conn);
        let started = std::time::Instant::now();
        let statuses = ask_every(client.clone(), Duration::ZERO, 1).await.unwrap();
        assert_eq!(statuses, [StatusCode::GATEWAY_TIMEOUT], "a slow lookup");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // Once the lookup has answered, late (and its task ended), its
        // answer serves (no second lookup), and the connect times out.
        while !answered.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let statuses = ask_every(client, Duration::ZERO, 1).await.unwrap();
        assert_eq!(statuses, [StatusCode::GATEWAY_TIMEOUT], "a slow connect");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(calls.load(Ordering::Acquire), 1);
    }

    /// Streams that are not admitted (here denied: no policy permits
    /// anything) do not restart the idle timeout: a peer asking for one
    /// more often than that cannot hold its connection, and a connection
    /// slot, open.
    #[tokio::test]
    async fn denied_streams_do_not_keep_a_connection_open() {
        let (inbound, root, roots, _identity_tx) = fresh_inbound(Duration::from_millis(1500));
        let metrics = inbound.metrics.clone();
        let (client, conn) = connected_peer(inbound, &root, &roots).await;
        let opened = std::time::Instant::now();
        // A denied stream every 300 ms, for up to 12 s.
        let asking = ask_every(client, Duration::from_millis(300), 40);
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("denied streams kept an idle connection open")
            .ok();
        let took = opened.elapsed();
        let answered = asking.await.unwrap();
        assert!(answered.len() >= 3, "only {answered:?} were answered");
        assert!(
            answered.iter().all(|s| *s == StatusCode::FORBIDDEN),
            "{answered:?}"
        );
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
            "closed after {took:?}, the idle timeout is 1.5 s"
        );
        let text = metrics.render(0);
        let denied = answered.len();
        assert!(
            text.contains(&format!(
                r#"ward_proxy_authorization_decisions_total{{decision="deny"}} {denied}"#
            )),
            "{text}"
        );
    }

    /// A peer that never confirms the GOAWAY of a connection closed for
    /// being idle (it leaves the PING that goes with it unanswered, so h2
    /// still takes its new streams) and asks for a denied stream every
    /// 2 s: the close grace, 10 s without traffic worth the name, is not
    /// started again by each refusal, so the connection is closed.
    #[tokio::test]
    async fn a_peer_that_ignores_the_goaway_cannot_hold_a_closing_connection_with_denied_streams() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (inbound, root, roots, _identity_tx) = fresh_inbound(Duration::from_millis(500));
        let metrics = inbound.metrics.clone();
        let tls = peer_tls(inbound, &root, &roots).await;
        let (mut rd, mut wr) = tokio::io::split(tls);
        // The preface and empty SETTINGS; nothing the proxy sends is
        // answered, its PINGs included.
        wr.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let asking = tokio::spawn(async move {
            for id in (1u32..).step_by(2) {
                // HEADERS (END_STREAM, END_HEADERS): `:method CONNECT`,
                // `:authority 127.0.0.1:9`, literal values, names indexed.
                let block = b"\x02\x07CONNECT\x01\x0b127.0.0.1:9";
                let mut frame = vec![0, 0, block.len() as u8, 0x1, 0x5];
                frame.extend_from_slice(&id.to_be_bytes());
                frame.extend_from_slice(block);
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        let opened = std::time::Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            let mut buf = [0u8; 4096];
            while let Ok(1..) = rd.read(&mut buf).await {}
        })
        .await;
        asking.abort();
        assert!(
            closed.is_ok(),
            "still open after {:?}: refused streams held it",
            opened.elapsed()
        );
        // Streams were decided (and denied) while it was closing, from
        // 0.5 s on: at least the 2nd to the 5th.
        let text = metrics.render(0);
        let denied = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"ward_proxy_authorization_decisions_total{decision="deny"} "#)
            })
            .and_then(|n| n.parse::<u32>().ok());
        assert!(denied.is_some_and(|n| n >= 5), "{text}");
    }

    /// A stream still being admitted (its application slow to take the
    /// connection) when its connection is closed because the peer left a
    /// keepalive PING unanswered ends `unreachable`, as the open streams
    /// on it do, not `cancelled` (which says the peer reset it).
    #[tokio::test]
    async fn a_stream_being_admitted_when_the_peer_stops_answering_pings_is_unreachable() {
        let (mut inbound, root, roots, _identity_tx) = fresh_inbound(Duration::from_secs(60));
        let (_app, addr, _queued) = full_application().await;
        let serving = Arc::get_mut(&mut inbound).unwrap();
        serving.forward = addr.to_string();
        serving.connect_timeout = Duration::from_secs(30);
        serving.keepalive = hbone::Keepalive {
            interval: Duration::from_millis(300),
            timeout: Duration::from_millis(300),
        };
        serving.authz = dry_run();
        let metrics = inbound.metrics.clone();
        let (client, mut conn) = connected_peer(inbound, &root, &roots).await;
        let mut client = client.ready().await.unwrap();
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("127.0.0.1:9")
            .body(())
            .unwrap();
        let (_response, _send) = client.send_request(req, false).unwrap();
        // The request goes out; then the peer answers nothing, PINGs
        // included (its connection is no longer polled).
        let _ = tokio::time::timeout(Duration::from_millis(200), &mut conn).await;
        let ended =
            r#"ward_proxy_streams_ended_total{direction="inbound",outcome="unreachable"} 1"#;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = metrics.render(0);
            if text.contains(ended) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(conn);
    }

    /// A `CONNECT` whose headers are larger than [`hbone::MAX_HEADER_LIST`]
    /// is refused before it is decided (h2's default limit, 16 MiB, let a
    /// peer hold that much in one header block); one of ordinary size on
    /// the same connection still is.
    #[tokio::test]
    async fn oversized_headers_are_refused() {
        let (inbound, root, roots, _identity_tx) = fresh_inbound(Duration::from_secs(60));
        let metrics = inbound.metrics.clone();
        let (client, conn) = connected_peer(inbound, &root, &roots).await;
        tokio::spawn(conn);
        let connect = |extra: usize| {
            Request::builder()
                .method(Method::CONNECT)
                .uri("127.0.0.1:9")
                .header("x-padding", "a".repeat(extra))
                .body(())
                .unwrap()
        };
        let mut client = client.ready().await.unwrap();
        let (response, _) = client.send_request(connect(32 * 1024), true).unwrap();
        assert_eq!(
            response.await.unwrap().status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let mut client = client.ready().await.unwrap();
        let (response, _) = client.send_request(connect(100), true).unwrap();
        assert_eq!(response.await.unwrap().status(), StatusCode::FORBIDDEN);
        let text = metrics.render(0);
        assert!(
            text.contains(r#"ward_proxy_authorization_decisions_total{decision="deny"} 1"#),
            "{text}"
        );
    }

    /// Admitted streams do restart it: streams every 300 ms keep a
    /// connection with a 1 s idle timeout open; it closes once they stop.
    #[tokio::test]
    async fn admitted_streams_keep_a_connection_open() {
        let (mut inbound, root, roots, _identity_tx) = fresh_inbound(Duration::from_millis(1000));
        // Dry run admits every stream; the application takes each
        // connection and closes it.
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let serving = Arc::get_mut(&mut inbound).unwrap();
        serving.forward = app.local_addr().unwrap().to_string();
        serving.authz = dry_run();
        tokio::spawn(async move {
            while let Ok((app_conn, _)) = app.accept().await {
                drop(app_conn);
            }
        });
        let (client, conn) = connected_peer(inbound, &root, &roots).await;
        let conn = tokio::spawn(conn);
        // (The connection ends when the peer drops its last handle.)
        let _held = client.clone();
        let answered = ask_every(client, Duration::from_millis(300), 10)
            .await
            .unwrap();
        assert_eq!(answered, vec![StatusCode::OK; 10]);
        assert!(
            !conn.is_finished(),
            "the connection closed while streams were being admitted"
        );
        let stopped = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("an idle connection stayed open")
            .unwrap()
            .ok();
        assert!(stopped.elapsed() < Duration::from_secs(4));
    }

    /// An idle connection is closed after the idle timeout even while
    /// identity updates (SVID rotations) keep arriving more often than that:
    /// they do not restart its timer.
    #[tokio::test]
    async fn an_idle_connection_closes_on_time_through_frequent_svid_rotations() {
        let (inbound, root, roots, identity_tx) = fresh_inbound(Duration::from_millis(1500));
        let (_client, conn) = connected_peer(inbound, &root, &roots).await;
        let opened = std::time::Instant::now();
        let rotations = tokio::spawn(async move {
            for generation in 2.. {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if identity_tx
                    .send(Some(current(0, generation, &roots)))
                    .is_err()
                {
                    return;
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("an idle connection stayed open through SVID rotations")
            .ok();
        rotations.abort();
        let took = opened.elapsed();
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
            "closed after {took:?}, the idle timeout is 1.5 s"
        );
    }

    /// A stream asks whether its peer is still trusted before it is
    /// admitted: roots whose change the connection has not yet checked are
    /// checked then, and a peer they no longer trust is refused; whether the
    /// connection closes is its own check's to say (roots may change back).
    #[test]
    fn a_stream_is_not_admitted_from_a_peer_the_roots_no_longer_trust() {
        let (old_bundle, old_root) = root("example.org");
        let (new_bundle, _) = root("example.org");
        let roots = RootStore::new(&old_bundle).unwrap();
        let (leaf, _) = ward_spec::test_util::leaf_and_key(WEB, &old_root);
        let verified = VerifiedPeer {
            id: SpiffeId::parse(WEB).unwrap(),
            untrusted: AtomicBool::new(false),
            unresponsive: AtomicBool::new(false),
            served: AtomicBool::new(false),
            local: "127.0.0.1:15008".parse().unwrap(),
            chain: PeerChain::new(Some(&[leaf])),
            checked: AtomicU64::new(roots.generation()),
        };
        assert!(verified.trusted_by(&roots));
        // A root joins: checked again, still trusted.
        let mut both = new_bundle.clone();
        both.x509_authorities
            .extend(old_bundle.x509_authorities.iter().cloned());
        roots.update(&both).unwrap();
        assert!(verified.trusted_by(&roots));
        assert!(!verified.untrusted.load(Ordering::Acquire));
        // The peer's root leaves.
        roots.update(&new_bundle).unwrap();
        assert!(!verified.trusted_by(&roots));
        assert!(!verified.trusted_by(&roots));
        assert!(!verified.untrusted.load(Ordering::Acquire));
        // It comes back: trusted again.
        roots.update(&old_bundle).unwrap();
        assert!(verified.trusted_by(&roots));
        // Once its connection has found it untrusted, it stays so.
        verified.untrusted.store(true, Ordering::Release);
        assert!(!verified.trusted_by(&roots));
    }
}
