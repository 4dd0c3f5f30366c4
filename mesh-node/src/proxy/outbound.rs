//! Captured outbound connections: recover where the application was going, then pick the way
//! there — straight into a pod on this node, through an HBONE tunnel to a mesh workload, or
//! plain TCP to anything outside the mesh.
use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::{
    ProxyContext,
    authorize::Inbound,
    connect_from_pod, double_hbone,
    failure::Failure,
    inbound::{self, Delivered},
    route::{self, Route, Source, Tunnel},
};
use crate::{
    ending,
    hbone::{
        Baggage, H2Stream,
        client::{ConnectHeaders, Connection},
        pool::PoolKey,
    },
    identity::{Identity, San},
    pod::Pod,
    splice::{Revoked, splice},
    state::{Destination, State, Workload},
    telemetry::{Addresses, Draft, Peer, Report, Reporter},
    tls::Certified,
};

/// Accepts captured connections on one of the pod's outbound listeners until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // At debug only: a span enabled for every connection keeps a slot of the
                // subscriber's span slab, which is never given back, for each connection open at
                // the peak (measured: same-node RSS 60 s after 5,000 connections closed, 33 MiB
                // with it, 12 MiB, the idle figure, without). Lines at info name the pod and
                // the port themselves, and the access line carries everything.
                let span =
                    tracing::debug_span!("outbound", pod = %pod.spec, src_port = peer.port());
                tokio::spawn(handle(stream, peer, pod.clone(), ctx.clone()).instrument(span));
            }
            Err(error) => {
                // EMFILE and friends: back off rather than spin; the listener stays open.
                tracing::warn!(pod = %pod.spec, %error, "accept on outbound listener failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub(super) fn route(
    ctx: &ProxyContext,
    state: &State,
    pod: &Pod,
    dst: SocketAddr,
) -> Route<Arc<Pod>> {
    let source = Source {
        ip: pod.primary_ip(),
        namespace: &pod.spec.namespace,
        identity: &pod.identity,
    };
    route::decide(
        state,
        &ctx.node,
        &source,
        dst,
        |ip| ctx.local_pods.get(ip),
        &mut || fastrand::u64(..),
    )
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    // From here on, any end but a clean one resets the application (see `ending`): it was
    // already told its connect succeeded, and must not mistake a failure for an empty answer.
    ending::arm(&client);
    let Some(original) = ctx.original_dsts.take(pod.netns_cookie, peer.port()) else {
        tracing::warn!(pod = %pod.spec, src_port = peer.port(), "no original destination recorded for this connection; resetting it");
        return;
    };
    // The access line at close is the connection's one line at info (as ztunnel logs).
    tracing::debug!(original_dst = %original, "outbound connection captured");
    let _ = client.set_nodelay(true);
    // The application's own address, as the destination will know it.
    let app_addr = SocketAddr::new(pod.primary_ip(), peer.port());
    // The route and what the report says of it come from one read of the state: a push
    // cannot land between them.
    let (route, draft, headers) = {
        let state = ctx.state();
        let route = route(&ctx, &state, &pod, original);
        let draft = report_draft(&ctx, &state, &pod, app_addr, original, &route);
        let source = state.workload_by_ip(&ctx.node.network, app_addr.ip());
        let headers = connect_headers(&ctx, &pod, source.as_deref(), app_addr);
        (route, draft, headers)
    };
    let metrics = &ctx.metrics;
    // Each way either relays (and returns) or says why it could not carry the connection.
    let (failure, message, report) = match route {
        Route::Local { pod: dst_pod, dst } => {
            let mut report = draft.open(metrics);
            report.delivered_to(dst);
            let conn = Inbound {
                pod: dst_pod.clone(),
                source: Some(pod.identity.clone()),
                source_ip: app_addr.ip(),
                destination: dst,
            };
            match inbound::deliver(&ctx, conn, app_addr, inbound::Client::LocalPod(&pod)).await {
                Ok(Delivered {
                    stream,
                    revocation,
                    report: inbound_report,
                }) => {
                    let revoked = Some(Box::pin(revocation.wait()) as Revoked);
                    return relay(
                        client,
                        Upstream::Socket(stream),
                        revoked,
                        report,
                        Some(inbound_report),
                    )
                    .await;
                }
                Err(failure) => (failure, "outbound connection failed", report),
            }
        }
        Route::Hbone(tunnel) => {
            let mut report = draft.open(metrics);
            report.delivered_to(tunnel.authority);
            match open_tunnel(&ctx, &pod, &tunnel, &headers).await {
                Ok(tunnel) => {
                    return relay(client, Upstream::Tunnel(tunnel), None, report, None).await;
                }
                Err(failure) => (failure, "outbound connection failed", report),
            }
        }
        Route::Gateway(tunnel) => {
            // Opened once the far end has answered: through a gateway, its answer is the only
            // description of who serves the connection.
            let opened = double_hbone::open(&ctx, &pod, &tunnel, headers).await;
            let (mut draft, outcome) = match opened {
                Ok((stream, far_end)) => (far_end.describe(draft), Ok(stream)),
                Err(failure) => (draft, Err(failure)),
            };
            draft.addrs.dst = Some(tunnel.peer);
            let mut report = draft.open(metrics);
            report.through_gateway(tunnel.gateway.identity().to_string());
            match outcome {
                Ok(stream) => {
                    return relay(client, Upstream::Tunnel(stream), None, report, None).await;
                }
                Err(failure) => (failure, "outbound connection failed", report),
            }
        }
        Route::Passthrough(dst) => {
            let mut report = draft.open(metrics);
            report.delivered_to(dst);
            match connect_from_pod(&pod.netns, dst, ctx.settings.connect_timeout).await {
                Ok(upstream) => {
                    ending::arm(&upstream);
                    return relay(client, Upstream::Socket(upstream), None, report, None).await;
                }
                Err(source) => (
                    Failure::Connect {
                        addr: dst,
                        pod: None,
                        source,
                    },
                    "outbound connection failed: upstream connect",
                    report,
                ),
            }
        }
        Route::Refused(reason) => (
            Failure::NoRoute(reason),
            "outbound connection refused",
            draft.open(metrics),
        ),
    };
    // Dropping the armed client resets it.
    report.close(failure.outcome(), 0, 0, message);
}

/// The source side's report, not yet opened: who the application is, and what the route says
/// about the destination.
pub(super) fn report_draft(
    ctx: &ProxyContext,
    state: &State,
    pod: &Pod,
    src: SocketAddr,
    original_dst: SocketAddr,
    route: &Route<Arc<Pod>>,
) -> Draft {
    let network = &ctx.node.network;
    let source = Peer::of_pod(pod, state.workload_by_ip(network, src.ip()).as_deref());
    let service = match state.lookup(network, original_dst.ip(), Some(&pod.spec.namespace)) {
        Some(Destination::Service(service)) => Some(service.hostname.clone()),
        _ => None,
    };
    let destination = match route {
        Route::Local { pod, dst } => {
            Peer::of_pod(pod, state.workload_by_ip(network, dst.ip()).as_deref())
        }
        Route::Hbone(Tunnel {
            waypoint: false,
            workload,
            ..
        }) => Peer::of_workload(workload),
        // The waypoint answers, but the connection is for what the application asked for.
        Route::Hbone(Tunnel { waypoint: true, .. }) => state
            .workload_by_ip(network, original_dst.ip())
            .map_or_else(Peer::unknown, |workload| Peer::of_workload(&workload)),
        Route::Passthrough(dst) => state
            .workload_by_ip(network, dst.ip())
            .map_or_else(Peer::unknown, |workload| Peer::of_workload(&workload)),
        // The remote endpoint is known by the workload standing for it and the identity it
        // must prove.
        Route::Gateway(tunnel) => Peer::of_remote(&tunnel.endpoint, tunnel.inner_expected.first()),
        Route::Refused(_) => Peer::unknown(),
    };
    let addrs = Addresses {
        src,
        original_dst,
        dst: None,
    };
    let mtls = matches!(route, Route::Hbone(_) | Route::Gateway(_));
    Draft {
        reporter: Reporter::Source,
        source,
        destination,
        destination_service: service,
        mutual_tls: mtls,
        addrs,
        route: route.name(),
    }
}

/// The tunnel `tunnel` describes, on a pooled connection to its peer.
async fn open_tunnel(
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
        pod.primary_ip(),
        pod.identity.clone(),
        expected.to_vec(),
        addr,
    );
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
    let stream = lease
        .connection()
        .connect(authority, headers)
        .await
        .map_err(|error| Failure::Tunnel(error.to_string()))?;
    Ok(stream.with_lease(lease))
}

