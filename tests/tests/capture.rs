//! Outbound capture on a real kernel: two nodes, pods in network namespaces, one mesh-node per
//! node. Each test asserts on what a user sees: bytes that arrived, the peer the application
//! sees, who the server saw connecting, and mesh-node's own account of the connection. The
//! capture scenarios run over IPv4 and, in a dual-stack topology, over IPv6 (`connect6`,
//! `sk_lookup` for IPv6).
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{MeshNode, PodSpec, Server, Topology, podapp, privileged, wait_for};

const SERVER_PORT: u16 = 8080;

/// node1: `client` (enrolled), `bystander` (not enrolled); node2: `server` (enrolled).
fn two_nodes() -> Topology {
    Topology::two_nodes(
        vec![PodSpec::enrolled("client"), PodSpec::plain("bystander")],
        vec![PodSpec::enrolled("server")],
    )
}

fn start_server(topo: &Topology) -> Server {
    topo.serve("server", SERVER_PORT)
}

/// The same pods with IPv6 beside IPv4; the server listens on both families and clients call
/// its IPv6 address.
fn dual_stack() -> (Topology, Server) {
    let topo = Topology::two_nodes_dual_stack(
        vec![PodSpec::enrolled("client"), PodSpec::plain("bystander")],
        vec![PodSpec::enrolled("server")],
    );
    let any = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), SERVER_PORT);
    let mut server = topo.serve_at("server", any);
    server.addr = SocketAddr::new(IpAddr::V6(topo.pod("server").ipv6()), SERVER_PORT);
    (topo, server)
}

/// The topology and server of a scenario, in the family asked for.
fn scenario(ipv6: bool) -> (Topology, Server) {
    if ipv6 {
        dual_stack()
    } else {
        let topo = two_nodes();
        let server = start_server(&topo);
        (topo, server)
    }
}

/// `pod`'s address of `target`'s family.
fn ip_like(topo: &Topology, pod: &str, target: SocketAddr) -> IpAddr {
    let pod = topo.pod(pod);
    if target.is_ipv6() {
        IpAddr::V6(pod.ipv6())
    } else {
        IpAddr::V4(pod.ip)
    }
}

/// Captured connections to `target` that have ended (one access line each).
fn captured_count(mesh: &MeshNode, target: SocketAddr) -> usize {
    mesh.log_lines_with(&[
        "outbound connection closed",
        &format!("original_dst={target}"),
    ])
    .len()
}

/// Asserts that every connection went through mesh-node: the application still believes it talks
/// to `target`, while the server saw a different socket (mesh-node's) from `source_ip`.
fn assert_captured(run: &podapp::PodRun, source_ip: IpAddr, target: SocketAddr) {
    assert!(run.errors.is_empty(), "connection errors: {:?}", run.errors);
    for conn in &run.ok {
        assert_eq!(
            conn.peer, target,
            "getpeername() must show the original destination"
        );
        assert_eq!(
            conn.server_saw.ip(),
            source_ip,
            "upstream leaves from the expected pod's IP"
        );
        assert_ne!(
            conn.server_saw, conn.local,
            "the server must see mesh-node's socket, not the app's"
        );
    }
}

/// Runs connections from the enrolled `client` pod and asserts every one was captured, with the
/// server (not enrolled on a running mesh-node) seeing the client pod's IP.
fn client_captured(
    topo: &Topology,
    target: SocketAddr,
    bytes: usize,
    conns: usize,
) -> podapp::PodRun {
    let run = topo.connect_from("client", target, bytes, conns);
    assert_captured(&run, ip_like(topo, "client", target), target);
    run
}

/// Asserts that connections went straight to the server: it saw the application's own socket.
fn assert_direct(run: &podapp::PodRun, target: SocketAddr) {
    assert!(run.errors.is_empty(), "connection errors: {:?}", run.errors);
    for conn in &run.ok {
        assert_eq!(conn.peer, target);
        assert_eq!(
            conn.server_saw, conn.local,
            "the server must see the application's own socket"
        );
    }
}

