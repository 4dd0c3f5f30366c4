//! L4 authorization on a real kernel: policies pushed by the test control plane decide which
//! clients reach `server`, over every path into it — HBONE from another node (identity
//! known), the same-node shortcut, and captured plaintext (no identity) — and a policy pushed
//! while connections are open closes the ones it denies. Assertions are on what clients see.
//! The policy scenario runs twice: over IPv4, and over IPv6 in a dual-stack topology (IPv6
//! addresses and `/128` CIDRs).
use std::{net::SocketAddr, thread, time::Duration};

use mesh_node::xds::proto::security as pb;
use mesh_tests::{
    MeshNode, PodSpec, Server, Topology,
    control_plane::{ControlPlane, eventually, pod_workload},
    hbone_client, http_probe,
    meshnode::bpf_json,
    podapp, privileged, wait_for,
};

const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;

/// node1: `server` (default) and `neighbor` (frontend); node2: `alice` (frontend), `bob`
/// (backend), and `outsider`, which is not in the mesh and reaches `server` in plaintext.
struct Mesh {
    topo: Topology,
    plane: ControlPlane,
    node1: MeshNode,
    _node2: MeshNode,
    _servers: Vec<Server>,
    /// Clients call the server's IPv6 address (a dual-stack topology).
    ipv6: bool,
}

impl Mesh {
    fn start() -> Self {
        Self::start_with(false)
    }

    fn start_with(ipv6: bool) -> Self {
        Self::start_with_node1(ipv6, &[])
    }

    /// node1 (the server's, with the same-node client `neighbor`) started with `node1_args`.
    fn start_with_node1(ipv6: bool, node1_args: &[&str]) -> Self {
        let node1 = vec![
            PodSpec::enrolled("server"),
            PodSpec::enrolled("neighbor").in_namespace("frontend"),
        ];
        let node2 = vec![
            PodSpec::enrolled("alice").in_namespace("frontend"),
            PodSpec::enrolled("bob").in_namespace("backend"),
            PodSpec::plain("outsider"),
        ];
        let topo = if ipv6 {
            Topology::two_nodes_dual_stack(node1, node2)
        } else {
            Topology::two_nodes(node1, node2)
        };
        let plane = ControlPlane::on_node1(&topo);
        plane.put_pods(
            &topo,
            &[
                ("server", "node1"),
                ("neighbor", "node1"),
                ("alice", "node2"),
                ("bob", "node2"),
                ("outsider", "node2"),
            ],
        );
        let serve = |port| {
            if ipv6 {
                topo.serve_at(
                    "server",
                    SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port),
                )
            } else {
                topo.serve("server", port)
            }
        };
        let servers = vec![serve(PORT), serve(OTHER_PORT)];
        let node1 = plane.start_mesh_node_with(&topo, "node1", node1_args);
        let node2 = plane.start_mesh_node(&topo, "node2");
        Self {
            topo,
            plane,
            node1,
            _node2: node2,
            _servers: servers,
            ipv6,
        }
    }

    fn server(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip("server"), port)
    }

    /// `pod`'s address in the family the clients call in.
    fn ip(&self, pod: &str) -> std::net::IpAddr {
        let pod = self.topo.pod(pod);
        if self.ipv6 {
            pod.ipv6().into()
        } else {
            pod.ip.into()
        }
    }

    /// Whether one connection from `pod` to the server's `port` completes its echo.
    fn reaches(&self, pod: &str, port: u16) -> bool {
        let run = self.topo.connect_from(pod, self.server(port), 4096, 1);
        run.ok.len() == 1
    }

    /// Who of `pods` reaches the server's `port`, in order.
    fn who_reaches(&self, pods: &[&str], port: u16) -> Vec<String> {
        pods.iter()
            .filter(|pod| self.reaches(pod, port))
            .map(|pod| (*pod).to_owned())
            .collect()
    }

    fn applied(&self) -> usize {
        self.node1.log_lines_with(&["xDS update applied"]).len()
    }

    /// Pushes the policy `default/gate` with one rule of `m`, and waits until node1 applied it.
    fn gate(&self, action: pb::Action, m: pb::Match) {
        self.push(|plane| plane.put_policy(policy("gate", action, vec![m])));
    }

    /// Pushes `change` and waits until node1 has applied it.
    fn push(&self, change: impl FnOnce(&ControlPlane)) {
        let before = self.applied();
        change(&self.plane);
        eventually("node1 to apply the push", || self.applied() > before)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.node1.log_text()));
    }

    fn cidr(&self, pod: &str) -> pb::Address {
        let pod = self.topo.pod(pod);
        if self.ipv6 {
            pb::Address {
                address: pod.ipv6().octets().to_vec(),
                length: 128,
            }
        } else {
            pb::Address {
                address: pod.ip.octets().to_vec(),
                length: 32,
            }
        }
    }
}

