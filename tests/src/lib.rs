//! A one-machine cluster for mesh-node tests: nodes and pods are network namespaces joined by
//! veths, pod processes live in a test-owned cgroup, and each node runs its own mesh-node with its
//! own cgroup subtree and bpffs pin directory.
//!
//! Everything is named after the test process's pid and a counter, and removed when the
//! [`Topology`] is dropped, also when a test panics. Leftovers of killed runs (whose pid is gone)
//! are swept when the next topology is built.
pub mod hbone_client;
pub mod meshnode;
pub mod podapp;
pub mod privilege;
pub mod sniff;
pub mod topology;

pub use meshnode::MeshNode;
pub use podapp::{ConnResult, PodRun, Server};
pub use privilege::privileged;
pub use topology::{NodeSpec, PodSpec, Topology};
