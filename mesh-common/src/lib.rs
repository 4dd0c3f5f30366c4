//! Types shared by mesh-node's eBPF programs and its user space.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a compile-time size
//! assertion, so the kernel and user space agree on the layout byte for byte. Addresses are kept
//! exactly as the kernel hands them to the programs (network byte order words); ports are kept in
//! host byte order.
#![no_std]
#![deny(unsafe_code)]
#![warn(missing_docs)]

/// `SO_MARK` carried by every socket mesh-node opens inside a pod's network namespace. The
/// redirect hooks never touch a marked socket, so the proxy cannot capture itself.
/// The same value ztunnel uses, so tools that know it (conntrack dumps, policy routing) keep working.
pub const PROXY_MARK: u32 = 0x539;

/// `SO_MARK` of the sockets mesh-node connects to an application with, from the client's
/// address (original source). In the pod's namespace a routing rule sends this mark to
/// [`DELIVERY_TABLE`], whose one route makes every address local: the application's replies
/// (which inherit the mark, `tcp_fwmark_accept`) come back to mesh-node instead of leaving the
/// pod. The capture hooks leave these sockets alone too.
pub const DELIVERY_MARK: u32 = 0x53a;

/// The policy-routing table of [`DELIVERY_MARK`] in each enrolled pod's namespace.
pub const DELIVERY_TABLE: u32 = 0x53a;

/// Priority of the rule selecting [`DELIVERY_TABLE`]: after the `local` table (0), before
/// `main` (32766).
pub const DELIVERY_RULE_PRIORITY: u32 = 32000;

/// A socket mark of mesh-node's own: the capture hooks never redirect such a socket.
pub const fn is_own_mark(mark: u32) -> bool {
    mark == PROXY_MARK || mark == DELIVERY_MARK
}

/// Outbound capture listener, on loopback inside each enrolled pod's network namespace.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture listener inside each enrolled pod's network namespace.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound HBONE listener on the pod's IP inside its network namespace.
pub const HBONE_PORT: u16 = 15008;
/// DNS proxy (UDP and TCP) on loopback inside each enrolled pod's network namespace.
pub const DNS_PROXY_PORT: u16 = 15053;
/// The port DNS queries are captured on.
pub const DNS_PORT: u16 = 53;

/// `AF_INET`, as the kernel reports it in `bpf_sock_addr.user_family`.
pub const FAMILY_INET: u16 = 2;
/// `AF_INET6`.
pub const FAMILY_INET6: u16 = 10;

/// Names of the maps, identical in the eBPF object and in user space (and the file names under
/// the bpffs pin directory).
pub mod map_names {
    /// [`crate::EnrolledPod`] by network-namespace cookie.
    pub const ENROLLED: &str = "MESH_ENROLLED";
    /// [`crate::OrigDst`] by socket cookie: what the application asked to connect to.
    pub const SOCK_ORIG: &str = "MESH_SOCK_ORIG";
    /// [`crate::OrigDst`] by [`crate::ConnKey`]: what mesh-node reads when it accepts.
    pub const CONN_ORIG: &str = "MESH_CONN_ORIG";
    /// The single [`crate::DataplaneConfig`].
    pub const CONFIG: &str = "MESH_CONFIG";
    /// Per-CPU `u64` counters indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "MESH_COUNTERS";
    /// SOCKHASH of mesh-node's inbound plaintext (15006) listeners by [`crate::InboundKey`].
    pub const INBOUND: &str = "MESH_INBOUND";
    /// Ring buffer of [`crate::TraceEvent`]s: every redirect decision for an enrolled pod.
    pub const EVENTS: &str = "MESH_EVENTS";
    /// [`crate::OrigDst`] by socket cookie for captured DNS over UDP: the resolver the
    /// application addressed, which its replies must seem to come from.
    pub const DNS_SOCK_ORIG: &str = "MESH_DNS_SOCK_ORIG";
    /// [`crate::OrigDst`] by network-namespace cookie: the resolver a pod addressed last, where
    /// mesh-node forwards the queries it does not answer.
    pub const DNS_UPSTREAM: &str = "MESH_DNS_UPSTREAM";
    /// Connections mesh-node made to an application from its client's address, for as long as
    /// they live; `sk_lookup` lets their handshake through to the application instead of
    /// steering it.
    pub const DELIVERING: &str = "MESH_DELIVERING";
    /// SOCKHASH by [`crate::SockKey`] of the sockets of same-node connections whose bytes the
    /// kernel carries (`--kernel-same-node`): the applications' (joined by `sock_ops`) and
    /// mesh-node's own (the redirect targets). The `sk_msg` program is attached to it.
    pub const SOCKS: &str = "MESH_SOCKS";
    /// [`crate::SockPair`] by the sender's [`crate::SockKey`]: which of mesh-node's sockets
    /// what the sender writes goes out of, and how many bytes went so.
    pub const PAIR: &str = "MESH_PAIR";
    /// Bytes a joined client sent the ordinary way (through mesh-node), by its
    /// [`crate::SockKey`]; counted by `sk_msg`, for the hand-over.
    pub const PASSED: &str = "MESH_PASSED";
    /// … and how many of those mesh-node has written on (mesh-node's count).
    pub const RELAYED: &str = "MESH_RELAYED";
}

