//! A small control plane for tests: a real gRPC server speaking delta ADS over TLS, as istiod
//! does, inside a node's network namespace. Tests put and remove resources while it runs; each
//! open stream is sent what changed. It records what clients sent (ACKs, NACKs, metadata,
//! initial versions) so tests can assert on the protocol, and can be stopped and started again
//! on the same address with the same resources.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Result, bail};

use crate::{
    MeshNode, Topology,
    netns_server::{NetnsServer, Serve},
};
use mesh_node::proto::Any;
use mesh_node::xds::proto::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE,
    discovery::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    },
    security, workload,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub use crate::netns_server::SERVER_NAME;

/// Where [`ControlPlane::on_node1`] listens: node1's address on the link between the nodes.
pub const ADDRESS: &str = "198.19.0.1:15012";

/// What clients told the control plane.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub streams: usize,
    pub acks: usize,
    /// NACK messages (`error_detail.message`).
    pub nacks: Vec<String>,
    pub authorization: Vec<String>,
    pub cluster_ids: Vec<String>,
    pub node_ids: Vec<String>,
    /// `initial_resource_versions` of each first request, per type.
    pub initial_versions: Vec<(String, HashMap<String, String>)>,
}

#[derive(Default)]
struct Resources {
    /// (type url, name) → (version, body).
    items: BTreeMap<(String, String), (String, Any)>,
    next_version: u64,
}

struct Store {
    resources: Mutex<Resources>,
    generation: watch::Sender<u64>,
    seen: Mutex<Seen>,
}

impl Store {
    fn lock(&self) -> std::sync::MutexGuard<'_, Resources> {
        self.resources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn changed(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// What a stream that holds `sent` must be told: changed resources and removed names.
    fn diff(&self, type_url: &str, sent: &HashMap<String, String>) -> (Vec<Resource>, Vec<String>) {
        let resources = self.lock();
        let mut changed = Vec::new();
        for ((t, name), (version, body)) in &resources.items {
            if t == type_url && sent.get(name) != Some(version) {
                changed.push(Resource {
                    name: name.clone(),
                    version: version.clone(),
                    resource: Some(body.clone()),
                    ..Default::default()
                });
            }
        }
        let removed = sent
            .keys()
            .filter(|name| {
                !resources
                    .items
                    .contains_key(&(type_url.to_owned(), (*name).clone()))
            })
            .cloned()
            .collect();
        (changed, removed)
    }
}

/// A running (or stopped) test control plane.
pub struct ControlPlane {
    store: Arc<Store>,
    server: NetnsServer,
}

impl ControlPlane {
    /// Starts serving on `addr` inside `netns` (port 0: any free port, then [`Self::addr`]
    /// tells which), with a serving certificate for [`SERVER_NAME`]
    /// signed by the mesh CA in `ca_dir`.
    pub fn start(netns: &Path, addr: SocketAddr, ca_dir: &Path) -> Result<Self> {
        let (generation, _) = watch::channel(0);
        let store = Arc::new(Store {
            resources: Mutex::new(Resources::default()),
            generation,
            seen: Mutex::new(Seen::default()),
        });
        let ads = store.clone();
        let serve: Serve = Arc::new(move |server, incoming| {
            let service = AggregatedDiscoveryServiceServer::new(Ads { store: ads.clone() })
                .max_decoding_message_size(64 << 20);
            Box::pin(async move {
                let _ = server.clone().serve_with_incoming(service, incoming).await;
            })
        });
        Ok(Self {
            store,
            server: NetnsServer::start(netns, addr, ca_dir, serve)?,
        })
    }

    /// Starts serving where the scenarios expect it: node1's address on the link between the
    /// nodes ([`ADDRESS`]), inside node1, with the topology's CA.
    pub fn on_node1(topo: &Topology) -> Self {
        Self::start(
            &topo.node("node1").netns_path(),
            ADDRESS
                .parse()
                .unwrap_or_else(|_| unreachable!("constant address")),
            &topo.ca_dir(),
        )
        .expect("start the test control plane")
    }

