//! Outbound connection pool.
//!
//! Connections are keyed by (our SPIFFE ID, the destination, the address it
//! resolved to, the IDs the peer may present) and carry up to `max_streams`
//! tunneled streams each, or
//! as many as the peer allows if that is fewer (its HTTP/2
//! `SETTINGS_MAX_CONCURRENT_STREAMS`: h2 would hold further streams back
//! until one ends, unanswered); a new connection is made only when every
//! usable one is full, and one caller at a time makes it, so a burst of
//! streams shares one connection. A connection made with an older SVID of
//! ours takes no new streams; it closes when its last stream ends. Idle
//! connections close after the idle timeout. When the roots change (a
//! bundle rotated, a federation ended), each connection's peer chain is
//! verified again, as of its handshake, and a connection whose peer is no
//! longer trusted is closed with its streams (as inbound does).
//!
//! A destination named by host name is looked up again every
//! [`DNS_REFRESH`], in the background (the last addresses stay in use
//! meanwhile, and while a lookup fails),
//! and each new stream goes to the address with the fewest open streams
//! (ties taken in turn), as Envoy's least-request balancing does: a
//! replicated service behind one name shares the load. An address whose
//! connection attempt failed is tried last for a while (doubling with each
//! failure, up to [`FAILURE_BACKOFF_MAX`]), and a stream that cannot reach
//! one address goes on to the next while a connect and a handshake could
//! still be made within their timeouts. When none can be reached, the name
//! is looked up again at once, and its new addresses, if it moved, tried.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use ward_spec::tls::{PeerPolicy, RootStore, SpiffeServerVerifier};
use ward_spec::SpiffeId;

use crate::hbone::{self, PeerChain};
use crate::identity::{Current, Identity};
use crate::metrics::{Direction, Metrics};
use crate::resolve::{system_lookup, Addresses, Lookup, Resolver, DNS_REFRESH};

/// Connections to one destination made with one of our SPIFFE IDs for one
/// set of expected IDs: the pool's map is keyed by these first, so that a
/// new stream looks at its own destination's connections, not every one's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Group {
    me: SpiffeId,
    destination: String,
    ids: Vec<SpiffeId>,
}

/// A group's connections to one address its destination stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    group: Group,
    address: SocketAddr,
}

/// The pool's map: per group, per address.
type Slots = HashMap<Group, HashMap<SocketAddr, Slot>>;

/// `key`'s slot, if it has one.
fn slot<'a>(slots: &'a Slots, key: &Key) -> Option<&'a Slot> {
    slots.get(&key.group)?.get(&key.address)
}

/// `key`'s slot, made if it has none.
fn slot_made<'a>(slots: &'a mut Slots, key: &Key) -> &'a mut Slot {
    if !slots.contains_key(&key.group) {
        slots.insert(key.group.clone(), HashMap::new());
    }
    slots
        .get_mut(&key.group)
        .expect("just made")
        .entry(key.address)
        .or_default()
}

/// Every slot.
fn all_slots(slots: &Slots) -> impl Iterator<Item = (&Group, &SocketAddr, &Slot)> {
    slots
        .iter()
        .flat_map(|(g, by_address)| by_address.iter().map(move |(a, s)| (g, a, s)))
}

struct Conn {
    send: SendRequest<Bytes>,
    generation: u64,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    /// Set before the connection is closed because the peer is no longer
    /// trusted (the roots changed): its streams then end as `untrusted`.
    untrusted: Arc<AtomicBool>,
    /// Set before the connection is closed because the peer left a
    /// keepalive PING unanswered: its streams then end as `unreachable`.
    unresponsive: Arc<AtomicBool>,
    /// Milliseconds since the pool's start when the last stream ended.
    idle_since: AtomicI64,
    /// Pings the peer (see [`Retire`], [`hbone::Keepalive`]); one at a time.
    ping: hbone::Pinger,
    /// The bytes its socket has moved: a late PING answer on a connection
    /// still moving data is waited for.
    traffic: hbone::Traffic,
    /// Told when the connection takes a stream while it has none (its
    /// keepalive waits for that while it is idle).
    busy: Arc<tokio::sync::Notify>,
    /// Dropped with the connection's last handle: its task then gives the
    /// peer [`hbone::CloseGrace`] to finish closing.
    _released: tokio::sync::oneshot::Sender<()>,
    /// Unix seconds: once the peer's certificate has expired the connection
    /// takes no new streams (its open ones go on), as the peer would refuse
    /// them.
    peer_expires_at: i64,
    /// The SPIFFE ID the peer's verified certificate names.
    peer_id: Option<SpiffeId>,
    /// The address it was made to.
    address: SocketAddr,
}

impl Key {
    /// The destination, and the address it resolved to if that differs.
    fn name(&self) -> String {
        let destination = &self.group.destination;
        if destination.parse() == Ok(self.address) {
            destination.clone()
        } else {
            format!("{destination} ({})", self.address)
        }
    }
}

impl Conn {
    /// How many streams it may carry: `max_streams`, or fewer if the peer
    /// takes fewer.
    fn room(&self, max_streams: usize) -> usize {
        max_streams.min(self.send.current_max_send_streams())
    }

    /// Whether it carries fewer streams than it may.
    fn has_room(&self, max_streams: usize) -> bool {
        self.active.load(Ordering::Acquire) < self.room(max_streams)
    }

    /// Whether it may take new streams (room aside).
    fn usable(&self, generation: u64) -> bool {
        if self.closed.load(Ordering::Acquire) || self.generation != generation {
            return false;
        }
        if crate::identity::unix_now() > self.peer_expires_at {
            self.closed.store(true, Ordering::Release);
            return false;
        }
        true
    }
}

#[derive(Default)]
struct Slot {
    conns: Vec<Arc<Conn>>,
    /// Held while a connection for this key is being made.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// The TLS client config for this key, made once (it shares the SVID
    /// resolver and root store, so rotations reach it).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// When and why the last connection attempt failed: callers queued
    /// behind it fail at once for a moment instead of each dialling again.
    failed: Option<Failure>,
}

struct Failure {
    at: Instant,
    why: String,
    /// What failed: the next callers are answered with the same.
    failed: Failed,
    /// For want of an answer in time (see [`OpenError::timed_out`]).
    timed_out: bool,
    /// Attempts in a row that failed.
    count: u32,
}

/// What a failed attempt to connect was.
#[derive(Clone, Copy, Debug)]
enum Failed {
    Connect,
    /// The TLS or HTTP/2 handshake, and why (a metric's reason).
    Handshake(&'static str),
}

impl Failure {
    /// How long the address is tried after the others.
    fn backoff(&self) -> Duration {
        (FAILURE_HOLD * 2u32.saturating_pow(self.count.saturating_sub(1))).min(FAILURE_BACKOFF_MAX)
    }
}

pub struct Pool {
    identity: Identity,
    metrics: Arc<Metrics>,
    max_streams: usize,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    keepalive: hbone::Keepalive,
    slots: Mutex<Slots>,
    start: Instant,
    /// Tunnels being opened at once. A burst of application connections
    /// (thousands in the accept queue) then waits here in small futures
    /// instead of all building their requests at the same moment, which
    /// would leave the heap at the burst's peak long after.
    opening: tokio::sync::Semaphore,
    /// Per destination, tunnels being opened at once: a destination that
    /// never answers holds at most this share of `opening`.
    gates: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// Host-name destinations' addresses.
    resolver: Resolver,
    /// Turns the choice between equally loaded addresses.
    rotation: AtomicUsize,
    /// Set by [`Pool::close`]: no connection is made from then on.
    closing: AtomicBool,
}

/// Tunnels being opened at once, at most.
const MAX_OPENING: usize = 256;

/// Tunnels being opened at once to one destination, at most: sixteen
/// destinations that never answer are needed to hold every turn.
const MAX_OPENING_PER_DESTINATION: usize = MAX_OPENING / 16;

/// How long a failed connection attempt answers for the next ones.
const FAILURE_HOLD: Duration = Duration::from_secs(1);

/// The longest an address that keeps failing is tried after the others.
pub const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no SVID yet (or it expired): cannot authenticate")]
    NoIdentity,
    #[error("cannot connect to {0}: {1}")]
    Connect(String, io::Error),
    #[error("TLS handshake with {destination} failed ({reason}): {error}")]
    Handshake {
        destination: String,
        reason: &'static str,
        error: io::Error,
    },
    #[error("HTTP/2 with {0} failed: {1}")]
    Http2(String, h2::Error),
    /// The peer's answer, and why, if it said (one of its outcomes).
    #[error("the peer refused the stream: {0}{why}", why = said(.1))]
    Refused(StatusCode, &'static str),
    #[error("{0} is no longer trusted: its connection was closed")]
    Untrusted(String),
}

impl OpenError {
    /// Whether the tunnel failed for want of an answer in time.
    pub fn timed_out(&self) -> bool {
        match self {
            OpenError::Connect(_, io) => io.kind() == io::ErrorKind::TimedOut,
            OpenError::Handshake { reason, .. } => *reason == "timeout",
            _ => false,
        }
    }
}

/// ` (why)`, if the peer said why.
fn said(why: &str) -> String {
    match why {
        "" => String::new(),
        why => format!(" ({why})"),
    }
}

/// An open tunnel and the pool slot it holds.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub lease: Lease,
}

/// A tunnel whose `CONNECT` is sent but not yet answered.
pub struct PendingTunnel {
    pub send: SendStream<Bytes>,
    pub response: h2::client::ResponseFuture,
    pub lease: Lease,
}

/// The stream of an answered `CONNECT`, if the peer accepted it.
pub fn accepted(response: http::Response<RecvStream>) -> Result<RecvStream, OpenError> {
    if response.status() == StatusCode::OK {
        Ok(response.into_body())
    } else {
        Err(refusal(response.status(), response.headers()))
    }
}

/// A peer's answer other than 200, with why if it said (in
/// [`hbone::ERROR_HEADER`]): only the outcomes a Ward proxy says, so that
/// nothing a peer makes up reaches a log or a client.
fn refusal(status: StatusCode, headers: &http::HeaderMap) -> OpenError {
    let said = headers
        .get(hbone::ERROR_HEADER)
        .and_then(|v| v.to_str().ok());
    let why = [
        "denied",
        "untrusted",
        "expired",
        "unreachable",
        "error",
        "revoked",
        crate::inbound::OVERLOADED,
    ]
    .into_iter()
    .find(|o| Some(*o) == said)
    .unwrap_or("");
    OpenError::Refused(status, why)
}

