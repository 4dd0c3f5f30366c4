//! The DNS proxy of an enrolled pod: 127.0.0.1:15053, UDP and TCP, inside the pod's network
//! namespace, where the kernel sends the pod's queries to port 53 (mesh-ebpf `dns.rs`).
//!
//! A query for a mesh name (a service hostname or one of its short forms, [`answer::find`]) is
//! answered from the mesh state: the service's VIPs on the pod's network, A and AAAA. Anything
//! else goes to the resolver the pod asked (its original destination), from a socket of the
//! pod's own namespace that the hooks leave alone, and the answer is relayed unchanged; a
//! resolver that does not answer within [`UPSTREAM_TIMEOUT`] gets the pod a SERVFAIL.
//!
//! Names mesh-node does not know are always forwarded, including names under the cluster
//! domain: headless services' pod names, and services the control plane does not describe,
//! are the cluster resolver's to answer.
//!
//! Bad input: a datagram that is not a DNS query is answered FORMERR when its header can be
//! read (and dropped when not); every pod has its own bound on forwarded queries in flight
//! ([`MAX_IN_FLIGHT`]), so a pod flooding its proxy slows only itself.
pub mod answer;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata},
};
use mesh_common::PROXY_MARK;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};

pub use crate::config::DnsSettings;
use crate::{pod::Pod, proxy::ProxyContext};

/// How long a pod's resolver has to answer a forwarded query.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Forwarded queries of one pod in flight at once; beyond, queries are dropped (the pod's
/// resolver library retries).
pub const MAX_IN_FLIGHT: usize = 256;
/// TTL of answers from the mesh state, as ztunnel's.
const TTL: u32 = 30;
/// The largest UDP answer without EDNS.
const UDP_PLAIN_LIMIT: usize = 512;
/// Largest DNS message over TCP (the length prefix is 16 bits).
const MAX_MESSAGE: usize = 65535;
/// TCP connections of one pod served at once.
const MAX_TCP_CONNECTIONS: usize = 64;
/// How long a TCP client may stay silent between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What to do with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An answer from the mesh state: send these bytes back.
    Answer(Vec<u8>),
    /// Not a DNS query: send this FORMERR back.
    Formerr(Vec<u8>),
    /// Not ours: ask the pod's resolver.
    Forward,
    /// Not even a DNS header: say nothing.
    Drop,
}

/// The answer to `query` from `asker` (pure: a read of the state): a mesh name's A or AAAA
/// records, FORMERR for what does not parse, or `Forward`. `udp`: the answer must fit the
/// client's UDP size or come truncated.
pub fn respond(
    state: &crate::state::State,
    query: &[u8],
    asker: answer::Asker<'_>,
    domain: &str,
    udp: bool,
) -> Verdict {
    let message = match Message::from_vec(query) {
        Ok(message) => message,
        Err(_) => {
            return match formerr(query) {
                Some(reply) => Verdict::Formerr(reply),
                None => Verdict::Drop,
            };
        }
    };
    let meta = &message.metadata;
    if meta.message_type != MessageType::Query
        || meta.op_code != OpCode::Query
        || message.queries.len() != 1
    {
        return Verdict::Forward;
    }
    let question = &message.queries[0];
    let (qtype, qname) = (question.query_type(), question.name().to_ascii());
    if !matches!(qtype, RecordType::A | RecordType::AAAA) {
        return Verdict::Forward;
    }
    let Some(ips) = answer::find(state, &qname, asker, domain) else {
        return Verdict::Forward;
    };
    let mut reply = Message::response(meta.id, OpCode::Query);
    reply.metadata.recursion_desired = meta.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.metadata.response_code = ResponseCode::NoError;
    reply.add_query(question.clone());
    let records = ips.iter().filter_map(|ip| match (qtype, ip) {
        (RecordType::A, IpAddr::V4(v4)) => Some(RData::A(rdata::A(*v4))),
        (RecordType::AAAA, IpAddr::V6(v6)) => Some(RData::AAAA(rdata::AAAA(*v6))),
        _ => None,
    });
    for data in records {
        reply.add_answer(Record::from_rdata(question.name().clone(), TTL, data));
    }
    let Ok(mut bytes) = reply.to_vec() else {
        return Verdict::Forward;
    };
    let limit = message.edns.as_ref().map_or(UDP_PLAIN_LIMIT, |edns| {
        usize::from(edns.max_payload()).max(UDP_PLAIN_LIMIT)
    });
    if udp && bytes.len() > limit {
        // Too large for this client over UDP: truncated, so that it asks again over TCP.
        reply.answers.clear();
        reply.metadata.truncation = true;
        bytes = reply.to_vec().unwrap_or_default();
    }
    Verdict::Answer(bytes)
}