const CLIENTS: [&str; 4] = ["alice", "bob", "neighbor", "outsider"];

fn exact(value: &str) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(pb::string_match::MatchType::Exact(value.into())),
    }
}

/// A NAMESPACE policy in `default` (the server's namespace) with one rule of one clause per
/// entry of `matches` (rules are OR-ed).
fn policy(name: &str, action: pb::Action, matches: Vec<pb::Match>) -> pb::Authorization {
    pb::Authorization {
        name: name.into(),
        namespace: "default".into(),
        scope: pb::Scope::Namespace as i32,
        action: action as i32,
        rules: matches
            .into_iter()
            .map(|m| pb::Rule {
                clauses: vec![pb::Clause { matches: vec![m] }],
            })
            .collect(),
        ..Default::default()
    }
}

/// One connection from `pod` to the server fails with a reset.
fn assert_reset(mesh: &Mesh, pod: &str) {
    let run = mesh.topo.connect_from(pod, mesh.server(PORT), 1024, 1);
    assert!(
        run.errors.len() == 1 && run.errors[0].contains("reset"),
        "{pod}: {run:?}"
    );
}

fn names(pods: &[&str]) -> Vec<String> {
    pods.iter().map(|p| (*p).to_owned()).collect()
}

#[test]
fn policies_decide_by_principal_namespace_source_address_and_port() {
    if !privileged() {
        return;
    }
    decide_by_principal_namespace_source_address_and_port(Mesh::start());
}

/// The same scenario with every client calling the server's IPv6 address: HBONE, same-node
/// and plaintext over IPv6, and source CIDRs of IPv6 `/128`s.
#[test]
fn policies_decide_over_ipv6_as_over_ipv4() {
    if !privileged() {
        return;
    }
    decide_by_principal_namespace_source_address_and_port(Mesh::start_with(true));
}

