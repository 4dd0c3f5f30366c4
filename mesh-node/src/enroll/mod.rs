//! The pod registry: enrolling a pod opens mesh-node's listeners inside its network namespace and
//! tells the kernel programs to capture it; un-enrolling undoes both.
//!
//! Sources (the static file, the Kubernetes watcher) only call [`Enroller::enroll`] (or
//! [`Enroller::enroll_in`], with the namespace already open) and [`Enroller::unenroll`], from any
//! runtime: the listeners and their accept loops always live on the data-path runtime.
pub mod kubernetes;
pub mod static_file;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use mesh_common::{
    DNS_PROXY_PORT, EnrolledPod, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, PROXY_MARK,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    dataplane::{Dataplane, DataplaneError, record::PodRecord},
    dns::{self, DnsSettings},
    handover::{Inherited, PodSocket, SocketKind, gated},
    identity::Identity,
    netns::{self, NetNs, NetNsError},
    pod::OriginalSource,
    proxy::{self, ProxyContext},
    source_routing,
};

pub use crate::pod::{Pod, PodSpec};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enroll pod {pod}: {source}")]
    NetNs { pod: String, source: NetNsError },
    #[error("enroll pod {pod}: bind {addr} in netns {netns}: {io_error}")]
    Bind {
        pod: String,
        addr: SocketAddr,
        netns: PathBuf,
        io_error: io::Error,
    },
    #[error("enroll pod {pod}: read netns cookie: {io_error}")]
    Cookie { pod: String, io_error: io::Error },
    #[error("enroll pod {pod}: register listener with the runtime: {io_error}")]
    Register { pod: String, io_error: io::Error },
    #[error("enroll pod {pod}: pod is already enrolled")]
    AlreadyEnrolled { pod: String },
    #[error("enroll pod {pod}: pod has no IP address yet")]
    NoAddress { pod: String },
    #[error("enroll pod {pod}: {source}")]
    Dataplane { pod: String, source: DataplaneError },
    #[error("enroll pod {pod}: mesh-node is draining")]
    Draining { pod: String },
}

struct Enrolled {
    pod: Arc<Pod>,
    tasks: Vec<JoinHandle<()>>,
    /// A duplicate of each of the pod's listening sockets, for a successor (see
    /// [`crate::handover`]); dropped with the accept loops, so that a closed listener closes.
    sockets: Vec<(PodSocket, SocketAddr, OwnedFd)>,
}

/// Owns every enrolled pod's listeners and accept loops.
pub struct Enroller {
    ctx: Arc<ProxyContext>,
    dataplane: Arc<Dataplane>,
    trust_domain: String,
    pods: Mutex<HashMap<String, Enrolled>>,
    next_id: AtomicU32,
    /// The data-path runtime, which the listeners register with and the accept loops run on.
    runtime: tokio::runtime::Handle,
    /// `Some`: pods' DNS queries are captured and answered (unless a pod opts out).
    dns: Option<DnsSettings>,
    /// The host's `/proc` (see [`Enroller::with_host_proc`]).
    host_proc: std::path::PathBuf,
    /// Sockets a predecessor handed over, taken by the pods they belong to.
    inherited: Mutex<Inherited>,
    /// Accept loops wait until this is true: a successor accepts only once it is ready.
    accepting: watch::Sender<bool>,
}

/// Which accept loop serves a listener.
#[derive(Clone, Copy)]
enum Role {
    Outbound,
    InboundPlain,
    Hbone,
}

impl Enroller {
    /// Must be called inside the data-path runtime, which it keeps a handle to.
    pub fn new(ctx: Arc<ProxyContext>, dataplane: Arc<Dataplane>, trust_domain: &str) -> Self {
        Self {
            runtime: tokio::runtime::Handle::current(),
            dns: None,
            host_proc: "/proc".into(),
            ctx,
            dataplane,
            trust_domain: trust_domain.to_owned(),
            pods: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            inherited: Mutex::new(Inherited::default()),
            accepting: watch::channel(true).0,
        }
    }

