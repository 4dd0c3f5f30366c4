//! The client side of HBONE for captured connections: the source pod's certificate, a CONNECT
//! stream on a pooled connection to a peer (a node, a waypoint, an east-west gateway), and the
//! headers every CONNECT carries.
use std::{fmt::Write as _, net::SocketAddr, sync::Arc};

use super::{ProxyContext, connect_from_pod, failure::Failure, route::Tunnel};
use crate::{
    hbone::{
        Baggage, H2Stream,
        client::{ConnectHeaders, Connection},
        pool::PoolKey,
    },
    identity::{Identity, San},
    pod::Pod,
    state::Workload,
    tls::Certified,
};

/// The tunnel `tunnel` describes, on a pooled connection to its peer.
pub(super) async fn open_tunnel(
    ctx: &ProxyContext,
    pod: &Pod,
    tunnel: &Tunnel,
    headers: &ConnectHeaders,
) -> Result<H2Stream, Failure> {
    let source = source_certificate(ctx, pod).await?;
    pooled_stream(
        ctx,
        pod,
        &source,
        PeerOf {
            addr: tunnel.peer,
            expected: &tunnel.expected,
            identity: tunnel.workload.identity(),
        },
        &tunnel.authority.to_string(),
        headers,
    )
    .await
}

/// The source pod's certificate, waiting for its first fetch if need be.
pub(super) async fn source_certificate(
    ctx: &ProxyContext,
    pod: &Pod,
) -> Result<Arc<Certified>, Failure> {
    let certs = ctx.certs.as_ref().ok_or_else(|| {
        Failure::Tunnel(
            "no certificate source configured (mesh-node run --ca-address or --ca-dir)".into(),
        )
    })?;
    certs
        .get(&pod.identity)
        .await
        .map_err(|error| Failure::Tunnel(error.to_string()))
}

/// The TLS peer of a pooled HBONE connection.
pub(super) struct PeerOf<'a> {
    pub addr: SocketAddr,
    /// The names its certificate may carry.
    pub expected: &'a [San],
    /// Who it is, for the log.
    pub identity: Identity,
}

/// A CONNECT stream to `authority` on a pooled connection from `pod` to `peer`, made when no
/// pooled one has room.
pub(super) async fn pooled_stream(
    ctx: &ProxyContext,
    pod: &Pod,
    source: &Certified,
    peer: PeerOf<'_>,
    authority: &str,
    headers: &ConnectHeaders,
) -> Result<H2Stream, Failure> {
    let PeerOf {
        addr,
        expected,
        identity,
    } = peer;
    let tls = ctx
        .certs
        .as_ref()
        .map(|certs| certs.tls())
        .ok_or_else(|| Failure::Tunnel("no certificate source configured".into()))?;
    let key = PoolKey::new(
        pod.ip_for(addr.ip()),
        pod.identity.clone(),
        expected.to_vec(),
        addr,
    );
    // A stream the peer never processed (it was draining: GOAWAY) goes again, once, on
    // another connection; the pool no longer offers the one that refused it.
    let mut retried = false;
    loop {
        let lease = ctx
            .pool
            .checkout(&key, || async {
                let tcp = connect_from_pod(&pod.netns, addr, ctx.settings.connect_timeout)
                    .await
                    .map_err(|error| format!("connect {addr}: {error}"))?;
                let config = tls
                    .client_config(source, expected.to_vec())
                    .map_err(|error| format!("client TLS configuration: {error}"))?;
                Connection::establish(tcp, addr, config)
                    .await
                    .map_err(|error| error.to_string())
            })
            .await
            .map_err(Failure::Tunnel)?;
        if lease.fresh {
            tracing::info!(
                peer = %addr,
                peer_identity = %identity,
                connection_id = lease.connection_id(),
                "HBONE connection established"
            );
        }
        match lease.connection().connect(authority, headers).await {
            Ok(stream) => return Ok(stream.with_lease(lease)),
            Err(error) if error.unprocessed() && !retried => {
                tracing::info!(
                    peer = %addr,
                    connection_id = lease.connection_id(),
                    %error,
                    "HBONE stream not processed by the peer: sending it on another connection"
                );
                retried = true;
            }
            Err(error) => return Err(Failure::Tunnel(error.to_string())),
        }
    }
}

/// The headers of every CONNECT from `pod`'s application at `app_addr`: `forwarded`, a fresh
/// `traceparent`, and `baggage` describing the source (from its workload when the control
/// plane knows it): through a gateway, that is all the destination learns of it.
pub(super) fn connect_headers(
    ctx: &ProxyContext,
    pod: &Pod,
    workload: Option<&Workload>,
    app_addr: SocketAddr,
) -> ConnectHeaders {
    let baggage = match workload {
        Some(w) => super::workload_baggage(w),
        None => Baggage {
            cluster: ctx.node.cluster_id.clone(),
            namespace: pod.spec.namespace.clone(),
            workload_name: pod.spec.name.clone(),
            workload_kind: "pod".to_owned(),
            ..Baggage::default()
        },
    };
    ConnectHeaders {
        client: Some(app_addr),
        baggage: Some(baggage.to_header()),
        traceparent: ctx
            .certs
            .as_ref()
            .map(|certs| traceparent(certs.tls().provider())),
        forwarded_network: None,
    }
}

/// A fresh W3C trace context: version 00, random trace and span ids, sampled.
fn traceparent(provider: &rustls::crypto::CryptoProvider) -> String {
    let mut ids = [0u8; 24];
    if provider.secure_random.fill(&mut ids).is_err() {
        ids[0] = 1;
    }
    let mut value = String::with_capacity(55);
    value.push_str("00-");
    for (i, byte) in ids.iter().enumerate() {
        if i == 16 {
            value.push('-');
        }
        let _ = write!(value, "{byte:02x}");
    }
    value.push_str("-01");
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_has_the_w3c_shape() {
        let value = traceparent(&crate::tls::provider());
        let parts: Vec<&str> = value.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
    }
}
