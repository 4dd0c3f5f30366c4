//! Can the kernel carry a same-node connection's bytes instead of mesh-node's relay? The
//! question of #22's "in-kernel same-node path", answered by measuring each way the kernel
//! offers against a user-space relay and against no proxy at all. Three network namespaces
//! joined by veth pairs stand for a node and two pods on it (client pod — node — server pod;
//! the node routes between them). The proxy's sockets are where mesh-node's are: its listener
//! on `127.0.0.1:15001` and its upstream socket both in the client pod's namespace.
//!
//! - `direct`: the client connects to the server (the kernel alone).
//! - `relay`: the client connects to the proxy, which connects to the server and copies both
//!   ways with a buffer of 256 KiB (mesh-node's largest), as mesh-node does today (a thread
//!   per direction here, not mesh-node's runtime).
//! - `skb-egress`: as `relay`, but once both proxy sockets exist an `sk_skb` stream verdict
//!   program queues what one receives to the other's send side. Only the proxy's own sockets
//!   are in the sockmap. The proxy watches for each side's EOF without reading (`POLLRDHUP`)
//!   and passes it on once the redirected bytes have reached the other socket's send queue
//!   (TCP_INFO bytes acked + SIOCOUTQ against the program's count).
//! - `msg-egress`: the applications' sockets join a sockmap with an `sk_msg` program, and what
//!   each sends goes straight into the proxy's opposite socket's send side (the client's
//!   first TCP connection carries no data, only its ends).
//! - `msg-egress, joined by sock_ops, paired mid-stream`: the same, set up as mesh-node would
//!   have to. A `sock_ops` program adds each socket as its connection is established (before
//!   `connect` or `accept` returns, so before the application can read or write); the server's
//!   socket is paired with the proxy's socket towards the client before it exists. The client
//!   sends at once, and the proxy pairs it only once it has connected upstream: the program
//!   counts what the client sent the ordinary way and redirects only when the proxy has
//!   relayed all of it (the hand-over). The process runs in a cgroup of its own for this.
//! - `msg-ingress`: what each application sends goes straight into the other application's
//!   receive queue; no TCP carries the bytes at all (the proxy keeps only the connections'
//!   ends). This is what sidecar accelerators built on sockmap do.
//!
//! In the other redirect modes the pairing is in place before the first byte (the client
//! waits for it), which measures the mechanism alone.
//!
//! Tests: `bulk` (a 2 GiB upload: throughput and the whole machine's CPU per GB, from
//! /proc/stat, so that work moved into the applications' or the kernel's workers' time is
//! counted), `echo` (1 KiB back and forth, closed loop), `slow` (the server reads nothing for
//! 2 s while the client writes as fast as it is let: how much the path queues, and whether it
//! all arrives in order afterwards), `eof` (100 connections that send 4 MiB and shut down at
//! once: how many arrive cut short or out of order, `skb-egress` also without its wait).
//!
//! Usage: `sockmap-bench [--runs N] [bulk] [echo] [slow] [eof]` (default: 5 runs, all tests),
//! as root; `cargo xtask bench sockmap` builds and runs it. Everything it creates (namespaces,
//! veths, a cgroup, programs, maps) is gone when it exits, also on failure; the namespaces
//! and cgroup of a run that was killed are removed by the next.
use std::{
    fs::File,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    panic::{self, AssertUnwindSafe},
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, SockHash},
    programs::{CgroupAttachMode, SkMsg, SkSkb, SockOps},
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
const NODE_CLIENT_SIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
const NODE_SERVER_SIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);
const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(SERVER_IP), 9000);
/// The proxy's listener, in the client's namespace (as mesh-node's 15001 is in the pod's).
const PROXY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15001);
/// A `MSG_PEER` value's flag: the target's receive queue rather than its send side.
const INGRESS: u64 = 1 << 63;
const BUFFER: usize = 256 * 1024;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Direct,
    Relay,
    /// `wait`: the proxy waits for the redirected bytes before passing an EOF on.
    SkbEgress {
        wait: bool,
    },
    MsgEgress,
    /// As `MsgEgress`, but as mesh-node would have it: the sockets join the map from
    /// `sock_ops` as their connections are established, the server's already paired with the
    /// proxy's socket towards the client; the client sends at once and the proxy pairs it
    /// mid-stream (the hand-over from the relay to the kernel).
    MsgEgressLate,
    MsgIngress,
}

impl Mode {
    const MEASURED: [Mode; 6] = [
        Mode::Direct,
        Mode::Relay,
        Mode::SkbEgress { wait: true },
        Mode::MsgEgress,
        Mode::MsgEgressLate,
        Mode::MsgIngress,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Relay => "relay",
            Mode::SkbEgress { wait: true } => "skb-egress",
            Mode::SkbEgress { wait: false } => "skb-egress, EOF passed on at once",
            Mode::MsgEgress => "msg-egress",
            Mode::MsgEgressLate => "msg-egress, joined by sock_ops, paired mid-stream",
            Mode::MsgIngress => "msg-ingress",
        }
    }
}