    /// Puts the workload of each `(pod, node)` ([`pod_workload`]), one response each.
    pub fn put_pods(&self, topo: &Topology, pods: &[(&str, &str)]) {
        for (pod, node) in pods {
            self.put_workload(pod_workload(topo, pod, node));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Stops serving: the listener closes and every stream is cut.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Serves again on the same address with the same resources.
    pub fn resume(&mut self) -> Result<()> {
        self.server.resume()
    }

    fn put(&self, type_url: &str, name: &str, body: Any) {
        self.put_all(vec![(type_url, name.to_owned(), body)]);
    }

    /// Puts every resource, then notifies streams once, so they all go out in one response.
    fn put_all(&self, items: Vec<(&str, String, Any)>) {
        let mut resources = self.store.lock();
        for (type_url, name, body) in items {
            resources.next_version += 1;
            let version = format!("v{}", resources.next_version);
            resources
                .items
                .insert((type_url.to_owned(), name), (version, body));
        }
        drop(resources);
        self.store.changed();
    }

    /// Puts `workloads` and removes the Address resources `removed` in one response.
    pub fn change_workloads(&self, workloads: Vec<workload::Workload>, removed: &[&str]) {
        let mut resources = self.store.lock();
        for w in workloads {
            resources.next_version += 1;
            let version = format!("v{}", resources.next_version);
            let name = w.uid.clone();
            let body = workload::Address {
                r#type: Some(workload::address::Type::Workload(w)),
            };
            resources.items.insert(
                (ADDRESS_TYPE.to_owned(), name),
                (version, any(ADDRESS_TYPE, &body)),
            );
        }
        resources
            .items
            .retain(|(t, n), _| t != ADDRESS_TYPE || !removed.contains(&n.as_str()));
        drop(resources);
        self.store.changed();
    }

    pub fn put_workload(&self, w: workload::Workload) {
        self.put_workloads(vec![w]);
    }

    /// Puts several workloads in one response.
    pub fn put_workloads(&self, workloads: Vec<workload::Workload>) {
        let items = workloads
            .into_iter()
            .map(|w| {
                let name = w.uid.clone();
                let body = workload::Address {
                    r#type: Some(workload::address::Type::Workload(w)),
                };
                (ADDRESS_TYPE, name, any(ADDRESS_TYPE, &body))
            })
            .collect();
        self.put_all(items);
    }

    pub fn put_service(&self, s: workload::Service) {
        let name = format!("{}/{}", s.namespace, s.hostname);
        let body = workload::Address {
            r#type: Some(workload::address::Type::Service(s)),
        };
        self.put(ADDRESS_TYPE, &name, any(ADDRESS_TYPE, &body));
    }

    pub fn put_policy(&self, p: security::Authorization) {
        let name = format!("{}/{}", p.namespace, p.name);
        self.put(AUTHORIZATION_TYPE, &name, any(AUTHORIZATION_TYPE, &p));
    }

    /// Puts an Address resource whose body is `bytes` as they are, valid or not.
    pub fn put_raw_address(&self, name: &str, bytes: Vec<u8>) {
        self.put(
            ADDRESS_TYPE,
            name,
            Any {
                type_url: ADDRESS_TYPE.into(),
                value: bytes.into(),
            },
        );
    }

    /// Removes an Address (workload uid or "namespace/hostname") or a policy.
    pub fn remove(&self, name: &str) {
        let mut resources = self.store.lock();
        resources.items.retain(|(_, n), _| n != name);
        drop(resources);
        self.store.changed();
    }

    pub fn seen(&self) -> Seen {
        self.store.seen().clone()
    }

    /// `mesh-node run` arguments that take the mesh state from this control plane, as node
    /// `node` of cluster "cluster1", with the topology's CA root and a token file written once.
    pub fn client_args(&self, topo: &Topology, node: &str) -> Vec<String> {
        self.client_args_in(topo, node, "cluster1", "")
    }

    /// As [`Self::client_args`], as a node of `cluster` on `network`.
    pub fn client_args_in(
        &self,
        topo: &Topology,
        node: &str,
        cluster: &str,
        network: &str,
    ) -> Vec<String> {
        let token = token_file(topo);
        [
            "--xds-address",
            &self.addr().to_string(),
            "--xds-root-cert",
            &topo.ca_dir().join("root-cert.pem").display().to_string(),
            "--xds-server-name",
            SERVER_NAME,
            "--xds-token-file",
            &token.display().to_string(),
            "--cluster-id",
            cluster,
            "--network",
            network,
            "--node-name",
            node,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Starts mesh-node on `node`, taking the mesh state from this control plane and workload
    /// certificates from the topology's file CA.
    pub fn start_mesh_node(&self, topo: &Topology, node: &str) -> MeshNode {
        self.start_mesh_node_with(topo, node, &[])
    }

    /// [`Self::start_mesh_node`] with `extra` arguments.
    pub fn start_mesh_node_with(&self, topo: &Topology, node: &str, extra: &[&str]) -> MeshNode {
        let mut args = self.client_args(topo, node);
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        args.extend(["--ca-dir".to_owned(), topo.ca_dir().display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        MeshNode::start(topo, node, &args).expect("start mesh-node")
    }
}

/// The bearer token mesh-node presents to the test control plane and the test CA.
pub const TOKEN: &str = "test-token";

/// A file holding [`TOKEN`] in the topology's work directory, written on first use.
pub fn token_file(topo: &Topology) -> std::path::PathBuf {
    let token = topo.workdir.join("token");
    if !token.exists() {
        std::fs::write(&token, format!("{TOKEN}\n")).expect("write token file");
    }
    token
}

/// The workload resource of a topology pod: uid `cluster1//Pod/<ns>/<name>`, service account
/// = pod name, HBONE when enrolled.
pub fn pod_workload(topo: &Topology, pod: &str, node: &str) -> workload::Workload {
    let p = topo.pod(pod);
    let protocol = if p.enrolled {
        workload::TunnelProtocol::Hbone
    } else {
        workload::TunnelProtocol::None
    };
    workload::Workload {
        uid: format!("cluster1//Pod/{}/{}", p.namespace, p.name),
        name: p.name.into(),
        namespace: p.namespace.into(),
        service_account: p.name.into(),
        addresses: p
            .ips()
            .iter()
            .map(|ip| match ip {
                std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
            })
            .collect(),
        node: node.into(),
        cluster_id: "cluster1".into(),
        tunnel_protocol: protocol as i32,
        ..Default::default()
    }
}

fn any(type_url: &str, message: &impl Message) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: message.encode_to_vec().into(),
    }
}

struct Ads {
    store: Arc<Store>,
}

type ResponseStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        {
            let metadata = request.metadata();
            let text = |key| {
                metadata
                    .get(key)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let mut seen = self.store.seen();
            seen.streams += 1;
            seen.authorization.push(text("authorization"));
            seen.cluster_ids.push(text("clusterid"));
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(serve_stream(self.store.clone(), request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn serve_stream(
    store: Arc<Store>,
    mut incoming: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) {
    // Per subscribed type: what this stream has been sent (name → version).
    let mut sent: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut generation = store.generation.subscribe();
    let mut answered: std::collections::HashSet<String> = Default::default();
    let mut nonce = 0u64;
    loop {
        let mut push_types: Vec<String> = Vec::new();
        tokio::select! {
            request = incoming.message() => {
                let Ok(Some(request)) = request else { return };
                if !request.response_nonce.is_empty() {
                    let mut seen = store.seen();
                    match request.error_detail {
                        Some(status) => seen.nacks.push(status.message),
                        None => seen.acks += 1,
                    }
                    continue;
                }
                {
                    let mut seen = store.seen();
                    if let Some(node) = &request.node {
                        seen.node_ids.push(node.id.clone());
                    }
                    seen.initial_versions.push((
                        request.type_url.clone(),
                        request.initial_resource_versions.clone(),
                    ));
                }
                sent.insert(request.type_url.clone(), request.initial_resource_versions);
                push_types.push(request.type_url);
            }
            changed = generation.changed() => {
                if changed.is_err() {
                    return;
                }
                push_types.extend(sent.keys().cloned());
            }
        }
        for type_url in push_types {
            let Some(held) = sent.get_mut(&type_url) else {
                continue;
            };
            let (changed, removed) = store.diff(&type_url, held);
            // The first answer of a type is sent even when empty: it tells the client it is
            // in sync.
            let first = answered.insert(type_url.clone());
            if changed.is_empty() && removed.is_empty() && !first {
                continue;
            }
            for name in &removed {
                held.remove(name);
            }
            for resource in &changed {
                held.insert(resource.name.clone(), resource.version.clone());
            }
            nonce += 1;
            let response = DeltaDiscoveryResponse {
                type_url: type_url.clone(),
                nonce: format!("n{nonce}"),
                resources: changed,
                removed_resources: removed,
                ..Default::default()
            };
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
        }
    }
}

/// Fails unless `condition` holds within 10 s.
pub fn eventually(what: &str, condition: impl FnMut() -> bool) -> Result<()> {
    if crate::wait_for(condition) {
        Ok(())
    } else {
        bail!("timed out waiting for {what}")
    }
}
