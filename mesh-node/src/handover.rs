//! Hand-over of the listening sockets to a successor on the same node, so that an upgrade
//! refuses and resets nothing.
//!
//! Every mesh-node serves a Unix socket in the abstract namespace of its network namespace,
//! named after its pin directory ([`Name`]). A mesh-node that starts while another serves that
//! name is its successor: it connects, says hello, and receives a duplicate of every listening
//! socket the predecessor serves (admin endpoints, each pod's 15001/15006/15008 and DNS proxy,
//! or the gateway's listener) over `SCM_RIGHTS`, one per message, each named by what it is.
//! Both processes then hold the same sockets: a connection waiting in a listener's queue is
//! accepted by whichever process calls `accept` first, and no listener is ever closed, so there
//! is no moment at which a connection meets a closed port or the fail mode.
//!
//! The successor serves the admin endpoints at once (the predecessor pauses its own) and the
//! pods' listeners once it is ready (mesh state synced, certificates in hand); then it sends
//! `drain`, and the predecessor stops accepting and drains as on SIGTERM: its open connections
//! finish there. If the successor goes away before `drain`, the predecessor resumes its admin
//! endpoints and goes on as if nothing happened.
//!
//! The protocol is JSON, one message per `SOCK_SEQPACKET` datagram. Only a process of the same
//! effective user may connect.
use std::{
    collections::HashMap,
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::Path,
    sync::Arc,
    time::Duration,
};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt,
};
use serde::{Deserialize, Serialize};

/// How long either side waits for the other's next message before giving up on the hand-over.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message: a socket's description is far smaller.
const MAX_MESSAGE: usize = 4096;

/// The abstract socket name a mesh-node serves hand-overs on: one per pin directory and mode,
/// so independent mesh-nodes on one machine never meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Name(String);

impl Name {
    pub fn new(mode: &str, pin_dir: &Path) -> Self {
        let full = format!("mesh-node/handover/{mode}{}", pin_dir.display());
        // An abstract name holds at most 107 bytes; a longer path is named by its hash, one
        // that every release computes alike (FNV-1a; std's hasher may change between them).
        if full.len() <= 100 {
            return Self(full);
        }
        let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        Self(format!("mesh-node/handover/{mode}/{hash:016x}"))
    }

    fn address(&self) -> io::Result<SocketAddrUnix> {
        Ok(SocketAddrUnix::new_abstract_name(self.0.as_bytes())?)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "@{}", self.0)
    }
}

/// Which of a pod's sockets a descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodSocket {
    Outbound,
    InboundPlain,
    Hbone,
    DnsUdp,
    DnsTcp,
}

/// What a handed-over descriptor is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SocketKind {
    /// An admin endpoint: "admin", "metrics" or "readiness".
    Endpoint { what: String },
    /// One of a pod's sockets, in the namespace with this cookie, bound to `addr`.
    Pod {
        netns_cookie: u64,
        role: PodSocket,
        addr: SocketAddr,
    },
    /// The east-west gateway's listener.
    Gateway,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    Hello { pid: u32, version: String },
    Socket(SocketKind),
    Sent { count: usize },
    Refused { reason: String },
    Drain,
    Draining { open: i64 },
}

/// What a process offers a successor.
pub trait Provider: Send + Sync {
    /// A duplicate of every listening socket it serves.
    fn sockets(&self) -> Vec<(SocketKind, OwnedFd)>;
    /// Why it cannot hand over now (it is draining, say), if it cannot.
    fn refusal(&self) -> Option<String>;
    /// Stops (`true`) or resumes serving the admin endpoints, which the successor serves from
    /// the moment it has them.
    fn pause_endpoints(&self, paused: bool);
    /// The successor has taken over: stop accepting and drain. Returns the connections open.
    fn drain(&self, successor: u32) -> i64;
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {name}: {io_error}")]
    Io { name: Name, io_error: io::Error },
    #[error("hand-over from {name}: {reason}")]
    Protocol { name: Name, reason: String },
    #[error("hand-over from {name}: the running mesh-node refused: {reason}")]
    Refused { name: Name, reason: String },
}

/// Sockets received from a predecessor, taken by what serves them; whatever is left when
/// start-up is over is closed (the predecessor still holds its own copies until it drains).
#[derive(Debug, Default)]
pub struct Inherited {
    endpoints: HashMap<String, OwnedFd>,
    pods: HashMap<u64, Vec<(PodSocket, SocketAddr, OwnedFd)>>,
    gateway: Option<OwnedFd>,
}

impl Inherited {
    /// The admin endpoint `what`, if one was handed over bound to `addr`.
    pub fn take_endpoint(&mut self, what: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let fd = self.endpoints.remove(what)?;
        let listener = std::net::TcpListener::from(fd);
        match listener.local_addr() {
            Ok(bound) if bound == addr => Some(listener),
            Ok(bound) => {
                tracing::warn!(what, %bound, wanted = %addr, "handed-over endpoint is bound elsewhere; binding anew");
                None
            }
            Err(_) => None,
        }
    }

