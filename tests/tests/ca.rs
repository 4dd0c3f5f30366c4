//! Workload certificates from istiod's CA protocol (the test CA in `mesh_tests::ca_server`, a
//! real gRPC server with TLS): fetched when pods are enrolled, rotated under traffic without a
//! failed connection, and a CA that is down at start reported, retried and recovered from.
use std::{
    collections::HashSet,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    MeshNode, PodSpec, Server, Topology, ca_server::TestCa, hbone_client, privileged,
};

const PORT: u16 = 8080;
const CA: &str = "198.19.0.1:15012";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// node1: `client` (enrolled), `prober` (outside the mesh, for direct handshakes); node2:
/// `server` (enrolled). The CA listens on node1.
fn topology() -> Topology {
    Topology::two_nodes(
        vec![PodSpec::enrolled("client"), PodSpec::plain("prober")],
        vec![PodSpec::enrolled("server")],
    )
}

/// mesh-node on `node`, workloads from the local file, certificates from `ca`.
fn start(topo: &Topology, node: &str, ca: &TestCa) -> MeshNode {
    let mut args = ca.client_args(topo);
    args.extend([
        "--local-xds".into(),
        topo.state_file().display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    MeshNode::start(topo, node, &args).expect("start mesh-node")
}

fn issued_to(ca: &TestCa, id: &str) -> usize {
    ca.seen().issued.iter().filter(|i| *i == id).count()
}

#[test]
fn certificates_are_fetched_at_enrollment_and_rotate_under_traffic_without_a_failed_connection() {
    if !privileged() {
        return;
    }
    let topo = topology();
    // Four-second certificates: renewed about every two seconds.
    let ca = TestCa::start(
        &topo.node("node1").netns_path(),
        CA.parse().unwrap(),
        &topo.ca_dir(),
        Duration::from_secs(4),
    )
    .expect("start CA");
    let node1 = start(&topo, "node1", &ca);
    let node2 = start(&topo, "node2", &ca);
    let server: Server = topo.serve("server", PORT);

    // Before any connection: each node asked for its pod's certificate on enrollment.
    assert!(
        mesh_tests::wait_for(|| issued_to(&ca, CLIENT_ID) >= 1 && issued_to(&ca, SERVER_ID) >= 1),
        "no certificate fetched at enrollment: {:?}\n{}",
        ca.seen(),
        node1.log_text()
    );
    let seen = ca.seen();
    assert!(seen.cluster_ids.iter().all(|c| c == "cluster1"), "{seen:?}");
    assert!(seen.refused.is_empty(), "{seen:?}");

    // Traffic for about 12 s (several lifetimes): pooled mesh connections from `client`, and
    // fresh handshakes to the server's 15008 that check the certificate it presents is valid.
    let probe = hbone_client::client_config(&topo.ca_dir(), CLIENT_ID, SERVER_ID).unwrap();
    let hbone: SocketAddr = (topo.pod("server").ip, 15008).into();
    let mut failures = Vec::new();
    let mut server_certs = HashSet::new();
    let (mut connections, mut probes) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        let run = topo.connect_from("client", server.addr, 16 * 1024, 4);
        connections += run.ok.len() + run.errors.len();
        failures.extend(run.errors);
        let presented = hbone_client::run_in(&topo.pod("prober").netns_path(), || {
            hbone_client::server_certificate(probe.clone(), hbone)
        })
        .expect("probe thread");
        probes += 1;
        match presented {
            Ok(cert) => {
                server_certs.insert(cert.to_vec());
            }
            Err(error) => failures.push(format!("handshake with the server: {error:#}")),
        }
        thread::sleep(Duration::from_millis(300));
    }
    assert!(
        failures.is_empty(),
        "{} of {connections} connections and probes failed: {failures:?}\n{}",
        failures.len(),
        node2.log_text()
    );
    // Rotated: several certificates for each identity, and the server presented several.
    let seen = ca.seen();
    eprintln!(
        "{connections} connections and {} probes in 12 s; the server presented {} certificates; \
         the CA issued {} to the client and {} to the server",
        probes,
        server_certs.len(),
        issued_to(&ca, CLIENT_ID),
        issued_to(&ca, SERVER_ID)
    );
    for id in [CLIENT_ID, SERVER_ID] {
        assert!(issued_to(&ca, id) >= 4, "{id}: {seen:?}");
    }
    assert!(
        server_certs.len() >= 3,
        "the server presented {} certificates",
        server_certs.len()
    );
    for node in [&node1, &node2] {
        assert!(
            node.log_lines_with(&["certificate", "failed"]).is_empty(),
            "{}",
            node.log_text()
        );
    }
}

#[test]
fn a_ca_down_at_start_is_reported_retried_and_recovered_from() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mut ca = TestCa::stopped(
        &topo.node("node1").netns_path(),
        CA.parse().unwrap(),
        &topo.ca_dir(),
        Duration::from_secs(3600),
    )
    .expect("prepare CA");
    let node1 = start(&topo, "node1", &ca);
    let _node2 = start(&topo, "node2", &ca);
    let server = topo.serve("server", PORT);

    // The failure is logged with the identity, the CA and why; and retried.
    assert!(
        mesh_tests::wait_for(|| {
            node1
                .log_lines_with(&["certificate fetch failed", CLIENT_ID, "istiod CA"])
                .len()
                >= 2
        }),
        "{}",
        node1.log_text()
    );
    let line = &node1.log_lines_with(&["certificate fetch failed"])[0];
    eprintln!("{line}");
    assert!(
        line.contains("Unavailable") && line.contains("retry_in_ms"),
        "{line}"
    );
    // Not ready while the enrolled pod has no certificate, and the endpoint says why.
    let netns1 = topo.node("node1").netns_path();
    let ready = || {
        mesh_tests::http_probe::get(&netns1, mesh_tests::http_probe::READINESS, "/healthz/ready")
            .expect("readiness endpoint")
    };
    let answer = ready();
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(
        answer
            .body
            .contains(&format!("no certificate for {CLIENT_ID}")),
        "{answer:?}"
    );
    // Meanwhile connections that need a certificate fail rather than hang.
    let run = topo.connect_from("client", server.addr, 1024, 2);
    assert_eq!(run.errors.len(), 2, "{run:?}");

    ca.resume().expect("start CA");
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut last = None;
    while Instant::now() < deadline {
        let run = topo.connect_from("client", server.addr, 1024, 2);
        if run.ok.len() == 2 {
            last = None;
            break;
        }
        last = Some(run);
        thread::sleep(Duration::from_millis(500));
    }
    assert!(
        last.is_none(),
        "no recovery after the CA came back: {last:?}\n{}",
        node1.log_text()
    );
    assert!(issued_to(&ca, CLIENT_ID) >= 1 && issued_to(&ca, SERVER_ID) >= 1);
    assert!(
        mesh_tests::wait_for(|| ready().status == 200),
        "not ready with the certificate issued: {:?}",
        ready()
    );
    assert!(
        !node1
            .log_lines_with(&["workload certificate issued", CLIENT_ID])
            .is_empty()
    );
}

