//! Same-node connections carried by the kernel (`--kernel-same-node`): once mesh-node has
//! accepted a connection, decided policy and connected to the destination pod, the `sk_msg`
//! program sends what each application writes straight out of mesh-node's socket towards
//! the other one, in the writer's own `sendmsg` (see ARCHITECTURE.md "Same-node bytes in the
//! kernel"). mesh-node keeps the relay running underneath: it carries whatever was written
//! before the switch, and the ends (FIN, reset) still pass through it, after the data.
//!
//! The server's direction is paired before mesh-node connects (its socket joins at accept,
//! already paired, so nothing it writes is ever relayed); the client's only once the
//! upstream exists, with a hand-over: the kernel switches it once mesh-node has written on
//! every byte the client sent through it ([`HandOver`] reports that count).
use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use mesh_common::SockKey;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::OriginalDestinations;
use crate::dataplane::sock_key;

/// mesh-node's socket towards a client application, joined to the kernel's socket map, so a
/// server's writes can go out of it. `None` when the kernel path is off or the socket could
/// not join (the connection then stays on the relay).
pub fn toward_client(
    kernel: &dyn OriginalDestinations,
    client: &TcpStream,
    netns_cookie: u64,
) -> Option<SockKey> {
    if !kernel.kernel_same_node() {
        return None;
    }
    let key = sock_key(
        netns_cookie,
        client.local_addr().ok()?,
        client.peer_addr().ok()?,
    );
    if kernel.join(key, client.as_raw_fd()) {
        Some(key)
    } else {
        kernel.leave(key.peer());
        None
    }
}

/// Takes the client application's socket of `client` (mesh-node's accepted socket) off the
/// kernel path: it joined when it connected, before mesh-node knew where it goes, and a
/// connection that is not paired gains nothing from it. Worse, a joined socket's `recv`
/// runs the kernel's sockmap code, which can return `EAGAIN` to a blocking reader woken
/// only by its own socket's write space (seen: a cross-node connection's reader, while its
/// writer thread sent, got `EAGAIN` after 320 KiB). Leaving right after routing, before any
/// answer can arrive, keeps such connections ordinary.
pub fn leave(kernel: &dyn OriginalDestinations, client: &TcpStream, netns_cookie: u64) {
    if !kernel.kernel_same_node() {
        return;
    }
    if let (Ok(local), Ok(peer)) = (client.local_addr(), client.peer_addr()) {
        kernel.leave(sock_key(netns_cookie, peer, local));
    }
}

/// The server application's socket of a connection mesh-node is about to make from `from` to
/// `app` in the namespace `netns_cookie`: paired with `toward_client` before the connect, so
/// that it joins when accepted. Returns its key, for [`Pairing`].
pub fn pair_server(
    kernel: &dyn OriginalDestinations,
    netns_cookie: u64,
    app: SocketAddr,
    from: SocketAddr,
    toward_client: SockKey,
) -> Option<SockKey> {
    let server = sock_key(netns_cookie, app, from);
    kernel.pair(server, toward_client, false).then_some(server)
}

/// A connection's pairings, removed when it ends (dropped); [`Pairing::finish`] first reads
/// what the kernel carried.
pub struct Pairing {
    kernel: Arc<dyn OriginalDestinations>,
    /// The client application's socket, paired with mesh-node's upstream socket.
    client: Option<SockKey>,
    /// The server application's socket, paired with mesh-node's socket towards the client.
    server: Option<SockKey>,
}

impl Pairing {
    /// Pairs the client's direction now that `upstream` (mesh-node's socket into the
    /// destination pod `netns_cookie`) is connected. `server` is the pairing made before the
    /// connect, if any; it is ended with this one.
    pub fn begin(
        kernel: Arc<dyn OriginalDestinations>,
        toward_client: SockKey,
        upstream: &TcpStream,
        netns_cookie: u64,
        server: Option<SockKey>,
    ) -> Self {
        let mut pairing = Self {
            kernel,
            client: None,
            server,
        };
        let (Ok(local), Ok(peer)) = (upstream.local_addr(), upstream.peer_addr()) else {
            return pairing;
        };
        let target = sock_key(netns_cookie, local, peer);
        let client = toward_client.peer();
        if pairing.kernel.join(target, upstream.as_raw_fd()) {
            pairing.kernel.relayed(client, 0);
            if pairing.kernel.pair(client, target, true) {
                pairing.client = Some(client);
                return pairing;
            }
        }
        pairing.kernel.leave(client);
        pairing
    }

    /// The upstream socket, reporting to the kernel what the relay writes on it.
    pub fn hand_over<'a>(&self, upstream: &'a mut TcpStream) -> HandOver<'a> {
        HandOver {
            upstream,
            kernel: self.client.map(|client| (self.kernel.clone(), client)),
            written: 0,
        }
    }

    /// Ends both pairings: the bytes the kernel carried (client → server, server → client).
    pub fn finish(&mut self) -> (u64, u64) {
        let carried = |key: Option<SockKey>| key.map_or(0, |key| self.kernel.unpair(key));
        let counts = (carried(self.client), carried(self.server));
        (self.client, self.server) = (None, None);
        counts
    }
}

impl Drop for Pairing {
    fn drop(&mut self) {
        self.finish();
    }
}

/// mesh-node's upstream socket of a paired connection: every write the relay makes on it
/// raises the count the kernel's hand-over compares with the client's.
pub struct HandOver<'a> {
    pub upstream: &'a mut TcpStream,
    kernel: Option<(Arc<dyn OriginalDestinations>, SockKey)>,
    written: u64,
}

impl AsyncRead for HandOver<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.upstream).poll_read(cx, buf)
    }
}

impl AsyncWrite for HandOver<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut *this.upstream).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some((kernel, client))) = (&written, &this.kernel) {
            // After the write: a count the kernel reads is never ahead of what is queued.
            this.written += *n as u64;
            kernel.relayed(*client, this.written);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.upstream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.upstream).poll_shutdown(cx)
    }
}
