//! IPv6 and dual stack: pods with an IPv4 and an IPv6 address, nodes linked over both. Every
//! path carries IPv6 as it carries IPv4 — outbound capture (`connect6`) with the original
//! destination restored, HBONE between nodes over IPv6, same-node, plaintext captured inbound
//! by `sk_lookup` — and the application sees its client's IPv6 address. A service with a VIP
//! of each family reaches its dual-stack endpoint in the family the client used.
use std::net::{IpAddr, SocketAddr};

use mesh_node::xds::proto::workload as pb;
use mesh_tests::{
    MeshNode, PodSpec, Server, Topology,
    control_plane::{ControlPlane, eventually, pod_workload},
    meshnode::bpf_json,
    podapp, privileged, sniff, wait_for,
};

const PORT: u16 = 8080;

/// node1: `client`, `neighbor` (enrolled), `outsider` (not); node2: `server` (enrolled),
/// `legacy` (not enrolled, not in the mesh).
fn topology() -> Topology {
    Topology::two_nodes_dual_stack(
        vec![
            PodSpec::enrolled("client"),
            PodSpec::enrolled("neighbor"),
            PodSpec::plain("outsider"),
        ],
        vec![PodSpec::enrolled("server"), PodSpec::plain("legacy")],
    )
}

/// An echo server on every address of `pod` (`[::]`, both families).
fn serve_all(topo: &Topology, pod: &str) -> Server {
    topo.serve_at(pod, SocketAddr::new("::".parse().unwrap(), PORT))
}

fn v6(topo: &Topology, pod: &str) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(topo.pod(pod).ipv6()), PORT)
}

use podapp::assert_all_ok as all_ok;

fn closed(mesh: &MeshNode, needles: &[&str]) -> usize {
    mesh.log_lines_with(needles).len()
}

