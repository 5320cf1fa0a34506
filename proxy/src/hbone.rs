//! HBONE: TCP streams tunneled as HTTP/2 `CONNECT` requests over mutual TLS 1.3.
//!
//! The settings both ends use, and the names the metrics give to handshake
//! failures.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, UnixTime};
use ward_spec::tls::RootStore;

pub use crate::bufio::Traffic;

/// The response header in which a proxy says why it did not answer 200
/// (its access log's outcome: `denied`, `untrusted`, …; to HTTP CONNECT
/// clients, a sentence), as Linkerd's `l5d-proxy-error`.
pub const ERROR_HEADER: &str = "ward-proxy-error";

/// Stream flow-control window: large enough that one stream fills a fast link.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Connection flow-control window for a connection of up to `max_streams`
/// streams: room for every stream's window, so that a stream whose
/// application stops reading holds up only itself. (A shared window with room
/// for four streams' windows let four such streams stop every other stream on
/// the connection, where one stalled TCP connection never stops another.) What
/// a connection may hold unread stays bounded by its streams' windows; past
/// 511 streams a connection, HTTP/2's largest window is the bound.
pub fn connection_window(max_streams: u32) -> u32 {
    const LARGEST: u32 = (1 << 31) - 1;
    STREAM_WINDOW.saturating_mul(max_streams).min(LARGEST)
}
/// Largest HTTP/2 frame we accept. A bulk stream's DATA frames carry one
/// read from the application each (`pump`'s 256 KiB): fewer, larger frames
/// and socket writes. Against 64 KiB frames a tunneled stream went from
/// 10.5 to 11.4 Gbit/s (held bench tunnels side by side, BENCHMARKS.md).
pub const MAX_FRAME: u32 = 256 * 1024;
/// Framing overhead of small DATA frames a connection may hold unread (h2
/// closes a connection whose peer sends more: a flood of tiny frames costs
/// memory beyond the bytes the windows count). What h2 derives from a 16 MiB
/// connection window; it would grow with the larger windows above.
pub const DATA_FRAME_BUDGET: usize = 8 * 1024 * 1024;
/// Unsent TLS bytes rustls may hold for one connection. tokio-rustls hands
/// what rustls holds to the socket after every write, and rustls takes in
/// plaintext only up to this limit: at rustls's default (64 KiB) a frame
/// and its header took at least two `writev`s, with 1 MiB one.
pub const TLS_BUFFER: usize = 1024 * 1024;
/// Largest amount h2 buffers for one stream before the writer must wait.
pub const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Largest header list (decoded) either end takes: a `CONNECT` and its
/// answer need a few hundred bytes. h2's default, 16 MiB, let any peer that
/// completes a handshake (a denied one included) make the connection hold
/// megabytes of an unfinished header block.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

/// The certificates a peer presented, and when they were verified: kept
/// with its connection, so that when the roots change the peer is verified
/// again, as of its handshake (whether its trust anchors are still trusted,
/// not whether it has expired since: a connection outlives its peer's
/// rotations). Once its leaf, or a certificate it was sent with, expires
/// the connection takes no new streams; its open ones go on.
pub struct PeerChain {
    certs: Vec<CertificateDer<'static>>,
    verified_at: UnixTime,
    expires_at: i64,
}

impl PeerChain {
    /// The chain a handshake just verified.
    pub fn new(certs: Option<&[CertificateDer<'_>]>) -> Self {
        let certs: Vec<_> = certs
            .unwrap_or_default()
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        // The first expiry among them: Ward's CA never issues a leaf that
        // outlives its signers, another trust domain's may. (A certificate
        // sent but not on the verified path counts too, which can only
        // close the connection sooner; one that does not parse counts as
        // expired.)
        let expires_at = certs
            .iter()
            .map(|c| ward_spec::svid::validity(c).map_or(i64::MIN, |(_, not_after)| not_after))
            .min()
            .unwrap_or(i64::MIN);
        PeerChain {
            certs,
            verified_at: UnixTime::now(),
            expires_at,
        }
    }

    /// Unix seconds: the last second its leaf certificate (and each one it
    /// came with) is valid.
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }

    /// Whether its leaf certificate, or one it came with, has expired.
    pub fn expired(&self) -> bool {
        crate::identity::unix_now() > self.expires_at
    }

    /// Verifies a client's chain (we accepted the connection).
    pub fn verify_client(&self, roots: &RootStore) -> Result<(), rustls::Error> {
        roots
            .verify_client_chain(&self.certs, self.verified_at)
            .map(|_| ())
    }

    /// Verifies a server's chain (we made the connection).
    pub fn verify_server(&self, roots: &RootStore) -> Result<(), rustls::Error> {
        roots
            .verify_server_chain(&self.certs, self.verified_at)
            .map(|_| ())
    }
}

/// Sets up a socket to or from an application: no Nagle delay, no pacing
/// on loopback, and TCP keepalive (a stream has no idle timeout of its own:
/// an application on another host that went away is found out within
/// about a minute, and its stream freed).
pub fn app_socket(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    unpaced_on_loopback(tcp);
    keepalive(tcp);
}

/// Sets up a tunnel's socket (between proxies): as an application's, plus
/// a user timeout and a bound on what the kernel holds unsent.
pub fn tunnel_socket(tcp: &tokio::net::TcpStream) {
    app_socket(tcp);
    let sock = socket2::SockRef::from(tcp);
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::debug!(error = %e, "cannot set the TCP user timeout");
    }
    if let Err(e) = sock.set_tcp_notsent_lowat(UNSENT_IN_KERNEL) {
        tracing::debug!(error = %e, "cannot bound the unsent bytes");
    }
}

/// The most a tunnel's socket takes before its bytes go out
/// (`TCP_NOTSENT_LOWAT`); the rest waits in the proxy. Left to itself the
/// kernel takes megabytes, which on a slow link hold a PING back for
/// seconds and hide from the proxy whether its bytes still move (see
/// [`CloseGrace`]). A quarter of a millisecond at 10 Gbit/s: no cost to
/// a fast link (`BENCHMARKS.md`).
const UNSENT_IN_KERNEL: u32 = 256 * 1024;

/// A connection to a peer on this host (a loopback address) gets a
/// congestion control that does not pace. With BBR as the system's choice,
/// TCP paces every send on a timer (loopback has no queueing discipline to
/// do it), which on loopback only costs CPU: there is no network to share.
/// In this project's benchmark (BBR system-wide) it took a tunneled stream
/// from 9.2 to 10.9 Gbit/s. Other congestion controls, and peers elsewhere,
/// keep what the operator chose.
fn unpaced_on_loopback(tcp: &tokio::net::TcpStream) {
    let Ok(peer) = tcp.peer_addr() else { return };
    let sock = socket2::SockRef::from(tcp);
    let Ok(congestion) = sock.tcp_congestion() else {
        return;
    };
    if paces_on_loopback(peer.ip(), &congestion) {
        if let Err(e) = sock
            .set_tcp_congestion(b"cubic")
            .or_else(|_| sock.set_tcp_congestion(b"reno"))
        {
            tracing::debug!(error = %e, "cannot change the congestion control");
        }
    }
}

/// Whether a connection to `peer` under the congestion control named
/// `congestion` (as the kernel reports it, NUL-padded) would be paced for
/// nothing: BBR to a loopback peer.
fn paces_on_loopback(peer: std::net::IpAddr, congestion: &[u8]) -> bool {
    peer.to_canonical().is_loopback() && congestion.starts_with(b"bbr")
}

