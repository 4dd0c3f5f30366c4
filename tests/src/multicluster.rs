//! Two clusters on one machine, each on a network of its own, as Istio's multi-network
//! ambient mesh describes them. Cluster 1 (network `net1`): nodes `c1n1` (pod `client`) and
//! `c1n2` (pod `server1`), east-west gateway node `gw1`. Cluster 2 (network `net2`): nodes
//! `c2n1` (pod `client2`) and `c2n2` (pod `server2`), gateway `gw2`. mesh-node runs on every node
//! and, in gateway mode, on both gateways. The nodes of a cluster route to each other's pods;
//! neither cluster routes to the other's: the only way across is a gateway (which reaches every
//! pod: its own cluster's to forward to, the other's to answer). Each cluster has its own test
//! control plane, speaking as istiod does (the other network's endpoints of the global service
//! `echo` are one synthetic workload with `network_gateway` and `capacity`); both share one
//! mesh root.
use std::net::SocketAddr;

use mesh_node::xds::proto::workload as pb;

use anyhow::Result;

use crate::{
    MeshNode, PodSpec, Server, Topology,
    control_plane::{ControlPlane, eventually, pod_workload},
    podapp::PodRun,
    topology::NodeSpec,
};

pub const ECHO_HOST: &str = "echo.default.svc.cluster.local";
/// The global service's VIP, the same in both clusters.
pub const ECHO_VIP: [u8; 4] = [10, 96, 0, 10];
pub const ECHO_PORT: u16 = 80;
/// Where the echo servers listen.
pub const TARGET_PORT: u16 = 8080;
pub const GATEWAY_SA: &str = "istio-eastwestgateway";
pub const GATEWAY_NS: &str = "istio-system";

/// The running two-cluster mesh; dropping it stops everything and removes the topology.
pub struct MultiCluster {
    // Processes first: they go before the namespaces they run in.
    pub c1n1: MeshNode,
    pub c1n2: MeshNode,
    pub c2n1: MeshNode,
    pub c2n2: MeshNode,
    pub gw1: MeshNode,
    pub gw2: MeshNode,
    pub servers: Vec<Server>,
    pub cp1: ControlPlane,
    pub cp2: ControlPlane,
    pub topo: Topology,
}

/// The cluster (1 or 2) a node of the topology belongs to.
fn cluster_of(node: &str) -> u8 {
    if node.starts_with("c1") || node == "gw1" {
        1
    } else {
        2
    }
}

impl MultiCluster {
    /// Builds the topology, starts both control planes with the clusters' state (`server1`
    /// an endpoint of echo only when `local_endpoint`; `server2` always), the echo servers,
    /// every node and both gateways, each ready.
    pub fn start(local_endpoint: bool) -> Self {
        Self::start_with(local_endpoint, None)
    }

