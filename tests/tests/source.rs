//! Original source: the application behind mesh-node sees its real client's address — the
//! client pod's (and its port) same-node and over HBONE, the outside client's for captured
//! plaintext — and its replies come back through mesh-node (every byte echoed intact). With
//! `--original-source false` it sees its own pod's address, as before. The mode survives a
//! restart and is shown by `mesh-node bpf status`.
use std::{net::SocketAddr, path::Path, process::Command};

use mesh_tests::{MeshNode, PodSpec, Topology, meshnode::bpf_json, podapp, privileged, wait_for};

const PORT: u16 = 8080;
const BIG: usize = 16 << 20;

/// node1: `client`, `neighbor` (enrolled), `outsider` (not); node2: `server` (enrolled).
fn topology() -> Topology {
    Topology::two_nodes(
        vec![
            PodSpec::enrolled("client"),
            PodSpec::enrolled("neighbor"),
            PodSpec::plain("outsider"),
        ],
        vec![PodSpec::enrolled("server")],
    )
}

use podapp::assert_all_ok as all_ok;

/// The rules of the pod namespace at `netns` that select mesh-node's delivery table.
fn delivery_rules(netns: &Path) -> usize {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "rule", "show"])
        .output()
        .expect("ip rule");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains("fwmark 0x53a") && line.contains("lookup 1338"))
        .count()
}

fn closed(mesh: &MeshNode, needles: &[&str]) -> usize {
    mesh.log_lines_with(needles).len()
}

#[test]
fn applications_see_their_clients_address_on_every_path_and_replies_come_back_intact() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("mesh-node node1");
    let mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("mesh-node node2");
    let neighbor = topo.serve("neighbor", PORT);
    let server = topo.serve("server", PORT);
    let client_ip = std::net::IpAddr::V4(topo.pod("client").ip);

    // The client's socket: its port is its own, its getsockname() address the loopback of
    // mesh-node's 15001 listener it was redirected to; the pod's address is what it leaves with.
    let as_client = |conn: &podapp::ConnResult| SocketAddr::new(client_ip, conn.local.port());

    // Same node: the neighbor sees the client pod's address and the client's port.
    let run = topo.connect_from("client", neighbor.addr, BIG, 2);
    all_ok(&run, 2, BIG);
    for conn in &run.ok {
        assert_eq!(conn.peer, neighbor.addr);
        assert_eq!(conn.server_saw, as_client(conn), "same-node: {conn:?}");
        assert_eq!(conn.server_local, neighbor.addr);
    }
    // ... and it did go through mesh-node (the server alone cannot tell any more).
    assert!(
        wait_for(|| closed(
            &mesh1,
            &[
                "outbound connection closed",
                "route=local",
                &format!("dst={}", neighbor.addr)
            ]
        ) == 2),
        "{}",
        mesh1.log_text()
    );

    // HBONE: the server on node2 sees the client pod's address and port.
    let run = topo.connect_from("client", server.addr, BIG, 2);
    all_ok(&run, 2, BIG);
    for conn in &run.ok {
        assert_eq!(conn.server_saw, as_client(conn), "HBONE: {conn:?}");
    }
    assert!(
        wait_for(|| closed(&mesh1, &["outbound connection closed", "route=hbone"]) == 2),
        "{}",
        mesh1.log_text()
    );

    // Captured plaintext from outside the mesh: the client's real address. Its own
    // connection holds that very address pair in the server's namespace, so the delivery
    // takes another port.
    let outsider = std::net::IpAddr::V4(topo.pod("outsider").ip);
    let run = topo.connect_from("outsider", server.addr, 1 << 20, 3);
    all_ok(&run, 3, 1 << 20);
    for conn in &run.ok {
        assert_eq!(conn.server_saw.ip(), outsider, "plaintext: {conn:?}");
        assert_ne!(conn.server_saw, conn.local, "plaintext: {conn:?}");
    }
    assert!(
        wait_for(|| closed(
            &mesh2,
            &[
                "inbound plaintext connection closed",
                &format!("dst={}", server.addr)
            ]
        ) == 3),
        "{}",
        mesh2.log_text()
    );

    // The mode is on, and nothing was left announced to sk_lookup.
    let status = bpf_json(&topo, "node2", &["status"]);
    assert_eq!(status["original_source"], "on", "{status}");
    let pods = bpf_json(&topo, "node2", &["pods"]);
    assert_eq!(
        pods[0]["original_source"],
        serde_json::json!(["ipv4"]),
        "{pods}"
    );
    let maps = bpf_json(&topo, "node2", &["maps"]);
    let delivering = maps
        .as_array()
        .expect("maps")
        .iter()
        .find(|map| map["name"] == "MESH_DELIVERING")
        .unwrap_or_else(|| panic!("no MESH_DELIVERING in {maps}"));
    assert_eq!(delivering["entries"], 0, "{delivering}");
    drop((mesh1, mesh2));
}

