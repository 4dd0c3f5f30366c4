//! mesh-node: a node-level, eBPF-accelerated service-mesh data plane.
//!
//! See ARCHITECTURE.md at the repository root for the runtimes, ports and the life of a
//! connection.

pub mod admin;
pub mod app;
pub mod authz;
pub mod certs;
pub mod config;
pub mod dataplane;
pub mod dns;
pub mod drain;
pub mod ending;
pub mod enroll;
pub mod gateway;
pub mod handover;
pub mod hbone;
pub mod identity;
pub mod inspect;
pub mod istiod;
pub mod logging;
pub mod memory;
pub mod netns;
pub mod pod;
pub mod preflight;
pub mod proto;
pub mod proxy;
pub mod source_routing;
pub mod splice;
pub mod state;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod xds;

/// An error and its causes on one line, skipping causes a message already quotes.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(err) = cause {
        let text = err.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = err.source();
    }
    line
}
