//! Upgrades on a real kernel: a second mesh-node started on a node takes over every listening
//! socket of the one running there (over its hand-over socket, `SCM_RIGHTS`), serves once
//! ready, and the first drains and exits by itself. Under load — two long transfers open
//! across the hand-over and a client opening connections in a loop, to a pod on the same node
//! and one across — nothing is refused or reset and every byte arrives, in fail-closed mode
//! (where a moment without a listener would refuse) and fail-open (where it would go
//! uncaptured: every connection must be in an access log).
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use mesh_tests::{MeshNode, PodSpec, Topology, http_probe, podapp, privileged, wait_for};

const PORT: u16 = 8080;
const STREAM: usize = 16 << 20;

fn topology() -> Topology {
    Topology::two_nodes(
        vec![PodSpec::enrolled("client"), PodSpec::enrolled("local")],
        vec![PodSpec::enrolled("server")],
    )
}

/// A transfer from `client` that holds its connection open for `hold` first.
fn held_transfer(
    topo: &Topology,
    target: SocketAddr,
    hold: Duration,
) -> thread::JoinHandle<podapp::PodRun> {
    let client = topo.pod("client");
    let (netns, cgroup) = (client.netns_path(), client.cgroup.clone());
    thread::spawn(move || {
        podapp::connect_holding(&netns, &cgroup, target, STREAM, 1, hold).expect("podapp")
    })
}

/// Connections opened one batch after another until `stop`: (connections, errors).
fn connection_loop(
    topo: &Topology,
    targets: [SocketAddr; 2],
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(usize, Vec<String>)> {
    let client = topo.pod("client");
    let (netns, cgroup) = (client.netns_path(), client.cgroup.clone());
    thread::spawn(move || {
        let (mut made, mut errors) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            for target in targets {
                let run = podapp::connect(&netns, &cgroup, target, 1024, 2).expect("podapp");
                made += run.ok.len() + run.errors.len();
                errors.extend(run.errors);
                for conn in &run.ok {
                    assert_eq!(conn.bytes, 1024, "{conn:?}");
                }
            }
        }
        (made, errors)
    })
}

fn open_connections(topo: &Topology, node: &str) -> f64 {
    http_probe::total(&topo.node(node).netns_path(), "mesh_connections_open", &[]).unwrap_or(0.0)
}

fn upgrade_under_load(fail_mode: &str) {
    let topo = topology();
    let args = ["--fail-mode", fail_mode, "--drain-timeout", "20"];
    let mut old1 = MeshNode::start_hbone(&topo, "node1", &args).expect("node1");
    let mut old2 = MeshNode::start_hbone(&topo, "node2", &args).expect("node2");
    let remote = topo.serve("server", PORT);
    let local = topo.serve("local", PORT);

    // Two streams opened through the old processes, moving their bytes after both upgrades.
    let streams = [
        held_transfer(&topo, remote.addr, Duration::from_secs(4)),
        held_transfer(&topo, local.addr, Duration::from_secs(4)),
    ];
    assert!(wait_for(|| open_connections(&topo, "node1") >= 2.0));
    let stop = Arc::new(AtomicBool::new(false));
    let looping = connection_loop(&topo, [remote.addr, local.addr], stop.clone());
    thread::sleep(Duration::from_millis(300));

    // Node 1 (outbound 15001, same-node 15006 and 15008), then node 2 (HBONE 15008).
    let new1 = MeshNode::start_hbone(&topo, "node1", &args).expect("successor on node1");
    thread::sleep(Duration::from_millis(300));
    let new2 = MeshNode::start_hbone(&topo, "node2", &args).expect("successor on node2");
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (made, errors) = looping.join().expect("loop");
    assert!(
        errors.is_empty(),
        "{} of {made} refused or reset: {errors:?}",
        errors.len()
    );
    assert!(made >= 20, "the loop ran through the hand-overs: {made}");

    for stream in streams {
        let run = stream.join().expect("stream");
        podapp::assert_all_ok(&run, 1, STREAM);
    }
    for (old, new) in [(&mut old1, &new1), (&mut old2, &new2)] {
        assert_eq!(old.wait_exit(Duration::from_secs(20)).expect("exit"), 0);
        let text = old.log_text();
        assert!(
            text.contains("the successor is ready and accepting: draining"),
            "{text}"
        );
        assert!(
            text.contains("drained: every connection finished"),
            "{text}"
        );
        let took = new.log_lines_with(&["took over its listening sockets"]);
        assert_eq!(took.len(), 1, "{}", new.log_text());
        assert!(
            new.log_lines_with(&["pod enrolled", "from_predecessor=0"])
                .is_empty(),
            "every pod's sockets came from the predecessor: {}",
            new.log_text()
        );
    }

    // Every connection was carried by a mesh-node of node 1 (none went uncaptured), and the
    // successor carried some.
    let carried = |mesh: &MeshNode| mesh.log_lines_with(&["outbound connection closed"]).len();
    eprintln!(
        "fail-{fail_mode}: {made} connections in the loop; node 1 carried {} in the old process, {} in the new",
        carried(&old1),
        carried(&new1)
    );
    assert_eq!(carried(&old1) + carried(&new1), made + 2);
    assert!(carried(&new1) > 0, "{}", new1.log_text());

    // The successors serve alone now, with the admin endpoints.
    let after = topo.connect_from("client", remote.addr, 4096, 4);
    podapp::assert_all_ok(&after, 4, 4096);
    let ready = http_probe::get(
        &topo.node("node1").netns_path(),
        http_probe::READINESS,
        "/healthz/ready",
    )
    .expect("readiness");
    assert_eq!(ready.status, 200, "{ready:?}");
}

#[test]
fn a_successor_takes_over_under_load_with_nothing_refused_fail_closed() {
    if !privileged() {
        return;
    }
    upgrade_under_load("closed");
}

#[test]
fn a_successor_takes_over_under_load_with_nothing_uncaptured_fail_open() {
    if !privileged() {
        return;
    }
    upgrade_under_load("open");
}