/// Names of the programs in the eBPF object (also the link file names under the pin directory).
pub mod program_names {
    /// `cgroup/connect4`: captures IPv4 connects of enrolled pods.
    pub const CONNECT4: &str = "mesh_connect4";
    /// `cgroup/connect6`: captures IPv6 (and IPv4-mapped) connects.
    pub const CONNECT6: &str = "mesh_connect6";
    /// `sock_ops`: re-keys original destinations by source port, forgets them at close.
    pub const SOCK_OPS: &str = "mesh_sock_ops";
    /// `cgroup/getpeername4`: answers with the original destination.
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    /// `cgroup/getpeername6`: the same for IPv6 sockets.
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
    /// `sk_lookup`, attached to each enrolled pod's network namespace.
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    /// `cgroup/sendmsg4`: unconnected UDP DNS queries to the pod's DNS proxy.
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    /// `cgroup/recvmsg4`: the proxy's answers seem to come from the resolver asked.
    pub const RECVMSG4: &str = "mesh_recvmsg4";
    /// `cgroup/sendmsg6`: the same for IPv6 (and IPv4-mapped) resolvers.
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    /// `cgroup/recvmsg6`.
    pub const RECVMSG6: &str = "mesh_recvmsg6";
    /// `sock_ops`, attached beside [`SOCK_OPS`] only with `--kernel-same-node`: joins captured
    /// clients and paired servers to [`crate::map_names::SOCKS`].
    pub const SOCK_JOIN: &str = "mesh_sock_join";
    /// `sk_msg`, attached to [`crate::map_names::SOCKS`]: sends what a paired application
    /// writes straight out of mesh-node's socket towards the other application.
    pub const SK_MSG: &str = "mesh_sk_msg";
}

/// Capacity of [`map_names::ENROLLED`]: pods on one node.
pub const MAX_ENROLLED: u32 = 4096;
/// Capacity of [`map_names::INBOUND`]: pod addresses on one node (IPv4 and IPv6).
pub const MAX_INBOUND: u32 = 2 * MAX_ENROLLED;
/// Capacity of the LRU maps that remember original destinations.
pub const MAX_TRACKED_CONNS: u32 = 65536;
/// Connections from a client's address into pods tracked at once (an entry lives as long as
/// its connection; LRU beyond that, which only an entry's late handshake ACK would miss).
pub const MAX_DELIVERING: u32 = MAX_TRACKED_CONNS;
/// Capacity of [`map_names::SOCKS`] and the maps beside it: sockets of same-node connections
/// the kernel carries (a full map leaves a connection on mesh-node's relay).
pub const MAX_PAIRED: u32 = MAX_TRACKED_CONNS;
/// Size of [`map_names::EVENTS`] in bytes (a power of two, a multiple of the page size): 4096
/// events of 64 bytes (plus the kernel's 8-byte record headers).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Value of [`map_names::ENROLLED`]: a pod whose network namespace is captured, with what an
/// operator needs to recognise it, so that `mesh-node bpf` can name pods from the pinned map
/// alone, while mesh-node runs or after it stopped. The programs read only `pod_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    /// mesh-node's own index for the pod, carried in trace events.
    pub pod_id: u32,
    /// [`EnrolledPod::LISTENER_OUTBOUND4`] and the other listener bits: which of mesh-node's
    /// listeners were opened in the pod's namespace.
    pub flags: u32,
    /// The pod's addresses as 16 bytes each (IPv4 mapped into IPv6); `ip_count` are used.
    pub ips: [[u8; 16]; 2],
    /// How many of `ips` are used.
    pub ip_count: u8,
    /// Byte lengths of the text fields below (each is UTF-8, truncated to its capacity).
    pub namespace_len: u8,
    /// Length of `name`.
    pub name_len: u8,
    /// Length of `service_account`.
    pub service_account_len: u8,
    /// Explicit padding (zero).
    pub _pad: [u8; 4],
    /// The pod's Kubernetes namespace.
    pub namespace: [u8; 64],
    /// The pod's name.
    pub name: [u8; 128],
    /// The pod's service account.
    pub service_account: [u8; 64],
}
const _: () = assert!(core::mem::size_of::<EnrolledPod>() == 304);

