//! One HBONE tunnel's bytes.
//!
//! The data path joins a tunnel to a socket with [`H2Stream::splice`], which moves bytes
//! between the socket and h2 without copying them in user space: the socket is read into a
//! buffer whose filled part h2 sends by reference, and the frames h2 receives are written to
//! the socket as they are. For other uses the stream is also `AsyncRead` over the receive side
//! and `AsyncWrite` over the send side (one copy each way). Either way, shutting down writing
//! ends the stream (END_STREAM), which the far side reads as EOF: half-close carries through
//! the tunnel.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_util::io::poll_read_buf;

use crate::splice::{COPY_BUFFER_INITIAL, COPY_BUFFER_MAX, Ended, Relay, Revoked, run};

/// An HBONE tunnel's bytes. `lease` is held for the tunnel's life (the pool counts it).
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    write_closed: bool,
    /// Shutting down also waits for the far side's end of stream (see
    /// [`H2Stream::drained_on_shutdown`]).
    drain_on_shutdown: bool,
    _lease: Option<Box<dyn Send + Sync>>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            drain_on_shutdown: false,
            _lease: None,
        }
    }

    /// Makes `poll_shutdown` end the sending side, then read (and discard) until the far
    /// side ends too. For a stream that carries a protocol of its own (the inner TLS of
    /// double HBONE): that protocol's close (`close_notify`, then shutdown) must not be
    /// followed by dropping a stream whose receiving side is still open, which h2 turns into
    /// a reset (RST_STREAM CANCEL) that the far side would count as a failed connection.
    pub fn drained_on_shutdown(mut self) -> Self {
        self.drain_on_shutdown = true;
        self
    }

    /// Keeps `lease` alive as long as the stream.
    pub fn with_lease(mut self, lease: impl Send + Sync + 'static) -> Self {
        self._lease = Some(Box::new(lease));
        self
    }
}

impl H2Stream {
    /// Joins the tunnel with `socket` until both directions end, one fails, or `revoked`
    /// resolves. In the result, `a` is the socket and `b` the tunnel: `a_to_b` counts the bytes
    /// sent into the tunnel. EOF on either side is passed on as the other's end of writing; any
    /// other end resets the stream (RST_STREAM CANCEL), so the far side sees a reset, not an
    /// end of stream. Resetting the socket is the caller's (it owns the socket's linger).
    pub async fn splice(mut self, socket: &mut TcpStream, revoked: Option<Revoked>) -> Ended {
        let ended = {
            let (reader, writer) = socket.split();
            let relay = Spliced {
                reader,
                writer,
                send: &mut self.send,
                recv: &mut self.recv,
                upload: Upload::new(),
                download: Download::default(),
                uploaded: None,
                downloaded: None,
            };
            run(relay, revoked).await
        };
        if !ended.is_clean() {
            self.send.send_reset(h2::Reason::CANCEL);
        }
        ended
    }
}

/// A tunnel joined to a socket: the socket's halves and the stream's.
struct Spliced<'a, R, W> {
    reader: R,
    writer: W,
    send: &'a mut SendStream<Bytes>,
    recv: &'a mut RecvStream,
    upload: Upload,
    download: Download,
    /// Bytes of a finished direction (its buffer let go).
    uploaded: Option<u64>,
    downloaded: Option<u64>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Relay for Spliced<'_, R, W> {
    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.uploaded.is_none()
            && let Poll::Ready(result) = self.upload.poll(cx, &mut self.reader, self.send)
        {
            self.uploaded = Some(result?);
            // The buffer is freed now, not when the other direction ends.
            self.upload = Upload::new();
        }
        if self.downloaded.is_none()
            && let Poll::Ready(result) = self.download.poll(cx, self.recv, &mut self.writer)
        {
            self.downloaded = Some(result?);
        }
        if self.uploaded.is_some() && self.downloaded.is_some() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn moved(&self) -> (u64, u64) {
        (
            self.uploaded.unwrap_or(self.upload.copied),
            self.downloaded.unwrap_or(self.download.copied),
        )
    }
}

/// Socket to tunnel. Each read lands in `buf`; its filled part is split off and handed to h2
/// as `Bytes` (a reference, not a copy) once h2 grants send capacity for it. The buffer starts
/// small and doubles, up to [`COPY_BUFFER_MAX`], each time a read fills the room it had, so idle
/// connections stay cheap and bulk ones make few syscalls.
struct Upload {
    buf: BytesMut,
    /// Room to make before the next read; grows with the traffic.
    size: usize,
    copied: u64,
    eof: bool,
}