// --- the machine: namespaces, programs ---------------------------------------------------

/// A network namespace of ours, deleted when dropped.
struct Netns {
    name: String,
    file: File,
}

impl Netns {
    fn create(name: String) -> Result<Self> {
        ip(&["netns", "add", &name])?;
        let file = match File::open(format!("/run/netns/{name}")) {
            Ok(file) => file,
            Err(error) => {
                let _ = ip(&["netns", "delete", &name]);
                return Err(error).with_context(|| format!("open /run/netns/{name}"));
            }
        };
        // From here on, dropping it deletes it.
        let netns = Netns { name, file };
        netns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    fn exec(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Moves the calling thread into this namespace: sockets it creates from now on are here.
    fn enter(&self) -> Result<()> {
        // SAFETY: a valid namespace descriptor; affects the calling thread only.
        let rc = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        ensure!(
            rc == 0,
            "setns {}: {}",
            self.name,
            io::Error::last_os_error()
        );
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Its veth ends go with it (and their peers with them).
        let _ = ip(&["netns", "delete", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

struct Topology {
    client: Netns,
    node: Netns,
    server: Netns,
}

impl Topology {
    fn names(&self) -> [String; 3] {
        [&self.client, &self.node, &self.server].map(|netns| netns.name.clone())
    }

    /// client pod (10.201.1.2) — node (10.201.1.1 | 10.201.2.1, forwarding) — server pod
    /// (10.201.2.2).
    fn create(tag: &str) -> Result<Self> {
        let topology = Topology {
            client: Netns::create(format!("{tag}-c"))?,
            node: Netns::create(format!("{tag}-n"))?,
            server: Netns::create(format!("{tag}-s"))?,
        };
        // `a`'s eth0 ↔ `b`'s `b_dev`, and `a`'s default route through `b`.
        let link = |a: &Netns, a_ip: Ipv4Addr, b: &Netns, b_ip: Ipv4Addr, b_dev: &str| {
            a.exec(&[
                "ip", "link", "add", "eth0", "type", "veth", "peer", "name", b_dev, "netns",
                &b.name,
            ])?;
            a.exec(&["ip", "addr", "add", &format!("{a_ip}/24"), "dev", "eth0"])?;
            a.exec(&["ip", "link", "set", "eth0", "up"])?;
            b.exec(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", b_dev])?;
            b.exec(&["ip", "link", "set", b_dev, "up"])?;
            a.exec(&["ip", "route", "add", "default", "via", &b_ip.to_string()])
        };
        link(
            &topology.client,
            CLIENT_IP,
            &topology.node,
            NODE_CLIENT_SIDE_IP,
            "eth0",
        )?;
        link(
            &topology.server,
            SERVER_IP,
            &topology.node,
            NODE_SERVER_SIDE_IP,
            "eth1",
        )?;
        topology
            .node
            .exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        Ok(topology)
    }
}

/// A cgroup of ours (under the cgroup2 root) that this process moves into, so that the
/// `sock_ops` program sees its sockets; left and removed when dropped.
struct Cgroup {
    path: PathBuf,
    original: PathBuf,
}

impl Cgroup {
    fn enter(name: &str) -> Result<Self> {
        let root = cgroup2_root()?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let own = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .context("/proc/self/cgroup has no cgroup2 line")?;
        let original = root.join(own.trim_start_matches('/'));
        let path = root.join(name);
        std::fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        let cgroup = Cgroup { path, original };
        std::fs::write(
            cgroup.path.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("move into {}", cgroup.path.display()))?;
        Ok(cgroup)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.original.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Where cgroup v2 is mounted (`/proc/self/mounts`).
fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mountpoint, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(mountpoint))
        })
        .context("no cgroup2 mount in /proc/self/mounts")
}

struct Maps {
    skb_socks: SockHash<MapData, u64>,
    skb_peer: HashMap<MapData, u64, u64>,
    skb_bytes: HashMap<MapData, u64, u64>,
    msg_socks: SockHash<MapData, u64>,
    msg_peer: HashMap<MapData, u64, u64>,
    msg_passed: HashMap<MapData, u64, u64>,
    msg_relayed: HashMap<MapData, u64, u64>,
    join_netns: HashMap<MapData, u64, u8>,
}

type SharedMaps = Arc<Mutex<Maps>>;

fn load_programs(cgroup: &Cgroup) -> Result<(Ebpf, SharedMaps)> {
    let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/sockmap-ebpf"
    )))?;
    let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("map {name}"));
    let skb_socks: SockHash<MapData, u64> = take("SKB_SOCKS")?.try_into()?;
    let skb_peer: HashMap<MapData, u64, u64> = take("SKB_PEER")?.try_into()?;
    let skb_bytes: HashMap<MapData, u64, u64> = take("SKB_BYTES")?.try_into()?;
    let msg_socks: SockHash<MapData, u64> = take("MSG_SOCKS")?.try_into()?;
    let msg_peer: HashMap<MapData, u64, u64> = take("MSG_PEER")?.try_into()?;
    let msg_passed: HashMap<MapData, u64, u64> = take("MSG_PASSED")?.try_into()?;
    let msg_relayed: HashMap<MapData, u64, u64> = take("MSG_RELAYED")?.try_into()?;
    let join_netns: HashMap<MapData, u64, u8> = take("JOIN_NETNS")?.try_into()?;
    let verdict: &mut SkSkb = ebpf
        .program_mut("skb_redirect")
        .context("program skb_redirect")?
        .try_into()?;
    verdict.load()?;
    verdict.attach(skb_socks.fd())?;
    let msg: &mut SkMsg = ebpf
        .program_mut("msg_redirect")
        .context("program msg_redirect")?
        .try_into()?;
    msg.load()?;
    msg.attach(msg_socks.fd())?;
    let join: &mut SockOps = ebpf
        .program_mut("join")
        .context("program join")?
        .try_into()?;
    join.load()?;
    join.attach(File::open(&cgroup.path)?, CgroupAttachMode::Single)?;
    let maps = Maps {
        skb_socks,
        skb_peer,
        skb_bytes,
        msg_socks,
        msg_peer,
        msg_passed,
        msg_relayed,
        join_netns,
    };
    Ok((ebpf, Arc::new(Mutex::new(maps))))
}

// --- sockets ----------------------------------------------------------------------------------

fn sockopt_u64(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> u64 {
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid descriptor and an 8-byte out-buffer with its length.
    unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    value
}

fn socket_cookie(s: &TcpStream) -> u64 {
    sockopt_u64(s.as_fd(), libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// The `sk_msg` program's key of a socket: its namespace's cookie and its local port.
fn msg_key(s: &TcpStream) -> Result<u64> {
    let netns = sockopt_u64(s.as_fd(), libc::SOL_SOCKET, libc::SO_NETNS_COOKIE);
    Ok(netns << 16 | u64::from(s.local_addr()?.port()))
}

/// The `msg_key` of the client whose connection the proxy accepted as `m1` (same namespace).
fn client_key(m1: &TcpStream) -> Result<u64> {
    let netns = sockopt_u64(m1.as_fd(), libc::SOL_SOCKET, libc::SO_NETNS_COOKIE);
    Ok(netns << 16 | u64::from(m1.peer_addr()?.port()))
}

/// Bytes this socket has handed to TCP: acknowledged plus still queued.
fn handed_to_tcp(s: &TcpStream) -> u64 {
    // SAFETY: zeroed tcp_info is a valid value; the kernel fills what it knows.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let mut queued: libc::c_int = 0;
    // SAFETY: valid descriptor, out-buffers with their lengths.
    unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut queued);
    }
    info.tcpi_bytes_acked + queued as u64
}

/// A blocking read on a socket in a sockmap can fail with EAGAIN after a wake-up whose data
/// went elsewhere (`tcp_bpf_recvmsg`): wait for readiness and read again.
fn read(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                let mut poll = libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut poll, 1, 1000) };
            }
            other => return other,
        }
    }
}