#[test]
fn the_clients_address_survives_a_restart_and_the_flag_turns_it_off() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let _mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("mesh-node node1");
    let mut mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("mesh-node node2");
    let server = topo.serve("server", PORT);
    let (client_ip, server_ip) = (topo.pod("client").ip, topo.pod("server").ip);
    let saw = |target: SocketAddr| {
        let run = topo.connect_from("client", target, 256 * 1024, 1);
        all_ok(&run, 1, 256 * 1024);
        run.ok[0].server_saw.ip()
    };
    assert_eq!(saw(server.addr), std::net::IpAddr::V4(client_ip));

    // A restarted mesh-node re-enrolls the pod; its routing is found in place, not doubled.
    mesh2.stop().expect("stop");
    let mut mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("restart node2");
    assert_eq!(saw(server.addr), std::net::IpAddr::V4(client_ip));
    assert_eq!(delivery_rules(&topo.pod("server").netns_path()), 1);

    // Off: the application sees connections from its own pod's address, as before.
    mesh2.stop().expect("stop");
    let mesh2 = MeshNode::start_hbone(&topo, "node2", &["--original-source", "false"])
        .expect("node2 without original source");
    assert_eq!(saw(server.addr), std::net::IpAddr::V4(server_ip));
    let status = bpf_json(&topo, "node2", &["status"]);
    assert_eq!(status["original_source"], "off", "{status}");
    let pods = bpf_json(&topo, "node2", &["pods"]);
    assert_eq!(pods[0]["original_source"], serde_json::json!([]), "{pods}");
    drop(mesh2);
}

/// In a container `/proc/sys` is read-only: the pod's sysctl is then written through the
/// host's procfs (`--host-proc`, writable in the DaemonSet). Without one, the pod is enrolled
/// all the same, its applications seeing their own pod's address, with a warning.
#[test]
fn in_a_container_the_sysctl_goes_through_the_host_proc() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let _mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("mesh-node node1");
    let server = topo.serve("server", PORT);
    let (client_ip, server_ip) = (topo.pod("client").ip, topo.pod("server").ip);
    let saw = || {
        let run = topo.connect_from("client", server.addr, 64 * 1024, 1);
        all_ok(&run, 1, 64 * 1024);
        run.ok[0].server_saw.ip()
    };

    let mut mesh2 = MeshNode::start_hbone_with_read_only_proc_sys(&topo, "node2", None)
        .expect("mesh-node with a read-only /proc/sys");
    assert!(
        !mesh2
            .log_lines_with(&[
                "cannot keep clients' addresses for this pod",
                "tcp_fwmark_accept"
            ])
            .is_empty(),
        "{}",
        mesh2.log_text()
    );
    assert_eq!(saw(), std::net::IpAddr::V4(server_ip));
    mesh2.stop().expect("stop");

    let host_proc = topo.workdir.join("host-proc");
    let mesh2 = MeshNode::start_hbone_with_read_only_proc_sys(&topo, "node2", Some(&host_proc))
        .expect("mesh-node with a host procfs");
    assert_eq!(
        saw(),
        std::net::IpAddr::V4(client_ip),
        "{}",
        mesh2.log_text()
    );
}
