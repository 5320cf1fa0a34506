//! Copies bytes between an application's TCP connection and a tunneled
//! HTTP/2 stream, both ways, until both directions have ended.
//!
//! Nothing is buffered while a stream is idle: the TCP side allocates a
//! buffer only once the socket is readable, and the HTTP/2 side hands over the
//! frames h2 already holds. Flow control does the back-pressure: data read
//! from the application waits for stream capacity before it is sent, and
//! received data is released to the peer's window only once it is written to
//! the application. An end of stream becomes a TCP half-close and the other way
//! round; an error on either side resets the stream, and unless the
//! stream's end had reached the application its connection is reset too (a
//! TCP RST, not a FIN, see [`AppConn`]): an application that reads until
//! the end must not take what was cut short for the whole.

use std::future::{poll_fn, Future};
use std::io;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The largest read from the application in one go: one HTTP/2 frame
/// ([`crate::hbone::MAX_FRAME`]).
const READ_CHUNK: usize = crate::hbone::MAX_FRAME as usize;

/// Reads shorter than this that empty the application's socket are copied
/// out of the read buffer before they go to h2. As a slice, each would keep
/// the buffer's whole allocation (`READ_CHUNK`) for as long as h2 holds it,
/// and h2 holds up to [`crate::hbone::MAX_SEND_BUFFER`] for a peer slow to
/// read: small messages would cost 256 KiB each. A longer read fills at
/// least a quarter of its allocation.
const COPY_BELOW: usize = READ_CHUNK / 4;

/// Bytes carried by one stream, counted as they go: a stream that ends in
/// an error, or is cut off, still tells what it carried. `status` is the
/// `CONNECT` answer once known (for the access log) with the peer's
/// `refusal` reason if it was not 200, and `set_up` when the stream was
/// (outbound: when the peer said 200).
#[derive(Debug, Default)]
pub struct Carried {
    pub to_app: AtomicU64,
    pub from_app: AtomicU64,
    pub status: AtomicU16,
    pub set_up: std::sync::OnceLock<std::time::Instant>,
    /// Why the peer did not answer 200, if it said.
    pub refusal: std::sync::OnceLock<&'static str>,
}

impl Carried {
    /// (to the application, from the application).
    pub fn totals(&self) -> (u64, u64) {
        (
            self.to_app.load(Ordering::Relaxed),
            self.from_app.load(Ordering::Relaxed),
        )
    }
}

/// An application's connection, reset (TCP RST, not FIN) when it is closed
/// before the application received the whole stream: whatever cut it short
/// (an error, a revocation, a tunnel refused or never opened, the drain's
/// deadline, the proxy's exit), the application must not take what it got
/// for the whole.
pub struct AppConn {
    /// Present until dropped.
    tcp: Option<TcpStream>,
    /// The application got all it was going to (the stream's end, or an
    /// answer of the proxy's own): closing is an end, not a cut.
    complete: bool,
    /// The application may still be sending what the peer no longer wants
    /// (see [`pump`]): on close, unless it has received the whole answer
    /// and sent nothing unread, what it sends is read and dropped for a
    /// while ([`crate::bufio::close_lingering`]), as a server closes after
    /// an early answer. Closed with bytes arriving unread, the connection
    /// would be reset, and a reset throws away the end of the answer the
    /// kernel still holds for the application.
    still_sending: bool,
}

impl AppConn {
    pub fn new(tcp: TcpStream) -> Self {
        AppConn {
            tcp: Some(tcp),
            complete: false,
            still_sending: false,
        }
    }

    pub fn tcp(&mut self) -> &mut TcpStream {
        self.tcp.as_mut().expect("present until dropped")
    }

    /// Closes a connection the proxy answered itself (an HTTP status on the
    /// CONNECT listener): its end (FIN) follows the answer, and what the
    /// application still sends (a request body, say) is read and dropped
    /// for a while, so that the close does not reset the connection and
    /// throw the answer away (RFC 9112 §9.6).
    pub async fn close_answered(mut self) {
        let _ = tokio::io::AsyncWriteExt::shutdown(self.tcp()).await;
        let tcp = self.tcp.take().expect("present until dropped");
        crate::bufio::close_lingering(tcp, &crate::bufio::APPLICATION);
    }
}

impl Drop for AppConn {
    fn drop(&mut self) {
        let Some(tcp) = self.tcp.take() else {
            return;
        };
        if !self.complete {
            // Linger zero: the close sends a RST.
            if let Err(e) = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO)) {
                tracing::debug!(error = %e, "cannot set SO_LINGER");
            }
        } else if self.still_sending && (unread(&tcp) || unacknowledged(&tcp)) {
            // (Complete: its end of file has been sent.)
            // Also when it has sent nothing more yet: one that pauses
            // between bursts would send its next one to a closed socket,
            // which resets the connection, and what the kernel still held
            // of the answer for it would be lost.
            crate::bufio::close_lingering(tcp, &crate::bufio::APPLICATION);
        }
    }
}

/// Whether the application has sent bytes not read yet (closing the socket
/// then resets the connection).
fn unread(tcp: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::uninit()];
    matches!(socket2::SockRef::from(tcp).peek(&mut byte), Ok(1..))
}

/// Whether the application has not acknowledged all the bytes the proxy
/// sent it before its end of file (or the kernel does not say). The end of
/// file (FIN) counts one in the kernel's figure, and may be acknowledged
/// later than the bytes before it.
fn unacknowledged(tcp: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    crate::bufio::unacknowledged(tcp.as_raw_fd()).is_none_or(|n| n > 1)
}

