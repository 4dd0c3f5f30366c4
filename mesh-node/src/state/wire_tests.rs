//! Resources written field by field with the numbers of Istio's current `workload.proto` and
//! `authorization.proto`, not with our generated types: these pin our protos to upstream's
//! wire format, then check what the conversion makes of each field.
use std::{net::IpAddr, sync::Arc};

use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint},
};

use super::{
    GatewayDestination, LbMode, NetworkMode, State, Visibility,
    convert::{self, Address},
};
use crate::{
    authz::{Connection, Target, Verdict, evaluate},
    identity::{Identity, San},
    proto::{security, workload as pb},
};

/// A protobuf message built by hand.
#[derive(Default, Clone)]
struct Wire(Vec<u8>);

impl Wire {
    fn varint(mut self, tag: u32, value: u64) -> Self {
        encode_key(tag, WireType::Varint, &mut self.0);
        encode_varint(value, &mut self.0);
        self
    }

    fn bytes(mut self, tag: u32, value: &[u8]) -> Self {
        encode_key(tag, WireType::LengthDelimited, &mut self.0);
        encode_varint(value.len() as u64, &mut self.0);
        self.0.extend_from_slice(value);
        self
    }

    fn string(self, tag: u32, value: &str) -> Self {
        self.bytes(tag, value.as_bytes())
    }

    fn message(self, tag: u32, value: Wire) -> Self {
        self.bytes(tag, &value.0)
    }
}

