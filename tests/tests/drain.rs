//! Graceful drain on a real kernel: SIGTERM (or `POST /drain`) makes mesh-node unready, closes
//! its listeners, tells HBONE peers GOAWAY, lets open connections finish until the deadline and
//! exits by itself; what is left at the deadline is cut, counted and logged. Assertions are on
//! what applications see (bytes intact, or a reset) and on what mesh-node says.
use std::{net::SocketAddr, thread, time::Duration};

use mesh_tests::{MeshNode, PodSpec, Topology, http_probe, podapp, privileged, wait_for};

const PORT: u16 = 8080;

fn topology() -> Topology {
    Topology::two_nodes(
        vec![PodSpec::enrolled("client")],
        vec![PodSpec::enrolled("server")],
    )
}

fn sigterm(mesh: &MeshNode) {
    let pid = mesh.pid().expect("running") as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// A transfer from `client` to `target` that holds its connection open for `hold` first.
fn held_transfer(
    topo: &Topology,
    target: SocketAddr,
    bytes: usize,
    hold: Duration,
) -> thread::JoinHandle<podapp::PodRun> {
    let client = topo.pod("client");
    let (netns, cgroup) = (client.netns_path(), client.cgroup.clone());
    thread::spawn(move || {
        podapp::connect_holding(&netns, &cgroup, target, bytes, 1, hold).expect("podapp")
    })
}

#[test]
fn sigterm_lets_open_tunnels_finish_with_goaway_then_exits_by_itself() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("node1");
    // 256 MiB each way takes ~10 s here with a debug build; the deadline leaves room for a
    // loaded CI machine, and the transfer must still finish before it.
    let mut mesh2 =
        MeshNode::start_hbone(&topo, "node2", &["--drain-timeout", "60"]).expect("node2");
    let server = topo.serve("server", PORT);
    let transfer = held_transfer(&topo, server.addr, 256 << 20, Duration::from_secs(2));
    assert!(wait_for(|| http_probe::total(
        &topo.node("node2").netns_path(),
        "mesh_connections_open",
        &[]
    )
    .is_ok_and(|open| open >= 1.0)));

    // The destination node drains while the tunnel is open.
    sigterm(&mesh2);
    let netns2 = topo.node("node2").netns_path();
    assert!(
        wait_for(
            || http_probe::get(&netns2, http_probe::READINESS, "/healthz/ready")
                .is_ok_and(|a| a.status == 503 && a.body.contains("draining"))
        ),
        "readiness turns 503 when draining starts"
    );
    assert!(wait_for(|| !mesh2
        .log_lines_with(&["HBONE connection draining: GOAWAY sent"])
        .is_empty()));
    assert!(mesh2.is_running(), "still serving the open tunnel");

    let run = transfer.join().expect("thread");
    assert!(
        run.errors.is_empty(),
        "{:?}\nnode1:\n{}\nnode2:\n{}",
        run.errors,
        mesh1.log_text(),
        mesh2.log_text()
    );
    assert_eq!(run.ok[0].bytes, 256 << 20, "every byte, both ways");
    assert_eq!(mesh2.wait_exit(Duration::from_secs(30)).expect("exit"), 0);
    assert_eq!(
        mesh2
            .log_lines_with(&["drained: every connection finished"])
            .len(),
        1
    );
    assert!(
        mesh1
            .log_lines_with(&["outbound connection closed", "result=closed"])
            .len()
            == 1,
        "the source saw a clean end: {}",
        mesh1.log_text()
    );
}

#[test]
fn a_connection_still_open_at_the_deadline_is_cut_counted_and_logged() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mut mesh1 =
        MeshNode::start_hbone(&topo, "node1", &["--drain-timeout", "1"]).expect("node1");
    let _mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("node2");
    let server = topo.serve("server", PORT);
    let transfer = held_transfer(&topo, server.addr, 64 * 1024, Duration::from_secs(6));
    assert!(wait_for(|| http_probe::total(
        &topo.node("node1").netns_path(),
        "mesh_connections_open",
        &[]
    )
    .is_ok_and(|open| open >= 1.0)));
    sigterm(&mesh1);
    assert_eq!(mesh1.wait_exit(Duration::from_secs(10)).expect("exit"), 0);
    let cut = mesh1.log_lines_with(&["drain deadline reached", "left=1"]);
    assert_eq!(cut.len(), 1, "{}", mesh1.log_text());
    let run = transfer.join().expect("thread");
    assert_eq!(
        run.errors.len(),
        1,
        "the application learns it was cut: {run:?}"
    );
}

