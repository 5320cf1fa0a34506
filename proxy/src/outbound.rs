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
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::access_log::StreamRecord;
use crate::config::Route;
use crate::metrics::{Direction, Metrics};
use crate::pool::{accepted, Lease, OpenError, PendingTunnel, Pool, Tunnel};
use crate::pump::{pump, Carried};

/// Accepts application connections until `drain` turns true; each is
/// handled by `handle` in a task of its own, with one of `slots` (shared by
/// every outbound listener) to hold until it ends; when none is free a new
/// connection is closed at once. (The slot goes into `handle`'s future: a
/// wrapper future awaiting it would hold that future twice.)
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    mut drain: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut over_limit_logged = false;
    loop {
        let (app, source) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::drained(&mut drain) => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.handshake_failure(Direction::Outbound, "over_connection_limit");
            if !over_limit_logged {
                tracing::warn!(
                    listener = what,
                    "outbound connection limit reached; closing new application connections until some end"
                );
                over_limit_logged = true;
            }
            continue;
        };
        over_limit_logged = false;
        let _ = app.set_nodelay(true);
        tokio::spawn(handle(app, source, slot));
    }
}

/// Serves one route's listener until `drain` turns true.
pub async fn serve_route(
    listener: TcpListener,
    route: Arc<Route>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    drain: watch::Receiver<bool>,
) {
    let m = metrics.clone();
    accept_loop(listener, "outbound route", slots, m, drain, move |app, source, slot| {
        let (route, pool, metrics) = (route.clone(), pool.clone(), metrics.clone());
        async move {
            let _slot = slot;
            let stream = Stream {
                source,
                route: &route,
                started: Instant::now(),
            };
            // Boxed: an open stream's task keeps only what the pump needs.
            let turn = pool.turn(&route.destination).await;
            let started = Box::pin(start(&pool, &route)).await;
            drop(turn);
            let p = match started {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(destination = %route.destination, error = %e, "outbound tunnel not opened");
                    metrics.access(|| stream.record(0, "unreachable", Some(e.to_string()), (0, 0)));
                    // Closing the application's connection is all it learns.
                    return;
                }
            };
            // The application's first bytes go out with the request; what
            // comes back is written to it only once the peer has said 200.
            let carried = Carried::default();
            let response = async {
                let r = p.response.await.map_err(crate::pump::h2_io)?;
                carried.status.store(r.status().as_u16(), Ordering::Relaxed);
                accepted(r).map_err(|e| {
                    tracing::warn!(destination = %route.destination, error = %e, "outbound tunnel refused");
                    std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
                })
            };
            carry(app, p.send, response, p.lease, Bytes::new(), &metrics, &carried, &stream).await;
        }
    })
    .await
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

/// Opens a tunnel for `route` and waits for the peer's answer.
async fn open(pool: &Pool, route: &Route) -> Result<Tunnel, OpenError> {
    let turn = pool.turn(&route.destination).await;
    let p = start(pool, route).await?;
    drop(turn);
    let recv = p
        .response
        .await
        .map_err(|e| OpenError::Http2(route.destination.clone(), e))
        .and_then(accepted)?;
    Ok(Tunnel {
        send: p.send,
        recv,
        lease: p.lease,
    })
}

/// What the access log says of an outbound stream besides how it went.
struct Stream<'a> {
    source: SocketAddr,
    route: &'a Route,
    started: Instant,
}

impl Stream<'_> {
    fn record(
        &self,
        status: u16,
        outcome: &'static str,
        error: Option<String>,
        (to_app, from_app): (u64, u64),
    ) -> StreamRecord<'_> {
        StreamRecord {
            direction: Direction::Outbound,
            source: Some(self.source),
            peer_id: None,
            destination: &self.route.destination,
            target: Some(self.route.target()),
            status,
            outcome,
            error,
            bytes_to_app: to_app,
            bytes_from_app: from_app,
            started: self.started,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn carry(
    app: TcpStream,
    send: h2::SendStream<Bytes>,
    recv: impl std::future::Future<Output = std::io::Result<h2::RecvStream>>,
    lease: Lease,
    first: Bytes,
    metrics: &Metrics,
    carried: &Carried,
    stream: &Stream<'_>,
) {
    metrics.stream_opened(Direction::Outbound);
    let result = pump(app, send, recv, first, carried).await;
    drop(lease);
    metrics.stream_closed(Direction::Outbound);
    let (to_app, from_app) = carried.totals();
    metrics.bytes(Direction::Outbound, to_app, from_app);
    let status = carried.status.load(Ordering::Relaxed);
    let (outcome, error) = match result {
        Ok(()) => ("ok", None),
        Err(e) => {
            tracing::debug!(error = %e, "outbound stream ended with an error");
            let refused = status != 0 && status != 200;
            (
                if refused { "refused" } else { "error" },
                Some(e.to_string()),
            )
        }
    };
    metrics.access(|| stream.record(status, outcome, error, (to_app, from_app)));
}

/// The HTTP CONNECT listener: `CONNECT host:port HTTP/1.1` picks the route.
pub async fn serve_connect(
    listener: TcpListener,
    routes: Arc<Vec<Arc<Route>>>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    drain: watch::Receiver<bool>,
) {
    let m = metrics.clone();
    accept_loop(
        listener,
        "HTTP CONNECT",
        slots,
        m,
        drain,
        move |app, source, slot| {
            let (routes, pool, metrics) = (routes.clone(), pool.clone(), metrics.clone());
            async move {
                let _slot = slot;
                http_connect(app, source, &routes, &pool, &metrics).await
            }
        },
    )
    .await
}

const MAX_HEAD: usize = 8 * 1024;

async fn http_connect(
    mut app: TcpStream,
    source: SocketAddr,
    routes: &[Arc<Route>],
    pool: &Pool,
    metrics: &Metrics,
) {
    let started = Instant::now();
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
            let _ = reply(&mut app, "431 Request Header Fields Too Large").await;
            return;
        }
        Ok(Err(())) | Err(_) => return,
    };
    let head = buf.split_to(head_end);
    let first = buf.freeze();
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "CONNECT" {
        let _ = reply(&mut app, "405 Method Not Allowed").await;
        return;
    }
    let Some(route) = routes
        .iter()
        .find(|r| r.target() == target || r.destination == target)
    else {
        tracing::info!(target, "HTTP CONNECT to a target no route names");
        let _ = reply(&mut app, "403 Forbidden").await;
        return;
    };
    let stream = Stream {
        source,
        route,
        started,
    };
    match open(pool, route).await {
        Ok(t) => {
            if reply(&mut app, "200 Connection established").await.is_ok() {
                let recv = std::future::ready(Ok(t.recv));
                let carried = Carried::default();
                carried.status.store(200, Ordering::Relaxed);
                carry(
                    app, t.send, recv, t.lease, first, metrics, &carried, &stream,
                )
                .await;
            }
        }
        Err(OpenError::Refused(status)) => {
            let _ = reply(&mut app, &status.to_string()).await;
            metrics.access(|| stream.record(status.as_u16(), "refused", None, (0, 0)));
        }
        Err(e) => {
            tracing::warn!(target, error = %e, "outbound tunnel not opened");
            let _ = reply(&mut app, "502 Bad Gateway").await;
            metrics.access(|| stream.record(0, "unreachable", Some(e.to_string()), (0, 0)));
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

async fn reply(app: &mut TcpStream, status: &str) -> std::io::Result<()> {
    app.write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
        .await
}