    /// As [`Self::start`], with the mesh root (and its key) copied from `root_dir`
    /// (`root-cert.pem`, `ca-key.pem`: ztunnel's test root, for interop) instead of a new one.
    /// c2n1 also hosts `zpod`, a pod no mesh-node enrolls, for a foreign proxy to run in.
    pub fn start_with(local_endpoint: bool, root_dir: Option<&std::path::Path>) -> Self {
        let node = |name: &'static str, pods: Vec<PodSpec>| NodeSpec { name, pods };
        let topo = Topology::build_routed(
            &[
                node("c1n1", vec![PodSpec::enrolled("client")]),
                node("c1n2", vec![PodSpec::enrolled("server1")]),
                node(
                    "c2n1",
                    vec![PodSpec::enrolled("client2"), PodSpec::plain("zpod")],
                ),
                node("c2n2", vec![PodSpec::enrolled("server2")]),
                node("gw1", vec![]),
                node("gw2", vec![]),
            ],
            |from, to| from.starts_with("gw") || cluster_of(from) == cluster_of(to),
        )
        .unwrap_or_else(|error| panic!("build the two-cluster topology: {error:#}"));
        if let Some(dir) = root_dir {
            for (from, to) in [
                ("root-cert.pem", "root-cert.pem"),
                ("ca-key.pem", "root-key.pem"),
            ] {
                std::fs::copy(dir.join(from), topo.ca_dir().join(to))
                    .unwrap_or_else(|error| panic!("copy {from} from {}: {error}", dir.display()));
            }
        }
        let plane = |node: &str| {
            ControlPlane::start(
                &topo.node(node).netns_path(),
                SocketAddr::from((topo.link_ip(node), 15012)),
                &topo.ca_dir(),
            )
            .unwrap_or_else(|error| panic!("start the control plane on {node}: {error:#}"))
        };
        let (cp1, cp2) = (plane("c1n1"), plane("c2n1"));
        let state = State { topo: &topo };
        let server1 = local_endpoint.then_some(ECHO_HOST);
        cp1.put_workloads(vec![
            state.pod("client", "c1n1", 1, None),
            state.pod("server1", "c1n2", 1, server1),
            state.remote_echo(2, 1),
            state.gateway_workload(2),
        ]);
        cp1.put_service(echo_service("net1"));
        cp2.put_workloads(vec![
            state.pod("client2", "c2n1", 2, None),
            state.pod("server2", "c2n2", 2, Some(ECHO_HOST)),
            state.remote_echo(1, 1),
            state.gateway_workload(1),
        ]);
        cp2.put_service(echo_service("net2"));
        let servers = vec![
            topo.serve("server1", TARGET_PORT),
            topo.serve("server2", TARGET_PORT),
        ];
        let args = |cp: &ControlPlane, name: &str| {
            let cluster = cluster_of(name);
            let mut args = cp.client_args_in(
                &topo,
                name,
                &format!("cluster{cluster}"),
                &format!("net{cluster}"),
            );
            args.extend(["--ca-dir".to_owned(), topo.ca_dir().display().to_string()]);
            args
        };
        let mesh_node = |cp: &ControlPlane, name: &str| {
            let args = args(cp, name);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            MeshNode::start(&topo, name, &args)
                .unwrap_or_else(|error| panic!("start mesh-node {name}: {error:#}"))
        };
        let gateway = |cp: &ControlPlane, name: &str| {
            let mut args = args(cp, name);
            args.extend([
                "--gateway-listen".to_owned(),
                format!("{}:15008", topo.link_ip(name)),
                "--gateway-identity".to_owned(),
                format!("{GATEWAY_NS}/{GATEWAY_SA}"),
            ]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            MeshNode::start_gateway(&topo, name, &args)
                .unwrap_or_else(|error| panic!("start the gateway {name}: {error:#}"))
        };
        Self {
            c1n1: mesh_node(&cp1, "c1n1"),
            c1n2: mesh_node(&cp1, "c1n2"),
            c2n1: mesh_node(&cp2, "c2n1"),
            c2n2: mesh_node(&cp2, "c2n2"),
            gw1: gateway(&cp1, "gw1"),
            gw2: gateway(&cp2, "gw2"),
            servers,
            cp1,
            cp2,
            topo,
        }
    }

    /// The echo service's VIP and port, as applications call it.
    pub fn echo(&self) -> SocketAddr {
        SocketAddr::from((ECHO_VIP, ECHO_PORT))
    }

    /// Workloads as each cluster's control plane describes them.
    pub fn state(&self) -> State<'_> {
        State { topo: &self.topo }
    }

    /// Which server pod answered each connection of a run, in order: the echo server reports
    /// its own address on each connection. Fails on any failed connection.
    pub fn served_by(&self, run: &PodRun) -> Result<Vec<&'static str>> {
        anyhow::ensure!(run.errors.is_empty(), "connection errors: {:?}", run.errors);
        run.ok
            .iter()
            .map(|conn| {
                self.topo
                    .nodes
                    .iter()
                    .flat_map(|node| &node.pods)
                    .find(|pod| std::net::IpAddr::V4(pod.ip) == conn.server_local.ip())
                    .map(|pod| pod.name)
                    .ok_or_else(|| anyhow::anyhow!("answered from {}", conn.server_local))
            })
            .collect()
    }
}

/// Makes `change` (a push to a control plane) and waits until `node` has applied it.
pub fn push(node: &MeshNode, change: impl FnOnce()) -> Result<()> {
    let applied = || node.log_lines_with(&["xDS update applied"]).len();
    let before = applied();
    change();
    eventually("the push to be applied", || applied() > before)
}

