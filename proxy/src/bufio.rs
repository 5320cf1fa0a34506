//! Large socket reads under TLS.
//!
//! rustls asks its transport for at most about 4 KiB at a time, so a bulk
//! stream would cost a `recv` per 4 KiB. [`ReadBuffered`] reads up to
//! [`READ_BUFFER`] bytes per call into a buffer of its own and serves rustls
//! from it. The buffer exists only while data is flowing: it is released when
//! the socket has nothing more to read, so an idle connection holds none.
//!
//! It also counts the bytes that cross the socket each way ([`Traffic`]),
//! and asks the socket how much of what it took the peer acknowledged: a
//! connection whose PING answer or close is slow, but whose bytes still
//! move, is on a slow link, not a dead peer's. Under it, [`LingeringClose`]
//! closes a socket whose connection ended cleanly only once the peer has
//! closed too.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub const READ_BUFFER: usize = 64 * 1024;

/// Bytes read from and written to a connection's socket so far, shared
/// with whoever watches the connection (h2 owns the socket itself), and
/// how much of what was written has reached the peer.
#[derive(Clone, Debug, Default)]
pub struct Traffic(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    read: AtomicU64,
    written: AtomicU64,
    /// The most [`Traffic::delivered`] has said: it never goes back.
    delivered: AtomicU64,
    /// The socket, while it is open (see [`LingeringClose`]): asked how
    /// much of what it took is still unacknowledged.
    socket: Mutex<Option<RawFd>>,
}

impl Traffic {
    /// Bytes read so far: sent by the peer.
    pub fn read(&self) -> u64 {
        self.0.read.load(Ordering::Relaxed)
    }

    /// Bytes written so far: taken by the kernel, which takes some without
    /// the peer reading any.
    pub fn written(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
    }

    /// Bytes written so far that the peer's end has acknowledged: unlike
    /// [`Traffic::written`], this still grows once everything has been
    /// written, while the kernel sends what it holds (on a slow link,
    /// seconds of it). Without a socket to ask, what the kernel took.
    pub fn delivered(&self) -> u64 {
        // What was written first, then what of it the socket still holds: a
        // write in between can only make this look smaller than it is (never
        // a sign of life that was not), and one smaller than a figure given
        // before gives that one again.
        let written = self.written();
        let socket = self.0.socket.lock().unwrap_or_else(PoisonError::into_inner);
        let unacknowledged = socket.and_then(unacknowledged).unwrap_or(0);
        drop(socket);
        let now = written.saturating_sub(unacknowledged);
        self.0.delivered.fetch_max(now, Ordering::Relaxed).max(now)
    }

