use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

/// The byte stream under a WebSocket: hyper's upgraded connection, or an
/// in-memory pipe for tests. An enum rather than a boxed trait object, so
/// the hot path is statically dispatched.
#[derive(Debug)]
pub(crate) enum Transport {
    Upgraded(TokioIo<hyper::upgrade::Upgraded>),
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    Duplex(DuplexStream),
}

impl Transport {
    pub(crate) fn upgraded(u: hyper::upgrade::Upgraded) -> Self {
        Transport::Upgraded(TokioIo::new(u))
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Upgraded(t) => Pin::new(t).poll_read(cx, buf),
            Transport::Duplex(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Upgraded(t) => Pin::new(t).poll_write(cx, buf),
            Transport::Duplex(t) => Pin::new(t).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Upgraded(t) => Pin::new(t).poll_flush(cx),
            Transport::Duplex(t) => Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Upgraded(t) => Pin::new(t).poll_shutdown(cx),
            Transport::Duplex(t) => Pin::new(t).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Upgraded(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Transport::Duplex(t) => Pin::new(t).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Upgraded(t) => t.is_write_vectored(),
            Transport::Duplex(t) => t.is_write_vectored(),
        }
    }
}
