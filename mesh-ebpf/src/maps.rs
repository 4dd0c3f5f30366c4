//! Every map the programs share with user space. All are pinned by name under mesh-node's pin
//! directory, so a restarted mesh-node and the still-attached programs see the same state.
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use mesh_common::{
    ConnKey, Counter, DataplaneConfig, DeliveryKey, EVENTS_BYTES, EnrolledPod, InboundKey,
    MAX_DELIVERING, MAX_ENROLLED, MAX_INBOUND, MAX_PAIRED, MAX_TRACKED_CONNS, OrigDst, SockKey,
    SockPair, TraceEvent,
};

/// Enrolled pods by network-namespace cookie. Written by mesh-node on (un)enrollment.
#[map(name = "MESH_ENROLLED")]
pub static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(MAX_ENROLLED, 0);

/// Original destination by socket cookie, recorded at connect; read by getpeername and sock_ops.
#[map(name = "MESH_SOCK_ORIG")]
pub static SOCK_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_TRACKED_CONNS, 0);

/// Original destination by (netns cookie, source port), for mesh-node to read on accept.
#[map(name = "MESH_CONN_ORIG")]
pub static CONN_ORIG: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(MAX_TRACKED_CONNS, 0);

/// The resolver each captured UDP DNS socket addressed (by socket cookie), which recvmsg and
/// getpeername show in place of the pod's DNS proxy. UDP sockets have no close callback, so
/// entries leave by LRU eviction.
#[map(name = "MESH_DNS_SOCK_ORIG")]
pub static DNS_SOCK_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_TRACKED_CONNS, 0);

/// The resolver a pod addressed last (by network-namespace cookie), where mesh-node forwards
/// the queries it does not answer itself.
#[map(name = "MESH_DNS_UPSTREAM")]
pub static DNS_UPSTREAM: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_ENROLLED, 0);

/// Index 0: the [`DataplaneConfig`]. Zeroed (fail-open) until mesh-node writes it.
#[map(name = "MESH_CONFIG")]
pub static CONFIG: Array<DataplaneConfig> = Array::pinned(1, 0);

/// mesh-node's inbound plaintext listeners by pod address. A socket leaves the map when it
/// closes, so a stopped mesh-node leaves no stale redirect behind.
#[map(name = "MESH_INBOUND")]
pub static INBOUND: SockHash<InboundKey> = SockHash::pinned(MAX_INBOUND, 0);

/// Connections mesh-node made to an application from its client's address: written just
/// before the connect and removed when the connection ends, so that `sk_lookup` lets exactly
/// their handshake through to the application (the SYN, and the ACK of a SYN-cookie handshake,
/// which the listener looks up again). LRU, so an entry mesh-node failed to remove cannot fill
/// the map.
#[map(name = "MESH_DELIVERING")]
pub static DELIVERING: LruHashMap<DeliveryKey, u8> = LruHashMap::pinned(MAX_DELIVERING, 0);

/// Sockets whose writes `sk_msg` sees (`--kernel-same-node`): captured clients and servers
/// of paired connections, joined by `sock_ops`, and mesh-node's own sockets they are paired
/// with, which are the redirect targets. A socket leaves the map when it closes.
#[map(name = "MESH_SOCKS")]
pub static SOCKS: SockHash<SockKey> = SockHash::pinned(MAX_PAIRED, 0);

/// Sender → the mesh-node socket its writes go out of, and the bytes sent so. Written by
/// mesh-node when it pairs a connection (a server's entry before it connects, so the server's
/// socket joins already paired), removed when the connection ends.
#[map(name = "MESH_PAIR")]
pub static PAIR: HashMap<SockKey, SockPair> = HashMap::pinned(MAX_PAIRED, 0);

/// A joined client's bytes sent the ordinary way (the hand-over's count). Created when it
/// joins, removed when it closes; LRU, so entries of sockets whose close was missed cannot
/// fill it.
#[map(name = "MESH_PASSED")]
pub static PASSED: LruHashMap<SockKey, u64> = LruHashMap::pinned(MAX_PAIRED, 0);

/// How many of a paired client's [`PASSED`] bytes mesh-node has written on. mesh-node's.
#[map(name = "MESH_RELAYED")]
pub static RELAYED: HashMap<SockKey, u64> = HashMap::pinned(MAX_PAIRED, 0);

/// Every redirect decision for an enrolled pod, for `mesh-node bpf trace`. Written whether or
/// not anyone reads: when the buffer is full new events are dropped (counted), which costs one
/// failed reservation; the reader skips events older than its start.
#[map(name = "MESH_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

/// Per-CPU counters indexed by [`Counter`].
#[map(name = "MESH_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, so no other CPU writes it; programs are not preempted mid-run.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
pub fn fail_closed() -> bool {
    CONFIG
        .get(0)
        .is_some_and(|config| config.fail_mode == mesh_common::FailMode::Closed as u32)
}

/// Writes a trace event, stamping its time. A full buffer drops it.
#[inline(always)]
pub fn trace(mut event: TraceEvent) {
    // SAFETY: helper without arguments.
    event.time_ns = unsafe { bpf_ktime_get_ns() };
    if EVENTS.output::<TraceEvent>(&event, 0).is_err() {
        count(Counter::TraceDropped);
    }
}