impl EnrolledPod {
    /// 127.0.0.1:15001 is open in the pod's namespace.
    pub const LISTENER_OUTBOUND4: u32 = 1 << 0;
    /// [::1]:15001 is open.
    pub const LISTENER_OUTBOUND6: u32 = 1 << 1;
    /// 127.0.0.1:15006 is open (and registered for the pod's IPv4 addresses).
    pub const LISTENER_INBOUND4: u32 = 1 << 2;
    /// [::1]:15006 is open.
    pub const LISTENER_INBOUND6: u32 = 1 << 3;
    /// `<pod IP>:15008` (HBONE) is open.
    pub const LISTENER_HBONE: u32 = 1 << 4;
    /// 127.0.0.1:15053 (UDP and TCP, the DNS proxy) is open: DNS is captured.
    pub const LISTENER_DNS4: u32 = 1 << 5;
    /// [::1]:15053 (UDP and TCP) is open: DNS to IPv6 resolvers is captured.
    pub const LISTENER_DNS6: u32 = 1 << 6;
    /// mesh-node connects to this pod's applications from IPv4 clients' addresses.
    pub const ORIGINAL_SOURCE4: u32 = 1 << 7;
    /// mesh-node connects to this pod's applications from IPv6 clients' addresses.
    pub const ORIGINAL_SOURCE6: u32 = 1 << 8;
    /// A text field was longer than its capacity and was cut.
    pub const TRUNCATED: u32 = 1 << 31;

    /// An all-zero value: no addresses, empty names.
    pub const fn empty(pod_id: u32) -> Self {
        Self {
            pod_id,
            flags: 0,
            ips: [[0; 16]; 2],
            ip_count: 0,
            namespace_len: 0,
            name_len: 0,
            service_account_len: 0,
            _pad: [0; 4],
            namespace: [0; 64],
            name: [0; 128],
            service_account: [0; 64],
        }
    }
}

/// Which program made a [`TraceEvent`] decision.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceHook {
    /// `connect()` from an enrolled pod (cgroup/connect4 or connect6).
    Connect = 1,
    /// A new inbound connection to an enrolled pod (sk_lookup).
    Inbound = 2,
}

/// What happened to the connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceAction {
    /// Redirected to mesh-node.
    Captured = 1,
    /// Left to go where it was going, uncaptured.
    Passed = 2,
    /// Refused (`connect()` failed with `EPERM`).
    Refused = 3,
}

/// Why, when the action is not the ordinary capture.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceReason {
    /// Captured as configured.
    None = 0,
    /// mesh-node has no listener for the pod (not running, or not serving it yet).
    NotServing = 1,
    /// The original-destination map refused the entry (full).
    MapFull = 2,
}

/// One redirect decision, as the programs write it to [`map_names::EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub time_ns: u64,
    /// The pod's network-namespace cookie; 0 for inbound (sk_lookup cannot read it: the pod is
    /// the one that owns `dst`).
    pub netns_cookie: u64,
    /// Where the connection was headed, network-order words (IPv4 in `dst_ip[0]`).
    pub dst_ip: [u32; 4],
    /// The peer that opened an inbound connection; zero for outbound (not bound yet).
    pub src_ip: [u32; 4],
    /// The pod's id from [`EnrolledPod::pod_id`]; 0 for inbound.
    pub pod_id: u32,
    /// Host byte order.
    pub dst_port: u16,
    /// Host byte order; zero for outbound (not bound yet).
    pub src_port: u16,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u16,
    /// A [`TraceHook`].
    pub hook: u8,
    /// A [`TraceAction`].
    pub action: u8,
    /// A [`TraceReason`].
    pub reason: u8,
    /// Explicit padding (zero).
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<TraceEvent>() == 64);