    pub(crate) fn add_read(&self, n: usize) {
        self.0.read.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_written(&self, n: usize) {
        self.0.written.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn watch(&self, tcp: &TcpStream) {
        *self.0.socket.lock().unwrap_or_else(PoisonError::into_inner) = Some(tcp.as_raw_fd());
    }

    /// Before the socket closes: its descriptor may then be reused.
    fn unwatch(&self) {
        *self.0.socket.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Bytes a TCP socket took that its peer has not acknowledged yet (sent or
/// not): `SIOCOUTQ`.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn unacknowledged(fd: RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for a TCP socket) writes one int through
    // the pointer, which points at `n`. The descriptor is open: a watched
    // socket's (`unwatch` runs before it closes, under the same lock as
    // this call) or one the caller holds.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (r == 0).then(|| u64::try_from(n).ok()).flatten()
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn unacknowledged(_fd: RawFd) -> Option<u64> {
    None
}

pub struct ReadBuffered<T> {
    inner: T,
    buf: BytesMut,
    traffic: Traffic,
}

impl<T> ReadBuffered<T> {
    pub fn new(inner: T) -> Self {
        ReadBuffered {
            inner,
            buf: BytesMut::new(),
            traffic: Traffic::default(),
        }
    }

    /// The count of bytes this socket has moved.
    pub fn traffic(&self) -> Traffic {
        self.traffic.clone()
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl ReadBuffered<LingeringClose> {
    /// A tunnel's socket, whose [`Traffic`] can ask it what it delivered.
    pub fn tunnel(tcp: TcpStream) -> Self {
        let traffic = Traffic::default();
        traffic.watch(&tcp);
        let mut inner = LingeringClose::new(tcp);
        inner.watched = Some(traffic.clone());
        ReadBuffered {
            inner,
            buf: BytesMut::new(),
            traffic,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadBuffered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            // Empty: refill (or read straight into a large enough target).
            if out.remaining() >= READ_BUFFER {
                let before = out.filled().len();
                let r = Pin::new(&mut this.inner).poll_read(cx, out);
                this.traffic.add_read(out.filled().len() - before);
                return r;
            }
            this.buf.reserve(READ_BUFFER);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Ready(Ok(0)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(n)) => this.traffic.add_read(n),
                Poll::Ready(Err(e)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    // Nothing to read now: hold no buffer while waiting.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadBuffered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.traffic.add_written(n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.traffic.add_written(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How a socket lingers once its side of the connection has ended (see
/// [`LingeringClose`]), and how many may at once.
pub struct Linger {
    /// The longest it lingers.
    within: std::time::Duration,
    /// The most it reads from its peer: one that goes on sending is not
    /// waited for.
    read_max: usize,
    /// Sockets lingering this way now; at most [`LINGERING_MAX`] (beyond,
    /// one closes at once).
    now: AtomicUsize,
}

/// A tunnel's socket: what the kernel still holds for the peer (about
/// 256 KiB unsent, and what is in flight) goes out within the minute over a
/// link of 5 KB/s or faster.
pub static TUNNEL: Linger = Linger {
    within: std::time::Duration::from_secs(60),
    read_max: 1024 * 1024,
    now: AtomicUsize::new(0),
};

/// An application's, whose peer has answered in full and wants no more of
/// what the application sends: it gets to read the answer rather than a
/// reset, as from a server's own lingering close.
pub static APPLICATION: Linger = Linger {
    within: std::time::Duration::from_secs(10),
    read_max: 64 * 1024 * 1024,
    now: AtomicUsize::new(0),
};

/// The most sockets lingering at once, of each kind. (A lingering socket is
/// no longer one of the proxy's connections, whose number is bounded; this
/// bounds what peers that close slowly can hold.)
const LINGERING_MAX: usize = 4096;

/// Sockets lingering now: the drain waits for them.
pub fn lingering() -> usize {
    TUNNEL.now.load(Ordering::Acquire) + APPLICATION.now.load(Ordering::Acquire)
}

/// One of a [`Linger`]'s sockets, given back when dropped (with its task,
/// however that ends).
struct Lingers(&'static Linger);

impl Lingers {
    fn take(how: &'static Linger) -> Option<Lingers> {
        if how.now.fetch_add(1, Ordering::AcqRel) >= LINGERING_MAX {
            how.now.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Lingers(how))
    }
}

impl Drop for Lingers {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A tunnel's TCP socket. Once its connection has ended cleanly (shut down
/// for writing: TLS `close_notify` and FIN sent after everything else), it
/// is closed the way a server closes after its answer: what the peer still
/// sends (a PING, a window update, its own close) is read and dropped
/// until the peer closes too, has sent 1 MiB, or a minute has passed
/// ([`TUNNEL`]). Closed with bytes unread, or with more
/// arriving, the kernel would send a reset, and a reset throws away what it
/// still holds for the peer: on a slow link, the end of a stream whose
/// application was told it had been sent. A connection not shut down (cut
/// off, failed) closes at once; so does one beyond [`LINGERING_MAX`].
pub struct LingeringClose {
    tcp: Option<TcpStream>,
    shut: bool,
    /// The traffic that asks this socket what it delivered, until it closes.
    watched: Option<Traffic>,
}

impl LingeringClose {
    pub fn new(tcp: TcpStream) -> Self {
        LingeringClose {
            tcp: Some(tcp),
            shut: false,
            watched: None,
        }
    }

    fn tcp(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.tcp.as_mut().expect("present until dropped"))
    }
}

impl Drop for LingeringClose {
    fn drop(&mut self) {
        if let Some(traffic) = self.watched.take() {
            traffic.unwatch();
        }
        if let Some(tcp) = self.tcp.take().filter(|_| self.shut) {
            close_lingering(tcp, &TUNNEL);
        }
    }
}

/// Closes `tcp`, whose sending side has ended, once what the peer still
/// sends has been read and dropped until its own end, or as long and as
/// much as `how` allows (see [`LingeringClose`]); at once beyond
/// [`LINGERING_MAX`] sockets, or outside a runtime.
pub fn close_lingering(tcp: TcpStream, how: &'static Linger) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Some(counted) = Lingers::take(how) else {
        return;
    };
    runtime.spawn(async move {
        linger(tcp, how).await;
        drop(counted);
    });
}

async fn linger(tcp: TcpStream, how: &Linger) {
    let give_up = tokio::time::sleep(how.within);
    tokio::pin!(give_up);
    let mut read = 0;
    while read < how.read_max {
        tokio::select! {
            r = tcp.readable() => if r.is_err() {
                return;
            },
            () = &mut give_up => return,
        }
        // Not held while waiting: a lingering socket costs no buffer.
        let mut scratch = [0u8; 4096];
        match tcp.try_read(&mut scratch) {
            // The peer's end.
            Ok(0) => return,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

impl AsyncRead for LingeringClose {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.tcp().poll_read(cx, out)
    }
}

impl AsyncWrite for LingeringClose {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.tcp().poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.tcp().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = self.tcp().poll_shutdown(cx);
        if let Poll::Ready(Ok(())) = r {
            self.shut = true;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_small_reads_from_one_large_read_and_frees_the_buffer_when_idle() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut r = ReadBuffered::new(a);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        b.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        while got.len() < data.len() {
            let n = r.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
        // Drained and nothing pending: a read that has to wait holds no buffer.
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), r.read(&mut small)).await;
        assert!(pending.is_err());
        assert_eq!(r.buf.capacity(), 0);
        drop(b);
        assert_eq!(r.read(&mut small).await.unwrap(), 0);
    }

    /// What a tunnel's socket has delivered is what its peer acknowledged:
    /// less than what the kernel took while the peer reads nothing (its
    /// receive buffer full), all of it once the peer has read it. Once the
    /// socket is dropped it is no longer asked.
    #[tokio::test]
    async fn delivered_counts_what_the_peer_acknowledged() {
        let (mut client, tcp) = slow_reader().await;
        let mut server = ReadBuffered::tunnel(tcp);
        let traffic = server.traffic();
        server.write_all(&vec![7u8; SENT]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(traffic.written(), SENT as u64);
        let stuck = traffic.delivered();
        assert!(stuck > 0 && stuck < SENT as u64 / 2, "{stuck}");
        let mut got = vec![0u8; SENT];
        client.read_exact(&mut got).await.unwrap();
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while traffic.delivered() < SENT as u64 && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(traffic.delivered(), SENT as u64);
        drop(server);
        assert!(traffic.0.socket.lock().unwrap().is_none());
        assert_eq!(traffic.delivered(), SENT as u64);
    }

    /// A socket shut down cleanly with bytes from the peer unread, and more
    /// arriving after its connection is dropped, still delivers everything
    /// it was given and then its end: the kernel would otherwise answer the
    /// unread bytes with a reset and throw away what it held unsent.
    #[tokio::test]
    async fn a_clean_close_with_bytes_unread_delivers_what_was_sent() {
        let within = std::time::Duration::from_secs(20);
        let whole = tokio::time::timeout(within, closed_with_bytes_unread(true));
        assert_eq!(whole.await.unwrap().unwrap(), SENT);
        // Closed at once, the peer gets a reset: not all the bytes.
        let cut = tokio::time::timeout(within, closed_with_bytes_unread(false));
        let cut = cut.await.unwrap();
        assert!(cut.as_ref().map_or(true, |n| *n < SENT), "{cut:?}");
    }

    const SENT: usize = 256 * 1024;

    /// A client that reads nothing for now, and the server's socket to it:
    /// most of what the server sends stays in the server's kernel, whose
    /// send buffer has room for all of it (up to the system's bound, about
    /// 416 KiB by default).
    async fn slow_reader() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(16 * 1024).unwrap();
        let client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&tcp)
            .set_send_buffer_size(4 << 20)
            .unwrap();
        (client, tcp)
    }

    /// What the client reads to its end, `linger` or not.
    async fn closed_with_bytes_unread(linger: bool) -> io::Result<usize> {
        let (mut client, tcp) = slow_reader().await;
        client.write_all(&[1; 100]).await.unwrap();
        tcp.readable().await.unwrap();
        let mut server = LingeringClose::new(tcp);
        server.write_all(&vec![7u8; SENT]).await.unwrap();
        // Without a clean end (as after an error) it closes at once.
        if linger {
            server.shutdown().await.unwrap();
        }
        drop(server);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let _ = client.write_all(&[2; 100]).await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await?;
        assert!(got.iter().all(|b| *b == 7));
        Ok(got.len())
    }
}
