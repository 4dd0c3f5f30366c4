//! Two clusters on two networks, joined by an east-west gateway that is mesh-node in gateway
//! mode (see `mesh_tests::multicluster`). Assertions are on what users see: which cluster
//! served a call, bytes intact, who the destination says called, what crossed the gateway's
//! link, and what the gateway answers a client it must not serve.
use std::{net::SocketAddr, thread, time::Duration};

use mesh_node::{
    hbone::client::{ConnectHeaders, Connection},
    xds::proto::security as sec,
};
use mesh_tests::{
    hbone_client, http_probe,
    multicluster::{
        self, ECHO_HOST, ECHO_PORT, GATEWAY_NS, GATEWAY_SA, MultiCluster, failover_echo,
    },
    podapp, privileged, sniff,
};
use tokio::net::TcpStream;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

fn served_by(mc: &MultiCluster, run: &podapp::PodRun) -> Vec<&'static str> {
    mc.served_by(run)
        .unwrap_or_else(|error| panic!("{error:#}"))
}

fn push(node: &mesh_tests::MeshNode, change: impl FnOnce()) {
    multicluster::push(node, change).unwrap_or_else(|e| panic!("{e}\n{}", node.log_text()));
}

#[test]
fn a_call_to_a_global_service_is_served_by_the_other_cluster_through_the_gateway() {
    if !privileged() {
        return;
    }
    let mc = MultiCluster::start(false);
    let sniffer = sniff::Sniffer::start(&mc.topo.node("gw2").netns, "n0").expect("capture gw2");
    let run = mc.topo.connect_from("client", mc.echo(), 256 * 1024, 3);
    let segments = sniffer.stop();
    assert_eq!(served_by(&mc, &run), ["server2"; 3]);
    for conn in &run.ok {
        assert_eq!(conn.peer, mc.echo(), "the application sees what it called");
        assert_eq!(conn.bytes, 256 * 1024);
    }

    // The gateway's link carried the bytes, and none of them in cleartext.
    let carried: usize = segments.iter().map(|s| s.payload.len()).sum();
    assert!(
        carried > 3 * 256 * 1024,
        "only {carried} bytes crossed the gateway's link"
    );
    let marker = podapp::pattern_bytes(1000, 64);
    assert!(
        !segments
            .iter()
            .any(|s| s.payload.windows(marker.len()).any(|w| w == marker)),
        "application bytes crossed the gateway's link in cleartext"
    );

    // The destination names the caller by its own identity and workload, not the gateway.
    let dst_lines = mc
        .c2n2
        .log_lines_with(&["HBONE tunnel closed", "reporter=destination"]);
    assert_eq!(dst_lines.len(), 3, "{}", mc.c2n2.log_text());
    for line in &dst_lines {
        for field in [
            &format!("src_identity={CLIENT_ID}") as &str,
            "src_workload=client",
            "src_namespace=default",
            "dst_workload=server2",
        ] {
            assert!(line.contains(field), "{field} missing: {line}");
        }
    }
    // The source shows the hop; the gateway logs each tunnel, and never the payload.
    let src_lines = mc
        .c1n1
        .log_lines_with(&["outbound connection closed", "route=gateway"]);
    assert_eq!(src_lines.len(), 3, "{}", mc.c1n1.log_text());
    let gw_ip = mc.topo.link_ip("gw2");
    for line in &src_lines {
        for field in [
            format!("dst={gw_ip}:15008"),
            format!("gateway_identity=spiffe://cluster.local/ns/{GATEWAY_NS}/sa/{GATEWAY_SA}"),
            format!("dst_service={ECHO_HOST}"),
            "dst_namespace=default".to_owned(),
            "dst_workload=server2".to_owned(),
            "dst_identity=spiffe://cluster.local/ns/default/sa/server2".to_owned(),
        ] {
            assert!(line.contains(&field), "{field} missing: {line}");
        }
    }
    let gw_lines = mc.gw2.log_lines_with(&["gateway tunnel closed"]);
    assert_eq!(gw_lines.len(), 3, "{}", mc.gw2.log_text());
    for line in &gw_lines {
        assert!(
            line.contains(&format!("src_identity={CLIENT_ID}")),
            "{line}"
        );
        assert!(line.contains("dst_workload=server2"), "{line}");
        assert!(line.contains("route=gateway"), "{line}");
    }
    let gw_log = std::fs::read(&mc.gw2.log).expect("gateway log");
    assert!(!gw_log.windows(marker.len()).any(|w| w == marker));

    // Istio's metrics on every hop name both ends, cluster included: nothing `unknown`.
    let closed = "istio_tcp_connections_closed_total";
    for (node, reporter, destination) in [
        // The source learns who served it from the destination's answer (its `baggage`).
        ("c1n1", "source", "server2"),
        ("gw2", "destination", "server2"),
        ("c2n2", "destination", "server2"),
    ] {
        let netns = mc.topo.node(node).netns_path();
        let labels = [
            format!("reporter=\"{reporter}\""),
            "source_workload=\"client\"".to_owned(),
            "source_workload_namespace=\"default\"".to_owned(),
            "source_cluster=\"cluster1\"".to_owned(),
            format!("destination_workload=\"{destination}\""),
            "destination_workload_namespace=\"default\"".to_owned(),
            "destination_cluster=\"cluster2\"".to_owned(),
            format!("destination_service=\"{ECHO_HOST}\""),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let total = http_probe::total(&netns, closed, &labels).expect("scrape");
        let text = http_probe::scrape(&netns).expect("scrape");
        assert_eq!(total, 3.0, "{node}: {closed} with {labels:?}:\n{text}");
    }

    // Authorization at the destination is by the caller's principal.
    let principal = |action: sec::Action, who: &str| sec::Authorization {
        name: "gate".into(),
        namespace: "default".into(),
        scope: sec::Scope::Namespace as i32,
        action: action as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    principals: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Exact(who.into())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let one = || mc.topo.connect_from("client", mc.echo(), 4096, 1);
    push(&mc.c2n2, || {
        mc.cp2.put_policy(principal(
            sec::Action::Deny,
            "cluster.local/ns/default/sa/client",
        ))
    });
    let denied = one();
    assert!(
        denied.ok.is_empty(),
        "a DENY of the caller let it in: {denied:?}"
    );
    // Refused by the destination's policy, by the caller's identity (not lost on the way).
    let refusals = mc.c2n2.log_lines_with(&[
        "inbound connection denied by policy",
        "src_identity=spiffe://cluster.local/ns/default/sa/client",
    ]);
    assert_eq!(refusals.len(), 1, "{}", mc.c2n2.log_text());
    push(&mc.c2n2, || {
        mc.cp2.put_policy(principal(
            sec::Action::Allow,
            "cluster.local/ns/default/sa/client",
        ))
    });
    assert_eq!(served_by(&mc, &one()), ["server2"]);
    push(&mc.c2n2, || {
        mc.cp2.put_policy(principal(
            sec::Action::Allow,
            "cluster.local/ns/default/sa/someone-else",
        ))
    });
    assert!(
        one().ok.is_empty(),
        "an ALLOW of another principal let the caller in"
    );
}

#[test]
fn network_failover_stays_local_while_it_can_and_comes_back() {
    if !privileged() {
        return;
    }
    let mc = MultiCluster::start(true);
    push(&mc.c1n1, || mc.cp1.put_service(failover_echo("net1")));
    let calls = |n| mc.topo.connect_from("client", mc.echo(), 4096, n);
    assert_eq!(
        served_by(&mc, &calls(6)),
        ["server1"; 6],
        "local while healthy"
    );

    // A connection open across both switches is never cut by them.
    let long = {
        let pod = mc.topo.pod("client");
        let (netns, cgroup, target) = (pod.netns_path(), pod.cgroup.clone(), mc.echo());
        thread::spawn(move || {
            podapp::connect_holding(
                &netns,
                &cgroup,
                target,
                64 * 1024,
                1,
                Duration::from_secs(3),
            )
        })
    };
    thread::sleep(Duration::from_millis(500));
    let state = mc.state();
    push(&mc.c1n1, || {
        mc.cp1.put_workload(state.pod("server1", "c1n2", 1, None))
    });
    assert_eq!(served_by(&mc, &calls(6)), ["server2"; 6], "failed over");
    push(&mc.c1n1, || {
        mc.cp1
            .put_workload(state.pod("server1", "c1n2", 1, Some(ECHO_HOST)))
    });
    assert_eq!(served_by(&mc, &calls(6)), ["server1"; 6], "back home");
    let long = long
        .join()
        .expect("long connection thread")
        .expect("run podapp");
    assert_eq!(served_by(&mc, &long), ["server1"]);
}

#[test]
fn without_a_preference_capacity_spreads_calls_across_clusters() {
    if !privileged() {
        return;
    }
    let mc = MultiCluster::start(true);
    // Cluster 2 reports 9 endpoints (one workload, capacity 9) against one local endpoint.
    push(&mc.c1n1, || {
        mc.cp1.put_workload(mc.state().remote_echo(2, 9))
    });
    let run = mc.topo.connect_from("client", mc.echo(), 512, 60);
    let remote = served_by(&mc, &run)
        .iter()
        .filter(|pod| **pod == "server2")
        .count();
    // Expected 54 of 60; an even split between the two workloads would give 30.
    assert!(
        (44..=60).contains(&remote),
        "{remote} of 60 calls went to cluster 2"
    );
}

#[test]
fn the_gateway_refuses_foreign_clients_and_what_it_cannot_route() {
    if !privileged() {
        return;
    }
    let mc = MultiCluster::start(false);
    let ca_dir = mc.topo.ca_dir();
    let gateway_id = format!("spiffe://cluster.local/ns/{GATEWAY_NS}/sa/{GATEWAY_SA}");
    let peer = SocketAddr::from((mc.topo.link_ip("gw2"), 15008));
    let echo = format!("{ECHO_HOST}:{ECHO_PORT}");
    let outcome = hbone_client::run_in(&mc.topo.node("c1n1").netns_path(), || async {
        let good = hbone_client::client_config(&ca_dir, CLIENT_ID, &gateway_id).unwrap();
        let foreign = hbone_client::client_config(
            &ca_dir,
            "spiffe://evil.example/ns/default/sa/client",
            &gateway_id,
        )
        .unwrap();
        let anonymous = hbone_client::anonymous_config(&ca_dir, &gateway_id).unwrap();
        let open = |config, authority: String| async move {
            let tcp = TcpStream::connect(peer).await.map_err(|e| e.to_string())?;
            let connection = Connection::establish(tcp, peer, config)
                .await
                .map_err(|e| e.to_string())?;
            connection
                .connect(&authority, &ConnectHeaders::default())
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        (
            open(good.clone(), echo.clone()).await,
            open(good.clone(), "nothere.default.svc.cluster.local:80".into()).await,
            open(good.clone(), format!("{}:8080", mc.topo.pod("server2").ip)).await,
            open(foreign, echo.clone()).await,
            open(anonymous, echo.clone()).await,
        )
    })
    .expect("run the client");
    let (routed, unknown, by_address, foreign, anonymous) = outcome;
    assert!(routed.is_ok(), "a mesh client is routed: {routed:?}");
    for (what, result, status) in [
        ("an unknown hostname", &unknown, "400"),
        ("an address authority", &by_address, "400"),
    ] {
        let error = result.as_ref().expect_err(what);
        assert!(error.contains(status), "{what}: {error}");
    }
    for (what, result) in [
        ("another trust domain", &foreign),
        ("no certificate", &anonymous),
    ] {
        assert!(result.is_err(), "{what} was let through the gateway");
    }
    // The refusals are in the gateway's log, by reason.
    assert!(
        mc.gw2
            .log_text()
            .contains("no service nothere.default.svc.cluster.local is known here")
    );
    let refused = mc
        .gw2
        .log_lines_with(&["HBONE connection refused", "pod=east-west gateway"]);
    assert!(!refused.is_empty(), "{}", mc.gw2.log_text());

    // The gateway is operated like a node: ready, with its state in the config dump.
    let gw_netns = mc.topo.node("gw2").netns_path();
    let ready = http_probe::get(&gw_netns, "127.0.0.1:15021", "/healthz/ready").expect("readiness");
    assert_eq!(ready.status, 200, "{}", ready.body);
    let dump = http_probe::get(&gw_netns, "127.0.0.1:15000", "/config_dump").expect("config dump");
    assert!(dump.body.contains(ECHO_HOST), "{}", dump.body);

    // With no endpoint left in cluster 2, the gateway answers 503.
    push(&mc.gw2, || {
        mc.cp2
            .put_workload(mc.state().pod("server2", "c2n2", 2, None))
    });
    let no_endpoint = hbone_client::run_in(&mc.topo.node("c1n1").netns_path(), || async {
        let good = hbone_client::client_config(&ca_dir, CLIENT_ID, &gateway_id).unwrap();
        let tcp = TcpStream::connect(peer).await.unwrap();
        let connection = Connection::establish(tcp, peer, good).await.unwrap();
        connection
            .connect(&echo, &ConnectHeaders::default())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .expect("run the client");
    let error = no_endpoint.expect_err("no endpoint, yet routed");
    assert!(error.contains("503"), "{error}");
}

#[test]
fn a_call_from_the_other_cluster_comes_back_through_the_first_clusters_gateway() {
    if !privileged() {
        return;
    }
    let mc = MultiCluster::start(true);
    let from_two = || mc.topo.connect_from("client2", mc.echo(), 64 * 1024, 2);
    // Cluster 2 has its own endpoint, and one in cluster 1 behind gw1 (capacity 1 each).
    push(&mc.c2n1, || {
        mc.cp2
            .put_workload(mc.state().pod("server2", "c2n2", 2, None))
    });
    assert_eq!(served_by(&mc, &from_two()), ["server1"; 2]);
    let lines = mc.gw1.log_lines_with(&["gateway tunnel closed"]);
    assert_eq!(lines.len(), 2, "{}", mc.gw1.log_text());
    assert!(
        lines[0].contains("src_identity=spiffe://cluster.local/ns/default/sa/client2"),
        "{}",
        lines[0]
    );
    // The destination in cluster 1 names the caller from cluster 2.
    let dst = mc
        .c1n2
        .log_lines_with(&["HBONE tunnel closed", "src_workload=client2"]);
    assert_eq!(dst.len(), 2, "{}", mc.c1n2.log_text());
}

#[test]
fn a_far_end_that_never_answers_the_inner_handshake_fails_the_call_by_its_deadline() {
    if !privileged() {
        return;
    }
    let mc = MultiCluster::start(false);
    // Cluster 2's only endpoint of echo now takes TCP on 15008 and never says a word: the
    // gateway connects and relays, the outer connection stays healthy, the inner TLS stalls.
    let zpod = mc.topo.pod("zpod");
    let (netns, addr) = (zpod.netns_path(), SocketAddr::from((zpod.ip, 15008)));
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let listener_thread = thread::spawn(move || {
        hbone_client::run_in(&netns, || async move {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .expect("bind 15008");
            bound_tx.send(()).expect("signal bound");
            let mut held = Vec::new();
            // Accepts and holds, reading nothing and writing nothing, for longer than the
            // deadline.
            let _ = tokio::time::timeout(Duration::from_secs(12), async {
                while let Ok((socket, _)) = listener.accept().await {
                    held.push(socket);
                }
            })
            .await;
        })
    });
    bound_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the silent endpoint listens");
    let state = mc.state();
    let mut silent = state.pod("zpod", "c2n1", 2, Some(ECHO_HOST));
    silent.tunnel_protocol = mesh_node::xds::proto::workload::TunnelProtocol::Hbone as i32;
    push(&mc.gw2, || {
        mc.cp2
            .change_workloads(vec![silent, state.pod("server2", "c2n2", 2, None)], &[])
    });
    let run = mc.topo.connect_from("client", mc.echo(), 1024, 1);
    assert!(
        run.ok.is_empty(),
        "a stalled far end served the call: {run:?}"
    );
    let failed = mc
        .c1n1
        .log_lines_with(&["outbound connection failed", "route=gateway"]);
    assert_eq!(failed.len(), 1, "{}", mc.c1n1.log_text());
    assert!(
        failed[0].contains("no answer within 10 s"),
        "{}\n{}",
        failed[0],
        mc.gw2.log_text()
    );
    // Its access line counts the wait (the report opens only once the far end has answered,
    // or not).
    let waited: u64 = failed[0]
        .split_whitespace()
        .find_map(|field| field.strip_prefix("duration_ms="))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_default();
    assert!(waited >= 10_000, "{}", failed[0]);
    let _ = listener_thread.join();
}

/// Gateway mode refuses what it cannot run with, in one line naming the flag, before it binds
/// anything.
#[test]
fn gateway_mode_refuses_a_bad_identity_and_a_missing_certificate_source() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(mesh_tests::meshnode::binary())
            .args(["run", "--mode", "gateway"])
            .args(args)
            .output()
            .expect("run mesh-node");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for bad in ["a/b/c", "istio-system/", "no-slash", "ns/sa x"] {
        let (code, stderr) = run(&["--gateway-identity", bad]);
        assert_eq!(code, Some(1), "{bad}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "--gateway-identity {bad:?}: expected NAMESPACE/SERVICE_ACCOUNT"
            )),
            "{bad}: {stderr}"
        );
    }
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--mode gateway needs a certificate source (--ca-dir or --ca-address)"),
        "{stderr}"
    );
}

/// A service with no endpoint in this cluster does not resolve through the cluster's own
/// resolver; mesh-node answers its name from the mesh state, and the call by that name goes
/// through the gateway to the other cluster.
#[test]
fn a_service_only_in_the_other_cluster_is_called_by_its_name() {
    if !privileged() {
        return;
    }
    let mc = MultiCluster::start(false);
    let resolver = mesh_tests::dns_server::DnsServer::start(
        &mc.topo.node("c1n1").netns_path(),
        std::net::IpAddr::V4(mc.topo.link_ip("c1n1")),
    )
    .expect("cluster 1's resolver");
    let client = mc.topo.pod("client");
    let resolved = podapp::resolve(
        &client.netns_path(),
        &client.cgroup,
        resolver.addr,
        "echo",
        "A",
        "connected",
    )
    .expect("resolve echo");
    assert_eq!(resolved.rcode, "NOERROR");
    assert_eq!(resolved.ips, [mc.echo().ip()]);
    assert!(
        resolver.seen().is_empty(),
        "answered by mesh-node: {:?}",
        resolver.seen()
    );
    let by_name = SocketAddr::new(resolved.ips[0], ECHO_PORT);
    let run = mc.topo.connect_from("client", by_name, 64 * 1024, 2);
    assert_eq!(served_by(&mc, &run), ["server2"; 2]);
}