fn decide_by_principal_namespace_source_address_and_port(mesh: Mesh) {
    assert_eq!(
        mesh.who_reaches(&CLIENTS, PORT),
        names(&CLIENTS),
        "without policy everyone reaches the server\n{}",
        mesh.node1.log_text()
    );

    // DENY by principal: only alice is refused, with a 401 her node logs.
    mesh.gate(
        pb::Action::Deny,
        pb::Match {
            principals: vec![exact("cluster.local/ns/frontend/sa/alice")],
            ..Default::default()
        },
    );
    assert_eq!(
        mesh.who_reaches(&CLIENTS, PORT),
        names(&["bob", "neighbor", "outsider"])
    );
    assert!(
        mesh.node1
            .log_lines_with(&[
                "connection denied by policy",
                "denied by policy default/gate"
            ])
            .iter()
            .any(|l| l.contains("sa/alice")),
        "{}",
        mesh.node1.log_text()
    );

    // The same rule in dry-run: logged, not enforced.
    let mut dry = policy(
        "gate",
        pb::Action::Deny,
        vec![pb::Match {
            principals: vec![exact("cluster.local/ns/frontend/sa/alice")],
            ..Default::default()
        }],
    );
    dry.dry_run = true;
    mesh.push(|plane| plane.put_policy(dry));
    assert!(mesh.reaches("alice", PORT));
    assert!(
        !mesh
            .node1
            .log_lines_with(&["dry-run policy would change the verdict", "sa/alice"])
            .is_empty(),
        "{}",
        mesh.node1.log_text()
    );

    // ALLOW by namespace only: backend passes; frontend pods (across nodes or on the same
    // node) and plaintext clients (no namespace) do not.
    mesh.gate(
        pb::Action::Allow,
        pb::Match {
            namespaces: vec![exact("backend")],
            ..Default::default()
        },
    );
    assert_eq!(mesh.who_reaches(&CLIENTS, PORT), names(&["bob"]));
    // So is a refused same-node or plaintext connection.
    assert_reset(&mesh, "neighbor");
    assert_reset(&mesh, "outsider");

    // ALLOW by source address: alice's address (the one the kernel saw on her tunnel) and the
    // plaintext outsider's.
    let (alice, outsider) = (mesh.cidr("alice"), mesh.cidr("outsider"));
    mesh.gate(
        pb::Action::Allow,
        pb::Match {
            source_ips: vec![alice, outsider],
            ..Default::default()
        },
    );
    assert_eq!(
        mesh.who_reaches(&CLIENTS, PORT),
        names(&["alice", "outsider"])
    );

    // DENY by destination port: 9090 is closed to everyone, 8080 stays open.
    mesh.gate(
        pb::Action::Deny,
        pb::Match {
            destination_ports: vec![u32::from(OTHER_PORT)],
            ..Default::default()
        },
    );
    assert_eq!(mesh.who_reaches(&CLIENTS, OTHER_PORT), Vec::<String>::new());
    assert_eq!(mesh.who_reaches(&CLIENTS, PORT), names(&CLIENTS));

    // A WORKLOAD_SELECTOR policy applies once the server's workload names it.
    mesh.push(|plane| plane.remove("default/gate"));
    let mut selected = policy(
        "only-bob",
        pb::Action::Allow,
        vec![pb::Match {
            principals: vec![exact("cluster.local/ns/backend/sa/bob")],
            ..Default::default()
        }],
    );
    selected.scope = pb::Scope::WorkloadSelector as i32;
    mesh.push(|plane| plane.put_policy(selected));
    assert_eq!(mesh.who_reaches(&CLIENTS, PORT), names(&CLIENTS));
    let mut server = pod_workload(&mesh.topo, "server", "node1");
    server.authorization_policies = vec!["default/only-bob".into()];
    mesh.push(|plane| plane.put_workload(server));
    assert_eq!(mesh.who_reaches(&CLIENTS, PORT), names(&["bob"]));
}

/// `source_ips` is decided on the address the kernel saw on the tunnel's TCP connection, never
/// on the `forwarded` header, which any holder of a mesh certificate writes as it likes.
#[test]
fn a_forged_forwarded_address_does_not_pass_a_source_address_policy() {
    if !privileged() {
        return;
    }
    forged_forwarded_changes_nothing(Mesh::start());
}

#[test]
fn over_ipv6_a_forged_forwarded_address_does_not_pass_a_source_address_policy() {
    if !privileged() {
        return;
    }
    forged_forwarded_changes_nothing(Mesh::start_with(true));
}