#[test]
fn the_gateway_takes_its_own_certificate_from_istiods_ca() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let ca = TestCa::start(
        &topo.node("node1").netns_path(),
        CA.parse().unwrap(),
        &topo.ca_dir(),
        Duration::from_secs(3600),
    )
    .expect("start CA");
    let gateway_id = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway";
    let listen = "198.19.0.2:15008";
    let mut args = ca.client_args(&topo);
    args.extend(
        [
            "--local-xds",
            &topo.state_file().display().to_string(),
            "--gateway-listen",
            listen,
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Ready only once its certificate is in hand.
    let gateway = MeshNode::start_gateway(&topo, "node2", &args).expect("start the gateway");
    assert_eq!(
        issued_to(&ca, gateway_id),
        1,
        "{:?}\n{}",
        ca.seen(),
        gateway.log_text()
    );
    // What it presents is that certificate, verified as clients verify it.
    let probe = hbone_client::client_config(&topo.ca_dir(), CLIENT_ID, gateway_id).unwrap();
    let cert = hbone_client::run_in(&topo.pod("prober").netns_path(), || {
        hbone_client::server_certificate(probe, listen.parse().unwrap())
    })
    .expect("run the probe");
    assert!(cert.is_ok(), "{cert:?}\n{}", gateway.log_text());
}
