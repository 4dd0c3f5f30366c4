//! Captured outbound connections: recover where the application was going, then pick the way
//! there — straight into a pod on this node, through an HBONE tunnel to a mesh workload, or
//! plain TCP to anything outside the mesh.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::{
    Announced, ProxyContext,
    authorize::Inbound,
    connect_from_pod, double_hbone,
    failure::Failure,
    inbound::{self, Delivered},
    kernel_path::{self, Pairing},
    route::{self, Route, Source, Tunnel},
    tunnel::{connect_headers, open_tunnel},
};
use crate::{
    ending,
    hbone::H2Stream,
    pod::Pod,
    splice::{Revoked, splice},
    state::{Destination, State},
    telemetry::{Addresses, Draft, Peer, Report, Reporter},
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
        ip: pod.ip_for(dst.ip()),
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
    // Setting the connection up (routing, connecting, the tunnel's handshakes) is a future of
    // its own, boxed and freed before the relay: the task then holds, for the connection's
    // life, only what relaying needs. Inline, the task was 9.2 KB per connection, the largest
    // state (a handshake's) kept for as long as the connection lasted.
    if let Some(carried) = Box::pin(carry(client, peer, pod, ctx)).await {
        relay(carried).await;
    }
}

/// What a connection is carried with once set up: relayed until it ends, then reported.
struct Carried {
    client: TcpStream,
    upstream: Upstream,
    revoked: Option<Revoked>,
    report: Report,
    /// The destination side's report of a same-node delivery.
    inbound: Option<Report>,
    /// The original-source announcement of a same-node delivery, held for its life.
    _announced: Option<Announced>,
    /// A same-node connection the kernel carries once paired (`--kernel-same-node`). Boxed:
    /// every connection's task holds the field, few use it.
    pairing: Option<Box<Pairing>>,
}

impl Carried {
    fn new(client: TcpStream, upstream: Upstream, report: Report) -> Self {
        Self {
            client,
            upstream,
            revoked: None,
            report,
            inbound: None,
            _announced: None,
            pairing: None,
        }
    }
}

/// Routes and connects a captured connection; `None` once it has been refused or failed (and
/// reported).
async fn carry(
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    ctx: Arc<ProxyContext>,
) -> Option<Carried> {
    // From here on, any end but a clean one resets the application (see `ending`): it was
    // already told its connect succeeded, and must not mistake a failure for an empty answer.
    ending::arm(&client);
    let Some(original) = ctx.original_dsts.take(pod.netns_cookie, peer.port()) else {
        tracing::warn!(pod = %pod.spec, src_port = peer.port(), "no original destination recorded for this connection; resetting it");
        return None;
    };
    // The access line at close is the connection's one line at info (as ztunnel logs).
    tracing::debug!(original_dst = %original, "outbound connection captured");
    let _ = client.set_nodelay(true);
    // The application's own address, as the destination will know it.
    let app_addr = SocketAddr::new(pod.ip_for(original.ip()), peer.port());
    // The route and what the report says of it come from one read of the state: a push
    // cannot land between them.
    let (route, draft, source) = {
        let state = ctx.state();
        let route = route(&ctx, &state, &pod, original);
        let draft = report_draft(&ctx, &state, &pod, app_addr, original, &route);
        // Kept for the CONNECT headers, which only tunnels need (built outside the lock).
        let source = matches!(route, Route::Hbone(_) | Route::Gateway(_))
            .then(|| state.workload_by_ip(&ctx.node.network, app_addr.ip()))
            .flatten();
        (route, draft, source)
    };
    if !matches!(route, Route::Local { .. }) {
        kernel_path::leave(&*ctx.original_dsts, &client, pod.netns_cookie);
    }
    let headers = || connect_headers(&ctx, &pod, source.as_deref(), app_addr);
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
            let toward_client =
                kernel_path::toward_client(&*ctx.original_dsts, &client, pod.netns_cookie);
            let local = inbound::Client::LocalPod {
                pod: &pod,
                toward_client,
            };
            match inbound::deliver(&ctx, conn, app_addr, local).await {
                Ok(Delivered {
                    stream,
                    revocation,
                    report: inbound_report,
                    announced,
                }) => {
                    let pairing = toward_client.map(|toward_client| {
                        Box::new(Pairing::begin(
                            ctx.original_dsts.clone(),
                            toward_client,
                            &stream,
                            dst_pod.netns_cookie,
                            announced.as_ref().and_then(Announced::paired),
                        ))
                    });
                    return Some(Carried {
                        revoked: Some(Box::pin(revocation.wait()) as Revoked),
                        inbound: Some(inbound_report),
                        _announced: announced,
                        pairing,
                        ..Carried::new(client, Upstream::Socket(stream), report)
                    });
                }
                Err(failure) => (failure, "outbound connection failed", report),
            }
        }
        Route::Hbone(tunnel) => {
            let mut report = draft.open(metrics);
            report.delivered_to(tunnel.authority);
            match open_tunnel(&ctx, &pod, &tunnel, &headers()).await {
                Ok(tunnel) => {
                    return Some(Carried::new(client, Upstream::Tunnel(tunnel), report));
                }
                Err(failure) => (failure, "outbound connection failed", report),
            }
        }
        Route::Gateway(tunnel) => {
            // Opened once the far end has answered: through a gateway, its answer is the only
            // description of who serves the connection.
            let opened = double_hbone::open(&ctx, &pod, &tunnel, headers()).await;
            let (mut draft, outcome) = match opened {
                Ok((stream, far_end)) => (far_end.describe(draft), Ok(stream)),
                Err(failure) => (draft, Err(failure)),
            };
            draft.addrs.dst = Some(tunnel.peer);
            let mut report = draft.open(metrics);
            report.through_gateway(tunnel.gateway.identity().to_string());
            match outcome {
                Ok(stream) => {
                    return Some(Carried::new(client, Upstream::Tunnel(stream), report));
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
                    return Some(Carried::new(client, Upstream::Socket(upstream), report));
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
    None
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
        Some(Destination::Service(service)) => Some(service.hostname.to_string()),
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
        started: Instant::now(),
    }
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
// The fields are taken in the parameter's pattern, not moved out of it in the body: the task
// would hold both copies.
async fn relay(
    Carried {
        mut client,
        upstream,
        revoked,
        report,
        inbound,
        _announced,
        pairing,
    }: Carried,
) {
    let ended = match (upstream, pairing) {
        (Upstream::Socket(mut upstream), Some(mut pairing)) => {
            let mut handed = pairing.hand_over(&mut upstream);
            let mut ended = splice(&mut client, &mut handed, revoked).await;
            // What the kernel carried, read before the sockets' ends are settled; the
            // pairings go with it.
            let (request, response) = pairing.finish();
            ended.a_to_b += request;
            ended.b_to_a += response;
            ending::settle(&ended, &[&client, &upstream]);
            ended
        }
        (Upstream::Socket(mut upstream), None) => {
            let ended = splice(&mut client, &mut upstream, revoked).await;
            ending::settle(&ended, &[&client, &upstream]);
            ended
        }
        (Upstream::Tunnel(tunnel), _) => {
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
