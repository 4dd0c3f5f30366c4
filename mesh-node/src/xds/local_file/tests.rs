use super::*;
use crate::state::{LbMode, Scope, TunnelProtocol};

fn parse_str(text: &str) -> Result<LocalState, LocalFileError> {
    parse(Path::new("state.yaml"), text, "cluster.local")
}

#[test]
fn reads_workloads_with_defaults() {
    let state = parse_str(
        "workloads:\n  - name: server\n    namespace: default\n    addresses: [10.0.0.7]\n    tunnelProtocol: HBONE\n    serviceAccount: srv\n  - name: legacy\n    namespace: default\n    addresses: [10.0.0.8]\n",
    )
    .unwrap();
    let workloads = state.workloads;
    assert_eq!(&*workloads[0].uid, "default/server");
    assert_eq!(workloads[0].protocol, TunnelProtocol::Hbone);
    assert_eq!(
        workloads[0].identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/srv"
    );
    assert_eq!(workloads[1].protocol, TunnelProtocol::None);
    assert_eq!(&*workloads[1].service_account, "default");
    assert_eq!(workloads[1].capacity, 1);
    assert!(workloads[1].healthy);
}

#[test]
fn reads_services_endpoints_and_policies() {
    let state = parse_str(
        r#"
workloads:
  - name: echo-1
    namespace: default
    addresses: [10.0.0.7]
    tunnelProtocol: HBONE
    capacity: 3
    locality: {region: r1, zone: z1}
    services:
      default/echo.default.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]
services:
  - name: echo
    namespace: default
    hostname: echo.default.svc.cluster.local
    addresses: [10.96.0.10, {network: net2, address: 10.97.0.10}]
    ports: [{servicePort: 80, targetPort: 8080}]
    loadBalancing: {routingPreference: [NODE, ZONE], mode: STRICT}
policies:
  - name: deny-legacy
    namespace: default
    scope: NAMESPACE
    action: DENY
    rules: [{clauses: [{matches: [{namespaces: [{exact: legacy}], sourceIps: [10.0.0.0/8], destinationPorts: [80]}]}]}]
"#,
    )
    .unwrap();
    let w = &state.workloads[0];
    assert_eq!(w.capacity, 3);
    assert_eq!(&*w.locality.zone, "z1");
    assert_eq!(
        w.service_ports("default/echo.default.svc.cluster.local")
            .unwrap()[0]
            .target_port,
        8080
    );
    let s = &state.services[0];
    assert_eq!(s.vips.len(), 2);
    assert_eq!(&*s.vips[1].network, "net2");
    let lb = s.load_balancing.as_ref().unwrap();
    assert_eq!(lb.mode, LbMode::Strict);
    assert_eq!(lb.routing_preference, [Scope::Node, Scope::Zone]);
    let p = &state.policies[0];
    assert_eq!(p.rules[0][0][0].source_ips[0].prefix(), 8);
}

#[test]
fn errors_name_the_file_the_entry_and_the_field() {
    let error = |text: &str| parse_str(text).unwrap_err().to_string();
    assert_eq!(
        error(
            "workloads:\n  - name: a\n    namespace: b\n    addresses: [10.0.0.1]\n    trustDomain: Bad!\n"
        ),
        "local state file state.yaml: workloads[0]: trust_domain: \"Bad!\" may hold only a-z, 0-9, '.', '-' and '_'"
    );
    let e = error("workloads:\n  - name: a\n    namespace: b\n    addresses: [x]\n");
    assert!(
        e.starts_with("local state file state.yaml: workloads[0].addresses[0]")
            && e.contains("line 4"),
        "{e}"
    );
    let e = error(
        "workloads:\n  - name: a\n    namespace: b\n    addresses: [10.0.0.1]\n    tunnelProtocol: QUIC\n",
    );
    assert!(
        e.contains("unknown variant `QUIC`") && e.contains("line 5"),
        "{e}"
    );
    let e = error(
        "workloads:\n  - {name: a, namespace: b, addresses: [10.0.0.1]}\n  - {name: a, namespace: b, addresses: [10.0.0.2]}\n",
    );
    assert!(e.ends_with("workloads[1]: duplicate uid b/a"), "{e}");
    let e = error(
        "services:\n  - name: s\n    namespace: d\n    hostname: s.d\n    ports: [{servicePort: 99999}]\n",
    );
    assert!(
        e.contains("services[0].ports[0].servicePort") && e.contains("line 5"),
        "{e}"
    );
    let e = error(
        "policies:\n  - name: p\n    namespace: d\n    rules: [{clauses: [{matches: [{sourceIps: [10.0.0.0/40]}]}]}]\n",
    );
    assert!(
        e.contains("prefix length must be 0..=32") && e.contains("line 4"),
        "{e}"
    );
    let e = error(
        "services:\n  - {name: s, namespace: d, hostname: s.d, addresses: [10.0.0.1]}\nworkloads:\n  - {name: a, namespace: b, addresses: [10.0.0.1]}\n",
    );
    assert!(
        e.ends_with("services[0]: addresses: 10.0.0.1 is already the address of b/a"),
        "{e}"
    );
}