    /// Every socket handed over for the namespace with this cookie.
    pub fn take_pod(&mut self, netns_cookie: u64) -> Vec<(PodSocket, SocketAddr, OwnedFd)> {
        self.pods.remove(&netns_cookie).unwrap_or_default()
    }

    pub fn take_gateway(&mut self) -> Option<OwnedFd> {
        self.gateway.take()
    }

    /// Namespaces with sockets still untaken.
    pub fn pod_namespaces(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.pods.is_empty() && self.gateway.is_none()
    }

    fn insert(&mut self, kind: SocketKind, fd: OwnedFd) {
        match kind {
            SocketKind::Endpoint { what } => {
                self.endpoints.insert(what, fd);
            }
            SocketKind::Pod {
                netns_cookie,
                role,
                addr,
            } => self
                .pods
                .entry(netns_cookie)
                .or_default()
                .push((role, addr, fd)),
            SocketKind::Gateway => self.gateway = Some(fd),
        }
    }
}

/// The running mesh-node this one takes over from.
#[derive(Debug)]
pub struct Predecessor {
    name: Name,
    conn: OwnedFd,
    pub pid: u32,
    /// How many sockets it handed over.
    pub count: usize,
}

impl Predecessor {
    /// Tells the predecessor to stop accepting and drain; returns how many connections it
    /// still had open.
    pub fn drain(self) -> Result<i64, HandoverError> {
        let name = self.name.clone();
        send(&self.conn, &Message::Drain, None).map_err(|io_error| HandoverError::Io {
            name: name.clone(),
            io_error,
        })?;
        match recv(&self.conn) {
            Ok((Message::Draining { open }, _)) => Ok(open),
            Ok((other, _)) => Err(HandoverError::Protocol {
                name,
                reason: format!("expected draining, got {other:?}"),
            }),
            Err(io_error) => Err(HandoverError::Io { name, io_error }),
        }
    }
}

