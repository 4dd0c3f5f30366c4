//! mesh-node driven by a control plane over delta ADS (the test control plane in
//! `mesh_tests::control_plane`, a real gRPC server with TLS): service VIPs load-balanced over
//! their endpoints, endpoint and preference changes pushed mid-test, NACKs, and a control-plane
//! restart. Assertions are on what users see: connections that succeed or fail, and which
//! endpoint each one reached according to mesh-node's connection log.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::Duration,
};

use mesh_node::xds::proto::{ADDRESS_TYPE, workload as pb};
use mesh_tests::{
    MeshNode, PodSpec, Topology,
    control_plane::{ControlPlane, TOKEN, eventually, pod_workload},
    http_probe, podapp, privileged,
};

const SERVICE: &str = "default/echo.default.svc.cluster.local";
const VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);
const TARGET_PORT: u16 = 8080;

struct Mesh {
    topo: Topology,
    plane: ControlPlane,
    nodes: Vec<MeshNode>,
}

impl Mesh {
    /// `node1_pods` and `node2_pods` are all enrolled; every pod runs the echo server.
    fn start(
        node1_pods: &[&'static str],
        node2_pods: &[&'static str],
        service: pb::Service,
    ) -> (Self, Vec<podapp::Server>) {
        let topo = Topology::two_nodes(
            node1_pods.iter().map(|p| PodSpec::enrolled(p)).collect(),
            node2_pods.iter().map(|p| PodSpec::enrolled(p)).collect(),
        );
        let plane = ControlPlane::on_node1(&topo);
        let mut servers = Vec::new();
        for pod in node1_pods.iter().chain(node2_pods) {
            servers.push(topo.serve(pod, TARGET_PORT));
        }
        let mut mesh = Self {
            topo,
            plane,
            nodes: Vec::new(),
        };
        for pod in node1_pods {
            mesh.plane.put_workload(mesh.workload(pod, "node1", |_| {}));
        }
        for pod in node2_pods {
            mesh.plane.put_workload(mesh.workload(pod, "node2", |_| {}));
        }
        mesh.plane.put_service(service);
        for node in ["node1", "node2"] {
            let mut args = mesh.plane.client_args(&mesh.topo, node);
            args.extend([
                "--ca-dir".to_owned(),
                mesh.topo.ca_dir().display().to_string(),
            ]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            mesh.nodes
                .push(MeshNode::start(&mesh.topo, node, &args).expect("start mesh-node"));
        }
        (mesh, servers)
    }

    fn uid(pod: &str) -> String {
        format!("cluster1//Pod/default/{pod}")
    }

    /// The workload for a pod; endpoints (names starting "ep" or "near") serve the service.
    fn workload(
        &self,
        pod: &str,
        node: &str,
        edit: impl FnOnce(&mut pb::Workload),
    ) -> pb::Workload {
        let mut w = pod_workload(&self.topo, pod, node);
        if pod.starts_with("ep") || pod.starts_with("near") {
            w.services.insert(
                SERVICE.into(),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: 80,
                        target_port: TARGET_PORT.into(),
                        ..Default::default()
                    }],
                },
            );
        }
        edit(&mut w);
        w
    }

    fn node1(&self) -> &MeshNode {
        &self.nodes[0]
    }

    /// Outbound connections node1's mesh-node has captured so far (open or ended), by its own
    /// metrics.
    fn captured_on_node1(&self) -> f64 {
        http_probe::total(
            &self.topo.node("node1").netns_path(),
            "istio_tcp_connections_opened_total",
            &[r#"reporter="source""#],
        )
        .unwrap_or(0.0)
    }

    /// Connections from `client` to the VIP.
    fn connect(&self, conns: usize) -> podapp::PodRun {
        self.topo.connect_from("client", VIP, 1024, conns)
    }

    /// Closed connections per endpoint pod, from node1's connection log.
    fn endpoint_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for line in self
            .node1()
            .log_lines_with(&["outbound connection closed", "original_dst=10.96.0.10:80"])
        {
            for node in &self.topo.nodes {
                for pod in &node.pods {
                    if line.contains(&format!(" dst={}:{TARGET_PORT}", pod.ip)) {
                        *counts.entry(pod.name.to_owned()).or_default() += 1;
                    }
                }
            }
        }
        counts
    }

