//! An xDS `istio.workload.Address` from the wire: decoded, checked, indexed, removed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_node::{
    state::{State, convert},
    xds::proto::workload::Address,
};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(address) = Address::decode(data) else {
        return;
    };
    if let Ok(converted) = convert::address(address, "cluster.local") {
        let mut state = State::new();
        match converted {
            convert::Address::Workload(w) => {
                let uid = w.uid.clone();
                state.upsert_workload(w);
                state.remove_address(&uid);
            }
            convert::Address::Service(s) => {
                let key = s.key().to_owned();
                state.upsert_service(s);
                state.remove_address(&key);
            }
        }
    }
});
