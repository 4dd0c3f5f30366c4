//! Operability endpoints against a running mesh: readiness turns on only when the control
//! plane has answered; Prometheus metrics under Istio's names move by exactly the connections
//! and bytes that went through, on both sides; one access-log line per connection; the config
//! dump shows the mesh and certificates but no key; the log level changes at run time.
use std::{thread, time::Duration};

use mesh_tests::{
    MeshNode, PodSpec, Topology,
    control_plane::ControlPlane,
    http_probe::{self, ADMIN, READINESS, sample},
    privileged, wait_for,
};

const PORT: u16 = 8080;
const CONNS: usize = 5;
const BYTES: usize = 100_000;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

fn metrics(topo: &Topology, node: &str) -> String {
    http_probe::scrape(&topo.node(node).netns_path()).expect("scrape metrics")
}

fn value(text: &str, metric: &str, labels: &[&str]) -> f64 {
    sample(text, metric, labels)
        .expect("one sample")
        .unwrap_or_else(|| panic!("no {metric} with {labels:?} in:\n{text}"))
}

#[test]
fn readiness_metrics_access_log_config_dump_and_log_level() {
    if !privileged() {
        return;
    }
    let topo = Topology::two_nodes(
        vec![PodSpec::enrolled("client")],
        vec![PodSpec::enrolled("server")],
    );
    let mut plane = ControlPlane::on_node1(&topo);
    plane.put_pods(&topo, &[("client", "node1"), ("server", "node2")]);
    // The control plane is down when node1's mesh-node starts: it must not be ready.
    plane.stop();
    let mut args = plane.client_args(&topo, "node1");
    args.extend(["--ca-dir".to_owned(), topo.ca_dir().display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut node1 = MeshNode::spawn(&topo, "node1", &args).expect("spawn mesh-node");
    let netns1 = topo.node("node1").netns_path();
    let mut answer = None;
    assert!(
        wait_for(|| {
            answer = http_probe::get(&netns1, READINESS, "/healthz/ready").ok();
            answer.is_some()
        }),
        "readiness endpoint never answered:\n{}",
        node1.log_text()
    );
    let answer = answer.unwrap();
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(
        answer.body.contains("no answer from the control plane yet"),
        "{answer:?}"
    );
    // Still not ready a while later: it does not give up waiting.
    thread::sleep(Duration::from_millis(500));
    let answer = http_probe::get(&netns1, READINESS, "/healthz/ready").unwrap();
    assert_eq!(answer.status, 503, "{answer:?}");

    plane.resume().expect("resume control plane");
    node1
        .wait_ready()
        .expect("node1 ready after the control plane answered");
    let mut last = None;
    assert!(
        wait_for(|| {
            let answer = http_probe::get(&netns1, READINESS, "/healthz/ready").unwrap();
            let ready = answer.status == 200;
            last = Some(answer);
            ready
        }),
        "not ready after the control plane answered: {last:?}"
    );
    assert_eq!(last.unwrap().body, "ready\n");
    let _node2 = plane.start_mesh_node(&topo, "node2");
    let server = topo.serve("server", PORT);

    // Known traffic: CONNS connections of BYTES each, client → server over HBONE.
    let run = topo.connect_from("client", server.addr, BYTES, CONNS);
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    let closed = |node: &MeshNode, message: &str| node.log_lines_with(&[message, "result=closed"]);
    assert!(wait_for(|| closed(&node1, "outbound connection closed")
        .len()
        == CONNS));
    let lines = closed(&node1, "outbound connection closed");
    let mut responses = 0u64;
    for line in &lines {
        for field in [
            "access:",
            "reporter=source",
            "src_workload=client",
            &format!("src_identity={CLIENT_ID}"),
            &format!("original_dst={}", server.addr),
            "dst_workload=server",
            &format!("dst_identity={SERVER_ID}"),
            "route=hbone",
            &format!("bytes_sent={BYTES}"),
            "duration_ms=",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
        responses += field_u64(line, "bytes_received");
    }

    // Source side (node1): the counts and bytes of exactly these connections.
    let text = metrics(&topo, "node1");
    let source = [
        "reporter=\"source\"",
        "source_workload=\"client\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
        "destination_workload=\"server\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/server\"",
        "connection_security_policy=\"mutual_tls\"",
        "response_flags=\"-\"",
    ];
    assert_eq!(
        value(&text, "istio_tcp_connections_opened_total", &source),
        CONNS as f64
    );
    assert_eq!(
        value(&text, "istio_tcp_connections_closed_total", &source),
        CONNS as f64
    );
    assert_eq!(
        value(&text, "istio_tcp_received_bytes_total", &source),
        (CONNS * BYTES) as f64
    );
    assert_eq!(
        value(&text, "istio_tcp_sent_bytes_total", &source),
        responses as f64
    );
    assert!(value(&text, "mesh_ebpf_captured_total", &[]) >= CONNS as f64);
    assert!(
        value(
            &text,
            "mesh_xds_updates_total",
            &["type_url=\"istio.workload.Address\"", "result=\"ack\""]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(value(&text, "mesh_xds_connected", &[]), 1.0);
    assert_eq!(
        value(&text, "mesh_workload_certificates", &["result=\"valid\""]),
        1.0
    );

    // Destination side (node2): the same connections, reported by the receiving node.
    let node2_dest = [
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
        "destination_workload=\"server\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let mut text2 = String::new();
    assert!(
        wait_for(|| {
            text2 = metrics(&topo, "node2");
            sample(&text2, "istio_tcp_connections_closed_total", &node2_dest)
                .ok()
                .flatten()
                == Some(CONNS as f64)
        }),
        "{text2}"
    );
    assert_eq!(
        value(&text2, "istio_tcp_connections_opened_total", &node2_dest),
        CONNS as f64
    );
    assert_eq!(
        value(&text2, "istio_tcp_received_bytes_total", &node2_dest),
        (CONNS * BYTES) as f64
    );
    assert_eq!(
        value(&text2, "istio_tcp_sent_bytes_total", &node2_dest),
        responses as f64
    );

    // Config dump: the mesh, the enrolled pod, its certificate's expiry, and no key material.
    let dump = http_probe::get(&netns1, ADMIN, "/config_dump").expect("config dump");
    assert_eq!(dump.status, 200);
    assert!(
        !dump.body.contains("PRIVATE KEY") && !dump.body.contains("private"),
        "{}",
        dump.body
    );
    let dump: serde_json::Value = serde_json::from_str(&dump.body).expect("config dump is JSON");
    let uids: Vec<&str> = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["uid"].as_str())
        .collect();
    assert!(
        uids.iter().any(|u| u.ends_with("/client")) && uids.iter().any(|u| u.ends_with("/server")),
        "{uids:?}"
    );
    assert_eq!(dump["enrolled_pods"][0]["pod"], "default/client");
    let cert = dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == CLIENT_ID)
        .unwrap_or_else(|| panic!("no client certificate in {dump:#}"));
    assert_eq!(cert["valid"], true);
    assert!(
        cert["not_after"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{cert}"
    );
    assert!(
        cert["expires_in_seconds"].as_u64().is_some_and(|s| s > 0),
        "{cert}"
    );

    // Log level at run time: debug lines appear after the change, a bad filter is refused.
    assert!(!node1.log_text().contains(" DEBUG "));
    let set = http_probe::request(&netns1, "POST", ADMIN, "/logging?level=debug").unwrap();
    assert_eq!((set.status, set.body.as_str()), (200, "debug\n"));
    let run = topo.connect_from("client", server.addr, 10, 1);
    assert!(run.errors.is_empty());
    assert!(
        wait_for(|| node1.log_text().contains(" DEBUG ")),
        "no debug line after the change"
    );
    let bad =
        http_probe::request(&netns1, "POST", ADMIN, "/logging?level=mesh_node%3Dloud").unwrap();
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.body.contains("invalid log filter"), "{bad:?}");
    let now = http_probe::get(&netns1, ADMIN, "/logging").unwrap();
    assert_eq!(now.body, "debug\n");
    let unknown = http_probe::get(&netns1, ADMIN, "/nope").unwrap();
    assert_eq!(unknown.status, 404);
    assert!(unknown.body.contains("/config_dump"));
}

fn field_u64(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}
