use std::{collections::HashMap, net::IpAddr};

use super::{
    convert::{self, Address},
    lb::{self, Choice, LbError, Origin},
    *,
};
use crate::proto::{security, workload as pb};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn bytes(text: &str) -> Vec<u8> {
    match ip(text) {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// A workload message as istiod would send it.
fn pb_workload(uid: &str, ips: &[&str]) -> pb::Workload {
    pb::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        service_account: "sa".into(),
        addresses: ips.iter().map(|i| bytes(i)).collect(),
        node: "node-a".into(),
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

fn workload(uid: &str, ips: &[&str]) -> Workload {
    convert::workload(pb_workload(uid, ips), "cluster.local").unwrap()
}

/// An endpoint of "default/svc.example" on port 80 → 8080.
fn endpoint(uid: &str, ip: &str, edit: impl FnOnce(&mut pb::Workload)) -> Workload {
    let mut w = pb_workload(uid, &[ip]);
    w.services.insert(
        "default/svc.example".into(),
        pb::PortList {
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 8080,
                ..Default::default()
            }],
        },
    );
    edit(&mut w);
    convert::workload(w, "cluster.local").unwrap()
}

fn pb_service(lb: Option<pb::LoadBalancing>) -> pb::Service {
    pb::Service {
        name: "svc".into(),
        namespace: "default".into(),
        hostname: "svc.example".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: bytes("10.96.0.10"),
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            ..Default::default()
        }],
        load_balancing: lb,
        ..Default::default()
    }
}

fn service(lb: Option<pb::LoadBalancing>) -> Service {
    convert::service(pb_service(lb)).unwrap()
}

/// A deterministic xorshift random source.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn origin_workload() -> Workload {
    endpoint("client", "10.0.0.100", |w| {
        w.services.clear();
        w.node = "node-a".into();
        w.locality = Some(pb::Locality {
            region: "r1".into(),
            zone: "z1".into(),
            subzone: String::new(),
        });
    })
}

/// Counts picks per endpoint uid over `n` connections.
fn spread(state: &State, service: &Service, origin: &Workload, n: usize) -> HashMap<String, usize> {
    let mut random = rng(7);
    let mut counts = HashMap::new();
    for _ in 0..n {
        match lb::pick(state, service, 80, &Origin::of(origin), &mut random).unwrap() {
            Choice::Endpoint(e) => *counts.entry(e.workload.uid.to_string()).or_default() += 1,
            Choice::Passthrough => panic!("unexpected passthrough"),
        }
    }
    counts
}

#[test]
fn finds_workloads_by_any_address_and_forgets_old_ones() {
    let mut state = State::new();
    state.upsert_workload(workload("a", &["10.0.0.1", "fd00::1"]));
    assert_eq!(&*state.workload_by_ip("", ip("fd00::1")).unwrap().uid, "a");
    assert_eq!(
        &*state.workload_by_ip("", ip("::ffff:10.0.0.1")).unwrap().uid,
        "a"
    );
    assert!(state.workload_by_ip("other-net", ip("10.0.0.1")).is_none());
    state.upsert_workload(workload("a", &["10.0.0.2"]));
    assert!(state.workload_by_ip("", ip("10.0.0.1")).is_none());
    assert_eq!(&*state.workload_by_ip("", ip("10.0.0.2")).unwrap().uid, "a");
    assert_eq!(state.workload_count(), 1);
}

#[test]
fn removing_a_workload_keeps_an_address_another_took_over() {
    let mut state = State::new();
    state.upsert_workload(workload("a", &["10.0.0.1"]));
    state.upsert_workload(workload("b", &["10.0.0.1"]));
    state.remove_workload("a");
    let found = state.workload_by_ip("", ip("10.0.0.1")).unwrap();
    assert_eq!(&*found.uid, "b");
    assert_eq!(
        found.identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/sa"
    );
}

#[test]
fn service_vips_and_endpoints_follow_upserts_and_removals() {
    let mut state = State::new();
    state.upsert_workload(endpoint("e1", "10.0.1.1", |_| {}));
    // The service arrives after its endpoint: the endpoint is already waiting for it.
    state.upsert_service(service(None));
    assert!(matches!(
        state.lookup("", ip("10.96.0.10"), None),
        Some(Destination::Service(s)) if s.key() == "default/svc.example"
    ));
    assert_eq!(state.endpoints("default/svc.example").count(), 1);
    assert!(state.remove_address("e1"));
    assert_eq!(state.endpoints("default/svc.example").count(), 0);
    assert!(state.remove_address("default/svc.example"));
    assert!(state.lookup("", ip("10.96.0.10"), None).is_none());
    assert!(!state.remove_address("default/svc.example"));
}

