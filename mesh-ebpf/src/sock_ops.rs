//! `sockops`: when a captured socket sends its SYN its source port is known, so re-key its
//! original destination by (netns cookie, source port) — what mesh-node sees when it accepts.
//!
//! Minimum kernel: 4.13 (sock_ops), 5.0 for `bpf_get_socket_cookie` here.
use aya_ebpf::{
    EbpfContext, bindings::BPF_SOCK_OPS_TCP_CONNECT_CB, helpers::bpf_get_socket_cookie,
    macros::sock_ops, programs::SockOpsContext,
};
use mesh_common::ConnKey;

use crate::maps::{CONN_ORIG, SOCK_ORIG};

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: helper call with the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(orig) = SOCK_ORIG.get_ptr(&cookie) {
            // SAFETY: the pointer came from a successful lookup and is read once, immediately.
            let orig = unsafe { *orig };
            // `local_port` is in host byte order in sock_ops.
            let key = ConnKey::new(orig.netns_cookie, ctx.local_port() as u16);
            // A full LRU map evicts the oldest entry; a failure here leaves mesh-node unable to
            // recover this connection's destination, and it closes that connection.
            let _ = CONN_ORIG.insert(&key, &orig, 0);
        }
    }
    // Anything but 1 makes the kernel report an error for the socket operation.
    1
}