    /// Serves the pods' sockets a predecessor handed over (found by namespace) instead of
    /// binding new ones, and accepts on no listener until [`Enroller::start_accepting`]: the
    /// predecessor goes on accepting on the same sockets meanwhile.
    pub fn with_inherited(self, inherited: Inherited) -> Self {
        *lock(&self.inherited) = inherited;
        self.accepting.send_replace(false);
        self
    }

    /// mesh-node is draining: enrollment is over for this process.
    pub fn is_draining(&self) -> bool {
        self.ctx.drain.is_draining()
    }

    /// Starts the accept loops of every pod enrolled so far (and of those enrolled later).
    pub fn start_accepting(&self) {
        self.accepting.send_replace(true);
    }

    /// Closes the handed-over sockets no enrolled pod took; returns how many namespaces they
    /// were for.
    pub fn discard_inherited(&self) -> usize {
        let mut inherited = lock(&self.inherited);
        let left = inherited.pod_namespaces();
        *inherited = Inherited::default();
        left
    }

    /// A duplicate of every pod's listening sockets, for a successor.
    pub fn handover_sockets(&self) -> Vec<(SocketKind, OwnedFd)> {
        let pods = self.lock();
        let mut sockets = Vec::new();
        for enrolled in pods.values() {
            for (role, addr, fd) in &enrolled.sockets {
                match fd.try_clone() {
                    Ok(fd) => sockets.push((
                        SocketKind::Pod {
                            netns_cookie: enrolled.pod.netns_cookie,
                            role: *role,
                            addr: *addr,
                        },
                        fd,
                    )),
                    Err(error) => tracing::warn!(
                        pod = %enrolled.pod.spec, %addr, %error,
                        "cannot duplicate a listener for the successor; it binds its own"
                    ),
                }
            }
        }
        sockets
    }

    /// The sockets handed over for the namespace `netns`, if any were.
    fn inherited_for(&self, key: &str, netns: &NetNs) -> Vec<(PodSocket, SocketAddr, OwnedFd)> {
        let mut inherited = lock(&self.inherited);
        if inherited.pod_namespaces() == 0 {
            return Vec::new();
        }
        let cookie = netns
            .run(|| {
                Socket::new(Domain::IPV4, Type::DGRAM, None)
                    .and_then(|probe| netns::socket_netns_cookie(&probe))
            })
            .map_err(|error| error.to_string())
            .and_then(|cookie| cookie.map_err(|error| error.to_string()));
        match cookie {
            Ok(cookie) => inherited.take_pod(cookie),
            Err(error) => {
                tracing::warn!(pod = key, %error, "cannot name the pod's namespace to find its handed-over sockets");
                Vec::new()
            }
        }
    }

    /// The host's `/proc`, for pods' sysctls when mesh-node's own `/proc/sys` is read-only.
    pub fn with_host_proc(mut self, host_proc: &std::path::Path) -> Self {
        self.host_proc = host_proc.to_owned();
        self
    }

    /// Captures enrolled pods' DNS queries and answers them with `settings` (see [`dns`]).
    pub fn with_dns(mut self, settings: Option<DnsSettings>) -> Self {
        self.dns = settings;
        self
    }

    /// Opens the pod's namespace file (`spec.netns`), then enrolls it as [`Enroller::enroll_in`].
    pub fn enroll(&self, spec: PodSpec) -> Result<Arc<Pod>, EnrollError> {
        let netns = NetNs::open(&spec.netns).map_err(|source| EnrollError::NetNs {
            pod: spec.key(),
            source,
        })?;
        self.enroll_in(spec, netns)
    }