fn ip(text: &str) -> Vec<u8> {
    match text.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn address(wire: Wire) -> Address {
    let decoded = pb::Address::decode(wire.0.as_slice()).expect("decodes");
    convert::address(decoded, "cluster.local").expect("converts")
}

fn workload(fields: Wire) -> super::Workload {
    match address(Wire::default().message(1, fields)) {
        Address::Workload(w) => Arc::unwrap_or_clone(w),
        Address::Service(_) => panic!("not a workload"),
    }
}

fn service(fields: Wire) -> super::Service {
    match address(Wire::default().message(2, fields)) {
        Address::Service(s) => Arc::unwrap_or_clone(s),
        Address::Workload(_) => panic!("not a service"),
    }
}

/// uid 20, name 1, namespace 2, addresses 3, service_account 7.
fn pod(uid: &str, addr: &str) -> Wire {
    Wire::default()
        .string(20, uid)
        .string(1, uid)
        .string(2, "default")
        .bytes(3, &ip(addr))
        .string(7, uid)
}

/// Service name 1, namespace 2, hostname 3, addresses 4 (NetworkAddress network 1, address 2).
fn svc(host: &str, vip: Wire) -> Wire {
    Wire::default()
        .string(1, host)
        .string(2, "default")
        .string(3, host)
        .message(4, vip)
}

#[test]
fn authorization_service_accounts_are_fields_11_and_12() {
    // Authorization{name 1, namespace 2, scope 3 NAMESPACE, action 4 DENY, rules 5 →
    // clauses 1 → matches 2 → Match{service_accounts 11 → {namespace 1, serviceAccount 2}}}.
    let account = Wire::default().string(1, "default").string(2, "attacker");
    let matched = Wire::default().message(11, account.clone());
    let rule = Wire::default().message(1, Wire::default().message(2, matched));
    let wire = Wire::default()
        .string(1, "deny-attacker")
        .string(2, "default")
        .varint(3, 1)
        .varint(4, 1)
        .message(5, rule);
    let policy = security::Authorization::decode(wire.0.as_slice()).unwrap();
    let policy = convert::authorization(policy).unwrap();
    let m = &policy.rules[0][0][0];
    assert_eq!(m.service_accounts.len(), 1);
    assert_eq!(
        (
            m.service_accounts[0].namespace.as_str(),
            m.service_accounts[0].name.as_str()
        ),
        ("default", "attacker")
    );
    let attacker = Identity::new("cluster.local", "default", "attacker");
    let conn = Connection {
        source: Some(&attacker),
        source_ip: "10.0.0.9".parse().unwrap(),
        destination: "10.0.0.5:8080".parse().unwrap(),
    };
    let target = Target {
        namespace: "default",
        selected_by: &[],
    };
    assert_eq!(
        evaluate([&policy], &target, &conn).verdict,
        Verdict::Denied("default/deny-attacker".into())
    );

    // not_service_accounts is 12.
    let rule = Wire::default().message(
        1,
        Wire::default().message(2, Wire::default().message(12, account)),
    );
    let wire = Wire::default()
        .string(1, "p")
        .string(2, "default")
        .message(5, rule);
    let policy =
        convert::authorization(security::Authorization::decode(wire.0.as_slice()).unwrap())
            .unwrap();
    assert_eq!(policy.rules[0][0][0].not_service_accounts.len(), 1);

    // A service account without a name is refused, by field.
    let rule = Wire::default().message(
        1,
        Wire::default().message(
            2,
            Wire::default().message(11, Wire::default().string(1, "default")),
        ),
    );
    let wire = Wire::default()
        .string(1, "p")
        .string(2, "default")
        .message(5, rule);
    let error = convert::authorization(security::Authorization::decode(wire.0.as_slice()).unwrap())
        .unwrap_err();
    assert_eq!(
        error.field,
        "rules[0].clauses[0].matches[0].service_accounts[0].serviceAccount"
    );
}

#[test]
fn a_cidr_vip_is_network_address_length_3_and_matches_the_whole_range() {
    let vip = Wire::default().bytes(2, &ip("10.100.0.0")).varint(3, 16);
    let range = service(svc("range.example", vip));
    assert!(!range.vips[0].is_host());
    let exact = service(svc(
        "exact.example",
        Wire::default().bytes(2, &ip("10.100.7.7")),
    ));
    assert!(exact.vips[0].is_host());
    let mut state = State::new();
    state.upsert_service(range);
    state.upsert_service(exact);
    let found = |state: &State, addr: &str| {
        state
            .service_at("", addr.parse().unwrap(), None)
            .map(|s| s.hostname.clone())
    };
    assert_eq!(
        found(&state, "10.100.0.0").as_deref(),
        Some("range.example")
    );
    assert_eq!(
        found(&state, "10.100.255.254").as_deref(),
        Some("range.example")
    );
    assert_eq!(
        found(&state, "10.100.7.7").as_deref(),
        Some("exact.example")
    );
    assert_eq!(found(&state, "10.101.0.1"), None);
    state.remove_service("default/range.example");
    assert_eq!(found(&state, "10.100.0.1"), None);

    let too_long = Wire::default().bytes(2, &ip("10.100.0.0")).varint(3, 40);
    let pb = pb::Address::decode(
        Wire::default()
            .message(2, svc("bad.example", too_long))
            .0
            .as_slice(),
    )
    .unwrap();
    let error = convert::address(pb, "cluster.local").unwrap_err();
    assert_eq!(error.field, "addresses[0].length");
}

#[test]
fn waypoints_are_workload_field_8_and_service_field_7() {
    // GatewayAddress{hostname 1 → {namespace 1, hostname 2} | address 2 → NetworkAddress,
    // hbone_mtls_port 3}.
    let by_address = Wire::default()
        .message(2, Wire::default().bytes(2, &ip("10.0.9.9")))
        .varint(3, 15008);
    let w = workload(pod("server", "10.0.0.5").message(8, by_address));
    let waypoint = w.waypoint.expect("waypoint decoded");
    assert_eq!(waypoint.hbone_mtls_port, 15008);
    assert_eq!(
        waypoint.destination,
        GatewayDestination::Address {
            network: "".into(),
            ip: "10.0.9.9".parse().unwrap()
        }
    );
    let by_name = Wire::default()
        .message(
            1,
            Wire::default()
                .string(1, "default")
                .string(2, "waypoint.default.svc.cluster.local"),
        )
        .varint(3, 15008);
    // Service: waypoint 7, ingress_use_waypoint 12, weighted_waypoints 13 →
    // {destination 1, weight 2}, visibility 14.
    let s = service(
        svc("echo", Wire::default().bytes(2, &ip("10.96.0.1")))
            .message(7, by_name.clone())
            .varint(12, 1)
            .message(13, Wire::default().message(1, by_name).varint(2, 3))
            .varint(14, 1),
    );
    assert_eq!(
        s.waypoint.unwrap().destination,
        GatewayDestination::Hostname("default/waypoint.default.svc.cluster.local".into())
    );
    assert!(s.ingress_use_waypoint);
    assert_eq!(s.weighted_waypoints[0].weight, 3);
    assert_eq!(s.visibility, Visibility::Namespace);
}

#[test]
fn legacy_istio_mtls_refuses_the_workload_and_host_network_is_field_25() {
    let pb = pb::Address::decode(
        Wire::default()
            .message(1, pod("legacy", "10.0.0.7").varint(5, 2))
            .0
            .as_slice(),
    )
    .unwrap();
    let error = convert::address(pb, "cluster.local").unwrap_err();
    assert_eq!(error.field, "tunnel_protocol");
    assert!(error.message.contains("LEGACY_ISTIO_MTLS"), "{error}");

    // Two host-network workloads share the node's IP: neither is found by it.
    let mut state = State::new();
    for uid in ["node-exporter", "kube-proxy"] {
        let w = workload(pod(uid, "10.0.0.1").varint(25, 1));
        assert_eq!(w.network_mode, NetworkMode::HostNetwork);
        state.upsert_workload(w);
    }
    assert!(
        state
            .workload_by_ip("", "10.0.0.1".parse().unwrap())
            .is_none()
    );
    assert!(state.workload("kube-proxy").is_some());
}

#[test]
fn hostname_only_workloads_and_string_sans_and_unspecified_mode() {
    // hostname 21, no address.
    let w = workload(
        Wire::default()
            .string(20, "vm")
            .string(1, "vm")
            .string(2, "default")
            .string(21, "vm.example.com"),
    );
    assert_eq!(&*w.hostname, "vm.example.com");
    assert!(w.addresses.is_empty());

    // subject_alt_names 6: a SPIFFE ID is an identity, anything else a name as written.
    let s = service(
        svc("api", Wire::default().bytes(2, &ip("10.96.0.2")))
            .string(6, "api.example.com")
            .string(6, "spiffe://cluster.local/ns/default/sa/api")
            // load_balancing 8 with routing_preference 1 = [ZONE] and no mode.
            .message(8, Wire::default().varint(1, 2)),
    );
    assert_eq!(
        s.subject_alt_names,
        vec![
            San::Other("api.example.com".into()),
            San::Identity(Identity::new("cluster.local", "default", "api")),
        ]
    );
    assert_eq!(s.load_balancing.unwrap().mode, LbMode::Standard);
}

#[test]
fn every_upstream_workload_field_decodes() {
    // Fields of Istio's Workload we decode but do not act on still decode without loss:
    // workload_type 12, native_tunnel 14, application_tunnel 23 {protocol 1, port 2},
    // extensions 26 {name 1}, canonical labels 10/11, workload_name 13, cluster_id 18.
    let w = workload(
        pod("full", "10.0.0.8")
            .string(10, "full-app")
            .string(11, "v1")
            .varint(12, 2)
            .string(13, "full-deploy")
            .varint(14, 1)
            .string(18, "cluster1")
            .message(23, Wire::default().varint(1, 1).varint(2, 15088))
            .message(26, Wire::default().string(1, "ext")),
    );
    assert_eq!(w.workload_type.as_str(), "pod");
    assert!(w.native_tunnel);
    assert_eq!(
        w.application_tunnel.unwrap().protocol,
        crate::state::ApplicationProtocol::Proxy
    );
    assert_eq!(
        (&*w.canonical_name, &*w.workload_name),
        ("full-app", "full-deploy")
    );
    // Port app_protocol 3 on a service port.
    let s = service(
        svc("ports", Wire::default().bytes(2, &ip("10.96.0.3"))).message(
            5,
            Wire::default().varint(1, 80).varint(2, 8080).varint(3, 1),
        ),
    );
    assert_eq!(s.ports[0].app_protocol, "HTTP11");
}