    /// Closed connections per endpoint pod, once `n` more than in `before` have been logged.
    fn counts_after(&self, before: &HashMap<String, usize>, n: usize) -> HashMap<String, usize> {
        let total = |c: &HashMap<String, usize>| c.values().sum::<usize>();
        let mut counts = HashMap::new();
        mesh_tests::wait_for(|| {
            counts = self.endpoint_counts();
            total(&counts) >= total(before) + n
        });
        counts
    }

    /// Waits until node1 has applied `n` xDS updates in all.
    fn wait_applied(&self, n: usize) {
        eventually("node1 to apply the xDS update", || {
            self.node1().log_lines_with(&["xDS update applied"]).len() >= n
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.node1().log_text()));
    }

    fn applied(&self) -> usize {
        self.node1().log_lines_with(&["xDS update applied"]).len()
    }
}

fn service(lb: Option<pb::LoadBalancing>) -> pb::Service {
    pb::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 10],
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: TARGET_PORT.into(),
            ..Default::default()
        }],
        load_balancing: lb,
        ..Default::default()
    }
}

fn all_ok(run: &podapp::PodRun, conns: usize) {
    assert!(run.errors.is_empty(), "connection errors: {:?}", run.errors);
    assert_eq!(run.ok.len(), conns);
}

fn delta(after: &HashMap<String, usize>, before: &HashMap<String, usize>, pod: &str) -> usize {
    after.get(pod).copied().unwrap_or(0) - before.get(pod).copied().unwrap_or(0)
}

#[test]
fn service_traffic_follows_capacity_and_endpoint_removal_spares_open_connections() {
    if !privileged() {
        return;
    }
    let (mesh, _servers) = Mesh::start(&["client"], &["ep-a", "ep-b", "ep-c"], service(None));
    mesh.plane
        .put_workload(mesh.workload("ep-c", "node2", |w| w.capacity = Some(4)));
    mesh.wait_applied(3);

    // The proxy speaks to the control plane as istiod expects of a node proxy.
    let seen = mesh.plane.seen();
    assert!(
        seen.authorization
            .iter()
            .all(|a| *a == format!("Bearer {TOKEN}")),
        "{seen:?}"
    );
    assert!(seen.cluster_ids.iter().all(|c| c == "cluster1"), "{seen:?}");
    assert!(
        seen.node_ids.iter().all(|id| id.starts_with("ztunnel~")),
        "{seen:?}"
    );
    assert!(seen.acks >= 4 && seen.nacks.is_empty(), "{seen:?}");

    let run = mesh.connect(200);
    all_ok(&run, 200);
    assert!(
        run.ok.iter().all(|c| c.peer == VIP),
        "the application sees the VIP"
    );
    let counts = mesh.counts_after(&HashMap::new(), 200);
    assert_eq!(counts.values().sum::<usize>(), 200, "{counts:?}");
    // capacity 1 : 1 : 4 → expected 33 : 33 : 133 (standard deviations 5.3 and 6.7). The bounds
    // are about 3.5 deviations wide, and an even split (67 each) falls far outside them.
    assert!((110..=156).contains(&counts["ep-c"]), "{counts:?}");
    for pod in ["ep-a", "ep-b"] {
        assert!((14..=52).contains(&counts[pod]), "{counts:?}");
    }

    // Connections that are open when ep-a is removed are not cut...
    let before = mesh.endpoint_counts();
    let (netns, cgroup) = (
        mesh.topo.pod("client").netns_path(),
        mesh.topo.pod("client").cgroup.clone(),
    );
    let held = thread::spawn(move || {
        podapp::connect_holding(&netns, &cgroup, VIP, 64 * 1024, 24, Duration::from_secs(5))
            .expect("held connections")
    });
    eventually("24 held connections to be captured", || {
        mesh.captured_on_node1() >= 224.0
    })
    .unwrap();
    thread::sleep(Duration::from_millis(500));
    let applied = mesh.applied();
    mesh.plane.remove(&Mesh::uid("ep-a"));
    mesh.wait_applied(applied + 1);

    // ...and new connections no longer reach it.
    all_ok(&mesh.connect(60), 60);
    let after_new = mesh.counts_after(&before, 60);
    assert_eq!(delta(&after_new, &before, "ep-a"), 0, "{after_new:?}");
    assert_eq!(
        delta(&after_new, &before, "ep-b") + delta(&after_new, &before, "ep-c"),
        60
    );

    all_ok(&held.join().unwrap(), 24);
    let after_held = mesh.counts_after(&after_new, 24);
    assert!(
        delta(&after_held, &after_new, "ep-a") > 0,
        "some held connections were on ep-a and finished after its removal: {after_held:?}"
    );
}

