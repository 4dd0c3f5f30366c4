//! Enrollment from the Kubernetes API on a real kernel: mesh-node's kube-rs watcher against the
//! harness's API server (real list/watch/patch over HTTP), pods whose sandbox processes sit in
//! cgroups named as the kubelet names them, found through the host's /proc. Assertions are on
//! what users see: which pods `mesh-node bpf pods` lists, whether connections were captured and
//! tunnelled, the annotation on the pod objects, connections that must survive.
use std::{net::SocketAddr, path::PathBuf, process::Command, thread, time::Duration};

use mesh_tests::{
    MeshNode, PodSpec, Topology,
    kube_api::KubeApi,
    kubelet::{CgroupDriver, Sandbox, pod_object},
    meshnode, podapp, privileged, wait_for,
};
use serde_json::json;

const PORT: u16 = 8080;
const LABEL: &str = "istio.io/dataplane-mode";
const ANNOTATION: &str = "ambient.istio.io/redirection";

/// The API server on node1's link address (both nodes' mesh-nodes reach it), over TLS with a
/// certificate from the test root, and a kubeconfig naming that root.
fn api_server(topo: &Topology) -> (KubeApi, PathBuf) {
    let addr = SocketAddr::from((topo.link_ip("node1"), 0));
    let api = KubeApi::start(&topo.node("node1").netns_path(), addr, &topo.ca_dir())
        .expect("start API server");
    let kubeconfig = api
        .write_kubeconfig(&topo.workdir.join("kubeconfig"))
        .expect("write kubeconfig");
    (api, kubeconfig)
}

/// `namespace/name` of every pod `mesh-node bpf pods` lists for `node` (read from the pins).
fn pinned_pods(topo: &Topology, node: &str) -> Vec<String> {
    let list = meshnode::bpf_json(topo, node, &["pods"]);
    let mut pods: Vec<String> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| p["pod"].as_str().unwrap_or("").to_owned())
        .collect();
    pods.sort();
    pods
}

/// Outbound connections from `pod` that node's mesh-node captured and carried over HBONE.
fn tunnelled_from(mesh: &MeshNode, topo: &Topology, pod: &str, target: SocketAddr) -> usize {
    mesh.log_lines_with(&[
        "outbound connection closed",
        "route=hbone",
        &format!("original_dst={target}"),
        &format!("src={}:", topo.pod(pod).ip),
    ])
    .len()
}

fn captured_to(mesh: &MeshNode, target: SocketAddr) -> usize {
    mesh.log_lines_with(&[
        "outbound connection closed",
        &format!("original_dst={target}"),
    ])
    .len()
}

fn connect_ok(topo: &Topology, pod: &str, target: SocketAddr) -> podapp::PodRun {
    let run = topo.connect_from(pod, target, 64 * 1024, 1);
    assert!(run.errors.is_empty(), "{pod} → {target}: {:?}", run.errors);
    run
}