/// TCP keepalive: a peer whose node went away (no FIN, no RST) is found
/// out within about a minute (30 s idle, then 3 probes 10 s apart), and its
/// streams, sockets and pool slot are freed. Keepalive probes are sent only
/// while nothing sent is unacknowledged; on a tunnel's socket the user
/// timeout covers the other case (data sent and never acknowledged: without
/// it the kernel retransmits for about 15 minutes). An application's has
/// none: one that stops reading for a while is not cut off.
fn keepalive(tcp: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// How long data sent on a tunnel's socket may go unacknowledged before the
/// connection is given up: as long as keepalive takes to give up an idle one.
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a connection told to close (GOAWAY) may go without its bytes
/// reaching the peer once it has no streams: a peer that never answers,
/// or stops reading, is cut off then. One still taking the last bytes over a slow link is not
/// (see [`CloseGrace`]): what was acknowledged to the application is
/// delivered.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// More bytes than a connection's control frames (a PING and its answer
/// are under 100 bytes each in TLS records): a connection that moved more
/// in a wait is carrying data, so its peer is alive, however late its
/// answer (a PING queued behind megabytes on a slow link).
const SIGN_OF_LIFE: u64 = 1024;

/// How long bytes delivered, with none from the peer, keep a connection
/// that looks dead going (a PING's wait, a closing connection's grace).
/// A peer's kernel acknowledges bytes its process never reads (what fits
/// in its receive buffer, or a relay's), so this bounds how long a frozen
/// peer can look alive, or a closing one stay open.
pub const UNCONFIRMED_PATIENCE: Duration = Duration::from_secs(120);

/// Whether the peer sent more than control frames since `read_before`
/// (its [`Traffic::read`] then).
pub fn heard_since(traffic: &Traffic, read_before: u64) -> bool {
    traffic.read().wrapping_sub(read_before) > SIGN_OF_LIFE
}

/// Waits for a peer's `answer` (to a `CONNECT`) up to `wait`, and on for
/// as long as the peer sends more than control frames in each `wait`, up
/// to [`UNCONFIRMED_PATIENCE`]: on a slow link the answer queues behind
/// what the peer sends on other streams. None if it did not come.
pub async fn answer_within<F: std::future::Future>(
    wait: Duration,
    traffic: &Traffic,
    answer: F,
) -> Option<F::Output> {
    let began = tokio::time::Instant::now();
    let mut read = traffic.read();
    wait_while(wait, answer, || {
        let alive = heard_since(traffic, read) && began.elapsed() < UNCONFIRMED_PATIENCE;
        read = traffic.read();
        alive
    })
    .await
}

/// Waits for `answer` up to `wait`, and another `wait` each time `alive`
/// says so when one has passed: None if it did not come.
async fn wait_while<F: std::future::Future>(
    wait: Duration,
    answer: F,
    mut alive: impl FnMut() -> bool,
) -> Option<F::Output> {
    tokio::pin!(answer);
    loop {
        match tokio::time::timeout(wait, &mut answer).await {
            Ok(r) => return Some(r),
            Err(_) if alive() => {}
            Err(_) => return None,
        }
    }
}

/// The close grace of a connection told to close (see [`CLOSE_GRACE`]):
/// it runs out once no more than control frames of this end's have
/// reached the peer for that long ([`Traffic::delivered`]), or
/// [`UNCONFIRMED_PATIENCE`] after it began. Only this end's bytes count:
/// the end of the data is what it waits for, and what the peer sends (a
/// PING every second) does not keep it open.
pub struct CloseGrace {
    traffic: Traffic,
    delivered: u64,
    quiet_since: tokio::time::Instant,
    began: tokio::time::Instant,
}

/// How often a closing connection's traffic is looked at.
const GRACE_CHECK: Duration = Duration::from_secs(1);

impl CloseGrace {
    /// The grace from now; `timer` is set to its first look at the traffic.
    pub fn start(traffic: &Traffic, timer: std::pin::Pin<&mut tokio::time::Sleep>) -> CloseGrace {
        let now = tokio::time::Instant::now();
        timer.reset(now + GRACE_CHECK);
        CloseGrace {
            traffic: traffic.clone(),
            delivered: traffic.delivered(),
            quiet_since: now,
            began: now,
        }
    }

    /// When to look again; None once the grace has run out.
    pub fn next_check(&mut self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let delivered = self.traffic.delivered();
        if delivered - self.delivered > SIGN_OF_LIFE {
            self.delivered = delivered;
            self.quiet_since = now;
        }
        let quiet = now - self.quiet_since;
        (quiet < CLOSE_GRACE && now - self.began < UNCONFIRMED_PATIENCE)
            .then(|| now + GRACE_CHECK.min(CLOSE_GRACE - quiet))
    }
}

/// HTTP/2 PINGs on a connection that carries streams (both ends send
/// them): a peer that stops answering (its process frozen, or its host
/// gone while something between still acknowledges TCP, which TCP
/// keepalive then takes for alive) is found out, and its connection closed
/// with its streams, instead of holding them, their applications'
/// connections and the drain for good. A connection without streams is
/// left to the idle timeout. An answer late on a connection still moving
/// data is waited for (see [`ping_answered`]): on a slow link a PING
/// queues behind what was sent before it, and its answer behind what the
/// peer sends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Keepalive {
    /// How often a PING is sent while the connection carries streams.
    pub interval: Duration,
    /// How long the peer has to answer it, unless data still moves.
    pub timeout: Duration,
}

