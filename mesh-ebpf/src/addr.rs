//! Address helpers over the kernel's network-byte-order words.

/// 127.0.0.1 as the kernel stores it in `user_ip4`.
pub const LOOPBACK4: u32 = u32::from_be(0x7f00_0001);
/// `::1` as four network-order words.
pub const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_be(1)];
/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
pub const V4_MAPPED_PREFIX: u32 = u32::from_be(0x0000_ffff);

/// Is this IPv4 address (network order) in 127.0.0.0/8?
#[inline(always)]
pub fn is_loopback4(ip: u32) -> bool {
    // The first octet is the lowest-addressed byte whatever the host's endianness.
    ip.to_ne_bytes()[0] == 127
}

#[inline(always)]
pub fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX
}

#[inline(always)]
pub fn is_loopback6(ip: &[u32; 4]) -> bool {
    *ip == LOOPBACK6 || (is_v4_mapped(ip) && is_loopback4(ip[3]))
}

/// A port in the low 16 bits of a `u32` context field, network byte order, to host order.
#[inline(always)]
pub fn port_from_ctx(raw: u32) -> u16 {
    u16::from_be(raw as u16)
}

/// A host-order port to the form a context field's `user_port` takes.
#[inline(always)]
pub fn port_to_ctx(port: u16) -> u32 {
    u32::from(port.to_be())
}

/// Reads `user_ip6` one 32-bit word at a time: the verifier only allows word-sized context
/// accesses, and a plain array copy may be compiled into a byte-wise memcpy.
#[inline(always)]
pub fn read_user_ip6(sa: &aya_ebpf::bindings::bpf_sock_addr) -> [u32; 4] {
    read_words(&sa.user_ip6)
}

/// Writes `user_ip6` one 32-bit word at a time (see [`read_user_ip6`]).
#[inline(always)]
pub fn write_user_ip6(sa: &mut aya_ebpf::bindings::bpf_sock_addr, ip: [u32; 4]) {
    let base = sa.user_ip6.as_mut_ptr();
    // SAFETY: four in-bounds, aligned word writes of the context field.
    unsafe {
        core::ptr::write_volatile(base, ip[0]);
        core::ptr::write_volatile(base.add(1), ip[1]);
        core::ptr::write_volatile(base.add(2), ip[2]);
        core::ptr::write_volatile(base.add(3), ip[3]);
    }
}

/// Four context words read one at a time (see [`read_user_ip6`]).
#[inline(always)]
pub fn read_words(words: &[u32; 4]) -> [u32; 4] {
    let base = words.as_ptr();
    // SAFETY: four in-bounds, aligned word reads of a context field.
    unsafe {
        [
            core::ptr::read_volatile(base),
            core::ptr::read_volatile(base.add(1)),
            core::ptr::read_volatile(base.add(2)),
            core::ptr::read_volatile(base.add(3)),
        ]
    }
}

/// A socket's address as [`mesh_common::SockKey`] stores it: 16 network-order bytes, IPv4
/// mapped. `ip4` is used for `AF_INET` sockets, `ip6` otherwise.
#[inline(always)]
pub fn key_addr(family: u32, ip4: u32, ip6: [u32; 4]) -> [u8; 16] {
    let words = if family == u32::from(mesh_common::FAMILY_INET) {
        [0, 0, V4_MAPPED_PREFIX, ip4]
    } else {
        ip6
    };
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let bytes = words[i].to_ne_bytes();
        out[i * 4] = bytes[0];
        out[i * 4 + 1] = bytes[1];
        out[i * 4 + 2] = bytes[2];
        out[i * 4 + 3] = bytes[3];
        i += 1;
    }
    out
}

/// The [`mesh_common::SockKey`] of a socket from its context's fields (`sock_ops` and
/// `sk_msg` name them alike): addresses in network order, `local_port` in host order,
/// `remote_port` as [`remote_port_from_ctx`] takes it.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "the context's fields, one each")]
pub fn sock_key(
    netns_cookie: u64,
    family: u32,
    local_ip4: u32,
    local_ip6: &[u32; 4],
    remote_ip4: u32,
    remote_ip6: &[u32; 4],
    local_port: u32,
    remote_port: u32,
) -> mesh_common::SockKey {
    mesh_common::SockKey {
        netns_cookie,
        local: key_addr(family, local_ip4, read_words(local_ip6)),
        remote: key_addr(family, remote_ip4, read_words(remote_ip6)),
        local_port: local_port as u16,
        remote_port: remote_port_from_ctx(remote_port),
        _pad: 0,
    }
}

/// A `remote_port` context field of `sock_ops` or `sk_msg` to host order: network order,
/// which some kernels hand over shifted into the upper half of the word.
#[inline(always)]
pub fn remote_port_from_ctx(raw: u32) -> u16 {
    let port = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(port as u16)
}