#[test]
fn a_labelled_namespace_enrolls_its_pods_and_removing_the_label_releases_them() {
    if !privileged() {
        return;
    }
    // node1: client, optout (label none), late (appears later); node2: server. All in "shop".
    let topo = Topology::two_nodes(
        vec![
            PodSpec::enrolled("client").in_namespace("shop"),
            PodSpec::plain("optout").in_namespace("shop"),
            PodSpec::enrolled("late").in_namespace("shop"),
        ],
        vec![PodSpec::enrolled("server").in_namespace("shop")],
    );
    let (api, kubeconfig) = api_server(&topo);
    api.put_namespace("shop", &[]);
    // A pod of another node, which node1's mesh-node must never see (field selector).
    api.put_pod(json!({
        "metadata": {"name": "elsewhere", "namespace": "shop", "uid": "0-elsewhere"},
        "spec": {"nodeName": "node9", "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": "198.18.9.10"}
    }));
    api.put_pod(pod_object(&topo, "client", json!({})));
    api.put_pod(pod_object(
        &topo,
        "optout",
        json!({"metadata": {"labels": {LABEL: "none"}}}),
    ));
    api.put_pod(pod_object(&topo, "server", json!({})));
    let mut sandboxes = [
        Sandbox::start(&topo, "client", CgroupDriver::Systemd).expect("client sandbox"),
        Sandbox::start(&topo, "optout", CgroupDriver::Systemd).expect("optout sandbox"),
        Sandbox::start(&topo, "late", CgroupDriver::Systemd).expect("late sandbox"),
        Sandbox::start(&topo, "server", CgroupDriver::Cgroupfs).expect("server sandbox"),
    ];
    let _server = topo.serve("server", PORT);
    let target = SocketAddr::from((topo.pod("server").ip, PORT));

    let mesh1 = MeshNode::start_kubernetes(&topo, "node1", &kubeconfig, &[]).expect("node1");
    let mesh2 = MeshNode::start_kubernetes(&topo, "node2", &kubeconfig, &[]).expect("node2");
    assert!(
        pinned_pods(&topo, "node1").is_empty(),
        "nothing is labelled yet"
    );

    // A connection open before enrollment, still transferring after it.
    let (client_netns, client_cgroup) = (
        topo.pod("client").netns_path(),
        topo.pod("client").cgroup.clone(),
    );
    let before = thread::spawn(move || {
        podapp::connect_holding(
            &client_netns,
            &client_cgroup,
            target,
            256 * 1024,
            1,
            Duration::from_secs(3),
        )
    });
    thread::sleep(Duration::from_millis(500));

    api.put_namespace("shop", &[(LABEL, "ambient")]);
    assert!(
        wait_for(|| pinned_pods(&topo, "node1") == ["shop/client"]),
        "node1 enrolls exactly the labelled namespace's pod (not the opted-out one): {:?}",
        pinned_pods(&topo, "node1")
    );
    assert!(
        wait_for(|| pinned_pods(&topo, "node2") == ["shop/server"]),
        "node2: {:?}",
        pinned_pods(&topo, "node2")
    );
    let enrolled_at = mesh1.log_lines_with(&["pod enrolled", "pod=shop/client"]);
    assert_eq!(enrolled_at.len(), 1, "{enrolled_at:?}");
    assert!(
        enrolled_at[0].contains("/ns/net"),
        "enrolled in the namespace found through /proc: {}",
        enrolled_at[0]
    );

    // The pod's processes may come and go (a container restart): the namespace is held open.
    sandboxes[0].stop();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(pinned_pods(&topo, "node1"), ["shop/client"]);

    // New connections are captured and tunnelled node to node.
    let run = connect_ok(&topo, "client", target);
    assert_eq!(run.ok[0].peer, target);
    assert!(wait_for(
        || tunnelled_from(&mesh1, &topo, "client", target) == 1
    ));
    assert!(wait_for(|| !mesh2
        .log_lines_with(&[
            "reporter=destination",
            "src_identity=spiffe://cluster.local/ns/shop/sa/client"
        ])
        .is_empty()));

    // The connection from before enrollment finished intact and was never captured.
    let before = before.join().expect("thread").expect("podapp");
    assert!(before.errors.is_empty(), "{:?}", before.errors);
    assert_eq!(before.ok[0].bytes, 256 * 1024);
    assert_eq!(
        before.ok[0].server_saw, before.ok[0].local,
        "it went direct, as before"
    );
    assert_eq!(
        captured_to(&mesh1, target),
        1,
        "only the new connection was captured"
    );

    // The opted-out pod stays out.
    connect_ok(&topo, "optout", target);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(captured_to(&mesh1, target), 1);

    // Annotations: on the enrolled pods, by merge patch; not on the opted-out one.
    assert!(wait_for(|| {
        api.pod_annotation("shop", "client", ANNOTATION).as_deref() == Some("enabled")
            && api.pod_annotation("shop", "server", ANNOTATION).as_deref() == Some("enabled")
    }));
    assert_eq!(api.pod_annotation("shop", "optout", ANNOTATION), None);
    let patches = api.patches();
    assert!(
        patches
            .iter()
            .all(|p| p.content_type == "application/merge-patch+json"),
        "{patches:?}"
    );

    // A pod that appears later is enrolled when it runs.
    api.put_pod(pod_object(
        &topo,
        "late",
        json!({"status": {"phase": "Pending"}}),
    ));
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        pinned_pods(&topo, "node1"),
        ["shop/client"],
        "pending pods wait"
    );
    api.put_pod(pod_object(&topo, "late", json!({})));
    assert!(
        wait_for(|| pinned_pods(&topo, "node1") == ["shop/client", "shop/late"]),
        "{:?}",
        pinned_pods(&topo, "node1")
    );
    connect_ok(&topo, "late", target);
    assert!(wait_for(
        || tunnelled_from(&mesh1, &topo, "late", target) == 1
    ));

    // A deleted pod is released; the others stay.
    assert!(api.delete_pod("shop", "late"));
    assert!(
        wait_for(|| pinned_pods(&topo, "node1") == ["shop/client"]),
        "{:?}",
        pinned_pods(&topo, "node1")
    );
    api.put_pod(pod_object(&topo, "late", json!({})));
    assert!(wait_for(
        || pinned_pods(&topo, "node1") == ["shop/client", "shop/late"]
    ));

    // The label goes: everything is released, annotations removed, nothing left pinned; a
    // tunnelled connection open at that moment finishes intact.
    let (client_netns, client_cgroup) = (
        topo.pod("client").netns_path(),
        topo.pod("client").cgroup.clone(),
    );
    let during = thread::spawn(move || {
        podapp::connect_holding(
            &client_netns,
            &client_cgroup,
            target,
            256 * 1024,
            1,
            Duration::from_secs(2),
        )
    });
    thread::sleep(Duration::from_millis(500));
    api.put_namespace("shop", &[]);
    assert!(
        wait_for(
            || pinned_pods(&topo, "node1").is_empty() && pinned_pods(&topo, "node2").is_empty()
        ),
        "node1 {:?} node2 {:?}",
        pinned_pods(&topo, "node1"),
        pinned_pods(&topo, "node2")
    );
    assert!(wait_for(|| {
        ["client", "late", "server"]
            .iter()
            .all(|pod| api.pod_annotation("shop", pod, ANNOTATION).is_none())
    }));
    let during = during.join().expect("thread").expect("podapp");
    assert!(during.errors.is_empty(), "{:?}", during.errors);
    assert_eq!(during.ok[0].bytes, 256 * 1024);
    assert!(wait_for(
        || tunnelled_from(&mesh1, &topo, "client", target) == 2
    ));
    let captured = captured_to(&mesh1, target);
    let run = connect_ok(&topo, "client", target);
    assert_eq!(
        run.ok[0].server_saw, run.ok[0].local,
        "released: direct again"
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(captured_to(&mesh1, target), captured);
    assert!(
        mesh1
            .log_lines_with(&["Kubernetes watch failed"])
            .is_empty(),
        "{}",
        mesh1.log_text()
    );
}