#[test]
fn every_path_carries_ipv6_and_the_application_sees_the_clients_ipv6_address() {
    if !privileged() {
        return;
    }
    let topo = topology();
    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("mesh-node node1");
    let mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("mesh-node node2");
    let _neighbor = serve_all(&topo, "neighbor");
    let _server = serve_all(&topo, "server");
    let _legacy = serve_all(&topo, "legacy");
    let client6 = IpAddr::V6(topo.pod("client").ipv6());

    // Control: outside the mesh, IPv6 goes straight through (the harness's IPv6 works), in
    // cleartext on the link.
    let sniffer = sniff::Sniffer::start(&topo.node("node1").netns, "n0").expect("capture n0");
    let direct = topo.connect_from("outsider", v6(&topo, "legacy"), 64 * 1024, 1);
    all_ok(&direct, 1, 64 * 1024);
    assert_eq!(direct.ok[0].server_saw, direct.ok[0].local);

    // An enrolled client calling a workload outside the mesh: captured by connect6 and passed
    // through as plain TCP, from the client's own IPv6 address.
    let run = topo.connect_from("client", v6(&topo, "legacy"), 64 * 1024, 1);
    all_ok(&run, 1, 64 * 1024);
    assert_eq!(run.ok[0].peer, v6(&topo, "legacy"));
    assert_eq!(run.ok[0].server_saw.ip(), client6, "{:?}", run.ok[0]);
    assert!(
        wait_for(|| closed(
            &mesh1,
            &[
                "outbound connection closed",
                "route=passthrough",
                &format!("dst={}", v6(&topo, "legacy"))
            ]
        ) == 1),
        "{}",
        mesh1.log_text()
    );

    // Same node over IPv6: captured by connect6, delivered from the client's address.
    let target = v6(&topo, "neighbor");
    let run = topo.connect_from("client", target, 4 << 20, 2);
    all_ok(&run, 2, 4 << 20);
    for conn in &run.ok {
        assert_eq!(
            conn.peer, target,
            "getpeername() shows the IPv6 destination"
        );
        assert_eq!(conn.server_saw.ip(), client6, "{conn:?}");
        assert_eq!(conn.server_saw.port(), conn.local.port(), "{conn:?}");
    }
    assert!(
        wait_for(|| closed(
            &mesh1,
            &[
                "outbound connection closed",
                "route=local",
                &format!("dst={target}")
            ]
        ) == 2),
        "{}",
        mesh1.log_text()
    );

    // Node to node over IPv6: an HBONE tunnel to [server]:15008.
    let target = v6(&topo, "server");
    let run = topo.connect_from("client", target, 4 << 20, 2);
    all_ok(&run, 2, 4 << 20);
    for conn in &run.ok {
        assert_eq!(conn.peer, target);
        assert_eq!(conn.server_saw.ip(), client6, "{conn:?}");
    }
    assert!(
        wait_for(|| closed(
            &mesh1,
            &[
                "outbound connection closed",
                "route=hbone",
                &format!("dst={target}")
            ]
        ) == 2),
        "{}",
        mesh1.log_text()
    );

    // On the link: the tunnelled bytes crossed as IPv6 on 15008, encrypted; the control's
    // plaintext is visible, so the capture would have seen cleartext.
    let segments = sniffer.stop();
    let hbone6: usize = segments
        .iter()
        .filter(|s| s.ipv6 && (s.dst_port == 15008 || s.src_port == 15008))
        .map(|s| s.payload.len())
        .sum();
    assert!(hbone6 > 8 << 20, "only {hbone6} IPv6 bytes on 15008");
    let marker = podapp::pattern_bytes(1000, 64);
    let cleartext = |port: u16| {
        segments
            .iter()
            .filter(|s| s.ipv6 && (s.dst_port == port || s.src_port == port))
            .any(|s| s.payload.windows(marker.len()).any(|w| w == marker))
    };
    assert!(cleartext(PORT), "control: IPv6 plaintext must be visible");
    assert!(!cleartext(15008), "cleartext inside the IPv6 tunnel");

    // The tunnel itself ran over IPv6, between the pods' IPv6 addresses; the destination's
    // access log names the client by its IPv6 address.
    let server_hbone = format!("peer=[{}]:15008", topo.pod("server").ipv6());
    assert!(
        !mesh1
            .log_lines_with(&["HBONE connection established", &server_hbone])
            .is_empty(),
        "{}",
        mesh1.log_text()
    );
    assert!(
        wait_for(|| !mesh2
            .log_lines_with(&["HBONE tunnel closed", &format!("src=[{client6}]:")])
            .is_empty()),
        "{}",
        mesh2.log_text()
    );

    // An IPv6 socket calling an IPv4 address (v4-mapped): captured by connect6, carried as
    // IPv4, and getpeername() answers in the form the application used.
    let mapped = SocketAddr::new(IpAddr::V6(topo.pod("server").ip.to_ipv6_mapped()), PORT);
    let run = topo.connect_from("client", mapped, 1 << 20, 1);
    all_ok(&run, 1, 1 << 20);
    assert_eq!(run.ok[0].peer, mapped, "{:?}", run.ok[0]);
    // (The server listens on [::], so it sees IPv4 clients mapped too.)
    assert_eq!(
        run.ok[0].server_saw.ip().to_canonical(),
        IpAddr::V4(topo.pod("client").ip),
        "{:?}",
        run.ok[0]
    );

    // Plaintext over IPv6 into an enrolled pod: captured by sk_lookup, delivered from the
    // outsider's address.
    let run = topo.connect_from("outsider", target, 1 << 20, 2);
    all_ok(&run, 2, 1 << 20);
    let outsider6 = IpAddr::V6(topo.pod("outsider").ipv6());
    for conn in &run.ok {
        assert_eq!(conn.server_saw.ip(), outsider6, "{conn:?}");
    }
    assert!(
        wait_for(|| closed(
            &mesh2,
            &[
                "inbound plaintext connection closed",
                &format!("dst={target}")
            ]
        ) == 2),
        "{}",
        mesh2.log_text()
    );

    // mesh-node bpf: both addresses of the pod, inbound capture registered for each, and
    // original source for both families.
    let pods = bpf_json(&topo, "node2", &["pods"]);
    let server = &pods[0];
    let ips: Vec<String> = topo
        .pod("server")
        .ips()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(server["ips"], serde_json::json!(ips), "{pods}");
    assert_eq!(server["inbound_capture"], "on", "{pods}");
    assert_eq!(
        server["original_source"],
        serde_json::json!(["ipv4", "ipv6"]),
        "{pods}"
    );
    drop((mesh1, mesh2));
}

const ECHO: &str = "echo.default.svc.cluster.local";
const VIP4: [u8; 4] = [10, 96, 0, 10];
const VIP6: &str = "fd00:96::10";