#[test]
fn spreads_evenly_without_weights() {
    let mut state = State::new();
    for i in 0..4 {
        state.upsert_workload(endpoint(&format!("e{i}"), &format!("10.0.1.{i}"), |_| {}));
    }
    let svc = service(None);
    state.upsert_service(svc.clone());
    let counts = spread(&state, &svc, &origin_workload(), 4000);
    assert_eq!(counts.len(), 4);
    for (uid, n) in counts {
        assert!((800..1200).contains(&n), "{uid} got {n} of 4000");
    }
}

#[test]
fn follows_capacity_weights_and_skips_zero_capacity() {
    let mut state = State::new();
    state.upsert_workload(endpoint("heavy", "10.0.1.1", |w| w.capacity = Some(3)));
    state.upsert_workload(endpoint("light", "10.0.1.2", |_| {}));
    state.upsert_workload(endpoint("drained", "10.0.1.3", |w| w.capacity = Some(0)));
    let svc = service(None);
    let counts = spread(&state, &svc, &origin_workload(), 4000);
    assert_eq!(counts.get("drained"), None);
    let heavy = counts["heavy"] as f64 / 4000.0;
    assert!((0.70..0.80).contains(&heavy), "heavy share {heavy}");
}

#[test]
fn maps_the_target_port_per_workload() {
    let mut state = State::new();
    state.upsert_workload(endpoint("e1", "10.0.1.1", |w| {
        w.services.get_mut("default/svc.example").unwrap().ports[0].target_port = 9090;
    }));
    let svc = service(None);
    let Choice::Endpoint(chosen) = lb::pick(
        &state,
        &svc,
        80,
        &Origin::of(&origin_workload()),
        &mut rng(1),
    )
    .unwrap() else {
        panic!("expected an endpoint")
    };
    assert_eq!((chosen.ip, chosen.port), (Some(ip("10.0.1.1")), 9090));
    assert_eq!(
        lb::pick(
            &state,
            &svc,
            81,
            &Origin::of(&origin_workload()),
            &mut rng(1)
        )
        .unwrap_err(),
        LbError::NoSuchPort {
            service: "default/svc.example".into(),
            port: 81
        }
    );
}

#[test]
fn skips_unhealthy_endpoints_unless_allowed() {
    let mut state = State::new();
    state.upsert_workload(endpoint("sick", "10.0.1.1", |w| {
        w.status = pb::WorkloadStatus::Unhealthy as i32;
    }));
    let origin = origin_workload();
    let svc = service(None);
    assert!(matches!(
        lb::pick(&state, &svc, 80, &Origin::of(&origin), &mut rng(1)),
        Err(LbError::NoEndpoint { .. })
    ));
    let svc = service(Some(pb::LoadBalancing {
        health_policy: pb::load_balancing::HealthPolicy::AllowAll as i32,
        ..Default::default()
    }));
    assert!(lb::pick(&state, &svc, 80, &Origin::of(&origin), &mut rng(1)).is_ok());
}

fn preference(mode: pb::load_balancing::Mode) -> Option<pb::LoadBalancing> {
    use pb::load_balancing::Scope;
    Some(pb::LoadBalancing {
        routing_preference: vec![Scope::Region as i32, Scope::Zone as i32, Scope::Node as i32],
        mode: mode as i32,
        ..Default::default()
    })
}

fn located(uid: &str, ip: &str, zone: &str, node: &str) -> Workload {
    endpoint(uid, ip, |w| {
        w.node = node.into();
        w.locality = Some(pb::Locality {
            region: "r1".into(),
            zone: zone.into(),
            subzone: String::new(),
        });
    })
}

#[test]
fn failover_prefers_the_closest_endpoints_and_moves_when_they_vanish() {
    let mut state = State::new();
    state.upsert_workload(located("same-node", "10.0.1.1", "z1", "node-a"));
    state.upsert_workload(located("same-zone", "10.0.1.2", "z1", "node-b"));
    state.upsert_workload(located("other-zone", "10.0.1.3", "z2", "node-c"));
    let svc = service(preference(pb::load_balancing::Mode::Failover));
    let origin = origin_workload();
    let only = |state: &State| {
        spread(state, &svc, &origin, 200)
            .into_keys()
            .collect::<Vec<_>>()
    };
    assert_eq!(only(&state), ["same-node"]);
    state.remove_workload("same-node");
    assert_eq!(only(&state), ["same-zone"]);
    state.remove_workload("same-zone");
    assert_eq!(only(&state), ["other-zone"]);
}

