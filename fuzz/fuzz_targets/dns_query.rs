//! The pods' DNS proxy on any datagram: an answer, a FORMERR, a forward or nothing; an answer
//! always parses back and carries the query's id.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_node::{
    dns::{Verdict, answer::Asker, respond},
    state::{State, convert},
    xds::proto::workload as pb,
};

fn state() -> State {
    let mut state = State::new();
    let service = pb::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 10],
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            ..Default::default()
        }],
        ..Default::default()
    };
    if let Ok(service) = convert::service(service) {
        state.upsert_service(service);
    }
    state
}

fuzz_target!(|data: &[u8]| {
    let state = state();
    let asker = Asker {
        namespace: "default",
        network: "",
    };
    for udp in [true, false] {
        if let Verdict::Answer(bytes) | Verdict::Formerr(bytes) =
            respond(&state, data, asker, "cluster.local", udp)
        {
            assert!(bytes.len() >= 12);
            assert_eq!(bytes[..2], data[..2], "the query's id");
        }
    }
});
