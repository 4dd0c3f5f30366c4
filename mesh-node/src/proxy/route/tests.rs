//! The routing decision against a small mesh: waypoints (of services and of workloads, by
//! address and by hostname, weighted), visibility, CIDR VIPs and the same-node shortcut.
use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::{
    proto::workload::{self as pb, gateway_address::Destination as PbDestination},
    state::convert,
};

pub(super) const CLIENT: &str = "10.0.1.2";
pub(super) const SERVER: &str = "10.0.2.5";
const WAYPOINT_POD: &str = "10.0.3.9";
const WAYPOINT_VIP: &str = "10.96.9.9";
pub(super) const ECHO_VIP: &str = "10.96.0.10";
const WAYPOINT_HOST: &str = "waypoint.default.svc.cluster.local";

pub(super) fn bytes(ip: &str) -> Vec<u8> {
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub(super) fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

pub(super) fn pb_workload(name: &str, ip: &str) -> pb::Workload {
    pb::Workload {
        uid: name.into(),
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        addresses: vec![bytes(ip)],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

pub(super) fn port(service_port: u32, target_port: u32) -> pb::Port {
    pb::Port {
        service_port,
        target_port,
        ..Default::default()
    }
}

pub(super) fn pb_service(host: &str, vip: &str, length: Option<u32>) -> pb::Service {
    pb::Service {
        name: host.split('.').next().unwrap_or(host).into(),
        namespace: "default".into(),
        hostname: host.into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: bytes(vip),
            length,
        }],
        ports: vec![port(80, 8080)],
        ..Default::default()
    }
}

fn by_address(ip: &str) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(PbDestination::Address(pb::NetworkAddress {
            network: String::new(),
            address: bytes(ip),
            length: None,
        })),
        hbone_mtls_port: 15008,
    }
}

fn by_hostname(host: &str) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(PbDestination::Hostname(pb::NamespacedHostname {
            namespace: "default".into(),
            hostname: host.into(),
        })),
        hbone_mtls_port: 15008,
    }
}

/// client, server (endpoint of echo), and a waypoint pod behind the waypoint service.
pub(super) fn mesh(
    edit_server: impl FnOnce(&mut pb::Workload),
    edit_echo: impl FnOnce(&mut pb::Service),
) -> State {
    let mut state = State::new();
    let mut server = pb_workload("server", SERVER);
    server.services.insert(
        "default/echo.default.svc.cluster.local".into(),
        pb::PortList {
            ports: vec![port(80, 8080)],
        },
    );
    edit_server(&mut server);
    let mut waypoint = pb_workload("waypoint", WAYPOINT_POD);
    waypoint.services.insert(
        format!("default/{WAYPOINT_HOST}"),
        pb::PortList {
            ports: vec![port(15008, 15008)],
        },
    );
    for w in [pb_workload("client", CLIENT), server, waypoint] {
        state.upsert_workload(convert::workload(w, "cluster.local").unwrap());
    }
    let mut echo = pb_service("echo.default.svc.cluster.local", ECHO_VIP, None);
    edit_echo(&mut echo);
    let mut wp = pb_service(WAYPOINT_HOST, WAYPOINT_VIP, None);
    wp.ports = vec![port(15008, 15008)];
    wp.subject_alt_names = vec!["spiffe://cluster.local/ns/default/sa/waypoint-alias".into()];
    for s in [echo, wp] {
        state.upsert_service(convert::service(s).unwrap());
    }
    state
}

pub(super) fn client_identity() -> Identity {
    Identity::new("cluster.local", "default", "client")
}

/// Routes a connection from `from_ip` (identity `from`) to `dst`; pods in `local` are enrolled
/// here.
pub(super) fn route_from(
    state: &State,
    from_ip: &str,
    from: &Identity,
    namespace: &str,
    dst: &str,
    local: &[&str],
) -> Route<String> {
    let source = Source {
        ip: from_ip.parse().unwrap(),
        namespace,
        identity: from,
    };
    let local: Vec<IpAddr> = local.iter().map(|ip| ip.parse().unwrap()).collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    decide(
        state,
        &NodeInfo::default(),
        &source,
        addr(dst),
        |ip| local.contains(&ip).then(|| ip.to_string()),
        &mut || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        },
    )
}