#[test]
fn restarts_outages_and_relists_leave_enrolled_pods_alone() {
    if !privileged() {
        return;
    }
    let topo = Topology::two_nodes(
        vec![PodSpec::enrolled("client").in_namespace("shop")],
        vec![PodSpec::enrolled("server").in_namespace("shop")],
    );
    let (mut api, kubeconfig) = api_server(&topo);
    api.put_namespace("shop", &[(LABEL, "ambient")]);
    api.put_pod(pod_object(&topo, "client", json!({})));
    api.put_pod(pod_object(&topo, "server", json!({})));
    let _sandboxes = [
        Sandbox::start(&topo, "client", CgroupDriver::Cgroupfs).expect("client sandbox"),
        Sandbox::start(&topo, "server", CgroupDriver::Systemd).expect("server sandbox"),
    ];
    let _server = topo.serve("server", PORT);
    let target = SocketAddr::from((topo.pod("server").ip, PORT));

    // Running pods are enrolled before mesh-node says it is ready.
    let mut mesh1 = MeshNode::start_kubernetes(&topo, "node1", &kubeconfig, &[]).expect("node1");
    assert_eq!(pinned_pods(&topo, "node1"), ["shop/client"]);
    let _mesh2 = MeshNode::start_kubernetes(&topo, "node2", &kubeconfig, &[]).expect("node2");
    assert_eq!(pinned_pods(&topo, "node2"), ["shop/server"]);
    connect_ok(&topo, "client", target);
    assert!(wait_for(
        || tunnelled_from(&mesh1, &topo, "client", target) == 1
    ));

    // Restart: the same pod enrolled again, once, with no stale state.
    mesh1.stop().expect("stop node1");
    let mesh1 = MeshNode::start_kubernetes(&topo, "node1", &kubeconfig, &[]).expect("node1 again");
    assert_eq!(pinned_pods(&topo, "node1"), ["shop/client"]);
    assert_eq!(mesh1.log_lines_with(&["pod enrolled"]).len(), 1);
    connect_ok(&topo, "client", target);
    assert!(wait_for(
        || tunnelled_from(&mesh1, &topo, "client", target) == 1
    ));

    // History compacted: the watches get 410 Gone, list again, and change nothing.
    let (lists, _) = api.requests();
    api.compact();
    assert!(
        wait_for(|| api.requests().0 >= lists + 4),
        "both mesh-nodes re-list pods and namespaces after 410: {:?}",
        api.requests()
    );
    thread::sleep(Duration::from_millis(300));
    assert!(mesh1.log_lines_with(&["pod un-enrolled"]).is_empty());
    assert_eq!(pinned_pods(&topo, "node1"), ["shop/client"]);

    // The API server goes away: traffic keeps flowing; a change made meanwhile (the pod opts
    // out) is applied once it is back.
    api.stop();
    thread::sleep(Duration::from_millis(500));
    connect_ok(&topo, "client", target);
    assert!(wait_for(
        || tunnelled_from(&mesh1, &topo, "client", target) == 2
    ));
    assert_eq!(pinned_pods(&topo, "node1"), ["shop/client"]);
    api.put_pod(pod_object(
        &topo,
        "client",
        json!({"metadata": {"labels": {LABEL: "none"}}}),
    ));
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        pinned_pods(&topo, "node1"),
        ["shop/client"],
        "not seen while away"
    );
    api.resume().expect("API server back");
    assert!(
        wait_for_long(|| pinned_pods(&topo, "node1").is_empty()),
        "applied after the outage: {:?}\n{}",
        pinned_pods(&topo, "node1"),
        mesh1.log_text()
    );
    assert!(wait_for(|| api
        .pod_annotation("shop", "client", ANNOTATION)
        .is_none()));
    assert!(
        !mesh1
            .log_lines_with(&["Kubernetes watch failed"])
            .is_empty(),
        "the outage was noticed"
    );
}