    /// Opens the pod's listeners in `netns`, starts serving them, then starts capture. The
    /// namespace is held open for as long as the pod is enrolled, whatever happens to the
    /// processes in it.
    pub fn enroll_in(&self, spec: PodSpec, netns: NetNs) -> Result<Arc<Pod>, EnrollError> {
        let _data_runtime = self.runtime.enter();
        let key = spec.key();
        if self.ctx.drain.is_draining() {
            return Err(EnrollError::Draining { pod: key });
        }
        if self.lock().contains_key(&key) {
            return Err(EnrollError::AlreadyEnrolled { pod: key });
        }
        // The data path names a pod by its first address (source of its tunnels).
        if spec.ips.is_empty() {
            return Err(EnrollError::NoAddress { pod: key });
        }
        let mut inherited = self.inherited_for(&key, &netns);
        let from_predecessor = inherited.len();
        let listeners = open_listeners(
            &key,
            &spec,
            &netns,
            self.ctx.certs.is_some(),
            &mut inherited,
        )?;
        let dns_settings = self.dns.clone().filter(|_| spec.dns_capture);
        let dns_sockets = match &dns_settings {
            Some(_) => open_dns(&key, &spec, &netns, &mut inherited)?,
            None => Vec::new(),
        };
        // What the predecessor served and this one does not (HBONE or DNS now off) closes
        // when it has drained.
        drop(inherited);
        let mut sockets = Vec::new();
        let mut keep = |role: PodSocket, addr: SocketAddr, socket: &Socket| match socket.try_clone()
        {
            Ok(socket) => sockets.push((role, addr, OwnedFd::from(socket))),
            Err(error) => {
                tracing::warn!(pod = %key, %addr, %error, "cannot keep a listener for a successor")
            }
        };
        for (role, addr, socket) in &listeners {
            keep(role.socket(), *addr, socket);
        }
        for (_, addr, udp, tcp) in &dns_sockets {
            keep(PodSocket::DnsUdp, *addr, udp);
            keep(PodSocket::DnsTcp, *addr, tcp);
        }
        let listener_bits = listeners
            .iter()
            .map(|(role, addr, _)| listener_bit(*role, *addr))
            .fold(0, |bits, bit| bits | bit)
            | dns_sockets
                .iter()
                .map(|(bit, _, _, _)| bit)
                .fold(0, |bits, bit| bits | bit);
        let netns_cookie = netns::socket_netns_cookie(&listeners[0].2).map_err(|io_error| {
            EnrollError::Cookie {
                pod: key.clone(),
                io_error,
            }
        })?;
        let original_source = self.original_source(&key, &spec, &netns);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let identity = Identity::new(&self.trust_domain, &spec.namespace, &spec.service_account);
        let pod = Arc::new(Pod {
            spec,
            identity,
            netns,
            netns_cookie,
            id,
            original_source,
        });

        let mut tasks = Vec::with_capacity(listeners.len());
        let fail = |tasks: &[JoinHandle<()>], source| {
            tasks.iter().for_each(JoinHandle::abort);
            if let Err(error) = self.release_capture(&pod) {
                tracing::warn!(pod = %key, %error, "cleanup after failed enrollment incomplete");
            }
            EnrollError::Dataplane {
                pod: key.clone(),
                source,
            }
        };
        for (role, addr, socket) in listeners {
            if let Role::InboundPlain = role {
                let same_family = |ip: &&IpAddr| ip.to_canonical().is_ipv4() == addr.is_ipv4();
                for ip in pod.spec.ips.iter().filter(same_family) {
                    self.dataplane
                        .register_inbound(*ip, &socket)
                        .map_err(|source| fail(&tasks, source))?;
                }
            }
            let listener = TcpListener::from_std(socket.into()).map_err(|io_error| {
                tasks.iter().for_each(JoinHandle::abort);
                EnrollError::Register {
                    pod: key.clone(),
                    io_error,
                }
            })?;
            let (pod, ctx, gate) = (pod.clone(), self.ctx.clone(), self.accepting.subscribe());
            tasks.push(match role {
                Role::Outbound => {
                    tokio::spawn(gated(gate, proxy::outbound::serve(listener, pod, ctx)))
                }
                Role::InboundPlain => {
                    tokio::spawn(gated(gate, proxy::inbound_plain::serve(listener, pod, ctx)))
                }
                Role::Hbone => {
                    tokio::spawn(gated(gate, proxy::inbound::serve_hbone(listener, pod, ctx)))
                }
            });
        }
        if let Some(settings) = dns_settings {
            let registered: io::Result<Vec<_>> = dns_sockets
                .into_iter()
                .map(|(_, _, udp, tcp)| {
                    Ok((
                        tokio::net::UdpSocket::from_std(udp.into())?,
                        TcpListener::from_std(tcp.into())?,
                    ))
                })
                .collect();
            match registered {
                Ok(sockets) => {
                    let (pod, ctx, gate) =
                        (pod.clone(), self.ctx.clone(), self.accepting.subscribe());
                    tasks.push(tokio::spawn(gated(
                        gate,
                        dns::serve(sockets, pod, ctx, settings),
                    )));
                }
                Err(io_error) => {
                    tasks.iter().for_each(JoinHandle::abort);
                    return Err(EnrollError::Register {
                        pod: key.clone(),
                        io_error,
                    });
                }
            }
        }
        // Capture starts only once something is accepting.
        let (link_id, origin) = self
            .dataplane
            .attach_inbound(pod.netns.as_fd(), pod.netns.path(), netns_cookie)
            .map_err(|source| fail(&tasks, source))?;
        let record = PodRecord {
            pod_id: id,
            namespace: pod.spec.namespace.clone(),
            name: pod.spec.name.clone(),
            service_account: pod.spec.service_account.clone(),
            ips: pod.spec.ips.clone(),
            listeners: listener_bits | original_source_bits(pod.original_source),
            truncated: false,
        };
        self.dataplane
            .enroll(netns_cookie, &record.encode())
            .map_err(|source| fail(&tasks, source))?;
        self.ctx.local_pods.insert(&pod);
        // Its certificate is fetched now, so that its first connection does not wait.
        if let Some(certs) = &self.ctx.certs {
            certs.track(&pod.identity);
        }
        tracing::info!(
            pod = %key,
            identity = %pod.identity,
            netns = %pod.netns.path().display(),
            netns_cookie,
            inbound_link_id = link_id,
            inbound_link = %origin,
            original_source_ipv4 = original_source.ipv4,
            original_source_ipv6 = original_source.ipv6,
            from_predecessor,
            "pod enrolled"
        );
        self.lock().insert(
            key,
            Enrolled {
                pod: pod.clone(),
                tasks,
                sockets,
            },
        );
        Ok(pod)
    }

