//! Large socket reads under TLS.
//!
//! rustls asks its transport for at most about 4 KiB at a time, so a bulk
//! stream would cost a `recv` per 4 KiB. [`ReadBuffered`] reads up to
//! [`READ_BUFFER`] bytes per call into a buffer of its own and serves rustls
//! from it. The buffer exists only while data is flowing: it is released when
//! the socket has nothing more to read, so an idle connection holds none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub const READ_BUFFER: usize = 64 * 1024;

pub struct ReadBuffered<T> {
    inner: T,
    buf: BytesMut,
}

impl<T> ReadBuffered<T> {
    pub fn new(inner: T) -> Self {
        ReadBuffered {
            inner,
            buf: BytesMut::new(),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
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
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.reserve(READ_BUFFER);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Ready(Ok(0)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {}
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
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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
}
