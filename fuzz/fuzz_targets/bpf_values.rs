//! `mesh-node bpf`'s decoders of map values and trace records: any bytes (a pinned map another
//! build left, a corrupt entry, a short read) are shown as every kind of value without a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mesh_node::inspect::render_raw(data);
});