impl Upload {
    fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            size: COPY_BUFFER_INITIAL,
            copied: 0,
            eof: false,
        }
    }

    fn room(&self) -> usize {
        self.buf.capacity() - self.buf.len()
    }

    fn poll<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        send: &mut SendStream<Bytes>,
    ) -> Poll<io::Result<u64>> {
        if let Poll::Ready(reset) = send.poll_reset(cx) {
            return Poll::Ready(Err(reset_error(reset)));
        }
        loop {
            if !self.buf.is_empty() {
                send.reserve_capacity(self.buf.len());
                match send.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(0))) => continue,
                    Poll::Ready(Some(Ok(granted))) => {
                        let n = granted.min(self.buf.len());
                        send.send_data(self.buf.split_to(n).freeze(), false)
                            .map_err(h2_io_error)?;
                        self.copied += n as u64;
                        continue;
                    }
                    Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(h2_io_error(error))),
                    Poll::Ready(None) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                    Poll::Pending => {
                        // h2 has no room yet: read on into the buffer's free rest meanwhile,
                        // so the next send carries more.
                        if self.eof || self.room() == 0 {
                            return Poll::Pending;
                        }
                        let n = ready!(poll_read_buf(Pin::new(&mut *reader), cx, &mut self.buf))?;
                        self.eof = n == 0;
                        continue;
                    }
                }
            }
            if self.eof {
                send.send_data(Bytes::new(), true).map_err(h2_io_error)?;
                return Poll::Ready(Ok(self.copied));
            }
            if self.room() < self.size / 2 {
                // Reuses the allocation once h2 has let go of what was sent from it.
                self.buf.reserve(self.size);
            }
            let room = self.room();
            let n = ready!(poll_read_buf(Pin::new(&mut *reader), cx, &mut self.buf))?;
            if n == 0 {
                self.eof = true;
            } else if n == room {
                self.size = (self.size * 2).min(COPY_BUFFER_MAX);
            }
        }
    }
}

/// Tunnel to socket: each DATA frame h2 received is written to the socket as it is.
#[derive(Default)]
struct Download {
    chunk: Bytes,
    copied: u64,
    eof: bool,
}

impl Download {
    fn poll<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        recv: &mut RecvStream,
        writer: &mut W,
    ) -> Poll<io::Result<u64>> {
        loop {
            while !self.chunk.is_empty() {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.chunk))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.chunk.advance(n);
                self.copied += n as u64;
            }
            if self.eof {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.copied));
            }
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Window credit goes back as soon as the frame is taken: buffering stays
                    // bounded by one frame here plus the stream window inside h2.
                    let _ = recv.flow_control().release_capacity(data.len());
                    self.chunk = data;
                }
                Some(Err(error)) => return Poll::Ready(Err(h2_io_error(error))),
                None => self.eof = true,
            }
        }
    }
}

/// The error for a stream the peer reset (or whose connection failed).
fn reset_error(reset: Result<h2::Reason, h2::Error>) -> io::Error {
    match reset {
        Ok(reason) => io::Error::new(io::ErrorKind::ConnectionReset, h2::Error::from(reason)),
        Err(error) => h2_io_error(error),
    }
}