#[test]
fn unspecified_mode_is_standard_and_ignores_the_preference() {
    let mut state = State::new();
    state.upsert_workload(located("same-node", "10.0.1.1", "z1", "node-a"));
    state.upsert_workload(located("other-zone", "10.0.1.3", "z2", "node-c"));
    let svc = service(preference(pb::load_balancing::Mode::UnspecifiedMode));
    let counts = spread(&state, &svc, &origin_workload(), 400);
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.values().all(|n| *n > 120), "{counts:?}");
}

#[test]
fn a_shared_vip_resolves_to_the_service_the_caller_may_see() {
    let mut state = State::new();
    let mut public = pb_service(None);
    public.namespace = "aaa".into();
    let mut own = pb_service(None);
    own.namespace = "shop".into();
    own.visibility = pb::service::Visibility::Namespace as i32;
    let mut hidden = pb_service(None);
    hidden.namespace = "zzz".into();
    hidden.visibility = pb::service::Visibility::Namespace as i32;
    for s in [public, own, hidden] {
        state.upsert_service(convert::service(s).unwrap());
    }
    let at = |state: &State, ns: Option<&str>| {
        state
            .service_at("", ip("10.96.0.10"), ns)
            .map(|s| s.namespace.clone())
    };
    assert_eq!(
        at(&state, Some("shop")).as_deref(),
        Some("shop"),
        "own namespace first"
    );
    assert_eq!(at(&state, Some("zzz")).as_deref(), Some("zzz"));
    assert_eq!(
        at(&state, Some("other")).as_deref(),
        Some("aaa"),
        "only the public one"
    );
    state.remove_service("aaa/svc.example");
    assert_eq!(at(&state, Some("other")), None);
    assert_eq!(at(&state, Some("shop")).as_deref(), Some("shop"));
}

#[test]
fn strict_refuses_when_no_endpoint_matches_every_scope() {
    let mut state = State::new();
    state.upsert_workload(located("same-zone", "10.0.1.2", "z1", "node-b"));
    let svc = service(preference(pb::load_balancing::Mode::Strict));
    let origin = origin_workload();
    let error = lb::pick(&state, &svc, 80, &Origin::of(&origin), &mut rng(1)).unwrap_err();
    assert!(
        error.to_string().contains("STRICT routing preference"),
        "{error}"
    );
    state.upsert_workload(located("same-node", "10.0.1.1", "z1", "node-a"));
    assert_eq!(
        spread(&state, &svc, &origin, 100)
            .into_keys()
            .collect::<Vec<_>>(),
        ["same-node"]
    );
}

#[test]
fn passthrough_mode_selects_nothing() {
    let state = State::new();
    let svc = service(Some(pb::LoadBalancing {
        mode: pb::load_balancing::Mode::Passthrough as i32,
        ..Default::default()
    }));
    assert!(matches!(
        lb::pick(
            &state,
            &svc,
            80,
            &Origin::of(&origin_workload()),
            &mut rng(1)
        ),
        Ok(Choice::Passthrough)
    ));
}

#[test]
fn endpoints_on_other_networks_are_chosen_only_with_a_way_there() {
    let origin = origin_workload();
    let origin = Origin::of(&origin);
    let svc = service(None);
    // An address on another network: chosen, for the route to send through its gateway (or
    // refuse, having none).
    let mut state = State::new();
    state.upsert_workload(endpoint("remote", "10.0.1.1", |w| {
        w.network = "net2".into()
    }));
    match lb::pick(&state, &svc, 80, &origin, &mut rng(1)) {
        Ok(Choice::Endpoint(chosen)) => assert!(chosen.is_remote(&origin)),
        other => panic!("expected the remote endpoint, got {other:?}"),
    }
    // No address and no gateway: nothing to reach it by.
    let mut state = State::new();
    state.upsert_workload(endpoint("remote", "10.0.1.1", |w| {
        w.network = "net2".into();
        w.addresses.clear();
    }));
    assert!(matches!(
        lb::pick(&state, &svc, 80, &origin, &mut rng(1)),
        Err(LbError::NoEndpoint { .. })
    ));
}

