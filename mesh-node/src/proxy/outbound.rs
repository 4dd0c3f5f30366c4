//! Captured outbound connections: recover where the application was going and carry the bytes
//! there from inside the application's own network namespace.
//!
//! This is plain TCP for now; HBONE tunnelling replaces the upstream leg next.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_common::{FAMILY_INET, OrigDst, PROXY_MARK};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::Instrument;

use crate::{dataplane::Dataplane, enroll::Pod, netns::NetNs};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy buffer per direction: fewer syscalls than tokio's 8 KiB default on bulk transfers.
const COPY_BUFFER: usize = 64 * 1024;

/// Accepts captured connections on one of the pod's outbound listeners until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<Pod>, dataplane: Arc<Dataplane>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let span = tracing::info_span!("outbound", pod = %pod.spec, src_port = peer.port());
                tokio::spawn(handle(stream, peer, pod.clone(), dataplane.clone()).instrument(span));
            }
            Err(error) => {
                // EMFILE and friends: back off rather than spin; the listener stays open.
                tracing::warn!(pod = %pod.spec, %error, "accept on outbound listener failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(mut client: TcpStream, peer: SocketAddr, pod: Arc<Pod>, dataplane: Arc<Dataplane>) {
    let Some(orig) = dataplane.take_original_dst(pod.netns_cookie, peer.port()) else {
        tracing::warn!("no original destination recorded for this connection; closing it");
        return;
    };
    let dst = original_destination(&orig);
    let started = Instant::now();
    tracing::info!(original_dst = %dst, "outbound connection captured");
    let mut upstream = match connect_from_pod(&pod.netns, dst).await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::info!(original_dst = %dst, %error, "outbound connection failed: upstream connect");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    match tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        COPY_BUFFER,
        COPY_BUFFER,
    )
    .await
    {
        Ok((sent, received)) => tracing::info!(
            original_dst = %dst,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = started.elapsed().as_millis() as u64,
            "outbound connection closed"
        ),
        Err(error) => tracing::info!(
            original_dst = %dst,
            %error,
            duration_ms = started.elapsed().as_millis() as u64,
            "outbound connection reset"
        ),
    }
}

/// The socket address the application asked for. IPv4-mapped IPv6 destinations become IPv4.
pub fn original_destination(orig: &OrigDst) -> SocketAddr {
    let ip = if orig.family == FAMILY_INET {
        IpAddr::V4(Ipv4Addr::from(orig.ip[0].to_ne_bytes()))
    } else {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(orig.ip) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ipv6Addr::from(octets).to_canonical()
    };
    SocketAddr::new(ip, orig.port)
}

/// Connects to `dst` with a socket created inside the pod's namespace and marked so the capture
/// hooks leave it alone: the packets leave with the pod's own address.
async fn connect_from_pod(netns: &NetNs, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = netns
        .run(|| new_marked_socket(dst))
        .map_err(io::Error::other)??;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

fn new_marked_socket(dst: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_kernel_addresses() {
        let v4 = OrigDst {
            ip: [u32::from_ne_bytes([10, 1, 2, 3]), 0, 0, 0],
            port: 8080,
            family: FAMILY_INET,
            ..Default::default()
        };
        assert_eq!(original_destination(&v4), "10.1.2.3:8080".parse().unwrap());

        let mapped: Ipv6Addr = "::ffff:10.1.2.3".parse().unwrap();
        let mut ip = [0u32; 4];
        for (word, chunk) in ip.iter_mut().zip(mapped.octets().chunks_exact(4)) {
            *word = u32::from_ne_bytes(chunk.try_into().unwrap());
        }
        let v6 = OrigDst {
            ip,
            port: 80,
            family: mesh_common::FAMILY_INET6,
            ..Default::default()
        };
        assert_eq!(original_destination(&v6), "10.1.2.3:80".parse().unwrap());
    }
}
