//! The pods file parser: any text is a list of pods or one clear error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = mesh_node::enroll::static_file::parse(std::path::Path::new("fuzz.yaml"), text);
});
