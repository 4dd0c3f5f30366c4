//! What `mesh-node bpf` shows for the bytes of one map value or ring-buffer record, whatever
//! they hold: a pinned map another build left, or a corrupt entry, is shown, never a panic.
//! The decoders are the ones `dump`, `conns` and `trace` use; this is their entry for the
//! `bpf_values` fuzz target.
use std::collections::BTreeMap;

use mesh_common::{DataplaneConfig, DeliveryKey, EnrolledPod, OrigDst, TraceEvent};

use super::{maps, status, trace};
use crate::dataplane::record::PodRecord;

/// Reads a `T` from the start of `bytes`, if they are long enough: the one reader of map values
/// and ring-buffer records `mesh-node bpf` decodes.
pub(super) fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>())
        // SAFETY: the slice holds at least one T; `aya::Pod` promises every bit pattern is a
        // value of T; the read is unaligned-safe.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// `bytes` read as each kind of value, as tables and as JSON.
pub fn render(bytes: &[u8]) -> String {
    let mut shown = String::new();
    let mut pods = BTreeMap::new();
    if let Some(pod) = read::<EnrolledPod>(bytes) {
        let record = PodRecord::decode(&pod);
        shown += &record.key();
        shown += &serde_json::to_string(&record).unwrap_or_default();
        // The map's key is the netns cookie; read the same bytes as one so `orig_view` can
        // find the pod.
        pods.insert(read::<u64>(bytes).unwrap_or_default(), record);
    }
    if let Some(orig) = read::<OrigDst>(bytes) {
        let view = maps::orig_view(&orig, &pods);
        shown += &serde_json::to_string(&view).unwrap_or_default();
        shown += &maps::orig_table(&[view]);
    }
    if let Some(key) = read::<DeliveryKey>(bytes) {
        let view = maps::delivery_view(&key);
        shown += &serde_json::to_string(&view).unwrap_or_default();
        shown += &maps::delivery_table(&[view]);
    }
    if let Some(config) = read::<DataplaneConfig>(bytes) {
        shown += status::original_source(&config);
    }
    if let Some(event) = read::<TraceEvent>(bytes) {
        let view = trace::view(&event, "ns/pod".to_owned(), 0);
        shown += &serde_json::to_string(&view).unwrap_or_default();
        shown += &trace::line(&view);
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_original_destination_shows_its_address_and_short_input_shows_nothing() {
        let orig = OrigDst {
            netns_cookie: 7,
            ip: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
            port: 8080,
            family: libc::AF_INET as u16,
            src_port: 40_000,
            _pad: 0,
        };
        // SAFETY: OrigDst is plain old data; the view covers exactly its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const orig).cast::<u8>(), size_of::<OrigDst>())
        };
        let shown = render(bytes);
        assert!(shown.contains("10.0.0.1:8080"), "{shown}");
        assert!(shown.contains("\"src_port\":40000"), "{shown}");
        assert_eq!(render(&[1, 2, 3]), "");
    }
}
