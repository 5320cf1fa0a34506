//! Outbound: local listeners that tunnel the application's connections to
//! peer proxies.
//!
//! A route listener (`127.0.0.1:PORT`) tunnels every connection to its one
//! destination. The HTTP CONNECT listener reads `CONNECT host:port` and
//! tunnels to the route whose target (or destination) that is. Either way the
//! tunnel is a stream on a pooled mutual-TLS connection whose peer must present
//! one of the route's SPIFFE IDs; a peer that does not is refused during the
//! handshake, before any application byte is sent.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::access_log::{End, StreamLog};
use crate::config::Route;
use crate::hbone;
use crate::limit::Limit;
use crate::metrics::{Direction, Metrics, StreamTask};
use crate::pool::{accepted, Lease, OpenError, PendingTunnel, Pool, Tunnel};
use crate::pump::{pump, AppConn, Carried};

/// Accepts application connections until `exit` turns true (when the
/// proxy's drain has no stream left); each is
/// handled by `handle` in a task of its own, with one of `slots` (shared by
/// every outbound listener) to hold until it ends; when none is free a new
/// connection is closed at once, and logged by `over_limit`. The slot, and
/// the stream's count for the drain, go into `handle`'s future (a wrapper
/// future awaiting it would hold that future twice).
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    slots: Arc<Limit>,
    metrics: Arc<Metrics>,
    mut exit: watch::Receiver<bool>,
    over_limit: impl Fn(SocketAddr),
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, (OwnedSemaphorePermit, StreamTask)) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let Some((app, source)) = crate::accept_until_drained(&listener, &mut exit, what).await
        else {
            return;
        };
        let Some(slot) = slots.take(|| {
            tracing::warn!(
                listener = what,
                "outbound connection limit reached; closing new application connections until some end"
            );
        }) else {
            metrics.refused(Direction::Outbound, "over_connection_limit");
            over_limit(source);
            // Reset, not ended: an application must not take a refused
            // connection for a stream that was carried and ended.
            drop(AppConn::new(app));
            continue;
        };
        crate::hbone::app_socket(&app);
        tokio::spawn(handle(
            app,
            source,
            (slot, metrics.stream_task(Direction::Outbound)),
        ));
    }
}

/// Serves one route's listener until `exit` turns true.
pub async fn serve_route(
    listener: TcpListener,
    route: Arc<Route>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    slots: Arc<Limit>,
    exit: watch::Receiver<bool>,
) {
    let m = metrics.clone();
    let (r, m2) = (route.clone(), metrics.clone());
    let over_limit = move |source| {
        let log = StreamLog::start(
            &m2,
            Direction::Outbound,
            source,
            None,
            &r.destination,
            Some(r.target()),
        );
        StreamLog::end(&m2, Direction::Outbound, log, refused_over_limit());
    };
    accept_loop(listener, "outbound route", slots, m, exit, over_limit, move |app, source, slot| {
        let (route, pool, metrics) = (route.clone(), pool.clone(), metrics.clone());
        // Made here, not in the task: a stream's task holds only the box.
        let mut log = StreamLog::start(
            &metrics,
            Direction::Outbound,
            source,
            None,
            &route.destination,
            Some(route.target()),
        );
        let began = Instant::now();
        async move {
            // Held (moved into this future) until the stream ends.
            let _ = &slot;
            // Reset when closed before its stream's end reached it.
            let app = AppConn::new(app);
            // Boxed: an open stream's task keeps only what the pump needs.
            // (In a block of its own, and taken apart at once: a value
            // matched or only partly moved in the task's scope would keep
            // its room there for the stream's life.)
            let PendingTunnel {
                send,
                response: answer,
                lease,
            } = {
                let turn = pool.turn(&route.destination, &route.ids).await;
                let started = Box::pin(start(&pool, &route)).await;
                drop(turn);
                match started {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(destination = %route.destination, error = %e, "outbound tunnel not opened");
                        StreamLog::end(&metrics, Direction::Outbound, log, not_opened(&e));
                        // The reset of its connection is all the application learns.
                        return;
                    }
                }
            };
            StreamLog::set_peer(&mut log, lease.peer_id(), lease.address());
            // The application's first bytes go out with the request; what
            // comes back is written to it only once the peer has said 200.
            let carried = Carried::default();
            // Boxed: the pump's futures hold the answer's future (and its
            // timer) by value, in more than one place; boxed, each holds a
            // pointer, and the box, with what only the answer needs, is
            // freed once the answer is in (or given up on).
            let response = Box::pin({
                let (route, metrics, carried) = (&route, &metrics, &carried);
                let wait = pool.answer_timeout();
                let retire = lease.retire_handle();
                let traffic = lease.traffic().clone();
                async move {
                    let r = hbone::answer_within(wait, &traffic, answer)
                        .await
                        .ok_or_else(|| {
                            tracing::warn!(destination = %route.destination, "outbound tunnel not answered in {wait:?}; given up");
                            retire.unless_alive(&route.destination);
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("the peer did not answer in {wait:?}"),
                            )
                        })?
                        .map_err(crate::pump::h2_io)?;
                    carried.status.store(r.status().as_u16(), Ordering::Relaxed);
                    let recv = accepted(r).map_err(|e| {
                        if let OpenError::Refused(_, why) = e {
                            let _ = carried.refusal.set(why);
                        }
                        tracing::warn!(destination = %route.destination, error = %e, "outbound tunnel refused");
                        std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
                    })?;
                    let _ = carried.set_up.set(Instant::now());
                    metrics.stream_set_up(Direction::Outbound, began.elapsed());
                    Ok(recv)
                }
            });
            carry(app, send, response, lease, Bytes::new(), &metrics, &carried, log).await;
        }
    })
    .await
}