/// Waits until the peer has shut its side down (or the connection failed).
fn wait_for_hang_up(s: &TcpStream) {
    loop {
        let mut poll = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut poll, 1, 1000) };
        if poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
    }
}

fn read_exactly(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match read(s, &mut buf[at..])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => at += n,
        }
    }
    Ok(())
}

/// Byte `offset` of every stream: a sequence that shows both loss and reordering.
fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = ((offset + i as u64) % 251) as u8;
    }
}

/// Reads to EOF: (bytes, whether they were the pattern).
fn drain(mut s: TcpStream, check: bool) -> (u64, bool) {
    let mut buf = vec![0; BUFFER];
    let mut expected = vec![0; BUFFER];
    let (mut total, mut intact) = (0u64, true);
    while let Ok(n @ 1..) = read(&mut s, &mut buf) {
        if check {
            fill_pattern(total, &mut expected[..n]);
            intact &= buf[..n] == expected[..n];
        }
        total += n as u64;
    }
    (total, intact)
}

// --- one connection through a path ---------------------------------------------------------

struct Listeners {
    server: Arc<TcpListener>,
    proxy: Arc<TcpListener>,
    /// The namespaces' cookies, for `JOIN_NETNS` and the keys of sockets yet to exist.
    client_netns: u64,
    server_netns: u64,
}