pub(super) fn route(state: &State, dst: &str) -> Route<String> {
    route_from(state, CLIENT, &client_identity(), "default", dst, &[])
}

pub(super) fn tunnel(route: Route<String>) -> Tunnel {
    match route {
        Route::Hbone(tunnel) => tunnel,
        other => panic!("expected a tunnel, got {other:?}"),
    }
}

fn waypoint_identity() -> San {
    Identity::new("cluster.local", "default", "waypoint").into()
}

#[test]
fn a_service_with_a_waypoint_goes_to_it_with_the_vip_as_authority() {
    for (how, gateway) in [
        ("by hostname", by_hostname(WAYPOINT_HOST)),
        ("by VIP", by_address(WAYPOINT_VIP)),
        ("by pod address", by_address(WAYPOINT_POD)),
    ] {
        let state = mesh(|_| {}, |s| s.waypoint = Some(gateway));
        let t = tunnel(route(&state, "10.96.0.10:80"));
        assert!(t.waypoint, "{how}");
        assert_eq!(t.peer, addr("10.0.3.9:15008"), "{how}");
        assert_eq!(t.authority, addr("10.96.0.10:80"), "{how}");
        assert_eq!(&*t.workload.name, "waypoint", "{how}");
        assert!(t.expected.contains(&waypoint_identity()), "{how}");
    }
    // Through the waypoint's service, its SANs are accepted too.
    let state = mesh(|_| {}, |s| s.waypoint = Some(by_hostname(WAYPOINT_HOST)));
    let t = tunnel(route(&state, "10.96.0.10:80"));
    assert!(t.expected.contains(&San::Identity(Identity::new(
        "cluster.local",
        "default",
        "waypoint-alias"
    ))));
    assert_eq!(Route::<String>::Hbone(t).name(), "waypoint");
}

#[test]
fn a_workload_with_a_waypoint_goes_to_it_unless_the_waypoint_itself_calls() {
    let state = mesh(|w| w.waypoint = Some(by_address(WAYPOINT_VIP)), |_| {});
    let t = tunnel(route(&state, "10.0.2.5:8080"));
    assert!(t.waypoint);
    assert_eq!(t.peer, addr("10.0.3.9:15008"));
    assert_eq!(t.authority, addr("10.0.2.5:8080"));

    // Even when the server is on this node: the waypoint's policy must not be skipped.
    let local = route_from(
        &state,
        CLIENT,
        &client_identity(),
        "default",
        "10.0.2.5:8080",
        &[SERVER],
    );
    assert!(tunnel(local).waypoint);

    // The waypoint's own connection to the workload goes straight to it.
    let waypoint = Identity::new("cluster.local", "default", "waypoint");
    let direct = tunnel(route_from(
        &state,
        WAYPOINT_POD,
        &waypoint,
        "default",
        "10.0.2.5:8080",
        &[],
    ));
    assert!(!direct.waypoint);
    assert_eq!(direct.peer, addr("10.0.2.5:15008"));
    // An impostor at another address with the waypoint's identity is not the waypoint.
    let impostor = route_from(
        &state,
        "10.0.1.77",
        &waypoint,
        "default",
        "10.0.2.5:8080",
        &[],
    );
    assert!(tunnel(impostor).waypoint);
}

#[test]
fn service_addressed_traffic_ignores_the_endpoints_own_waypoint() {
    let state = mesh(|w| w.waypoint = Some(by_address(WAYPOINT_VIP)), |_| {});
    let t = tunnel(route(&state, "10.96.0.10:80"));
    assert!(!t.waypoint);
    assert_eq!(t.peer, addr("10.0.2.5:15008"));
    assert_eq!(t.authority, addr("10.0.2.5:8080"));
}