/// The access log's end of an application connection closed at once: all
/// outbound connection slots were taken.
fn refused_over_limit() -> End<'static> {
    End::empty(0, "refused", Some(&"over the proxy's max_connections"))
}

/// The outcome of a stream the peer answered `status` (not 200), saying
/// `why`: its policy's denial, its application out of reach, or another
/// refusal (the peer no longer trusts this proxy, for one).
fn answered(status: u16, why: &str) -> &'static str {
    match (status, why) {
        (403, "denied") => "denied",
        (_, "unreachable") | (502 | 504, _) => "unreachable",
        _ => "refused",
    }
}

/// The access log's end of a stream whose tunnel could not be opened.
fn not_opened(e: &OpenError) -> End<'_> {
    let outcome = match e {
        OpenError::Connect(..) => "unreachable",
        OpenError::Handshake {
            reason: "timeout", ..
        } => "unreachable",
        OpenError::Handshake { .. } => "refused",
        OpenError::Refused(status, why) => answered(status.as_u16(), why),
        OpenError::Untrusted(_) => "untrusted",
        _ => "error",
    };
    let status = match e {
        OpenError::Refused(s, _) => s.as_u16(),
        _ => 0,
    };
    End::empty(status, outcome, Some(e))
}

/// Sends a route's `CONNECT`, again if the connection it went to turned out
/// to be closing (that one takes no more streams, so each try goes to
/// another pooled connection or a new one).
async fn start(pool: &Pool, route: &Route) -> Result<PendingTunnel, OpenError> {
    const TRIES: usize = 8;
    let mut tries = 1;
    loop {
        match pool
            .start_stream(&route.destination, &route.ids, route.target())
            .await
        {
            Err(OpenError::Http2(..)) if tries < TRIES => tries += 1,
            r => return r,
        }
    }
}

/// Opens a tunnel for `route` and waits for the peer's answer; the
/// stream's access line gets the peer's ID once a connection is chosen.
async fn open(
    pool: &Pool,
    route: &Route,
    log: &mut Option<Box<StreamLog>>,
) -> Result<Tunnel, OpenError> {
    let turn = pool.turn(&route.destination, &route.ids).await;
    let p = start(pool, route).await?;
    drop(turn);
    StreamLog::set_peer(log, p.lease.peer_id(), p.lease.address());
    let wait = pool.answer_timeout();
    let lease = p.lease;
    let recv = hbone::answer_within(wait, lease.traffic(), p.response)
        .await
        .ok_or_else(|| {
            lease.retire_handle().unless_alive(&route.destination);
            OpenError::Connect(
                route.destination.clone(),
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the peer did not answer the CONNECT in {wait:?}"),
                ),
            )
        })?
        .map_err(|e| {
            if lease.untrusted() {
                OpenError::Untrusted(route.destination.clone())
            } else if lease.unresponsive() {
                // Closed under the stream: the peer stopped answering.
                OpenError::Connect(
                    route.destination.clone(),
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the peer did not answer a keepalive PING",
                    ),
                )
            } else {
                OpenError::Http2(route.destination.clone(), e)
            }
        })
        .and_then(accepted)?;
    Ok(Tunnel {
        send: p.send,
        recv,
        lease,
    })
}