/// Counts a stream against its connection until dropped.
pub struct Lease {
    conn: Arc<Conn>,
    start: Instant,
}

impl Lease {
    /// Whether the stream's connection was closed because the peer is no
    /// longer trusted.
    pub fn untrusted(&self) -> bool {
        self.conn.untrusted.load(Ordering::Acquire)
    }

    /// Whether the stream's connection was closed because the peer stopped
    /// answering PINGs.
    pub fn unresponsive(&self) -> bool {
        self.conn.unresponsive.load(Ordering::Acquire)
    }

    /// The SPIFFE ID the peer proxy presented (one the route expects).
    pub fn peer_id(&self) -> Option<&SpiffeId> {
        self.conn.peer_id.as_ref()
    }

    /// The address the stream's connection was made to.
    pub fn address(&self) -> SocketAddr {
        self.conn.address
    }

    /// The bytes the stream's connection has moved.
    pub fn traffic(&self) -> &hbone::Traffic {
        &self.conn.traffic
    }

    /// What takes the stream's connection out of use when the peer leaves
    /// its `CONNECT` unanswered and does not answer a PING either.
    pub fn retire_handle(&self) -> Retire {
        Retire(self.conn.clone())
    }
}

/// For a connection whose peer left a `CONNECT` unanswered past the answer
/// timeout: a peer that went away without a word (power lost, a partition)
/// keeps its TCP connection open for as long as the kernel retransmits (or
/// for good, if something between still acknowledges), and a frozen one
/// never answers. A PING tells those from a peer that is only slow to
/// connect to its application: one that does not answer it within
/// [`PING_TIMEOUT`] (longer while data still moves, see
/// [`hbone::ping_answered`]) gets no new streams on that connection (its open ones
/// go on); new streams get a new connection, or fail fast if the peer
/// cannot be reached.
pub struct Retire(Arc<Conn>);

/// How long a peer has to answer a PING before its connection is retired.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

impl Retire {
    /// Checks the peer in the background.
    pub fn unless_alive(self, destination: &str) {
        let destination = destination.to_owned();
        tokio::spawn(async move {
            let conn = self.0;
            // One PING at a time. One out (a keepalive's, another check's)
            // for longer than the timeout is as good as unanswered; else
            // this check sends its own, which gets its full time.
            let read_before = conn.traffic.read();
            let alive = match tokio::time::timeout(PING_TIMEOUT, conn.ping.lock()).await {
                // A keepalive's PING is out and late; the peer is alive if
                // it still sends (a slow link).
                Err(_) => hbone::heard_since(&conn.traffic, read_before),
                Ok(mut ping) => {
                    if conn.closed.load(Ordering::Acquire) {
                        return;
                    }
                    match ping.as_mut() {
                        Some(p) => hbone::ping_answered(p, PING_TIMEOUT, &conn.traffic)
                            .await
                            .unwrap_or(false),
                        None => false,
                    }
                }
            };
            if !alive && !conn.closed.swap(true, Ordering::AcqRel) {
                tracing::warn!(%destination, "a CONNECT and a PING were not answered in time; the connection takes no new streams");
            }
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn
            .idle_since
            .store(self.start.elapsed().as_millis() as i64, Ordering::Relaxed);
        self.conn.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A destination's pooled connections (those still taking streams) and the
/// streams they carry, for `/config_dump`.
pub struct Pooled {
    pub destination: String,
    pub ids: Vec<SpiffeId>,
    pub connections: usize,
    pub streams: usize,
    /// The same per address the destination resolved to.
    pub endpoints: Vec<Endpoint>,
}

pub struct Endpoint {
    pub address: SocketAddr,
    pub connections: usize,
    pub streams: usize,
}

impl Pool {
    /// The pooled connections that take new streams, per destination and
    /// expected IDs.
    pub fn summary(&self) -> Vec<Pooled> {
        let generation = self
            .identity
            .current
            .borrow()
            .as_ref()
            .map(|c| c.generation);
        let slots = self.slots.lock().expect("pool lock");
        let mut out: Vec<Pooled> = Vec::new();
        // Where each destination and IDs stands in `out` (a search of `out`
        // per slot, under the pool's lock, would grow with the square of
        // the destinations).
        let mut at: HashMap<(&str, &[SpiffeId]), usize> = HashMap::new();
        for (group, address, slot) in all_slots(&slots) {
            let open = slot
                .conns
                .iter()
                .filter(|c| generation.is_some_and(|g| c.usable(g)));
            let (connections, streams) = open.fold((0, 0), |(n, s), c| {
                (n + 1, s + c.active.load(Ordering::Acquire))
            });
            if connections == 0 {
                continue;
            }
            // One entry per destination and IDs, whichever of our SVIDs
            // made the connections.
            let i = *at
                .entry((group.destination.as_str(), group.ids.as_slice()))
                .or_insert_with(|| {
                    out.push(Pooled {
                        destination: group.destination.clone(),
                        ids: group.ids.clone(),
                        connections: 0,
                        streams: 0,
                        endpoints: Vec::new(),
                    });
                    out.len() - 1
                });
            let p = &mut out[i];
            p.connections += connections;
            p.streams += streams;
            match p.endpoints.iter_mut().find(|e| e.address == *address) {
                Some(e) => {
                    e.connections += connections;
                    e.streams += streams;
                }
                None => p.endpoints.push(Endpoint {
                    address: *address,
                    connections,
                    streams,
                }),
            }
        }
        for p in &mut out {
            p.endpoints.sort_by_key(|e| e.address);
        }
        out
    }

    pub fn new(
        identity: Identity,
        metrics: Arc<Metrics>,
        max_streams: usize,
        connect_timeout: Duration,
        handshake_timeout: Duration,
        idle_timeout: Duration,
        keepalive: hbone::Keepalive,
    ) -> Arc<Pool> {
        Pool::with_lookup(
            identity,
            metrics,
            max_streams,
            (connect_timeout, handshake_timeout, idle_timeout),
            keepalive,
            system_lookup(),
            DNS_REFRESH,
        )
    }

    /// A pool whose host names are looked up by `lookup`, again every
    /// `dns_refresh`; `timeouts` are connect, handshake and idle.
    pub fn with_lookup(
        identity: Identity,
        metrics: Arc<Metrics>,
        max_streams: usize,
        timeouts: (Duration, Duration, Duration),
        keepalive: hbone::Keepalive,
        lookup: Lookup,
        dns_refresh: Duration,
    ) -> Arc<Pool> {
        let (connect_timeout, handshake_timeout, idle_timeout) = timeouts;
        let pool = Arc::new(Pool {
            identity,
            metrics,
            max_streams,
            connect_timeout,
            handshake_timeout,
            idle_timeout,
            keepalive,
            slots: Mutex::new(HashMap::new()),
            start: Instant::now(),
            opening: tokio::sync::Semaphore::new(MAX_OPENING),
            gates: Mutex::new(HashMap::new()),
            resolver: Resolver::new(lookup, dns_refresh),
            rotation: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&pool);
        let every = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(p) => p.reap(),
                    None => return,
                }
            }
        });
        pool
    }

    /// A turn to open a tunnel to `destination` (see `opening` and `gates`);
    /// held until the request is sent. None when a pooled connection there
    /// has room: that stream opens at once, whatever other destinations'
    /// callers are waiting for. A destination that never answers holds a
    /// sixteenth of the turns at most, so the others go on.
    pub async fn turn(
        &self,
        destination: &str,
        ids: &[SpiffeId],
    ) -> Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::SemaphorePermit<'_>,
    )> {
        if self.has_room(destination, ids) {
            return None;
        }
        // Looked up by reference: a key is allocated only for a new destination.
        let gate = {
            let mut gates = self.gates.lock().expect("gates lock");
            match gates.get(destination) {
                Some(g) => g.clone(),
                None => gates
                    .entry(destination.to_owned())
                    .or_insert_with(|| {
                        Arc::new(tokio::sync::Semaphore::new(MAX_OPENING_PER_DESTINATION))
                    })
                    .clone(),
            }
        };
        let mine = gate
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let any = self
            .opening
            .acquire()
            .await
            .expect("the semaphore is never closed");
        Some((mine, any))
    }

    /// How long a peer may take to answer a `CONNECT`: its own connect to
    /// its application (a connect timeout) and its decision, with room to
    /// spare. A peer that has not answered by then is given up on.
    pub fn answer_timeout(&self) -> Duration {
        self.connect_timeout * 2 + Duration::from_secs(1)
    }

    /// Whether a pooled connection to `destination` (for `ids`, with the
    /// current SVID) has room for another stream now, at an address the
    /// destination still stands for (one it moved from keeps its
    /// connections for their streams, but takes no more: a stream that
    /// counted on it would open a connection without a turn).
    fn has_room(&self, destination: &str, ids: &[SpiffeId]) -> bool {
        let Some(me) = self.identity.usable() else {
            return false;
        };
        // (Not known at this instant, a lookup of it settling: not
        // filtered, rather than every stream queued for a turn.)
        let current = self.resolver.last_known(destination);
        let group = Group {
            me: me.spiffe_id,
            destination: destination.to_owned(),
            ids: ids.to_vec(),
        };
        let slots = self.slots.lock().expect("pool lock");
        slots
            .get(&group)
            .into_iter()
            .flat_map(HashMap::iter)
            .filter(|(address, _)| {
                current
                    .as_ref()
                    .is_none_or(|c| c.as_slice().contains(address))
            })
            .flat_map(|(_, slot)| &slot.conns)
            .any(|c| c.usable(me.generation) && c.has_room(self.max_streams))
    }

