//! The TCP socket under an HBONE connection, closed so that the peer reads to the end.
//!
//! When h2 finishes a connection (GOAWAY, last stream done) it flushes, sends TLS
//! `close_notify` and shuts the socket down for writing; the bytes may still sit in the
//! kernel's send queue. If the socket were closed at once while the peer's last frames (its
//! WINDOW_UPDATEs for the data it is still reading, a PING ack) sit unread in the receive
//! queue, the kernel would answer with a RST and throw the unsent queue away: the peer loses
//! the end of its streams and sees a reset. So a dropped [`Lingering`] hands its socket to a
//! task that shuts it for writing, reads and discards until the peer's FIN (or
//! [`LINGER_TIMEOUT`]), and only then closes it — nginx's "lingering close".
//!
//! [`live`] counts HBONE sockets until they are closed for good, lingering ones included: a
//! drain waits for it to reach zero before the process exits, since exiting closes whatever
//! is left in the abrupt way.
use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

/// How long a closed HBONE socket waits for the peer's FIN.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// HBONE sockets (client and server side) not yet closed, lingering ones included.
pub fn live() -> usize {
    LIVE.load(Ordering::Acquire)
}

/// One count in [`live`], given back when dropped.
struct Live;

impl Live {
    fn new() -> Self {
        LIVE.fetch_add(1, Ordering::AcqRel);
        Self
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A TCP stream that lingers when dropped (see the module's text).
pub struct Lingering {
    tcp: Option<TcpStream>,
    live: Option<Live>,
}

impl Lingering {
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp: Some(tcp),
            live: Some(Live::new()),
        }
    }

    fn tcp(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.tcp
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let (Some(tcp), live) = (self.tcp.take(), self.live.take()) else {
            return;
        };
        // Outside a runtime (the process is ending) there is nobody to wait: plain close.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(linger(tcp, live));
        }
    }
}

async fn linger(mut tcp: TcpStream, _live: Option<Live>) {
    let _ = tcp.shutdown().await;
    let mut discard = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER_TIMEOUT, async {
        while let Ok(read) = tcp.read(&mut discard).await {
            if read == 0 {
                break;
            }
        }
    })
    .await;
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.tcp()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.tcp()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.tcp()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp()?.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// The peer's last bytes arrive after the local side is done; closing at once would reset
    /// the connection and lose the data still queued for the peer.
    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_socket_with_unread_input_still_delivers_what_it_sent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            // Unread by the other side: this is what makes a plain close send a RST.
            tcp.write_all(b"window update").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut received = Vec::new();
            let result = tcp.read_to_end(&mut received).await.map(|_| received.len());
            drop(tcp);
            result
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut lingering = Lingering::new(tcp);
        tokio::time::sleep(Duration::from_millis(50)).await;
        lingering.write_all(&vec![7u8; 4 << 20]).await.unwrap();
        drop(lingering);
        assert_eq!(
            peer.await.unwrap().expect("a clean end, not a reset"),
            4 << 20
        );
    }
}
