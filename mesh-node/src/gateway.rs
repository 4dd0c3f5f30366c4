//! `mesh-node run --mode gateway`: the east-west gateway of a network. It accepts HBONE from
//! other networks' nodes on `<address>:15008` (mutual TLS, client certificates of the mesh's
//! trust domain only), routes each CONNECT's `<service hostname>:<port>` to a healthy endpoint
//! of that service on its own network (load-balanced as any service is), connects to that
//! endpoint's `15008`, and relays the tunnel's bytes untouched: they are the inner HBONE
//! connection, TLS from the source node to the destination node, so the gateway never holds
//! the application's plaintext. No eBPF, no pods; state and certificate come as for a node.
use std::{net::SocketAddr, sync::Arc};

use http::StatusCode;
use tokio::net::TcpListener;

use crate::{
    ending,
    hbone::{
        Authority,
        server::{HandleFuture, Refusal, Responder, TunnelHandler, TunnelRequest},
    },
    identity::Identity,
    proxy::{OriginalDestinations, ProxyContext, connect, failure::Failure, inbound},
    state::lb::{self, Choice, Origin},
    telemetry::{Addresses, Peer, Report, Reporter},
};

/// A gateway captures nothing: no connection has an original destination.
pub struct NoCapture;

impl OriginalDestinations for NoCapture {
    fn take(&self, _netns_cookie: u64, _src_port: u16) -> Option<SocketAddr> {
        None
    }
}

/// Accepts HBONE connections on `listener` as `identity` until the task is aborted.
pub async fn serve(listener: TcpListener, identity: Identity, ctx: Arc<ProxyContext>) {
    let handler: Arc<dyn TunnelHandler> = Arc::new(Forwarder { ctx: ctx.clone() });
    inbound::serve_hbone_as(listener, identity, "east-west gateway", handler, ctx).await;
}

/// Routes each tunnel to an endpoint of its service on this network.
struct Forwarder {
    ctx: Arc<ProxyContext>,
}

/// Where one tunnel goes, decided under one read of the state.
struct Hop {
    endpoint: SocketAddr,
    report: Report,
}

impl TunnelHandler for Forwarder {
    fn handle(&self, request: TunnelRequest, responder: Responder) -> HandleFuture {
        let ctx = self.ctx.clone();
        Box::pin(async move {
            let Hop { endpoint, report } = match choose(&ctx, &request) {
                Ok(hop) => hop,
                Err(refusal) => return responder.refuse(refusal),
            };
            let mut upstream = match connect(endpoint, ctx.settings.connect_timeout).await {
                Ok(stream) => stream,
                Err(source) => {
                    let failure = Failure::Connect {
                        addr: endpoint,
                        pod: None,
                        source,
                    };
                    return fail(report, responder, failure);
                }
            };
            // The endpoint's node sees the inner TLS break off, not a clean end, unless the
            // tunnel really ended cleanly (see `ending`).
            ending::arm(&upstream);
            let tunnel = match responder.accept() {
                Ok(tunnel) => tunnel,
                Err(error) => {
                    return report.close(
                        crate::telemetry::Outcome::Reset(format!(
                            "tunnel gone before it was answered: {error}"
                        )),
                        0,
                        0,
                        "gateway tunnel reset",
                    );
                }
            };
            let ended = tunnel.splice(&mut upstream, None).await;
            ending::settle(&ended, &[&upstream]);
            // The source is the tunnel's side: what it sent is the request.
            report.finish(&ended.how, ended.b_to_a, ended.a_to_b, "gateway tunnel");
        })
    }
}

fn fail(report: Report, responder: Responder, failure: Failure) {
    report.close(failure.outcome(), 0, 0, "gateway tunnel failed");
    responder.refuse(failure.refusal());
}

/// The endpoint for `request` and its report; a refusal (400 for what the gateway cannot
/// route, 503 when the service has no endpoint here) otherwise.
fn choose(ctx: &ProxyContext, request: &TunnelRequest) -> Result<Hop, Refusal> {
    let bad = |reason: String| Refusal {
        status: StatusCode::BAD_REQUEST,
        reason,
    };
    let (hostname, port) = match &request.authority {
        Authority::Host { hostname, port } => (hostname.as_str(), *port),
        Authority::Addr(addr) => {
            return Err(bad(format!(
                "authority {addr} is an address; the gateway routes by service hostname"
            )));
        }
    };
    let state = ctx.state();
    let service = state
        .services_by_hostname(hostname)
        .next()
        .cloned()
        .ok_or_else(|| bad(format!("no service {hostname} is known here")))?;
    let node = &ctx.node;
    let origin = Origin::of_node(&node.node_name, &node.cluster_id, &node.network);
    let unavailable = |reason: String| Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        reason,
    };
    let chosen =
        match lb::pick_in_network(&state, &service, port, &origin, &mut || fastrand::u64(..)) {
            Ok(Choice::Endpoint(endpoint)) => endpoint,
            Ok(Choice::Passthrough) => {
                return Err(bad(format!(
                    "service {hostname} is PASSTHROUGH: nothing to route to"
                )));
            }
            Err(error) => return Err(unavailable(error.to_string())),
        };
    let Some(ip) = chosen.ip else {
        return Err(unavailable(format!(
            "endpoint {} of {hostname} has no address",
            chosen.workload.uid
        )));
    };
    if chosen.workload.protocol != crate::state::TunnelProtocol::Hbone {
        return Err(unavailable(format!(
            "endpoint {} of {hostname} does not accept HBONE",
            chosen.workload.uid
        )));
    }
    let endpoint = SocketAddr::new(ip, mesh_common::HBONE_PORT);
    let source = Peer::of_identity(&request.peer_identity).described_by(&request.baggage);
    let addrs = Addresses {
        src: request.forwarded_for.unwrap_or(request.peer),
        original_dst: SocketAddr::new(ip, chosen.port),
        dst: Some(endpoint),
    };
    let report = Report::open(
        &ctx.metrics,
        Reporter::Destination,
        &source,
        &Peer::of_workload(&chosen.workload),
        Some(&service.hostname),
        true,
        addrs,
        "gateway",
    );
    Ok(Hop { endpoint, report })
}
