//! Sockets opened on behalf of a pod: created inside its network namespace and marked, so they
//! leave with the pod's address and the capture hooks leave them alone; connections to a pod's
//! application from its client's address; and, for the gateway, plain ones from mesh-node's
//! own namespace. Every one has a connect deadline and NODELAY.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use mesh_common::{DELIVERY_MARK, PROXY_MARK};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use mesh_common::SockKey;

use super::{OriginalDestinations, kernel_path};
use crate::netns::NetNs;

/// Connects to `dst` from inside `netns`.
pub async fn connect_from_pod(
    netns: &NetNs,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = netns
        .run(|| new_marked_socket(dst))
        .map_err(io::Error::other)??;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    connect_within(socket, dst, timeout).await
}

/// Connects to the application at `dst` inside `netns` from `client` (the client's address;
/// its port when free there, else any), so that the application sees its real client. The
/// socket is bound with `IP_TRANSPARENT` and carries [`DELIVERY_MARK`] (the pod's policy
/// routing brings the replies back, see `source_routing`), and the connection is announced to
/// the kernel so that `sk_lookup` lets its packets through to the application: the SYN, and an
/// ACK the listener must look up again (a SYN-cookie handshake, when its queue overflowed).
/// The announcement lasts as long as the returned [`Announced`] (keep it for the connection's
/// life). Where any of that is refused, it connects from the pod's own address.
///
/// `pair_with` (the destination's netns cookie and mesh-node's socket towards a same-node
/// client): the application's socket of this connection is paired for the kernel path before
/// the connect, so it joins, paired, when the application accepts it; the pairing ends with
/// the announcement.
pub async fn connect_as_client(
    netns: &NetNs,
    client: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
    kernel: &Arc<dyn OriginalDestinations>,
    pair_with: Option<(u64, SockKey)>,
) -> io::Result<(TcpStream, Option<Announced>)> {
    let bound = netns
        .run(|| new_transparent_socket(client, dst))
        .map_err(io::Error::other)?;
    let (socket, from) = match bound {
        Ok(bound) => bound,
        Err(error) => {
            tracing::debug!(%client, app = %dst, %error, "cannot bind the client's address; connecting from the pod's");
            return Ok((connect_from_pod(netns, dst, timeout).await?, None));
        }
    };
    if !kernel.begin_delivery(from, dst) {
        return Ok((connect_from_pod(netns, dst, timeout).await?, None));
    }
    // Withdrawn however this ends: a failed or cancelled connect, or the connection's end.
    let paired = pair_with.and_then(|(netns_cookie, toward_client)| {
        kernel_path::pair_server(&**kernel, netns_cookie, dst, from, toward_client)
    });
    let announced = Announced {
        kernel: kernel.clone(),
        from,
        dst,
        paired,
    };
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    let stream = connect_within(socket, dst, timeout).await?;
    Ok((stream, Some(announced)))
}

/// A connection from a client's address announced to `sk_lookup` (and its server's socket
/// paired for the kernel path, if asked); withdrawn when dropped.
pub struct Announced {
    kernel: Arc<dyn OriginalDestinations>,
    from: SocketAddr,
    dst: SocketAddr,
    paired: Option<SockKey>,
}

impl Announced {
    /// The application's socket paired for the kernel path, if it was.
    pub fn paired(&self) -> Option<SockKey> {
        self.paired
    }
}

impl Drop for Announced {
    fn drop(&mut self) {
        self.kernel.end_delivery(self.from, self.dst);
        if let Some(server) = self.paired {
            self.kernel.unpair(server);
        }
    }
}

/// Connects to `dst` from mesh-node's own namespace (the gateway to an endpoint's 15008).
pub async fn connect(dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    connect_within(socket, dst, timeout).await
}

async fn connect_within(
    socket: TcpSocket,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let stream = match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => result?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn new_marked_socket(dst: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Random ports tried for a client's address before giving up on it.
const PORT_TRIES: usize = 8;
/// Linux's default ephemeral range.
const EPHEMERAL_PORTS: std::ops::Range<u16> = 32768..61000;

/// A socket bound to `client` (not an address of this namespace) for a connection to `dst`,
/// and the address it got.
fn new_transparent_socket(client: SocketAddr, dst: SocketAddr) -> io::Result<(Socket, SocketAddr)> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(DELIVERY_MARK)?;
    match dst {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
    }
    socket.set_nonblocking(true)?;
    // The client's own port first (same-node and tunnelled clients), then a few random ones:
    // each try is one lookup, where `bind(port 0)` would scan the whole range, which a busy
    // client's TIME_WAIT connections can fill (one client at thousands of connections a
    // second). If none is free the caller connects from the pod's own address.
    let tries = std::iter::once(client.port())
        .filter(|port| *port != 0)
        .chain((0..PORT_TRIES).map(|_| fastrand::u16(EPHEMERAL_PORTS)));
    let mut bound = false;
    for port in tries {
        match socket.bind(&SocketAddr::new(client.ip(), port).into()) {
            Ok(()) => {
                bound = true;
                break;
            }
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => {}
            Err(error) => return Err(error),
        }
    }
    if !bound {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free port for the client's address",
        ));
    }
    let from = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
    Ok((socket, from))
}