#[allow(clippy::too_many_arguments)]
async fn carry(
    mut app: AppConn,
    send: h2::SendStream<Bytes>,
    recv: impl std::future::Future<Output = std::io::Result<h2::RecvStream>>,
    lease: Lease,
    first: Bytes,
    metrics: &Metrics,
    carried: &Carried,
    log: Option<Box<StreamLog>>,
) {
    metrics.stream_opened(Direction::Outbound);
    let result = pump(&mut app, send, recv, first, carried).await;
    drop(app);
    let untrusted = lease.untrusted();
    let unresponsive = lease.unresponsive();
    let (to_app, from_app) = carried.totals();
    metrics.stream_closed(Direction::Outbound, (to_app, from_app));
    // Streams the peer answered 200 (a route's stream is counted from its
    // CONNECT on, refused or not).
    if let Some(set_up) = carried.set_up.get() {
        metrics.stream_carried(
            Direction::Outbound,
            lease.peer_id(),
            (to_app, from_app),
            set_up.elapsed(),
        );
    }
    drop(lease);
    let status = carried.status.load(Ordering::Relaxed);
    let (outcome, error) = match &result {
        Ok(()) => ("ok", None),
        Err(e) => {
            tracing::debug!(error = %e, "outbound stream ended with an error");
            let refused = status != 0 && status != 200;
            let outcome = match (refused, untrusted) {
                (true, _) => answered(status, carried.refusal.get().copied().unwrap_or("")),
                (false, true) => "untrusted",
                // Its connection was closed: the peer stopped answering.
                (false, false) if unresponsive => "unreachable",
                // Not answered in time: as an HTTP CONNECT client's stream.
                (false, false) if status == 0 && e.kind() == std::io::ErrorKind::TimedOut => {
                    "unreachable"
                }
                (false, false) => "error",
            };
            (outcome, Some(e as &dyn std::fmt::Display))
        }
    };
    let end = End {
        status,
        outcome,
        error,
        bytes: Some((to_app, from_app)),
    };
    StreamLog::end(metrics, Direction::Outbound, log, end);
}

/// The HTTP CONNECT listener: `CONNECT host:port HTTP/1.1` picks the route.
pub async fn serve_connect(
    listener: TcpListener,
    routes: Arc<Vec<Arc<Route>>>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    slots: Arc<Limit>,
    exit: watch::Receiver<bool>,
) {
    let m = metrics.clone();
    let m2 = metrics.clone();
    let over_limit = move |source| {
        let log = StreamLog::start(&m2, Direction::Outbound, source, None, "", None);
        StreamLog::end(&m2, Direction::Outbound, log, refused_over_limit());
    };
    let routes = Arc::new(RoutesByTarget::new(&routes));
    accept_loop(
        listener,
        "HTTP CONNECT",
        slots,
        m,
        exit,
        over_limit,
        move |app, source, slot| {
            let (routes, pool, metrics) = (routes.clone(), pool.clone(), metrics.clone());
            // The destination is known once the request head is read.
            let log = StreamLog::start(&metrics, Direction::Outbound, source, None, "", None);
            async move {
                // Held (moved into this future) until the stream ends.
                let _ = &slot;
                http_connect(app, &routes, &pool, &metrics, log).await
            }
        },
    )
    .await
}

const MAX_HEAD: usize = 8 * 1024;

/// The routes by the targets a CONNECT may name (each route's target and
/// destination; the first route listed that names one takes it), looked up
/// without a scan of every route.
struct RoutesByTarget(std::collections::HashMap<String, Arc<Route>>);

impl RoutesByTarget {
    fn new(routes: &[Arc<Route>]) -> Self {
        let mut by = std::collections::HashMap::new();
        for r in routes {
            for name in [r.target(), r.destination.as_str()] {
                // (As `authority` gives a CONNECT's target.)
                let name = authority(name).unwrap_or_else(|| name.to_owned());
                by.entry(name).or_insert_with(|| r.clone());
            }
        }
        RoutesByTarget(by)
    }

    fn get(&self, target: &str) -> Option<&Arc<Route>> {
        self.0.get(target)
    }
}