#[test]
fn routing_preference_fails_over_and_strict_refuses() {
    if !privileged() {
        return;
    }
    use pb::load_balancing::{Mode, Scope};
    let preference = |mode: Mode| {
        Some(pb::LoadBalancing {
            routing_preference: vec![Scope::Node as i32],
            mode: mode as i32,
            ..Default::default()
        })
    };
    let (mesh, _servers) = Mesh::start(
        &["client", "near"],
        &["ep-far"],
        service(preference(Mode::Failover)),
    );

    let only = |run: podapp::PodRun, conns: usize, before: &HashMap<String, usize>, pod: &str| {
        all_ok(&run, conns);
        let after = mesh.counts_after(before, conns);
        assert_eq!(delta(&after, before, pod), conns, "{after:?}");
    };
    let before = mesh.endpoint_counts();
    only(mesh.connect(20), 20, &before, "near");
    assert_eq!(
        mesh.node1().log_lines_with(&["route=local", " dst="]).len(),
        20
    );

    let applied = mesh.applied();
    mesh.plane.remove(&Mesh::uid("near"));
    mesh.wait_applied(applied + 1);
    let before = mesh.endpoint_counts();
    only(mesh.connect(20), 20, &before, "ep-far");

    let applied = mesh.applied();
    mesh.plane.put_service(service(preference(Mode::Strict)));
    mesh.wait_applied(applied + 1);
    let run = mesh.connect(10);
    assert_eq!(
        run.errors.len(),
        10,
        "STRICT with no same-node endpoint refuses: {:?}",
        run.ok
    );
    assert!(
        mesh.node1()
            .log_lines_with(&["outbound connection refused", "STRICT routing preference"])
            .len()
            == 10,
        "{}",
        mesh.node1().log_text()
    );

    let applied = mesh.applied();
    mesh.plane
        .put_workload(mesh.workload("near", "node1", |_| {}));
    mesh.wait_applied(applied + 1);
    let before = mesh.endpoint_counts();
    only(mesh.connect(10), 10, &before, "near");
}

