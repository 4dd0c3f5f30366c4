//! `sockops` beside [`crate::sock_ops`], attached only with `--kernel-same-node`: sockets join
//! [`SOCKS`], where `sk_msg` sees their writes.
//! - A captured client joins when its connection is established — before `connect()`
//!   returns, so before it can write — with a hand-over count ([`PASSED`]) at zero.
//! - A server's accepted socket joins (before `accept()` returns it) when mesh-node paired its
//!   4-tuple just before connecting from there, so it is paired before it can write.
//! - A client's count is removed when it closes (captured sockets have state callbacks,
//!   asked for by `sock_ops` at connect).
//!
//! Needs `bpf_get_netns_cookie` in sock_ops (tested on Linux 6.18).
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{Counter, SockKey};

use crate::{
    addr::sock_key,
    maps::{PAIR, PASSED, SOCK_ORIG, SOCKS, count},
};

#[sock_ops]
pub fn mesh_sock_join(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_client_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_server_established(&ctx),
        // arg 1 is the new state.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _ = PASSED.remove(&ops_key(&ctx));
        }
        _ => {}
    }
    // Anything but 1 makes the kernel report an error for the socket operation.
    1
}

/// A captured client joins, its count at zero — unless bytes left before it could be counted
/// (data in the SYN, TCP Fast Open): counting from zero would let the hand-over switch while
/// those are in flight, so such a connection stays on mesh-node's relay.
#[inline(always)]
fn on_client_established(ctx: &SockOpsContext) {
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain value read from the map.
    if unsafe { SOCK_ORIG.get(&cookie) }.is_none() {
        return;
    }
    // SAFETY: the program's own context.
    let ops = unsafe { &*ctx.ops };
    if ops.data_segs_out != 0 || ops.packets_out != 0 {
        return;
    }
    let key = ops_key(ctx);
    if PASSED.insert(&key, &0, 0).is_err() {
        return;
    }
    // SAFETY: the context's own socket-ops pointer, as the helper wants it.
    if SOCKS.update(key, unsafe { &mut *ctx.ops }, 0).is_ok() {
        count(Counter::SockJoined);
    }
}

#[inline(always)]
fn on_server_established(ctx: &SockOpsContext) {
    let key = ops_key(ctx);
    // SAFETY: plain value read from the map.
    if unsafe { PAIR.get(&key) }.is_none() {
        return;
    }
    // SAFETY: as in `on_client_established`.
    if SOCKS.update(key, unsafe { &mut *ctx.ops }, 0).is_ok() {
        count(Counter::SockJoined);
    }
}

#[inline(always)]
fn ops_key(ctx: &SockOpsContext) -> SockKey {
    // SAFETY: the program's own context; each field is read once, word-sized.
    let ops = unsafe { &*ctx.ops };
    sock_key(
        // SAFETY: helper call with the program's own context.
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        ops.family,
        ops.local_ip4,
        &ops.local_ip6,
        ops.remote_ip4,
        &ops.remote_ip6,
        ops.local_port,
        ops.remote_port,
    )
}
