//! Waypoints, as ztunnel handles them at L4: traffic to a service (or a workload) whose
//! waypoint is set is tunnelled to the waypoint, with the original destination as
//! `:authority` and the waypoint's identity verified; what the waypoint forwards is delivered;
//! a client that goes around the waypoint meets istiod's implicit ALLOW for the waypoint's
//! service account and is refused. The waypoint is a stand-in (no Envoy here) that records the
//! CONNECT it got and forwards it.
use std::{net::SocketAddr, sync::Arc};

use mesh_node::{
    hbone::client::{ConnectHeaders, Connection},
    identity::Identity,
    xds::proto::{security as sec, workload as pb},
};
use mesh_tests::{
    PodSpec, Topology,
    control_plane::{ControlPlane, eventually, pod_workload},
    hbone_client, privileged,
    waypoint::Waypoint,
};

const PORT: u16 = 8080;
const ECHO: &str = "echo.default.svc.cluster.local";
const ECHO_VIP: [u8; 4] = [10, 96, 0, 10];
const WAYPOINT: &str = "waypoint.default.svc.cluster.local";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const IMPLICIT: &str = "istio_allow_waypoint_default_waypoint";

fn by_hostname(host: &str) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: "default".into(),
                hostname: host.into(),
            },
        )),
        hbone_mtls_port: 15008,
    }
}

