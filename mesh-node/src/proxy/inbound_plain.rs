//! Plaintext connections into an enrolled pod, steered by sk_lookup to mesh-node's 15006
//! listener in the pod's namespace. The accepted socket's local address is where the client
//! was going.
use std::{net::SocketAddr, sync::Arc, time::Duration, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::{COPY_BUFFER, ProxyContext, inbound};
use crate::enroll::Pod;

/// Accepts captured plaintext connections until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let span = tracing::info_span!("inbound_plain", pod = %pod.spec, client = %peer);
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
    let dst: SocketAddr = match client.local_addr() {
        Ok(addr) => SocketAddr::new(addr.ip().to_canonical(), addr.port()),
        Err(error) => {
            tracing::info!(%error, "inbound plaintext connection lost before it was read");
            return;
        }
    };
    if !pod.owns(dst.ip()) {
        tracing::warn!(%dst, "inbound plaintext connection for an address the pod does not have; closing it");
        return;
    }
    let started = Instant::now();
    tracing::info!(%dst, "inbound plaintext connection captured");
    let mut upstream = match inbound::deliver(&ctx, &pod, None, dst).await {
        Ok(upstream) => upstream,
        Err(refusal) => {
            tracing::info!(%dst, reason = %refusal.reason, "inbound plaintext connection failed");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let result = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        COPY_BUFFER,
        COPY_BUFFER,
    )
    .await;
    let duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok((received, sent)) => tracing::info!(
            %dst,
            bytes_received = received,
            bytes_sent = sent,
            duration_ms,
            "inbound plaintext connection closed"
        ),
        Err(error) => {
            tracing::info!(%dst, %error, duration_ms, "inbound plaintext connection reset")
        }
    }
}