/// Serves one HTTP CONNECT client. Its access line's status is the peer's
/// answer, or what this proxy answered the client itself.
async fn http_connect(
    mut app: TcpStream,
    routes: &RoutesByTarget,
    pool: &Pool,
    metrics: &Metrics,
    mut log: Option<Box<StreamLog>>,
) {
    let mut buf = BytesMut::with_capacity(1024);
    // The whole head within 10 s (not 10 s per read: a byte every few
    // seconds would hold the task for as long as the client likes).
    // Ok(Some(end)): a head; Ok(None): too large; Err: closed or too slow.
    let head = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(i) = find_head_end(&buf) {
                return Ok(Some(i));
            }
            if buf.len() >= MAX_HEAD {
                return Ok(None);
            }
            match app.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return Err(()),
            }
        }
    })
    .await;
    let head_end = match head {
        Ok(Ok(Some(i))) => i,
        Ok(Ok(None)) => {
            let status = "431 Request Header Fields Too Large";
            return refuse(app, metrics, log, status, "error", "request head too large").await;
        }
        Ok(Err(())) | Err(_) => {
            let why = "no CONNECT request head (closed, or not within 10 s)";
            StreamLog::end(
                metrics,
                Direction::Outbound,
                log,
                End::empty(0, "error", Some(&why)),
            );
            return;
        }
    };
    let head = buf.split_to(head_end);
    let first = buf.freeze();
    // Only the request line's target is kept: the head shares its buffer
    // with `first`, which goes out with the request, and would otherwise
    // hold it (a kilobyte or more) for the stream's life.
    let (connect, named) = request_line(&head);
    drop(head);
    if !connect {
        // A client sending plain HTTP through a proxy (`GET http://…`) is
        // told what this listener takes (curl: `-p`/`--proxytunnel`).
        let status = "405 Method Not Allowed\r\nAllow: CONNECT";
        return refuse(app, metrics, log, status, "error", "not a CONNECT request").await;
    }
    let target = authority(&named);
    drop(named);
    let Some(target) = target else {
        let why = "the CONNECT target is not host:port";
        return refuse(app, metrics, log, "400 Bad Request", "error", why).await;
    };
    let Some(route) = routes.get(&target) else {
        tracing::info!(target, "HTTP CONNECT to a target no route names");
        StreamLog::set_route(&mut log, "", &target);
        let why = "no route names this target";
        return refuse(app, metrics, log, "403 Forbidden", "denied", why).await;
    };
    StreamLog::set_route(&mut log, &route.destination, route.target());
    drop(target);
    let began = Instant::now();
    // Boxed: the stream's task would otherwise keep room for opening a
    // tunnel (the pool's connecting and handshake) while it carries.
    match Box::pin(open(pool, route, &mut log)).await {
        Ok(t) => {
            if let Err(e) = reply(&mut app, "200 Connection established", None).await {
                StreamLog::end(
                    metrics,
                    Direction::Outbound,
                    log,
                    End::empty(200, "error", Some(&e)),
                );
                return;
            }
            let recv = std::future::ready(Ok(t.recv));
            let carried = Carried::default();
            carried.status.store(200, Ordering::Relaxed);
            let _ = carried.set_up.set(Instant::now());
            metrics.stream_set_up(Direction::Outbound, began.elapsed());
            let app = AppConn::new(app);
            carry(app, t.send, recv, t.lease, first, metrics, &carried, log).await;
        }
        Err(e) => {
            if !matches!(e, OpenError::Refused(..)) {
                tracing::warn!(destination = %route.destination, error = %e, "outbound tunnel not opened");
            }
            let status = failure_status(&e);
            let _ = reply(&mut app, &status, Some(&e.to_string())).await;
            AppConn::new(app).close_answered().await;
            StreamLog::end(metrics, Direction::Outbound, log, not_opened(&e));
        }
    }
}

/// What an HTTP CONNECT client is answered when its tunnel was not opened:
/// the peer's refusal as it is (a 4xx or 5xx: any 2xx would tell the client
/// its tunnel is open, a 407 to authenticate to this proxy); 503 while this
/// proxy has no usable SVID (its own state, for now); 504 when the
/// destination did not answer in time; else 502.
fn failure_status(e: &OpenError) -> String {
    match e {
        OpenError::Refused(status, _)
            if (status.is_client_error() || status.is_server_error())
                && *status != http::StatusCode::PROXY_AUTHENTICATION_REQUIRED =>
        {
            status.to_string()
        }
        OpenError::NoIdentity => "503 Service Unavailable".to_owned(),
        e if e.timed_out() => "504 Gateway Timeout".to_owned(),
        _ => "502 Bad Gateway".to_owned(),
    }
}

