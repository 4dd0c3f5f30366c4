//! `sockops`, for captured sockets only (those with an original destination recorded):
//! - when the SYN goes out the source port is known: record it, and re-key the original
//!   destination by (netns cookie, source port) — what mesh-node sees when it accepts;
//! - ask for state callbacks, and forget the original destination when the socket closes, so
//!   that [`SOCK_ORIG`] holds exactly the live captured connections (`mesh-node bpf conns`).
//!
//! Minimum kernel: 4.13 (sock_ops), 5.0 for `bpf_get_socket_cookie` here, 4.16 for state
//! callbacks.
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::ConnKey;

use crate::maps::{CONN_ORIG, SOCK_ORIG};

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        // arg 0 is the old state, arg 1 the new one.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: helper call with the program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = SOCK_ORIG.remove(&cookie);
        }
        _ => {}
    }
    // Anything but 1 makes the kernel report an error for the socket operation.
    1
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = SOCK_ORIG.get_ptr_mut(&cookie) else {
        return;
    };
    // `local_port` is in host byte order in sock_ops.
    let src_port = ctx.local_port() as u16;
    // SAFETY: the pointer came from a successful lookup; the entry is this socket's own, and
    // only this socket's hooks write it.
    let orig = unsafe {
        (*orig).src_port = src_port;
        *orig
    };
    let key = ConnKey::new(orig.netns_cookie, src_port);
    // A full LRU map evicts the oldest entry; a failure here leaves mesh-node unable to recover
    // this connection's destination, and it closes that connection.
    let _ = CONN_ORIG.insert(&key, &orig, 0);
    // Without the callback the entry would linger until the LRU map evicted it.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}