#[test]
fn post_drain_stops_capture_for_new_connections_and_exits_when_idle() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mut mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("node1");
    let mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("node2");
    let server = topo.serve("server", PORT);
    let netns1 = topo.node("node1").netns_path();
    let answer = http_probe::request(&netns1, "POST", http_probe::ADMIN, "/drain").expect("POST");
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(mesh1.wait_exit(Duration::from_secs(10)).expect("exit"), 0);
    assert_eq!(
        mesh1
            .log_lines_with(&["drained: every connection finished"])
            .len(),
        1
    );
    // The listeners are gone, the pins stay: fail-open, so a new connection leaves uncaptured,
    // in plaintext (node2 captures it inbound as it does any plaintext from outside the mesh:
    // no client identity).
    let run = topo.connect_from("client", server.addr, 4096, 1);
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    assert!(wait_for(|| !mesh2
        .log_lines_with(&["connection closed", "src_identity=-"])
        .is_empty()));
    assert!(
        mesh2.log_lines_with(&["sa/client"]).is_empty(),
        "{}",
        mesh2.log_text()
    );
}

/// Stops a process until dropped (SIGSTOP, then SIGCONT even if the test fails).
struct Stopped(libc::pid_t);

impl Stopped {
    fn new(mesh: &MeshNode) -> Self {
        let pid = mesh.pid().expect("running") as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The destination node drains while its pod's reply is still on its way out: the node's
/// part of the tunnel ends once it has handed the last bytes to h2, while the source node —
/// stopped here, as a loaded node may be — has not yet taken them. The draining node exits
/// only once its HBONE socket has been written out and closed without a reset, so the client
/// still reads every byte and a clean end.
#[test]
fn a_drained_node_exits_only_once_its_last_bytes_are_out() {
    if !privileged() {
        return;
    }
    // Under h2's send buffer, so the destination can finish its side with the peer stopped.
    const BYTES: u64 = 768 << 10;
    let topo = topology();
    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("node1");
    let mut mesh2 =
        MeshNode::start_hbone(&topo, "node2", &["--drain-timeout", "20"]).expect("node2");
    let server = topo.pod("server");
    let addr = SocketAddr::new(server.ip.into(), PORT);
    let _source = podapp::Recorder::start(
        &server.netns_path(),
        &server.cgroup,
        &[
            "source".into(),
            addr.to_string(),
            BYTES.to_string(),
            "fin".into(),
            "1500".into(),
        ],
    )
    .expect("source");
    let client = topo.pod("client");
    let (netns, cgroup) = (client.netns_path(), client.cgroup.clone());
    let fetch = thread::spawn(move || {
        let args = ["fetch".into(), addr.to_string(), "half-close".into()];
        podapp::run_client(&netns, &cgroup, &args).expect("fetch")
    });
    assert!(wait_for(|| http_probe::total(
        &topo.node("node2").netns_path(),
        "mesh_connections_open",
        &[]
    )
    .is_ok_and(|open| open >= 1.0)));
    let stopped = Stopped::new(&mesh1);
    sigterm(&mesh2);
    // The reply goes out 1.5 s after the connection opened; node2's side ends soon after.
    let netns2 = topo.node("node2").netns_path();
    let waited = std::time::Instant::now();
    while waited.elapsed() < Duration::from_secs(4)
        && http_probe::total(&netns2, "mesh_connections_open", &[]).is_ok_and(|open| open > 0.0)
    {
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(500));
    drop(stopped);
    let got = fetch.join().expect("thread");
    assert_eq!(
        (got.bytes, got.how.as_str()),
        (BYTES, "eof"),
        "{}",
        mesh2.log_text()
    );
    assert_eq!(mesh2.wait_exit(Duration::from_secs(15)).expect("exit"), 0);
}
