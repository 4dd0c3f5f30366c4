//! mesh-node's eBPF programs: capture enrolled pods' outbound and inbound TCP connections, and
//! their DNS queries (UDP and TCP port 53).
//!
//! One object, one file per hook, every map in [`maps`]. See ARCHITECTURE.md "The kernel side".
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod addr;
#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod getpeername;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sk_lookup;
#[cfg(target_arch = "bpf")]
mod sk_msg;
#[cfg(target_arch = "bpf")]
mod sock_join;
#[cfg(target_arch = "bpf")]
mod sock_ops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path, so this is never
    // reached at run time.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The host build of this binary does nothing; it exists so `cargo check --workspace` works.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
