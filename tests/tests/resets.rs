//! A broken connection must look broken, on every path mesh-node carries: a far side that
//! resets (the far application, or a mesh-node that dies) reaches the near application as
//! ECONNRESET after the bytes that made it, never as a clean end of stream; a far side that
//! closes cleanly reaches it as EOF after every byte. Reset connections are reported with the
//! bytes they moved.
use std::{net::SocketAddr, path::Path, thread, time::Duration};

use mesh_tests::{
    MeshNode, PodSpec, Topology,
    control_plane::{ControlPlane, eventually},
    http_probe,
    podapp::{self, Ending, Recorder},
    privileged,
};

const BYTES: u64 = 300_000;
/// `source BYTES reset`, `source BYTES fin`, `sink`, `source endless`.
const RESETS: u16 = 9001;
const FINISHES: u16 = 9002;
const SINK: u16 = 9003;
const ENDLESS: u16 = 9004;

/// node1: `client` and `near` (enrolled); node2: `server` (enrolled) and `outsider` (not in
/// the mesh). Every pod but `client` runs the four servers.
struct Mesh {
    topo: Topology,
    plane: ControlPlane,
    nodes: [MeshNode; 2],
    servers: Vec<(&'static str, u16, Recorder)>,
}

impl Mesh {
    fn start() -> Self {
        let topo = Topology::two_nodes(
            vec![PodSpec::enrolled("client"), PodSpec::enrolled("near")],
            vec![PodSpec::enrolled("server"), PodSpec::plain("outsider")],
        );
        let plane = ControlPlane::on_node1(&topo);
        plane.put_pods(
            &topo,
            &[
                ("client", "node1"),
                ("near", "node1"),
                ("server", "node2"),
                ("outsider", "node2"),
            ],
        );
        let mut servers = Vec::new();
        for pod in ["near", "server", "outsider"] {
            for (port, args) in [
                (RESETS, vec!["source", &BYTES.to_string(), "reset"]),
                (FINISHES, vec!["source", &BYTES.to_string(), "fin"]),
                (SINK, vec!["sink"]),
                (ENDLESS, vec!["source", "endless", "reset"]),
            ] {
                let p = topo.pod(pod);
                let mut argv: Vec<String> = vec![args[0].to_owned()];
                argv.push(SocketAddr::from((p.ip, port)).to_string());
                argv.extend(args[1..].iter().map(|a| (*a).to_owned()));
                let server = Recorder::start(&p.netns_path(), &p.cgroup, &argv)
                    .unwrap_or_else(|e| panic!("start {argv:?} in {pod}: {e}"));
                servers.push((pod, port, server));
            }
        }
        let nodes = [
            plane.start_mesh_node(&topo, "node1"),
            plane.start_mesh_node(&topo, "node2"),
        ];
        Self {
            topo,
            plane,
            nodes,
            servers,
        }
    }

    fn addr(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::from((self.topo.pod(pod).ip, port))
    }

    fn client(&self, pod: &str, args: &[String]) -> Ending {
        let p = self.topo.pod(pod);
        podapp::run_client(&p.netns_path(), &p.cgroup, args).expect("run podapp client")
    }

    fn fetch(&self, from: &str, to: &str, port: u16) -> Ending {
        self.client(from, &["fetch".into(), self.addr(to, port).to_string()])
    }

    fn push(&self, from: &str, to: &str, end: &str) -> Ending {
        self.client(
            from,
            &[
                "push".into(),
                self.addr(to, SINK).to_string(),
                BYTES.to_string(),
                end.into(),
            ],
        )
    }

    fn sink(&self, pod: &str) -> &Recorder {
        self.servers
            .iter()
            .find(|(p, port, _)| *p == pod && *port == SINK)
            .map(|(_, _, r)| r)
            .unwrap()
    }

    /// The sink's next ending after the `seen` it had.
    fn next_sink_ending(&self, pod: &str, seen: usize) -> Ending {
        let mut endings = Vec::new();
        eventually("the sink to see the connection end", || {
            endings = self.sink(pod).endings();
            endings.len() > seen
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n{}\n{}",
                self.nodes[0].log_text(),
                self.nodes[1].log_text()
            )
        });
        endings[seen].clone()
    }

    fn logs(&self) -> String {
        format!(
            "--- node1\n{}\n--- node2\n{}",
            self.nodes[0].log_text(),
            self.nodes[1].log_text()
        )
    }
}