#[test]
fn the_same_address_may_be_reused_on_another_network() {
    let state = parse_str(
        "workloads:\n  - {name: a, namespace: d, addresses: [10.0.0.1]}\n  - {name: b, namespace: d, addresses: [10.0.0.1], network: net2}\n",
    )
    .unwrap();
    let mut index = State::new();
    state.apply(&mut index);
    assert_eq!(
        &*index
            .workload_by_ip("", "10.0.0.1".parse().unwrap())
            .unwrap()
            .uid,
        "d/a"
    );
    assert_eq!(
        &*index
            .workload_by_ip("net2", "10.0.0.1".parse().unwrap())
            .unwrap()
            .uid,
        "d/b"
    );
}

#[test]
fn reads_waypoints_cidr_vips_visibility_and_service_accounts() {
    use crate::state::{GatewayDestination, NetworkMode, Visibility};
    let state = parse_str(
        r#"
workloads:
  - name: server
    namespace: shop
    addresses: [10.0.0.7]
    tunnelProtocol: HBONE
    waypoint: {hostname: shop/waypoint.shop.svc.cluster.local}
  - name: node-agent
    namespace: kube-system
    addresses: [10.0.0.1]
    hostNetwork: true
services:
  - name: ext
    namespace: shop
    hostname: api.example.com
    addresses: [10.100.0.0/16]
    visibility: NAMESPACE
    waypoint: {address: 10.96.9.9, port: 15009}
policies:
  - name: only-waypoint
    namespace: shop
    scope: WORKLOAD_SELECTOR
    rules: [{clauses: [{matches: [{serviceAccounts: [{namespace: shop, serviceAccount: waypoint}]}]}]}]
"#,
    )
    .unwrap();
    let server = &state.workloads[0];
    assert_eq!(
        server.waypoint.as_ref().unwrap().destination,
        GatewayDestination::Hostname("shop/waypoint.shop.svc.cluster.local".into())
    );
    assert_eq!(server.waypoint.as_ref().unwrap().hbone_mtls_port, 15008);
    assert_eq!(state.workloads[1].network_mode, NetworkMode::HostNetwork);
    let ext = &state.services[0];
    assert_eq!(ext.vips[0].cidr.to_string(), "10.100.0.0/16");
    assert_eq!(ext.visibility, Visibility::Namespace);
    assert_eq!(ext.waypoint.as_ref().unwrap().hbone_mtls_port, 15009);
    let m = &state.policies[0].rules[0][0][0];
    assert_eq!(m.service_accounts[0].name, "waypoint");

    let error = parse_str(
        "policies:\n  - name: p\n    namespace: shop\n    rules: [{clauses: [{matches: [{serviceAccounts: [{namespace: shop, serviceAccount: \"\"}]}]}]}]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains(
            "policies[0]: rules[0].clauses[0].matches[0].service_accounts[0].serviceAccount"
        ),
        "{error}"
    );
}

#[test]
fn a_waypoint_with_both_or_neither_destination_is_refused_by_entry() {
    let both = parse_str(
        "workloads:\n  - name: s\n    namespace: shop\n    addresses: [10.0.0.7]\n    waypoint: {address: 10.0.0.9, hostname: shop/wp.shop.svc}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        both.contains("workloads[0]: waypoint: address and hostname are exclusive"),
        "{both}"
    );
    let neither = parse_str(
        "services:\n  - name: e\n    namespace: shop\n    hostname: e.shop.svc\n    waypoint: {port: 15008}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        neither.contains("services[0]: waypoint: needs an address or a hostname"),
        "{neither}"
    );
}

#[test]
fn reads_another_networks_endpoints_behind_their_gateway() {
    let state = parse_str(
        r#"
workloads:
  - uid: cluster2/net2/echo
    name: echo
    namespace: default
    network: net2
    tunnelProtocol: HBONE
    capacity: 4
    networkGateway: {network: net2, address: 192.0.2.10, port: 15009}
    services:
      default/echo.default.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]
"#,
    )
    .unwrap();
    let w = &state.workloads[0];
    assert!(w.addresses.is_empty());
    assert_eq!(w.capacity, 4);
    assert_eq!(
        w.network_gateway,
        Some(Box::new(crate::state::GatewayAddress {
            destination: crate::state::GatewayDestination::Address {
                network: "net2".into(),
                ip: "192.0.2.10".parse().unwrap(),
            },
            hbone_mtls_port: 15009,
        }))
    );
    let error = parse_str(
        "workloads:\n  - name: w\n    namespace: default\n    networkGateway: {network: net2}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("networkGateway: needs an address or a hostname"),
        "{error}"
    );
}
