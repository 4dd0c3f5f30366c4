//! A stand-in for an Istio waypoint (an Envoy, which these machines do not have): an HBONE
//! server at `<pod IP>:15008` in a pod's network namespace, with a certificate for the
//! waypoint's identity. It records each CONNECT it is sent, then forwards it as a waypoint does
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
use http::{Response, StatusCode};
use mesh_node::{
    hbone::{
        H2Stream,
        client::{ConnectHeaders, Connection},
    },
    identity::{Identity, file_ca::FileCa, san},
    tls::Tls,
};
use tokio::{net::TcpListener, sync::oneshot};
use tokio_rustls::TlsAcceptor;

use crate::Topology;

/// One CONNECT the waypoint was sent.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `:authority`, as written.
    pub authority: String,
    /// The verified SPIFFE ID of the node proxy that sent it.
    pub client: String,
    pub forwarded: Option<String>,
    pub baggage: Option<String>,
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
                let accept = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let (tls, certified, forward, record) = (
                            tls.clone(),
                            certified.clone(),
                            forward.clone(),
                            record.clone(),
                        );
                        tokio::spawn(async move {
                            let _ = serve(tcp, tls, certified, forward, record).await;
                        });
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

async fn serve(
    tcp: tokio::net::TcpStream,
    tls: Arc<Tls>,
    certified: Arc<mesh_node::tls::Certified>,
    forward: Arc<Forward>,
    record: Arc<Mutex<Vec<Recorded>>>,
) -> Result<()> {
    let stream = TlsAcceptor::from(certified.server_config.clone())
        .accept(tcp)
        .await?;
    let client = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .context("no client certificate")
        .and_then(|leaf| Ok(san::identity_of(leaf)?))?;
    let mut connection = h2::server::handshake(stream).await?;
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let authority = request
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Recorded {
                authority: authority.clone(),
                client: client.to_string(),
                forwarded: header("forwarded"),
                baggage: header("baggage"),
            });
        let next = authority.parse().ok().and_then(|a| forward(a));
        let (tls, certified) = (tls.clone(), certified.clone());
        tokio::spawn(async move {
            let unavailable = |mut respond: h2::server::SendResponse<_>| {
                let answer = Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(())
                    .unwrap_or_default();
                let _ = respond.send_response(answer, true);
            };
            let Some((target, expected)) = next else {
                return unavailable(respond);
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
            let Ok((_connection, mut upstream)) = upstream.await else {
                return unavailable(respond);
            };
            let Ok(send) = respond.send_response(Response::new(()), false) else {
                return;
            };
            let mut downstream = H2Stream::new(send, request.into_body());
            let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
        });
    }
    Ok(())
}