/// A connection set up through `mode`'s path: the client's end, the server's and the proxy's
/// threads (joined by [`Connection::finish`]), and the keys of the map entries to remove
/// afterwards (the sockhashes forget a socket when it closes; the other maps do not).
struct Connection<T> {
    client: TcpStream,
    server: thread::JoinHandle<T>,
    proxy: Option<thread::JoinHandle<Result<()>>>,
    maps: SharedMaps,
    keys: Vec<u64>,
    /// `JOIN_NETNS` entries to remove.
    joined: Vec<u64>,
}

impl<T> Connection<T> {
    /// Ends the connection; with what the server returned, the bytes the client sent through
    /// the relay before its hand-over (`MsgEgressLate`; 0 otherwise).
    fn finish(self) -> Result<(T, u64)> {
        drop(self.client);
        let served = self
            .server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))?;
        if let Some(proxy) = self.proxy {
            proxy
                .join()
                .map_err(|_| anyhow::anyhow!("proxy panicked"))??;
        }
        let mut maps = self.maps.lock().unwrap();
        let before_hand_over = self
            .keys
            .iter()
            .filter_map(|key| maps.msg_passed.get(key, 0).ok())
            .sum();
        for netns in &self.joined {
            let _ = maps.join_netns.remove(netns);
        }
        for key in &self.keys {
            let _ = maps.skb_peer.remove(key);
            let _ = maps.skb_bytes.remove(key);
            let _ = maps.msg_peer.remove(key);
            let _ = maps.msg_passed.remove(key);
            let _ = maps.msg_relayed.remove(key);
        }
        Ok((served, before_hand_over))
    }
}

/// Connects the client (the calling thread, in the client's namespace) through `mode`; the
/// server's side runs `serve` once the path is complete.
fn connect<T, S>(
    mode: Mode,
    topology: &Arc<Topology>,
    listeners: &Listeners,
    maps: &SharedMaps,
    serve: S,
) -> Result<Connection<T>>
where
    S: FnOnce(TcpStream) -> T + Send + 'static,
    T: Send + 'static,
{
    let (accepted_tx, accepted_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let listener = listeners.server.clone();
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().expect("server accept");
        let _ = s.set_nodelay(true);
        let _ = accepted_tx.send(s.try_clone().expect("dup"));
        // A reader already blocked in recv when its socket joins a sockmap keeps waiting on the
        // TCP queue and never sees redirected data (seen here): start once the path is ready.
        let _ = go_rx.recv();
        serve(s)
    });
    if mode == Mode::Direct {
        let client = TcpStream::connect(SERVER)?;
        client.set_nodelay(true)?;
        accepted_rx.recv_timeout(Duration::from_secs(5))?;
        drop(go_tx);
        return Ok(Connection {
            client,
            server,
            proxy: None,
            maps: maps.clone(),
            keys: Vec::new(),
            joined: Vec::new(),
        });
    }
    let joined = if mode == Mode::MsgEgressLate {
        // From here on every connection established in the two pods' namespaces joins the
        // map (`join`): the client's, the proxy's two and the server's.
        let mut locked = maps.lock().unwrap();
        for netns in [listeners.client_netns, listeners.server_netns] {
            locked.join_netns.insert(netns, 1, 0)?;
        }
        vec![listeners.client_netns, listeners.server_netns]
    } else {
        Vec::new()
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let (listener, proxy_maps, topology) =
        (listeners.proxy.clone(), maps.clone(), topology.clone());
    let server_key = listeners.server_netns << 16 | u64::from(SERVER.port());
    let proxy = thread::spawn(move || {
        proxy(
            &topology,
            &listener,
            mode,
            &proxy_maps,
            server_key,
            ready_tx,
        )
    });
    let client = TcpStream::connect(PROXY)?;
    client.set_nodelay(true)?;
    if mode == Mode::MsgEgressLate {
        // Joined (and counted from zero) before `connect` returned; the server starts at once
        // too, its socket joined before `accept` returned. The proxy pairs the client later.
        let c_key = msg_key(&client)?;
        drop(go_tx);
        let connection = Connection {
            client,
            server,
            proxy: Some(proxy),
            maps: maps.clone(),
            keys: vec![c_key],
            joined,
        };
        let counted = maps.lock().unwrap().msg_passed.get(&c_key, 0).is_ok();
        ensure!(counted, "sock_ops did not join the client's socket");
        return Ok(connection);
    }
    let [m1, m2, m1_cookie, m2_cookie] = ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("the proxy never reported its sockets")??;
    let s = accepted_rx.recv_timeout(Duration::from_secs(5))?;
    let (c_key, s_key) = (msg_key(&client)?, msg_key(&s)?);
    {
        let mut maps = maps.lock().unwrap();
        match mode {
            Mode::MsgEgress => {
                maps.msg_peer.insert(c_key, m2, 0)?;
                maps.msg_peer.insert(s_key, m1, 0)?;
            }
            Mode::MsgIngress => {
                maps.msg_peer.insert(c_key, s_key | INGRESS, 0)?;
                maps.msg_peer.insert(s_key, c_key | INGRESS, 0)?;
            }
            _ => {}
        }
        if matches!(mode, Mode::MsgEgress | Mode::MsgIngress) {
            // The sockhash holds the sockets themselves; an entry leaves when its socket closes.
            maps.msg_socks.insert(c_key, client.as_raw_fd(), 0)?;
            maps.msg_socks.insert(s_key, s.as_raw_fd(), 0)?;
        }
    }
    drop(go_tx);
    Ok(Connection {
        client,
        server,
        proxy: Some(proxy),
        maps: maps.clone(),
        keys: vec![c_key, s_key, m1_cookie, m2_cookie],
        joined,
    })
}

