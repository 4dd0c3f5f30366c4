//! Sockets opened on behalf of a pod: created inside its network namespace and marked, so they
//! leave with the pod's address and the capture hooks leave them alone; and, for the gateway,
//! plain ones from mesh-node's own namespace. Every one has a connect deadline and NODELAY.
use std::{io, net::SocketAddr, time::Duration};

use mesh_common::PROXY_MARK;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

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
