//! A one-machine cluster for mesh-node tests: nodes and pods are network namespaces joined by
//! veths, pod processes live in a test-owned cgroup, and each node runs its own mesh-node with its
//! own cgroup subtree and bpffs pin directory.
//!
//! Everything is named after the test process's pid and a counter, and removed when the
//! [`Topology`] is dropped, also when a test panics. Leftovers of killed runs (whose pid is gone)
//! are swept when the next topology is built.
pub mod bench;
pub mod ca_server;
pub mod control_plane;
pub mod dns_server;
pub mod hbone_client;
pub mod http_probe;
pub mod kube_api;
pub mod kubelet;
pub mod meshnode;
pub mod multicluster;
pub mod netns_server;
pub mod podapp;
pub mod privilege;
pub mod sniff;
pub mod topology;
pub mod waypoint;
pub mod ztunnel;

pub use meshnode::MeshNode;
pub use podapp::{ConnResult, PodRun, Server};
pub use privilege::privileged;
pub use topology::{NodeSpec, PodSpec, Topology};

use std::time::{Duration, Instant};

/// Polls `condition` for up to 10 s (log lines are written asynchronously).
pub fn wait_for(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
}

impl Topology {
    /// Starts the echo server in pod `pod` on `<pod IP>:port`.
    pub fn serve(&self, pod: &str, port: u16) -> Server {
        let pod = self.pod(pod);
        Server::start(
            &pod.netns_path(),
            &pod.cgroup,
            std::net::SocketAddr::from((pod.ip, port)),
        )
        .expect("start echo server")
    }

    /// Starts the echo server in pod `pod` on `addr` (`[::]:port` for both families).
    pub fn serve_at(&self, pod: &str, addr: std::net::SocketAddr) -> Server {
        let pod = self.pod(pod);
        Server::start(&pod.netns_path(), &pod.cgroup, addr).expect("start echo server")
    }

    /// Runs `podapp connect` in pod `pod`: `conns` parallel connections of `bytes` each.
    pub fn connect_from(
        &self,
        pod: &str,
        target: std::net::SocketAddr,
        bytes: usize,
        conns: usize,
    ) -> PodRun {
        let pod = self.pod(pod);
        podapp::connect(&pod.netns_path(), &pod.cgroup, target, bytes, conns)
            .expect("run podapp connect")
    }
}