#[test]
fn cross_node_connections_are_captured_and_bytes_arrive_intact() {
    if !privileged() {
        return;
    }
    cross_node_captured(false);
}

#[test]
fn cross_node_connections_over_ipv6_are_captured_and_bytes_arrive_intact() {
    if !privileged() {
        return;
    }
    cross_node_captured(true);
}

fn cross_node_captured(ipv6: bool) {
    let (topo, server) = scenario(ipv6);
    let mesh1 = MeshNode::start(&topo, "node1", &[]).expect("mesh-node node1");
    let mesh2 = MeshNode::start(&topo, "node2", &[]).expect("mesh-node node2");
    // No workloads are known (no state file), so node1 passes connections through as plain TCP;
    // node2 captures them on their way into its enrolled server pod (sk_lookup → 15006) and
    // delivers them from inside the pod, from the client's address (original source).
    let client_ip = ip_like(&topo, "client", server.addr);
    let run = |bytes, conns| {
        let run = topo.connect_from("client", server.addr, bytes, conns);
        assert_captured(&run, client_ip, server.addr);
        run
    };

    let one_byte = run(1, 1);
    assert_eq!(one_byte.ok[0].bytes, 1);

    let large = run(16 << 20, 1);
    assert_eq!(large.ok[0].bytes, 16 << 20);

    let concurrent = run(64 * 1024, 64);
    assert_eq!(concurrent.ok.len(), 64);
    let inbound = |mesh: &MeshNode| {
        mesh.log_lines_with(&[
            "inbound plaintext connection closed",
            &format!("dst={}", server.addr),
        ])
        .len()
    };
    assert!(
        wait_for(|| inbound(&mesh2) == 66),
        "node2 logged {} inbound captures, expected 66:\n{}",
        inbound(&mesh2),
        mesh2.log_text()
    );

    // mesh-node's own account: one captured line per connection, and the 16 MiB both ways.
    assert!(
        wait_for(|| captured_count(&mesh1, server.addr) == 66),
        "mesh-node logged {} captured connections, expected 66:\n{}",
        captured_count(&mesh1, server.addr),
        mesh1.log_text()
    );
    let bytes = format!("bytes_sent={}", 16 << 20);
    assert!(wait_for(|| !mesh1
        .log_lines_with(&["outbound connection closed", &bytes])
        .is_empty()));
}

#[test]
fn non_enrolled_pods_and_the_host_namespace_are_not_captured() {
    if !privileged() {
        return;
    }
    not_captured(false);
}

#[test]
fn non_enrolled_pods_and_the_host_namespace_are_not_captured_over_ipv6() {
    if !privileged() {
        return;
    }
    not_captured(true);
}

fn not_captured(ipv6: bool) {
    let (topo, server) = scenario(ipv6);
    let mesh1 = MeshNode::start(&topo, "node1", &[]).expect("mesh-node node1");

    // A pod on the same node, inside the hooked cgroup, but not enrolled.
    assert_direct(
        &topo.connect_from("bystander", server.addr, 4096, 4),
        server.addr,
    );

    // A host-network process of node1, also inside the hooked cgroup.
    let node = topo.node("node1");
    let host_cgroup = topo.host_cgroup("node1").expect("host cgroup");
    let netns = node.netns_path();
    let host = podapp::connect(&netns, &host_cgroup, server.addr, 4096, 2).expect("host client");
    assert_direct(&host, server.addr);

    assert_eq!(
        captured_count(&mesh1, server.addr),
        0,
        "{}",
        mesh1.log_text()
    );
    // And the enrolled pod next to them still is captured.
    client_captured(&topo, server.addr, 10, 1);
}

