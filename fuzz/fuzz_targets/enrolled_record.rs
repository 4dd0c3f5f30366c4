//! The enrolled-pod record: any 304 bytes (a corrupt or foreign pinned entry, as `mesh-node bpf`
//! may read) decode without a panic; and a record mesh-node writes from any names reads back as
//! written, or as a prefix cut at a character boundary with the truncation flag set.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_common::EnrolledPod;
use mesh_node::dataplane::record::PodRecord;

fuzz_target!(|data: &[u8]| {
    let size = core::mem::size_of::<EnrolledPod>();
    if data.len() >= size {
        // SAFETY: EnrolledPod is plain old data (integers and byte arrays): any bytes are a value.
        let pod: EnrolledPod = unsafe { core::ptr::read_unaligned(data.as_ptr().cast()) };
        let _ = PodRecord::decode(&pod).key();
    }
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\u{0}');
    let written = PodRecord {
        pod_id: 1,
        namespace: fields.next().unwrap_or("").to_owned(),
        name: fields.next().unwrap_or("").to_owned(),
        service_account: fields.next().unwrap_or("").to_owned(),
        ips: vec!["10.0.0.1".parse().unwrap()],
        listeners: EnrolledPod::LISTENER_OUTBOUND4,
        truncated: false,
    };
    let read = PodRecord::decode(&written.encode());
    let mut cut = false;
    for (w, r) in [
        (&written.namespace, &read.namespace),
        (&written.name, &read.name),
        (&written.service_account, &read.service_account),
    ] {
        assert!(w.starts_with(r.as_str()), "{r:?} is not a prefix of {w:?}");
        cut |= w.len() != r.len();
    }
    assert_eq!(read.truncated, cut);
    assert_eq!(read.ips, written.ips);
});
