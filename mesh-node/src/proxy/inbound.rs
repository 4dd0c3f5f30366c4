//! Traffic arriving for a pod on this node: HBONE tunnels on `<pod IP>:15008`, and the one way
//! every path (HBONE, same-node, captured plaintext) reaches the application: [`deliver`].
use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::StatusCode;
use mesh_common::HBONE_PORT;
use tokio::net::{TcpListener, TcpStream};

use super::{ProxyContext, connect_from_pod};
use crate::{
    enroll::Pod,
    hbone::server::{self, OpenFuture, Refusal, TunnelRequest, TunnelTarget},
    identity::Identity,
};

/// Accepts HBONE connections on one of the pod's 15008 listeners until the task is aborted.
pub async fn serve_hbone(listener: TcpListener, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    let target: Arc<dyn TunnelTarget> = Arc::new(PodTarget {
        pod: pod.clone(),
        ctx: ctx.clone(),
    });
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(pod = %pod.spec, %error, "accept on HBONE listener failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (pod, ctx, target) = (pod.clone(), ctx.clone(), target.clone());
        tokio::spawn(async move {
            let Some(certs) = &ctx.certs else { return };
            match certs.get(&pod.identity).await {
                Ok(certified) => {
                    server::serve_connection(
                        tcp,
                        peer,
                        certified.server_config.clone(),
                        ctx.settings.handshake_timeout,
                        target,
                    )
                    .await
                }
                Err(error) => {
                    tracing::warn!(pod = %pod.spec, %peer, %error, "HBONE connection refused: no certificate for the pod")
                }
            }
        });
    }
}

/// Tunnels accepted on a pod's 15008 may only lead into that pod.
struct PodTarget {
    pod: Arc<Pod>,
    ctx: Arc<ProxyContext>,
}

impl TunnelTarget for PodTarget {
    fn open(&self, request: &TunnelRequest) -> OpenFuture {
        let dst = request.authority;
        let (pod, ctx, source) = (
            self.pod.clone(),
            self.ctx.clone(),
            request.peer_identity.clone(),
        );
        Box::pin(async move {
            if !pod.owns(dst.ip()) {
                return Err(Refusal {
                    status: StatusCode::BAD_REQUEST,
                    reason: format!(
                        "authority {dst} is not an address of local pod {}",
                        pod.spec
                    ),
                });
            }
            if dst.port() == HBONE_PORT {
                return Err(Refusal {
                    status: StatusCode::BAD_REQUEST,
                    reason: format!("authority {dst} is the HBONE port itself"),
                });
            }
            deliver(&ctx, &pod, Some(&source), dst).await
        })
    }
}

/// Connects to the application at `dst` inside `pod`, for a client with identity `source`
/// (`None`: a plaintext client, no verified identity).
/// Authorization policy, when it arrives, is checked here, so every path into a pod obeys it.
pub async fn deliver(
    ctx: &ProxyContext,
    pod: &Pod,
    source: Option<&Identity>,
    dst: SocketAddr,
) -> Result<TcpStream, Refusal> {
    let client = source.map_or_else(|| "a plaintext client".to_owned(), ToString::to_string);
    // The socket is made in the destination pod and connects to the pod's own address:
    // sk_lookup lets `remote == local` through to the application's listener.
    connect_from_pod(&pod.netns, dst, ctx.settings.connect_timeout)
        .await
        .map_err(|error| Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!("connect to {dst} in pod {} for {client}: {error}", pod.spec),
        })
}
