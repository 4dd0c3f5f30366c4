//! The local demos, each removing everything it built when it ends:
//!
//! - `mesh-demo` (or `mesh-demo multicluster`): two clusters on two networks, joined by an
//!   east-west gateway that is mesh-node in gateway mode. A client in cluster 1 calls the
//!   global service `echo`; it is served in cluster 1 while cluster 1 has an endpoint, by
//!   cluster 2 through the gateway (double HBONE) once the local endpoint is gone, and locally
//!   again when it returns.
//! - `mesh-demo single`: two nodes of one cluster, a client pod and a server pod; the
//!   connection is captured by eBPF and carried through an HBONE tunnel (mutual TLS with SPIFFE
//!   identities), with the evidence from each side.
use std::{net::SocketAddr, process::ExitCode};

use anyhow::{Context, Result, bail};
use mesh_tests::{
    MeshNode, NodeSpec, PodSpec, Server, Topology,
    multicluster::{self, ECHO_HOST, MultiCluster, failover_echo},
    podapp,
};

const PAYLOAD: usize = 1 << 20;

fn main() -> ExitCode {
    let which = std::env::args().nth(1);
    let result = root().and_then(|()| match which.as_deref() {
        None | Some("multicluster") => multicluster_demo(),
        Some("single") => single_cluster_demo(),
        Some(other) => bail!("unknown demo {other:?}: multicluster (the default) or single"),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesh-demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    Ok(())
}

/// The access-log line's fields named in `keys`, as `key=value`, for a short summary.
fn fields(line: &str, keys: &[&str]) -> String {
    keys.iter()
        .filter_map(|key| {
            line.split_whitespace()
                .find(|field| field.starts_with(&format!("{key}=")))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn multicluster_demo() -> Result<()> {
    println!(
        "mesh-node demo: two clusters on two networks, one global service, an east-west gateway\n"
    );
    let mc = MultiCluster::start(true);
    let (gw1, gw2) = (mc.topo.link_ip("gw1"), mc.topo.link_ip("gw2"));
    println!(
        "  cluster1 (network net1): nodes c1n1 (pod client {}) and c1n2 (pod server1 {}), gateway {gw1}:15008",
        mc.topo.pod("client").ip,
        mc.topo.pod("server1").ip
    );
    println!(
        "  cluster2 (network net2): nodes c2n1 (pod client2 {}) and c2n2 (pod server2 {}), gateway {gw2}:15008",
        mc.topo.pod("client2").ip,
        mc.topo.pod("server2").ip
    );
    println!("  cluster1's pods have no route to cluster2's: the gateway is the only way there.");
    println!("  each cluster has its own control plane (speaking as istiod does); one mesh root.");
    println!(
        "  mesh-node runs on every node, and as the gateway (`mesh-node run --mode gateway`) on gw1 and gw2.\n"
    );
    multicluster::push(&mc.c1n1, || mc.cp1.put_service(failover_echo("net1")))?;
    println!(
        "  {ECHO_HOST} (VIP {}) is global, with NETWORK failover: local endpoints first.\n",
        mc.echo()
    );

    let mut seen = 0;
    let mut call = |title: &str| -> Result<Vec<&'static str>> {
        let run = mc.topo.connect_from("client", mc.echo(), 64 * 1024, 3);
        let served = mc.served_by(&run)?;
        println!(
            "  {title}: 3 calls to {}, 64 KiB each, echoed intact, served by {served:?}",
            mc.echo()
        );
        if let Some(conn) = run.ok.first() {
            println!(
                "    the server saw its caller at {} (the client pod's address, and the port of the client's own socket, {})",
                conn.server_saw,
                conn.local.port()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let lines = mc.c1n1.log_lines_with(&["outbound connection closed"]);
        for line in lines.iter().skip(seen).take(1) {
            println!(
                "    c1n1 access log: {}",
                fields(
                    line,
                    &[
                        "route",
                        "dst",
                        "dst_workload",
                        "dst_service",
                        "gateway_identity"
                    ]
                )
            );
        }
        seen = lines.len();
        Ok(served)
    };
    let local = call("cluster1 has an endpoint")?;
    println!(
        "\n  server1 leaves the service in cluster1 (its control plane pushes the change) ..."
    );
    let state = mc.state();
    multicluster::push(&mc.c1n1, || {
        mc.cp1.put_workload(state.pod("server1", "c1n2", 1, None))
    })?;
    // The name, not only the VIP: cluster1's own resolver knows no echo; mesh-node answers.
    let resolver = mesh_tests::dns_server::DnsServer::start(
        &mc.topo.node("c1n1").netns_path(),
        std::net::IpAddr::V4(mc.topo.link_ip("c1n1")),
    )?;
    let client = mc.topo.pod("client");
    let resolved = mesh_tests::podapp::resolve(
        &client.netns_path(),
        &client.cgroup,
        resolver.addr,
        "echo",
        "A",
        "connected",
    )?;
    println!(
        "  the client resolves \"echo\" through its resolver {}: {} {:?}, answered by mesh-node's DNS proxy (the resolver, which knows no echo, got {} queries)",
        resolver.addr,
        resolved.rcode,
        resolved.ips,
        resolver.seen().len()
    );
    if resolved.ips != [mc.echo().ip()] || !resolver.seen().is_empty() {
        bail!(
            "echo resolved to {:?} (resolver saw {:?})",
            resolved.ips,
            resolver.seen()
        );
    }
    let remote = call("cluster1 has none, called by that name")?;
    let show = |title: &str, mesh: &MeshNode, needle: &str, keys: &[&str]| {
        if let Some(line) = mesh.log_lines_with(&[needle]).last() {
            println!("    {title}: {}", fields(line, keys));
        }
    };
    show(
        "gateway access log",
        &mc.gw2,
        "gateway tunnel closed",
        &["src_identity", "dst", "dst_workload", "dst_service"],
    );
    show(
        "c2n2 access log",
        &mc.c2n2,
        "HBONE tunnel closed",
        &[
            "src_identity",
            "src_workload",
            "src_namespace",
            "dst_workload",
        ],
    );
    println!(
        "    (the gateway relayed the inner TLS without reading it; cluster2 saw the caller's own identity)"
    );
    println!("\n  server1 is back ...");
    multicluster::push(&mc.c1n1, || {
        mc.cp1
            .put_workload(state.pod("server1", "c1n2", 1, Some(ECHO_HOST)))
    })?;
    let back = call("cluster1 has an endpoint again")?;
    if local != ["server1"; 3] || remote != ["server2"; 3] || back != ["server1"; 3] {
        bail!("unexpected routing: {local:?}, then {remote:?}, then {back:?}");
    }
    println!(
        "\n  result: served locally, failed over to cluster2 through the gateway, and came back."
    );
    drop(mc);
    println!("  demo topology removed (namespaces, cgroups, pinned programs, processes).");
    Ok(())
}

fn single_cluster_demo() -> Result<()> {
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
        "    a connection from {}   (the client pod's address and its socket's port: mesh-node on node2 connects from there)",
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
    let carried = conn.peer == server.addr
        && conn.server_saw == SocketAddr::new(client.ip.into(), conn.local.port())
        && conn.bytes == PAYLOAD;
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