    /// Sets up the pod's namespace so that mesh-node can connect to its applications from their
    /// clients' addresses, when that mode is on. A namespace where that fails still enrolls:
    /// its applications see connections from the pod's own address, as with the mode off.
    fn original_source(&self, key: &str, spec: &PodSpec, netns: &NetNs) -> OriginalSource {
        if !self.ctx.settings.original_source {
            return OriginalSource::default();
        }
        let has = |v4: bool| spec.ips.iter().any(|ip| ip.to_canonical().is_ipv4() == v4);
        let wanted = OriginalSource {
            ipv4: has(true),
            ipv6: has(false),
        };
        source_routing::install(netns, key, wanted, &self.host_proc).unwrap_or_else(|error| {
            tracing::warn!(
                pod = key,
                error = %crate::error_chain(&error),
                "cannot keep clients' addresses for this pod; its applications see connections from its own address"
            );
            OriginalSource::default()
        })
    }

    /// Stops capture for the pod, then closes its listeners; connections already accepted go on
    /// to their natural end. Unknown pods are ignored.
    pub fn unenroll(&self, key: &str) -> Result<(), DataplaneError> {
        let Some(enrolled) = self.lock().remove(key) else {
            return Ok(());
        };
        self.ctx.local_pods.remove(&enrolled.pod);
        if let Some(certs) = &self.ctx.certs {
            certs.untrack(&enrolled.pod.identity);
        }
        // Once draining, the kernel state belongs to whoever serves next (a successor may have
        // enrolled this very namespace); a pod gone meanwhile is cleaned up when it starts.
        let result = if self.ctx.drain.is_draining() {
            Ok(())
        } else {
            self.release_capture(&enrolled.pod)
        };
        enrolled.tasks.iter().for_each(JoinHandle::abort);
        tracing::info!(pod = %key, "pod un-enrolled");
        result
    }