/// An IPv4 or IPv6 socket address as the kernel's socket-address hooks see it.
///
/// `ip` holds the address in network byte order words: for IPv4 only `ip[0]` is used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// Network-namespace cookie of the socket that connected.
    pub netns_cookie: u64,
    /// The destination, network-order words.
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u16,
    /// The connecting socket's source port (host byte order), filled in when its SYN goes out;
    /// 0 before.
    pub src_port: u16,
    /// Explicit padding (zero).
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 32);
const _: () = assert!(core::mem::align_of::<OrigDst>() == 8);

/// Key of [`map_names::INBOUND`]: a pod address as 16 bytes in network order, IPv4 as the
/// IPv4-mapped IPv6 address (`::ffff:a.b.c.d`). `sk_lookup` cannot read the network-namespace
/// cookie, and pod addresses are unique on a node, so the address names the pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct InboundKey {
    /// Network byte order words, as in `bpf_sk_lookup.local_ip6`.
    pub ip: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<InboundKey>() == 16);

impl InboundKey {
    /// The key of an IPv4 address given as the kernel's network-order word.
    pub const fn v4(ip4_be_word: u32) -> Self {
        Self {
            ip: [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be_word],
        }
    }

    /// The key of an IPv6 address given as the kernel's four network-order words.
    pub const fn v6(words: [u32; 4]) -> Self {
        Self { ip: words }
    }

    /// The key of an address given as its 16 bytes (IPv4 mapped into IPv6).
    pub fn from_octets(octets: [u8; 16]) -> Self {
        let mut ip = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            ip[i] = u32::from_ne_bytes([
                octets[4 * i],
                octets[4 * i + 1],
                octets[4 * i + 2],
                octets[4 * i + 3],
            ]);
            i += 1;
        }
        Self { ip }
    }
}

/// Key of [`map_names::DELIVERING`]: a connection from `remote` to the application at
/// `local`, as `sk_lookup` sees its SYN. Addresses as in [`InboundKey`] (IPv4 mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DeliveryKey {
    /// The client's address (mesh-node's socket).
    pub remote: InboundKey,
    /// The application's address.
    pub local: InboundKey,
    /// Host byte order.
    pub remote_port: u16,
    /// Host byte order.
    pub local_port: u16,
    /// Explicit padding (zero).
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DeliveryKey>() == 40);

/// Key of [`map_names::SOCKS`], [`map_names::PAIR`] and the hand-over maps: one TCP socket,
/// by its network namespace and its own 4-tuple as it sees it (`local` is its own end).
/// Addresses IPv4-mapped, in network order; ports in host order. `sk_msg` has no socket-cookie
/// helper, and a server's accepted sockets share their local port, so the whole tuple it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    /// The socket's network namespace.
    pub netns_cookie: u64,
    /// The socket's own address.
    pub local: [u8; 16],
    /// The address it is connected to.
    pub remote: [u8; 16],
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    /// Explicit padding (zero).
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 48);