#[test]
fn a_service_with_a_vip_of_each_family_is_reached_in_the_family_the_client_used() {
    if !privileged() {
        return;
    }
    let topo = Topology::two_nodes_dual_stack(
        vec![PodSpec::enrolled("client")],
        vec![PodSpec::enrolled("server")],
    );
    let plane = ControlPlane::on_node1(&topo);
    plane.put_workload(pod_workload(&topo, "client", "node1"));
    let mut server = pod_workload(&topo, "server", "node2");
    server.services.insert(
        format!("default/{ECHO}"),
        pb::PortList {
            ports: vec![pb::Port {
                service_port: 80,
                target_port: u32::from(PORT),
                ..Default::default()
            }],
        },
    );
    plane.put_workload(server);
    let vip6: std::net::Ipv6Addr = VIP6.parse().unwrap();
    plane.put_service(pb::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: ECHO.into(),
        addresses: [VIP4.to_vec(), vip6.octets().to_vec()]
            .into_iter()
            .map(|address| pb::NetworkAddress {
                network: String::new(),
                address,
                length: None,
            })
            .collect(),
        ports: vec![pb::Port {
            service_port: 80,
            target_port: u32::from(PORT),
            ..Default::default()
        }],
        ..Default::default()
    });
    let mesh1 = plane.start_mesh_node(&topo, "node1");
    let _mesh2 = plane.start_mesh_node(&topo, "node2");
    let _server = serve_all(&topo, "server");

    let client = topo.pod("client");
    let server = topo.pod("server");
    for (vip, family, endpoint, client_ip) in [
        (
            SocketAddr::new(IpAddr::V6(vip6), 80),
            "IPv6",
            SocketAddr::new(IpAddr::V6(server.ipv6()), PORT),
            IpAddr::V6(client.ipv6()),
        ),
        (
            SocketAddr::new(IpAddr::from(VIP4), 80),
            "IPv4",
            SocketAddr::new(IpAddr::V4(server.ip), PORT),
            IpAddr::V4(client.ip),
        ),
    ] {
        let run = topo.connect_from("client", vip, 256 * 1024, 2);
        all_ok(&run, 2, 256 * 1024);
        for conn in &run.ok {
            assert_eq!(conn.peer, vip, "{family}: getpeername() shows the VIP");
            assert_eq!(
                conn.server_local.ip().to_canonical(),
                endpoint.ip(),
                "{family}: {conn:?}"
            );
            assert_eq!(
                conn.server_saw.ip().to_canonical(),
                client_ip,
                "{family}: {conn:?}"
            );
        }
        eventually(
            &format!("{family}: node1 logs the tunnel to {endpoint}"),
            || {
                closed(
                    &mesh1,
                    &[
                        "outbound connection closed",
                        "route=hbone",
                        &format!("original_dst={vip}"),
                        &format!("dst={endpoint}"),
                    ],
                ) == 2
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", mesh1.log_text()));
    }
}

/// Pods with only an IPv6 address, calling and called: enrolled with it alone, tunnelled over
/// IPv6 both ways, each side seeing the other by that address.
#[test]
fn an_ipv6_only_pod_is_enrolled_and_carried() {
    if !privileged() {
        return;
    }
    let topo = Topology::two_nodes_dual_stack(
        vec![PodSpec::enrolled("client").ipv6_only()],
        vec![
            PodSpec::enrolled("server"),
            PodSpec::enrolled("server6").ipv6_only(),
        ],
    );
    let mesh1 = MeshNode::start_hbone(&topo, "node1", &[]).expect("mesh-node node1");
    let _mesh2 = MeshNode::start_hbone(&topo, "node2", &[]).expect("mesh-node node2");
    let _server = serve_all(&topo, "server");
    let _server6 = serve_all(&topo, "server6");
    let client6 = IpAddr::V6(topo.pod("client").ipv6());

    let run = topo.connect_from("client", v6(&topo, "server"), 1 << 20, 2);
    all_ok(&run, 2, 1 << 20);
    for conn in &run.ok {
        assert_eq!(conn.server_saw.ip(), client6, "{conn:?}");
    }
    let run = topo.connect_from("client", v6(&topo, "server6"), 1 << 20, 1);
    all_ok(&run, 1, 1 << 20);
    assert_eq!(run.ok[0].server_saw.ip(), client6, "{:?}", run.ok[0]);
    assert!(
        wait_for(|| closed(&mesh1, &["outbound connection closed", "route=hbone"]) == 3),
        "{}",
        mesh1.log_text()
    );
    let pods = bpf_json(&topo, "node1", &["pods"]);
    assert_eq!(
        pods[0]["ips"],
        serde_json::json!([client6.to_string()]),
        "{pods}"
    );
    assert_eq!(
        pods[0]["original_source"],
        serde_json::json!(["ipv6"]),
        "{pods}"
    );
}