#[test]
fn conversion_refuses_bad_fields_by_name() {
    let mut w = pb_workload("w1", &["10.0.0.1"]);
    w.addresses.push(vec![1, 2, 3]);
    let error = convert::workload(w, "cluster.local").unwrap_err();
    assert_eq!(
        error.to_string(),
        "workload \"w1\": addresses[1]: 3 bytes is not an IPv4 (4) or IPv6 (16) address"
    );
    let mut w = pb_workload("w1", &["10.0.0.1"]);
    w.tunnel_protocol = 7;
    assert!(
        convert::workload(w, "cluster.local")
            .unwrap_err()
            .to_string()
            .ends_with("tunnel_protocol: unknown enum value 7")
    );
    let mut s = pb_service(None);
    s.ports[0].target_port = 70000;
    assert_eq!(
        convert::service(s).unwrap_err().to_string(),
        "service \"default/svc.example\": ports[0]: port 70000 is above 65535"
    );
    let mut s = pb_service(None);
    s.subject_alt_names = vec![" ".into()];
    assert!(convert::service(s).unwrap_err().field == "subject_alt_names[0]");
    let address = convert::address(
        pb::Address {
            r#type: Some(pb::address::Type::Service(pb_service(None))),
        },
        "cluster.local",
    )
    .unwrap();
    assert!(matches!(address, Address::Service(_)));
}

fn pb_policy(namespace: &str, name: &str, scope: security::Scope) -> security::Authorization {
    security::Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope: scope as i32,
        action: security::Action::Deny as i32,
        rules: vec![security::Rule { clauses: vec![] }],
        dry_run: false,
        extensions: vec![],
    }
}

#[test]
fn policies_for_a_workload_are_global_its_namespace_and_those_that_select_it() {
    use security::Scope as S;
    let mut state = State::new();
    for (ns, name, scope) in [
        ("istio-system", "mesh-wide", S::Global),
        ("default", "ns-wide", S::Namespace),
        ("other", "ns-wide", S::Namespace),
        ("default", "picked", S::WorkloadSelector),
        ("default", "not-picked", S::WorkloadSelector),
    ] {
        state.upsert_policy(convert::authorization(pb_policy(ns, name, scope)).unwrap());
    }
    let selected: Vec<std::sync::Arc<str>> = vec!["default/picked".into(), "default/absent".into()];
    let keys: Vec<String> = state
        .policies_for("default", &selected)
        .map(|p| p.key())
        .collect();
    assert_eq!(
        keys,
        [
            "istio-system/mesh-wide",
            "default/ns-wide",
            "default/picked"
        ]
    );
    // A policy moving to another scope leaves its old index.
    state.upsert_policy(
        convert::authorization(pb_policy("default", "ns-wide", S::WorkloadSelector)).unwrap(),
    );
    assert_eq!(state.policies_for("default", &[]).count(), 1);
    assert!(state.remove_policy("istio-system/mesh-wide"));
    assert_eq!(state.policies_for("default", &[]).count(), 0);
}

#[test]
fn the_authz_version_moves_only_for_changes_policy_depends_on() {
    let mut state = State::new();
    let mut seen = state.authz_version();
    let mut moved = |state: &State| {
        let now = state.authz_version();
        std::mem::replace(&mut seen, now) != now
    };
    state.upsert_workload(workload("a", &["10.0.0.1"]));
    assert!(moved(&state), "a new workload");
    let mut w = pb_workload("a", &["10.0.0.1"]);
    w.canonical_name = "renamed".into();
    state.upsert_workload(convert::workload(w.clone(), "cluster.local").unwrap());
    assert!(!moved(&state), "a label change");
    w.authorization_policies = vec!["default/p".into()];
    state.upsert_workload(convert::workload(w, "cluster.local").unwrap());
    assert!(moved(&state), "a selecting policy");
    state.upsert_workload(workload("a", &["10.0.0.2"]));
    assert!(moved(&state), "new addresses");
    state.upsert_policy(
        convert::authorization(pb_policy("default", "p", security::Scope::Namespace)).unwrap(),
    );
    assert!(moved(&state), "a policy");
    state.remove_workload("a");
    assert!(moved(&state), "a removal");
}