/// The proxy's shared parts for one pod.
struct Proxy {
    pod: Arc<Pod>,
    ctx: Arc<ProxyContext>,
    settings: DnsSettings,
    in_flight: Arc<Semaphore>,
}

/// Serves the pod's DNS proxy on each (UDP, TCP) pair of sockets until the task is aborted.
pub async fn serve(
    sockets: Vec<(UdpSocket, TcpListener)>,
    pod: Arc<Pod>,
    ctx: Arc<ProxyContext>,
    settings: DnsSettings,
) {
    let proxy = Arc::new(Proxy {
        pod,
        ctx,
        settings,
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
    });
    let mut loops = tokio::task::JoinSet::new();
    for (udp, tcp) in sockets {
        loops.spawn(serve_udp(udp, proxy.clone()));
        loops.spawn(serve_tcp(tcp, proxy.clone()));
    }
    // Aborting this task drops the set, which aborts the loops.
    while loops.join_next().await.is_some() {}
}

async fn serve_udp(socket: UdpSocket, proxy: Arc<Proxy>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(pod = %proxy.pod.spec, %error, "DNS proxy receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let query = buf[..len].to_vec();
        match proxy.decide(&query, client, Transport::Udp) {
            Verdict::Answer(reply) | Verdict::Formerr(reply) => {
                let _ = socket.send_to(&reply, client).await;
            }
            Verdict::Drop => proxy.ctx.metrics.dns_request("dropped"),
            Verdict::Forward => {
                let Ok(permit) = proxy.in_flight.clone().try_acquire_owned() else {
                    proxy.ctx.metrics.dns_request("dropped");
                    continue;
                };
                let (proxy, socket) = (proxy.clone(), socket.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let reply = proxy.forward_udp(&query).await;
                    let _ = socket.send_to(&reply, client).await;
                });
            }
        }
    }
}

