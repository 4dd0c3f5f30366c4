//! mesh-node: a node-level, eBPF-accelerated service-mesh data plane.
//!
//! See ARCHITECTURE.md at the repository root for the runtimes, ports and the life of a
//! connection.

pub mod app;
pub mod config;
pub mod dataplane;
pub mod enroll;
pub mod hbone;
pub mod identity;
pub mod netns;
pub mod preflight;
pub mod proxy;
pub mod state;
pub mod tls;
pub mod xds;