fn forged_forwarded_changes_nothing(mesh: Mesh) {
    let alice_ip = mesh.ip("alice");
    mesh.gate(
        pb::Action::Allow,
        pb::Match {
            source_ips: vec![mesh.cidr("alice")],
            ..Default::default()
        },
    );
    assert_eq!(mesh.who_reaches(&CLIENTS, PORT), names(&["alice"]));

    // A peer holding alice's own certificate, from the outsider's address, claiming alice's.
    let ca_dir = mesh.topo.ca_dir();
    let alice_id = "spiffe://cluster.local/ns/frontend/sa/alice";
    let server_id = "spiffe://cluster.local/ns/default/sa/server";
    let hbone = SocketAddr::new(mesh.ip("server"), 15008);
    let authority = mesh.server(PORT).to_string();
    let claiming = |claim: SocketAddr| mesh_node::hbone::client::ConnectHeaders {
        client: Some(claim),
        ..Default::default()
    };
    let open = |from: &str, claim: SocketAddr| {
        let config = hbone_client::client_config(&ca_dir, alice_id, server_id).unwrap();
        let headers = claiming(claim);
        hbone_client::run_in(&mesh.topo.pod(from).netns_path(), || async {
            hbone_client::tunnel(config, hbone, &authority, &headers)
                .await
                .map(|_| ())
        })
        .expect("client thread")
    };
    let forged = open("outsider", SocketAddr::new(alice_ip, 40000));
    assert!(
        forged.as_ref().is_err_and(|e| e.contains("401")),
        "a forged forwarded address passed: {forged:?}\n{}",
        mesh.node1.log_text()
    );
    // From alice's own address the policy holds, whatever the header says.
    let outsider = SocketAddr::new(mesh.ip("outsider"), 40000);
    let honest = open("alice", outsider);
    assert!(
        honest.is_ok(),
        "from alice's address: {honest:?}\n{}",
        mesh.node1.log_text()
    );
    let denied = mesh
        .node1
        .log_lines_with(&["connection denied by policy", "no ALLOW policy matched"]);
    assert!(
        denied
            .iter()
            .any(|line| line.contains(&mesh.ip("outsider").to_string())),
        "the denial names the address the kernel saw: {denied:?}"
    );
}

fn account(namespace: &str, name: &str) -> pb::ServiceAccountMatch {
    pb::ServiceAccountMatch {
        namespace: namespace.into(),
        service_account: name.into(),
    }
}

/// `from.source.serviceAccounts` as istiod sends it (Match.service_accounts, field 11): the
/// caller's verified service account decides, over HBONE and the same-node path; a plaintext
/// client has none.
#[test]
fn service_account_policies_match_the_callers_verified_account_on_every_path() {
    if !privileged() {
        return;
    }
    service_accounts_decide(Mesh::start());
}

#[test]
fn over_ipv6_service_account_policies_match_the_callers_verified_account() {
    if !privileged() {
        return;
    }
    service_accounts_decide(Mesh::start_with(true));
}

fn service_accounts_decide(mesh: Mesh) {
    // DENY alice's account: alice (HBONE from node2) is refused, everyone else passes.
    mesh.gate(
        pb::Action::Deny,
        pb::Match {
            service_accounts: vec![account("frontend", "alice")],
            ..Default::default()
        },
    );
    assert_eq!(
        mesh.who_reaches(&CLIENTS, PORT),
        names(&["bob", "neighbor", "outsider"]),
        "{}",
        mesh.node1.log_text()
    );

    // DENY an account on a port: a client without identity is not that account.
    mesh.gate(
        pb::Action::Deny,
        pb::Match {
            service_accounts: vec![account("default", "attacker")],
            destination_ports: vec![u32::from(PORT)],
            ..Default::default()
        },
    );
    assert_eq!(mesh.who_reaches(&CLIENTS, PORT), names(&CLIENTS));

    // ALLOW two accounts: bob (HBONE) and neighbor (same node) pass; alice, and the plaintext
    // outsider who has no account, are refused with a reset.
    mesh.gate(
        pb::Action::Allow,
        pb::Match {
            service_accounts: vec![account("backend", "bob"), account("frontend", "neighbor")],
            ..Default::default()
        },
    );
    assert_eq!(
        mesh.who_reaches(&CLIENTS, PORT),
        names(&["bob", "neighbor"])
    );
    assert_reset(&mesh, "outsider");

    // DENY everyone but bob's account (not_service_accounts, field 12).
    mesh.gate(
        pb::Action::Deny,
        pb::Match {
            not_service_accounts: vec![account("backend", "bob")],
            ..Default::default()
        },
    );
    assert_eq!(mesh.who_reaches(&CLIENTS, PORT), names(&["bob"]));
}

#[test]
fn a_policy_pushed_mid_connection_closes_the_connections_it_denies() {
    if !privileged() {
        return;
    }
    pushed_policy_closes_denied(Mesh::start(), false);
}