/// A connection's PINGs: h2 lets one be in flight at a time.
pub type Pinger = Arc<tokio::sync::Mutex<Option<h2::PingPong>>>;

/// Resolves when the peer has left a PING unanswered (see
/// [`ping_answered`]). One is sent every interval while `busy` gives the
/// connection's pinger (it does while the connection carries streams);
/// while it gives none, `until_busy` is waited for (an idle connection has
/// no timer running). Pending for good once the connection fails otherwise
/// (its own future then ends it).
pub async fn unanswered_ping<B: std::future::Future<Output = ()>>(
    keepalive: Keepalive,
    traffic: Traffic,
    mut busy: impl FnMut() -> Option<Pinger>,
    mut until_busy: impl FnMut() -> B,
) {
    loop {
        if busy().is_none() {
            until_busy().await;
            continue;
        }
        tokio::time::sleep(keepalive.interval).await;
        let Some(pinger) = busy() else { continue };
        let mut ping = pinger.lock().await;
        let Some(p) = ping.as_mut() else {
            return std::future::pending().await;
        };
        match ping_answered(p, keepalive.timeout, &traffic).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => return std::future::pending().await,
        }
    }
}

/// Sends a PING and waits up to `timeout` for its answer: whether it came.
/// A PING still out from a wait given up before (h2 takes one at a time)
/// is waited for first, within the same time. A `timeout` in which the
/// peer sent more than control frames is followed by another, and so is
/// one in which the kernel took more than those from this end, for up to
/// [`UNCONFIRMED_PATIENCE`]. An error: the connection has failed.
pub async fn ping_answered(
    p: &mut h2::PingPong,
    timeout: Duration,
    traffic: &Traffic,
) -> Result<bool, h2::Error> {
    let began = tokio::time::Instant::now();
    let (mut read, mut delivered) = (traffic.read(), traffic.delivered());
    let exchange = async {
        if p.send_ping(h2::Ping::opaque()).is_err() {
            std::future::poll_fn(|cx| p.poll_pong(cx)).await?;
            p.send_ping(h2::Ping::opaque())?;
        }
        std::future::poll_fn(|cx| p.poll_pong(cx)).await.map(drop)
    };
    let answered = wait_while(timeout, exchange, || {
        let heard = heard_since(traffic, read);
        let moving = traffic.delivered() - delivered > SIGN_OF_LIFE
            && began.elapsed() < UNCONFIRMED_PATIENCE;
        (read, delivered) = (traffic.read(), traffic.delivered());
        heard || moving
    });
    match answered.await {
        Some(Ok(())) => Ok(true),
        Some(Err(e)) => Err(e),
        None => Ok(false),
    }
}

pub fn server_builder(max_streams: u32) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window(max_streams))
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(max_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .data_frame_budget(DATA_FRAME_BUDGET);
    b
}

/// A client's streams wait for the peer's settings (h2 counts the streams the
/// peer takes as none until they arrive): the pool then knows how many
/// streams a connection may carry (at most `max_streams`).
pub fn client_builder(max_streams: u32) -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_max_send_streams(0)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window(max_streams))
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .data_frame_budget(DATA_FRAME_BUDGET)
        // A proxy never accepts pushed streams.
        .enable_push(false);
    b
}

/// A TLS session that did not agree on ALPN `h2` (a peer that offered no
/// ALPN at all, which rustls lets through) is refused as incompatible.
pub fn require_h2(session: &rustls::CommonState) -> io::Result<()> {
    match session.alpn_protocol() {
        Some(b"h2") => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::NoApplicationProtocol,
        )),
    }
}