/// Runs a tunneled stream to its end. `first` is sent before anything read
/// from `app` (bytes an HTTP CONNECT client sent after its request head).
/// `recv` yields the stream's incoming half; application bytes flow out
/// while it is still pending (an outbound `CONNECT` not yet answered), but
/// nothing is written to the application before it resolves. Once the
/// stream's end has reached the application, `app` counts as complete, even
/// if the other direction then fails.
pub async fn pump(
    app: &mut AppConn,
    send: SendStream<Bytes>,
    recv: impl Future<Output = io::Result<RecvStream>>,
    first: Bytes,
    carried: &Carried,
) -> io::Result<()> {
    // One future, not one awaiting another: each would hold its own copy of
    // the arguments (a large `recv`, such as an outbound stream's answer
    // with its timer, is best boxed by the caller for the same reason), and
    // an idle stream's task is mostly this future.
    let AppConn {
        tcp,
        complete,
        still_sending,
    } = app;
    let app: &TcpStream = tcp.as_ref().expect("present until dropped");
    let down = tunnel_to_app(recv, app, &carried.to_app);
    tokio::pin!(down);
    let mut down_done = false;
    // Until the application has finished sending. (The upload's future
    // lives only here, so what waits afterwards takes its place.)
    let finished = {
        let up = app_to_tunnel(app, send, first, &carried.from_app);
        tokio::pin!(up);
        loop {
            tokio::select! {
                // The peer's answer first: a refusal (`403` and a reset)
                // ends both directions at once, and is told as the refusal
                // it is.
                biased;
                r = &mut down, if !down_done => {
                    down_done = true;
                    r?;
                    *complete = true;
                }
                // Dropping the other direction resets the stream.
                r = &mut up => break r?,
                // A reset while the upload waits for the peer's window
                // (which a peer application that does not read may never
                // open): the stream is reset now, as below.
                ready = app.ready(Interest::ERROR) => {
                    return Err(reset_by_app(ready, app, "while its upload waited for the peer"));
                }
            }
        }
    };
    // The sending half once the application has finished sending: watched
    // for a reset, which ends the stream even while a write to the
    // application is blocked (an application that neither reads nor closes
    // would otherwise hold the stream for good).
    let mut finished = CancelIfDropped(finished);
    // The peer wants nothing more from the application (it reset the
    // stream with `NO_ERROR` before the application's end of file): what
    // the application still sends is read and dropped while what the peer
    // sent goes on to it, as a server's lingering close does. An
    // application blocked writing would otherwise never get to read it.
    let mut discarding = finished.0.is_none();
    let ended = loop {
        if down_done {
            break Ok(());
        }
        tokio::select! {
            biased;
            r = &mut down => {
                down_done = true;
                if let Err(e) = r {
                    break Err(e);
                }
                *complete = true;
            }
            () = discard(app), if discarding => discarding = false,
            reset = poll_fn(|cx| finished.0.as_mut().expect("checked").poll_reset(cx)),
                if finished.0.is_some() =>
            {
                match reset {
                    // The peer wants nothing more from us, which has all
                    // been sent: what it sent still goes to the application.
                    Ok(h2::Reason::NO_ERROR) => finished.0 = None,
                    Ok(reason) => break Err(reset_error(reason)),
                    Err(e) => break Err(h2_io(e)),
                }
            }
            // The application reset its connection after its end of file:
            // what the peer still sends has nowhere to go, and the peer's
            // application learns of it now, as it would from its own peer
            // without a tunnel, not when it next writes.
            ready = app.ready(Interest::ERROR) => {
                break Err(reset_by_app(ready, app, "after its end of file"));
            }
        }
    };
    // Ended by the stream's own events: h2 resets it, if need be, as it
    // sees fit. On a server's side, whose answer has ended, that is
    // `NO_ERROR` also when its application then fails (resets, or closed
    // without reading the rest of the request): RFC 9113's way for a server
    // that has answered in full to stop the request "without error". The
    // client's proxy then delivers the whole answer and drops the rest of
    // the upload, as a server's own lingering close would have.
    finished.0 = None;
    // The whole answer is on its way to the application, which has not
    // finished sending what the peer no longer wants.
    *still_sending = discarding && ended.is_ok();
    ended
}

/// The sending half once the application has finished sending, reset with
/// `CANCEL` if the pump is dropped before the stream has ended (revoked,
/// cut by the drain). Left to h2, a server's stream whose sending side has
/// ended would be reset with `NO_ERROR`, which the peer takes for "send no
/// more" (an answer that is whole), not for a cut.
struct CancelIfDropped(Option<SendStream<Bytes>>);

impl Drop for CancelIfDropped {
    fn drop(&mut self) {
        if let Some(send) = self.0.as_mut() {
            send.send_reset(h2::Reason::CANCEL);
        }
    }
}

fn reset_error(reason: h2::Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("the stream was reset ({reason})"),
    )
}

/// Copies the application's bytes into the stream. On the application's
/// end of file, ends the stream and returns its sending half (to be watched
/// for a reset); None if the peer asked for nothing more.
async fn app_to_tunnel(
    r: &TcpStream,
    mut send: SendStream<Bytes>,
    first: Bytes,
    total: &AtomicU64,
) -> io::Result<Option<SendStream<Bytes>>> {
    let sent = send_all(&mut send, first, total).await;
    if !still_sending(&mut send, sent)? {
        return Ok(None);
    }
    // One allocation serves several reads (each read's bytes are split off
    // and sent); it is dropped whenever the application has nothing more to
    // say, so an idle stream holds no buffer. (Waiting for readiness first
    // and then reading would not do: a fresh socket can look readable.)
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 16 {
            buf.reserve(READ_CHUNK);
        }
        match read_drained(r, &mut buf) {
            Ok((0, _)) => {
                return match send.send_data(Bytes::new(), true) {
                    Ok(()) => Ok(Some(send)),
                    Err(_) if stopped_without_error(&mut send) => Ok(None),
                    Err(e) => Err(h2_io(e)),
                };
            }
            Ok((n, drained)) => {
                let chunk = if drained && n < COPY_BELOW {
                    let copy = Bytes::copy_from_slice(&buf);
                    buf.clear();
                    copy
                } else {
                    buf.split().freeze()
                };
                let sent = send_all(&mut send, chunk, total).await;
                if !still_sending(&mut send, sent)? {
                    return Ok(None);
                }
                if drained {
                    buf = BytesMut::new();
                    if !readable(r, &mut send).await? {
                        return Ok(None);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf = BytesMut::new();
                if !readable(r, &mut send).await? {
                    return Ok(None);
                }
            }
            Err(e) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(e);
            }
        }
    }
}

