//! `mesh-node bpf` against a running topology: what it reports must match what really happened
//! — the pods enrolled, the connection made and where it was going, the decision the kernel
//! took — and it must keep working after mesh-node stopped.
use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use mesh_tests::{MeshNode, PodSpec, Topology, meshnode, podapp, privileged, wait_for};
use serde_json::Value;

const PORT: u16 = 8080;

fn topology() -> Topology {
    Topology::two_nodes(
        vec![PodSpec::enrolled("client").in_namespace("shop")],
        vec![PodSpec::enrolled("server")],
    )
}

fn bpf_command(topo: &Topology, node: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(meshnode::binary());
    cmd.arg("bpf")
        .arg("--bpffs")
        .arg(&topo.node(node).bpffs)
        .args(args);
    cmd
}

fn bpf(topo: &Topology, node: &str, args: &[&str]) -> Output {
    let out = bpf_command(topo, node, args)
        .output()
        .expect("run mesh-node bpf");
    assert!(
        out.status.success(),
        "mesh-node bpf {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn bpf_json(topo: &Topology, node: &str, args: &[&str]) -> Value {
    meshnode::bpf_json(topo, node, args)
}

fn bpf_table(topo: &Topology, node: &str, args: &[&str]) -> String {
    String::from_utf8(bpf(topo, node, args).stdout).expect("UTF-8 table")
}

/// Starts `bpf trace` and waits until it has taken its start time.
fn start_trace(topo: &Topology, node: &str, args: &[&str]) -> Child {
    let mut child = bpf_command(
        topo,
        node,
        &[&["trace", "--output", "json", "--duration", "20"], args].concat(),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn bpf trace");
    let mut first = String::new();
    BufReader::new(child.stderr.as_mut().expect("stderr"))
        .read_line(&mut first)
        .expect("read trace banner");
    assert!(
        first.starts_with("tracing redirect decisions"),
        "trace said: {first}"
    );
    child
}

fn trace_events(child: Child) -> Vec<Value> {
    let out = podapp::wait_with_timeout(child, Duration::from_secs(30)).expect("trace ends");
    assert!(
        out.status.success(),
        "trace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("trace line {line:?}: {e}"))
        })
        .collect()
}

fn entries_for<'a>(list: &'a Value, pod: &str) -> Vec<&'a Value> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .filter(|entry| entry["pod"] == pod)
        .collect()
}