#[test]
fn a_bad_resource_is_nacked_by_name_and_the_rest_of_its_response_applies() {
    if !privileged() {
        return;
    }
    let (mut mesh, _servers) = Mesh::start(&["client"], &["ep-a", "ep-b", "ep-c"], service(None));
    all_ok(&mesh.connect(5), 5);

    // Bytes that are not a protobuf message: NACKed by name.
    mesh.plane
        .put_raw_address("default/garbage", vec![0xff, 0xff, 0xff]);
    eventually("a NACK", || !mesh.plane.seen().nacks.is_empty()).unwrap();
    let nack = mesh.plane.seen().nacks[0].clone();
    assert!(
        nack.starts_with("resource \"default/garbage\": decode:"),
        "{nack}"
    );
    // Both nodes take the stream; the NACK above may be node2's. node1 must have refused it
    // too before it goes, or (on a loaded machine) node1 never sees it and counts two below.
    eventually("node1 to refuse the garbage", || {
        !mesh
            .node1()
            .log_lines_with(&["xDS resource rejected (NACK)", "default/garbage"])
            .is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.node1().log_text()));
    mesh.plane.remove("default/garbage");

    // One response, as istiod would send it: ep-b drained (capacity 0), ep-c removed, and two
    // resources that cannot be used (an address of 3 bytes; a sidecar-mTLS workload). istiod
    // sends only changes afterwards, so the good part must apply now or never.
    let mut broken = mesh.workload("ep-a", "node2", |w| w.addresses = vec![vec![10, 0, 0]]);
    broken.uid = "cluster1//Pod/default/broken".into();
    let mut legacy = mesh.workload("ep-a", "node2", |w| {
        w.tunnel_protocol = pb::TunnelProtocol::LegacyIstioMtls as i32;
        w.addresses = vec![vec![198, 18, 9, 9]];
    });
    legacy.uid = "cluster1//Pod/default/legacy".into();
    let drained = mesh.workload("ep-b", "node2", |w| w.capacity = Some(0));
    let applied = mesh.applied();
    mesh.plane
        .change_workloads(vec![drained, broken, legacy], &[&Mesh::uid("ep-c")]);
    mesh.wait_applied(applied + 1);
    let nack = eventually("a NACK naming both bad resources", || {
        mesh.plane.seen().nacks.iter().any(|n| {
            n.contains("resource \"cluster1//Pod/default/broken\"")
                && n.contains("addresses[0]: 3 bytes is not an IPv4 (4) or IPv6 (16) address")
                && n.contains("resource \"cluster1//Pod/default/legacy\"")
                && n.contains("LEGACY_ISTIO_MTLS")
        })
    });
    nack.unwrap_or_else(|e| panic!("{e}: {:?}", mesh.plane.seen().nacks));
    let rejected_lines = mesh.node1().log_lines_with(&[
        "xDS resource rejected (NACK)",
        "cluster1//Pod/default/broken",
    ]);
    assert_eq!(rejected_lines.len(), 1, "{}", mesh.node1().log_text());
    assert!(
        !mesh
            .node1()
            .log_lines_with(&["xDS update applied", "changed=1", "removed=1", "rejected=2"])
            .is_empty(),
        "{}",
        mesh.node1().log_text()
    );
    // The good part applied: only ep-a is left to serve.
    let before = mesh.counts_after(&HashMap::new(), 5);
    all_ok(&mesh.connect(20), 20);
    assert_eq!(delta(&mesh.counts_after(&before, 20), &before, "ep-a"), 20);

    // Readiness is not held back by the refused resources, and names them; so do the
    // metrics.
    let netns = mesh.topo.node("node1").netns_path();
    let ready = http_probe::get(&netns, http_probe::READINESS, "/healthz/ready").unwrap();
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(
        ready.body.contains("cluster1//Pod/default/broken") && ready.body.contains("legacy"),
        "{}",
        ready.body
    );
    let exposition = http_probe::scrape(&netns).unwrap();
    let gauge = |name: &str| {
        http_probe::sample(
            &exposition,
            "mesh_xds_rejected_resource",
            &[&format!("name=\"{name}\"")],
        )
        .unwrap()
    };
    assert_eq!(
        gauge("cluster1//Pod/default/broken"),
        Some(1.0),
        "{exposition}"
    );
    let rejections = http_probe::total(&netns, "mesh_xds_rejected_resources_total", &[]).unwrap();
    assert!(rejections >= 3.0, "{exposition}");
    let dump = http_probe::get(&netns, http_probe::ADMIN, "/config_dump").unwrap();
    assert!(
        dump.body.contains("\"rejected_resources\"") && dump.body.contains("3 bytes is not"),
        "{}",
        dump.body
    );

    // A fresh node whose very first response carries the bad resources becomes ready.
    mesh.nodes[0].stop().unwrap();
    let mut args = mesh.plane.client_args(&mesh.topo, "node1");
    args.extend([
        "--ca-dir".to_owned(),
        mesh.topo.ca_dir().display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    mesh.nodes[0] = MeshNode::start(&mesh.topo, "node1", &args)
        .expect("a fresh node with refused resources becomes ready");
    let ready = http_probe::get(&netns, http_probe::READINESS, "/healthz/ready").unwrap();
    assert_eq!(ready.status, 200, "{}", ready.body);

    // Good versions mend them: the metric and the readiness note go.
    let mended = mesh.workload("ep-b", "node2", |w| {
        w.uid = "cluster1//Pod/default/broken".into()
    });
    mesh.plane
        .change_workloads(vec![mended], &["cluster1//Pod/default/legacy"]);
    eventually("the refusals to be taken back", || {
        let ready = http_probe::get(&netns, http_probe::READINESS, "/healthz/ready").unwrap();
        ready.status == 200 && !ready.body.contains("rejected")
    })
    .unwrap();
    let exposition = http_probe::scrape(&netns).unwrap();
    assert_eq!(gauge_in(&exposition, "cluster1//Pod/default/broken"), None);
    assert!(mesh.nodes.iter_mut().all(|m| m.is_running()));
}

fn gauge_in(exposition: &str, name: &str) -> Option<f64> {
    http_probe::sample(
        exposition,
        "mesh_xds_rejected_resource",
        &[&format!("name=\"{name}\"")],
    )
    .unwrap()
}

/// A ServiceEntry-style VIP range (`NetworkAddress.length`, field 3): every address in it is
/// the service, load-balanced over its endpoints; one outside it is not.
#[test]
fn every_address_of_a_cidr_vip_is_load_balanced() {
    if !privileged() {
        return;
    }
    let mut range = service(None);
    range.addresses = vec![pb::NetworkAddress {
        network: String::new(),
        address: vec![10, 100, 0, 0],
        length: Some(16),
    }];
    let (mesh, _servers) = Mesh::start(&["client"], &["ep-a", "ep-b"], range);
    let targets = ["10.100.0.1:80", "10.100.7.9:80", "10.100.255.254:80"];
    for target in targets {
        let target: SocketAddr = target.parse().unwrap();
        let run = mesh.topo.connect_from("client", target, 1024, 20);
        all_ok(&run, 20);
        assert!(
            run.ok.iter().all(|c| c.peer == target),
            "the application sees its address"
        );
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    mesh_tests::wait_for(|| {
        counts.clear();
        for line in mesh
            .node1()
            .log_lines_with(&["outbound connection closed", "route=hbone"])
        {
            for pod in ["ep-a", "ep-b"] {
                let ip = mesh.topo.pod(pod).ip;
                if line.contains(&format!(" dst={ip}:{TARGET_PORT}")) {
                    *counts.entry(pod).or_default() += 1;
                }
            }
        }
        counts.values().sum::<usize>() >= 60
    });
    assert_eq!(counts.values().sum::<usize>(), 60, "{counts:?}");
    assert!(
        counts.values().all(|n| *n >= 10),
        "both endpoints serve: {counts:?}"
    );
}

#[test]
fn control_plane_restart_resyncs_without_disturbing_traffic() {
    if !privileged() {
        return;
    }
    let (mut mesh, _servers) = Mesh::start(&["client"], &["ep-a", "ep-b"], service(None));
    all_ok(&mesh.connect(10), 10);

    let (netns, cgroup) = (
        mesh.topo.pod("client").netns_path(),
        mesh.topo.pod("client").cgroup.clone(),
    );
    let held = thread::spawn(move || {
        podapp::connect_holding(&netns, &cgroup, VIP, 64 * 1024, 6, Duration::from_secs(4))
            .expect("held connections")
    });
    eventually("held connections to be captured", || {
        mesh.captured_on_node1() >= 16.0
    })
    .unwrap();

    mesh.plane.stop();
    eventually("node1 to notice the control plane is gone", || {
        !mesh
            .node1()
            .log_lines_with(&["xDS stream"])
            .iter()
            .all(|l| l.contains("xDS stream open"))
    })
    .unwrap();
    // With the control plane down, the last state keeps serving, and readiness does not flap:
    // a node that has synced once stays ready through the outage and its reconnect attempts.
    let node_netns = mesh.topo.node("node1").netns_path();
    let ready_during_outage = || {
        let ready = http_probe::get(&node_netns, http_probe::READINESS, "/healthz/ready")
            .expect("readiness answers");
        assert_eq!(
            ready.status, 200,
            "ready while the control plane is gone: {}",
            ready.body
        );
    };
    ready_during_outage();
    all_ok(&mesh.connect(20), 20);
    for _ in 0..10 {
        ready_during_outage();
        thread::sleep(Duration::from_millis(200));
    }
    // A change made while the client was away...
    mesh.plane.remove(&Mesh::uid("ep-b"));
    let applied = mesh.applied();
    mesh.plane.resume().expect("restart control plane");
    // ...arrives when it reconnects and resumes from the versions it holds.
    mesh.wait_applied(applied + 1);
    let seen = mesh.plane.seen();
    let resumed = seen
        .initial_versions
        .iter()
        .rev()
        .find(|(type_url, _)| type_url == ADDRESS_TYPE)
        .unwrap();
    assert!(
        resumed.1.contains_key(&Mesh::uid("ep-b")),
        "the reconnect announced what the client held: {resumed:?}"
    );
    // The held connections lived through the restart.
    all_ok(&held.join().unwrap(), 6);
    let before = mesh.counts_after(&HashMap::new(), 10 + 6 + 20);
    all_ok(&mesh.connect(20), 20);
    assert_eq!(delta(&mesh.counts_after(&before, 20), &before, "ep-a"), 20);
}

/// Keeps the scale benchmark (`cargo xtask bench xds`) working; asserts what it reports, never
/// how fast.
#[test]
fn scale_benchmark_smoke() {
    if !privileged() {
        return;
    }
    let out = std::env::temp_dir().join(format!("xds-scale-smoke-{}.json", std::process::id()));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_xds-scale"))
        .arg("200")
        .env("XDS_SCALE_OUT", &out)
        .output()
        .expect("run xds-scale");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("\n| 200 | 20 |"), "{stdout}");
    let json = std::fs::read_to_string(&out).expect("JSON results");
    let _ = std::fs::remove_file(&out);
    assert!(json.contains("\"workloads\":200,\"services\":20"), "{json}");
}
