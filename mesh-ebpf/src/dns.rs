//! DNS capture: an enrolled pod's queries to port 53 go to mesh-node's DNS proxy on
//! 127.0.0.1:15053 in the pod's own namespace, and its answers seem to come from the resolver
//! the application asked.
//!
//! - UDP, connected (glibc, Go): `connect4/6` rewrite the destination; `getpeername4/6` restore it.
//! - UDP, unconnected (musl's `sendto`): `sendmsg4/6` rewrite each datagram's destination.
//! - Both: `recvmsg4/6` rewrite the source of what the proxy sends back to the resolver's.
//! - An IPv4-mapped resolver on a dual-stack socket goes to the IPv4 proxy
//!   (`::ffff:127.0.0.1:15053`); an IPv6 resolver to `[::1]:15053`, open when the pod has IPv6.
//!   The kernel hands a dual-stack socket's unconnected datagram to a mapped address to the
//!   IPv4 path (sendmsg4), so the recvmsg hooks accept a resolver stored in either family.
//! - TCP (large answers): `connect4` sends it to the proxy's TCP listener, as for any captured
//!   connection (the original destination travels by `SOCK_ORIG` → sock_ops → `CONN_ORIG`).
//!
//! Only pods whose record has [`EnrolledPod::LISTENER_DNS4`] (and `LISTENER_DNS6` for IPv6
//! resolvers) are captured, and only while the
//! proxy's socket is open in the namespace: with mesh-node gone, queries reach the resolver
//! (fail-open, whatever the fail mode: a pod that cannot resolve fails in worse ways).
//!
//! Minimum kernel: 4.18 (sendmsg4), 5.2 (recvmsg4).
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_addr, bpf_sock_tuple},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_udp, bpf_sk_release},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{
    DNS_PORT, DNS_PROXY_PORT, EnrolledPod, FAMILY_INET, OrigDst, TraceAction, TraceReason,
};

use crate::{
    addr::{
        LOOPBACK4, LOOPBACK6, V4_MAPPED_PREFIX, is_loopback4, is_loopback6, is_v4_mapped,
        port_from_ctx, port_to_ctx, read_user_ip6, write_user_ip6,
    },
    connect::decision,
    maps::{DNS_SOCK_ORIG, DNS_UPSTREAM, ENROLLED},
};
use mesh_common::FAMILY_INET6;

const PROCEED: i32 = 1;
pub const IPPROTO_UDP: u32 = 17;

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    capture_udp4(&ctx, sa);
    PROCEED
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_ip4 != LOOPBACK4 || port_from_ctx(sa.user_port) != DNS_PROXY_PORT {
        return PROCEED;
    }
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(orig) = DNS_SOCK_ORIG.get_ptr(&cookie) {
        // SAFETY: the pointer came from a successful lookup; copied out at once.
        let orig = unsafe { *orig };
        if orig.family == FAMILY_INET {
            sa.user_ip4 = orig.ip[0];
            sa.user_port = port_to_ctx(orig.port);
        } else if is_v4_mapped(&orig.ip) {
            sa.user_ip4 = orig.ip[3];
            sa.user_port = port_to_ctx(orig.port);
        }
    }
    PROCEED
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    capture_udp6(&ctx, sa);
    PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let src = read_user_ip6(sa);
    let from_proxy = src == LOOPBACK6 || src == [0, 0, V4_MAPPED_PREFIX, LOOPBACK4];
    if !from_proxy || port_from_ctx(sa.user_port) != DNS_PROXY_PORT {
        return PROCEED;
    }
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(orig) = DNS_SOCK_ORIG.get_ptr(&cookie) {
        // SAFETY: the pointer came from a successful lookup; copied out at once.
        let orig = unsafe { *orig };
        // A dual-stack socket's datagram to a mapped resolver went through sendmsg4 (the
        // kernel hands it to the IPv4 path), so its resolver may be stored as IPv4.
        write_user_ip6(
            sa,
            if orig.family == FAMILY_INET6 {
                orig.ip
            } else {
                [0, 0, V4_MAPPED_PREFIX, orig.ip[0]]
            },
        );
        sa.user_port = port_to_ctx(orig.port);
    }
    PROCEED
}

/// The record bit that says the proxy serving a resolver of this kind is open.
#[inline(always)]
pub fn dns_flag(mapped: bool) -> u32 {
    if mapped {
        EnrolledPod::LISTENER_DNS4
    } else {
        EnrolledPod::LISTENER_DNS6
    }
}

