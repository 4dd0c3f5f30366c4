//! The HBONE server's reading of a CONNECT request (method, authority, headers: `forwarded`,
//! `baggage`, `x-forwarded-network`), and the parsers behind it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_node::{
    hbone::{Authority, Baggage, forwarded_for, server::parse_request},
    identity::Identity,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let method = parts.next().unwrap_or("CONNECT");
    let authority = parts.next().unwrap_or("");
    let _ = Authority::parse(authority);
    let mut builder = http::Request::builder().method(method).uri(authority);
    for line in parts {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let _ = forwarded_for(value);
        let _ = Baggage::parse(value);
        builder = builder.header(name.trim(), value.trim());
    }
    if let Ok(request) = builder.body(()) {
        let peer_identity = Identity::new("cluster.local", "default", "client");
        let _ = parse_request(&request, peer_identity, "10.0.0.1:40000".parse().unwrap());
    }
});