#[test]
fn an_unknown_waypoint_refuses_rather_than_bypasses() {
    let state = mesh(
        |_| {},
        |s| s.waypoint = Some(by_hostname("ghost.default.svc")),
    );
    match route(&state, "10.96.0.10:80") {
        Route::Refused(reason) => assert!(reason.contains("ghost"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let state = mesh(|w| w.waypoint = Some(by_address("10.0.9.1")), |_| {});
    assert!(matches!(route(&state, "10.0.2.5:8080"), Route::Refused(_)));
}

#[test]
fn weighted_waypoints_take_traffic_by_weight() {
    let state = mesh(
        |_| {},
        |s| {
            s.waypoint = Some(by_address("10.0.9.1")); // unknown: must never be used
            s.weighted_waypoints = vec![
                pb::WeightedWaypoint {
                    destination: Some(by_hostname(WAYPOINT_HOST)),
                    weight: 1,
                },
                pb::WeightedWaypoint {
                    destination: Some(by_address("10.0.9.2")),
                    weight: 0,
                },
            ];
        },
    );
    for _ in 0..20 {
        assert_eq!(
            tunnel(route(&state, "10.96.0.10:80")).peer.ip(),
            ip(WAYPOINT_POD)
        );
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn a_namespace_visible_service_is_not_seen_from_other_namespaces() {
    let state = mesh(
        |_| {},
        |s| s.visibility = pb::service::Visibility::Namespace as i32,
    );
    let outsider = Identity::new("cluster.local", "other", "client");
    assert!(matches!(
        route_from(&state, "10.0.1.3", &outsider, "other", "10.96.0.10:80", &[]),
        Route::Passthrough(dst) if dst == addr("10.96.0.10:80")
    ));
    assert_eq!(
        tunnel(route(&state, "10.96.0.10:80")).authority,
        addr("10.0.2.5:8080")
    );
}

#[test]
fn any_address_of_a_cidr_vip_reaches_its_endpoints() {
    let state = mesh(
        |_| {},
        |s| {
            s.addresses[0] = pb::NetworkAddress {
                network: String::new(),
                address: bytes("10.100.0.0"),
                length: Some(16),
            }
        },
    );
    for dst in ["10.100.0.1:80", "10.100.200.7:80", "10.100.255.255:80"] {
        assert_eq!(
            tunnel(route(&state, dst)).authority,
            addr("10.0.2.5:8080"),
            "{dst}"
        );
    }
    assert!(matches!(
        route(&state, "10.101.0.1:80"),
        Route::Passthrough(_)
    ));
}

#[test]
fn a_local_endpoint_is_delivered_here_and_string_sans_are_expected() {
    let state = mesh(
        |_| {},
        |s| s.subject_alt_names = vec!["echo.example.com".into()],
    );
    match route_from(
        &state,
        CLIENT,
        &client_identity(),
        "default",
        "10.96.0.10:80",
        &[SERVER],
    ) {
        Route::Local { pod, dst } => {
            assert_eq!((pod.as_str(), dst), (SERVER, addr("10.0.2.5:8080")));
        }
        other => panic!("{other:?}"),
    }
    let t = tunnel(route(&state, "10.96.0.10:80"));
    assert!(t.expected.contains(&San::Other("echo.example.com".into())));
    assert!(
        t.expected
            .contains(&Identity::new("cluster.local", "default", "server").into())
    );
}

/// A dual-stack endpoint is called in the family the application used: a service's IPv6 VIP
/// reaches the endpoint's IPv6 address, its IPv4 VIP the IPv4 one (as ztunnel).
#[test]
fn a_dual_stack_endpoint_is_reached_in_the_family_of_the_vip() {
    const SERVER6: &str = "fd00::2:5";
    let state = mesh(
        |w| w.addresses.push(bytes(SERVER6)),
        |s| {
            s.addresses.push(pb::NetworkAddress {
                network: String::new(),
                address: bytes("fd00:96::10"),
                length: None,
            })
        },
    );
    let v6 = tunnel(route_from(
        &state,
        "fd00::1:2",
        &client_identity(),
        "default",
        "[fd00:96::10]:80",
        &[],
    ));
    assert_eq!(v6.peer, addr("[fd00::2:5]:15008"));
    assert_eq!(v6.authority, addr("[fd00::2:5]:8080"));
    let v4 = tunnel(route(&state, "10.96.0.10:80"));
    assert_eq!(v4.peer, addr("10.0.2.5:15008"));
    assert_eq!(v4.authority, addr("10.0.2.5:8080"));
    // A workload called by one of its addresses is called there.
    let direct = tunnel(route(&state, "[fd00::2:5]:8080"));
    assert_eq!(direct.peer, addr("[fd00::2:5]:15008"));
}