fn service(host: &str, vip: [u8; 4], port: u32, target: u32) -> pb::Service {
    pb::Service {
        name: host.split('.').next().unwrap_or(host).into(),
        namespace: "default".into(),
        hostname: host.into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vip.to_vec(),
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: port,
            target_port: target,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn serves(w: &mut pb::Workload, host: &str, port: u32, target: u32) {
    w.services.insert(
        format!("default/{host}"),
        pb::PortList {
            ports: vec![pb::Port {
                service_port: port,
                target_port: target,
                ..Default::default()
            }],
        },
    );
}

#[test]
fn traffic_for_a_waypoint_goes_through_it_and_going_around_it_is_refused() {
    if !privileged() {
        return;
    }
    let topo = Topology::two_nodes(
        vec![
            PodSpec::enrolled("client"),
            PodSpec::plain("waypoint"),
            PodSpec::plain("rogue"),
        ],
        vec![PodSpec::enrolled("server")],
    );
    let plane = ControlPlane::on_node1(&topo);
    let server_ip = topo.pod("server").ip;
    let server_addr = SocketAddr::from((server_ip, PORT));
    let vip = SocketAddr::from((ECHO_VIP, 80));
    let _echo = topo.serve("server", PORT);
    // The waypoint forwards the service (and the workload) to the server's pod address.
    let waypoint = Waypoint::start(
        &topo,
        "waypoint",
        WAYPOINT_ID,
        Arc::new(move |authority: SocketAddr| {
            (authority == vip || authority == server_addr)
                .then(|| (server_addr, SERVER_ID.parse::<Identity>().unwrap()))
        }),
    )
    .expect("start the waypoint stand-in");

    // As istiod describes it: the server has a waypoint, and so has its service; the waypoint
    // is a workload behind its own service on 15008; the server's workload names the
    // implicit policy that lets the waypoint's service account in.
    plane.put_workload(pod_workload(&topo, "client", "node1"));
    let mut server = pod_workload(&topo, "server", "node2");
    serves(&mut server, ECHO, 80, u32::from(PORT));
    server.waypoint = Some(by_hostname(WAYPOINT));
    server.authorization_policies = vec![format!("default/{IMPLICIT}")];
    plane.put_workload(server);
    let mut wp = pod_workload(&topo, "waypoint", "node1");
    wp.tunnel_protocol = pb::TunnelProtocol::Hbone as i32;
    serves(&mut wp, WAYPOINT, 15008, 15008);
    plane.put_workload(wp);
    let mut echo = service(ECHO, ECHO_VIP, 80, u32::from(PORT));
    echo.waypoint = Some(by_hostname(WAYPOINT));
    plane.put_service(echo);
    plane.put_service(service(WAYPOINT, [10, 96, 0, 20], 15008, 15008));
    plane.put_policy(sec::Authorization {
        name: IMPLICIT.into(),
        namespace: "default".into(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Allow as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    service_accounts: vec![sec::ServiceAccountMatch {
                        namespace: "default".into(),
                        service_account: "waypoint".into(),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    });
    let node1 = plane.start_mesh_node(&topo, "node1");
    let node2 = plane.start_mesh_node(&topo, "node2");

    // Service-addressed: through the waypoint, which is told the VIP.
    let run = topo.connect_from("client", vip, 64 * 1024, 3);
    assert_eq!(run.ok.len(), 3, "{run:?}\n{}", node1.log_text());
    assert!(run.ok.iter().all(|c| c.peer == vip));
    let seen = waypoint.recorded();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for connect in &seen {
        assert_eq!(connect.authority, vip.to_string(), "{connect:?}");
        assert_eq!(
            connect.client, "spiffe://cluster.local/ns/default/sa/client",
            "the waypoint verified the client's node proxy as the client"
        );
        let client_ip = std::net::IpAddr::from(topo.pod("client").ip);
        assert!(
            connect.forwarded_for.is_some_and(|f| f.ip() == client_ip),
            "{connect:?}"
        );
    }
    eventually("node1's access lines", || {
        node1
            .log_lines_with(&["outbound connection closed", "route=waypoint"])
            .len()
            == 3
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node1.log_text()));
    // The destination saw the waypoint as its client and let it in.
    eventually("node2's access lines", || {
        node2
            .log_lines_with(&[
                "reporter=destination",
                "src_identity=spiffe://cluster.local/ns/default/sa/waypoint",
            ])
            .len()
            >= 3
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node2.log_text()));

    // Workload-addressed: through the workload's waypoint, told the pod's address.
    let run = topo.connect_from("client", server_addr, 1024, 1);
    assert_eq!(run.ok.len(), 1, "{run:?}\n{}", node1.log_text());
    let seen = waypoint.recorded();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[3].authority, server_addr.to_string());

    // Around the waypoint: a client holding a mesh certificate tunnels straight to the
    // server's 15008. The implicit policy admits only the waypoint's account: 401.
    let config = hbone_client::client_config(
        &topo.ca_dir(),
        "spiffe://cluster.local/ns/default/sa/client",
        SERVER_ID,
    )
    .unwrap();
    let peer = SocketAddr::from((server_ip, 15008));
    let refused = hbone_client::run_in(&topo.pod("rogue").netns_path(), || async move {
        let tcp = tokio::net::TcpStream::connect(peer).await?;
        let connection = Connection::establish(tcp, peer, config).await?;
        let result = connection
            .connect(&server_addr.to_string(), &ConnectHeaders::default())
            .await;
        anyhow::Ok(result.err().map(|e| e.to_string()))
    })
    .unwrap()
    .unwrap();
    assert!(
        refused.as_deref().is_some_and(|e| e.contains("401")),
        "{refused:?}\n{}",
        node2.log_text()
    );
    assert!(
        !node2
            .log_lines_with(&["connection denied by policy", "no ALLOW policy matched"])
            .is_empty(),
        "{}",
        node2.log_text()
    );

    // A waypoint the control plane no longer knows: refused, never sent around it.
    plane.remove(&format!("default/{WAYPOINT}"));
    plane.remove("cluster1//Pod/default/waypoint");
    eventually("connections to the service to be refused", || {
        topo.connect_from("client", vip, 1024, 1).ok.is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node1.log_text()));
    let before = waypoint.recorded().len();
    let run = topo.connect_from("client", vip, 1024, 1);
    assert!(run.ok.is_empty(), "{run:?}");
    assert!(
        run.errors.iter().all(|e| e.contains("reset")),
        "the application is told: {run:?}"
    );
    assert_eq!(waypoint.recorded().len(), before);
    eventually("the refusal to be logged", || {
        !node1
            .log_lines_with(&[
                "outbound connection refused",
                "is not known to the control plane",
            ])
            .is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", node1.log_text()));
}