    /// Closes every pod's listeners (and DNS proxy) at once, for a drain: new connections meet
    /// the fail mode (or a successor's listeners), while the pods stay enrolled and pinned and
    /// the connections already accepted go on. Returns how many pods were serving.
    pub fn stop_accepting(&self) -> usize {
        let mut pods = self.lock();
        for enrolled in pods.values_mut() {
            enrolled.tasks.iter().for_each(JoinHandle::abort);
            enrolled.sockets.clear();
        }
        pods.len()
    }

    /// Undoes every kernel-side effect of enrolling `pod`; reports the first failure.
    fn release_capture(&self, pod: &Pod) -> Result<(), DataplaneError> {
        let dataplane = &self.dataplane;
        let mut results = vec![
            dataplane.unenroll(pod.netns_cookie),
            dataplane.detach_inbound(pod.netns_cookie),
        ];
        results.extend(
            pod.spec
                .ips
                .iter()
                .map(|ip| dataplane.unregister_inbound(*ip)),
        );
        results.into_iter().collect()
    }

    /// Every enrolled pod, by key.
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        let mut pods: Vec<Arc<Pod>> = self.lock().values().map(|e| e.pod.clone()).collect();
        pods.sort_by_key(|pod| pod.spec.key());
        pods
    }

    /// Network-namespace cookies of every enrolled pod.
    pub fn netns_cookies(&self) -> Vec<u64> {
        self.lock()
            .values()
            .map(|enrolled| enrolled.pod.netns_cookie)
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Enrolled>> {
        lock(&self.pods)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Role {
    fn socket(self) -> PodSocket {
        match self {
            Role::Outbound => PodSocket::Outbound,
            Role::InboundPlain => PodSocket::InboundPlain,
            Role::Hbone => PodSocket::Hbone,
        }
    }
}

/// The handed-over socket for `role` at `addr`, if there is one.
fn take_inherited(
    inherited: &mut Vec<(PodSocket, SocketAddr, OwnedFd)>,
    role: PodSocket,
    addr: SocketAddr,
) -> Option<Socket> {
    let at = inherited
        .iter()
        .position(|(r, a, _)| *r == role && *a == addr)?;
    Some(Socket::from(inherited.swap_remove(at).2))
}

/// The record's bits for the families the pod delivers from clients' addresses.
fn original_source_bits(families: OriginalSource) -> u32 {
    let bit = |on: bool, bit: u32| if on { bit } else { 0 };
    bit(families.ipv4, EnrolledPod::ORIGINAL_SOURCE4)
        | bit(families.ipv6, EnrolledPod::ORIGINAL_SOURCE6)
}

/// The `EnrolledPod::LISTENER_*` bit of a listener.
fn listener_bit(role: Role, addr: SocketAddr) -> u32 {
    match (role, addr.is_ipv4()) {
        (Role::Outbound, true) => EnrolledPod::LISTENER_OUTBOUND4,
        (Role::Outbound, false) => EnrolledPod::LISTENER_OUTBOUND6,
        (Role::InboundPlain, true) => EnrolledPod::LISTENER_INBOUND4,
        (Role::InboundPlain, false) => EnrolledPod::LISTENER_INBOUND6,
        (Role::Hbone, _) => EnrolledPod::LISTENER_HBONE,
    }
}

/// Opens, inside the pod's namespace: 127.0.0.1:15001 (required) and [::1]:15001 (when the pod
/// has IPv6) for outbound capture; 127.0.0.1:15006 (and [::1]:15006) for inbound plaintext,
/// which sk_lookup hands connections to whatever address they were for; and, with HBONE on,
/// `<pod IP>:15008` for every pod address. The first listener returned is the IPv4 outbound one.
/// A socket a predecessor handed over for the same role and address is served as it is.
fn open_listeners(
    pod: &str,
    spec: &PodSpec,
    netns: &NetNs,
    hbone: bool,
    inherited: &mut Vec<(PodSocket, SocketAddr, OwnedFd)>,
) -> Result<Vec<(Role, SocketAddr, Socket)>, EnrollError> {
    let has_v6 = spec.ips.iter().any(|ip| ip.to_canonical().is_ipv6());
    let mut wanted = vec![
        (
            Role::Outbound,
            SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)),
            true,
        ),
        (
            Role::Outbound,
            SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
            false,
        ),
        (
            Role::InboundPlain,
            SocketAddr::from((Ipv4Addr::LOCALHOST, INBOUND_PLAINTEXT_PORT)),
            true,
        ),
    ];
    if has_v6 {
        wanted.push((
            Role::InboundPlain,
            SocketAddr::from((Ipv6Addr::LOCALHOST, INBOUND_PLAINTEXT_PORT)),
            true,
        ));
    }
    if hbone {
        wanted.extend(spec.ips.iter().map(|ip| {
            (
                Role::Hbone,
                SocketAddr::new(ip.to_canonical(), HBONE_PORT),
                true,
            )
        }));
    }
    let results = netns
        .run(|| {
            wanted
                .iter()
                .map(
                    |(role, addr, _)| match take_inherited(inherited, role.socket(), *addr) {
                        Some(socket) => Ok(socket),
                        None => listen(*addr),
                    },
                )
                .collect::<Vec<_>>()
        })
        .map_err(|source| EnrollError::NetNs {
            pod: pod.to_owned(),
            source,
        })?;
    let mut listeners = Vec::with_capacity(wanted.len());
    for ((role, addr, required), result) in wanted.into_iter().zip(results) {
        match result {
            Ok(socket) => listeners.push((role, addr, socket)),
            Err(io_error) if required => {
                return Err(EnrollError::Bind {
                    pod: pod.to_owned(),
                    addr,
                    netns: netns.path().to_owned(),
                    io_error,
                });
            }
            // No IPv6 in the pod: the connect6 hook's liveness check finds no listener and lets
            // IPv6 connections through (there are none to make).
            Err(error) => tracing::debug!(pod, %addr, %error, "optional listener not opened"),
        }
    }
    Ok(listeners)
}

