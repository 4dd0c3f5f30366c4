//! HBONE between nodes on a real kernel: mutual TLS with SPIFFE identities, CONNECT tunnels,
//! inbound delivery, plaintext inbound capture and the same-node shortcut. Assertions are on
//! what a user sees: bytes that arrived, identities mesh-node reports, what crossed the wire.
use std::{net::SocketAddr, time::Duration};

use mesh_tests::{MeshNode, NodeSpec, PodSpec, Server, Topology, podapp, privileged, sniff};

const PORT: u16 = 8080;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// node1: `client`, `neighbor` (enrolled), `outsider` (not); node2: `server` (enrolled),
/// `legacy` (not enrolled, not in the mesh).
fn topology() -> Topology {
    Topology::build(&[
        NodeSpec {
            name: "node1",
            pods: vec![
                PodSpec::enrolled("client"),
                PodSpec::enrolled("neighbor"),
                PodSpec::plain("outsider"),
            ],
        },
        NodeSpec {
            name: "node2",
            pods: vec![PodSpec::enrolled("server"), PodSpec::plain("legacy")],
        },
    ])
    .expect("build topology")
}

fn serve(topo: &Topology, pod: &str) -> Server {
    let pod = topo.pod(pod);
    Server::start(
        &pod.netns_path(),
        &pod.cgroup,
        SocketAddr::from((pod.ip, PORT)),
    )
    .expect("start server")
}

fn run_from(
    topo: &Topology,
    pod: &str,
    target: SocketAddr,
    bytes: usize,
    conns: usize,
) -> podapp::PodRun {
    let pod = topo.pod(pod);
    podapp::connect(&pod.netns_path(), &pod.cgroup, target, bytes, conns).expect("run podapp")
}

fn all_ok(run: &podapp::PodRun, conns: usize) {
    assert!(run.errors.is_empty(), "connection errors: {:?}", run.errors);
    assert_eq!(run.ok.len(), conns);
}

fn wait_for(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
}

#[test]
fn cross_node_traffic_is_mutual_tls_with_identities_and_no_cleartext_on_the_wire() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("mesh-node node1");
    let mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("mesh-node node2");
    let server = serve(&topo, "server");
    let legacy = serve(&topo, "legacy");

    let sniffer = sniff::Sniffer::start(&topo.node("node1").netns, "n0").expect("capture n0");
    let run = run_from(&topo, "client", server.addr, 1 << 20, 4);
    all_ok(&run, 4);
    for conn in &run.ok {
        assert_eq!(
            conn.peer, server.addr,
            "the application sees its original destination"
        );
        assert_eq!(conn.bytes, 1 << 20);
    }
    // Control: the same bytes to a workload outside the mesh cross the link in cleartext, so
    // the capture below would have seen them.
    all_ok(&run_from(&topo, "client", legacy.addr, 64 * 1024, 1), 1);
    let segments = sniffer.stop();

    let hbone_bytes: usize = segments
        .iter()
        .filter(|s| s.dst_port == 15008 || s.src_port == 15008)
        .map(|s| s.payload.len())
        .sum();
    assert!(
        hbone_bytes > 8 << 20,
        "only {hbone_bytes} bytes crossed the link on 15008"
    );
    let marker = podapp::pattern_bytes(1000, 64);
    let cleartext = |port: u16| {
        segments
            .iter()
            .filter(|s| s.dst_port == port || s.src_port == port)
            .any(|s| s.payload.windows(marker.len()).any(|w| w == marker))
    };
    assert!(
        cleartext(PORT),
        "control: passthrough bytes must be visible on the link"
    );
    assert!(
        !cleartext(15008),
        "application bytes appeared in cleartext inside HBONE"
    );

    // Each side names the other's identity.
    assert!(
        wait_for(|| !mesh2
            .log_lines_with(&[
                "HBONE connection accepted",
                &format!("peer_identity={CLIENT_ID}")
            ])
            .is_empty()),
        "{}",
        mesh2.log_text()
    );
    assert!(
        wait_for(|| mesh1
            .log_lines_with(&[
                "outbound connection closed",
                "route=hbone",
                &format!("peer_identity={SERVER_ID}")
            ])
            .len()
            == 4),
        "{}",
        mesh1.log_text()
    );
    assert_eq!(
        mesh2
            .log_lines_with(&["HBONE tunnel opened", &format!("dst={}", server.addr)])
            .len(),
        4,
        "{}",
        mesh2.log_text()
    );
}