fn h2_io_error(error: h2::Error) -> io::Error {
    if error.is_io() {
        error
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else if error.reason() == Some(h2::Reason::NO_ERROR) {
        io::Error::from(io::ErrorKind::UnexpectedEof)
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, error)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Window credit goes back as soon as the frame is taken: buffering stays
                    // bounded by one frame here plus the stream window inside h2.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(error)) => return Poll::Ready(Err(h2_io_error(error))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        if let Poll::Ready(reset) = send.poll_reset(cx) {
            return Poll::Ready(Err(reset_error(reset)));
        }
        send.reserve_capacity(buf.len());
        let granted = loop {
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => break n,
                Some(Err(error)) => return Poll::Ready(Err(h2_io_error(error))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        };
        let n = granted.min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames as soon as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send
                .send_data(Bytes::new(), true)
                .map_err(h2_io_error)?;
        }
        if self.drain_on_shutdown {
            self.pending.clear();
            loop {
                match ready!(self.recv.poll_data(cx)) {
                    Some(Ok(data)) => {
                        let _ = self.recv.flow_control().release_capacity(data.len());
                    }
                    Some(Err(error)) => return Poll::Ready(Err(h2_io_error(error))),
                    None => break,
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt, duplex},
        net::TcpListener,
    };

    use super::*;
    use crate::splice::How;

    /// One CONNECT stream over an h2 connection in memory: the client's end and the server's.
    async fn tunnel_pair() -> (H2Stream, H2Stream) {
        let (client_io, server_io) = duplex(256 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let send = respond.send_response(Response::new(()), false).unwrap();
            H2Stream::new(send, request.into_body())
        });
        let (send_request, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let mut send_request = send_request.ready().await.unwrap();
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (response, send) = send_request.send_request(request, false).unwrap();
        let response = response.await.unwrap();
        (
            H2Stream::new(send, response.into_body()),
            server.await.unwrap(),
        )
    }

    /// An application's socket and the proxy's end of it, on loopback.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (proxy, _) = listener.accept().await.unwrap();
        (app, proxy)
    }

    fn pattern(len: u32, modulo: u32) -> Vec<u8> {
        (0..len).map(|i| (i % modulo) as u8).collect()
    }

    /// 3 MiB up and 300 kB down between a real socket and an h2 stream, each side half-closing:
    /// intact, in order, and counted.
    #[tokio::test]
    async fn splices_a_socket_and_a_tunnel_both_ways() {
        let (tunnel, mut far) = tunnel_pair().await;
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            far.write_all(&pattern(300_000, 241)).await.unwrap();
            far.shutdown().await.unwrap();
            got
        });
        let (mut app, mut proxy) = socket_pair().await;
        let spliced = tokio::spawn(async move { tunnel.splice(&mut proxy, None).await });
        let upload = pattern(3 << 20, 251);
        app.write_all(&upload).await.unwrap();
        app.shutdown().await.unwrap();
        let mut answer = Vec::new();
        app.read_to_end(&mut answer).await.unwrap();

        assert!(server.await.unwrap() == upload, "upload arrived intact");
        assert!(answer == pattern(300_000, 241), "answer arrived intact");
        let ended = spliced.await.unwrap();
        assert!(ended.is_clean(), "{ended:?}");
        assert_eq!((ended.a_to_b, ended.b_to_a), (3 << 20, 300_000));
    }

    /// The far side resetting the stream ends the splice as a reset, not a clean close.
    #[tokio::test]
    async fn a_reset_from_the_far_side_ends_the_splice_as_reset() {
        let (tunnel, mut far) = tunnel_pair().await;
        let (mut app, mut proxy) = socket_pair().await;
        let spliced = tokio::spawn(async move { tunnel.splice(&mut proxy, None).await });
        app.write_all(b"hello").await.unwrap();
        let mut hello = [0u8; 5];
        far.read_exact(&mut hello).await.unwrap();
        far.send.send_reset(h2::Reason::CANCEL);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), spliced);
        let ended = ended.await.expect("the reset ends the splice").unwrap();
        match &ended.how {
            How::Reset(error) => assert_eq!(error.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ended.a_to_b, 5,
            "the bytes moved before the reset are counted"
        );
    }

    /// The application resetting its socket resets the stream: the far side reads an error,
    /// never a clean end of stream, even after every byte sent so far.
    #[tokio::test]
    async fn a_reset_socket_resets_the_stream_at_the_far_side() {
        let (tunnel, mut far) = tunnel_pair().await;
        let (app, mut proxy) = socket_pair().await;
        let spliced = tokio::spawn(async move { tunnel.splice(&mut proxy, None).await });
        let mut app = app;
        app.write_all(&[9u8; 4000]).await.unwrap();
        let mut got = vec![0u8; 4000];
        far.read_exact(&mut got).await.unwrap();
        socket2::SockRef::from(&app)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(app);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), spliced)
            .await
            .expect("the socket's reset ends the splice")
            .unwrap();
        assert!(matches!(ended.how, How::Reset(_)), "{ended:?}");
        assert_eq!(ended.a_to_b, 4000);
        let mut rest = Vec::new();
        let error = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            far.read_to_end(&mut rest),
        )
        .await
        .expect("the far side learns of it")
        .expect_err("a reset stream is not a clean end");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
    }
}