/// A DaemonSet surge: a second mesh-node on the node takes over the first one's sockets while
/// a connection is open; the first drains, and then waits for its pod's SIGTERM rather than
/// exit (the kubelet would restart a container that exits, and it would take the node back).
/// Enrollment and annotations stay as they were, nothing is patched by the drained one.
#[test]
fn a_surge_pod_takes_over_and_the_old_one_waits_for_its_sigterm() {
    if !privileged() {
        return;
    }
    let topo = Topology::two_nodes(
        vec![PodSpec::enrolled("client").in_namespace("shop")],
        vec![PodSpec::enrolled("server").in_namespace("shop")],
    );
    let (api, kubeconfig) = api_server(&topo);
    api.put_namespace("shop", &[(LABEL, "ambient")]);
    api.put_pod(pod_object(&topo, "client", json!({})));
    api.put_pod(pod_object(&topo, "server", json!({})));
    let _sandboxes = [
        Sandbox::start(&topo, "client", CgroupDriver::Systemd).expect("client sandbox"),
        Sandbox::start(&topo, "server", CgroupDriver::Systemd).expect("server sandbox"),
    ];
    let _server = topo.serve("server", PORT);
    let target = SocketAddr::from((topo.pod("server").ip, PORT));
    let mut old = MeshNode::start_kubernetes(&topo, "node1", &kubeconfig, &[]).expect("node1");
    let _mesh2 = MeshNode::start_kubernetes(&topo, "node2", &kubeconfig, &[]).expect("node2");
    let (netns, cgroup) = (
        topo.pod("client").netns_path(),
        topo.pod("client").cgroup.clone(),
    );
    let held = thread::spawn(move || {
        podapp::connect_holding(&netns, &cgroup, target, 1 << 20, 1, Duration::from_secs(2))
            .expect("podapp")
    });
    assert!(wait_for(|| http_open(&topo) >= 1.0));
    let patches = api.patches().len();

    let new = MeshNode::start_kubernetes(&topo, "node1", &kubeconfig, &[]).expect("surge pod");
    assert_eq!(
        new.log_lines_with(&["took over its listening sockets"])
            .len(),
        1
    );
    let run = held.join().expect("held");
    podapp::assert_all_ok(&run, 1, 1 << 20);
    assert!(
        wait_for(|| !old
            .log_lines_with(&["handed over and drained: waiting for SIGTERM"])
            .is_empty()),
        "{}",
        old.log_text()
    );
    assert!(old.is_running(), "it waits for its pod's deletion");
    connect_ok(&topo, "client", target);
    assert!(wait_for(
        || tunnelled_from(&new, &topo, "client", target) == 1
    ));
    assert_eq!(pinned_pods(&topo, "node1"), ["shop/client"]);
    assert_eq!(api.patches().len(), patches, "{:?}", api.patches());
    assert_eq!(
        api.pod_annotation("shop", "client", ANNOTATION).as_deref(),
        Some("enabled")
    );

    // The pod is deleted: SIGTERM ends it at once, it has nothing left to drain.
    old.stop().expect("exits on SIGTERM");
    assert!(old.log_lines_with(&["drain cut short"]).is_empty());
    connect_ok(&topo, "client", target);
    assert!(wait_for(
        || tunnelled_from(&new, &topo, "client", target) == 2
    ));
}