    /// Opens a tunneled stream to `target` through the peer proxy at
    /// `destination`, which must present one of `ids`. Sends the `CONNECT`
    /// request and returns without waiting for the answer, so the caller may
    /// send its first bytes at once: the peer holds them (within the stream's
    /// flow-control window) until it has authorized the stream, and discards
    /// them if it refuses.
    pub async fn start_stream(
        &self,
        destination: &str,
        ids: &[SpiffeId],
        target: &str,
    ) -> Result<PendingTunnel, OpenError> {
        let addresses = self.addresses(destination).await?;
        // The identity as of now, after the lookup (the SVID may have
        // rotated meanwhile).
        let me = self.identity.usable().ok_or(OpenError::NoIdentity)?;
        let group = Group {
            me: me.spiffe_id.clone(),
            destination: destination.to_owned(),
            ids: ids.to_vec(),
        };
        let started = Instant::now();
        let conn = match self.conn_at(&group, &me, &addresses, started).await {
            Ok(c) => c,
            // No address could be reached, or none presented an ID it
            // should: the destination may have moved (a restarted peer's
            // new address, its old one perhaps someone else's now). Its
            // name is looked up again, and its new addresses tried, while a
            // connect and a handshake could still be made in time.
            Err(e @ (OpenError::Connect(..) | OpenError::Handshake { .. })) => {
                let budget = self.connect_timeout + self.handshake_timeout;
                let left = budget.saturating_sub(started.elapsed());
                if left.is_zero() || self.closing.load(Ordering::Acquire) {
                    return Err(e);
                }
                let tried = addresses.as_slice();
                let wait = left.min(self.connect_timeout);
                match self.resolver.moved(destination, tried, wait).await {
                    Some(moved) => {
                        tracing::debug!(destination, error = %e, "trying the destination's new addresses");
                        self.conn_at(&group, &me, &moved, started).await?
                    }
                    None => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let lease = Lease {
            conn: conn.clone(),
            start: self.start,
        };
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target)
            .body(())
            .map_err(|e| OpenError::Connect(target.to_owned(), io::Error::other(e.to_string())))?;
        // A connection that cannot take a stream (the peer sent GOAWAY, or
        // it broke) takes no more: it is left to finish its open streams,
        // and the caller's retry makes a new one.
        let unusable = |e: h2::Error| {
            conn.closed.store(true, Ordering::Release);
            OpenError::Http2(destination.to_owned(), e)
        };
        let mut send = conn.send.clone().ready().await.map_err(unusable)?;
        let (response, stream) = send.send_request(req, false).map_err(unusable)?;
        Ok(PendingTunnel {
            send: stream,
            response,
            lease,
        })
    }

    /// A connection for `group` with room for one more stream (counted),
    /// pooled or new, to one of `addresses`, tried in the order
    /// [`Pool::order`] gives (the stream began trying at `started`).
    async fn conn_at(
        &self,
        group: &Group,
        me: &Current,
        addresses: &Addresses,
        started: Instant,
    ) -> Result<Arc<Conn>, OpenError> {
        let order = self.order(group, me.generation, addresses);
        let mut failure = None;
        for (i, &address) in order.as_slice().iter().enumerate() {
            // Further addresses while a connect and a handshake could still
            // be made in time: one whose peer never answers takes one try.
            if i > 0 && started.elapsed() >= self.connect_timeout + self.handshake_timeout {
                break;
            }
            let key = Key {
                group: group.clone(),
                address,
            };
            match self.conn_for(key, me.generation, &me.roots).await {
                Ok(c) => return Ok(c),
                // The first address's failure says most: later ones are
                // those that failed a moment ago, or more loaded.
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        Err(failure.expect("a destination has at least one address"))
    }

    /// A pooled connection for `key` with room for one more stream
    /// (counted), or a new one.
    async fn conn_for(
        &self,
        key: Key,
        generation: u64,
        roots: &RootStore,
    ) -> Result<Arc<Conn>, OpenError> {
        if let Some(c) = self.lease(&key, generation) {
            return Ok(c);
        }
        let connecting = {
            let mut slots = self.slots.lock().expect("pool lock");
            slot_made(&mut slots, &key).connecting.clone()
        };
        let _one_at_a_time = connecting.lock().await;
        // The SVID may have rotated while this caller waited its turn: a
        // connection made with the older one takes no new stream.
        let generation = self
            .identity
            .usable()
            .filter(|me| me.spiffe_id == key.group.me)
            .map_or(generation, |me| me.generation);
        if let Some(c) = self.lease(&key, generation) {
            return Ok(c);
        }
        if let Some((why, failed, timed_out)) = self.recent_failure(&key) {
            let kind = match timed_out {
                true => io::ErrorKind::TimedOut,
                false => io::ErrorKind::Other,
            };
            let error = io::Error::new(kind, why);
            return Err(match failed {
                Failed::Connect => OpenError::Connect(key.name(), error),
                Failed::Handshake(reason) => OpenError::Handshake {
                    destination: key.name(),
                    reason,
                    error,
                },
            });
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(OpenError::Connect(
                key.name(),
                io::Error::other("the proxy is stopping"),
            ));
        }
        let made = self.connect(&key, generation, roots).await;
        let mut slots = self.slots.lock().expect("pool lock");
        let slot = slot_made(&mut slots, &key);
        match made {
            Ok(conn) => {
                slot.failed = None;
                conn.active.fetch_add(1, Ordering::AcqRel);
                conn.busy.notify_one();
                slot.conns.push(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                let count = slot.failed.as_ref().map_or(0, |f| f.count) + 1;
                let (failed, why) = match &e {
                    OpenError::Connect(_, error) => (Failed::Connect, error.to_string()),
                    OpenError::Handshake { reason, error, .. } => {
                        (Failed::Handshake(reason), error.to_string())
                    }
                    other => (Failed::Connect, other.to_string()),
                };
                slot.failed = Some(Failure {
                    at: Instant::now(),
                    why,
                    failed,
                    timed_out: e.timed_out(),
                    count,
                });
                Err(e)
            }
        }
    }

    /// Why the last attempt to connect for `key` failed, if that was moments
    /// ago: what failed, and whether it timed out.
    fn recent_failure(&self, key: &Key) -> Option<(String, Failed, bool)> {
        let slots = self.slots.lock().expect("pool lock");
        let failed = slot(&slots, key)?.failed.as_ref()?;
        (failed.at.elapsed() < FAILURE_HOLD).then(|| {
            let why = format!(
                "{} ({} ms ago)",
                failed.why,
                failed.at.elapsed().as_millis()
            );
            (why, failed.failed, failed.timed_out)
        })
    }

    /// The addresses `destination` stands for (see [`Resolver::addresses`]),
    /// a first lookup waited for up to the connect timeout.
    async fn addresses(&self, destination: &str) -> Result<Addresses, OpenError> {
        self.resolver
            .addresses(destination, self.connect_timeout)
            .await
            .map_err(|e| OpenError::Connect(destination.to_owned(), e))
    }

    /// `addresses` in the order a new stream tries them: those whose last
    /// connection attempt failed within its backoff last, and after those
    /// with room those being dialled (so that while one caller tries an
    /// address that may not answer, the others are not held up behind it);
    /// then the fewest open streams (for `me`'s current SVID and `ids`)
    /// first, ties taken in turn. (A stream may so make a connection to an
    /// address without its caller's turn: one per address at a time.)
    fn order(&self, group: &Group, generation: u64, addresses: &Addresses) -> Addresses {
        let Addresses::Many(all) = addresses else {
            return Addresses::One(addresses.as_slice()[0]);
        };
        if all.len() == 1 {
            return Addresses::One(all[0]);
        }
        // (failed a moment ago, being dialled without room, open streams)
        // per address.
        let mut load = vec![(false, false, 0usize); all.len()];
        {
            let slots = self.slots.lock().expect("pool lock");
            let by_address = slots.get(group);
            for (i, address) in all.iter().enumerate() {
                let Some(slot) = by_address.and_then(|b| b.get(address)) else {
                    continue;
                };
                load[i].0 = slot
                    .failed
                    .as_ref()
                    .is_some_and(|f| f.at.elapsed() < f.backoff());
                let usable = slot.conns.iter().filter(|c| c.usable(generation));
                let room = usable.clone().any(|c| c.has_room(self.max_streams));
                load[i].1 = Arc::strong_count(&slot.connecting) > 1 && !room;
                load[i].2 = usable
                    .map(|c| c.active.load(Ordering::Acquire))
                    .sum::<usize>();
            }
        }
        let n = all.len();
        let first = self.rotation.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (load[i].0, load[i].1, load[i].2, (i + n - first) % n));
        Addresses::Many(order.into_iter().map(|i| all[i]).collect())
    }

    /// A usable connection for `key` with room for one more stream, counted.
    fn lease(&self, key: &Key, generation: u64) -> Option<Arc<Conn>> {
        let slots = self.slots.lock().expect("pool lock");
        for c in &slot(&slots, key)?.conns {
            if !c.usable(generation) {
                continue;
            }
            let room = c.room(self.max_streams);
            if let Ok(was) = c
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < room).then_some(n + 1)
                })
            {
                if was == 0 {
                    c.busy.notify_one();
                }
                return Some(c.clone());
            }
        }
        None
    }

    async fn connect(
        &self,
        key: &Key,
        generation: u64,
        roots: &RootStore,
    ) -> Result<Arc<Conn>, OpenError> {
        let dest = key.name();
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(key.address))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(OpenError::Connect(dest, e)),
            Err(_) => {
                return Err(OpenError::Connect(
                    dest,
                    io::Error::new(io::ErrorKind::TimedOut, "timed out"),
                ))
            }
        };
        hbone::tunnel_socket(&tcp);
        // Roots that change from here on get the peer verified again, those
        // that change during the handshake included (as inbound does).
        let mut roots_changed = self.identity.current.clone();
        let mut checked = roots_changed
            .borrow_and_update()
            .as_ref()
            .map(|c| c.roots.generation());
        // The SVID the handshake presents is the one current now (the
        // caller's may have rotated while it waited): the connection is
        // labelled with its generation.
        let generation = roots_changed
            .borrow()
            .as_ref()
            .map_or(generation, |c| c.generation);
        let connector = TlsConnector::from(self.tls_config(key, roots));
        let name = ServerName::try_from("ward.invalid").expect("static name is valid");
        let transport = crate::bufio::ReadBuffered::tunnel(tcp);
        let traffic = transport.traffic();
        let handshake = async {
            let mut tls = connector.connect(name, transport).await?;
            hbone::require_h2(tls.get_ref().1)?;
            tls.get_mut().1.set_buffer_limit(Some(hbone::TLS_BUFFER));
            let certs = tls.get_ref().1.peer_certificates();
            let chain = (PeerChain::new(certs), ward_spec::tls::peer_id(certs));
            let (send, mut connection) =
                hbone::client_builder(u32::try_from(self.max_streams).unwrap_or(u32::MAX))
                    .handshake::<_, Bytes>(tls)
                    .await
                    .map_err(crate::pump::h2_io)?;
            // The peer's settings (how many streams it takes) follow its
            // handshake at once. They are awaited here, so that the callers
            // queued for this connection are given no more streams than the
            // peer takes; until they arrive, h2 counts none (see
            // `hbone::client_builder`).
            std::future::poll_fn(|cx| {
                if send.current_max_send_streams() > 0 {
                    return Poll::Ready(Ok(()));
                }
                match Pin::new(&mut connection).poll(cx) {
                    Poll::Ready(r) => Poll::Ready(Err(r.err().map_or_else(
                        || {
                            io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "closed before its settings",
                            )
                        },
                        crate::pump::h2_io,
                    ))),
                    Poll::Pending if send.current_max_send_streams() > 0 => Poll::Ready(Ok(())),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await?;
            Ok::<_, io::Error>((send, connection, chain))
        };
        let (send, mut connection, chain) =
            match tokio::time::timeout(self.handshake_timeout, handshake).await {
                Ok(Ok(x)) => x,
                Ok(Err(error)) => {
                    let reason = hbone::handshake_failure_reason(&error);
                    self.metrics.handshake_failure(Direction::Outbound, reason);
                    return Err(OpenError::Handshake {
                        destination: dest,
                        reason,
                        error,
                    });
                }
                Err(_) => {
                    self.metrics
                        .handshake_failure(Direction::Outbound, "timeout");
                    return Err(OpenError::Handshake {
                        destination: dest,
                        reason: "timeout",
                        error: io::Error::new(io::ErrorKind::TimedOut, "timed out"),
                    });
                }
            };
        let (chain, peer_id) = chain;
        let ping: hbone::Pinger = Arc::new(tokio::sync::Mutex::new(connection.ping_pong()));
        let (released, mut handles_gone) = tokio::sync::oneshot::channel();
        let conn = Arc::new(Conn {
            send,
            generation,
            active: AtomicUsize::new(0),
            closed: Arc::new(AtomicBool::new(false)),
            untrusted: Arc::new(AtomicBool::new(false)),
            unresponsive: Arc::new(AtomicBool::new(false)),
            idle_since: AtomicI64::new(self.start.elapsed().as_millis() as i64),
            ping,
            traffic: traffic.clone(),
            busy: Arc::new(tokio::sync::Notify::new()),
            _released: released,
            peer_expires_at: chain.expires_at(),
            peer_id,
            address: key.address,
        });
        let metrics = self.metrics.clone();
        metrics.connection_opened(Direction::Outbound);
        let (flag, distrusted, unresponsive) = (
            conn.closed.clone(),
            conn.untrusted.clone(),
            conn.unresponsive.clone(),
        );
        // The task holds no handle to the connection: once the pool and its
        // streams let go of it, h2 closes it (GOAWAY).
        let handle = Arc::downgrade(&conn);
        let busy = conn.busy.clone();
        let keepalive = self.keepalive;
        tokio::spawn(async move {
            let pinging = hbone::unanswered_ping(
                keepalive,
                traffic.clone(),
                move || {
                    let conn = handle.upgrade()?;
                    (conn.active.load(Ordering::Acquire) > 0).then(|| conn.ping.clone())
                },
                move || {
                    let busy = busy.clone();
                    async move { busy.notified().await }
                },
            );
            tokio::pin!(pinging);
            // Set once every handle is gone: a peer that does not let the
            // connection close (it reads nothing more) is cut off then.
            let grace = tokio::time::sleep(Duration::ZERO);
            tokio::pin!(grace);
            let mut closing = false;
            // Set when every handle is gone.
            let mut close_grace = None;
            // False once the identity watch has ended (it never does while
            // the proxy runs): an ended watch would resolve again and again.
            let mut following = true;
            loop {
                tokio::select! {
                    r = &mut connection => {
                        if let Err(e) = r {
                            tracing::debug!(destination = %dest, error = %e, "outbound connection ended");
                        }
                        break;
                    }
                    () = &mut pinging => {
                        tracing::warn!(destination = %dest, timeout = ?keepalive.timeout, "the peer did not answer a PING; closing its connection and the streams on it");
                        metrics.handshake_failure(Direction::Outbound, "ping_timeout");
                        unresponsive.store(true, Ordering::Release);
                        break;
                    }
                    _ = &mut handles_gone, if !closing => {
                        closing = true;
                        close_grace = Some(hbone::CloseGrace::start(&traffic, grace.as_mut()));
                    }
                    () = &mut grace, if closing => {
                        // Still taking the last bytes (a slow link): wait on.
                        if let Some(at) = close_grace.as_mut().and_then(hbone::CloseGrace::next_check) {
                            grace.as_mut().reset(at);
                            continue;
                        }
                        tracing::debug!(destination = %dest, "the peer did not finish closing; cut off");
                        break;
                    }
                    r = roots_changed.changed(), if following => {
                        following = r.is_ok();
                        let current = roots_changed.borrow_and_update().clone();
                        let Some(current) = current.filter(|_| following) else {
                            continue;
                        };
                        let generation = current.roots.generation();
                        if checked == Some(generation) {
                            continue;
                        }
                        checked = Some(generation);
                        if let Err(e) = chain.verify_server(&current.roots) {
                            // Dropping the connection ends its streams.
                            tracing::warn!(destination = %dest, error = %e, "closing a connection whose peer is no longer trusted");
                            metrics.handshake_failure(Direction::Outbound, "no_longer_trusted");
                            distrusted.store(true, Ordering::Release);
                            break;
                        }
                    }
                }
            }
            flag.store(true, Ordering::Release);
            drop(connection);
            metrics.connection_closed(Direction::Outbound);
        });
        Ok(conn)
    }

    fn tls_config(&self, key: &Key, roots: &RootStore) -> Arc<rustls::ClientConfig> {
        let mut slots = self.slots.lock().expect("pool lock");
        slot_made(&mut slots, key)
            .tls
            .get_or_insert_with(|| {
                let verifier = SpiffeServerVerifier::new(
                    roots.clone(),
                    PeerPolicy::OneOf(key.group.ids.clone()),
                );
                let mut cfg =
                    ward_spec::tls::client_config(Some(self.identity.resolver.clone()), verifier);
                cfg.enable_sni = false;
                Arc::new(cfg)
            })
            .clone()
    }

    /// Drops connections that are closed, idle for too long, or made with an
    /// older SVID and now without streams. Dropping the last handle to an
    /// HTTP/2 client connection closes it.
    fn reap(&self) {
        let generation = self
            .identity
            .current
            .borrow()
            .as_ref()
            .map_or(0, |c| c.generation);
        let now = self.start.elapsed().as_millis() as i64;
        let idle_ms = self.idle_timeout.as_millis() as i64;
        let mut slots = self.slots.lock().expect("pool lock");
        for slot in slots.values_mut().flat_map(HashMap::values_mut) {
            slot.conns.retain(|c| {
                if c.closed.load(Ordering::Acquire) {
                    return false;
                }
                if c.active.load(Ordering::Acquire) > 0 {
                    return true;
                }
                c.generation == generation && now - c.idle_since.load(Ordering::Relaxed) < idle_ms
            });
        }
        // A slot without connections stays while someone is connecting or
        // its failure may still count (its backoff doubles with the next).
        for by_address in slots.values_mut() {
            by_address.retain(|_, s| {
                !s.conns.is_empty()
                    || Arc::strong_count(&s.connecting) > 1
                    || s.failed
                        .as_ref()
                        .is_some_and(|f| f.at.elapsed() < f.backoff() + FAILURE_BACKOFF_MAX)
            });
        }
        slots.retain(|_, by_address| !by_address.is_empty());
    }

    /// Closes the pool (when the proxy stops, once no stream is left): its
    /// connections take no new streams and are let go, so that each closes
    /// (GOAWAY) once what it has queued is written and its streams are
    /// done; no new one is made.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let mut slots = self.slots.lock().expect("pool lock");
        for (_, _, slot) in all_slots(&slots) {
            for c in &slot.conns {
                c.closed.store(true, Ordering::Release);
            }
        }
        slots.clear();
    }