/// echo with NETWORK failover: local endpoints while there are any, else another network's.
pub fn failover_echo(network: &str) -> pb::Service {
    let mut service = echo_service(network);
    service.load_balancing = Some(pb::LoadBalancing {
        routing_preference: vec![pb::load_balancing::Scope::Network as i32],
        mode: pb::load_balancing::Mode::Failover as i32,
        health_policy: 0,
    });
    service
}

/// Builds the resources of the two clusters.
pub struct State<'a> {
    topo: &'a Topology,
}

impl State<'_> {
    /// The workload of `pod` on `node` in cluster `cluster` (network `net<cluster>`), an
    /// endpoint of `service` (port 80 → 8080) when given.
    pub fn pod(&self, pod: &str, node: &str, cluster: u8, service: Option<&str>) -> pb::Workload {
        let mut w = pod_workload(self.topo, pod, node);
        w.uid = format!("cluster{cluster}//Pod/default/{pod}");
        w.cluster_id = format!("cluster{cluster}");
        w.network = format!("net{cluster}");
        if let Some(hostname) = service {
            w.services
                .insert(format!("default/{hostname}"), echo_ports());
        }
        w
    }

    /// What istiod sends the other cluster for cluster `cluster`'s endpoints of echo: one
    /// workload on that cluster's network, without an address, behind its gateway, its
    /// capacity the endpoint count.
    pub fn remote_echo(&self, cluster: u8, capacity: u32) -> pb::Workload {
        pb::Workload {
            uid: format!("cluster{cluster}/net{cluster}/{ECHO_HOST}"),
            name: "echo".into(),
            namespace: "default".into(),
            network: format!("net{cluster}"),
            cluster_id: format!("cluster{cluster}"),
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            network_gateway: Some(pb::GatewayAddress {
                destination: Some(pb::gateway_address::Destination::Address(
                    pb::NetworkAddress {
                        network: format!("net{cluster}"),
                        address: self.gateway_ip(cluster).octets().to_vec(),
                        length: None,
                    },
                )),
                hbone_mtls_port: 15008,
            }),
            capacity: Some(capacity),
            services: [(format!("default/{ECHO_HOST}"), echo_ports())].into(),
            ..Default::default()
        }
    }

    /// Cluster `cluster`'s east-west gateway as a workload: the identity its certificate
    /// carries.
    pub fn gateway_workload(&self, cluster: u8) -> pb::Workload {
        let ip = self.gateway_ip(cluster);
        pb::Workload {
            uid: format!("NetworkGateway/net{cluster}/{ip}/15008"),
            name: "istio-eastwestgateway".into(),
            namespace: GATEWAY_NS.into(),
            service_account: GATEWAY_SA.into(),
            addresses: vec![ip.octets().to_vec()],
            network: format!("net{cluster}"),
            cluster_id: format!("cluster{cluster}"),
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            ..Default::default()
        }
    }

    fn gateway_ip(&self, cluster: u8) -> std::net::Ipv4Addr {
        self.topo.link_ip(&format!("gw{cluster}"))
    }
}

fn echo_ports() -> pb::PortList {
    pb::PortList {
        ports: vec![pb::Port {
            service_port: u32::from(ECHO_PORT),
            target_port: u32::from(TARGET_PORT),
            ..Default::default()
        }],
    }
}

/// The global service echo as one cluster's control plane sends it: its VIP on that
/// cluster's network, the identities of its endpoints in both clusters as SANs.
pub fn echo_service(network: &str) -> pb::Service {
    pb::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: ECHO_HOST.into(),
        addresses: vec![pb::NetworkAddress {
            network: network.into(),
            address: ECHO_VIP.to_vec(),
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: u32::from(ECHO_PORT),
            target_port: u32::from(TARGET_PORT),
            ..Default::default()
        }],
        subject_alt_names: vec![
            "spiffe://cluster.local/ns/default/sa/server1".into(),
            "spiffe://cluster.local/ns/default/sa/server2".into(),
        ],
        ..Default::default()
    }
}
