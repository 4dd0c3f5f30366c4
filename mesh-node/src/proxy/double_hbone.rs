//! Double HBONE: how a connection reaches a service endpoint on another network. The outer
//! tunnel goes to that network's east-west gateway on a pooled connection, like any HBONE
//! tunnel; inside it runs a second TLS + h2 connection, end to end with the remote node, which
//! the gateway relays without reading. Both CONNECTs name `<service hostname>:<port>`; the
//! inner one also says which network the source is on (`x-forwarded-network`).
//!
//! The inner connection is never pooled (as ztunnel): the gateway picks a remote endpoint per
//! outer tunnel, and pooling would pin every connection to the first one. Its TLS resumes the
//! session of an earlier inner connection to the same identities when the far end still has
//! it, which saves the certificate exchange and signatures of a full handshake.
use rustls::pki_types::ServerName;

use super::{
    ProxyContext,
    failure::Failure,
    route::GatewayTunnel,
    tunnel::{PeerOf, pooled_stream, source_certificate},
};
use crate::{
    hbone::{
        Baggage, H2Stream,
        client::{ClientError, ConnectHeaders, Connection},
    },
    identity::Identity,
    pod::Pod,
    telemetry::Draft,
};

/// Who answered an inner tunnel: the identity its TLS proved, and what it said of its
/// workload in the response's `baggage`.
pub(super) struct FarEnd {
    identity: Option<Identity>,
    baggage: Baggage,
}

impl FarEnd {
    /// The report's destination as the far end described it: the synthetic workload the
    /// route chose stands in only for what it did not say.
    pub(super) fn describe(self, mut draft: Draft) -> Draft {
        draft.destination = draft.destination.described_as(&self.baggage);
        if let Some(identity) = self.identity {
            draft.destination.principal = identity.to_string().into();
        }
        draft
    }
}

/// Opens the inner tunnel of `tunnel` for `pod`, inside an outer one to the gateway. `headers`
/// go on both CONNECTs (the inner one adds the source network).
pub(super) async fn open(
    ctx: &ProxyContext,
    pod: &Pod,
    tunnel: &GatewayTunnel,
    headers: ConnectHeaders,
) -> Result<(H2Stream, FarEnd), Failure> {
    let source = source_certificate(ctx, pod).await?;
    let outer = pooled_stream(
        ctx,
        pod,
        &source,
        PeerOf {
            addr: tunnel.peer,
            expected: &tunnel.outer_expected,
            identity: tunnel.gateway.identity(),
        },
        &tunnel.authority,
        &headers,
    )
    .await?;
    let tls = ctx
        .certs
        .as_ref()
        .map(|certs| certs.tls())
        .ok_or_else(|| Failure::Tunnel("no certificate source configured".into()))?;
    let config = if ctx.settings.inner_tls_resumption {
        source.resuming_client(tunnel.inner_expected.clone(), |expected| {
            tls.client_config(&source, expected)
        })
    } else {
        tls.client_config(&source, tunnel.inner_expected.clone())
    }
    .map_err(|error| Failure::Tunnel(format!("client TLS configuration: {error}")))?;
    // The name only keys the session cache: sessions are per service, whichever of its
    // endpoints the gateway picks (one that does not know the session does a full handshake).
    let hostname = tunnel
        .authority
        .rsplit_once(':')
        .map_or(tunnel.authority.as_str(), |(host, _)| host);
    let server_name = ServerName::try_from(hostname.to_owned())
        .unwrap_or_else(|_| ServerName::IpAddress(tunnel.peer.ip().into()));
    // Closing the inner connection ends the outer stream cleanly both ways, not with a reset.
    let outer = outer.drained_on_shutdown();
    let headers = ConnectHeaders {
        forwarded_network: Some(ctx.node.network.clone()),
        ..headers
    };
    let inner = async {
        let inner = Connection::establish_over(outer, tunnel.peer, server_name, config).await?;
        ctx.metrics.inner_handshake(inner.resumed());
        // The inner connection ends once its one stream does: nothing else holds it.
        let (stream, baggage) = inner.connect_described(&tunnel.authority, &headers).await?;
        let far_end = FarEnd {
            identity: inner.peer_identity().cloned(),
            baggage,
        };
        Ok::<_, ClientError>((stream, far_end))
    };
    // The outer connection's keep-alive would never notice a far end that stalls the inner
    // handshake (the gateway answers its PINGs): the whole inner set-up has a deadline.
    let deadline = ctx.settings.connect_timeout;
    match tokio::time::timeout(deadline, inner).await {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(error)) => Err(Failure::Tunnel(format!(
            "inner HBONE through the gateway: {error}"
        ))),
        Err(_) => Err(Failure::Tunnel(format!(
            "inner HBONE through the gateway: no answer within {} s",
            deadline.as_secs()
        ))),
    }
}