/// Whether a request head's method is `CONNECT`, and its target (empty
/// lines before the request line skipped, as RFC 9112 §2.2 asks).
fn request_line(head: &[u8]) -> (bool, String) {
    let text = String::from_utf8_lossy(head);
    let line = text.lines().find(|l| !l.trim().is_empty());
    let mut parts = line.unwrap_or_default().split_whitespace();
    let method = parts.next().unwrap_or("");
    (method == "CONNECT", parts.next().unwrap_or("").to_owned())
}

/// A `CONNECT` target as routes are looked up by: `host:port`
/// (authority-form), its host in lower case (names are not case
/// sensitive); `None` for anything else.
fn authority(target: &str) -> Option<String> {
    let (host, port) = target.rsplit_once(':')?;
    let bracketed = host.starts_with('[') && host.ends_with(']');
    let plain = !host.is_empty() && !host.contains([':', '/', '@', '[', ']', '?', '#']);
    if port.parse::<u16>().is_err() || !(plain || bracketed) {
        return None;
    }
    Some(format!("{}:{port}", host.to_ascii_lowercase()))
}

/// Where a request head ends: after its first empty line, lines ending in
/// CRLF or a bare LF (RFC 9112 §2.2), empty lines before the request line
/// skipped; `None` until all of it is in.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let start = buf.iter().position(|b| !matches!(b, b'\r' | b'\n'))?;
    let mut line = start;
    for (i, b) in buf.iter().enumerate().skip(start) {
        if *b == b'\n' {
            if matches!(&buf[line..i], b"" | b"\r") {
                return Some(i + 1);
            }
            line = i + 1;
        }
    }
    None
}

/// Answers an HTTP CONNECT client with this proxy's own refusal (`status`:
/// its code, reason and any further header lines) saying `why`, and ends
/// the stream's access line with that code and `outcome`.
async fn refuse(
    mut app: TcpStream,
    metrics: &Metrics,
    log: Option<Box<StreamLog>>,
    status: &str,
    outcome: &'static str,
    why: &'static str,
) {
    let _ = reply(&mut app, status, Some(why)).await;
    AppConn::new(app).close_answered().await;
    let code = status.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
    StreamLog::end(
        metrics,
        Direction::Outbound,
        log,
        End::empty(code, outcome, Some(&why)),
    );
}

