//! Sockets opened on behalf of a pod: created inside its network namespace and marked, so they
//! leave with the pod's address and the capture hooks leave them alone; connections to a pod's
//! application from its client's address; and, for the gateway, plain ones from mesh-node's
//! own namespace. Every one has a connect deadline and NODELAY.
use std::{io, net::SocketAddr, time::Duration};

use mesh_common::{DELIVERY_MARK, PROXY_MARK};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::OriginalDestinations;
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
/// routing brings the replies back, see `source_routing`), and its SYN is announced to the
/// kernel for the length of the connect so that `sk_lookup` lets it through to the
/// application. Where any of that is refused, it connects from the pod's own address.
pub async fn connect_as_client(
    netns: &NetNs,
    client: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
    kernel: &dyn OriginalDestinations,
) -> io::Result<TcpStream> {
    let bound = netns
        .run(|| new_transparent_socket(client, dst))
        .map_err(io::Error::other)?;
    let (socket, from) = match bound {
        Ok(bound) => bound,
        Err(error) => {
            tracing::debug!(%client, app = %dst, %error, "cannot bind the client's address; connecting from the pod's");
            return connect_from_pod(netns, dst, timeout).await;
        }
    };
    if !kernel.begin_delivery(from, dst) {
        return connect_from_pod(netns, dst, timeout).await;
    }
    // Ended however the connect ends, also when the connection is dropped mid-connect.
    let _announced = Announced { kernel, from, dst };
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    connect_within(socket, dst, timeout).await
}

struct Announced<'a> {
    kernel: &'a dyn OriginalDestinations,
    from: SocketAddr,
    dst: SocketAddr,
}

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        self.kernel.end_delivery(self.from, self.dst);
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
    match socket.bind(&client.into()) {
        // The client's port is taken here (another delivery from the same client address):
        // keep the address, let the kernel choose the port.
        Err(error) if error.kind() == io::ErrorKind::AddrInUse && client.port() != 0 => {
            socket.bind(&SocketAddr::new(client.ip(), 0).into())?
        }
        result => result?,
    }
    let from = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
    Ok((socket, from))
}
