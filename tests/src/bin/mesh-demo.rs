//! The local demo: two simulated nodes, a client pod and a server pod, one mesh-node per node.
//! A connection from the client is captured by eBPF and carried by mesh-node through an HBONE
//! tunnel (mutual TLS with SPIFFE identities); the demo shows the evidence from each side, then
//! removes everything it built.
use std::{net::SocketAddr, process::ExitCode};

use anyhow::{Context, Result, bail};
use mesh_tests::{MeshNode, NodeSpec, PodSpec, Server, Topology, podapp};

const PAYLOAD: usize = 1 << 20;

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesh-demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    println!(
        "mesh-node demo: two nodes, two pods, capture by eBPF (no iptables, no sidecar), HBONE between nodes\n"
    );
    let topo = Topology::build(&[
        NodeSpec {
            name: "node1",
            pods: vec![PodSpec::enrolled("client")],
        },
        NodeSpec {
            name: "node2",
            pods: vec![PodSpec::enrolled("server")],
        },
    ])
    .context("build the demo topology")?;
    for node in &topo.nodes {
        for pod in &node.pods {
            println!(
                "  {}: pod {:<7} {}  (network namespace {})",
                node.name, pod.name, pod.ip, pod.netns
            );
        }
    }

    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).context("start mesh-node on node1")?;
    let mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).context("start mesh-node on node2")?;
    println!(
        "\n  mesh-node is running on both nodes with a mesh root from `mesh-node ca init` ({});",
        topo.ca_dir().display()
    );
    println!("  its eBPF hooks are attached to each node's pod cgroups and pod namespaces.");

    let server_pod = topo.pod("server");
    let server = Server::start(
        &server_pod.netns_path(),
        &server_pod.cgroup,
        SocketAddr::from((server_pod.ip, 8080)),
    )
    .context("start the server application")?;
    let client = topo.pod("client");
    println!(
        "\n  client connects to {} and sends 1 MiB, which the server echoes back ...",
        server.addr
    );
    let run = podapp::connect(
        &client.netns_path(),
        &client.cgroup,
        server.addr,
        PAYLOAD,
        1,
    )?;
    let conn = run
        .ok
        .first()
        .with_context(|| format!("the connection failed: {:?}", run.errors))?;

    println!("\n  what the client application saw:");
    println!(
        "    getpeername() = {}   (the destination it asked for, restored by eBPF)",
        conn.peer
    );
    println!(
        "    getsockname() = {}   (its socket really ends at mesh-node's 15001 listener)",
        conn.local
    );
    println!("  what the server application saw:");
    println!(
        "    a connection from {}   (mesh-node on node2 delivers tunnels from inside the server pod)",
        conn.server_saw
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let show = |title: &str, mesh: &MeshNode, needles: &[&str]| {
        println!("  what mesh-node on {title} logged:");
        for needle in needles {
            for line in mesh.log_lines_with(&[needle]) {
                let message = line
                    .find("mesh_node::")
                    .and_then(|at| line[at..].split_once(": "))
                    .map_or(line.as_str(), |(_, message)| message);
                println!("    {message}");
            }
        }
    };
    show(
        "node1",
        &mesh1,
        &["outbound connection", "HBONE connection established"],
    );
    show(
        "node2",
        &mesh2,
        &["HBONE connection accepted", "HBONE tunnel"],
    );
    let carried =
        conn.peer == server.addr && conn.server_saw != conn.local && conn.bytes == PAYLOAD;
    let tunnelled = !mesh1
        .log_lines_with(&["outbound connection closed", "route=hbone"])
        .is_empty();
    if !carried || !tunnelled {
        bail!("the connection was not carried through HBONE by mesh-node: {conn:?}");
    }
    println!(
        "\n  result: {} bytes echoed intact; mesh-node carried them in a mutual-TLS HBONE tunnel.",
        conn.bytes
    );
    drop(server);
    drop(mesh1);
    drop(mesh2);
    drop(topo);
    println!("  demo topology removed (namespaces, cgroups, pinned programs).");
    Ok(())
}
