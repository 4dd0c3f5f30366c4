//! The local resource file (workloads, services, policies): parsed, converted and applied.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(local) =
        mesh_node::xds::local_file::parse(std::path::Path::new("fuzz.yaml"), text, "cluster.local")
    {
        let mut state = mesh_node::state::State::new();
        local.apply(&mut state);
    }
});