/// The proxy's side of one connection: accept, connect upstream, pair as `mode` says, report
/// the two sockets' `msg_key`s, then relay (or only watch for the ends) until both are done.
fn proxy(
    topology: &Topology,
    listener: &TcpListener,
    mode: Mode,
    maps: &SharedMaps,
    server_key: u64,
    ready: mpsc::Sender<Result<[u64; 4]>>,
) -> Result<()> {
    match pair(topology, listener, mode, maps, server_key) {
        Ok(sockets) => {
            let [c1, c2] = sockets.cookies;
            let [k1, k2] = sockets.keys;
            let _ = ready.send(Ok([k1, k2, c1, c2]));
            let relayed = relay(mode, maps, &sockets);
            let mut maps = maps.lock().unwrap();
            let _ = maps.msg_peer.remove(&server_key);
            let _ = maps.msg_passed.remove(&k2);
            relayed
        }
        // Reported through `ready` where the client waits for it; where it does not (the
        // mid-stream mode), from the thread, so that `finish` fails with it.
        Err(error) => {
            if let Err(mpsc::SendError(Err(unheard))) = ready.send(Err(error)) {
                return Err(unheard);
            }
            Ok(())
        }
    }
}

/// The proxy's two sockets: `m1` accepted from the client, `m2` connected to the server.
struct ProxySockets {
    m1: TcpStream,
    m2: TcpStream,
    /// Socket cookies (the `sk_skb` program's keys).
    cookies: [u64; 2],
    /// The `sk_msg` program's keys.
    keys: [u64; 2],
}

/// The proxy's set-up: accept, connect upstream, and join the sockmap `mode` wants.
fn pair(
    topology: &Topology,
    listener: &TcpListener,
    mode: Mode,
    maps: &SharedMaps,
    server_key: u64,
) -> Result<ProxySockets> {
    topology.client.enter()?;
    let (m1, _) = listener.accept()?;
    if mode == Mode::MsgEgressLate {
        // The server's socket is paired before it exists: what it sends goes out of `m1`
        // from its first byte, with no hand-over.
        let k1 = msg_key(&m1)?;
        maps.lock().unwrap().msg_peer.insert(server_key, k1, 0)?;
    }
    let m2 = TcpStream::connect(SERVER)?;
    m1.set_nodelay(true)?;
    m2.set_nodelay(true)?;
    let (c1, c2) = (socket_cookie(&m1), socket_cookie(&m2));
    let (k1, k2) = (msg_key(&m1)?, msg_key(&m2)?);
    {
        let mut maps = maps.lock().unwrap();
        if let Mode::SkbEgress { .. } = mode {
            for (from, to) in [(c1, c2), (c2, c1)] {
                maps.skb_bytes.insert(from, 0, 0)?;
                maps.skb_peer.insert(from, to, 0)?;
            }
            maps.skb_socks.insert(c1, m1.as_raw_fd(), 0)?;
            maps.skb_socks.insert(c2, m2.as_raw_fd(), 0)?;
        }
        if mode == Mode::MsgEgress {
            maps.msg_socks.insert(k1, m1.as_raw_fd(), 0)?;
            maps.msg_socks.insert(k2, m2.as_raw_fd(), 0)?;
        }
        if mode == Mode::MsgEgressLate {
            // The client from now on goes straight to `m2`, once all it sent is relayed.
            maps.msg_peer.insert(client_key(&m1)?, k2, 0)?;
        }
    }
    Ok(ProxySockets {
        m1,
        m2,
        cookies: [c1, c2],
        keys: [k1, k2],
    })
}

