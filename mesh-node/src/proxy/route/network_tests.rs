//! The routing decision in a multi-network mesh, as istiod describes one: our network is "",
//! the other is "net2", whose endpoints of the global service `echo` are one synthetic
//! workload (no address, `network_gateway` set, `capacity` = how many) behind the east-west
//! gateway at 192.0.2.10.
use std::net::SocketAddr;

use super::tests::*;
use super::*;
use crate::{
    proto::workload::{self as pb, gateway_address::Destination as PbDestination},
    state::convert,
};

const GATEWAY_IP: &str = "192.0.2.10";
const ECHO_HOST: &str = "echo.default.svc.cluster.local";

fn gateway_identity() -> Identity {
    Identity::new("cluster.local", "istio-system", "istio-eastwestgateway")
}

fn gateway_at(network: &str, ip: &str, port: u32) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(PbDestination::Address(pb::NetworkAddress {
            network: network.into(),
            address: bytes(ip),
            length: None,
        })),
        hbone_mtls_port: port,
    }
}

/// The synthetic workload for net2's `capacity` endpoints of echo.
fn remote_echo(capacity: u32) -> pb::Workload {
    let mut w = pb_workload("net2/echo", GATEWAY_IP);
    w.addresses.clear();
    w.service_account.clear();
    w.network = "net2".into();
    w.cluster_id = "cluster2".into();
    w.network_gateway = Some(gateway_at("net2", GATEWAY_IP, 15008));
    w.capacity = Some(capacity);
    w.services.insert(
        format!("default/{ECHO_HOST}"),
        pb::PortList {
            ports: vec![port(80, 8080)],
        },
    );
    w
}

fn gateway_workload() -> pb::Workload {
    let mut w = pb_workload("NetworkGateway/net2/192.0.2.10/15008", GATEWAY_IP);
    w.namespace = "istio-system".into();
    w.service_account = "istio-eastwestgateway".into();
    w.network = "net2".into();
    w
}

fn lb(mode: pb::load_balancing::Mode, scopes: &[pb::load_balancing::Scope]) -> pb::LoadBalancing {
    pb::LoadBalancing {
        routing_preference: scopes.iter().map(|s| *s as i32).collect(),
        mode: mode as i32,
        health_policy: 0,
    }
}

/// The usual mesh (client, a local echo endpoint, a waypoint) plus net2's endpoints of echo
/// and its gateway; `local` false removes the local endpoint.
fn multi_network(local: bool, edit_echo: impl FnOnce(&mut pb::Service)) -> State {
    let mut state = mesh(|_| {}, edit_echo);
    if !local {
        state.remove_workload("server");
    }
    for w in [remote_echo(3), gateway_workload()] {
        state.upsert_workload(convert::workload(w, "cluster.local").unwrap());
    }
    state
}

fn gateway(route: Route<String>) -> GatewayTunnel {
    match route {
        Route::Gateway(tunnel) => tunnel,
        other => panic!("expected double HBONE through a gateway, got {other:?}"),
    }
}