async fn serve_tcp(listener: TcpListener, proxy: Arc<Proxy>) {
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(pod = %proxy.pod.spec, %error, "DNS proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue; // dropping the stream closes it
        };
        // The resolver the application connected to, as for any captured connection.
        let upstream = proxy
            .ctx
            .original_dsts
            .take(proxy.pod.netns_cookie, client.port());
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = proxy.serve_tcp_client(stream, client, upstream).await {
                tracing::debug!(pod = %proxy.pod.spec, %error, "DNS-over-TCP client ended");
            }
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Proxy {
    /// Answers a mesh name, refuses what cannot be read, or sends it on; counts answers.
    fn decide(&self, query: &[u8], client: SocketAddr, transport: Transport) -> Verdict {
        let asker = answer::Asker {
            namespace: &self.pod.spec.namespace,
            network: &self.ctx.node.network,
        };
        let verdict = respond(
            &self.ctx.state(),
            query,
            asker,
            &self.settings.domain,
            transport == Transport::Udp,
        );
        match &verdict {
            Verdict::Answer(_) => {
                tracing::debug!(target: "dns", pod = %self.pod.spec, %client, "DNS query answered from the mesh state");
                self.ctx.metrics.dns_request("answered");
            }
            Verdict::Formerr(_) => self.ctx.metrics.dns_request("formerr"),
            Verdict::Forward | Verdict::Drop => {}
        }
        verdict
    }

    /// Asks the pod's resolver over UDP; SERVFAIL when there is none, it fails or is silent.
    async fn forward_udp(&self, query: &[u8]) -> Vec<u8> {
        let started = Instant::now();
        let result = match self.ctx.original_dsts.dns_upstream(self.pod.netns_cookie) {
            Some(upstream) => {
                tokio::time::timeout(UPSTREAM_TIMEOUT, self.ask_udp(upstream, query)).await
            }
            None => Ok(Err(io::Error::other("no resolver recorded for the pod"))),
        };
        self.finish_forward(query, started, result)
    }

    async fn ask_udp(&self, upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
        let socket = self
            .pod
            .netns
            .run(|| marked(upstream, Type::DGRAM, Protocol::UDP))
            .map_err(io::Error::other)??;
        let socket = UdpSocket::from_std(socket.into())?;
        socket.connect(upstream).await?;
        socket.send(query).await?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let len = socket.recv(&mut buf).await?;
            // Only the answer to this query (same id) is relayed.
            if len >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
                buf.truncate(len);
                return Ok(buf);
            }
        }
    }

    async fn ask_tcp(&self, upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
        let socket = self
            .pod
            .netns
            .run(|| marked(upstream, Type::STREAM, Protocol::TCP))
            .map_err(io::Error::other)??;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        let mut stream = socket.connect(upstream).await?;
        write_framed(&mut stream, query).await?;
        read_framed(&mut stream)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "resolver closed"))
    }

    fn finish_forward(
        &self,
        query: &[u8],
        started: Instant,
        result: Result<io::Result<Vec<u8>>, tokio::time::error::Elapsed>,
    ) -> Vec<u8> {
        match result {
            Ok(Ok(reply)) => {
                self.ctx
                    .metrics
                    .dns_upstream(started.elapsed().as_secs_f64());
                self.ctx.metrics.dns_request("forwarded");
                reply
            }
            Ok(Err(error)) => {
                tracing::debug!(target: "dns", pod = %self.pod.spec, %error, "DNS forward failed");
                self.ctx.metrics.dns_request("servfail");
                servfail(query)
            }
            Err(_) => {
                tracing::debug!(target: "dns", pod = %self.pod.spec, "DNS resolver did not answer in time");
                self.ctx.metrics.dns_request("servfail");
                servfail(query)
            }
        }
    }

    /// One DNS-over-TCP client: length-prefixed queries, answered in order.
    async fn serve_tcp_client(
        &self,
        mut stream: TcpStream,
        client: SocketAddr,
        upstream: Option<SocketAddr>,
    ) -> io::Result<()> {
        loop {
            let query = match tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await {
                Ok(Ok(Some(query))) => query,
                Ok(Ok(None)) | Err(_) => return Ok(()),
                Ok(Err(error)) => return Err(error),
            };
            let reply = match self.decide(&query, client, Transport::Tcp) {
                Verdict::Answer(reply) | Verdict::Formerr(reply) => reply,
                Verdict::Drop => {
                    self.ctx.metrics.dns_request("dropped");
                    return Ok(());
                }
                Verdict::Forward => {
                    let started = Instant::now();
                    let upstream = upstream
                        .or_else(|| self.ctx.original_dsts.dns_upstream(self.pod.netns_cookie));
                    let result = match upstream {
                        Some(upstream) => {
                            tokio::time::timeout(UPSTREAM_TIMEOUT, self.ask_tcp(upstream, &query))
                                .await
                        }
                        None => Ok(Err(io::Error::other("no resolver recorded for the pod"))),
                    };
                    self.finish_forward(&query, started, result)
                }
            };
            write_framed(&mut stream, &reply).await?;
        }
    }
}

