//! `cgroup/getpeername4` and `cgroup/getpeername6`: a captured socket is connected to mesh-node's
//! loopback listener, but the application must see the peer it asked for.
//!
//! Minimum kernel: 5.8.
use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{Counter, FAMILY_INET, FAMILY_INET6, OrigDst};

use crate::{
    addr::{port_to_ctx, write_user_ip6},
    maps::{DNS_SOCK_ORIG, SOCK_ORIG, count},
};

/// getpeername programs must return 1.
const PROCEED: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original(&ctx)
        && orig.family == FAMILY_INET
    {
        // SAFETY: the kernel hands every sock_addr program a valid context.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.ip[0];
        sa.user_port = port_to_ctx(orig.port);
        count(Counter::PeerRestored);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original(&ctx)
        && orig.family == FAMILY_INET6
    {
        // SAFETY: the kernel hands every sock_addr program a valid context.
        let sa = unsafe { &mut *ctx.sock_addr };
        write_user_ip6(sa, orig.ip);
        sa.user_port = port_to_ctx(orig.port);
        count(Counter::PeerRestored);
    }
    PROCEED
}

#[inline(always)]
fn original(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the pointers came from successful lookups and are copied out immediately. A
    // connected UDP socket captured for DNS is found in the second map.
    SOCK_ORIG
        .get_ptr(&cookie)
        .or_else(|| DNS_SOCK_ORIG.get_ptr(&cookie))
        .map(|orig| unsafe { *orig })
}