/// Relays both ways (in the redirect modes only the ends arrive here) until both are done.
fn relay(mode: Mode, maps: &SharedMaps, sockets: &ProxySockets) -> Result<()> {
    let ProxySockets {
        m1,
        m2,
        cookies: [c1, c2],
        ..
    } = sockets;
    let (c1, c2) = (*c1, *c2);
    // The hand-over's count of what the proxy wrote on, for the client's switch-over.
    let handed_over = (mode == Mode::MsgEgressLate)
        .then(|| client_key(m1))
        .transpose()?;
    let one_way = |from: &TcpStream, to: &TcpStream, from_cookie: u64| -> Result<()> {
        let (mut from, mut to) = (from.try_clone()?, to.try_clone()?);
        let mut buf = vec![0; BUFFER];
        let mut relayed = 0u64;
        if let Mode::SkbEgress { .. } = mode {
            // Watch for the end without reading: a read races the verdict program for the same
            // skb and the bytes arrive twice (seen here once: 65,483 bytes more than were sent,
            // one GRO-sized skb).
            wait_for_hang_up(&from);
        }
        while let Ok(n @ 1..) = read(&mut from, &mut buf) {
            to.write_all(&buf[..n])?;
            relayed += n as u64;
            if let Some(key) = handed_over
                && from_cookie == c1
            {
                maps.lock().unwrap().msg_relayed.insert(key, relayed, 0)?;
            }
        }
        if mode == (Mode::SkbEgress { wait: true }) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let redirected = maps.lock().unwrap().skb_bytes.get(&from_cookie, 0)?;
                if handed_to_tcp(&to) >= redirected + relayed {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "redirected bytes never reached the socket"
                );
                thread::sleep(Duration::from_micros(100));
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        Ok(())
    };
    thread::scope(|scope| {
        let upload = scope.spawn(|| one_way(m1, m2, c1));
        let download = one_way(m2, m1, c2);
        let upload = upload
            .join()
            .map_err(|_| anyhow::anyhow!("relay panicked"))?;
        // A side that resets after its own EOF is no failure of the relay.
        upload.and(download.or(Ok(())))
    })
}

// --- the tests ------------------------------------------------------------------------------

struct Bench {
    topology: Arc<Topology>,
    listeners: Listeners,
    maps: SharedMaps,
}

impl Bench {
    fn connect<T: Send + 'static>(
        &self,
        mode: Mode,
        serve: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> Result<Connection<T>> {
        connect(mode, &self.topology, &self.listeners, &self.maps, serve)
    }

    /// (Gbit/s, the machine's CPU seconds per GB).
    fn bulk(&self, mode: Mode) -> Result<(f64, f64)> {
        const SIZE: u64 = 2 << 30;
        let mut conn = self.connect(mode, |s| drain(s, false))?;
        let buf = vec![0; BUFFER];
        let (cpu, start) = (busy_cpu_seconds()?, Instant::now());
        let mut sent = 0;
        while sent < SIZE {
            conn.client.write_all(&buf)?;
            sent += BUFFER as u64;
        }
        conn.client.shutdown(Shutdown::Write)?;
        let ((received, _), _) = conn.finish()?;
        let (secs, cpu) = (start.elapsed().as_secs_f64(), busy_cpu_seconds()? - cpu);
        ensure!(
            received == sent,
            "{}: sent {sent}, received {received}",
            mode.name()
        );
        let gb = sent as f64 / 1e9;
        Ok((gb * 8.0 / secs, cpu / gb))
    }

    /// 1 KiB back and forth: (p50, p99) round trip in µs. Each round's bytes are its own, and
    /// the answer must be them.
    fn echo(&self, mode: Mode) -> Result<(f64, f64)> {
        const ROUNDS: usize = 10_000;
        let mut conn = self.connect(mode, |mut s| {
            let mut buf = [0; 1024];
            while read_exactly(&mut s, &mut buf).is_ok() && s.write_all(&buf).is_ok() {}
        })?;
        let (mut request, mut answer) = ([0; 1024], [0; 1024]);
        let mut rtts = Vec::with_capacity(ROUNDS);
        for round in 0..ROUNDS {
            fill_pattern(round as u64, &mut request);
            let start = Instant::now();
            conn.client.write_all(&request)?;
            read_exactly(&mut conn.client, &mut answer)?;
            rtts.push(start.elapsed().as_secs_f64() * 1e6);
            ensure!(
                answer == request,
                "{}: round {round} answered with other bytes",
                mode.name()
            );
        }
        conn.client.shutdown(Shutdown::Write)?;
        conn.finish()?;
        rtts.sort_by(f64::total_cmp);
        Ok((rtts[ROUNDS / 2], rtts[ROUNDS * 99 / 100]))
    }

