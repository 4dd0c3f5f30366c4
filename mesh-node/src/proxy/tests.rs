//! The data path without eBPF and without root: a `ProxyContext` over a fake kernel, a mesh
//! state pushed through the conversion, and what the route, the reports and the policy
//! decision make of a connection, read back from the metrics a user would scrape.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use super::{
    NodeInfo, OriginalDestinations, ProxyContext, Settings, authorize::Inbound, failure::Failure,
    inbound, outbound, route::Route,
};
use crate::{
    identity::Identity,
    netns::NetNs,
    pod::{Pod, PodSpec},
    proto::{security, workload as pb},
    state::convert,
    telemetry::Metrics,
};

/// A kernel that recorded nothing.
struct NoKernel;

impl OriginalDestinations for NoKernel {
    fn take(&self, _: u64, _: u16) -> Option<SocketAddr> {
        None
    }
}

fn context() -> ProxyContext {
    ProxyContext::new(
        Arc::new(NoKernel),
        NodeInfo {
            node_name: "node1".into(),
            cluster_id: "cluster1".into(),
            network: String::new(),
        },
        None,
        Settings::default(),
        Arc::new(Metrics::new()),
    )
}

/// A pod enrolled "here": its namespace handle is this process's own (never entered).
fn pod(name: &str, ip: &str) -> Arc<Pod> {
    let spec = PodSpec {
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        netns: PathBuf::from("/proc/self/ns/net"),
        ips: vec![ip.parse().unwrap()],
        dns_capture: false,
    };
    Arc::new(Pod {
        identity: Identity::new("cluster.local", "default", name),
        netns: NetNs::open(&spec.netns).unwrap(),
        spec,
        netns_cookie: 1,
        original_source: Default::default(),
        id: 1,
    })
}

