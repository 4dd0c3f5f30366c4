//! `cgroup/connect4` and `cgroup/connect6`: send enrolled pods' outbound TCP connections to
//! mesh-node's loopback listener in the same network namespace.
//!
//! Minimum kernel: 5.7 (`bpf_get_netns_cookie` in sock_addr programs); connect hooks since 4.17.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_addr, bpf_sock_tuple},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{
    Counter, DNS_PORT, DNS_PROXY_PORT, EnrolledPod, FAMILY_INET, FAMILY_INET6, OUTBOUND_PORT,
    OrigDst, TraceAction, TraceEvent, TraceHook, TraceReason,
};

use crate::{
    addr::{LOOPBACK4, LOOPBACK6, V4_MAPPED_PREFIX, is_loopback4, is_loopback6, is_v4_mapped},
    addr::{port_from_ctx, port_to_ctx, read_user_ip6, write_user_ip6},
    dns,
    maps::{ENROLLED, SOCK_ORIG, count, fail_closed, trace},
};

/// Return values of sock_addr programs.
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol == dns::IPPROTO_UDP {
        dns::capture_udp4(&ctx, sa);
        return PROCEED;
    }
    let Some((netns_cookie, pod_id, flags)) = capturable_netns(&ctx, sa) else {
        return PROCEED;
    };
    let dst = sa.user_ip4;
    if is_loopback4(dst) {
        return PROCEED;
    }
    let orig = OrigDst {
        netns_cookie,
        ip: [dst, 0, 0, 0],
        port: port_from_ctx(sa.user_port),
        family: FAMILY_INET,
        src_port: 0,
        _pad: 0,
    };
    // DNS over TCP goes to the pod's DNS proxy while it listens, like any other connection
    // otherwise.
    let dns = orig.port == DNS_PORT
        && flags & EnrolledPod::LISTENER_DNS4 != 0
        && listener_alive(&ctx, None, DNS_PROXY_PORT);
    if !dns && !listener_alive(&ctx, None, OUTBOUND_PORT) {
        return not_serving(&orig, pod_id);
    }
    if !remember(&ctx, &orig, pod_id) {
        return PROCEED;
    }
    sa.user_ip4 = LOOPBACK4;
    sa.user_port = port_to_ctx(if dns {
        dns::remember_upstream(&orig);
        DNS_PROXY_PORT
    } else {
        OUTBOUND_PORT
    });
    captured(&orig, pod_id);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol == dns::IPPROTO_UDP {
        dns::capture_udp6(&ctx, sa);
        return PROCEED;
    }
    let Some((netns_cookie, pod_id, flags)) = capturable_netns(&ctx, sa) else {
        return PROCEED;
    };
    let dst = read_user_ip6(sa);
    if is_loopback6(&dst) {
        return PROCEED;
    }
    // An IPv4-mapped destination on a dual-stack socket goes to the IPv4 listener.
    let mapped = is_v4_mapped(&dst);
    let orig = OrigDst {
        netns_cookie,
        ip: dst,
        port: port_from_ctx(sa.user_port),
        family: FAMILY_INET6,
        src_port: 0,
        _pad: 0,
    };
    let dns = orig.port == DNS_PORT
        && flags & dns::dns_flag(mapped) != 0
        && listener_alive(&ctx, Some(mapped), DNS_PROXY_PORT);
    if !dns && !listener_alive(&ctx, Some(mapped), OUTBOUND_PORT) {
        return not_serving(&orig, pod_id);
    }
    if !remember(&ctx, &orig, pod_id) {
        return PROCEED;
    }
    write_user_ip6(
        sa,
        if mapped {
            [0, 0, V4_MAPPED_PREFIX, LOOPBACK4]
        } else {
            LOOPBACK6
        },
    );
    sa.user_port = port_to_ctx(if dns {
        dns::remember_upstream(&orig);
        DNS_PROXY_PORT
    } else {
        OUTBOUND_PORT
    });
    captured(&orig, pod_id);
    PROCEED
}

/// The socket's network-namespace cookie, pod id and listener flags if this connect is one to
/// capture: TCP, not opened by mesh-node (marked), from an enrolled namespace.
#[inline(always)]
fn capturable_netns(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> Option<(u64, u32, u32)> {
    if sa.protocol != IPPROTO_TCP {
        return None;
    }
    // SAFETY: `sk` is always set for connect hooks; the verifier types it as a socket pointer.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() || mesh_common::is_own_mark(unsafe { (*sk).mark }) {
        return None;
    }
    // SAFETY: helper call with the program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the pointer came from a successful lookup; two fields are read, immediately.
    ENROLLED
        .get_ptr(&netns_cookie)
        .map(|pod| unsafe { (netns_cookie, (*pod).pod_id, (*pod).flags) })
}

/// Is mesh-node's loopback listener on `port` open in this socket's network namespace? A killed
/// mesh-node's sockets are closed by the kernel, so this is liveness that needs no clean exit.
/// `v6` is `None` for an IPv4 socket, `Some(mapped)` for an IPv6 one.
#[inline(always)]
fn listener_alive(ctx: &SockAddrContext, v6: Option<bool>, port: u16) -> bool {
    // SAFETY: bpf_sock_tuple is plain data; all-zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = match v6 {
        None | Some(true) => {
            // SAFETY: writing the ipv4 variant of a zeroed union.
            let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
            v4.daddr = LOOPBACK4;
            v4.dport = port.to_be();
            core::mem::size_of_val(v4)
        }
        Some(false) => {
            // SAFETY: writing the ipv6 variant of a zeroed union.
            let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
            v6.daddr = LOOPBACK6;
            v6.dport = port.to_be();
            core::mem::size_of_val(v6)
        }
    };
    // SAFETY: the tuple lives on this program's stack and `size` matches the variant written.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size as u32,
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

#[inline(always)]
fn not_serving(orig: &OrigDst, pod_id: u32) -> i32 {
    if fail_closed() {
        count(Counter::RefusedNotServing);
        decision(orig, pod_id, TraceAction::Refused, TraceReason::NotServing);
        REFUSE
    } else {
        count(Counter::PassedNotServing);
        decision(orig, pod_id, TraceAction::Passed, TraceReason::NotServing);
        PROCEED
    }
}

#[inline(always)]
fn captured(orig: &OrigDst, pod_id: u32) {
    count(Counter::Captured);
    decision(orig, pod_id, TraceAction::Captured, TraceReason::None);
}

/// Records the original destination under the socket's cookie; false when the map refused it,
/// in which case the connection is not captured (mesh-node could not tell where it was going).
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &OrigDst, pod_id: u32) -> bool {
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SOCK_ORIG.insert(&cookie, orig, 0).is_err() {
        count(Counter::PassedMapFull);
        decision(orig, pod_id, TraceAction::Passed, TraceReason::MapFull);
        return false;
    }
    true
}

#[inline(always)]
pub fn decision(orig: &OrigDst, pod_id: u32, action: TraceAction, reason: TraceReason) {
    trace(TraceEvent {
        netns_cookie: orig.netns_cookie,
        dst_ip: orig.ip,
        pod_id,
        dst_port: orig.port,
        family: orig.family,
        hook: TraceHook::Connect as u8,
        action: action as u8,
        reason: reason as u8,
        ..TraceEvent::default()
    });
}
