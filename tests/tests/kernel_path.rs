//! `--kernel-same-node`: once mesh-node has set a same-node connection up, the kernel sends
//! what each application writes straight out of mesh-node's socket towards the other
//! (`sk_msg`). Every byte still arrives, in order, with the EOF after it (podapp checks a
//! position-dependent pattern both ways after a half-close); the access log counts the bytes
//! the kernel carried as well as the relay's; the pairings are gone when the connections are;
//! cross-node connections from joined sockets are unaffected; and turning the flag off on a
//! restart removes the join hook, so the relay carries everything again.
use std::time::Duration;

use serde_json::Value;

use mesh_tests::{MeshNode, PodSpec, Topology, meshnode::bpf_json, podapp, privileged, wait_for};

const PORT: u16 = 8080;
const BIG: usize = 16 << 20;
const CONNS: usize = 4;

fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {status}"))
}

fn entries(topo: &Topology, map: &str) -> u64 {
    let maps = bpf_json(topo, "node1", &["maps"]);
    maps.as_array()
        .expect("maps")
        .iter()
        .find(|m| m["name"] == map)
        .unwrap_or_else(|| panic!("no {map} in {maps}"))["entries"]
        .as_u64()
        .unwrap_or_else(|| panic!("{map} has no entry count: {maps}"))
}

#[test]
fn the_kernel_carries_same_node_bytes_intact_and_mesh_node_still_ends_and_reports_them() {
    if !privileged() {
        return;
    }
    let topo = Topology::two_nodes(
        vec![PodSpec::enrolled("client"), PodSpec::enrolled("neighbor")],
        vec![PodSpec::enrolled("server")],
    );
    let mut mesh1 = MeshNode::start_hbone(&topo, "node1", &["--kernel-same-node", "true"])
        .expect("mesh-node node1");
    let _mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("mesh-node node2");
    let neighbor = topo.serve("neighbor", PORT);
    let server = topo.serve("server", PORT);

    let before = bpf_json(&topo, "node1", &["status"]);
    assert_eq!(before["kernel_same_node"], "on", "{before}");
    let run = topo.connect_from("client", neighbor.addr, BIG, CONNS);
    podapp::assert_all_ok(&run, CONNS, BIG);
    let after = bpf_json(&topo, "node1", &["status"]);
    // Each connection's client joined at connect, its server at accept.
    let joined = counter(&after, "sock_joined") - counter(&before, "sock_joined");
    assert!(joined >= 2 * CONNS as u64, "{joined} joined: {after}");
    // 16 MiB each way in writes of at most 64 KiB: far more than the relay's share would
    // leave if the kernel carried nothing.
    let redirected = counter(&after, "msg_redirected") - counter(&before, "msg_redirected");
    assert!(
        redirected >= CONNS as u64 * 100,
        "{redirected} writes redirected: {after}\n{}",
        mesh1.log_text()
    );
    assert_eq!(counter(&after, "msg_redirect_failed"), 0, "{after}");

    // The access lines count every byte, the kernel's with the relay's: the client's upload
    // one way, the server's greeting line and the echo the other.
    let closed = |needles: &[&str]| mesh1.log_lines_with(needles).len();
    let sent = format!("bytes_sent={BIG}");
    assert!(
        wait_for(|| closed(&["outbound connection closed", "route=local", &sent]) == CONNS),
        "{}",
        mesh1.log_text()
    );
    for line in mesh1.log_lines_with(&["outbound connection closed", "route=local"]) {
        let received: u64 = line
            .split("bytes_received=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no bytes_received in {line}"));
        assert!(received > BIG as u64, "echo and greeting counted: {line}");
    }
    // The pairings ended with their connections.
    assert!(
        wait_for(|| entries(&topo, "MESH_PAIR") == 0 && entries(&topo, "MESH_RELAYED") == 0),
        "{}",
        bpf_json(&topo, "node1", &["maps"])
    );

    // A cross-node connection from a joined client socket: the relay and HBONE as ever.
    let run = topo.connect_from("client", server.addr, 1 << 20, 2);
    podapp::assert_all_ok(&run, 2, 1 << 20);

    // Killed while connections are paired: they are reset (the kernel closes a dead process's
    // sockets), and a successor with the flag starts over the program still attached to the
    // pinned socket map, clears the dead pairings and pairs anew.
    let (netns, cgroup) = {
        let pod = topo.pod("client");
        (pod.netns_path(), pod.cgroup.clone())
    };
    let target = neighbor.addr;
    let held = std::thread::spawn(move || {
        podapp::connect_holding(&netns, &cgroup, target, 1 << 20, 2, Duration::from_secs(4))
            .expect("run podapp")
    });
    assert!(
        wait_for(|| entries(&topo, "MESH_PAIR") == 4),
        "{}",
        bpf_json(&topo, "node1", &["maps"])
    );
    mesh1.kill().expect("kill mesh-node");
    let run = held.join().expect("podapp thread");
    assert_eq!(run.errors.len(), 2, "reset with mesh-node: {run:?}");
    assert_eq!(
        entries(&topo, "MESH_PAIR"),
        4,
        "left behind by the dead process"
    );
    let mut mesh1 = MeshNode::start_hbone(&topo, "node1", &["--kernel-same-node", "true"])
        .expect("restart mesh-node after a kill");
    assert_eq!(entries(&topo, "MESH_PAIR"), 0, "{}", mesh1.log_text());
    let before = bpf_json(&topo, "node1", &["status"]);
    let run = topo.connect_from("client", neighbor.addr, 1 << 20, 2);
    podapp::assert_all_ok(&run, 2, 1 << 20);
    let after = bpf_json(&topo, "node1", &["status"]);
    assert!(
        counter(&after, "msg_redirected") > counter(&before, "msg_redirected"),
        "{after}\n{}",
        mesh1.log_text()
    );

    // Off after a restart: the join hook is removed, nothing joins, the relay carries it all.
    mesh1.stop().expect("stop mesh-node");
    drop(mesh1);
    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("restart mesh-node");
    let before = bpf_json(&topo, "node1", &["status"]);
    assert_eq!(before["kernel_same_node"], "off", "{before}");
    let hooks = before["hooks"].to_string();
    assert!(!hooks.contains("mesh_sock_join"), "{hooks}");
    let run = topo.connect_from("client", neighbor.addr, 1 << 20, 2);
    podapp::assert_all_ok(&run, 2, 1 << 20);
    let after = bpf_json(&topo, "node1", &["status"]);
    for name in ["sock_joined", "msg_redirected"] {
        assert_eq!(
            counter(&after, name),
            counter(&before, name),
            "{name}: {after}\n{}",
            mesh1.log_text()
        );
    }
}