#[test]
fn a_restarted_mesh_node_captures_again_through_the_same_pinned_links() {
    if !privileged() {
        return;
    }
    let topo = two_nodes();
    let server = start_server(&topo);
    let mut first = MeshNode::start(&topo, "node1", &[]).expect("first mesh-node");
    client_captured(&topo, server.addr, 100, 1);
    let attached = hook_link_ids(&first, "origin=attached");
    assert_eq!(
        attached.len(),
        9,
        "nine hooks attached (connect, sock_ops, getpeername, DNS's sendmsg and recvmsg):\n{}",
        first.log_text()
    );
    first.stop().expect("stop first");

    let programs_before = hook_program_ids(&first, "origin=attached");
    let second = MeshNode::start(&topo, "node1", &[]).expect("second mesh-node");
    // Its maps have this build's layout: all kept, none replaced.
    assert!(
        second
            .log_lines_with(&["incompatible release replaced"])
            .is_empty(),
        "{}",
        second.log_text()
    );
    let reused = hook_link_ids(&second, "origin=reused");
    assert_eq!(
        reused,
        attached,
        "the restart must reuse the very same links:\n{}",
        second.log_text()
    );
    // ... each now running the programs the new process loaded (an upgrade runs its own
    // kernel code), swapped in without detaching.
    let programs_after = hook_program_ids(&second, "origin=reused");
    assert_eq!(programs_after.len(), programs_before.len());
    for ((hook, before), (_, after)) in programs_before.iter().zip(&programs_after) {
        assert_ne!(
            before, after,
            "{hook} still runs the first process's program"
        );
    }
    client_captured(&topo, server.addr, 100, 2);
    assert!(
        wait_for(|| captured_count(&second, server.addr) == 2),
        "{}",
        second.log_text()
    );
}

/// `(hook, program id)` pairs from mesh-node's "capture hook in place" lines with this origin.
fn hook_program_ids(mesh: &MeshNode, origin: &str) -> Vec<(String, String)> {
    mesh.log_lines_with(&["capture hook in place", origin])
        .iter()
        .map(|line| {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(name))
                    .unwrap_or_default()
                    .to_owned()
            };
            (field("hook="), field("program_id="))
        })
        .collect()
}

/// `(hook, link id)` pairs from mesh-node's "capture hook in place" lines with this origin.
fn hook_link_ids(mesh: &MeshNode, origin: &str) -> Vec<(String, String)> {
    let field = |line: &str, name: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name))
            .unwrap_or_default()
            .to_owned()
    };
    mesh.log_lines_with(&["capture hook in place", origin])
        .iter()
        .map(|line| (field(line, "hook="), field(line, "link_id=")))
        .collect()
}

#[test]
fn a_stopped_mesh_node_fails_open_or_closed_as_configured() {
    if !privileged() {
        return;
    }
    fails_as_configured(false);
}

#[test]
fn a_stopped_mesh_node_fails_open_or_closed_over_ipv6_too() {
    if !privileged() {
        return;
    }
    fails_as_configured(true);
}

fn fails_as_configured(ipv6: bool) {
    let (topo, server) = scenario(ipv6);

    let mut open =
        MeshNode::start(&topo, "node1", &["--fail-mode", "open"]).expect("mesh-node fail-open");
    client_captured(&topo, server.addr, 10, 1);
    open.stop().expect("stop");
    // Still enrolled and hooked, but nobody serving: traffic goes direct.
    assert_direct(
        &topo.connect_from("client", server.addr, 1024, 2),
        server.addr,
    );

    let mut closed =
        MeshNode::start(&topo, "node1", &["--fail-mode", "closed"]).expect("mesh-node fail-closed");
    client_captured(&topo, server.addr, 10, 1);
    closed.stop().expect("stop");
    let refused = topo.connect_from("client", server.addr, 10, 2);
    assert!(
        refused.ok.is_empty(),
        "fail-closed let connections through: {:?}",
        refused.ok
    );
    for error in &refused.errors {
        assert!(
            error.contains("connect") && error.contains("not permitted"),
            "{error}"
        );
    }
}