/// A socket of the pod's namespace that the capture hooks leave alone.
fn marked(dst: SocketAddr, kind: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(dst), kind, Some(protocol))?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

async fn read_framed(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// A header-only reply with `code`, echoing the query's id and opcode; `None` when the query
/// is too short to have a header.
fn header_reply(query: &[u8], code: u8) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut reply = vec![0u8; 12];
    reply[..2].copy_from_slice(&query[..2]);
    // QR=1, the query's opcode and RD; RA=1 and the response code.
    reply[2] = 0x80 | (query[2] & 0x79);
    reply[3] = 0x80 | (code & 0x0f);
    Some(reply)
}

fn formerr(query: &[u8]) -> Option<Vec<u8>> {
    header_reply(query, 1)
}

fn servfail(query: &[u8]) -> Vec<u8> {
    header_reply(query, 2).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use hickory_proto::{op::Query, rr::Name};

    use super::*;
    use crate::{
        proto::workload as pb,
        state::{State, convert},
    };

    /// A service `big.default.svc.cluster.local` with `count` IPv4 VIPs.
    fn state_with(count: u8) -> State {
        let mut state = State::new();
        let service = pb::Service {
            name: "big".into(),
            namespace: "default".into(),
            hostname: "big.default.svc.cluster.local".into(),
            addresses: (1..=count)
                .map(|i| pb::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 1, i],
                    length: None,
                })
                .collect(),
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 80,
                ..Default::default()
            }],
            ..Default::default()
        };
        state.upsert_service(convert::service(service).unwrap());
        state
    }

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        message.to_vec().unwrap()
    }

    const ASKER: answer::Asker<'static> = answer::Asker {
        namespace: "default",
        network: "",
    };

    fn answers(verdict: &Verdict) -> (usize, bool) {
        let Verdict::Answer(bytes) = verdict else {
            panic!("not an answer: {verdict:?}");
        };
        let message = Message::from_vec(bytes).unwrap();
        (message.answers.len(), message.metadata.truncation)
    }

    #[test]
    fn a_large_answer_is_truncated_over_udp_and_whole_over_tcp() {
        let state = state_with(60);
        let q = query("big", RecordType::A);
        assert_eq!(
            answers(&respond(&state, &q, ASKER, "cluster.local", true)),
            (0, true)
        );
        assert_eq!(
            answers(&respond(&state, &q, ASKER, "cluster.local", false)),
            (60, false)
        );
        let small = state_with(3);
        assert_eq!(
            answers(&respond(&small, &q, ASKER, "cluster.local", true)),
            (3, false)
        );
    }

    #[test]
    fn other_types_names_and_garbage() {
        let state = state_with(1);
        let mx = query("big", RecordType::MX);
        assert_eq!(
            respond(&state, &mx, ASKER, "cluster.local", true),
            Verdict::Forward
        );
        let other = query("example.org", RecordType::A);
        assert_eq!(
            respond(&state, &other, ASKER, "cluster.local", true),
            Verdict::Forward
        );
        let mut garbage = query("big", RecordType::A);
        garbage.truncate(14);
        assert!(matches!(
            respond(&state, &garbage, ASKER, "cluster.local", true),
            Verdict::Formerr(_)
        ));
        assert_eq!(
            respond(&state, &[1, 2, 3], ASKER, "cluster.local", true),
            Verdict::Drop
        );
    }

    #[test]
    fn header_replies_echo_the_id_and_set_the_code() {
        let query = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        let reply = formerr(&query).unwrap();
        assert_eq!(&reply[..2], &[0xab, 0xcd]);
        assert_eq!(reply[2] & 0x80, 0x80, "a response");
        assert_eq!(reply[2] & 0x01, 0x01, "RD kept");
        assert_eq!(reply[3] & 0x0f, 1, "FORMERR");
        assert_eq!(servfail(&query)[3] & 0x0f, 2);
        assert_eq!(formerr(&query[..11]), None, "no header, no reply");
    }
}