/// The headers of every CONNECT from `pod`'s application at `app_addr`: `forwarded`, a fresh
/// `traceparent`, and `baggage` describing the source (from its workload when the control
/// plane knows it): through a gateway, that is all the destination learns of it.
fn connect_headers(
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

/// Where an outbound connection's bytes go.
enum Upstream {
    /// A socket: to the local destination pod, or a passthrough destination.
    Socket(TcpStream),
    /// An HBONE tunnel to the destination's node.
    Tunnel(H2Stream),
}

/// Relays until both directions end, then closes the report (and, for a same-node delivery,
/// the destination side's report too: one mesh-node is both ends). Unless both directions
/// ended cleanly, both applications are reset (a tunnel is reset with RST_STREAM).
async fn relay(
    mut client: TcpStream,
    upstream: Upstream,
    revoked: Option<Revoked>,
    report: Report,
    inbound: Option<Report>,
) {
    let ended = match upstream {
        Upstream::Socket(mut upstream) => {
            let ended = splice(&mut client, &mut upstream, revoked).await;
            ending::settle(&ended, &[&client, &upstream]);
            ended
        }
        Upstream::Tunnel(tunnel) => {
            let ended = tunnel.splice(&mut client, revoked).await;
            ending::settle(&ended, &[&client]);
            ended
        }
    };
    let (request, response) = (ended.a_to_b, ended.b_to_a);
    if let Some(inbound) = inbound {
        inbound.finish(&ended.how, request, response, "local delivery");
    }
    report.finish(&ended.how, request, response, "outbound connection");
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