/// Answers an HTTP CONNECT client. An answer other than 200 (this proxy's
/// own, or the peer proxy's refusal passed on) has no body, ends the
/// connection, and says why in a `ward-proxy-error` header, as Linkerd's
/// proxies do with `l5d-proxy-error`.
async fn reply(app: &mut TcpStream, status: &str, error: Option<&str>) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\n");
    if !status.starts_with("200") {
        head.push_str("Content-Length: 0\r\nConnection: close\r\n");
    }
    if let Some(why) = error {
        // One line of printable text.
        let why: String = why
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    ' '
                }
            })
            .take(256)
            .collect();
        head.push_str(&format!("ward-proxy-error: {why}\r\n"));
    }
    head.push_str("\r\n");
    app.write_all(head.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::{answered, authority, failure_status, find_head_end, request_line, RoutesByTarget};
    use crate::config::Route;
    use crate::pool::OpenError;
    use std::sync::Arc;

    /// A CONNECT names a route by its target or its destination; when two
    /// routes name the same, the first listed takes it.
    #[test]
    fn a_connect_target_finds_the_first_route_that_names_it() {
        let id = "id=spiffe://example.org/api";
        let routes: Vec<Arc<Route>> = [
            format!("destination=10.0.0.2:15008,{id},target=api:8080"),
            format!("destination=10.0.0.3:15008,{id},target=10.0.0.2:15008"),
            format!("destination=10.0.0.4:15008,{id},target=api:8080"),
        ]
        .iter()
        .map(|f| Arc::new(Route::parse_flag(f).unwrap()))
        .collect();
        let by = RoutesByTarget::new(&routes);
        let found = |t: &str| by.get(t).map(|r| r.destination.as_str());
        assert_eq!(found("api:8080"), Some("10.0.0.2:15008"));
        assert_eq!(found("10.0.0.2:15008"), Some("10.0.0.2:15008"));
        assert_eq!(found("10.0.0.3:15008"), Some("10.0.0.3:15008"));
        assert_eq!(found("10.0.0.4:15008"), Some("10.0.0.4:15008"));
        assert_eq!(found("db:5432"), None);
        // (Host names as `authority` gives them: in lower case.)
        assert_eq!(
            authority("API:8080").as_deref().and_then(found),
            Some("10.0.0.2:15008")
        );
    }

    /// An HTTP CONNECT client whose tunnel was not opened is answered the
    /// peer's refusal (a 4xx or 5xx other than 407), 503 while this proxy has no usable SVID, 504 when
    /// the destination did not answer in time, else 502.
    #[test]
    fn a_tunnel_not_opened_is_answered_as_why() {
        let io = |kind| std::io::Error::new(kind, "x");
        let refused = OpenError::Refused(http::StatusCode::FORBIDDEN, "denied");
        assert_eq!(failure_status(&refused), "403 Forbidden");
        assert_eq!(
            failure_status(&OpenError::NoIdentity),
            "503 Service Unavailable"
        );
        let slow = OpenError::Connect("a:1".into(), io(std::io::ErrorKind::TimedOut));
        assert_eq!(failure_status(&slow), "504 Gateway Timeout");
        let closed = OpenError::Connect("a:1".into(), io(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(failure_status(&closed), "502 Bad Gateway");
        // A peer's answer that would mean something else to the client.
        for odd in [204, 302, 407] {
            let status = http::StatusCode::from_u16(odd).unwrap();
            let answered = OpenError::Refused(status, "odd");
            assert_eq!(failure_status(&answered), "502 Bad Gateway", "{odd}");
        }
    }

    /// A request head ends at its first empty line, whether lines end in
    /// CRLF or a bare LF; empty lines before the request line are skipped
    /// (RFC 9112 §2.2).
    #[test]
    fn a_request_head_ends_at_its_first_empty_line() {
        let crlf = b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(find_head_end(crlf), Some(crlf.len() - 4));
        let lf = b"CONNECT a:1 HTTP/1.1\nHost: a\n\nbody";
        assert_eq!(find_head_end(lf), Some(lf.len() - 4));
        let leading = b"\r\n\r\nCONNECT a:1 HTTP/1.1\r\n\r\n";
        assert_eq!(find_head_end(leading), Some(leading.len()));
        assert_eq!(request_line(leading), (true, "a:1".to_owned()));
        assert_eq!(find_head_end(b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(find_head_end(b"\r\n\r\n"), None);
        assert!(!request_line(b"GET http://a/ HTTP/1.1\r\n\r\n").0);
    }

    /// A `CONNECT` target is `host:port`, its host in lower case; anything
    /// else (absolute-form, no port, a path) is not one.
    #[test]
    fn a_connect_target_is_host_and_port() {
        assert_eq!(authority("Api.Acme:8080").as_deref(), Some("api.acme:8080"));
        assert_eq!(
            authority("10.0.0.2:15008").as_deref(),
            Some("10.0.0.2:15008")
        );
        assert_eq!(authority("[::1]:15008").as_deref(), Some("[::1]:15008"));
        for bad in [
            "http://api:8080",
            "api",
            "api:",
            ":80",
            "api:http",
            "a/b:80",
            "::1:80",
            "HTTP/1.1",
            "",
        ] {
            assert_eq!(authority(bad), None, "{bad}");
        }
    }

    /// A peer's 403 is a denial only when the peer says its policy denied
    /// the stream (it answers 403 too when it no longer trusts this proxy's
    /// certificate); 502 and 504 say its application is out of reach.
    #[test]
    fn a_peers_answer_says_how_the_stream_ended() {
        assert_eq!(answered(403, "denied"), "denied");
        assert_eq!(answered(403, "untrusted"), "refused");
        assert_eq!(answered(403, "expired"), "refused");
        assert_eq!(answered(403, ""), "refused");
        assert_eq!(answered(502, "unreachable"), "unreachable");
        assert_eq!(answered(504, ""), "unreachable");
        assert_eq!(answered(503, "error"), "refused");
        assert_eq!(answered(405, "error"), "refused");
    }
}