/// The DNS proxy's sockets in the pod's namespace, each pair with its record bit:
/// 127.0.0.1:15053 UDP and TCP, and [::1]:15053 when the pod has IPv6 (handed-over ones as
/// they are).
fn open_dns(
    pod: &str,
    spec: &PodSpec,
    netns: &NetNs,
    inherited: &mut Vec<(PodSocket, SocketAddr, OwnedFd)>,
) -> Result<Vec<(u32, SocketAddr, Socket, Socket)>, EnrollError> {
    let mut wanted = vec![(
        EnrolledPod::LISTENER_DNS4,
        SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PROXY_PORT)),
    )];
    if spec.ips.iter().any(|ip| ip.to_canonical().is_ipv6()) {
        wanted.push((
            EnrolledPod::LISTENER_DNS6,
            SocketAddr::from((Ipv6Addr::LOCALHOST, DNS_PROXY_PORT)),
        ));
    }
    let mut opened = Vec::with_capacity(wanted.len());
    for (bit, addr) in wanted {
        let handed = (
            take_inherited(inherited, PodSocket::DnsUdp, addr),
            take_inherited(inherited, PodSocket::DnsTcp, addr),
        );
        if let (Some(udp), Some(tcp)) = handed {
            opened.push((bit, addr, udp, tcp));
            continue;
        }
        let pair = netns
            .run(|| -> io::Result<(Socket, Socket)> {
                let udp = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
                udp.set_mark(PROXY_MARK)?;
                udp.set_reuse_address(true)?;
                if addr.is_ipv6() {
                    udp.set_only_v6(true)?;
                }
                udp.set_nonblocking(true)?;
                udp.bind(&addr.into())?;
                Ok((udp, listen(addr)?))
            })
            .map_err(|source| EnrollError::NetNs {
                pod: pod.to_owned(),
                source,
            })?
            .map_err(|io_error| EnrollError::Bind {
                pod: pod.to_owned(),
                addr,
                netns: netns.path().to_owned(),
                io_error,
            })?;
        opened.push((bit, addr, pair.0, pair.1));
    }
    Ok(opened)
}

fn listen(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}
