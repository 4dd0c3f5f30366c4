//! `sk_msg`, on the sockets in [`SOCKS`] (`--kernel-same-node`): what a paired application
//! writes goes straight out of mesh-node's socket towards the other application
//! (`bpf_msg_redirect_hash` without `BPF_F_INGRESS`), in the writer's own `sendmsg`, so the
//! target's send buffer bounds it as TCP would. See ARCHITECTURE.md "Same-node bytes in the
//! kernel".
//!
//! A client joins before its pairing exists (mesh-node has yet to decide and connect), so it
//! may already have written through its own connection to mesh-node. Its writes are counted
//! ([`PASSED`]) and redirected only once mesh-node has written on exactly that many
//! ([`RELAYED`]): then none of them is in flight, and redirected bytes queue after all of them.
//!
//! Minimum kernel: 4.17 (sk_msg on a SOCKHASH); `bpf_get_netns_cookie` here is newer.
use aya_ebpf::{
    EbpfContext, helpers::bpf_get_netns_cookie, macros::sk_msg, programs::SkMsgContext,
};
use mesh_common::{Counter, SockKey, SockPair};

use crate::{
    addr::sock_key,
    maps::{PAIR, PASSED, RELAYED, SOCKS, count},
};

const SK_PASS: u32 = 1;

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    let key = msg_key(&ctx);
    let Some(pair) = PAIR.get_ptr_mut(&key) else {
        // Joined but not paired (yet, or a connection that is not same-node): count it for
        // a later hand-over.
        if let Some(passed) = PASSED.get_ptr_mut(&key) {
            // SAFETY: this sender's own entry; its sendmsg calls run one at a time, under
            // its socket lock.
            unsafe { *passed += u64::from(ctx.size()) };
        }
        return SK_PASS;
    };
    // SAFETY: the pointer came from a successful lookup of this sender's entry.
    if unsafe { (*pair).flags } & SockPair::HANDOVER != 0 {
        // Without its count (evicted), a client can never be known to be caught up.
        let Some(passed) = PASSED.get_ptr_mut(&key) else {
            return SK_PASS;
        };
        // SAFETY: plain value read; mesh-node only ever raises its count.
        let relayed = unsafe { RELAYED.get(&key) }.copied().unwrap_or(0);
        // SAFETY: this sender's own entry, as above.
        if unsafe { *passed } != relayed {
            // Some of what went the ordinary way is not written on yet: this write follows
            // it the same way.
            unsafe { *passed += u64::from(ctx.size()) };
            return SK_PASS;
        }
    }
    // SAFETY: the pointer came from a successful lookup of this sender's entry.
    let target = unsafe { (*pair).target };
    let size = ctx.size();
    let verdict = SOCKS.redirect_msg(&ctx, target, 0) as u32;
    if verdict == SK_PASS {
        count(Counter::MsgRedirected);
        // SAFETY: as above; one sendmsg of this socket at a time.
        unsafe { (*pair).redirected += u64::from(size) };
        SK_PASS
    } else {
        // mesh-node's socket is gone (the connection is ending): the ordinary way, where the
        // end reaches the application as it would without the kernel path.
        count(Counter::MsgRedirectFailed);
        if let Some(passed) = PASSED.get_ptr_mut(&key) {
            // SAFETY: as above. Never matched again: the connection stays ordinary.
            unsafe { *passed = u64::MAX };
        }
        SK_PASS
    }
}

#[inline(always)]
fn msg_key(ctx: &SkMsgContext) -> SockKey {
    // SAFETY: the program's own context; each field is read once, word-sized.
    let msg = unsafe { &*ctx.msg };
    sock_key(
        // SAFETY: helper call with the program's own context.
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        msg.family,
        msg.local_ip4,
        &msg.local_ip6,
        msg.remote_ip4,
        &msg.remote_ip6,
        msg.local_port,
        msg.remote_port,
    )
}
