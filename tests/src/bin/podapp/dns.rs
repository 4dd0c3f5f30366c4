//! `podapp resolve SERVER NAME A|AAAA MODE`: one DNS query, as a resolver library would send it.
//! MODE: `connected` (connect + send, as glibc and Go), `unconnected` (sendto/recvfrom, as
//! musl), `tcp`, or `auto` (connected UDP, then TCP when the answer is truncated). Prints
//! `answer rcode=… tc=0|1 transport=udp|tcp from=<reply source> peer=<getpeername> ips=a,b`.
//!
//! `podapp dnsflood SERVER COUNT`: COUNT malformed datagrams (every other one with a readable
//! header), as fast as they go; prints `flooded sent=N replies=M`.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RData, RecordType},
};

/// Longer than the DNS proxy's 5 s upstream deadline, so a SERVFAIL arrives before it.
const TIMEOUT: Duration = Duration::from_secs(8);

pub fn resolve(server: &str, name: &str, qtype: &str, mode: &str) -> Result<bool, String> {
    let server: SocketAddr = server
        .parse()
        .map_err(|e| format!("server {server}: {e}"))?;
    let qtype = match qtype {
        "A" => RecordType::A,
        "AAAA" => RecordType::AAAA,
        other => return Err(format!("type {other}: A or AAAA")),
    };
    let name = Name::from_ascii(name).map_err(|e| format!("name {name}: {e}"))?;
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name, qtype));
    let bytes = query.to_vec().map_err(|e| e.to_string())?;
    let (reply, transport, from, peer) = match mode {
        "connected" | "auto" => {
            let (reply, from, peer) = udp_connected(server, &bytes)?;
            if mode == "auto" && reply.metadata.truncation {
                let (reply, peer) = tcp(server, &bytes)?;
                (reply, "tcp", peer, peer)
            } else {
                (reply, "udp", from, peer)
            }
        }
        "unconnected" => {
            let (reply, from) = udp_unconnected(server, &bytes)?;
            (reply, "udp", from, from)
        }
        "tcp" => {
            let (reply, peer) = tcp(server, &bytes)?;
            (reply, "tcp", peer, peer)
        }
        other => return Err(format!("mode {other}")),
    };
    if reply.metadata.id != query.metadata.id {
        return Err(format!(
            "reply id {} for query {}",
            reply.metadata.id, query.metadata.id
        ));
    }
    let ips: Vec<String> = reply
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(aaaa) => Some(aaaa.0.to_string()),
            _ => None,
        })
        .collect();
    println!(
        "answer rcode={} tc={} transport={transport} from={from} peer={peer} ips={}",
        match u16::from(reply.metadata.response_code) {
            0 => "NOERROR".to_owned(),
            1 => "FORMERR".to_owned(),
            2 => "SERVFAIL".to_owned(),
            3 => "NXDOMAIN".to_owned(),
            other => other.to_string(),
        },
        u8::from(reply.metadata.truncation),
        ips.join(",")
    );
    Ok(true)
}

fn udp_connected(
    server: SocketAddr,
    query: &[u8],
) -> Result<(Message, SocketAddr, SocketAddr), String> {
    let socket = udp_socket(server)?;
    socket
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    socket
        .connect(server)
        .map_err(|e| format!("connect {server}: {e}"))?;
    let peer = socket.peer_addr().map_err(|e| e.to_string())?;
    socket.send(query).map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 65535];
    let len = socket
        .recv(&mut buf)
        .map_err(|e| format!("no answer: {e}"))?;
    let reply = Message::from_vec(&buf[..len]).map_err(|e| format!("bad answer: {e}"))?;
    Ok((reply, peer, peer))
}

fn udp_unconnected(server: SocketAddr, query: &[u8]) -> Result<(Message, SocketAddr), String> {
    let socket = udp_socket(server)?;
    socket
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    socket
        .send_to(query, server)
        .map_err(|e| format!("send to {server}: {e}"))?;
    let mut buf = vec![0u8; 65535];
    let (len, from) = socket
        .recv_from(&mut buf)
        .map_err(|e| format!("no answer: {e}"))?;
    let reply = Message::from_vec(&buf[..len]).map_err(|e| format!("bad answer: {e}"))?;
    Ok((reply, from))
}

fn tcp(server: SocketAddr, query: &[u8]) -> Result<(Message, SocketAddr), String> {
    let mut stream = TcpStream::connect_timeout(&server, TIMEOUT)
        .map_err(|e| format!("connect {server}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).map_err(|e| e.to_string())?;
    let mut len = [0u8; 2];
    stream
        .read_exact(&mut len)
        .map_err(|e| format!("no answer: {e}"))?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream
        .read_exact(&mut reply)
        .map_err(|e| format!("short answer: {e}"))?;
    let reply = Message::from_vec(&reply).map_err(|e| format!("bad answer: {e}"))?;
    Ok((reply, peer))
}

/// An unbound socket of the server's family; an IPv6 one is dual-stack, so an IPv4-mapped
/// server is reached over IPv4 from it.
fn udp_socket(server: SocketAddr) -> Result<UdpSocket, String> {
    let any = if server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    UdpSocket::bind(any).map_err(|e| e.to_string())
}

pub fn flood(server: &str, count: &str) -> Result<bool, String> {
    let server: SocketAddr = server
        .parse()
        .map_err(|e| format!("server {server}: {e}"))?;
    let count: usize = count.parse().map_err(|e| format!("count {count}: {e}"))?;
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.connect(server).map_err(|e| e.to_string())?;
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut sent = 0;
    let mut replies = 0;
    let mut buf = [0u8; 512];
    for i in 0..count {
        // A 12-byte header claiming one question, then garbage; or 5 bytes of nothing.
        let datagram: Vec<u8> = if i % 2 == 0 {
            let mut d = vec![(i >> 8) as u8, i as u8, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
            d.extend_from_slice(&[0xff; 20]);
            d
        } else {
            vec![0xde, 0xad, 0xbe, 0xef, 0x00]
        };
        if socket.send(&datagram).is_ok() {
            sent += 1;
        }
        while socket.recv(&mut buf).is_ok() {
            replies += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    while socket.recv(&mut buf).is_ok() {
        replies += 1;
    }
    println!("flooded sent={sent} replies={replies}");
    Ok(true)
}