#[test]
fn policy_conversion_names_the_bad_field() {
    let with_match = |m: security::Match| {
        let mut p = pb_policy("default", "p", security::Scope::Namespace);
        p.rules = vec![security::Rule {
            clauses: vec![security::Clause { matches: vec![m] }],
        }];
        convert::authorization(p).unwrap_err().to_string()
    };
    let at = "rules[0].clauses[0].matches[0]";
    let error = with_match(security::Match {
        source_ips: vec![security::Address {
            address: vec![10, 0, 0],
            length: 8,
        }],
        ..Default::default()
    });
    assert!(
        error.contains("default/p")
            && error.contains(&format!("{at}.source_ips[0]"))
            && error.contains("3 bytes is not an IPv4"),
        "{error}"
    );
    let error = with_match(security::Match {
        not_destination_ips: vec![security::Address {
            address: vec![10, 0, 0, 0],
            length: 33,
        }],
        ..Default::default()
    });
    assert!(
        error.contains(&format!("{at}.not_destination_ips[0]"))
            && error.contains("prefix length 33 exceeds 32"),
        "{error}"
    );
    let error = with_match(security::Match {
        destination_ports: vec![70000],
        ..Default::default()
    });
    assert!(error.contains("port 70000 is above 65535"), "{error}");
    let error = with_match(security::Match {
        not_principals: vec![security::StringMatch { match_type: None }],
        ..Default::default()
    });
    assert!(
        error.contains(&format!("{at}.not_principals[0]")) && error.contains("no match type"),
        "{error}"
    );
    let mut bad_action = pb_policy("default", "p", security::Scope::Namespace);
    bad_action.action = 7;
    let error = convert::authorization(bad_action).unwrap_err().to_string();
    assert!(
        error.contains("action") && error.contains("unknown enum value 7"),
        "{error}"
    );
    let mut no_namespace = pb_policy("", "p", security::Scope::Global);
    no_namespace.namespace.clear();
    let error = convert::authorization(no_namespace)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("namespace") && error.contains("must not be empty"),
        "{error}"
    );
}

#[test]
fn the_longest_covering_vip_block_wins_and_a_single_vip_beats_any_block() {
    let block = |hostname: &str, addr: &str, length: u32| {
        let mut s = pb_service(None);
        s.hostname = hostname.into();
        s.addresses = vec![pb::NetworkAddress {
            network: String::new(),
            address: bytes(addr),
            length: Some(length),
        }];
        convert::service(s).unwrap()
    };
    let mut state = State::new();
    state.upsert_service(block("wide.example", "10.0.0.0", 8));
    state.upsert_service(block("narrow.example", "10.1.0.0", 16));
    state.upsert_service(block("single.example", "10.1.2.3", 32));
    let at = |ip_text: &str| {
        state
            .service_at("", ip(ip_text), None)
            .map(|s| s.hostname.clone())
    };
    assert_eq!(at("10.1.9.9").as_deref(), Some("narrow.example"));
    assert_eq!(at("10.2.0.1").as_deref(), Some("wide.example"));
    assert_eq!(at("10.1.2.3").as_deref(), Some("single.example"));
    assert_eq!(at("11.0.0.1"), None);
}

/// ztunnel's rule for a preference that starts with NETWORK: every endpoint on the caller's
/// network outranks every other one, and among the others the later scopes still count, so
/// failover goes to the nearest remote region. (Counting matched leading scopes alone would
/// rank both remote endpoints 0 and split between them.)
#[test]
fn network_first_failover_still_prefers_the_nearest_remote_region() {
    let remote = |uid: &str, region: &str| {
        endpoint(uid, "10.0.9.1", |w| {
            w.network = "net2".into();
            w.addresses.clear();
            w.network_gateway = Some(pb::GatewayAddress {
                destination: Some(pb::gateway_address::Destination::Address(
                    pb::NetworkAddress {
                        network: "net2".into(),
                        address: vec![192, 0, 2, 1],
                        length: None,
                    },
                )),
                hbone_mtls_port: 15008,
            });
            w.locality = Some(pb::Locality {
                region: region.into(),
                ..Default::default()
            });
        })
    };
    let mut state = State::new();
    state.upsert_workload(remote("far-region", "r9"));
    state.upsert_workload(remote("same-region", "r1"));
    state.upsert_workload(endpoint("local-other-region", "10.0.1.5", |w| {
        w.locality = Some(pb::Locality {
            region: "r5".into(),
            ..Default::default()
        });
    }));
    let svc = service(Some(pb::LoadBalancing {
        routing_preference: vec![
            pb::load_balancing::Scope::Network as i32,
            pb::load_balancing::Scope::Region as i32,
        ],
        mode: pb::load_balancing::Mode::Failover as i32,
        health_policy: 0,
    }));
    let origin = origin_workload();
    let only = |state: &State| {
        spread(state, &svc, &origin, 200)
            .into_keys()
            .collect::<Vec<_>>()
    };
    // Local beats a remote endpoint in the caller's own region.
    assert_eq!(only(&state), ["local-other-region"]);
    state.remove_workload("local-other-region");
    assert_eq!(only(&state), ["same-region"]);
    state.remove_workload("same-region");
    assert_eq!(only(&state), ["far-region"]);
}

/// A million workloads are held at once: a field that grows every one of them shows here.
#[test]
fn a_workload_stays_small() {
    let size = std::mem::size_of::<super::Workload>();
    assert!(size <= 280, "Workload is {size} bytes");
}
