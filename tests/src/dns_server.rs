//! A DNS server for tests, in a node's network namespace (the cluster's resolver, as kube-dns
//! would be): answers the names it is given over UDP and TCP, NXDOMAIN for the rest, and over
//! UDP answers [`BIG_NAME`] truncated (its 40 addresses do not fit in 512 bytes) so clients ask
//! again over TCP. It records every query it got: name, transport and the source address.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
};

use anyhow::{Context, Result};
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};

/// A name with 40 A records: over UDP it comes back truncated.
pub const BIG_NAME: &str = "big.example.org";
/// A name the server never answers (a resolver that is down for it).
pub const SILENT_NAME: &str = "silent.example.org";

/// One query the server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub name: String,
    pub tcp: bool,
    pub from: SocketAddr,
}

#[derive(Default)]
struct Zone {
    records: HashMap<String, Vec<IpAddr>>,
    seen: Vec<Seen>,
}

pub struct DnsServer {
    zone: Arc<Mutex<Zone>>,
    pub addr: SocketAddr,
    stop: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl DnsServer {
    /// Serves on `ip:53` (UDP and TCP) inside `netns`.
    pub fn start(netns: &Path, ip: IpAddr) -> Result<Self> {
        let zone = Arc::new(Mutex::new(Zone::default()));
        {
            let mut z = zone.lock().unwrap_or_else(PoisonError::into_inner);
            let big = (1..=40)
                .map(|i| IpAddr::V4(Ipv4Addr::new(203, 0, 113, i)))
                .collect();
            z.records.insert(BIG_NAME.to_owned(), big);
        }
        let addr = SocketAddr::new(ip, 53);
        let netns =
            std::fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let served = zone.clone();
        let thread = std::thread::spawn(move || {
            let setup = || -> Result<_> {
                // SAFETY: setns on this thread only; `netns` is open.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let (udp, tcp) = runtime.block_on(async {
                    Ok::<_, std::io::Error>((
                        tokio::net::UdpSocket::bind(addr).await?,
                        tokio::net::TcpListener::bind(addr).await?,
                    ))
                })?;
                Ok((runtime, udp, tcp))
            };
            let (runtime, udp, tcp) = match setup() {
                Ok(parts) => parts,
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            runtime.block_on(async move {
                let udp_loop = async {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let Ok((len, from)) = udp.recv_from(&mut buf).await else {
                            continue;
                        };
                        if let Some(reply) = answer(&served, &buf[..len], from, false) {
                            let _ = udp.send_to(&reply, from).await;
                        }
                    }
                };
                let tcp_loop = async {
                    loop {
                        let Ok((mut stream, from)) = tcp.accept().await else {
                            continue;
                        };
                        let served = served.clone();
                        tokio::spawn(async move {
                            let mut len = [0u8; 2];
                            while stream.read_exact(&mut len).await.is_ok() {
                                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                                if stream.read_exact(&mut query).await.is_err() {
                                    return;
                                }
                                let Some(reply) = answer(&served, &query, from, true) else {
                                    return;
                                };
                                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                                framed.extend_from_slice(&reply);
                                if stream.write_all(&framed).await.is_err() {
                                    return;
                                }
                            }
                        });
                    }
                };
                tokio::select! {
                    () = udp_loop => {}
                    () = tcp_loop => {}
                    _ = stop_rx => {}
                }
            });
        });
        ready_rx.recv().context("DNS server thread ended")??;
        Ok(Self {
            zone,
            addr,
            stop: Some((stop_tx, thread)),
        })
    }

    /// Adds (or replaces) the addresses of `name`.
    pub fn add(&self, name: &str, ips: &[IpAddr]) {
        self.lock()
            .records
            .insert(name.to_ascii_lowercase(), ips.to_vec());
    }

    /// Every query received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Queries received for `name`.
    pub fn seen_for(&self, name: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.name == name).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Zone> {
        self.zone.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.stop.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

fn answer(zone: &Mutex<Zone>, query: &[u8], from: SocketAddr, tcp: bool) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let question = query.queries.first()?.clone();
    let name = question
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let mut zone = zone.lock().unwrap_or_else(PoisonError::into_inner);
    zone.seen.push(Seen {
        name: name.clone(),
        tcp,
        from,
    });
    if name == SILENT_NAME {
        return None;
    }
    let mut reply = Message::new(
        query.metadata.id,
        MessageType::Response,
        query.metadata.op_code,
    );
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    match zone.records.get(&name) {
        None => reply.metadata.response_code = ResponseCode::NXDomain,
        Some(_) if name == BIG_NAME && !tcp => reply.metadata.truncation = true,
        Some(ips) => {
            for ip in ips {
                let data = match (question.query_type(), ip) {
                    (RecordType::A, IpAddr::V4(v4)) => RData::A(rdata::A(*v4)),
                    (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(rdata::AAAA(*v6)),
                    _ => continue,
                };
                let owner: Name = question.name().clone();
                reply.add_answer(Record::from_rdata(owner, 60, data));
            }
        }
    }
    reply.to_vec().ok()
}