    /// The server reads nothing for 2 s while the client writes without blocking: (MiB the
    /// client could write, MiB MemAvailable fell). Then everything must arrive, in order.
    fn slow(&self, mode: Mode) -> Result<(f64, f64)> {
        const STALL: Duration = Duration::from_secs(2);
        // Enough to show a queue without a bound, little enough to leave the machine alone.
        const CAP: u64 = 1 << 30;
        let mut conn = self.connect(mode, |s| {
            thread::sleep(STALL + Duration::from_millis(300));
            drain(s, true)
        })?;
        let available = mem_available_kib()?;
        let mut lowest = available;
        conn.client.set_nonblocking(true)?;
        let mut buf = vec![0; 64 * 1024];
        let (mut sent, start) = (0u64, Instant::now());
        while start.elapsed() < STALL && sent < CAP {
            fill_pattern(sent, &mut buf);
            match conn.client.write(&buf) {
                Ok(n) => {
                    // Keep the stream the pattern: finish a partial chunk blocking.
                    conn.client.set_nonblocking(false)?;
                    conn.client.write_all(&buf[n..])?;
                    conn.client.set_nonblocking(true)?;
                    sent += buf.len() as u64;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(1));
                }
                Err(error) => return Err(error.into()),
            }
            lowest = lowest.min(mem_available_kib()?);
        }
        conn.client.set_nonblocking(false)?;
        conn.client.shutdown(Shutdown::Write)?;
        let ((received, intact), _) = conn.finish()?;
        ensure!(
            received == sent && intact,
            "{}: sent {sent}, received {received}, in order: {intact}",
            mode.name()
        );
        let mib = |kib: u64| kib as f64 / 1024.0;
        Ok((sent as f64 / 1048576.0, mib(available) - mib(lowest)))
    }

    /// Connections that send 4 MiB and shut down at once: (how many of 100 arrived cut short
    /// or out of order, the share of bytes relayed before a hand-over).
    fn eof(&self, mode: Mode) -> Result<(usize, f64)> {
        const SIZE: usize = 4 << 20;
        const CONNECTIONS: usize = 100;
        let mut payload = vec![0; SIZE];
        fill_pattern(0, &mut payload);
        let (mut bad, mut before_hand_over) = (0, 0);
        for _ in 0..CONNECTIONS {
            let mut conn = self.connect(mode, |s| drain(s, true))?;
            conn.client.write_all(&payload)?;
            conn.client.shutdown(Shutdown::Write)?;
            let ((received, intact), relayed) = conn.finish()?;
            bad += usize::from(received != SIZE as u64 || !intact);
            before_hand_over += relayed;
        }
        Ok((bad, before_hand_over as f64 / (SIZE * CONNECTIONS) as f64))
    }
}

fn busy_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .context("/proc/stat is empty")?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(fields.len() == 8, "/proc/stat: short cpu line");
    // user nice system idle iowait irq softirq steal, in USER_HZ (100/s).
    let idle = fields[3] + fields[4];
    Ok((fields.iter().sum::<u64>() - idle) as f64 / 100.0)
}

fn mem_available_kib() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("/proc/meminfo has no MemAvailable")?
        .parse()
        .context("MemAvailable")
}

/// Runs `test` on every mode `runs` times, the modes interleaved within a run so that drift
/// affects all alike: each mode's two series of figures.
fn interleaved(
    runs: usize,
    modes: &[Mode],
    test: impl Fn(Mode) -> Result<(f64, f64)>,
) -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
    let mut results = vec![(Vec::new(), Vec::new()); modes.len()];
    for _ in 0..runs {
        for (result, &mode) in results.iter_mut().zip(modes) {
            let (first, second) = test(mode)?;
            result.0.push(first);
            result.1.push(second);
        }
    }
    Ok(results)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// "median (min–max)" with `digits` decimals.
fn spread(values: &[f64], digits: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let median = median(values.to_vec());
    format!("{median:.digits$} ({min:.digits$}–{max:.digits$})")
}