fn refused(route: Route<String>) -> String {
    match route {
        Route::Refused(reason) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Routes `n` connections to echo's VIP with a seeded random source; how many went remote.
fn remote_share(state: &State, n: usize) -> usize {
    let mut rng = fastrand::Rng::with_seed(7);
    let source = Source {
        ip: CLIENT.parse().unwrap(),
        namespace: "default",
        identity: &client_identity(),
    };
    let mut remote = 0;
    for _ in 0..n {
        let route = decide(
            state,
            &NodeInfo::default(),
            &source,
            addr("10.96.0.10:80"),
            |_| None::<String>,
            &mut || rng.u64(..),
        );
        match route {
            Route::Gateway(_) => remote += 1,
            Route::Hbone(_) => {}
            other => panic!("unexpected route {other:?}"),
        }
    }
    remote
}

#[test]
fn a_service_served_only_on_another_network_goes_through_its_gateway() {
    let sans = vec!["spiffe://cluster.local/ns/default/sa/echo".to_owned()];
    let state = multi_network(false, |s| s.subject_alt_names = sans.clone());
    let t = gateway(route(&state, "10.96.0.10:80"));
    assert_eq!(t.peer, addr("192.0.2.10:15008"));
    // Both layers name the service by hostname and the port the application asked for.
    assert_eq!(t.authority, format!("{ECHO_HOST}:80"));
    assert_eq!(&*t.gateway.uid, "NetworkGateway/net2/192.0.2.10/15008");
    assert!(t.outer_expected.contains(&gateway_identity().into()));
    assert_eq!(
        t.inner_expected,
        vec![San::Identity(Identity::new(
            "cluster.local",
            "default",
            "echo"
        ))]
    );
    assert_eq!(&*t.endpoint.uid, "net2/echo");
    assert!(!t.waypoint);
    assert_eq!(Route::<String>::Gateway(t).name(), "gateway");
}

#[test]
fn the_inner_layer_is_verified_against_the_service_sans_else_the_remote_workloads_identity() {
    // No SANs, but the synthetic workload names a service account: that identity.
    let mut state = multi_network(false, |_| {});
    let mut remote = remote_echo(3);
    remote.service_account = "echo".into();
    state.upsert_workload(convert::workload(remote, "cluster.local").unwrap());
    let t = gateway(route(&state, "10.96.0.10:80"));
    assert_eq!(
        t.inner_expected,
        vec![San::Identity(Identity::new(
            "cluster.local",
            "default",
            "echo"
        ))]
    );
    // Neither: the synthetic workload's identity, its service account defaulted.
    let state = multi_network(false, |_| {});
    let t = gateway(route(&state, "10.96.0.10:80"));
    assert_eq!(
        t.inner_expected,
        vec![San::Identity(Identity::new(
            "cluster.local",
            "default",
            "default"
        ))]
    );
}

#[test]
fn network_failover_stays_local_while_it_can_and_leaves_when_it_must() {
    use pb::load_balancing::{Mode, Scope};
    let failover = |s: &mut pb::Service| {
        s.subject_alt_names = vec!["spiffe://cluster.local/ns/default/sa/server".into()];
        s.load_balancing = Some(lb(Mode::Failover, &[Scope::Network]));
    };
    // Capacity 3 remote against 1 local: a plain spread would send most away.
    assert_eq!(remote_share(&multi_network(true, failover), 200), 0);
    assert_eq!(remote_share(&multi_network(false, failover), 200), 200);
    // Network first, then region: every local endpoint outranks every remote one.
    let network_then_region = |s: &mut pb::Service| {
        s.subject_alt_names = vec!["spiffe://cluster.local/ns/default/sa/server".into()];
        s.load_balancing = Some(lb(Mode::Failover, &[Scope::Network, Scope::Region]));
    };
    assert_eq!(
        remote_share(&multi_network(true, network_then_region), 200),
        0
    );
}

#[test]
fn strict_network_never_leaves() {
    use pb::load_balancing::{Mode, Scope};
    let strict = |s: &mut pb::Service| {
        s.subject_alt_names = vec!["spiffe://cluster.local/ns/default/sa/server".into()];
        s.load_balancing = Some(lb(Mode::Strict, &[Scope::Network]));
    };
    assert_eq!(remote_share(&multi_network(true, strict), 200), 0);
    let reason = refused(route(&multi_network(false, strict), "10.96.0.10:80"));
    assert!(reason.contains("STRICT"), "{reason}");
}

#[test]
fn without_a_preference_the_spread_follows_capacity() {
    let sans = |s: &mut pb::Service| {
        s.subject_alt_names = vec!["spiffe://cluster.local/ns/default/sa/server".into()];
    };
    // One local endpoint (capacity 1) against three remote: 75 % remote. An even split
    // between the two workloads would give 50 %.
    let remote = remote_share(&multi_network(true, sans), 4000);
    assert!(
        (2800..=3200).contains(&remote),
        "{remote} of 4000 went remote"
    );
}

#[test]
fn a_missing_or_unknown_gateway_refuses_with_the_network() {
    let sans = |s: &mut pb::Service| {
        s.subject_alt_names = vec!["spiffe://cluster.local/ns/default/sa/echo".into()];
    };
    // The gateway's address names no workload or service we know.
    let mut state = multi_network(false, sans);
    state.remove_workload("NetworkGateway/net2/192.0.2.10/15008");
    let reason = refused(route(&state, "10.96.0.10:80"));
    assert!(
        reason.contains("no gateway for network \"net2\""),
        "{reason}"
    );
    // A remote endpoint with an address but no gateway: unreachable, said so.
    let mut state = multi_network(false, sans);
    let mut remote = remote_echo(3);
    remote.network_gateway = None;
    remote.addresses = vec![bytes("10.20.0.7")];
    state.upsert_workload(convert::workload(remote, "cluster.local").unwrap());
    let reason = refused(route(&state, "10.96.0.10:80"));
    assert!(
        reason.contains("no gateway for network \"net2\""),
        "{reason}"
    );
    // Neither address nor gateway: not an endpoint at all.
    let mut state = multi_network(false, sans);
    let mut remote = remote_echo(3);
    remote.network_gateway = None;
    state.upsert_workload(convert::workload(remote, "cluster.local").unwrap());
    let reason = refused(route(&state, "10.96.0.10:80"));
    assert!(reason.contains("no healthy endpoint"), "{reason}");
}

#[test]
fn a_gateway_named_by_hostname_is_one_of_its_services_endpoints() {
    let mut state = multi_network(false, |s| {
        s.subject_alt_names = vec!["spiffe://cluster.local/ns/default/sa/echo".into()];
    });
    let host = "eastwest.istio-system.svc.cluster.local";
    let mut gw = gateway_workload();
    gw.services.insert(
        format!("istio-system/{host}"),
        pb::PortList {
            ports: vec![port(15009, 15009)],
        },
    );
    state.upsert_workload(convert::workload(gw, "cluster.local").unwrap());
    let mut gw_service = pb_service(host, "10.96.20.1", None);
    gw_service.namespace = "istio-system".into();
    state.upsert_service(convert::service(gw_service).unwrap());
    let mut remote = remote_echo(3);
    remote.network_gateway = Some(pb::GatewayAddress {
        destination: Some(PbDestination::Hostname(pb::NamespacedHostname {
            namespace: "istio-system".into(),
            hostname: host.into(),
        })),
        hbone_mtls_port: 15009,
    });
    state.upsert_workload(convert::workload(remote, "cluster.local").unwrap());
    let t = gateway(route(&state, "10.96.0.10:80"));
    assert_eq!(t.peer, addr("192.0.2.10:15009"));
    assert!(t.outer_expected.contains(&gateway_identity().into()));
}

#[test]
fn another_networks_pod_address_is_unknown_here_and_passes_through() {
    let state = multi_network(false, |_| {});
    // The gateway's own workload is on net2: its address is not one of ours either.
    for dst in ["10.20.0.7:8080", "192.0.2.10:8080"] {
        match route(&state, dst) {
            Route::Passthrough(to) => assert_eq!(to, dst.parse::<SocketAddr>().unwrap()),
            other => panic!("{dst}: expected passthrough, got {other:?}"),
        }
    }
}

#[test]
fn a_services_waypoint_on_another_network_is_reached_through_the_gateway() {
    let mut state = multi_network(false, |s| {
        s.subject_alt_names = vec!["spiffe://cluster.local/ns/default/sa/echo".into()];
        s.waypoint = Some(gateway_at("net2", "10.20.0.99", 15008));
    });
    let mut waypoint = pb_workload("net2/waypoint", "10.20.0.99");
    waypoint.service_account = "waypoint".into();
    waypoint.network = "net2".into();
    waypoint.network_gateway = Some(gateway_at("net2", GATEWAY_IP, 15008));
    state.upsert_workload(convert::workload(waypoint, "cluster.local").unwrap());
    let t = gateway(route(&state, "10.96.0.10:80"));
    assert!(t.waypoint);
    assert_eq!(t.authority, format!("{ECHO_HOST}:80"));
    assert_eq!(&*t.endpoint.uid, "net2/waypoint");
}