/// Takes the listening sockets of the mesh-node serving `name`, if one does. `Ok(None)`: there
/// is none (a fresh start). Blocking; each step waits at most [`STEP_TIMEOUT`].
pub fn take_over(name: &Name) -> Result<Option<(Predecessor, Inherited)>, HandoverError> {
    let io_err = |io_error: io::Error| HandoverError::Io {
        name: name.clone(),
        io_error,
    };
    let conn = seqpacket().map_err(io_err)?;
    match rustix::net::connect(&conn, &name.address().map_err(io_err)?) {
        Ok(()) => {}
        Err(rustix::io::Errno::CONNREFUSED | rustix::io::Errno::NOENT) => return Ok(None),
        Err(errno) => return Err(io_err(errno.into())),
    }
    sockopt::set_socket_timeout(&conn, sockopt::Timeout::Recv, Some(STEP_TIMEOUT))
        .map_err(|e| io_err(e.into()))?;
    let pid = sockopt::socket_peercred(&conn)
        .map_err(|e| io_err(e.into()))?
        .pid
        .as_raw_nonzero()
        .get() as u32;
    let hello = Message::Hello {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    send(&conn, &hello, None).map_err(io_err)?;
    let mut inherited = Inherited::default();
    let mut count = 0;
    loop {
        let (message, fds) = recv(&conn).map_err(io_err)?;
        match message {
            Message::Socket(kind) => {
                let mut fds = fds.into_iter();
                let (Some(fd), None) = (fds.next(), fds.next()) else {
                    return Err(HandoverError::Protocol {
                        name: name.clone(),
                        reason: format!("{kind:?} did not come with exactly one descriptor"),
                    });
                };
                inherited.insert(kind, fd);
                count += 1;
            }
            Message::Sent { count: sent } if sent == count => break,
            Message::Sent { count: sent } => {
                return Err(HandoverError::Protocol {
                    name: name.clone(),
                    reason: format!("announced {sent} sockets, received {count}"),
                });
            }
            Message::Refused { reason } => {
                return Err(HandoverError::Refused {
                    name: name.clone(),
                    reason,
                });
            }
            other => {
                return Err(HandoverError::Protocol {
                    name: name.clone(),
                    reason: format!("unexpected {other:?}"),
                });
            }
        }
    }
    Ok(Some((
        Predecessor {
            name: name.clone(),
            conn,
            pid,
            count,
        },
        inherited,
    )))
}

/// Serves `name` for a successor, on a thread of its own, until one has taken over. Binding
/// waits a moment for a predecessor that is letting go of the name.
pub fn serve(name: Name, provider: Arc<dyn Provider>) -> Result<(), HandoverError> {
    let io_err = |io_error: io::Error| HandoverError::Io {
        name: name.clone(),
        io_error,
    };
    let listener = seqpacket().map_err(io_err)?;
    let address = name.address().map_err(io_err)?;
    let mut tries = 0;
    loop {
        match rustix::net::bind(&listener, &address) {
            Ok(()) => break,
            Err(rustix::io::Errno::ADDRINUSE) if tries < 40 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(errno) => return Err(io_err(errno.into())),
        }
    }
    rustix::net::listen(&listener, 4).map_err(|e| io_err(e.into()))?;
    std::thread::Builder::new()
        .name("mesh-handover".into())
        .spawn(move || {
            loop {
                let conn = match rustix::net::accept_with(&listener, SocketFlags::CLOEXEC) {
                    Ok(conn) => conn,
                    Err(errno) => {
                        tracing::warn!(error = %errno, "hand-over socket: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match hand_over(&conn, provider.as_ref()) {
                    // The name goes with the listener, for the successor's own successor.
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(error) => tracing::warn!(%error, "hand-over failed; still serving"),
                }
            }
        })
        .map_err(io_err)?;
    tracing::debug!(%name, "serving hand-over to a successor");
    Ok(())
}

/// One successor's hand-over. `Ok(true)`: it took over and this process is draining.
fn hand_over(conn: &OwnedFd, provider: &dyn Provider) -> io::Result<bool> {
    let peer = sockopt::socket_peercred(conn)?;
    let successor = peer.pid.as_raw_nonzero().get() as u32;
    if peer.uid != rustix::process::geteuid() {
        tracing::warn!(
            successor,
            uid = peer.uid.as_raw(),
            "hand-over refused: the caller runs as another user"
        );
        return Ok(false);
    }
    sockopt::set_socket_timeout(conn, sockopt::Timeout::Recv, Some(STEP_TIMEOUT))?;
    let version = match recv(conn)? {
        (Message::Hello { version, .. }, _) => version,
        (other, _) => return Err(protocol(format!("expected hello, got {other:?}"))),
    };
    if let Some(reason) = provider.refusal() {
        send(conn, &Message::Refused { reason }, None)?;
        return Ok(false);
    }
    let sockets = provider.sockets();
    tracing::info!(
        successor,
        successor_version = version,
        sockets = sockets.len(),
        "a successor is taking over: handing it every listening socket"
    );
    provider.pause_endpoints(true);
    let sent = (|| {
        for (kind, fd) in &sockets {
            send(conn, &Message::Socket(kind.clone()), Some(fd))?;
        }
        send(
            conn,
            &Message::Sent {
                count: sockets.len(),
            },
            None,
        )
    })();
    drop(sockets);
    if let Err(error) = sent {
        provider.pause_endpoints(false);
        return Err(error);
    }
    // The successor starts, then asks for the drain once it is ready: no deadline here, as
    // its start may wait on the control plane; a successor that dies closes the connection.
    sockopt::set_socket_timeout(conn, sockopt::Timeout::Recv, None)?;
    match recv(conn) {
        Ok((Message::Drain, _)) => {
            let open = provider.drain(successor);
            send(conn, &Message::Draining { open }, None)?;
            Ok(true)
        }
        Ok((other, _)) => {
            provider.pause_endpoints(false);
            Err(protocol(format!("expected drain, got {other:?}")))
        }
        Err(error) => {
            provider.pause_endpoints(false);
            tracing::warn!(
                successor,
                %error,
                "the successor went away before taking over; this mesh-node goes on serving"
            );
            Ok(false)
        }
    }
}

/// Runs an accept loop once `gate` opens (at once, unless a predecessor still serves).
pub async fn gated(mut gate: tokio::sync::watch::Receiver<bool>, serve: impl Future<Output = ()>) {
    let _ = gate.wait_for(|open| *open).await;
    serve.await;
}

fn protocol(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

fn send(conn: &OwnedFd, message: &Message, fd: Option<&OwnedFd>) -> io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    let fds = fd.map(|fd| [fd.as_fd()]);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if let Some(fds) = &fds {
        control.push(SendAncillaryMessage::ScmRights(fds));
    }
    let sent = rustix::net::sendmsg(
        conn,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent != bytes.len() {
        return Err(protocol(format!("sent {sent} of {} bytes", bytes.len())));
    }
    Ok(())
}

/// The next message and the descriptors that came with it; EOF is an error.
fn recv(conn: &OwnedFd) -> io::Result<(Message, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let fds: Vec<OwnedFd> = control
        .drain()
        .filter_map(|message| match message {
            RecvAncillaryMessage::ScmRights(fds) => Some(fds),
            _ => None,
        })
        .flatten()
        .collect();
    if received.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other side closed the hand-over connection",
        ));
    }
    if received.flags.contains(rustix::net::ReturnFlags::TRUNC)
        || received.flags.contains(rustix::net::ReturnFlags::CTRUNC)
    {
        return Err(protocol("message or descriptors truncated".into()));
    }
    let message = serde_json::from_slice(&buf[..received.bytes])
        .map_err(|error| protocol(format!("undecodable message: {error}")))?;
    Ok((message, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    };

    struct Fake {
        listener: std::net::TcpListener,
        paused: AtomicBool,
        drained_for: AtomicU32,
        refuse: Mutex<Option<String>>,
    }

    impl Provider for Fake {
        fn sockets(&self) -> Vec<(SocketKind, OwnedFd)> {
            let fd = OwnedFd::from(self.listener.try_clone().unwrap());
            vec![
                (
                    SocketKind::Endpoint {
                        what: "admin".into(),
                    },
                    fd,
                ),
                (
                    SocketKind::Pod {
                        netns_cookie: 7,
                        role: PodSocket::Hbone,
                        addr: "10.0.0.1:15008".parse().unwrap(),
                    },
                    OwnedFd::from(self.listener.try_clone().unwrap()),
                ),
            ]
        }
        fn refusal(&self) -> Option<String> {
            self.refuse.lock().unwrap().clone()
        }
        fn pause_endpoints(&self, paused: bool) {
            self.paused.store(paused, Ordering::SeqCst);
        }
        fn drain(&self, successor: u32) -> i64 {
            self.drained_for.store(successor, Ordering::SeqCst);
            3
        }
    }

    fn fake() -> Arc<Fake> {
        Arc::new(Fake {
            listener: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            paused: AtomicBool::new(false),
            drained_for: AtomicU32::new(0),
            refuse: Mutex::new(None),
        })
    }

    fn unique_name(test: &str) -> Name {
        Name::new(test, Path::new(&format!("/test/{}", std::process::id())))
    }

    #[test]
    fn nobody_serving_is_a_fresh_start() {
        assert!(take_over(&unique_name("nobody")).unwrap().is_none());
    }

    #[test]
    fn the_successor_gets_the_same_sockets_then_the_predecessor_drains() {
        let name = unique_name("same");
        let provider = fake();
        serve(name.clone(), provider.clone()).unwrap();
        let (predecessor, mut inherited) = take_over(&name).unwrap().unwrap();
        assert_eq!(predecessor.pid, std::process::id());
        assert_eq!(predecessor.count, 2);
        assert!(provider.paused.load(Ordering::SeqCst), "endpoints paused");
        let addr = provider.listener.local_addr().unwrap();
        let admin = inherited.take_endpoint("admin", addr).expect("admin");
        // The very same socket: a connection to it is accepted through the inherited copy.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        admin.accept().unwrap();
        let pod = inherited.take_pod(7);
        assert_eq!(pod.len(), 1);
        assert_eq!(pod[0].0, PodSocket::Hbone);
        assert!(inherited.is_empty());
        assert_eq!(predecessor.drain().unwrap(), 3);
        assert_eq!(
            provider.drained_for.load(Ordering::SeqCst),
            std::process::id()
        );
        // The name is free for the successor to serve.
        serve(name.clone(), fake()).unwrap();
    }

    #[test]
    fn a_successor_that_goes_away_leaves_the_predecessor_serving() {
        let name = unique_name("gone");
        let provider = fake();
        serve(name.clone(), provider.clone()).unwrap();
        let (predecessor, _inherited) = take_over(&name).unwrap().unwrap();
        drop(predecessor);
        for _ in 0..100 {
            if !provider.paused.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!provider.paused.load(Ordering::SeqCst), "endpoints resumed");
        assert_eq!(provider.drained_for.load(Ordering::SeqCst), 0);
        // And it serves the next successor.
        let (again, _) = take_over(&name).unwrap().unwrap();
        assert_eq!(again.count, 2);
    }

    #[test]
    fn a_draining_process_refuses_with_its_reason() {
        let name = unique_name("refuse");
        let provider = fake();
        *provider.refuse.lock().unwrap() = Some("draining".into());
        serve(name.clone(), provider.clone()).unwrap();
        let error = take_over(&name).unwrap_err();
        assert!(error.to_string().contains("refused: draining"), "{error}");
        assert!(!provider.paused.load(Ordering::SeqCst));
    }

    #[test]
    fn a_long_pin_directory_still_makes_a_valid_name() {
        let long = Name::new("node", Path::new(&"/x".repeat(80)));
        long.address().unwrap();
        assert_ne!(long, Name::new("node", Path::new(&"/y".repeat(80))));
        assert_ne!(
            Name::new("node", Path::new("/a")),
            Name::new("gateway", Path::new("/a"))
        );
    }
}