fn main() -> Result<()> {
    let mut runs = 5;
    let mut tests = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => {
                let value = args.next().context("--runs needs a number")?;
                runs = value
                    .parse()
                    .with_context(|| format!("--runs {value:?}: not a number"))?;
            }
            "bulk" | "echo" | "slow" | "eof" => tests.push(arg),
            other => bail!("unknown argument {other:?} (--runs N, bulk, echo, slow, eof)"),
        }
    }
    ensure!(
        runs > 0,
        "--runs: at least one run is needed to report anything"
    );
    sweep_leftovers();
    let tag = format!("smx{}", std::process::id());
    let topology = Arc::new(Topology::create(&tag)?);
    let names = topology.names();
    let cgroup = Cgroup::enter(&tag)?;
    let measured = panic::catch_unwind(AssertUnwindSafe(|| {
        measure(&topology, &cgroup, runs, &tests)
    }));
    drop(cgroup);
    // A thread still blocked after a failure holds the topology: delete the namespaces by name
    // rather than wait for the last holder to drop them.
    for name in names {
        let _ = ip(&["netns", "delete", &name]);
    }
    let rows = match measured {
        Ok(rows) => rows?,
        Err(panicked) => panic::resume_unwind(panicked),
    };
    println!(
        "\n{runs} runs, medians; the machine's CPU from /proc/stat (applications, proxy and kernel)\n"
    );
    print!("| |");
    for mode in Mode::MEASURED {
        print!(" {} |", mode.name());
    }
    println!("\n|---|{}", "---:|".repeat(Mode::MEASURED.len()));
    for (name, cells) in rows {
        println!("| {name} | {} |", cells.join(" | "));
    }
    Ok(())
}

/// Namespaces and cgroups of earlier runs that were killed before they could remove them
/// (`smx<pid>…` whose process is gone).
fn sweep_leftovers() {
    let dead = |name: &str| {
        name.strip_prefix("smx")
            .map(|rest| rest.split('-').next().unwrap_or(rest))
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(root) = cgroup2_root()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        for entry in entries.flatten() {
            if dead(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}

type Rows = Vec<(String, Vec<String>)>;

/// Runs the tests asked for; a table row each figure.
fn measure(
    topology: &Arc<Topology>,
    cgroup: &Cgroup,
    runs: usize,
    tests: &[String],
) -> Result<Rows> {
    let wants = |test: &str| tests.is_empty() || tests.iter().any(|t| t == test);
    let topology = topology.clone();
    let (_ebpf, maps) = load_programs(cgroup)?;
    topology.server.enter()?;
    let server = Arc::new(TcpListener::bind(SERVER)?);
    topology.client.enter()?;
    let proxy = Arc::new(TcpListener::bind(PROXY)?);
    let bench = Bench {
        topology,
        listeners: Listeners {
            client_netns: sockopt_u64(proxy.as_fd(), libc::SOL_SOCKET, libc::SO_NETNS_COOKIE),
            server_netns: sockopt_u64(server.as_fd(), libc::SOL_SOCKET, libc::SO_NETNS_COOKIE),
            server,
            proxy,
        },
        maps,
    };

    let modes = Mode::MEASURED;
    let mut rows = Rows::new();
    if wants("bulk") {
        let results = interleaved(runs, &modes, |mode| bench.bulk(mode))?;
        let direct = median(results[0].0.clone());
        rows.push((
            "1 stream, Gbit/s (min–max) × direct".into(),
            results
                .iter()
                .map(|r| format!("{} ×{:.2}", spread(&r.0, 1), median(r.0.clone()) / direct))
                .collect(),
        ));
        rows.push((
            "the machine's CPU per GB, s (min–max)".into(),
            results.iter().map(|r| spread(&r.1, 3)).collect(),
        ));
    }
    if wants("echo") {
        let results = interleaved(runs, &modes, |mode| bench.echo(mode))?;
        let p50 = results
            .iter()
            .map(|r| format!("{:.1}", median(r.0.clone())));
        rows.push(("1 KiB echo round trip p50, µs".into(), p50.collect()));
        let p99 = results
            .iter()
            .map(|r| format!("{:.1}", median(r.1.clone())));
        rows.push(("1 KiB echo round trip p99, µs".into(), p99.collect()));
    }
    if wants("slow") {
        let mut results = Vec::new();
        for &mode in &modes {
            results.push(bench.slow(mode)?);
        }
        rows.push((
            "queued while the server read nothing for 2 s, MiB".into(),
            results.iter().map(|r| format!("{:.1}", r.0)).collect(),
        ));
        rows.push((
            "MemAvailable fell meanwhile, MiB".into(),
            results.iter().map(|r| format!("{:.0}", r.1)).collect(),
        ));
    }
    if wants("eof") {
        let mut cells = Vec::new();
        for &mode in &modes {
            let (bad, relayed) = bench.eof(mode)?;
            cells.push(match mode {
                Mode::SkbEgress { wait: true } => {
                    let (at_once, _) = bench.eof(Mode::SkbEgress { wait: false })?;
                    format!("{bad} ({at_once} without the wait)")
                }
                Mode::MsgEgressLate => {
                    format!("{bad} ({:.1}% relayed before the switch)", relayed * 100.0)
                }
                _ => bad.to_string(),
            });
        }
        rows.push((
            "of 100 sending 4 MiB then EOF, arrived cut short or out of order".into(),
            cells,
        ));
    }

    Ok(rows)
}
