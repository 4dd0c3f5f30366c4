//! The sockmap experiment's programs (see `bench` for what they are measured for): two that
//! redirect, one that adds sockets to a map.
//!
//! - `skb_redirect` (`sk_skb` stream verdict): on the proxy's own two sockets; what one receives
//!   is queued to the other's send side. The applications' sockets are not touched.
//! - `msg_redirect` (`sk_msg`): on the applications' sockets; what one sends goes either into the
//!   proxy's opposite socket's send side, or straight into the other application's receive
//!   queue (the target's key has `INGRESS` set), never through the first TCP connection. A
//!   sender that joined before its pairing existed switches over only once the proxy has
//!   relayed all it sent until then (`MSG_PASSED` / `MSG_RELAYED`).
//! - `join` (`sock_ops`): adds the sockets of chosen namespaces to the `sk_msg` map as their
//!   connections are established, as mesh-node would.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        EbpfContext,
        bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB},
        helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
        macros::{map, sk_msg, sock_ops, stream_verdict},
        maps::{HashMap, SockHash},
        programs::{SkBuffContext, SkMsgContext, SockOpsContext},
    };

    /// Set in a [`MSG_PEER`] value: deliver into the target's receive queue, not its send side.
    const INGRESS: u64 = 1 << 63;
    /// `BPF_F_INGRESS`.
    const F_INGRESS: u64 = 1;
    const SK_PASS: u32 = 1;

    /// The proxy's sockets, by socket cookie.
    #[map(name = "SKB_SOCKS")]
    static SKB_SOCKS: SockHash<u64> = SockHash::with_max_entries(64, 0);
    /// Socket cookie → the cookie of the socket its received bytes go out of.
    #[map(name = "SKB_PEER")]
    static SKB_PEER: HashMap<u64, u64> = HashMap::with_max_entries(64, 0);
    /// Socket cookie → bytes redirected away from it (what the proxy waits for before it
    /// passes an EOF on).
    #[map(name = "SKB_BYTES")]
    static SKB_BYTES: HashMap<u64, u64> = HashMap::with_max_entries(64, 0);

    /// Sockets by (netns cookie << 16 | local port): the applications' and the proxy's.
    #[map(name = "MSG_SOCKS")]
    static MSG_SOCKS: SockHash<u64> = SockHash::with_max_entries(64, 0);
    /// Sender's key → target's key (with [`INGRESS`] for its receive queue).
    #[map(name = "MSG_PEER")]
    static MSG_PEER: HashMap<u64, u64> = HashMap::with_max_entries(64, 0);
    /// For a sender that joins before its pairing exists (the hand-over): bytes it sent the
    /// ordinary way, through its own TCP connection to the proxy. Counted only by this
    /// program, which runs under the sender's socket lock.
    #[map(name = "MSG_PASSED")]
    static MSG_PASSED: HashMap<u64, u64> = HashMap::with_max_entries(64, 0);
    /// … and how many of those the proxy has written on to the target (the proxy's count).
    #[map(name = "MSG_RELAYED")]
    static MSG_RELAYED: HashMap<u64, u64> = HashMap::with_max_entries(64, 0);

    /// Network namespaces (by cookie) whose sockets `join` adds to [`MSG_SOCKS`] as their
    /// connections are established.
    #[map(name = "JOIN_NETNS")]
    static JOIN_NETNS: HashMap<u64, u8> = HashMap::with_max_entries(8, 0);

    /// Adds a socket of a [`JOIN_NETNS`] namespace to [`MSG_SOCKS`] when its connection is
    /// established: before `connect()` returns to a client, before `accept()` returns a
    /// server's socket, so before either can send or read. A connecting socket starts a
    /// hand-over count (`MSG_PASSED`), which matters only once it is paired.
    #[sock_ops]
    pub fn join(ctx: SockOpsContext) -> u32 {
        let op = ctx.op();
        if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
            // SAFETY: helper call with the program's own context.
            let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            // SAFETY: plain value read from the map.
            if unsafe { JOIN_NETNS.get(&netns) }.is_some() {
                let key = netns << 16 | u64::from(ctx.local_port() & 0xffff);
                if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
                    let _ = MSG_PASSED.insert(&key, &0, 0);
                }
                // SAFETY: the context's own socket-ops pointer.
                let _ = MSG_SOCKS.update(key, unsafe { &mut *ctx.ops }, 0);
            }
        }
        1
    }

    #[stream_verdict]
    pub fn skb_redirect(ctx: SkBuffContext) -> u32 {
        // SAFETY: helper call with the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: plain value read from the map.
        let Some(&peer) = (unsafe { SKB_PEER.get(&cookie) }) else {
            return SK_PASS;
        };
        let verdict = SKB_SOCKS.redirect_skb(&ctx, peer, 0) as u32;
        if verdict == SK_PASS
            && let Some(bytes) = SKB_BYTES.get_ptr_mut(&cookie)
        {
            // SAFETY: the entry is this socket's; its verdicts run one at a time.
            unsafe { *bytes += u64::from(ctx.len()) };
        }
        verdict
    }

    #[sk_msg]
    pub fn msg_redirect(ctx: SkMsgContext) -> u32 {
        // SAFETY: helper call with the program's own context; `local_port` is in host order.
        let key = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } << 16
            | u64::from(unsafe { (*ctx.msg).local_port } & 0xffff);
        // SAFETY: plain value read from the map.
        let peer = unsafe { MSG_PEER.get(&key) }.copied();
        // A sender with a hand-over is redirected only once the proxy has written on every
        // byte it passed the ordinary way: then nothing of it is in flight, and what goes
        // straight into the target now comes after all of it.
        if let Some(passed) = MSG_PASSED.get_ptr_mut(&key) {
            // SAFETY: plain value read from the map; `passed` is this sender's own entry.
            let relayed = unsafe { MSG_RELAYED.get(&key) }.copied().unwrap_or(0);
            if peer.is_none() || unsafe { *passed } != relayed {
                // SAFETY: as above; one sendmsg of this socket at a time.
                unsafe { *passed += u64::from(ctx.size()) };
                return SK_PASS;
            }
        }
        let Some(peer) = peer else {
            return SK_PASS;
        };
        let flags = if peer & INGRESS != 0 { F_INGRESS } else { 0 };
        MSG_SOCKS.redirect_msg(&ctx, peer & !INGRESS, flags) as u32
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // SAFETY: the verifier rejects any program with a reachable panic path.
        unsafe { core::hint::unreachable_unchecked() }
    }
}

/// The host build does nothing; it exists so the workspace checks.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