fn ending(bytes: u64, how: &str) -> Ending {
    Ending {
        bytes,
        how: how.to_owned(),
    }
}

fn bytes_total(node_netns: &Path, metric: &str, reporter: &str) -> f64 {
    http_probe::total(node_netns, metric, &[&format!("reporter=\"{reporter}\"")]).unwrap_or(0.0)
}

#[test]
fn far_ends_reach_the_near_application_as_they_happened_on_every_path() {
    if !privileged() {
        return;
    }
    let mesh = Mesh::start();
    let node1 = mesh.topo.node("node1").netns_path();
    let node2 = mesh.topo.node("node2").netns_path();
    // (client, server, path)
    let paths = [
        ("client", "server", "HBONE"),
        ("client", "near", "same-node"),
        ("client", "outsider", "passthrough"),
        ("outsider", "server", "plaintext inbound"),
    ];
    for (from, to, path) in paths {
        // The server resets after BYTES: the client reads them all, then a reset.
        let sent_before = bytes_total(&node1, "istio_tcp_sent_bytes_total", "source");
        let got = mesh.fetch(from, to, RESETS);
        assert_eq!(
            got,
            ending(BYTES, "reset"),
            "{path}: far reset\n{}",
            mesh.logs()
        );
        if path == "HBONE" {
            // The reset connection is reported with the bytes it carried, on both sides.
            eventually("node1 to report the reset connection's bytes", || {
                bytes_total(&node1, "istio_tcp_sent_bytes_total", "source") - sent_before
                    == BYTES as f64
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", mesh.logs()));
            let line = mesh.nodes[0]
                .log_lines_with(&["outbound connection reset", "result=reset"])
                .pop()
                .unwrap_or_else(|| panic!("no reset access line\n{}", mesh.logs()));
            assert!(line.contains(&format!("bytes_received={BYTES}")), "{line}");
        }
        // The server closes cleanly after BYTES: every byte, then EOF.
        let got = mesh.fetch(from, to, FINISHES);
        assert_eq!(
            got,
            ending(BYTES, "eof"),
            "{path}: clean end\n{}",
            mesh.logs()
        );

        // The client resets after BYTES: the server reads them all, then a reset.
        let seen = mesh.sink(to).endings().len();
        let received_before = bytes_total(&node2, "istio_tcp_received_bytes_total", "destination");
        assert_eq!(mesh.push(from, to, "reset"), ending(BYTES, "done"));
        assert_eq!(
            mesh.next_sink_ending(to, seen),
            ending(BYTES, "reset"),
            "{path}: near reset seen by the server\n{}",
            mesh.logs()
        );
        if to == "server" {
            eventually("node2 to report the reset connection's bytes", || {
                bytes_total(&node2, "istio_tcp_received_bytes_total", "destination")
                    - received_before
                    == BYTES as f64
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", mesh.logs()));
        }
        // And a clean end: every byte, then EOF.
        assert_eq!(mesh.push(from, to, "fin"), ending(BYTES, "done"));
        assert_eq!(
            mesh.next_sink_ending(to, seen + 1),
            ending(BYTES, "eof"),
            "{path}: clean end seen by the server\n{}",
            mesh.logs()
        );
    }
}

/// Runs `fetch` (or `push`) from `pod` on a thread, so the test can break things under it.
fn in_background(mesh: &Mesh, pod: &str, args: Vec<String>) -> thread::JoinHandle<Ending> {
    let p = mesh.topo.pod(pod);
    let (netns, cgroup) = (p.netns_path(), p.cgroup.clone());
    thread::spawn(move || podapp::run_client(&netns, &cgroup, &args).expect("podapp client"))
}

/// Waits until `node` has opened `n` connections of `reporter` in all, and the transfer is
/// under way.
fn wait_opened(mesh: &Mesh, node: &str, reporter: &str, n: f64) {
    let netns = mesh.topo.node(node).netns_path();
    eventually("the connection to open", || {
        http_probe::total(
            &netns,
            "istio_tcp_connections_opened_total",
            &[&format!("reporter=\"{reporter}\"")],
        )
        .unwrap_or(0.0)
            >= n
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.logs()));
    thread::sleep(Duration::from_millis(300));
}

#[test]
fn a_mesh_node_that_dies_mid_transfer_resets_the_applications_on_both_sides() {
    if !privileged() {
        return;
    }
    let mut mesh = Mesh::start();

    // The server's node proxy is killed while the client downloads through it: the client's
    // node resets the client; nothing is taken for a complete transfer.
    let download = in_background(
        &mesh,
        "client",
        vec!["fetch".into(), mesh.addr("server", ENDLESS).to_string()],
    );
    wait_opened(&mesh, "node1", "source", 1.0);
    mesh.nodes[1].kill().unwrap();
    let got = download.join().unwrap();
    assert_eq!(got.how, "reset", "{got:?}\n{}", mesh.logs());
    assert!(got.bytes > 0, "{got:?}");
    mesh.nodes[1] = mesh.plane.start_mesh_node(&mesh.topo, "node2");

    // The client's node proxy is killed while the client uploads: the server's node resets
    // the server, and the kernel resets the client (its socket was armed to).
    let seen = mesh.sink("server").endings().len();
    let upload = in_background(
        &mesh,
        "client",
        vec![
            "push".into(),
            mesh.addr("server", SINK).to_string(),
            "endless".into(),
            "fin".into(),
        ],
    );
    wait_opened(&mesh, "node2", "destination", 1.0);
    mesh.nodes[0].kill().unwrap();
    let server_saw = mesh.next_sink_ending("server", seen);
    assert_eq!(server_saw.how, "reset", "{server_saw:?}\n{}", mesh.logs());
    assert!(server_saw.bytes > 0);
    let client_saw = upload.join().unwrap();
    assert_eq!(client_saw.how, "reset", "{client_saw:?}");
    mesh.nodes[0] = mesh.plane.start_mesh_node(&mesh.topo, "node1");

    // A same-node download while the node proxy shuts down (SIGTERM): reset, not EOF.
    let download = in_background(
        &mesh,
        "client",
        vec!["fetch".into(), mesh.addr("near", ENDLESS).to_string()],
    );
    wait_opened(&mesh, "node1", "source", 1.0);
    mesh.nodes[0].stop().unwrap();
    let got = download.join().unwrap();
    assert_eq!(got.how, "reset", "{got:?}\n{}", mesh.logs());
}

/// The destination node vanishes mid-tunnel (every packet to it dropped, no reset, no FIN):
/// the HBONE keepalive notices within its interval plus its timeout (10 s + 20 s), and the
/// application is reset — not left hanging, not told the stream ended. The dead connection
/// leaves the pool, so once the node is reachable again a new tunnel opens and traffic flows.
#[test]
fn a_peer_node_that_vanishes_mid_tunnel_is_given_up_by_the_keepalive() {
    if !privileged() {
        return;
    }
    let mesh = Mesh::start();
    let download = in_background(
        &mesh,
        "client",
        vec!["fetch".into(), mesh.addr("server", ENDLESS).to_string()],
    );
    wait_opened(&mesh, "node1", "source", 1.0);
    let established = |mesh: &Mesh| {
        mesh.nodes[0]
            .log_lines_with(&["HBONE connection established"])
            .len()
    };
    assert_eq!(established(&mesh), 1);

    // node2 drops off the network: node1 discards whatever it would forward there.
    let node1 = mesh.topo.node("node1").netns.clone();
    mesh_tests::topology::ip(&[
        "-n",
        &node1,
        "route",
        "replace",
        "blackhole",
        "198.18.2.0/24",
    ])
    .expect("blackhole node2's pods");
    let cut = std::time::Instant::now();
    let got = download.join().unwrap();
    let waited = cut.elapsed();
    assert_eq!(got.how, "reset", "{got:?}\n{}", mesh.logs());
    assert!(got.bytes > 0, "{got:?}");
    assert!(
        waited <= Duration::from_secs(40),
        "given up within the keepalive interval and timeout: {waited:?}"
    );
    assert!(
        !mesh.nodes[0]
            .log_lines_with(&["HBONE connection ended", "PING"])
            .is_empty(),
        "{}",
        mesh.logs()
    );

    // Back on the network: the next connection opens a new tunnel and completes.
    mesh_tests::topology::ip(&[
        "-n",
        &node1,
        "route",
        "replace",
        "198.18.2.0/24",
        "via",
        "198.19.0.2",
    ])
    .expect("route to node2's pods again");
    let again = mesh.push("client", "server", "fin");
    assert_eq!(again, ending(BYTES, "done"), "{}", mesh.logs());
    assert_eq!(established(&mesh), 2, "{}", mesh.logs());
}