fn http_open(topo: &Topology) -> f64 {
    mesh_tests::http_probe::total(
        &topo.node("node1").netns_path(),
        "mesh_connections_open",
        &[],
    )
    .unwrap_or(0.0)
}

/// Up to 40 s: the watcher's backoff after an outage grows to several seconds.
fn wait_for_long(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while std::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    condition()
}

/// Settings that cannot work are refused at start, each with one line naming what is wrong,
/// before anything touches the kernel (no root needed).
#[test]
fn bad_kubernetes_settings_are_refused_at_start_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("mesh-k8s-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let garbage = dir.join("garbage.yaml");
    std::fs::write(&garbage, "clusters: [\n").expect("write");
    let pods = dir.join("pods.yaml");
    std::fs::write(&pods, "pods: []\n").expect("write");
    let refuse = |args: &[&str], expected: &str| {
        let out = Command::new(meshnode::binary())
            .arg("run")
            .args(args)
            .env_remove("KUBECONFIG")
            .env("HOME", &dir)
            .output()
            .expect("run mesh-node");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must be refused: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected {expected:?} in {stderr}"
        );
    };
    let missing = dir.join("missing.yaml");
    let missing = missing.to_str().expect("UTF-8 path");
    refuse(
        &["--kubernetes", "--kubeconfig", missing, "--node-name", "n1"],
        &format!("kubeconfig {missing}: failed to read kubeconfig"),
    );
    refuse(
        &[
            "--kubernetes",
            "--kubeconfig",
            garbage.to_str().expect("UTF-8"),
            "--node-name",
            "n1",
        ],
        "failed to parse kubeconfig YAML",
    );
    refuse(
        &["--kubernetes", "--kubeconfig", missing],
        "--kubernetes needs --node-name",
    );
    refuse(
        &["--kubernetes", "--node-name", "n1"],
        "Kubernetes client configuration (in-cluster or KUBECONFIG)",
    );
    refuse(
        &[
            "--kubernetes",
            "--node-name",
            "n1",
            "--pods",
            pods.to_str().expect("UTF-8"),
        ],
        "--pods and --kubernetes are exclusive",
    );
    let ca = dir.join("ca");
    let init = Command::new(meshnode::binary())
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .expect("mesh-node ca init");
    assert!(init.status.success());
    refuse(
        &[
            "--kubernetes",
            "--node-name",
            "n1",
            "--mode",
            "gateway",
            "--ca-dir",
            ca.to_str().expect("UTF-8"),
        ],
        "--mode gateway enrolls no pods: drop --pods and --kubernetes",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