#[test]
fn over_ipv6_a_policy_pushed_mid_connection_closes_the_connections_it_denies() {
    if !privileged() {
        return;
    }
    pushed_policy_closes_denied(Mesh::start_with(true), false);
}

/// With the kernel carrying same-node bytes (`--kernel-same-node`), a revoked same-node
/// connection is closed all the same: its pairing goes, both applications are reset.
#[test]
fn with_the_kernel_carrying_same_node_bytes_a_pushed_policy_still_closes_denied_connections() {
    if !privileged() {
        return;
    }
    let mesh = Mesh::start_with_node1(false, &["--kernel-same-node", "true"]);
    pushed_policy_closes_denied(mesh, true);
}

/// `kernel_path`: node1 pairs same-node connections for the kernel; the two held ones must be
/// paired (client and server socket each) when the policy arrives, and unpaired after.
fn pushed_policy_closes_denied(mesh: Mesh, kernel_path: bool) {
    let paired = || {
        let maps = bpf_json(&mesh.topo, "node1", &["maps"]);
        maps.as_array()
            .expect("maps")
            .iter()
            .find(|map| map["name"] == "MESH_PAIR")
            .and_then(|map| map["entries"].as_u64())
            .unwrap_or_else(|| panic!("no MESH_PAIR entries in {maps}"))
    };
    let hold = Duration::from_secs(6);
    let per_client = [("alice", 4), ("bob", 4), ("neighbor", 2), ("outsider", 2)];
    let held: Vec<_> = per_client
        .iter()
        .map(|&(pod, conns)| {
            let p = mesh.topo.pod(pod);
            let (netns, cgroup, target) = (p.netns_path(), p.cgroup.clone(), mesh.server(PORT));
            let run = thread::spawn(move || {
                podapp::connect_holding(&netns, &cgroup, target, 64 * 1024, conns, hold)
                    .expect("run podapp")
            });
            (pod, conns, run)
        })
        .collect();
    // All 12 connections are open: 8 tunnels from node2, 2 same-node, 2 captured plaintext.
    // node1's own metrics: 8 tunnels delivered (mutual TLS), 4 more deliveries (plaintext and
    // same-node), and the 2 same-node connections on their source side.
    let opened = |labels: &[&str]| {
        let netns = mesh.topo.node("node1").netns_path();
        http_probe::total(&netns, "istio_tcp_connections_opened_total", labels).unwrap_or(0.0)
    };
    eventually("the held connections to open", || {
        let tunnels = opened(&[
            r#"reporter="destination""#,
            r#"connection_security_policy="mutual_tls""#,
        ]);
        tunnels >= 8.0
            && opened(&[r#"reporter="destination""#]) >= 12.0
            && opened(&[r#"reporter="source""#]) >= 2.0
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.node1.log_text()));

    if kernel_path {
        assert_eq!(paired(), 4, "{}", mesh.node1.log_text());
    }

    // Frontend (alice, neighbor) and the outsider's address are denied from now on.
    let outsider = mesh.cidr("outsider");
    mesh.push(|plane| {
        plane.put_policy(policy(
            "lockdown",
            pb::Action::Deny,
            vec![
                pb::Match {
                    namespaces: vec![exact("frontend")],
                    ..Default::default()
                },
                pb::Match {
                    source_ips: vec![outsider],
                    ..Default::default()
                },
            ],
        ))
    });
    for (pod, conns, run) in held {
        let run = run.join().expect("podapp thread");
        if pod == "bob" {
            assert_eq!(run.ok.len(), conns, "bob's connections survive: {run:?}");
        } else {
            assert_eq!(
                run.errors.len(),
                conns,
                "{pod}'s open connections are closed: {run:?}\n{}",
                mesh.node1.log_text()
            );
        }
    }
    assert_eq!(
        mesh.node1
            .log_lines_with(&["open connection closed: policy changed"])
            .len(),
        8,
        "{}",
        mesh.node1.log_text()
    );
    if kernel_path {
        assert!(wait_for(|| paired() == 0), "{}", mesh.node1.log_text());
    }
}