impl SockKey {
    /// The socket at the other end of the same connection, in the same namespace (what
    /// mesh-node computes for an application's socket from its own accepted one).
    pub const fn peer(&self) -> Self {
        Self {
            netns_cookie: self.netns_cookie,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Value of [`map_names::PAIR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockPair {
    /// mesh-node's socket what the sender writes goes out of.
    pub target: SockKey,
    /// Bytes sent so (counted by `sk_msg`, under the sender's socket lock).
    pub redirected: u64,
    /// [`SockPair::HANDOVER`] for a client that may have written before it was paired: its
    /// writes are redirected only while its count in [`map_names::PASSED`] equals mesh-node's
    /// in [`map_names::RELAYED`], and never without a count.
    pub flags: u64,
}
const _: () = assert!(core::mem::size_of::<SockPair>() == 64);

impl SockPair {
    /// See [`SockPair::flags`].
    pub const HANDOVER: u64 = 1;
}

/// Key of [`map_names::CONN_ORIG`]: the client side of a captured connection as mesh-node sees it
/// on accept. The source port is unique per network namespace while the connection lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    /// Network-namespace cookie of the client's socket.
    pub netns_cookie: u64,
    /// Host byte order.
    pub src_port: u16,
    /// Explicit padding (zero).
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 16);

impl ConnKey {
    /// The key of the client socket in `netns_cookie` bound to `src_port`.
    pub const fn new(netns_cookie: u64, src_port: u16) -> Self {
        Self {
            netns_cookie,
            src_port,
            _pad: [0; 6],
        }
    }
}

/// What the kernel programs do for an enrolled pod when mesh-node is not serving it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Let the connection go straight to its destination, uncaptured.
    Open = 0,
    /// Refuse the connection (`connect()` fails with `EPERM`).
    Closed = 1,
}

/// The single value of [`map_names::CONFIG`]. Lives in a pinned map so that the kernel programs
/// keep honouring it after mesh-node has stopped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DataplaneConfig {
    /// A [`FailMode`] as `u32`.
    pub fail_mode: u32,
    /// [`DataplaneConfig::ORIGINAL_SOURCE`], or zero. Read by `mesh-node bpf status`.
    pub flags: u32,
}

impl DataplaneConfig {
    /// Applications see their clients' addresses (mesh-node connects to them from there).
    pub const ORIGINAL_SOURCE: u32 = 1 << 0;
    /// Captured sockets join [`map_names::SOCKS`], so that the kernel can carry same-node
    /// connections' bytes (`--kernel-same-node`).
    pub const KERNEL_SAME_NODE: u32 = 1 << 1;
}
const _: () = assert!(core::mem::size_of::<DataplaneConfig>() == 8);

/// Indexes into [`map_names::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Connections redirected to mesh-node.
    Captured = 0,
    /// Connections of enrolled pods let through because mesh-node was not serving (fail-open).
    PassedNotServing = 1,
    /// Connections of enrolled pods refused because mesh-node was not serving (fail-closed).
    RefusedNotServing = 2,
    /// Captured connections whose original destination could not be recorded (map full): let
    /// through uncaptured.
    PassedMapFull = 3,
    /// `getpeername()` answers rewritten to the original destination.
    PeerRestored = 4,
    /// Inbound connections to an enrolled pod steered to mesh-node's plaintext listener.
    InboundCaptured = 5,
    /// Inbound connections to an enrolled pod let through because no mesh-node listener was
    /// registered for its address (mesh-node not serving it).
    InboundNotServing = 6,
    /// Trace events dropped because the ring buffer was full (nobody reading, or reading slowly).
    TraceDropped = 7,
    /// Sockets that joined [`map_names::SOCKS`] (captured clients, and servers of paired
    /// same-node connections).
    SockJoined = 8,
    /// Application writes the kernel sent straight out of mesh-node's socket (`sk_msg`).
    MsgRedirected = 9,
    /// Writes of a paired socket whose target was gone: sent the ordinary way.
    MsgRedirectFailed = 10,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 11] = [
        Counter::Captured,
        Counter::PassedNotServing,
        Counter::RefusedNotServing,
        Counter::PassedMapFull,
        Counter::PeerRestored,
        Counter::InboundCaptured,
        Counter::InboundNotServing,
        Counter::TraceDropped,
        Counter::SockJoined,
        Counter::MsgRedirected,
        Counter::MsgRedirectFailed,
    ];
    /// Entries of [`map_names::COUNTERS`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The counter's name in metrics (`mesh_ebpf_<name>_total`) and `mesh-node bpf`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Captured => "captured",
            Counter::PassedNotServing => "passed_not_serving",
            Counter::RefusedNotServing => "refused_not_serving",
            Counter::PassedMapFull => "passed_map_full",
            Counter::PeerRestored => "peer_restored",
            Counter::InboundCaptured => "inbound_captured",
            Counter::InboundNotServing => "inbound_not_serving",
            Counter::TraceDropped => "trace_dropped",
            Counter::SockJoined => "sock_joined",
            Counter::MsgRedirected => "msg_redirected",
            Counter::MsgRedirectFailed => "msg_redirect_failed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, has no padding that is not an explicit field,
    // and every bit pattern is a valid value.
    #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    mod impls {
        use crate::{
            ConnKey, DataplaneConfig, DeliveryKey, EnrolledPod, InboundKey, OrigDst, SockKey,
            SockPair, TraceEvent,
        };
        unsafe impl aya::Pod for TraceEvent {}
        unsafe impl aya::Pod for InboundKey {}
        unsafe impl aya::Pod for EnrolledPod {}
        unsafe impl aya::Pod for OrigDst {}
        unsafe impl aya::Pod for ConnKey {}
        unsafe impl aya::Pod for DataplaneConfig {}
        unsafe impl aya::Pod for DeliveryKey {}
        unsafe impl aya::Pod for SockKey {}
        unsafe impl aya::Pod for SockPair {}
    }
}

#[cfg(test)]
mod tests;