#[test]
fn bpf_inspection_shows_pods_connections_and_decisions_while_running_and_after_stop() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mut mesh1 = MeshNode::start(&topo, "node1", &[]).expect("mesh-node node1");
    let _mesh2 = MeshNode::start(&topo, "node2", &[]).expect("mesh-node node2");
    let server = topo.serve("server", PORT);
    let client_ip = topo.pod("client").ip;

    // pods: the enrolled pod with its address, identity and listeners, inbound capture on.
    let pods = bpf_json(&topo, "node1", &["pods"]);
    let client = entries_for(&pods, "shop/client");
    assert_eq!(client.len(), 1, "pods: {pods:#}");
    assert_eq!(client[0]["ips"], serde_json::json!([client_ip.to_string()]));
    assert_eq!(client[0]["service_account"], "client");
    assert_eq!(client[0]["inbound_capture"], "on");
    let listeners = client[0]["listeners"].as_array().expect("listeners");
    assert!(
        listeners.contains(&"127.0.0.1:15001".into()),
        "{listeners:?}"
    );
    assert!(
        listeners.contains(&"127.0.0.1:15006".into()),
        "{listeners:?}"
    );
    let table = bpf_table(&topo, "node1", &["pods"]);
    assert!(table.starts_with("POD "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("shop/client") && l.contains(&client_ip.to_string())),
        "{table}"
    );
    assert!(
        table.lines().all(|l| l.len() <= 80),
        "pods table wider than 80 columns:\n{table}"
    );

    // status: every cgroup hook attached to node1's cgroup, the pod's sk_lookup link, fail-open.
    let status = bpf_json(&topo, "node1", &["status"]);
    assert_eq!(status["fail_mode"], "open");
    assert_eq!(status["enrolled_pods"], 1);
    let cgroup = topo.node("node1").cgroup.display().to_string();
    let hooks = status["hooks"].as_array().expect("hooks");
    for hook in [
        "cgroup/connect4",
        "cgroup/connect6",
        "sockops",
        "cgroup/getpeername4",
        "cgroup/getpeername6",
        "cgroup/sendmsg4",
        "cgroup/recvmsg4",
        "cgroup/sendmsg6",
        "cgroup/recvmsg6",
    ] {
        let found: Vec<_> = hooks.iter().filter(|h| h["hook"] == hook).collect();
        assert_eq!(found.len(), 1, "{hook} in {hooks:#?}");
        assert_eq!(found[0]["state"], "attached", "{hook}");
        assert_eq!(found[0]["attached_to"], cgroup.as_str(), "{hook}");
        assert!(found[0]["link_id"].as_u64().is_some_and(|id| id > 0));
    }
    let sk_lookup: Vec<_> = hooks.iter().filter(|h| h["hook"] == "sk_lookup").collect();
    assert_eq!(sk_lookup.len(), 1, "{hooks:#?}");
    assert!(
        sk_lookup[0]["attached_to"]
            .as_str()
            .is_some_and(|a| a.ends_with("(shop/client)"))
    );
    let features = status["features"].as_array().expect("features");
    assert!(
        features
            .iter()
            .filter(|f| f["used_for"] != "not required")
            .all(|f| f["present"] == true),
        "{features:#?}"
    );

    // A traced, held connection: the trace shows the decision, conns and the decoded map entry
    // show its real original destination and source port.
    let outbound_trace = start_trace(
        &topo,
        "node1",
        &["--pod", "client", "--port", "8080", "--count", "1"],
    );
    let inbound_trace = start_trace(&topo, "node2", &["--pod", "default/server", "--count", "1"]);
    let client_pod = topo.pod("client");
    let (netns, cgroup_dir, target) = (
        client_pod.netns_path(),
        client_pod.cgroup.clone(),
        server.addr,
    );
    let held = std::thread::spawn(move || {
        podapp::connect_holding(&netns, &cgroup_dir, target, 1000, 1, Duration::from_secs(3))
            .expect("podapp")
    });
    let mut dump = Value::Null;
    assert!(
        wait_for(|| {
            dump = bpf_json(&topo, "node1", &["maps", "--dump", "sock_orig"]);
            !entries_for(&dump, "shop/client").is_empty()
        }),
        "no SOCK_ORIG entry for the held connection: {dump:#}"
    );
    let conns = bpf_json(&topo, "node1", &["conns", "--pod", "shop/client"]);
    let run = held.join().expect("holding thread");
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    let local = run.ok[0].local;
    let entry = entries_for(&dump, "shop/client")[0];
    assert_eq!(entry["original_dst"], server.addr.to_string(), "{dump:#}");
    assert_eq!(entry["src_port"], local.port(), "{dump:#}");
    assert!(entry["socket_cookie"].as_u64().is_some_and(|c| c > 0));
    let conn = entries_for(&conns, "shop/client");
    assert_eq!(conn.len(), 1, "{conns:#}");
    assert_eq!(conn[0]["original_dst"], server.addr.to_string());
    assert_eq!(conn[0]["src_port"], local.port());

    let events = trace_events(outbound_trace);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["pod"], "shop/client");
    assert_eq!(events[0]["direction"], "outbound");
    assert_eq!(events[0]["action"], "captured");
    assert_eq!(events[0]["dst"], server.addr.to_string());
    let events = trace_events(inbound_trace);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["direction"], "inbound");
    assert_eq!(events[0]["action"], "captured");
    assert_eq!(events[0]["dst"], server.addr.to_string());
    assert_eq!(
        events[0]["src"]
            .as_str()
            .and_then(|s| s.parse::<SocketAddr>().ok())
            .map(|s| s.ip()),
        Some(client_ip.into())
    );

    // The connection closed: it leaves the live-connection map.
    assert!(
        wait_for(|| entries_for(&bpf_json(&topo, "node1", &["conns"]), "shop/client").is_empty()),
        "closed connection still listed: {}",
        bpf_table(&topo, "node1", &["conns"])
    );

    // maps: every map listed with its fill.
    let maps = bpf_json(&topo, "node1", &["maps"]);
    let enrolled = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "MESH_ENROLLED")
        .expect("MESH_ENROLLED");
    assert_eq!(enrolled["entries"], 1);
    assert_eq!(enrolled["capacity"], 4096);
    assert_eq!(maps.as_array().unwrap().len(), 12, "{maps:#}");

    // After mesh-node stopped: the pinned state still answers; the pod is no longer served, and
    // a new connection is let through (fail-open) — the trace says so and why.
    mesh1.stop().expect("stop mesh-node");
    let pods = bpf_json(&topo, "node1", &["pods"]);
    assert_eq!(
        entries_for(&pods, "shop/client")[0]["inbound_capture"],
        "not serving"
    );
    let trace = start_trace(&topo, "node1", &["--pod", "client", "--count", "1"]);
    let run = topo.connect_from("client", server.addr, 10, 1);
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    let events = trace_events(trace);
    assert_eq!(events[0]["action"], "passed", "{events:#?}");
    assert_eq!(events[0]["reason"], "mesh-node not serving the pod");
    let status = bpf_json(&topo, "node1", &["status"]);
    // Nothing connected into the client pod: the connect hooks' own socket lookups are not
    // inbound connections.
    assert_eq!(status["counters"]["inbound_not_serving"], 0, "{status:#}");
    assert!(
        status["counters"]["passed_not_serving"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{status:#}"
    );
    assert!(
        status["counters"]["captured"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{status:#}"
    );
}

#[test]
fn bpf_bad_input_gets_a_clear_error() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let _mesh = MeshNode::start(&topo, "node1", &[]).expect("mesh-node node1");
    let failure = |cmd: &mut Command| {
        let out = cmd.output().expect("run mesh-node bpf");
        assert!(!out.status.success());
        let mut stderr = String::new();
        out.stderr.as_slice().read_to_string(&mut stderr).unwrap();
        stderr
    };
    let stderr = failure(&mut bpf_command(
        &topo,
        "node1",
        &["maps", "--dump", "nosuch"],
    ));
    assert!(
        stderr.contains("unknown map \"nosuch\"") && stderr.contains("MESH_SOCK_ORIG"),
        "{stderr}"
    );
    let stderr = failure(&mut bpf_command(
        &topo,
        "node1",
        &["maps", "--dump", "events"],
    ));
    assert!(stderr.contains("mesh-node bpf trace"), "{stderr}");
    // A duration no clock can add is refused, not a panic.
    for duration in ["1e19", "soon"] {
        let stderr = failure(&mut bpf_command(
            &topo,
            "node1",
            &["trace", "--duration", duration],
        ));
        assert!(
            stderr.contains("--duration") && !stderr.contains("panicked"),
            "{duration}: {stderr}"
        );
    }
    let missing = topo.workdir.join("no-such-bpffs");
    let stderr = failure(
        Command::new(meshnode::binary())
            .args(["bpf", "status", "--bpffs"])
            .arg(&missing),
    );
    assert!(
        stderr.contains("no mesh-node state under") && stderr.contains("no-such-bpffs"),
        "{stderr}"
    );
    // A known map dumps as a table, and the process was not disturbed.
    let table = bpf_table(&topo, "node1", &["maps", "--dump", "MESH_COUNTERS"]);
    assert!(table.lines().any(|l| l.starts_with("captured")), "{table}");
}