/// Reads and drops what the application sends, until its end of file (or
/// an error). A buffer is held only while there is something to read.
async fn discard(r: &TcpStream) {
    loop {
        if poll_fn(|cx| r.poll_read_ready(cx)).await.is_err() {
            return;
        }
        let mut buf = BytesMut::with_capacity(READ_CHUNK / 4);
        loop {
            buf.clear();
            match read_drained(r, &mut buf) {
                Ok((0, _)) => return,
                Ok((_, false)) => {}
                Ok((_, true)) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
    }
}

/// Waits until the application has more to say (true), or the peer asks for
/// nothing more (false: a reset with `NO_ERROR`); fails if meanwhile the
/// stream is reset otherwise or its connection ends. (An application whose
/// peer has finished sending may stay silent for good: its stream must still
/// end with the tunnel.)
async fn readable(r: &TcpStream, send: &mut SendStream<Bytes>) -> io::Result<bool> {
    tokio::select! {
        // Polled, not `readable()`: that future (with its waiter) would be
        // part of every idle stream's.
        ready = poll_fn(|cx| r.poll_read_ready(cx)) => ready.map(|()| true),
        reset = poll_fn(|cx| send.poll_reset(cx)) => match reset {
            Ok(h2::Reason::NO_ERROR) => Ok(false),
            Ok(reason) => Err(reset_error(reason)),
            Err(e) => Err(h2_io(e)),
        },
    }
}

/// Reads what the socket holds into `buf`. A read that leaves room in the
/// buffer has drained the socket: its readiness is cleared then and there
/// (`drained`), so the next wait goes straight to the poller instead of
/// spending a system call on a read that would block (what tokio's own
/// `poll_read` does for short reads).
fn read_drained(r: &TcpStream, buf: &mut BytesMut) -> io::Result<(usize, bool)> {
    let room = buf.capacity() - buf.len();
    let mut got = 0;
    match r.try_io(Interest::READABLE, || {
        got = r.try_read_buf(buf)?;
        if got > 0 && got < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(got)
        }
    }) {
        Ok(n) => Ok((n, false)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok((got, true)),
        Err(e) => Err(e),
    }
}

/// Whether the upload goes on after a send that ended in `sent`: false if
/// the peer has asked for nothing more (a reset with `NO_ERROR`, as a server
/// that answered and closed before reading all of a request sends); what the
/// peer sent still goes to the application. (Not an async wrapper around
/// [`send_all`]: that would hold a second copy of the data in every idle
/// stream's future.)
fn still_sending(send: &mut SendStream<Bytes>, sent: io::Result<()>) -> io::Result<bool> {
    match sent {
        Ok(()) => Ok(true),
        Err(_) if stopped_without_error(send) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the peer has reset the stream with `NO_ERROR`.
fn stopped_without_error(send: &mut SendStream<Bytes>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(
        send.poll_reset(&mut cx),
        std::task::Poll::Ready(Ok(h2::Reason::NO_ERROR))
    )
}

/// Sends `data` as the stream's capacity allows, counting into `total`
/// what it has handed to h2.
pub async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    total: &AtomicU64,
) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(c) => c.map_err(h2_io)?,
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
        };
        if cap == 0 {
            continue;
        }
        let chunk = data.split_to(cap.min(data.len()));
        let n = chunk.len() as u64;
        send.send_data(chunk, false).map_err(h2_io)?;
        total.fetch_add(n, Ordering::Relaxed);
    }
    Ok(())
}

/// The error of an application connection reported in error (`ready`):
/// its reset, `when` told.
fn reset_by_app(ready: io::Result<tokio::io::Ready>, app: &TcpStream, when: &str) -> io::Error {
    match ready.and_then(|_| app.take_error()) {
        Err(e) => e,
        Ok(why) => {
            let why = why.unwrap_or_else(|| io::ErrorKind::ConnectionReset.into());
            io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("the application reset its connection {when} ({why})"),
            )
        }
    }
}

