//! Layout tests: the eBPF programs and user space read these bytes with no other agreement than
//! the struct definitions, so every offset is pinned here.
extern crate std;

use core::mem::{offset_of, size_of};

use crate::{ConnKey, Counter, DataplaneConfig, EnrolledPod, FailMode, OrigDst, TraceEvent};

#[test]
fn orig_dst_layout_is_stable() {
    assert_eq!(offset_of!(OrigDst, netns_cookie), 0);
    assert_eq!(offset_of!(OrigDst, ip), 8);
    assert_eq!(offset_of!(OrigDst, port), 24);
    assert_eq!(offset_of!(OrigDst, family), 26);
    assert_eq!(offset_of!(OrigDst, src_port), 28);
    assert_eq!(size_of::<OrigDst>(), 32);
}

#[test]
fn conn_key_layout_is_stable_and_padding_is_zeroed() {
    assert_eq!(offset_of!(ConnKey, netns_cookie), 0);
    assert_eq!(offset_of!(ConnKey, src_port), 8);
    assert_eq!(size_of::<ConnKey>(), 16);
    // Hash-map keys are compared byte for byte by the kernel: padding must be deterministic.
    let key = ConnKey::new(7, 40000);
    assert_eq!(key._pad, [0; 6]);
    assert_eq!(key, ConnKey::new(7, 40000));
}

#[test]
fn small_values_layout_is_stable() {
    assert_eq!(size_of::<EnrolledPod>(), 304);
    assert_eq!(offset_of!(EnrolledPod, flags), 4);
    assert_eq!(offset_of!(EnrolledPod, ips), 8);
    assert_eq!(offset_of!(EnrolledPod, ip_count), 40);
    assert_eq!(offset_of!(EnrolledPod, namespace), 48);
    assert_eq!(offset_of!(EnrolledPod, name), 112);
    assert_eq!(offset_of!(EnrolledPod, service_account), 240);
    assert_eq!(size_of::<DataplaneConfig>(), 8);
    assert_eq!(offset_of!(DataplaneConfig, fail_mode), 0);
    assert_eq!(FailMode::Closed as u32, 1);
}

#[test]
fn counters_are_dense_and_named_uniquely() {
    for (index, counter) in Counter::ALL.iter().enumerate() {
        assert_eq!(*counter as u32, index as u32);
    }
    let mut names: std::vec::Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Counter::ALL.len());
}

#[test]
fn inbound_keys_of_ipv4_match_the_mapped_address_bytes() {
    use crate::InboundKey;
    // 198.18.0.10 as the kernel's network-order word, and as ::ffff:198.18.0.10 bytes.
    let word = u32::from_ne_bytes([198, 18, 0, 10]);
    let mut mapped = [0u8; 16];
    mapped[10] = 0xff;
    mapped[11] = 0xff;
    mapped[12..].copy_from_slice(&[198, 18, 0, 10]);
    assert_eq!(InboundKey::v4(word), InboundKey::from_octets(mapped));
    assert_eq!(size_of::<InboundKey>(), 16);
}

#[test]
fn trace_event_layout_is_stable() {
    assert_eq!(offset_of!(TraceEvent, time_ns), 0);
    assert_eq!(offset_of!(TraceEvent, netns_cookie), 8);
    assert_eq!(offset_of!(TraceEvent, dst_ip), 16);
    assert_eq!(offset_of!(TraceEvent, src_ip), 32);
    assert_eq!(offset_of!(TraceEvent, pod_id), 48);
    assert_eq!(offset_of!(TraceEvent, dst_port), 52);
    assert_eq!(offset_of!(TraceEvent, src_port), 54);
    assert_eq!(offset_of!(TraceEvent, family), 56);
    assert_eq!(offset_of!(TraceEvent, hook), 58);
    assert_eq!(offset_of!(TraceEvent, action), 59);
    assert_eq!(offset_of!(TraceEvent, reason), 60);
    assert_eq!(size_of::<TraceEvent>(), 64);
}