fn workload(name: &str, ip: &str, service: Option<&str>) -> pb::Workload {
    let mut w = pb::Workload {
        uid: format!("cluster1//Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        addresses: vec![ip.parse::<std::net::Ipv4Addr>().unwrap().octets().to_vec()],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        cluster_id: "cluster1".into(),
        canonical_name: name.into(),
        ..Default::default()
    };
    if let Some(service) = service {
        w.services.insert(
            format!("default/{service}"),
            pb::PortList {
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
            },
        );
    }
    w
}

fn echo_service() -> pb::Service {
    pb::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 10],
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn push(ctx: &ProxyContext, workloads: Vec<pb::Workload>, services: Vec<pb::Service>) {
    ctx.update_state(|state| {
        for w in workloads {
            state.upsert_workload(convert::workload(w, "cluster.local").unwrap());
        }
        for s in services {
            state.upsert_service(convert::service(s).unwrap());
        }
    });
}

/// The one sample line of `metric` in the exposition.
fn sample(metrics: &Metrics, metric: &str) -> String {
    let mut lines = metrics.sample_lines(metric);
    assert_eq!(lines.len(), 1, "{}", metrics.encode());
    lines.remove(0)
}

#[test]
fn a_vip_connection_is_routed_to_its_endpoint_and_reported_with_both_sides() {
    let ctx = context();
    push(
        &ctx,
        vec![
            workload("client", "10.0.1.2", None),
            workload("server", "10.0.2.5", Some("echo.default.svc.cluster.local")),
        ],
        vec![echo_service()],
    );
    let client = pod("client", "10.0.1.2");
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let app: SocketAddr = "10.0.1.2:40000".parse().unwrap();
    let report = {
        let state = ctx.state();
        let route = outbound::route(&ctx, &state, &client, vip);
        match &route {
            Route::Hbone(tunnel) => {
                assert_eq!(tunnel.authority, "10.0.2.5:8080".parse().unwrap());
                assert_eq!(tunnel.peer, "10.0.2.5:15008".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
        outbound::report_draft(&ctx, &state, &client, app, vip, &route).open(&ctx.metrics)
    };
    report.finish(
        &crate::splice::How::Closed,
        100,
        2000,
        "outbound connection",
    );
    let line = sample(&ctx.metrics, "istio_tcp_sent_bytes_total");
    for label in [
        r#"reporter="source""#,
        r#"source_workload="client""#,
        r#"source_principal="spiffe://cluster.local/ns/default/sa/client""#,
        r#"destination_service="echo.default.svc.cluster.local""#,
        r#"destination_workload="server""#,
        r#"destination_principal="spiffe://cluster.local/ns/default/sa/server""#,
        r#"connection_security_policy="mutual_tls""#,
        r#"response_flags="-""#,
    ] {
        assert!(line.contains(label), "{label} in {line}");
    }
    assert!(line.ends_with(" 2000"), "{line}");
}

#[test]
fn an_address_outside_the_mesh_passes_through_and_a_service_without_endpoint_is_refused() {
    let ctx = context();
    push(&ctx, vec![], vec![echo_service()]);
    let client = pod("client", "10.0.1.2");
    let state = ctx.state();
    let outside: SocketAddr = "93.184.216.34:443".parse().unwrap();
    assert!(matches!(
        outbound::route(&ctx, &state, &client, outside),
        Route::Passthrough(dst) if dst == outside
    ));
    match outbound::route(&ctx, &state, &client, "10.96.0.10:80".parse().unwrap()) {
        Route::Refused(reason) => assert!(reason.contains("no healthy endpoint"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_denied_delivery_is_refused_before_any_connect_and_reported_as_deny() {
    let ctx = context();
    push(&ctx, vec![workload("server", "10.0.2.5", None)], vec![]);
    ctx.update_state(|state| {
        let deny = security::Authorization {
            name: "deny-attacker".into(),
            namespace: "default".into(),
            scope: security::Scope::Namespace as i32,
            action: security::Action::Deny as i32,
            rules: vec![security::Rule {
                clauses: vec![security::Clause {
                    matches: vec![security::Match {
                        service_accounts: vec![security::ServiceAccountMatch {
                            namespace: "default".into(),
                            service_account: "attacker".into(),
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        state.upsert_policy(convert::authorization(deny).unwrap());
    });
    let server = pod("server", "10.0.2.5");
    let conn = Inbound {
        pod: server,
        source: Some(Identity::new("cluster.local", "default", "attacker")),
        source_ip: "10.0.1.66".parse().unwrap(),
        destination: "10.0.2.5:8080".parse().unwrap(),
    };
    let refused = inbound::deliver(
        &ctx,
        conn,
        "10.0.1.66:5555".parse().unwrap(),
        inbound::Client::Plain,
    )
    .await;
    match refused {
        Err(failure @ Failure::Denied(_)) => {
            assert_eq!(failure.status(), http::StatusCode::UNAUTHORIZED);
            assert_eq!(
                failure.to_string(),
                "denied by policy default/deny-attacker"
            );
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("the attacker was let in"),
    }
    let line = sample(&ctx.metrics, "istio_tcp_connections_closed_total");
    assert!(line.contains(r#"reporter="destination""#), "{line}");
    assert!(line.contains(r#"response_flags="DENY""#), "{line}");
    assert!(
        line.contains(r#"source_principal="spiffe://cluster.local/ns/default/sa/attacker""#),
        "{line}"
    );
}

/// Double HBONE's inner CONNECT names `<service hostname>:<service port>`: the destination
/// node maps it to the pod's port (its endpoint mapping, else the service's), and refuses a
/// service the pod does not serve or a port the service does not have, by name.
#[test]
fn a_hostname_authority_maps_to_the_pods_port_or_is_refused_by_name() {
    let ctx = context();
    let mut server = workload("server", "10.0.2.5", Some("echo.default.svc.cluster.local"));
    // Its own mapping for 80 says 8080 (as the service); add 81, which only it maps.
    if let Some(ports) = server
        .services
        .get_mut("default/echo.default.svc.cluster.local")
    {
        ports.ports.push(pb::Port {
            service_port: 81,
            target_port: 9091,
            ..Default::default()
        });
    }
    let mut echo = echo_service();
    echo.ports.push(pb::Port {
        service_port: 82,
        target_port: 9092,
        ..Default::default()
    });
    push(
        &ctx,
        vec![server, workload("other", "10.0.2.6", None)],
        vec![echo],
    );
    let port = |pod: &Arc<Pod>, host: &str, port: u16| {
        inbound::service_target_port(&ctx, pod, host, port).map_err(|f| f.to_string())
    };
    let server = pod("server", "10.0.2.5");
    assert_eq!(
        port(&server, "echo.default.svc.cluster.local", 80),
        Ok(8080)
    );
    assert_eq!(
        port(&server, "echo.default.svc.cluster.local", 81),
        Ok(9091)
    );
    // Not in the endpoint's own mapping: the service's target port.
    assert_eq!(
        port(&server, "echo.default.svc.cluster.local", 82),
        Ok(9092)
    );
    let missing = port(&server, "echo.default.svc.cluster.local", 83).unwrap_err();
    assert!(missing.contains("has no port 83"), "{missing}");
    let unknown = port(&server, "nothere.default.svc.cluster.local", 80).unwrap_err();
    assert!(
        unknown.contains("is not an endpoint of nothere"),
        "{unknown}"
    );
    let other = port(
        &pod("other", "10.0.2.6"),
        "echo.default.svc.cluster.local",
        80,
    )
    .unwrap_err();
    assert!(other.contains("is not an endpoint of echo"), "{other}");
}
