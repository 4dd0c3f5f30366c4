//! The delta-ADS session fed an arbitrary sequence of responses (length-prefixed chunks):
//! each is answered (ACK/NACK) and its update applied to a state, as the client does.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_node::{
    state::State,
    xds::{
        proto::discovery::{DeltaDiscoveryResponse, Node},
        session::Session,
    },
};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let mut session = Session::new(Node::default(), "cluster.local");
    let _ = session.initial_requests();
    let mut state = State::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (chunk, tail) = rest[2..].split_at(len);
        rest = tail;
        if let Ok(response) = DeltaDiscoveryResponse::decode(chunk) {
            session.handle(response).update.apply(&mut state);
        }
    }
    let _ = session.status();
    let _ = session.initial_requests();
});