    /// Connections in the pool (for tests and metrics).
    pub fn connections(&self) -> usize {
        let slots = self.slots.lock().expect("pool lock");
        all_slots(&slots).map(|(_, _, s)| s.conns.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Current;
    use crate::resolve::testing::{lookup_of, slow_lookup_of};
    use tokio::net::TcpListener;
    use tokio::sync::watch;
    use tokio_rustls::TlsAcceptor;
    use ward_spec::test_util::{root, svid, Issuer};
    use ward_spec::tls::SpiffeClientVerifier;

    const API: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/api";
    const WEB: &str = "spiffe://example.org/tenant/acme/ns/prod/sa/web";

    /// A peer proxy on loopback presenting `API`'s SVID from `issuer`: it
    /// answers every `CONNECT` with `200` and holds the stream open.
    async fn peer(issuer: &Issuer, roots: RootStore) -> std::net::SocketAddr {
        counted_peer(issuer, roots).await.0
    }

    /// A listener on loopback, and the TLS acceptor of a peer proxy
    /// presenting `API`'s SVID from `issuer` and trusting `roots`.
    async fn api_listener(
        issuer: &Issuer,
        roots: &RootStore,
    ) -> (TlsAcceptor, TcpListener, std::net::SocketAddr) {
        let config = ward_spec::tls::server_config(
            svid(API, issuer),
            SpiffeClientVerifier::new(roots.clone(), true),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (TlsAcceptor::from(Arc::new(config)), listener, addr)
    }

    /// [`peer`], with the count of `CONNECT`s it has answered.
    async fn counted_peer(
        issuer: &Issuer,
        roots: RootStore,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let answered = Arc::new(AtomicUsize::new(0));
        let counter = answered.clone();
        let (acceptor, listener, addr) = api_listener(issuer, &roots).await;
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut conn) = hbone::server_builder(10).handshake::<_, Bytes>(tls).await
                    else {
                        return;
                    };
                    let mut held = Vec::new();
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let send = respond
                            .send_response(http::Response::new(()), false)
                            .unwrap();
                        counter.fetch_add(1, Ordering::AcqRel);
                        held.push((req, send));
                    }
                });
            }
        });
        (addr, answered)
    }

    /// A pool for `WEB` (SVID from `issuer`) whose host names `lookup`
    /// resolves, again every `refresh`.
    fn pool_with(
        issuer: &Issuer,
        roots: &RootStore,
        lookup: Lookup,
        refresh: Duration,
    ) -> Arc<Pool> {
        pool_timed(issuer, roots, lookup, refresh, Duration::from_secs(5))
    }

    /// [`pool_with`], with connect and handshake timeouts of `timeout`.
    fn pool_timed(
        issuer: &Issuer,
        roots: &RootStore,
        lookup: Lookup,
        refresh: Duration,
        timeout: Duration,
    ) -> Arc<Pool> {
        let (pool, identity_tx) = pool_rotatable(issuer, roots, lookup, refresh, timeout);
        // The identity never changes.
        std::mem::forget(identity_tx);
        pool
    }

    /// `WEB`'s SVID at generation `generation`.
    fn web_current(generation: u64, roots: &RootStore) -> Current {
        Current {
            spiffe_id: SpiffeId::parse(WEB).unwrap(),
            not_after: crate::identity::unix_now() + 3600,
            generation,
            roots: roots.clone(),
        }
    }

    /// [`pool_timed`], and the identity watch (generation 1) to rotate it.
    fn pool_rotatable(
        issuer: &Issuer,
        roots: &RootStore,
        lookup: Lookup,
        refresh: Duration,
        timeout: Duration,
    ) -> (Arc<Pool>, watch::Sender<Option<Current>>) {
        let (identity_tx, identity_rx) = watch::channel(Some(web_current(1, roots)));
        let identity = Identity {
            resolver: svid(WEB, issuer),
            current: identity_rx,
        };
        let pool = Pool::with_lookup(
            identity,
            Arc::new(Metrics::default()),
            10,
            (timeout, timeout, Duration::from_secs(60)),
            KEEPALIVE,
            lookup,
            refresh,
        );
        (pool, identity_tx)
    }

    /// The default keepalive.
    const KEEPALIVE: hbone::Keepalive = hbone::Keepalive {
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(20),
    };

    /// Streams to a host name with two addresses are spread over both (the
    /// fewest open streams first), one pooled connection each; the name is
    /// looked up once for all of them.
    #[tokio::test]
    async fn streams_to_a_name_are_spread_over_its_addresses() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let (a, to_a) = counted_peer(&issuer, roots.clone()).await;
        let (b, to_b) = counted_peer(&issuer, roots.clone()).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let lookup = lookup_of(Arc::new(Mutex::new(vec![a, b])), calls.clone());
        let pool = pool_with(&issuer, &roots, lookup, Duration::from_secs(60));
        let ids = vec![SpiffeId::parse(API).unwrap()];
        let mut held = Vec::new();
        for _ in 0..10 {
            let p = pool
                .start_stream("api.peers.test:15008", &ids, "api.acme:8080")
                .await
                .unwrap();
            let recv = accepted(p.response.await.unwrap()).unwrap();
            held.push((p.send, recv, p.lease));
        }
        assert_eq!(
            (to_a.load(Ordering::Acquire), to_b.load(Ordering::Acquire)),
            (5, 5)
        );
        assert_eq!(calls.load(Ordering::Acquire), 1);
        let summary = pool.summary();
        assert_eq!(summary.len(), 1);
        assert_eq!((summary[0].connections, summary[0].streams), (2, 10));
        let mut expected = vec![(a, 1, 5), (b, 1, 5)];
        expected.sort();
        let endpoints: Vec<_> = summary[0]
            .endpoints
            .iter()
            .map(|e| (e.address, e.connections, e.streams))
            .collect();
        assert_eq!(endpoints, expected);
        // Three of b's streams end: the next three go to b, now the less loaded.
        let mut ended = 0;
        held.retain(|(_, _, lease)| {
            let end = lease.conn.address == b && ended < 3;
            ended += usize::from(end);
            !end
        });
        assert_eq!(ended, 3);
        for _ in 0..3 {
            let p = pool
                .start_stream("api.peers.test:15008", &ids, "api.acme:8080")
                .await
                .unwrap();
            assert_eq!(p.lease.conn.address, b);
            held.push((
                p.send,
                accepted(p.response.await.unwrap()).unwrap(),
                p.lease,
            ));
        }
        assert_eq!(
            (to_a.load(Ordering::Acquire), to_b.load(Ordering::Acquire)),
            (5, 8)
        );
    }

    /// Whether `recv` stays open, without data, for half a second.
    async fn still_open(recv: &mut RecvStream) -> bool {
        tokio::time::timeout(Duration::from_millis(500), recv.data())
            .await
            .is_err()
    }

    /// An address whose handshake fails (here a listener that closes every
    /// connection at once) costs the first stream a try and no stream after
    /// it, until its backoff (1 s, then 2 s) has passed: every stream gets
    /// through the other address.
    #[tokio::test]
    async fn an_address_that_fails_is_tried_last_for_a_while() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let (good, answered) = counted_peer(&issuer, roots.clone()).await;
        let bad_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bad = bad_listener.local_addr().unwrap();
        let tries = Arc::new(AtomicUsize::new(0));
        let counter = tries.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = bad_listener.accept().await {
                counter.fetch_add(1, Ordering::AcqRel);
                drop(tcp);
            }
        });
        let lookup = lookup_of(
            Arc::new(Mutex::new(vec![bad, good])),
            Arc::new(AtomicUsize::new(0)),
        );
        let pool = pool_with(&issuer, &roots, lookup, Duration::from_secs(60));
        let ids = vec![SpiffeId::parse(API).unwrap()];
        let mut held = Vec::new();
        let open = |n: usize| {
            let pool = pool.clone();
            let ids = ids.clone();
            async move {
                let mut streams = Vec::new();
                for _ in 0..n {
                    let p = pool
                        .start_stream("api.peers.test:15008", &ids, "api.acme:8080")
                        .await
                        .expect("a stream did not get through the good address");
                    assert_eq!(p.lease.conn.address, good);
                    streams.push((p.send, p.lease));
                }
                streams
            }
        };
        // (wait first, streams opened, tries of the bad address by then)
        for (wait_ms, streams, tries_then, why) in [
            (0, 6, 1, "the bad address was tried again at once"),
            (1100, 3, 2, "the bad address was not tried again after 1 s"),
            (1100, 1, 2, "the backoff did not double"),
            (1000, 1, 3, "the bad address was not tried again after 2 s"),
        ] {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            held.extend(open(streams).await);
            assert_eq!(tries.load(Ordering::Acquire), tries_then, "{why}");
        }
        // Every stream reached the good peer, over one connection.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(answered.load(Ordering::Acquire), 11);
        assert_eq!(
            pool.connections(),
            2,
            "one for the streams, one more made after they filled it"
        );
        drop(held);
    }

    /// An address being dialled is tried after addresses with room: while
    /// one stream waits on a peer that accepts TCP but never answers TLS,
    /// the others go at once to the address that answers; the waiting one
    /// gets there too once its handshake times out.
    #[tokio::test]
    async fn streams_do_not_queue_behind_a_dial_to_an_address_that_never_answers() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let (good, _) = counted_peer(&issuer, roots.clone()).await;
        // Accepts connections (the kernel does) and never reads them.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let frozen = silent.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(vec![good]));
        let calls = Arc::new(AtomicUsize::new(0));
        let lookup = lookup_of(answer.clone(), calls.clone());
        let refresh = Duration::from_millis(500);
        let pool = pool_with(&issuer, &roots, lookup, refresh);
        let ids = Arc::new(vec![SpiffeId::parse(API).unwrap()]);
        let open = |pool: Arc<Pool>, ids: Arc<Vec<SpiffeId>>| async move {
            let started = Instant::now();
            let p = pool
                .start_stream("api.peers.test:15008", &ids, "api.acme:8080")
                .await
                .unwrap();
            let address = p.lease.conn.address;
            (address, started.elapsed(), p)
        };
        let (first, _, _held) = open(pool.clone(), ids.clone()).await;
        assert_eq!(first, good);
        // The name now also has the silent address (least loaded: first).
        *answer.lock().unwrap() = vec![frozen, good];
        tokio::time::sleep(refresh + Duration::from_millis(100)).await;
        let (_, _, _h) = open(pool.clone(), ids.clone()).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while calls.load(Ordering::Acquire) < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let waiting = tokio::spawn(open(pool.clone(), ids.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the silent address was not tried");
        for _ in 0..3 {
            let (address, took, _h) = open(pool.clone(), ids.clone()).await;
            assert_eq!(address, good);
            assert!(took < Duration::from_secs(2), "a stream waited {took:?}");
        }
        let (address, took, _h) = tokio::time::timeout(Duration::from_secs(15), waiting)
            .await
            .expect("the stream that tried the silent address never went on")
            .unwrap();
        assert_eq!(address, good);
        assert!(took >= Duration::from_secs(4), "{took:?}");
        drop(silent);
    }

    /// A connection with room at an address its name no longer stands for
    /// does not spare a stream its turn: the stream goes to the new
    /// address, where the connection it may have to open is counted.
    #[tokio::test]
    async fn room_at_an_address_the_name_moved_from_takes_no_turn_off() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let (old, _) = counted_peer(&issuer, roots.clone()).await;
        let (new, _) = counted_peer(&issuer, roots.clone()).await;
        let answer = Arc::new(Mutex::new(vec![old]));
        let lookup = lookup_of(answer.clone(), Arc::default());
        let refresh = Duration::from_millis(200);
        let pool = pool_with(&issuer, &roots, lookup, refresh);
        let ids = [SpiffeId::parse(API).unwrap()];
        const NAME: &str = "api.peers.test:15008";
        let held = pool
            .start_stream(NAME, &ids, "api.acme:8080")
            .await
            .unwrap();
        assert_eq!(held.lease.conn.address, old);
        assert!(pool.has_room(NAME, &ids));
        assert!(pool.turn(NAME, &ids).await.is_none());
        // The name moves; once the pool has looked it up again, the old
        // connection (still carrying its stream) leaves no room to count on.
        *answer.lock().unwrap() = vec![new];
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.resolver.last_known(NAME).unwrap().as_slice() != [new] {
            assert!(
                Instant::now() < deadline,
                "the name was not looked up again"
            );
            tokio::time::sleep(refresh).await;
            let _ = pool.resolver.addresses(NAME, Duration::from_secs(1)).await;
        }
        assert!(!pool.has_room(NAME, &ids));
        assert!(pool.turn(NAME, &ids).await.is_some());
        let moved = pool
            .start_stream(NAME, &ids, "api.acme:8080")
            .await
            .unwrap();
        assert_eq!(moved.lease.conn.address, new);
        assert!(pool.has_room(NAME, &ids));
        drop(held);
    }

    /// A first lookup that times out is a timeout (HTTP CONNECT: 504), and
    /// so is the answer the next second's callers get from it.
    #[tokio::test]
    async fn a_lookup_that_timed_out_stays_a_timeout_for_the_next_callers() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let answer = Arc::new(Mutex::new(vec!["192.0.2.1:15008".parse().unwrap()]));
        let calls = Arc::new(AtomicUsize::new(0));
        let lookup = slow_lookup_of(answer, calls.clone(), Arc::new(AtomicUsize::new(3000)));
        let pool = pool_timed(
            &issuer,
            &roots,
            lookup,
            DNS_REFRESH,
            Duration::from_millis(200),
        );
        for _ in 0..2 {
            let e = match pool.addresses("api.peers.test:15008").await {
                Err(e) => e,
                Ok(_) => panic!("a lookup that never answers found addresses"),
            };
            assert!(e.timed_out(), "{e}");
        }
        assert_eq!(
            calls.load(Ordering::Acquire),
            1,
            "the second answered from the hold"
        );
    }

    /// A background lookup whose task ended without a word (here it
    /// panics) does not hold the name's next lookup back: the name is not
    /// stuck on its last addresses.
    #[tokio::test]
    async fn a_lookup_that_never_reported_back_does_not_stop_the_next() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let (a, b): (SocketAddr, SocketAddr) = (
            "192.0.2.1:15008".parse().unwrap(),
            "192.0.2.2:15008".parse().unwrap(),
        );
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let lookup: Lookup = Arc::new(move |_host| {
            let n = counted.fetch_add(1, Ordering::AcqRel) + 1;
            Box::pin(async move {
                match n {
                    1 => Ok(vec![a]),
                    2 => panic!("the test's lookup ends without a word"),
                    _ => Ok(vec![b]),
                }
            })
        });
        let (refresh, timeout) = (Duration::from_millis(50), Duration::from_secs(1));
        let pool = pool_timed(&issuer, &roots, lookup, refresh, timeout);
        let name = "api.peers.test:15008";
        let addresses = || async { pool.addresses(name).await.unwrap().as_slice().to_vec() };
        assert_eq!(addresses().await, [a]);
        tokio::time::sleep(refresh + refresh / 2).await;
        // Stale: a background lookup starts, and its task panics; the last
        // addresses stay in use.
        assert_eq!(addresses().await, [a]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while calls.load(Ordering::Acquire) < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The next use starts another at once.
        let started = Instant::now();
        while addresses().await != [b] && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(addresses().await, [b]);
        assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
        // (A fourth may have started since: b is 50 ms old by now.)
        assert!(calls.load(Ordering::Acquire) >= 3);
    }

    /// Two peers (each counting its streams) behind one name, which the
    /// lookup answers with what `answer` holds (`a` at first), each lookup
    /// taking `delay_ms` and counted in `calls`.
    struct Moving {
        issuer: Issuer,
        roots: RootStore,
        a: (SocketAddr, Arc<AtomicUsize>),
        b: (SocketAddr, Arc<AtomicUsize>),
        answer: Arc<Mutex<Vec<SocketAddr>>>,
        calls: Arc<AtomicUsize>,
        delay_ms: Arc<AtomicUsize>,
        lookup: Lookup,
    }

    impl Moving {
        async fn start() -> Moving {
            let (bundle, issuer) = root("example.org");
            let roots = RootStore::new(&bundle).unwrap();
            let a = counted_peer(&issuer, roots.clone()).await;
            let b = counted_peer(&issuer, roots.clone()).await;
            let answer = Arc::new(Mutex::new(vec![a.0]));
            let calls = Arc::new(AtomicUsize::new(0));
            let delay_ms = Arc::new(AtomicUsize::new(0));
            let lookup = slow_lookup_of(answer.clone(), calls.clone(), delay_ms.clone());
            Moving {
                issuer,
                roots,
                a,
                b,
                answer,
                calls,
                delay_ms,
                lookup,
            }
        }

        /// A stream through `pool` to the name, answered: the address it
        /// went to.
        async fn open(&self, pool: &Pool) -> SocketAddr {
            let ids = [SpiffeId::parse(API).unwrap()];
            let p = pool
                .start_stream("api.peers.test:15008", &ids, "api.acme:8080")
                .await
                .unwrap();
            let address = p.lease.conn.address;
            let _stream = accepted(p.response.await.unwrap()).unwrap();
            address
        }
    }

    /// A name is looked up again, in the background, once its addresses
    /// are `refresh` old: new streams then go to the new address. A lookup
    /// that is slow holds up no stream, and while lookups fail the last
    /// addresses stay in use. A name whose first lookup fails is an error
    /// naming it, and answers the next second's callers without a lookup.
    #[tokio::test]
    async fn a_name_is_looked_up_again_in_the_background() {
        let m = Moving::start().await;
        let ((a, to_a), (b, to_b)) = (m.a.clone(), m.b.clone());
        let (answer, calls, delay_ms) = (&m.answer, &m.calls, &m.delay_ms);
        let refresh = Duration::from_secs(1);
        let pool = pool_with(&m.issuer, &m.roots, m.lookup.clone(), refresh);
        let open = || m.open(&pool);
        let counted = calls.clone();
        let lookups = move |n: usize| {
            let calls = counted.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(5);
                while calls.load(Ordering::Acquire) < n && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                calls.load(Ordering::Acquire)
            }
        };
        assert_eq!(open().await, a);
        assert_eq!(open().await, a);
        assert_eq!(lookups(1).await, 1);

        // The name moves to b; the next lookup takes 3 s.
        *answer.lock().unwrap() = vec![b];
        delay_ms.store(3000, Ordering::Release);
        tokio::time::sleep(refresh + Duration::from_millis(100)).await;
        let started = Instant::now();
        assert_eq!(open().await, a, "served from the last addresses");
        assert_eq!(open().await, a);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "streams waited for the lookup: {:?}",
            started.elapsed()
        );
        assert_eq!(lookups(2).await, 2);
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(open().await, b);

        // Lookups fail from now on: b stays in use.
        delay_ms.store(0, Ordering::Release);
        answer.lock().unwrap().clear();
        tokio::time::sleep(refresh + Duration::from_millis(100)).await;
        assert_eq!(open().await, b);
        assert_eq!(lookups(3).await, 3);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(open().await, b);
        assert_eq!(
            (to_a.load(Ordering::Acquire), to_b.load(Ordering::Acquire)),
            (4, 3)
        );

        // A name that never resolved is an error naming it; asked again at
        // once, the same error without another lookup.
        let before = calls.load(Ordering::Acquire);
        for _ in 0..2 {
            let ids = [SpiffeId::parse(API).unwrap()];
            let never = pool.start_stream("nowhere.test:15008", &ids, "x:1").await;
            let e = never.err().expect("a name without addresses gave a stream");
            assert!(e.to_string().contains("nowhere.test:15008"), "{e}");
        }
        assert_eq!(calls.load(Ordering::Acquire), before + 1);
    }

    /// A first lookup answered later than the connect timeout fails its
    /// caller, but its answer is kept: the next stream uses it, without a
    /// lookup of its own (a resolver that always takes longer than the
    /// timeout would otherwise never get a name resolved).
    #[tokio::test]
    async fn a_first_lookup_answered_late_serves_the_next_stream() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let (a, _) = counted_peer(&issuer, roots.clone()).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let lookup = slow_lookup_of(
            Arc::new(Mutex::new(vec![a])),
            calls.clone(),
            Arc::new(AtomicUsize::new(700)),
        );
        let timeout = Duration::from_millis(500);
        let pool = pool_timed(&issuer, &roots, lookup, DNS_REFRESH, timeout);
        let ids = vec![SpiffeId::parse(API).unwrap()];
        let first = pool
            .start_stream("api.peers.test:15008", &ids, "api.acme:8080")
            .await;
        let e = first
            .err()
            .expect("a lookup slower than the timeout was waited for");
        assert!(e.timed_out(), "{e}");
        // Streams asked for meanwhile fail at once (the failure's hold); once
        // the answer has come, they use it. (Without it, each lookup after
        // the hold would again take longer than the timeout.)
        let deadline = Instant::now() + Duration::from_secs(5);
        let p = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            match pool
                .start_stream("api.peers.test:15008", &ids, "api.acme:8080")
                .await
            {
                Ok(p) => break p,
                Err(e) => assert!(Instant::now() < deadline, "the late answer was lost: {e}"),
            }
        };
        assert_eq!(p.lease.conn.address, a);
        assert_eq!(calls.load(Ordering::Acquire), 1);
    }

    /// A peer that does not agree on ALPN `h2` (rustls lets a server that
    /// picks none through) is refused as incompatible.
    #[tokio::test]
    async fn a_peer_without_alpn_h2_is_refused() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let mut config = ward_spec::tls::server_config(
            svid(API, &issuer),
            SpiffeClientVerifier::new(roots.clone(), true),
        );
        config.alpn_protocols.clear();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let mut sink = Vec::new();
                        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut sink).await;
                    }
                });
            }
        });
        let lookup = lookup_of(Arc::new(Mutex::new(vec![addr])), Arc::default());
        let pool = pool_with(&issuer, &roots, lookup, Duration::from_secs(60));
        let ids = [SpiffeId::parse(API).unwrap()];
        let e = pool
            .start_stream(&addr.to_string(), &ids, "api.acme:8080")
            .await
            .err()
            .expect("a stream over a connection without ALPN h2");
        assert!(
            matches!(
                e,
                OpenError::Handshake {
                    reason: "incompatible",
                    ..
                }
            ),
            "{e}"
        );
    }

    /// A destination that cannot be reached at its addresses (nothing
    /// listens there any more) is looked up again at once: a peer that
    /// moved is reached at its new address without waiting for the next
    /// refresh. (Not sooner than a second after the last lookup.)
    #[tokio::test]
    async fn a_destination_that_cannot_be_reached_is_looked_up_again() {
        let m = Moving::start().await;
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let old = gone.local_addr().unwrap();
        drop(gone);
        *m.answer.lock().unwrap() = vec![old];
        let pool = pool_with(
            &m.issuer,
            &m.roots,
            m.lookup.clone(),
            Duration::from_secs(60),
        );
        let ids = [SpiffeId::parse(API).unwrap()];
        let refused = pool
            .start_stream("api.peers.test:15008", &ids, "api.acme:8080")
            .await
            .err()
            .expect("a stream to an address nothing listens at");
        assert!(matches!(refused, OpenError::Connect(..)), "{refused}");
        // The peer is back at b; a second on, a stream finds it there.
        *m.answer.lock().unwrap() = vec![m.b.0];
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(m.open(&pool).await, m.b.0, "the old address was used");
        assert_eq!(m.calls.load(Ordering::Acquire), 2);
    }

    /// Addresses not looked up again through an idle spell (twice the
    /// refresh interval without a stream) are looked up before the next
    /// stream uses them: the destination may have moved meanwhile.
    #[tokio::test]
    async fn after_an_idle_spell_a_name_is_looked_up_before_it_is_used() {
        let m = Moving::start().await;
        let (a, b) = (m.a.0, m.b.0);
        let refresh = Duration::from_millis(500);
        let pool = pool_with(&m.issuer, &m.roots, m.lookup.clone(), refresh);
        let open = || m.open(&pool);
        assert_eq!(open().await, a);
        *m.answer.lock().unwrap() = vec![b];
        m.delay_ms.store(200, Ordering::Release);
        tokio::time::sleep(refresh * 2 + Duration::from_millis(200)).await;
        // Two at once: both wait for the one lookup.
        let (first, second) = tokio::join!(open(), open());
        assert_eq!((first, second), (b, b), "a stream went to the old address");
        assert_eq!(m.calls.load(Ordering::Acquire), 2);
    }

    /// A drain closes the pool's connections once no stream is left, and
    /// returns only once they have closed: a stream's last bytes, still
    /// queued in its connection when the stream ended (here the peer waits
    /// before it reads), reach the peer before the proxy would exit.
    #[tokio::test]
    async fn a_drain_waits_for_pooled_connections_to_deliver_what_they_hold() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        // The peer: answers one stream, waits, then reads it to its end.
        let (acceptor, listener, addr) = api_listener(&issuer, &roots).await;
        let peer = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (mut conn, mut body) = answer_one_stream(&acceptor, tcp).await;
            let reading = async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut got = 0;
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    got += chunk.len();
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                got
            };
            tokio::spawn(async move { std::future::poll_fn(|cx| conn.poll_closed(cx)).await });
            reading.await
        });
        let pool = pool_with(&issuer, &roots, system_lookup(), DNS_REFRESH);
        let p = api_stream(&pool, addr).await;
        let mut recv = accepted(p.response.await.unwrap()).unwrap();
        assert!(recv.data().await.is_none(), "the peer's half did not end");
        // 2 MiB and the stream's end, queued; the stream is done with.
        let mut send = p.send;
        crate::pump::send_all(
            &mut send,
            Bytes::from(vec![7u8; 2 << 20]),
            &Default::default(),
        )
        .await
        .unwrap();
        send.send_data(Bytes::new(), true).unwrap();
        drop((send, recv, p.lease));
        let metrics = pool.metrics.clone();
        assert_eq!(metrics.connections_open(Direction::Outbound), 1);
        let (exit, _) = watch::channel(false);
        drain(&pool, exit).await;
        assert_eq!(
            metrics.connections_open(Direction::Outbound),
            0,
            "the drain ended with a pooled connection open"
        );
        let got = tokio::time::timeout(Duration::from_secs(10), peer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, 2 << 20);
        assert_eq!(pool.connections(), 0);
    }

    /// A stream through `pool` to API at `addr`.
    async fn api_stream(pool: &Pool, addr: std::net::SocketAddr) -> PendingTunnel {
        let ids = vec![SpiffeId::parse(API).unwrap()];
        pool.start_stream(&addr.to_string(), &ids, "api.acme:8080")
            .await
            .unwrap()
    }

    /// The peer's side of one stream over `io`: takes it and answers 200,
    /// with nothing to say (its half of the stream ends at once).
    async fn answer_one_stream<T>(
        acceptor: &TlsAcceptor,
        io: T,
    ) -> (
        h2::server::Connection<tokio_rustls::server::TlsStream<T>, Bytes>,
        RecvStream,
    )
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let tls = acceptor.accept(io).await.unwrap();
        let mut conn = hbone::server_builder(10)
            .handshake::<_, Bytes>(tls)
            .await
            .unwrap();
        let (req, mut respond) = conn.accept().await.unwrap().unwrap();
        respond
            .send_response(http::Response::new(()), true)
            .unwrap();
        (conn, req.into_body())
    }

    /// A socket that reads at most `rate` bytes a second (a slow link).
    struct SlowReader {
        tcp: tokio::net::TcpStream,
        rate: usize,
        began: Instant,
        read: usize,
        wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }

    impl tokio::io::AsyncRead for SlowReader {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let this = &mut *self;
            loop {
                let due = this.rate * this.began.elapsed().as_millis() as usize / 1000;
                if due > this.read {
                    this.wait = None;
                    let mut chunk = vec![0u8; out.remaining().min(due - this.read)];
                    let mut limited = tokio::io::ReadBuf::new(&mut chunk);
                    let r = std::pin::Pin::new(&mut this.tcp).poll_read(cx, &mut limited);
                    out.put_slice(limited.filled());
                    this.read += limited.filled().len();
                    return r;
                }
                let wake = Duration::from_millis(((this.read + 1) * 1000 / this.rate) as u64);
                let sleep = this.wait.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until((this.began + wake).into()))
                });
                std::task::ready!(sleep.as_mut().poll(cx));
                this.wait = None;
            }
        }
    }

    impl tokio::io::AsyncWrite for SlowReader {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            data: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::pin::Pin::new(&mut self.tcp).poll_write(cx, data)
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
        }
    }

    /// A connection let go of (the pool closed, its stream done) whose
    /// peer still reads, slowly (128 KiB/s), is not cut off after the close
    /// grace: its last bytes, 2 MiB sent in all, arrive whole, with the
    /// stream's end (it takes 16 s, past the 10 s grace).
    #[tokio::test]
    async fn a_connection_let_go_of_whose_peer_still_reads_slowly_delivers_everything() {
        const SENT: usize = 2 << 20;
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let (acceptor, listener, addr) = api_listener(&issuer, &roots).await;
        let peer = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let slow = SlowReader {
                tcp,
                rate: 128 * 1024,
                began: Instant::now(),
                read: 0,
                wait: None,
            };
            let (mut conn, mut body) = answer_one_stream(&acceptor, slow).await;
            let serve = tokio::spawn(async move {
                while let Some(r) = conn.accept().await {
                    r?;
                }
                Ok::<_, h2::Error>(())
            });
            let mut got = 0;
            while let Some(data) = body.data().await {
                let data = data?;
                got += data.len();
                let _ = body.flow_control().release_capacity(data.len());
            }
            drop(serve);
            Ok::<_, h2::Error>(got)
        });
        let pool = pool_with(&issuer, &roots, system_lookup(), DNS_REFRESH);
        let p = api_stream(&pool, addr).await;
        let _answer = accepted(p.response.await.unwrap()).unwrap();
        let mut send = p.send;
        send.send_data(Bytes::from(vec![7u8; SENT]), true).unwrap();
        drop((send, p.lease));
        pool.close();
        let started = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(60), peer)
            .await
            .expect("the peer never got the stream's end")
            .unwrap();
        assert_eq!(got.unwrap(), SENT);
        assert!(
            started.elapsed() > hbone::CLOSE_GRACE,
            "{:?}",
            started.elapsed()
        );
    }

    /// A connection let go of (the pool closed, its streams done) whose
    /// peer reads nothing more, so that its queued bytes and its GOAWAY are
    /// never written, is cut off after [`hbone::CLOSE_GRACE`] instead of
    /// being held until TCP gives up (a minute or more, past the drain's
    /// deadline).
    #[tokio::test]
    async fn a_connection_let_go_of_whose_peer_reads_nothing_is_cut_off_after_the_grace() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let (acceptor, listener, addr) = api_listener(&issuer, &roots).await;
        // The peer: answers two streams, then neither reads nor closes.
        let (stalled_tx, stalled) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            socket2::SockRef::from(&tcp)
                .set_recv_buffer_size(4096)
                .unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let mut conn = hbone::server_builder(10)
                .handshake::<_, Bytes>(tls)
                .await
                .unwrap();
            let mut held = Vec::new();
            for _ in 0..2 {
                let (req, mut respond) = conn.accept().await.unwrap().unwrap();
                respond
                    .send_response(http::Response::new(()), true)
                    .unwrap();
                held.push(req);
            }
            // Long enough to send the answers.
            let _ = tokio::time::timeout(Duration::from_millis(300), conn.accept()).await;
            let _ = stalled_tx.send((conn, held));
            std::future::pending::<()>().await
        });
        let pool = pool_with(&issuer, &roots, system_lookup(), DNS_REFRESH);
        let mut streams = Vec::new();
        for _ in 0..2 {
            let p = api_stream(&pool, addr).await;
            let recv = accepted(p.response.await.unwrap()).unwrap();
            streams.push((p.send, recv, p.lease));
        }
        let _stalled = stalled.await.unwrap();
        // Each stream queues 3 MiB (within its window; more than the sockets
        // take, together) and its end.
        for (send, ..) in &mut streams {
            send.send_data(Bytes::from(vec![7u8; 3 << 20]), true)
                .unwrap();
        }
        drop(streams);
        let metrics = pool.metrics.clone();
        assert_eq!(metrics.connections_open(Direction::Outbound), 1);
        pool.close();
        let let_go = Instant::now();
        while metrics.connections_open(Direction::Outbound) > 0 {
            assert!(
                let_go.elapsed() < hbone::CLOSE_GRACE + Duration::from_secs(5),
                "a connection whose peer reads nothing was held"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            let_go.elapsed() >= hbone::CLOSE_GRACE - Duration::from_millis(500),
            "cut off before the grace: {:?}",
            let_go.elapsed()
        );
    }

    /// A failure answered from the hold (the next callers, at once) is the
    /// same kind as the first: a peer presenting an unexpected ID is a
    /// refused handshake for them too (the access log's `refused`), not a
    /// connection that could not be made (`unreachable`).
    #[tokio::test]
    async fn a_failure_answered_from_the_hold_keeps_its_kind() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let addr = peer(&issuer, roots.clone()).await;
        let pool = pool_with(&issuer, &roots, system_lookup(), DNS_REFRESH);
        let db = vec![SpiffeId::parse("spiffe://example.org/tenant/acme/ns/prod/sa/db").unwrap()];
        for attempt in 0..2 {
            match pool.start_stream(&addr.to_string(), &db, "db:5432").await {
                Err(OpenError::Handshake { reason, error, .. }) => {
                    assert_eq!(reason, "unexpected_id", "attempt {attempt}");
                    assert_eq!(
                        error.to_string().contains("ms ago)"),
                        attempt == 1,
                        "attempt {attempt}: {error}"
                    );
                }
                Err(e) => panic!("attempt {attempt}: {e}"),
                Ok(_) => panic!("a peer with an unexpected ID was taken"),
            }
        }
    }

    /// The SVID rotates while a stream waits for its destination's first
    /// lookup: its connection is made, and labelled, with the new SVID, so
    /// the next stream (under the new SVID) shares it instead of making
    /// another.
    #[tokio::test]
    async fn a_stream_that_waited_through_a_rotation_uses_the_new_svid() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let addr = peer(&issuer, roots.clone()).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let lookup = slow_lookup_of(
            Arc::new(Mutex::new(vec![addr])),
            calls,
            Arc::new(AtomicUsize::new(500)),
        );
        let (pool, identity_tx) =
            pool_rotatable(&issuer, &roots, lookup, DNS_REFRESH, Duration::from_secs(5));
        let ids = vec![SpiffeId::parse(API).unwrap()];
        let destination = format!("api.test:{}", addr.port());
        let first = {
            let (pool, ids, destination) = (pool.clone(), ids.clone(), destination.clone());
            tokio::spawn(async move { pool.start_stream(&destination, &ids, "api:8080").await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        identity_tx.send(Some(web_current(2, &roots))).unwrap();
        let Ok(first) = first.await.unwrap() else {
            panic!("the first stream failed");
        };
        let Ok(second) = pool.start_stream(&destination, &ids, "api:8080").await else {
            panic!("the second stream failed");
        };
        assert_eq!(
            pool.metrics.connections_open(Direction::Outbound),
            1,
            "the connection made during the rotation was labelled with the old SVID"
        );
        drop((first, second));
    }

    /// A peer's refusal keeps why it said, if it is one of a Ward proxy's
    /// outcomes, and nothing else it says.
    #[test]
    fn a_refusal_keeps_the_reason_a_ward_proxy_gives() {
        let why = |said: Option<&str>| {
            let mut h = http::HeaderMap::new();
            if let Some(s) = said {
                h.insert(hbone::ERROR_HEADER, s.parse().unwrap());
            }
            match refusal(StatusCode::FORBIDDEN, &h) {
                OpenError::Refused(s, why) => {
                    assert_eq!(s, StatusCode::FORBIDDEN);
                    why
                }
                e => panic!("{e}"),
            }
        };
        assert_eq!(why(Some("denied")), "denied");
        assert_eq!(why(Some("untrusted")), "untrusted");
        assert_eq!(why(Some("denied, really")), "");
        assert_eq!(why(None), "");
        let e = refusal(StatusCode::FORBIDDEN, &{
            let mut h = http::HeaderMap::new();
            h.insert(hbone::ERROR_HEADER, "expired".parse().unwrap());
            h
        });
        assert_eq!(
            e.to_string(),
            "the peer refused the stream: 403 Forbidden (expired)"
        );
    }

    /// The proxy's drain (up to 10 s), of `pool` and its metrics, telling
    /// the outbound listeners to close through `exit`.
    async fn drain(pool: &Pool, exit: watch::Sender<bool>) {
        let times = crate::DrainTimes {
            deadline: Duration::from_secs(10),
            outbound: Duration::ZERO,
        };
        drain_in(pool, exit, times).await;
    }

    /// [`drain`], in `times`.
    async fn drain_in(pool: &Pool, exit: watch::Sender<bool>, times: crate::DrainTimes) {
        let (drain, _) = watch::channel(false);
        let metrics = &pool.metrics;
        crate::drain_streams(&drain, &exit, metrics, pool, times, std::future::pending()).await;
    }

    /// The outbound listeners stay for the outbound drain, but half the
    /// drain's deadline at most: a drain timeout shorter than the outbound
    /// drain still leaves the pool its turn to close its connections
    /// before the deadline.
    #[tokio::test]
    async fn the_outbound_drain_leaves_the_pool_its_turn() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let (addr, _) = counted_peer(&issuer, roots.clone()).await;
        let pool = pool_with(&issuer, &roots, system_lookup(), DNS_REFRESH);
        let ids = vec![SpiffeId::parse(API).unwrap()];
        let p = pool
            .start_stream(&addr.to_string(), &ids, "api.acme:8080")
            .await
            .unwrap();
        drop(accepted(p.response.await.unwrap()).unwrap());
        drop((p.send, p.lease));
        assert_eq!(pool.connections(), 1);
        let (exit, mut listener) = watch::channel(false);
        let times = crate::DrainTimes {
            deadline: Duration::from_secs(2),
            outbound: Duration::from_secs(5),
        };
        let started = Instant::now();
        let drained = {
            let pool = pool.clone();
            tokio::spawn(async move { drain_in(&pool, exit, times).await })
        };
        listener.wait_for(|x| *x).await.unwrap();
        let told = started.elapsed();
        assert!(
            told >= Duration::from_millis(950) && told < Duration::from_millis(1500),
            "the listeners were told to close after {told:?}"
        );
        drop(listener);
        drained.await.unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1900), "{took:?}");
        assert_eq!(
            pool.connections(),
            0,
            "the pool's connection was not closed"
        );
    }

    /// The drain's order: while the inbound side is still draining (here an
    /// inbound connection not yet closed, with no stream open) the outbound
    /// listeners stay open and the pool takes new streams; once it is done,
    /// the listeners are told to close, and after they have stopped the
    /// pool is closed and the drain ends.
    #[tokio::test]
    async fn the_pool_takes_streams_until_the_inbound_side_has_drained() {
        let (bundle, issuer) = root("example.org");
        let roots = RootStore::new(&bundle).unwrap();
        let (addr, answered) = counted_peer(&issuer, roots.clone()).await;
        let pool = pool_with(&issuer, &roots, system_lookup(), DNS_REFRESH);
        let metrics = pool.metrics.clone();
        let ids = vec![SpiffeId::parse(API).unwrap()];
        let open = || async {
            let p = pool
                .start_stream(&addr.to_string(), &ids, "api.acme:8080")
                .await?;
            let response = p
                .response
                .await
                .map_err(|e| OpenError::Http2(String::new(), e))?;
            accepted(response).map(drop)
        };
        metrics.connection_opened(Direction::Inbound);
        let (exit, mut listener) = watch::channel(false);
        let drained = {
            let pool = pool.clone();
            tokio::spawn(async move { drain(&pool, exit).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!*listener.borrow(), "outbound listeners told to close");
        open()
            .await
            .expect("a stream while the inbound side drains");
        tokio::time::sleep(Duration::from_millis(300)).await;
        open().await.expect("a stream after a pause with none open");
        assert_eq!(answered.load(Ordering::Acquire), 2);
        // The inbound side is done: the listeners are told to close, and
        // the drain waits for them (the receiver) to stop.
        metrics.connection_closed(Direction::Inbound);
        tokio::time::timeout(Duration::from_secs(2), listener.wait_for(|x| *x))
            .await
            .expect("the listeners were not told to close")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !drained.is_finished(),
            "the drain ended with a listener open"
        );
        drop(listener);
        tokio::time::timeout(Duration::from_secs(5), drained)
            .await
            .expect("the drain did not end")
            .unwrap();
        assert!(
            open().await.is_err(),
            "the pool takes streams after the drain"
        );
    }

    /// An open stream goes on through a bundle change that still trusts its
    /// peer, and ends (as `untrusted`) when the root its peer's chain
    /// reaches leaves the bundle; its connection takes no new stream, which
    /// then needs a new handshake, which the peer fails. (The roots change
    /// here without a new SVID, so that the connection's generation does not
    /// keep it from new streams on its own.)
    #[tokio::test]
    async fn a_stream_ends_when_the_roots_no_longer_trust_its_peer() {
        let (old_bundle, old_root) = root("example.org");
        let (new_bundle, _) = root("example.org");
        let addr = peer(&old_root, RootStore::new(&old_bundle).unwrap()).await;
        let roots = RootStore::new(&old_bundle).unwrap();
        let current = |generation| {
            Some(Current {
                spiffe_id: SpiffeId::parse(WEB).unwrap(),
                not_after: crate::identity::unix_now() + 3600,
                generation,
                roots: roots.clone(),
            })
        };
        let (identity_tx, identity_rx) = watch::channel(current(1));
        let identity = Identity {
            resolver: svid(WEB, &old_root),
            current: identity_rx,
        };
        let metrics = Arc::new(Metrics::default());
        let d = Duration::from_secs(5);
        let pool = Pool::new(
            identity,
            metrics.clone(),
            10,
            d,
            d,
            Duration::from_secs(60),
            KEEPALIVE,
        );
        let ids = vec![SpiffeId::parse(API).unwrap()];
        let destination = addr.to_string();
        let pending = pool
            .start_stream(&destination, &ids, "api.acme:8080")
            .await
            .unwrap();
        let mut recv = accepted(pending.response.await.unwrap()).unwrap();

        // A new root joins the bundle: the peer is verified again, and trusted.
        let mut both = new_bundle.clone();
        both.x509_authorities
            .extend(old_bundle.x509_authorities.iter().cloned());
        roots.update(&both).unwrap();
        identity_tx.send(current(1)).unwrap();
        assert!(
            still_open(&mut recv).await,
            "ended while its root was trusted"
        );
        assert!(!pending.lease.untrusted());

        // The peer's root leaves the bundle: the stream ends.
        roots.update(&new_bundle).unwrap();
        identity_tx.send(current(1)).unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), recv.data())
            .await
            .expect("the stream of a peer no longer trusted stayed open");
        assert!(!matches!(end, Some(Ok(_))), "{end:?}");
        assert!(pending.lease.untrusted());
        let text = metrics.render(0);
        assert!(text.contains(r#"reason="no_longer_trusted"} 1"#), "{text}");
        // A new stream needs a new connection, whose peer is refused.
        assert_eq!(pool.connections(), 1);
        let again = pool.start_stream(&destination, &ids, "api.acme:8080").await;
        assert!(
            matches!(again, Err(OpenError::Handshake { .. })),
            "{:?}",
            again.err()
        );
    }
}
