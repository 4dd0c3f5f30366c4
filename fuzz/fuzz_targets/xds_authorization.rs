//! An xDS `istio.security.Authorization` from the wire: decoded and converted into a policy.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_node::{state::convert, xds::proto::security::Authorization};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(policy) = Authorization::decode(data) {
        let _ = convert::authorization(policy);
    }
});