#[test]
fn bad_input_gets_one_clear_line_and_the_rest_keeps_working() {
    if !privileged() {
        return;
    }
    let topo = two_nodes();
    let server = start_server(&topo);
    let node = topo.node("node1");

    // A malformed pods file: mesh-node refuses to start, naming file, line and field.
    let original = std::fs::read_to_string(&node.pods_file).expect("pods file");
    std::fs::write(
        &node.pods_file,
        original.replacen("ips: [198.18.1.10]", "ips: [198.18.1.300]", 1),
    )
    .expect("write bad pods file");
    let mut bad = MeshNode::spawn(&topo, "node1", &[]).expect("spawn");
    assert_eq!(bad.wait_exit(Duration::from_secs(20)).expect("exit"), 1);
    let log = bad.log_text();
    assert!(log.contains(&node.pods_file.display().to_string()), "{log}");
    assert!(
        log.contains("pods[0].ips[0]") && log.contains("line 6"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");

    // A pod whose netns is gone, and a pod whose 15001 is taken: each named, the rest enrolled.
    let bystander = topo.pod("bystander");
    let mut pods = original.clone();
    pods.push_str("  - name: ghost\n    namespace: default\n    netns: /run/netns/does-not-exist\n    ips: [198.18.1.99]\n");
    pods.push_str(&format!(
        "  - name: bystander\n    namespace: default\n    netns: {}\n    ips: [{}]\n",
        bystander.netns_path().display(),
        bystander.ip
    ));
    std::fs::write(&node.pods_file, pods).expect("write pods file");
    let squatter = Server::start(
        &bystander.netns_path(),
        &bystander.cgroup,
        SocketAddr::from(([127, 0, 0, 1], 15001)),
    )
    .expect("occupy 15001 in bystander");

    let mesh = MeshNode::start(&topo, "node1", &[]).expect("mesh-node with partly bad pods");
    let log = mesh.log_text();
    assert!(log.contains("enrolled=1 failed=2"), "{log}");
    assert!(
        log.contains("enroll pod default/ghost") && log.contains("/run/netns/does-not-exist"),
        "{log}"
    );
    assert!(
        log.contains("enroll pod default/bystander: bind 127.0.0.1:15001")
            && log.contains("in use"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    client_captured(&topo, server.addr, 1000, 1);
    drop(squatter);
}

/// A pin directory left by a release whose map layout differs (here `MESH_ENROLLED` with the
/// 200-byte values of an older record): mesh-node replaces that map, says so, and captures as
/// usual — no manual `rm` of the pins.
#[test]
fn a_pin_directory_from_an_incompatible_release_is_upgraded_in_place() {
    if !privileged() {
        return;
    }
    let topo = two_nodes();
    let server = start_server(&topo);
    let bpffs = &topo.node("node1").bpffs;
    std::fs::create_dir_all(bpffs).expect("pin directory");
    pin_hash_map(&bpffs.join("MESH_ENROLLED"), 8, 200, 4096);

    let mesh = MeshNode::start(&topo, "node1", &[]).expect("mesh-node over old pins");
    assert!(
        !mesh
            .log_lines_with(&[
                "pinned map from an incompatible release replaced",
                "map=MESH_ENROLLED"
            ])
            .is_empty(),
        "{}",
        mesh.log_text()
    );
    client_captured(&topo, server.addr, 4096, 2);
    let maps = mesh_tests::meshnode::bpf_json(&topo, "node1", &["maps"]);
    let enrolled = maps
        .as_array()
        .expect("maps")
        .iter()
        .find(|m| m["name"] == "MESH_ENROLLED")
        .expect("MESH_ENROLLED");
    assert_eq!(enrolled["value_size"], 304, "{enrolled}");
    assert_eq!(enrolled["entries"], 1, "{enrolled}");
}

/// Creates a BPF hash map of the given layout and pins it at `path` (`bpf(2)` directly).
fn pin_hash_map(path: &std::path::Path, key_size: u32, value_size: u32, max_entries: u32) {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    let create = MapCreate {
        map_type: BPF_MAP_TYPE_HASH,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: a valid BPF_MAP_CREATE argument of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &raw const create,
            std::mem::size_of::<MapCreate>(),
        )
    };
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(path.display().to_string()).expect("path");
    let pin = ObjPin {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: a valid BPF_OBJ_PIN argument; `name` outlives the call; `fd` is ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &raw const pin,
            std::mem::size_of::<ObjPin>(),
        )
    };
    assert!(
        rc == 0,
        "pin {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: closing the descriptor created above; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}