async fn tunnel_to_app(
    recv: impl Future<Output = io::Result<RecvStream>>,
    w: &TcpStream,
    total: &AtomicU64,
) -> io::Result<()> {
    let mut recv = recv.await?;
    // What was taken out of h2 while a write to the application waited;
    // none while the stream is idle.
    let mut held: Option<Box<Held>> = None;
    loop {
        let chunk = match held.as_mut().and_then(|h| h.next()) {
            Some(chunk) => chunk,
            None => {
                if let Some(end) = held.take().and_then(|h| h.end) {
                    end.map_err(h2_io)?;
                    break;
                }
                match recv.data().await {
                    Some(chunk) => chunk.map_err(h2_io)?,
                    None => break,
                }
            }
        };
        write_all(w, &chunk, &mut recv, &mut held, total).await?;
        // The peer may send more once it is written (not before: what is
        // held is bounded by the stream's window).
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    socket2::SockRef::from(w).shutdown(std::net::Shutdown::Write)
}

/// DATA frames smaller than this count against their connection's budget
/// while h2 holds them (h2's flood guard: past the budget it closes the
/// connection, every stream on it); handed over, they no longer count.
const SMALL_FRAME: usize = 256;

/// What a stream received while its application did not take what came
/// before, in the order received: the frames as they came, except that
/// small ones in a row are copied together, so that h2 does not hold them
/// (an application that stops reading a stream of small messages would
/// otherwise use up the budget of the whole connection, and the other
/// streams on it would be closed with it); then the stream's end, if it
/// came. Bounded by the stream's window: none of it is released to the
/// peer before it is written.
#[derive(Default)]
struct Held {
    pieces: std::collections::VecDeque<Bytes>,
    /// Small frames received after the last of `pieces`.
    small: BytesMut,
    end: Option<Result<(), h2::Error>>,
}

impl Held {
    /// Takes all that h2 holds for the stream; `held` is made when there
    /// is something to hold.
    fn pull(held: &mut Option<Box<Held>>, recv: &mut RecvStream, cx: &mut Context<'_>) {
        while held.as_ref().is_none_or(|h| h.end.is_none()) {
            let got = match recv.poll_data(cx) {
                Poll::Pending => return,
                Poll::Ready(got) => got,
            };
            let h = held.get_or_insert_with(Box::default);
            match got {
                Some(Ok(b)) if b.len() < SMALL_FRAME => h.small.extend_from_slice(&b),
                Some(Ok(b)) => {
                    if !h.small.is_empty() {
                        let small = std::mem::take(&mut h.small).freeze();
                        h.pieces.push_back(small);
                    }
                    h.pieces.push_back(b);
                }
                Some(Err(e)) => h.end = Some(Err(e)),
                None => h.end = Some(Ok(())),
            }
        }
    }

    /// The error the stream ended in, if it was cut short.
    fn cut(&mut self) -> Option<io::Error> {
        match self.end.take() {
            Some(Err(e)) => Some(h2_io(e)),
            end => {
                self.end = end;
                None
            }
        }
    }

    /// The next bytes to write to the application, in the order received.
    fn next(&mut self) -> Option<Bytes> {
        if let Some(piece) = self.pieces.pop_front() {
            return Some(piece);
        }
        if !self.small.is_empty() {
            return Some(std::mem::take(&mut self.small).freeze());
        }
        None
    }
}

/// Writes all of `data` to the application as its socket takes it
/// (counted into `total` write by write); while
/// the socket is full, takes what arrives on the stream into `held`. It
/// polls for readiness rather than awaiting `writable()`, whose future
/// (with its waiter) would be part of every stream's, idle ones too.
async fn write_all(
    w: &TcpStream,
    mut data: &[u8],
    recv: &mut RecvStream,
    held: &mut Option<Box<Held>>,
    total: &AtomicU64,
) -> io::Result<()> {
    while !data.is_empty() {
        let n = poll_fn(|cx| loop {
            if w.poll_write_ready(cx)?.is_pending() {
                Held::pull(held, recv, cx);
                // The stream was cut (reset before its end, or its
                // connection lost): nothing more goes to the application,
                // whose socket may never drain.
                if let Some(e) = held.as_mut().and_then(|h| h.cut()) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Pending;
            }
            match w.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        })
        .await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
        data = &data[n..];
    }
    Ok(())
}

pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CONNECT stream over an in-memory HTTP/2 connection: the client's
    /// halves (for the pump) and the server's (for the test).
    async fn tunnel() -> (
        (SendStream<Bytes>, RecvStream),
        (SendStream<Bytes>, RecvStream),
    ) {
        tunnel_with(4 << 20, false).await
    }

    /// [`tunnel`] over a pipe of `pipe` bytes; a `stalled` server reads
    /// nothing more once it has answered.
    async fn tunnel_with(
        pipe: usize,
        stalled: bool,
    ) -> (
        (SendStream<Bytes>, RecvStream),
        (SendStream<Bytes>, RecvStream),
    ) {
        let (client_io, server_io) = tokio::io::duplex(pipe);
        let server = tokio::spawn(async move {
            let mut conn = crate::hbone::server_builder(10)
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            if stalled {
                // Long enough to send the answer, then no more.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_millis(300), conn.accept()).await;
                    let _held = conn;
                    std::future::pending::<()>().await
                });
            } else {
                tokio::spawn(async move { while conn.accept().await.is_some() {} });
            }
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            (send, req.into_body())
        });
        let (mut client, conn) = crate::hbone::client_builder(10)
            .handshake::<_, Bytes>(client_io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("127.0.0.1:9")
            .body(())
            .unwrap();
        let (response, send) = client.send_request(req, false).unwrap();
        let recv = response.await.unwrap().into_body();
        ((send, recv), server.await.unwrap())
    }

    /// Runs the pump on the proxy's end of an application connection;
    /// returns its task and what it carried.
    fn spawn_pump(
        proxy_side: TcpStream,
        send: SendStream<Bytes>,
        recv: RecvStream,
    ) -> (
        tokio::task::JoinHandle<io::Result<()>>,
        std::sync::Arc<Carried>,
    ) {
        let carried = std::sync::Arc::new(Carried::default());
        let c = carried.clone();
        let task = tokio::spawn(async move {
            let mut app = AppConn::new(proxy_side);
            pump(&mut app, send, async { Ok(recv) }, Bytes::new(), &c).await
        });
        (task, carried)
    }

    /// Resets the stream from the peer's side with `reason`; returns how the
    /// pump ended (it must, within 10 s).
    async fn reset_and_wait(
        peer_send: &mut SendStream<Bytes>,
        reason: h2::Reason,
        pumping: tokio::task::JoinHandle<io::Result<()>>,
    ) -> io::Result<()> {
        peer_send.send_reset(reason);
        tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .expect("the stream outlived its reset")
            .unwrap()
    }

    /// An application connection whose application end receives into
    /// `app_receive` bytes and whose proxy end sends from `proxy_send`.
    async fn app_pair_buffered(app_receive: u32, proxy_send: usize) -> (TcpStream, TcpStream) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(app_receive).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = sock.connect(listener.local_addr().unwrap()).await.unwrap();
        let (proxy_side, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&proxy_side)
            .set_send_buffer_size(proxy_send)
            .unwrap();
        (proxy_side, app)
    }

    /// An application connection: (the proxy's end, the application's end).
    async fn app_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (listener.accept().await.unwrap().0, app)
    }

    /// Resets the application's end of its connection (linger zero: the
    /// close sends a RST).
    fn reset_by_the_application(app: TcpStream) {
        socket2::SockRef::from(&app)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(app);
    }

    /// The peer is told `CANCEL` and the pump ends in the application's
    /// reset, both within 10 s.
    async fn told_the_application_reset(
        peer_send: &mut SendStream<Bytes>,
        pumping: tokio::task::JoinHandle<io::Result<()>>,
    ) {
        assert_eq!(reset_told(peer_send, "the peer").await, h2::Reason::CANCEL);
        let err = tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .expect("the stream outlived the application's connection")
            .unwrap()
            .expect_err("an application's reset is no clean end");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        assert!(err.to_string().contains("reset its connection"), "{err}");
    }

    /// The reason `send`'s stream was reset with, which must come within
    /// 10 s (`who` is told, for the failure's message).
    async fn reset_told(send: &mut SendStream<Bytes>, who: &str) -> h2::Reason {
        tokio::time::timeout(Duration::from_secs(10), poll_fn(|cx| send.poll_reset(cx)))
            .await
            .unwrap_or_else(|_| panic!("{who} was never told of the reset"))
            .unwrap()
    }

    /// The peer finishes sending (the application gets its end of file and
    /// stays silent), then resets the stream: the stream ends at once and
    /// the application's connection is closed, instead of both being held
    /// until the application writes. A reset with `CANCEL` ends it in an
    /// error; one with `NO_ERROR` (the peer wants nothing more) cleanly.
    #[tokio::test]
    async fn a_reset_after_the_peer_has_finished_sending_ends_a_silent_stream() {
        let err = silent_stream_reset(h2::Reason::CANCEL)
            .await
            .expect_err("a cancelled stream ends in an error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        silent_stream_reset(h2::Reason::NO_ERROR)
            .await
            .expect("a stream the peer stops without error ends cleanly");
    }

    /// The peer resets a stream before its end: the application gets what
    /// came, then a reset (ECONNRESET), not an end of file that would pass
    /// the cut stream off as whole.
    #[tokio::test]
    async fn a_stream_reset_midway_resets_the_application_connection() {
        let ((send, recv), (mut peer_send, _peer_recv)) = tunnel().await;
        let (proxy_side, mut app) = app_pair().await;
        let (pumping, _) = spawn_pump(proxy_side, send, recv);
        peer_send
            .send_data(Bytes::from_static(b"partial"), false)
            .unwrap();
        let mut got = [0u8; 7];
        app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"partial");
        let ended = reset_and_wait(&mut peer_send, h2::Reason::CANCEL, pumping).await;
        assert!(ended.is_err());
        let mut rest = Vec::new();
        let err = tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut rest))
            .await
            .expect("the application's connection stayed open")
            .expect_err("an end of file: the cut stream passes for whole");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }

    /// The peer's whole answer has reached the application's socket (the
    /// application has not read it yet) when the stream fails the other way
    /// (the peer resets it, the application not having finished sending):
    /// the application still reads the whole answer and an end of file; a
    /// reset would have thrown away what it had not read. (Bytes the
    /// application sent that nobody read make the kernel reset the
    /// connection on close whatever the proxy does, as they would with the
    /// peer itself.)
    #[tokio::test]
    async fn a_stream_whose_end_reached_the_application_is_closed_not_reset() {
        let ((send, recv), (mut peer_send, _peer_recv)) = tunnel().await;
        // A small window on the application's side and a large send buffer
        // on the proxy's: the answer waits in the proxy's socket.
        let (proxy_side, mut app) = app_pair_buffered(4096, 1 << 20).await;
        let (pumping, c) = spawn_pump(proxy_side, send, recv);
        let answer = Bytes::from(vec![5u8; 256 * 1024]);
        peer_send.send_data(answer.clone(), true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.totals().0 < answer.len() as u64 {
            assert!(
                Instant::now() < deadline,
                "the answer never reached the socket"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ended = reset_and_wait(&mut peer_send, h2::Reason::CANCEL, pumping).await;
        assert!(ended.is_err());
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut got))
            .await
            .expect("no end of file")
            .expect("the whole answer and an end of file, not a reset");
        assert_eq!(got.len(), answer.len());
    }

    /// The application finishes sending, then resets its connection while
    /// the peer, which has the whole upload, stays silent: the stream is
    /// reset at once, so the peer's application learns of it as it would
    /// without a tunnel, instead of the stream (and both applications'
    /// connections) lasting until the peer next sends.
    #[tokio::test]
    async fn an_application_reset_after_its_end_of_file_resets_the_stream() {
        let ((send, recv), (mut peer_send, mut peer_recv)) = tunnel().await;
        let (proxy_side, mut app) = app_pair().await;
        let (pumping, carried) = spawn_pump(proxy_side, send, recv);
        app.write_all(b"ask").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        while let Some(chunk) = peer_recv.data().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, b"ask");

        reset_by_the_application(app);
        told_the_application_reset(&mut peer_send, pumping).await;
        assert_eq!(carried.totals(), (0, 3));
    }

    /// The application uploads more than the peer takes (its application
    /// reads nothing: the window closes), then resets its connection: the
    /// stream is reset at once, rather than held (with what the peer has
    /// buffered) until the peer's application reads or writes.
    #[tokio::test]
    async fn an_application_reset_while_its_upload_waits_for_the_window_resets_the_stream() {
        let ((send, recv), (mut peer_send, _peer_recv)) = tunnel().await;
        let (proxy_side, app) = app_pair().await;
        let (pumping, carried) = spawn_pump(proxy_side, send, recv);
        socket2::SockRef::from(&app)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let uploading = tokio::spawn(async move {
            let mut app = app;
            let _ = app.write_all(&vec![7u8; 64 << 20]).await;
        });
        // Until the upload stalls on the closed window.
        let mut sent = carried.totals().1;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = carried.totals().1;
            if now == sent && now > 0 {
                break;
            }
            sent = now;
        }
        assert!(sent < 64 << 20, "all of it was sent: {sent}");
        // Dropping the application's end (linger zero) resets it.
        uploading.abort();
        assert!(uploading.await.unwrap_err().is_cancelled());
        told_the_application_reset(&mut peer_send, pumping).await;
    }

    /// A write to the application that blocks midway through a chunk (a
    /// frame of up to 256 KiB) counts what the socket took so far: a
    /// stream cut then (a reset, a revocation, the drain's deadline) tells
    /// what reached its application, not only the chunks written whole.
    #[tokio::test]
    async fn a_write_blocked_midway_counts_what_the_application_was_given() {
        let ((send, recv), (mut peer_send, _peer_recv)) = tunnel().await;
        let (proxy_side, mut app) = app_pair_buffered(4096, 4096).await;
        let (pumping, carried) = spawn_pump(proxy_side, send, recv);
        peer_send
            .send_data(Bytes::from(vec![7u8; 1 << 20]), false)
            .unwrap();
        // Until the writes stall on the full socket.
        let mut written = carried.totals().0;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = carried.totals().0;
            if now == written {
                break;
            }
            written = now;
        }
        assert!(written > 0, "nothing was counted as written");
        assert!(written < 256 << 10, "a whole frame was written: {written}");
        let mut got = vec![0u8; written as usize];
        tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut got))
            .await
            .expect("the application was not given what was counted")
            .unwrap();
        let _ = reset_and_wait(&mut peer_send, h2::Reason::CANCEL, pumping).await;
    }

    /// Every open stream's task is mostly this future, whatever state it is
    /// in (a future is as large as its largest state): it must stay far
    /// below the 4 KiB an idle stream may cost in all (848 bytes in a test
    /// build; a buffer or a second copy of the arguments held across an
    /// await would show here first).
    #[tokio::test]
    async fn a_streams_pump_future_stays_small() {
        let ((send, recv), _peer) = tunnel().await;
        let (proxy_side, _app) = app_pair().await;
        let mut app = AppConn::new(proxy_side);
        let carried = Carried::default();
        let pumping = pump(&mut app, send, async { Ok(recv) }, Bytes::new(), &carried);
        let size = std::mem::size_of_val(&pumping);
        assert!(size <= 1024, "a stream's pump future is {size} bytes");
    }

    /// The pump on the server's side of a stream: the client has sent part
    /// of its upload (which the application has read) and goes on; the
    /// application has answered `answer` and half-closed. The client's
    /// halves, the pump's task and the application's end.
    async fn answered_while_uploading(
        answer: &[u8],
    ) -> (
        SendStream<Bytes>,
        RecvStream,
        tokio::task::JoinHandle<io::Result<()>>,
        TcpStream,
    ) {
        let ((mut client_send, client_recv), (send, recv)) = tunnel().await;
        let (proxy_side, mut app) = app_pair().await;
        let (pumping, _) = spawn_pump(proxy_side, send, recv);
        client_send
            .send_data(Bytes::from_static(b"upload, part 1"), false)
            .unwrap();
        app.write_all(answer).await.unwrap();
        app.shutdown().await.unwrap();
        let mut part = [0u8; 14];
        app.read_exact(&mut part).await.unwrap();
        (client_send, client_recv, pumping, app)
    }

    /// On the server's side of a stream (the inbound proxy's), the
    /// application has answered and half-closed while the client still
    /// sends; the stream is then cut (its pump dropped: a revocation, the
    /// drain's deadline). The client's side is told `CANCEL`, a cut, not
    /// the `NO_ERROR` h2 picks for a server stream dropped after its end,
    /// which would pass for "the answer is whole, send no more".
    #[tokio::test]
    async fn a_server_stream_cut_after_its_answer_is_reset_as_cancelled() {
        let (mut client_send, _client_recv, pumping, _app) =
            answered_while_uploading(b"answer").await;
        // The application's end has become the stream's.
        tokio::time::sleep(Duration::from_millis(200)).await;
        pumping.abort();
        let reason = reset_told(&mut client_send, "the client's side").await;
        assert_eq!(reason, h2::Reason::CANCEL);
    }

    /// On the server's side, the application answers in full, half-closes,
    /// then resets its connection while the client still uploads: its
    /// answer is whole, so the client's side is told to stop the upload
    /// without error (`NO_ERROR`), and gets the whole answer and its end.
    #[tokio::test]
    async fn a_server_application_reset_after_its_whole_answer_stops_the_upload_without_error() {
        let (mut client_send, mut client_recv, pumping, app) =
            answered_while_uploading(b"413").await;
        reset_by_the_application(app);
        let reason = reset_told(&mut client_send, "the client's side").await;
        assert_eq!(reason, h2::Reason::NO_ERROR);
        let mut answer = Vec::new();
        while let Some(chunk) = client_recv.data().await {
            answer.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(answer, b"413");
        let ended = tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .unwrap()
            .unwrap();
        assert!(ended.is_err(), "the application's reset is an error here");
    }

    /// How a stream ends that the peer resets with `reason` after it has
    /// finished sending, while the application stays silent.
    async fn silent_stream_reset(reason: h2::Reason) -> io::Result<()> {
        let ((send, recv), (mut peer_send, _peer_recv)) = tunnel().await;
        let (proxy_side, mut app) = app_pair().await;
        let (pumping, carried) = spawn_pump(proxy_side, send, recv);
        peer_send
            .send_data(Bytes::from_static(b"bye"), true)
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut got))
            .await
            .expect("the application never got its end of file")
            .unwrap();
        assert_eq!(got, b"bye");

        let ended = reset_and_wait(&mut peer_send, reason, pumping).await;
        // The application's connection is closed: writing to it fails soon.
        let deadline = Instant::now() + Duration::from_secs(10);
        while app.write_all(b"x").await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "the application's connection stayed open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(carried.totals(), (3, 0));
        ended
    }

    /// The application has finished sending and reads nothing more, so
    /// writes to it block; the peer then resets the stream: the stream ends
    /// at once, in an error, instead of waiting for the application.
    #[tokio::test]
    async fn a_reset_ends_a_stream_whose_writes_to_the_application_are_blocked() {
        let ended = reset_while_writes_are_blocked(h2::Reason::CANCEL, true).await;
        let err = ended.expect_err("a cancelled stream ends in an error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }

    /// The peer resets the stream with `NO_ERROR` before its end (it wants
    /// nothing more, and sends nothing more) while writes to the
    /// application are blocked and the application has not finished
    /// sending: the stream ends at once, in an error, instead of waiting
    /// for an application that may never read.
    #[tokio::test]
    async fn a_reset_without_error_before_the_end_ends_a_stream_whose_writes_are_blocked() {
        let ended = reset_while_writes_are_blocked(h2::Reason::NO_ERROR, false).await;
        let err = ended.expect_err("a stream cut short ends in an error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }

    /// How a stream ends that the peer resets with `reason` while writes to
    /// its application (which reads nothing; `app_done`: and has finished
    /// sending) are blocked.
    async fn reset_while_writes_are_blocked(reason: h2::Reason, app_done: bool) -> io::Result<()> {
        let ((send, recv), (mut peer_send, _peer_recv)) = tunnel().await;
        // Small socket buffers, so that a few hundred KiB block the writes.
        let (proxy_side, mut app) = app_pair_buffered(4096, 4096).await;
        let (pumping, carried) = spawn_pump(proxy_side, send, recv);
        if app_done {
            app.shutdown().await.unwrap();
        }
        peer_send
            .send_data(Bytes::from(vec![7u8; 1 << 20]), false)
            .unwrap();
        // The writes fill the buffers and block (a write counts once done).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let written = carried.totals().0;
        assert!(written < 1 << 20, "all of it was written: {written}");
        assert!(!pumping.is_finished());
        let ended = reset_and_wait(&mut peer_send, reason, pumping).await;
        drop(app);
        ended
    }

    /// The peer sends its whole answer and then resets the stream with
    /// `NO_ERROR` (it wants no more of the request), while the application,
    /// which has not read the answer, is blocked sending: the proxy reads
    /// and drops the rest of what the application sends, so the
    /// application gets to read the whole answer and its end. An answer
    /// larger than the sockets take (1 MiB) is still being written when
    /// the stream ends; a short one (a `413`) has gone to the kernel.
    #[tokio::test]
    async fn after_the_peer_stops_the_upload_the_application_can_finish_sending_and_read_the_answer(
    ) {
        stopped_upload(1 << 20).await;
        stopped_upload(3).await;
    }

    /// The scenario above, with an answer of `answer` bytes.
    async fn stopped_upload(answer: usize) {
        // The peer does not read the stream (`_peer_recv`): it gives no
        // window beyond the first.
        let ((send, recv), (mut peer_send, _peer_recv)) = tunnel().await;
        let (proxy_side, app) = app_pair_buffered(4096, 4096).await;
        let (pumping, carried) = spawn_pump(proxy_side, send, recv);
        let (mut app_read, mut app_write) = app.into_split();
        // The application sends more than the stream's window and the
        // sockets take, so its writes block.
        let upload = vec![1u8; 16 << 20];
        let uploading = tokio::spawn(async move {
            app_write.write_all(&upload).await.unwrap();
            app_write
        });
        let answer = Bytes::from(vec![5u8; answer]);
        peer_send.send_data(answer.clone(), true).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!uploading.is_finished(), "the upload was not held up");
        peer_send.send_reset(h2::Reason::NO_ERROR);

        let _app_write = tokio::time::timeout(Duration::from_secs(10), uploading)
            .await
            .expect("the application stayed blocked sending")
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), app_read.read_to_end(&mut got))
            .await
            .expect("the application never got the answer's end")
            .expect("the whole answer and an end of file");
        assert_eq!(got.len(), answer.len());
        tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .expect("the stream did not end")
            .unwrap()
            .expect("a stream whose peer stopped the upload ends cleanly");
        assert_eq!(carried.totals().0, answer.len() as u64);
    }

    /// The scenario above with an application that sends in bursts: the
    /// stream may end while it pauses (nothing unread), and its next burst
    /// comes after, the answer's end perhaps still in the proxy's socket.
    /// It still reads the whole answer and an end of file, not a reset.
    #[tokio::test]
    async fn an_application_sending_in_bursts_after_the_peer_stopped_the_upload_reads_the_answer() {
        for answer in [3, 6 << 10, 10 << 10, 14 << 10, 20 << 10] {
            bursts_after_a_stopped_upload(answer).await;
        }
    }

    async fn bursts_after_a_stopped_upload(answer: usize) {
        let ((send, recv), (mut peer_send, _peer_recv)) = tunnel().await;
        let (proxy_side, app) = app_pair_buffered(4096, 4096).await;
        let (_pumping, _carried) = spawn_pump(proxy_side, send, recv);
        let (mut app_read, mut app_write) = app.into_split();
        // A first burst, taken in.
        app_write.write_all(&[1u8; 1024]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        peer_send
            .send_data(Bytes::from(vec![5u8; answer]), true)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        peer_send.send_reset(h2::Reason::NO_ERROR);
        // A pause (the stream ends meanwhile, if the answer is all in the
        // sockets), then the next burst.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = app_write.write_all(&[2u8; 64 << 10]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), app_read.read_to_end(&mut got))
            .await
            .expect("the application never got the answer's end")
            .unwrap_or_else(|e| panic!("answer of {answer}: {e} after {} bytes", got.len()));
        assert_eq!(got.len(), answer);
    }

    /// An application that stops reading a stream of small messages: what
    /// arrives meanwhile (a large DATA frame, then more small ones than the
    /// connection's budget lets h2 hold, within the stream's window) waits
    /// in the pump,
    /// not in h2, so the connection, and every other stream on it, lives
    /// on; once the application reads, it gets every byte in order.
    #[tokio::test]
    async fn small_frames_for_an_application_that_stopped_reading_do_not_close_the_connection() {
        let ((send, recv), (mut peer_send, _peer_recv)) = tunnel().await;
        let (proxy_side, mut app) = app_pair_buffered(4096, 4096).await;
        let (pumping, carried) = spawn_pump(proxy_side, send, recv);
        app.shutdown().await.unwrap();
        // 80,000 frames of 10 bytes: 800,000 bytes (the window is 4 MiB),
        // 19.7 MB of framing overhead against the budget's 8 MiB (14.8 MB
        // after the large one).
        const FRAMES: usize = 80_000;
        const LARGE_AT: usize = 20_000;
        let frame = |i: usize| Bytes::from(format!("{:>10}", i % 10_000_000_000));
        let sent = FRAMES * 10;
        const { assert!((FRAMES - LARGE_AT) * (SMALL_FRAME - 10) > crate::hbone::DATA_FRAME_BUDGET) };
        // A large frame among them, once the writes have blocked: the
        // small ones behind it are taken out too.
        let large = Bytes::from(vec![b'L'; 300]);
        for i in 0..FRAMES {
            if i == LARGE_AT {
                peer_send.send_data(large.clone(), false).unwrap();
            }
            peer_send.send_data(frame(i), false).unwrap();
            if i % 500 == 0 {
                // Let the connection carry them as they come.
                tokio::task::yield_now().await;
            }
        }
        peer_send.send_data(Bytes::new(), true).unwrap();
        // They all arrive while the application reads nothing: its writes
        // block, and the stream goes on.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let written = carried.totals().0 as usize;
        assert!(written < 300 + sent, "all of it was written: {written}");
        assert!(
            !pumping.is_finished(),
            "the stream ended: {:?}",
            pumping.await
        );

        let mut got = Vec::with_capacity(sent);
        tokio::time::timeout(Duration::from_secs(20), app.read_to_end(&mut got))
            .await
            .expect("the stream's end never reached the application")
            .unwrap();
        let small = |r: std::ops::Range<usize>| r.flat_map(|i| frame(i).to_vec());
        let want: Vec<u8> = small(0..LARGE_AT)
            .chain(large.iter().copied())
            .chain(small(LARGE_AT..FRAMES))
            .collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the bytes arrived out of order or changed");
        tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    /// This process's virtual memory, in KiB.
    fn vm_size_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// An application sending small messages one at a time to a peer that
    /// has stopped reading: h2 holds up to a megabyte of them for the
    /// stream, and each must cost about its own size. Sent as a slice of
    /// the read buffer, each kept that buffer's whole allocation (256 KiB):
    /// gigabytes for one stream's megabyte.
    #[tokio::test]
    async fn small_messages_to_a_peer_that_stopped_reading_cost_their_size() {
        let ((send, recv), _peer) = tunnel_with(64 * 1024, true).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (proxy_side, mut app) = app_pair().await;
        let (pumping, carried) = spawn_pump(proxy_side, send, recv);
        let before = vm_size_kib();
        const MESSAGES: usize = 12_000;
        for i in 0..MESSAGES {
            app.write_all(&[(i % 251) as u8; 100]).await.unwrap();
            // The pump reads each before the next is sent (mostly).
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        // h2 takes them until its megabyte for the stream is full.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let taken = carried.totals().1;
            if taken == last || Instant::now() > deadline {
                break;
            }
            last = taken;
        }
        assert!(
            last >= crate::hbone::MAX_SEND_BUFFER as u64 / 2,
            "the pump took only {last} bytes"
        );
        let grown = vm_size_kib().saturating_sub(before);
        assert!(
            grown < 256 * 1024,
            "memory grew by {grown} KiB for {last} bytes held"
        );
        assert!(!pumping.is_finished());
    }

    /// One read from the application becomes one DATA frame of up to
    /// 256 KiB (HBONE's frame size, and the pump's read size), not four of
    /// 64 KiB: fewer frames and socket writes per byte on a bulk stream.
    #[tokio::test]
    async fn a_read_of_256_kib_from_the_application_crosses_as_one_frame() {
        // The answer comes after the server's settings and window update,
        // so the stream may send 256 KiB at once.
        let ((send, recv), (_peer_send, mut body)) = tunnel().await;

        // The application's 256 KiB wait in the proxy's socket before the
        // pump's first read.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4 << 20).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(1).unwrap();
        let mut app = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (proxy_side, _) = listener.accept().await.unwrap();
        app.write_all(&vec![7u8; 256 * 1024]).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut peek = vec![0u8; 256 * 1024];
        while proxy_side.peek(&mut peek).await.unwrap() < peek.len() {
            assert!(Instant::now() < deadline, "256 KiB never queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let (_pumping, carried) = spawn_pump(proxy_side, send, recv);
        let frames = tokio::time::timeout(Duration::from_secs(10), async {
            let (mut frames, mut total) = (Vec::new(), 0);
            while total < 256 * 1024 {
                let data = body.data().await.unwrap().unwrap();
                total += data.len();
                let _ = body.flow_control().release_capacity(data.len());
                frames.push(data.len());
            }
            frames
        })
        .await
        .unwrap();
        assert_eq!(frames, vec![256 * 1024], "DATA frames as received");
        assert_eq!(carried.totals().1, 256 * 1024);
        drop(app);
    }
}
