//! A stand-in for an Istio waypoint (an Envoy, which these machines do not have): mesh-node's
//! own protocol-only HBONE server at `<pod IP>:15008` in a pod's network namespace, with a
//! certificate for the waypoint's identity. It records each CONNECT it is sent, then forwards it as a waypoint does
//! after its L7 work: a CONNECT of its own, as itself, to the destination workload's `15008`,
//! spliced to the first.
use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use http::StatusCode;
use mesh_node::{
    hbone::{
        client::{ConnectHeaders, Connection},
        server::{self, HandleFuture, Refusal, Responder, TunnelHandler, TunnelRequest},
    },
    identity::{Identity, file_ca::FileCa},
    tls::Tls,
};
use tokio::{net::TcpListener, sync::oneshot};

use crate::Topology;

/// One CONNECT the waypoint was sent.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `:authority`, as written.
    pub authority: String,
    /// The verified SPIFFE ID of the node proxy that sent it.
    pub client: String,
    /// The application's address, from `forwarded`.
    pub forwarded_for: Option<SocketAddr>,
}

/// Where the waypoint sends a tunnel for `authority`: the workload address and port (the new
/// `:authority`) and the identity that workload must present. `None` answers 503.
pub type Forward = dyn Fn(SocketAddr) -> Option<(SocketAddr, Identity)> + Send + Sync;

pub struct Waypoint {
    recorded: Arc<Mutex<Vec<Recorded>>>,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Waypoint {
    /// Serves in pod `pod` as `identity` (a SPIFFE ID) until dropped.
    pub fn start(
        topo: &Topology,
        pod: &str,
        identity: &str,
        forward: Arc<Forward>,
    ) -> Result<Self> {
        let pod = topo.pod(pod);
        let addr = SocketAddr::new(pod.ip.into(), 15008);
        let identity: Identity = identity.parse()?;
        let ca = FileCa::load(&topo.ca_dir(), Duration::from_secs(3600))?;
        let tls = Arc::new(Tls::new(&identity.trust_domain));
        let certified = Arc::new(tls.certified(&ca.issue(&identity, Duration::from_secs(3600))?)?);
        let netns = std::fs::File::open(pod.netns_path())?;
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let record = recorded.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on this thread only; `netns` is open.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = ready_tx.send(Err(std::io::Error::last_os_error().into()));
                return;
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready_tx.send(Err(error.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match TcpListener::bind(addr).await {
                    Ok(listener) => listener,
                    Err(error) => {
                        let _ = ready_tx.send(Err(error.into()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let config = certified.server_config.clone();
                let handler: Arc<dyn TunnelHandler> = Arc::new(Forwarder {
                    tls,
                    certified,
                    forward,
                    record,
                });
                let accept = async {
                    loop {
                        let Ok((tcp, peer)) = listener.accept().await else {
                            continue;
                        };
                        // mesh-node's own protocol-only HBONE server does TLS, h2 and CONNECT.
                        tokio::spawn(server::serve_connection(
                            tcp,
                            peer,
                            config.clone(),
                            Duration::from_secs(10),
                            handler.clone(),
                            tokio::sync::watch::channel(false).1,
                        ));
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stop_rx => {}
                }
            });
        });
        ready_rx
            .recv()
            .context("waypoint thread ended before serving")??;
        Ok(Self {
            recorded,
            running: Some((stop_tx, thread)),
        })
    }

    /// Every CONNECT received so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

/// The stand-in's tunnel handler: record, then forward as a waypoint would.
struct Forwarder {
    tls: Arc<Tls>,
    certified: Arc<mesh_node::tls::Certified>,
    forward: Arc<Forward>,
    record: Arc<Mutex<Vec<Recorded>>>,
}

impl TunnelHandler for Forwarder {
    fn handle(&self, request: TunnelRequest, responder: Responder) -> HandleFuture {
        self.record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Recorded {
                authority: request.authority.to_string(),
                client: request.peer_identity.to_string(),
                forwarded_for: request.forwarded_for,
            });
        let next = match &request.authority {
            mesh_node::hbone::Authority::Addr(addr) => (self.forward)(*addr),
            mesh_node::hbone::Authority::Host { .. } => None,
        };
        let (tls, certified) = (self.tls.clone(), self.certified.clone());
        Box::pin(async move {
            let unavailable = |reason: String| Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                reason,
            };
            let Some((target, expected)) = next else {
                return responder
                    .refuse(unavailable(format!("no route for {}", request.authority)));
            };
            let upstream = async {
                let peer = SocketAddr::new(target.ip(), 15008);
                let tcp = tokio::net::TcpStream::connect(peer).await?;
                let config = tls.client_config(&certified, vec![expected.into()])?;
                let connection = Connection::establish(tcp, peer, config).await?;
                let stream = connection
                    .connect(&target.to_string(), &ConnectHeaders::default())
                    .await?;
                anyhow::Ok((connection, stream))
            };
            let (_connection, mut upstream) = match upstream.await {
                Ok(parts) => parts,
                Err(error) => return responder.refuse(unavailable(error.to_string())),
            };
            let Ok(mut downstream) = responder.accept() else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
        })
    }
}
