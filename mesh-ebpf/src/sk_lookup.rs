//! `sk_lookup`, one link per enrolled pod's network namespace: new inbound TCP connections to the
//! pod go to mesh-node's plaintext listener (15006) instead of the application's.
//!
//! Not steered: HBONE (15008, mesh-node's own listener); lookups made by programs rather than by
//! packets; and connections that start inside the pod itself — loopback, and the pod dialling
//! its own address (for those the kernel reports the veth, not lo, so `remote == local` is what
//! tells them apart); and mesh-node's own connections to the application from the client's
//! address, which it announces in [`DELIVERING`] for the length of their connect. Minimum
//! kernel: 5.9.
use aya_ebpf::{bindings::sk_action, macros::sk_lookup, programs::SkLookupContext};
use mesh_common::{
    Counter, DeliveryKey, FAMILY_INET, FAMILY_INET6, HBONE_PORT, InboundKey, TraceAction,
    TraceEvent, TraceHook, TraceReason,
};

use crate::maps::{DELIVERING, INBOUND, count, trace};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands every sk_lookup program a valid context.
    let lookup = unsafe { &*ctx.lookup };
    // ingress_ifindex 0: no packet behind this lookup — it is a program's bpf_sk_lookup_tcp
    // (our own connect hooks' liveness check runs one per captured connect), not a connection.
    if lookup.protocol != IPPROTO_TCP
        || lookup.local_port == u32::from(HBONE_PORT)
        || lookup.ingress_ifindex == LOOPBACK_IFINDEX
        || lookup.ingress_ifindex == 0
    {
        return sk_action::SK_PASS;
    }
    let mut event = TraceEvent {
        dst_port: lookup.local_port as u16,
        src_port: u16::from_be(lookup.remote_port),
        hook: TraceHook::Inbound as u8,
        ..TraceEvent::default()
    };
    // Written field by field: the key is what `sk_lookup` needs twice (who is being delivered
    // to, and whether mesh-node announced this very connection).
    let mut delivery = DeliveryKey {
        remote_port: event.src_port,
        local_port: event.dst_port,
        ..DeliveryKey::default()
    };
    match lookup.family {
        AF_INET => {
            let remote = lookup.remote_ip4.to_ne_bytes();
            if lookup.remote_ip4 == lookup.local_ip4 || remote[0] == 127 {
                return sk_action::SK_PASS;
            }
            event.family = FAMILY_INET;
            event.dst_ip[0] = lookup.local_ip4;
            event.src_ip[0] = lookup.remote_ip4;
            delivery.local = InboundKey::v4(lookup.local_ip4);
            delivery.remote = InboundKey::v4(lookup.remote_ip4);
        }
        AF_INET6 => {
            let (local, remote) = (lookup.local_ip6, lookup.remote_ip6);
            let loopback = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
            if remote == local || remote == loopback {
                return sk_action::SK_PASS;
            }
            event.family = FAMILY_INET6;
            event.dst_ip = local;
            event.src_ip = remote;
            delivery.local = InboundKey::v6(local);
            delivery.remote = InboundKey::v6(remote);
        }
        _ => return sk_action::SK_PASS,
    }
    // SAFETY: the value is read-only and only its presence matters.
    if unsafe { DELIVERING.get(&delivery) }.is_some() {
        return sk_action::SK_PASS;
    }
    let key = delivery.local;
    match INBOUND.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => {
            count(Counter::InboundCaptured);
            event.action = TraceAction::Captured as u8;
        }
        // No listener registered: mesh-node is not serving this pod; the application answers.
        Err(_) => {
            count(Counter::InboundNotServing);
            event.action = TraceAction::Passed as u8;
            event.reason = TraceReason::NotServing as u8;
        }
    }
    trace(event);
    sk_action::SK_PASS
}