/// A short name for why a TLS handshake failed (a metric label).
pub fn handshake_failure_reason(e: &io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    if e.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return match e.kind() {
            io::ErrorKind::InvalidData => "not_tls",
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => "closed",
            _ => "io",
        };
    };
    match tls {
        E::InvalidCertificate(C::Expired) | E::InvalidCertificate(C::ExpiredContext { .. }) => {
            "expired"
        }
        E::InvalidCertificate(C::UnknownIssuer) => "unknown_issuer",
        E::InvalidCertificate(C::Other(o)) => {
            // Ward's verifiers say which SPIFFE rule the peer broke.
            let msg = o.to_string();
            if msg.contains("is not in trust domain") {
                "foreign_trust_domain"
            } else if msg.contains("expected one of") {
                "unexpected_id"
            } else {
                "not_an_svid"
            }
        }
        E::InvalidCertificate(_) => "bad_certificate",
        E::NoCertificatesPresented => "no_certificate",
        E::InvalidMessage(_) => "not_tls",
        E::AlertReceived(_) => "alert_received",
        E::PeerIncompatible(_) | E::NoApplicationProtocol => "incompatible",
        _ => "tls",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::net::{TcpListener, TcpStream};

    /// A peer's chain expires with the first of its certificates: a
    /// valid leaf sent with an expired intermediate (another trust
    /// domain's CA may issue leaves that outlive their signers) is expired.
    #[test]
    fn a_chain_expires_with_its_first_certificate_to_expire() {
        use ward_spec::test_util::{expired_leaf_and_key, leaf_and_key, root};
        let (_, issuer) = root("example.org");
        let id = "spiffe://example.org/tenant/acme/ns/prod/sa/web";
        let (leaf, _) = leaf_and_key(id, &issuer);
        let (lapsed, _) = expired_leaf_and_key(id, &issuer);
        let alone = PeerChain::new(Some(std::slice::from_ref(&leaf)));
        assert!(!alone.expired());
        let (_, leaf_end) = ward_spec::svid::validity(&leaf).unwrap();
        assert_eq!(alone.expires_at(), leaf_end);
        let with_lapsed = PeerChain::new(Some(&[leaf, lapsed.clone()]));
        assert!(with_lapsed.expired());
        let (_, lapsed_end) = ward_spec::svid::validity(&lapsed).unwrap();
        assert_eq!(with_lapsed.expires_at(), lapsed_end);
        assert!(PeerChain::new(None).expired());
    }

    async fn loopback_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn congestion(tcp: &TcpStream) -> Vec<u8> {
        let mut cc = socket2::SockRef::from(tcp).tcp_congestion().unwrap();
        cc.retain(|b| *b != 0);
        cc
    }

    #[tokio::test]
    async fn loopback_connections_under_bbr_move_to_cubic_and_others_keep_theirs() {
        let (client, server) = loopback_pair().await;
        for tcp in [&client, &server] {
            socket2::SockRef::from(tcp)
                .set_tcp_congestion(b"bbr")
                .expect("bbr is in net.ipv4.tcp_available_congestion_control");
            unpaced_on_loopback(tcp);
            assert_eq!(congestion(tcp), b"cubic");
        }
        let (reno, _server) = loopback_pair().await;
        socket2::SockRef::from(&reno)
            .set_tcp_congestion(b"reno")
            .unwrap();
        unpaced_on_loopback(&reno);
        assert_eq!(congestion(&reno), b"reno");
    }

    /// A tunnel's socket gives up a peer that stops acknowledging, whether
    /// idle (keepalive) or with data in flight (user timeout).
    #[tokio::test]
    async fn tunnel_sockets_give_up_a_silent_peer_within_a_minute() {
        let (client, _server) = loopback_pair().await;
        tunnel_socket(&client);
        let sock = socket2::SockRef::from(&client);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert!(USER_TIMEOUT <= Duration::from_secs(60));
        // An application's socket: keepalive, and no user timeout.
        let (app, _other) = loopback_pair().await;
        app_socket(&app);
        let sock = socket2::SockRef::from(&app);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
        assert_eq!(sock.tcp_user_timeout().unwrap(), None);
    }

    #[test]
    fn only_bbr_to_a_loopback_peer_counts_as_paced_on_loopback() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(paces_on_loopback(ip("127.0.0.1"), b"bbr\0\0"));
        assert!(paces_on_loopback(ip("::1"), b"bbr"));
        assert!(paces_on_loopback(ip("::ffff:127.0.0.2"), b"bbr"));
        assert!(!paces_on_loopback(ip("10.0.0.7"), b"bbr"));
        assert!(!paces_on_loopback(ip("fd00::7"), b"bbr"));
        assert!(!paces_on_loopback(ip("127.0.0.1"), b"cubic"));
    }

    /// Small DATA frames that arrive for streams this end has already
    /// dropped (a refused stream whose client sent on, as a route's early
    /// bytes do) are thrown away, and do not use up the connection's
    /// small-frame budget (the vendored h2's patch: upstream charges them
    /// and never gives the budget back, and the connection, with every
    /// stream on it, is closed once enough have come).
    #[tokio::test]
    async fn small_frames_for_dropped_streams_do_not_use_up_the_connection() {
        const BUDGET: usize = 16 * 1024;
        const STREAMS: usize = 12;
        const FRAMES: usize = 10;
        // More than the budget, were each thrown-away frame charged.
        const { assert!(STREAMS * FRAMES * 255 > BUDGET) };
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (dropped_tx, mut dropped_rx) = tokio::sync::mpsc::channel::<()>(1);
        let (sent_tx, mut sent_rx) = tokio::sync::mpsc::channel::<()>(1);
        let server = tokio::spawn(async move {
            let mut b = server_builder(100);
            b.data_frame_budget(BUDGET);
            let mut conn = b.handshake::<_, Bytes>(server_io).await.unwrap();
            for _ in 0..STREAMS {
                // Accepted and dropped unanswered (h2 resets it, once the
                // connection is next polled); the client then sends on it.
                let (req, respond) = conn.accept().await.unwrap().unwrap();
                drop((req, respond));
                dropped_tx.send(()).await.unwrap();
                sent_rx.recv().await.unwrap();
            }
            // The connection still takes a stream, and its bytes.
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            respond
                .send_response(http::Response::new(()), true)
                .unwrap();
            let mut body = req.into_body();
            let got = body.data().await.unwrap().unwrap();
            assert_eq!(&got[..], b"still here");
        });
        let (mut client, conn) = client_builder(100)
            .handshake::<_, Bytes>(client_io)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let connect = || {
            http::Request::builder()
                .method(http::Method::CONNECT)
                .uri("127.0.0.1:9")
                .body(())
                .unwrap()
        };
        for _ in 0..STREAMS {
            client = client.ready().await.unwrap();
            let (_response, mut send) = client.send_request(connect(), false).unwrap();
            dropped_rx.recv().await.unwrap();
            for _ in 0..FRAMES {
                send.send_data(Bytes::from_static(b"x"), false).unwrap();
            }
            // Written out before the server reads on.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            sent_tx.send(()).await.unwrap();
        }
        client = client.ready().await.unwrap();
        let (response, mut send) = client.send_request(connect(), false).unwrap();
        send.send_data(Bytes::from_static(b"still here"), false)
            .unwrap();
        let response = tokio::time::timeout(std::time::Duration::from_secs(10), response)
            .await
            .expect("no answer")
            .expect("the connection was closed");
        assert_eq!(response.status(), http::StatusCode::OK);
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        assert!(!conn.is_finished());
    }

    /// The PINGs of a client connection to a server that does not poll its
    /// connection (so answers nothing) until told to go on, and the
    /// connection's handle (without one it would close).
    async fn ping_a_paused_peer() -> (
        h2::PingPong,
        tokio::sync::oneshot::Sender<()>,
        h2::client::SendRequest<Bytes>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut conn = server_builder(10)
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            let _ = go.await;
            std::future::poll_fn(|cx| conn.poll_closed(cx)).await
        });
        let (client, mut conn) = client_builder(10)
            .handshake::<_, Bytes>(client_io)
            .await
            .unwrap();
        let ping = conn.ping_pong().unwrap();
        tokio::spawn(conn);
        (ping, go_tx, client)
    }

    /// A PING whose wait was given up (here: the peer did not poll its
    /// connection) is still out; the next check waits for its answer and
    /// sends a new one, instead of failing because h2 takes one at a time
    /// (which would turn the keepalive off for the connection's life).
    #[tokio::test]
    async fn a_ping_given_up_does_not_stop_the_next() {
        let (mut ping, go_tx, _client) = ping_a_paused_peer().await;
        let short = std::time::Duration::from_millis(200);
        let still = Traffic::default();
        assert!(!ping_answered(&mut ping, short, &still).await.unwrap());
        go_tx.send(()).unwrap();
        let long = std::time::Duration::from_secs(5);
        assert!(ping_answered(&mut ping, long, &still).await.unwrap());
        assert!(ping_answered(&mut ping, long, &still).await.unwrap());
    }

    /// A PING answered late (here: after 3 s, against a timeout of 1 s)
    /// on a connection over which the peer still sends data (a slow link)
    /// counts as answered, and so does one over which this end still
    /// writes; the same wait with only control frames moving does not.
    #[tokio::test]
    async fn a_late_answer_on_a_connection_moving_data_is_waited_for() {
        #[derive(Clone, Copy)]
        enum Moving {
            Read,
            Written,
            ControlFramesOnly,
        }
        async fn answered_after_3_s(moving: Moving) -> bool {
            let (mut ping, go_tx, _client) = ping_a_paused_peer().await;
            let traffic = Traffic::default();
            let counted = traffic.clone();
            // Moves every 100 ms for as long as the wait lasts.
            let mover = tokio::spawn(async move {
                let began = tokio::time::Instant::now();
                let mut go_tx = Some(go_tx);
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    match moving {
                        Moving::Read => counted.add_read(2048),
                        Moving::Written => counted.add_written(2048),
                        Moving::ControlFramesOnly => {
                            counted.add_read(30);
                            counted.add_written(30);
                        }
                    }
                    if began.elapsed() >= std::time::Duration::from_secs(3) {
                        if let Some(go) = go_tx.take() {
                            let _ = go.send(());
                        }
                    }
                }
            });
            let timeout = std::time::Duration::from_secs(1);
            let answered = ping_answered(&mut ping, timeout, &traffic).await.unwrap();
            mover.abort();
            answered
        }
        assert!(answered_after_3_s(Moving::Read).await);
        assert!(answered_after_3_s(Moving::Written).await);
        assert!(!answered_after_3_s(Moving::ControlFramesOnly).await);
    }

    /// Empty DATA frames on streams this end has dropped still count toward
    /// h2's limit on empty frames (100 over a connection's life): past it
    /// the connection is closed (ENHANCE_YOUR_CALM), as it is for a live
    /// stream.
    #[tokio::test]
    async fn empty_frames_for_dropped_streams_still_count() {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (dropped_tx, mut dropped_rx) = tokio::sync::mpsc::channel::<()>(1);
        let (sent_tx, mut sent_rx) = tokio::sync::mpsc::channel::<()>(1);
        let server = tokio::spawn(async move {
            let mut conn = server_builder(100)
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            for _ in 0..3 {
                let Some(Ok((req, respond))) = conn.accept().await else {
                    return false;
                };
                drop((req, respond));
                dropped_tx.send(()).await.unwrap();
                sent_rx.recv().await.unwrap();
            }
            // The frames are read here: the connection ends in an error.
            matches!(conn.accept().await, Some(Err(_)) | None)
        });
        let (mut client, conn) = client_builder(100)
            .handshake::<_, Bytes>(client_io)
            .await
            .unwrap();
        tokio::spawn(conn);
        for _ in 0..3 {
            client = client.ready().await.unwrap();
            let req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri("127.0.0.1:9")
                .body(())
                .unwrap();
            let (_response, mut send) = client.send_request(req, false).unwrap();
            dropped_rx.recv().await.unwrap();
            for _ in 0..40 {
                let _ = send.send_data(Bytes::new(), false);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            sent_tx.send(()).await.unwrap();
        }
        let closed = tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("the connection was kept")
            .unwrap();
        assert!(closed, "a stream went on past the limit");
    }
}
