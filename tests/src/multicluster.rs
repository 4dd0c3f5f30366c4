//! Two clusters on one machine, each on a network of its own, as Istio's multi-network
//! ambient mesh describes them: cluster 1 (network `net1`) is node `c1n1` with `client` and
//! `server1`; cluster 2 (network `net2`) is node `c2n1` with `server2`, behind the east-west
//! gateway node `gw2`, where mesh-node runs in gateway mode. Cluster 1's pods cannot route to
//! cluster 2's: the only way there is the gateway. Each cluster has its own test control
//! plane, speaking as istiod does (the remote endpoints of the global service `echo` are one
//! synthetic workload with `network_gateway` and `capacity`); both share one mesh root.
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
    pub c2n1: MeshNode,
    pub gw2: MeshNode,
    pub servers: Vec<Server>,
    pub cp1: ControlPlane,
    pub cp2: ControlPlane,
    pub topo: Topology,
}

impl MultiCluster {
    /// Builds the topology, starts both control planes with the clusters' state (`server1`
    /// an endpoint of echo only when `local_endpoint`), the echo servers, both nodes and the
    /// gateway, each ready.
    pub fn start(local_endpoint: bool) -> Self {
        let topo = Topology::build_routed(
            &[
                NodeSpec {
                    name: "c1n1",
                    pods: vec![PodSpec::enrolled("client"), PodSpec::enrolled("server1")],
                },
                NodeSpec {
                    name: "c2n1",
                    pods: vec![PodSpec::enrolled("server2")],
                },
                NodeSpec {
                    name: "gw2",
                    pods: vec![],
                },
            ],
            // The gateway reaches every pod (cluster 2's to forward, cluster 1's to answer);
            // the clusters do not reach each other's pods.
            |from, _| from == "gw2",
        )
        .unwrap_or_else(|error| panic!("build the two-cluster topology: {error:#}"));
        let cp1 = ControlPlane::start(
            &topo.node("c1n1").netns_path(),
            SocketAddr::from((topo.link_ip("c1n1"), 15012)),
            &topo.ca_dir(),
        )
        .expect("start cluster 1's control plane");
        let cp2 = ControlPlane::start(
            &topo.node("c2n1").netns_path(),
            SocketAddr::from((topo.link_ip("c2n1"), 15012)),
            &topo.ca_dir(),
        )
        .expect("start cluster 2's control plane");
        let mc_state = State { topo: &topo };
        cp1.put_workloads(vec![
            mc_state.pod("client", "c1n1", 1, None),
            mc_state.remote_echo(1),
            mc_state.gateway_workload(),
        ]);
        if local_endpoint {
            cp1.put_workload(mc_state.pod("server1", "c1n1", 1, Some(ECHO_HOST)));
        } else {
            cp1.put_workload(mc_state.pod("server1", "c1n1", 1, None));
        }
        cp1.put_service(echo_service("net1"));
        cp2.put_workloads(vec![
            mc_state.pod("server2", "c2n1", 2, Some(ECHO_HOST)),
            mc_state.gateway_workload(),
        ]);
        cp2.put_service(echo_service("net2"));
        let servers = vec![
            topo.serve("server1", TARGET_PORT),
            topo.serve("server2", TARGET_PORT),
        ];
        let node = |cp: &ControlPlane, name: &str, cluster: &str, network: &str| {
            let mut args = cp.client_args_in(&topo, name, cluster, network);
            args.extend(["--ca-dir".to_owned(), topo.ca_dir().display().to_string()]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            MeshNode::start(&topo, name, &args)
                .unwrap_or_else(|error| panic!("start mesh-node {name}: {error:#}"))
        };
        let c1n1 = node(&cp1, "c1n1", "cluster1", "net1");
        let c2n1 = node(&cp2, "c2n1", "cluster2", "net2");
        let gw2 = {
            let mut args = cp2.client_args_in(&topo, "gw2", "cluster2", "net2");
            args.extend([
                "--ca-dir".to_owned(),
                topo.ca_dir().display().to_string(),
                "--gateway-listen".to_owned(),
                format!("{}:15008", topo.link_ip("gw2")),
                "--gateway-identity".to_owned(),
                format!("{GATEWAY_NS}/{GATEWAY_SA}"),
            ]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            MeshNode::start_gateway(&topo, "gw2", &args)
                .unwrap_or_else(|error| panic!("start the gateway: {error:#}"))
        };
        Self {
            c1n1,
            c2n1,
            gw2,
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
    /// the address it was called from, and a node delivers from inside the destination pod,
    /// from its own address. Fails on any failed connection.
    pub fn served_by(&self, run: &PodRun) -> Result<Vec<&'static str>> {
        anyhow::ensure!(run.errors.is_empty(), "connection errors: {:?}", run.errors);
        run.ok
            .iter()
            .map(|conn| {
                ["server1", "server2"]
                    .into_iter()
                    .find(|pod| conn.server_saw.ip() == self.topo.pod(pod).ip)
                    .ok_or_else(|| anyhow::anyhow!("answered from {}", conn.server_saw))
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

    /// What istiod sends cluster 1 for cluster 2's endpoints of echo: one workload on net2,
    /// without an address, behind net2's gateway, its capacity the endpoint count.
    pub fn remote_echo(&self, capacity: u32) -> pb::Workload {
        pb::Workload {
            uid: format!("cluster2/net2/{ECHO_HOST}"),
            name: "echo".into(),
            namespace: "default".into(),
            network: "net2".into(),
            cluster_id: "cluster2".into(),
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            network_gateway: Some(pb::GatewayAddress {
                destination: Some(pb::gateway_address::Destination::Address(
                    pb::NetworkAddress {
                        network: "net2".into(),
                        address: self.topo.link_ip("gw2").octets().to_vec(),
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

    /// net2's east-west gateway as a workload: the identity its certificate carries.
    pub fn gateway_workload(&self) -> pb::Workload {
        let ip = self.topo.link_ip("gw2");
        pb::Workload {
            uid: format!("NetworkGateway/net2/{ip}/15008"),
            name: "istio-eastwestgateway".into(),
            namespace: GATEWAY_NS.into(),
            service_account: GATEWAY_SA.into(),
            addresses: vec![ip.octets().to_vec()],
            network: "net2".into(),
            cluster_id: "cluster2".into(),
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            ..Default::default()
        }
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
