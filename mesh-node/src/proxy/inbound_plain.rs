//! Plaintext connections into an enrolled pod, steered by sk_lookup to mesh-node's 15006
//! listener in the pod's namespace. The accepted socket's local address is where the client
//! was going.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::{
    ProxyContext,
    authorize::Inbound,
    inbound::{self, Delivered},
};
use crate::{ending, pod::Pod, splice::splice};

/// Accepts captured plaintext connections until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // At debug only, as outbound's (a per-connection span's slot is never freed).
                let span = tracing::debug_span!("inbound_plain", pod = %pod.spec, client = %peer);
                tokio::spawn(handle(stream, pod.clone(), ctx.clone()).instrument(span));
            }
            Err(error) => {
                tracing::warn!(pod = %pod.spec, %error, "accept on inbound plaintext listener failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(mut client: TcpStream, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    // Reset unless it ends cleanly (see `ending`).
    ending::arm(&client);
    let dst: SocketAddr = match client.local_addr() {
        Ok(addr) => SocketAddr::new(addr.ip().to_canonical(), addr.port()),
        Err(error) => {
            tracing::info!(pod = %pod.spec, %error, "inbound plaintext connection lost before it was read");
            return;
        }
    };
    if !pod.owns(dst.ip()) {
        tracing::warn!(pod = %pod.spec, %dst, "inbound plaintext connection for an address the pod does not have; resetting it");
        return;
    }
    tracing::debug!(%dst, "inbound plaintext connection captured");
    let peer = match client.peer_addr() {
        Ok(peer) => SocketAddr::new(peer.ip().to_canonical(), peer.port()),
        Err(error) => {
            tracing::info!(pod = %pod.spec, %dst, %error, "inbound plaintext connection lost before it was read");
            return;
        }
    };
    let conn = Inbound {
        pod: pod.clone(),
        source: None,
        source_ip: peer.ip(),
        destination: dst,
    };
    // A refusal resets the client (it is armed): it must not mistake a refusal for an empty
    // answer. `deliver` reported why.
    let Ok(Delivered {
        stream: mut upstream,
        revocation,
        report,
        announced: _announced,
    }) = inbound::deliver(&ctx, conn, peer, inbound::Client::Plain).await
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    let ended = splice(
        &mut client,
        &mut upstream,
        Some(Box::pin(revocation.wait())),
    )
    .await;
    ending::settle(&ended, &[&client, &upstream]);
    report.finish(
        &ended.how,
        ended.a_to_b,
        ended.b_to_a,
        "inbound plaintext connection",
    );
}