/// A UDP datagram or connect to `[resolver]:53` from a dual-stack or IPv6 socket: as
/// [`capture_udp4`], an IPv4-mapped resolver to the IPv4 proxy.
#[inline(always)]
pub fn capture_udp6(ctx: &SockAddrContext, sa: &mut bpf_sock_addr) {
    if sa.protocol != IPPROTO_UDP || port_from_ctx(sa.user_port) != DNS_PORT {
        return;
    }
    let dst = read_user_ip6(sa);
    if is_loopback6(&dst) {
        return;
    }
    let mapped = is_v4_mapped(&dst);
    let Some((netns_cookie, pod_id)) = dns_pod(ctx, sa, dns_flag(mapped)) else {
        return;
    };
    let orig = OrigDst {
        netns_cookie,
        ip: dst,
        port: DNS_PORT,
        family: FAMILY_INET6,
        src_port: 0,
        _pad: 0,
    };
    if !udp_proxy_alive(ctx, !mapped) {
        decision(&orig, pod_id, TraceAction::Passed, TraceReason::NotServing);
        return;
    }
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if DNS_SOCK_ORIG.insert(&cookie, &orig, 0).is_err() {
        decision(&orig, pod_id, TraceAction::Passed, TraceReason::MapFull);
        return;
    }
    let _ = DNS_UPSTREAM.insert(&netns_cookie, &orig, 0);
    write_user_ip6(
        sa,
        if mapped {
            [0, 0, V4_MAPPED_PREFIX, LOOPBACK4]
        } else {
            LOOPBACK6
        },
    );
    sa.user_port = port_to_ctx(DNS_PROXY_PORT);
    decision(&orig, pod_id, TraceAction::Captured, TraceReason::None);
}

/// The pod's network-namespace cookie and id, when this socket is one of its own (not
/// mesh-node's) and the pod has the DNS proxy `flag` says.
#[inline(always)]
pub fn dns_pod(ctx: &SockAddrContext, sa: &bpf_sock_addr, flag: u32) -> Option<(u64, u32)> {
    // SAFETY: `sk` is always set for these hooks; the verifier types it as a socket pointer.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() || mesh_common::is_own_mark(unsafe { (*sk).mark }) {
        return None;
    }
    // SAFETY: helper call with the program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let pod = ENROLLED.get_ptr(&netns_cookie)?;
    // SAFETY: the pointer came from a successful lookup; two fields are read at once.
    let (pod_id, flags) = unsafe { ((*pod).pod_id, (*pod).flags) };
    (flags & flag != 0).then_some((netns_cookie, pod_id))
}

/// A UDP datagram or connect to `<resolver>:53` from a pod with DNS capture: remembered, and
/// sent to the proxy instead.
#[inline(always)]
pub fn capture_udp4(ctx: &SockAddrContext, sa: &mut bpf_sock_addr) {
    if sa.protocol != IPPROTO_UDP || port_from_ctx(sa.user_port) != DNS_PORT {
        return;
    }
    let dst = sa.user_ip4;
    if is_loopback4(dst) {
        return;
    }
    let Some((netns_cookie, pod_id)) = dns_pod(ctx, sa, EnrolledPod::LISTENER_DNS4) else {
        return;
    };
    let orig = OrigDst {
        netns_cookie,
        ip: [dst, 0, 0, 0],
        port: DNS_PORT,
        family: FAMILY_INET,
        src_port: 0,
        _pad: 0,
    };
    if !udp_proxy_alive(ctx, false) {
        decision(&orig, pod_id, TraceAction::Passed, TraceReason::NotServing);
        return;
    }
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if DNS_SOCK_ORIG.insert(&cookie, &orig, 0).is_err() {
        decision(&orig, pod_id, TraceAction::Passed, TraceReason::MapFull);
        return;
    }
    let _ = DNS_UPSTREAM.insert(&netns_cookie, &orig, 0);
    sa.user_ip4 = LOOPBACK4;
    sa.user_port = port_to_ctx(DNS_PROXY_PORT);
    decision(&orig, pod_id, TraceAction::Captured, TraceReason::None);
}

/// Records the resolver of a captured DNS-over-TCP connection as the pod's upstream.
#[inline(always)]
pub fn remember_upstream(orig: &OrigDst) {
    let _ = DNS_UPSTREAM.insert(&orig.netns_cookie, orig, 0);
}

/// Is the proxy's UDP socket (the IPv6 one when `v6`) open in this namespace?
#[inline(always)]
fn udp_proxy_alive(ctx: &SockAddrContext, v6: bool) -> bool {
    // SAFETY: bpf_sock_tuple is plain data; all-zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if v6 {
        // SAFETY: writing the ipv6 variant of a zeroed union.
        let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        v6.daddr = LOOPBACK6;
        v6.dport = DNS_PROXY_PORT.to_be();
        core::mem::size_of_val(v6) as u32
    } else {
        // SAFETY: writing the ipv4 variant of a zeroed union.
        let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        v4.daddr = LOOPBACK4;
        v4.dport = DNS_PROXY_PORT.to_be();
        core::mem::size_of_val(v4) as u32
    };
    // SAFETY: the tuple lives on this program's stack and `size` matches the variant written.
    let sk = unsafe {
        bpf_sk_lookup_udp(
            ctx.as_ptr(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the non-null reference the lookup returned; it must be released once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}
