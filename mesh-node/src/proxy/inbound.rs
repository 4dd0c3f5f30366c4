//! Traffic arriving for a pod on this node: HBONE tunnels on `<pod IP>:15008`, and the one way
//! every path (HBONE, same-node, captured plaintext) reaches the application: [`deliver`].
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_common::{HBONE_PORT, SockKey};
use tokio::net::{TcpListener, TcpStream};

use super::{
    Announced, ProxyContext,
    authorize::{Inbound, Revocation},
    connect_as_client, connect_from_pod,
    failure::Failure,
};
use crate::{
    ending,
    hbone::{
        Authority, Baggage,
        server::{self, HandleFuture, Refused, Responder, TunnelHandler, TunnelRequest},
    },
    identity::Identity,
    pod::Pod,
    splice::Revoked,
    state::State,
    telemetry::{Addresses, Outcome, Peer, Report, Reporter},
};

/// Accepts HBONE connections on one of the pod's 15008 listeners until the task is aborted.
pub async fn serve_hbone(listener: TcpListener, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    let target: Arc<dyn TunnelHandler> = Arc::new(PodTarget {
        pod: pod.clone(),
        ctx: ctx.clone(),
    });
    serve_hbone_as(
        listener,
        pod.identity.clone(),
        &pod.spec.to_string(),
        target,
        ctx,
    )
    .await;
}

/// Accepts HBONE connections on `listener` until the task is aborted, each presenting the
/// certificate of `identity` and handing its tunnels to `target`. `whose` names the listener
/// in the log (the pod, or the east-west gateway).
pub async fn serve_hbone_as(
    listener: TcpListener,
    identity: Identity,
    whose: &str,
    target: Arc<dyn TunnelHandler>,
    ctx: Arc<ProxyContext>,
) {
    let whose: Arc<str> = whose.into();
    let identity = Arc::new(identity);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(pod = %whose, %error, "accept on HBONE listener failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (whose, identity, ctx, target) =
            (whose.clone(), identity.clone(), ctx.clone(), target.clone());
        tokio::spawn(async move {
            let Some(certs) = &ctx.certs else { return };
            match certs.get(&identity).await {
                Ok(certified) => {
                    let served = server::serve_connection(
                        tcp,
                        peer,
                        certified.server_config.clone(),
                        ctx.settings.handshake_timeout,
                        target,
                        ctx.drain.subscribe(),
                    )
                    .await;
                    if let Err(refused) = served {
                        refused_handshake(&ctx, &whose, peer, &refused);
                    }
                }
                Err(error) => {
                    ctx.metrics.hbone_refused("no_certificate");
                    let key = (peer.ip(), "no certificate".to_owned());
                    if let Some(suppressed) = ctx.refusals.admit(key, Instant::now()) {
                        tracing::warn!(pod = %whose, %peer, %error, suppressed, "HBONE connection refused: no certificate for {identity}");
                    }
                }
            }
        });
    }
}

/// Counts a refused handshake, and logs it unless the same source was refused for the same
/// reason within the last [`super::REFUSAL_LOG_WINDOW`] (the line then says how many were
/// left out): whoever can reach 15008 can cause these, and must not flood the log.
fn refused_handshake(ctx: &ProxyContext, whose: &str, peer: SocketAddr, refused: &Refused) {
    ctx.metrics.hbone_refused(refused.kind.name());
    let key = (peer.ip(), refused.reason.clone());
    if let Some(suppressed) = ctx.refusals.admit(key, Instant::now()) {
        tracing::info!(
            pod = %whose,
            %peer,
            reason = %refused.reason,
            suppressed,
            "HBONE connection refused"
        );
    }
}

/// Tunnels accepted on a pod's 15008 may only lead into that pod.
struct PodTarget {
    pod: Arc<Pod>,
    ctx: Arc<ProxyContext>,
}

impl TunnelHandler for PodTarget {
    fn handle(&self, request: TunnelRequest, responder: Responder) -> HandleFuture {
        let (pod, ctx) = (self.pod.clone(), self.ctx.clone());
        Box::pin(async move {
            let Delivered {
                stream: mut upstream,
                revocation,
                report,
                announced: _announced,
            } = match open_tunnel_target(&ctx, pod.clone(), &request).await {
                Ok(delivered) => delivered,
                Err(failure) => return responder.refuse(failure.refusal()),
            };
            // Said back in `baggage` to double HBONE's inner CONNECT (it names the source's
            // network): through a gateway, the client learns who served it only this way. A
            // direct client knows already, so the common path skips the lookup.
            let baggage = request.forwarded_network.is_some().then(|| {
                let state = ctx.state();
                state
                    .workload_by_ip(&ctx.node.network, pod.primary_ip())
                    .map(|w| super::workload_baggage(&w))
            });
            let baggage = baggage.flatten();
            let tunnel = match responder.accept_described(baggage.as_ref()) {
                Ok(tunnel) => tunnel,
                Err(error) => {
                    // The application was connected: it is reset (armed), and said so.
                    report.close(
                        Outcome::Reset(format!("tunnel gone before it was answered: {error}")),
                        0,
                        0,
                        "HBONE tunnel reset",
                    );
                    return;
                }
            };
            let client = request
                .forwarded_for
                .map_or_else(|| "-".to_owned(), |addr| addr.to_string());
            tracing::debug!(dst = %request.authority, %client, "HBONE tunnel opened");
            let _ = upstream.set_nodelay(true);
            let revoked: Revoked = Box::pin(revocation.wait());
            let ended = tunnel.splice(&mut upstream, Some(revoked)).await;
            // The application is `a`: what it sent is the response. Unless both directions
            // ended cleanly, the stream was reset (RST_STREAM) and so is the application.
            ending::settle(&ended, &[&upstream]);
            report.finish(&ended.how, ended.b_to_a, ended.a_to_b, "HBONE tunnel");
        })
    }
}

/// Checks where a tunnel wants to go (an address of this pod, not 15008) and delivers it.
async fn open_tunnel_target(
    ctx: &ProxyContext,
    pod: Arc<Pod>,
    request: &TunnelRequest,
) -> Result<Delivered, Failure> {
    let dst = match &request.authority {
        Authority::Addr(dst) => {
            if !pod.owns(dst.ip()) {
                return Err(Failure::BadDestination(format!(
                    "authority {dst} is not an address of local pod {}",
                    pod.spec
                )));
            }
            *dst
        }
        // Double HBONE: the gateway sent it to this pod's 15008 for a service the pod serves.
        Authority::Host { hostname, port } => SocketAddr::new(
            pod.primary_ip(),
            service_target_port(ctx, &pod, hostname, *port)?,
        ),
    };
    if dst.port() == HBONE_PORT {
        return Err(Failure::BadDestination(format!(
            "authority {} is the HBONE port itself",
            request.authority
        )));
    }
    // Through an east-west gateway the TCP peer is the gateway and the source's address is
    // another network's: the workload is described by what it proved (its identity) and what
    // it said (`baggage`), never looked up by address.
    let via_gateway = request
        .forwarded_network
        .as_deref()
        .is_some_and(|network| network != ctx.node.network);
    let source_addr = tunnel_source(request.peer, request.forwarded_for, via_gateway);
    let conn = Inbound {
        pod,
        source: Some(request.peer_identity.clone()),
        source_ip: source_addr.ip(),
        destination: dst,
    };
    let service = match &request.authority {
        Authority::Host { hostname, .. } => Some(hostname.as_str()),
        Authority::Addr(_) => None,
    };
    let client = Client::Tunnel {
        baggage: &request.baggage,
        via_gateway,
        service,
    };
    deliver(ctx, conn, source_addr, client).await
}

/// The client of a tunnel, as policy, the access log and the application see it. A direct
/// tunnel's source is the address the kernel saw on its TCP connection (mesh-node and ztunnel
/// open tunnels from inside the source pod's namespace, so it is the pod's IP): `forwarded` is
/// written by whoever holds a mesh certificate and decides nothing, except that it supplies the
/// client's port when it names that same address. Through a gateway the TCP peer is the
/// gateway, and `forwarded` is the only claim there is (logged as such).
fn tunnel_source(peer: SocketAddr, forwarded: Option<SocketAddr>, via_gateway: bool) -> SocketAddr {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    match forwarded {
        Some(claim) if via_gateway => {
            tracing::debug!(%peer, client = %claim, "tunnel through a gateway: client address as the source claims it");
            claim
        }
        Some(claim) if claim.ip().to_canonical() == peer.ip() => claim,
        _ => peer,
    }
}

/// The port of `pod` that serves `port` of the service called `hostname`: its endpoint's own
/// mapping, else the service's target port.
pub(super) fn service_target_port(
    ctx: &ProxyContext,
    pod: &Pod,
    hostname: &str,
    port: u16,
) -> Result<u16, Failure> {
    let state = ctx.state();
    let workload = state.workload_by_ip(&ctx.node.network, pod.primary_ip());
    let not_served = || {
        Failure::BadDestination(format!(
            "local pod {} is not an endpoint of {hostname}:{port}",
            pod.spec
        ))
    };
    let workload = workload.ok_or_else(not_served)?;
    let service = state
        .services_by_hostname(hostname)
        .find(|service| workload.service_ports(service.key()).is_some())
        .ok_or_else(not_served)?;
    let mapped = workload
        .service_ports(service.key())
        .and_then(|ports| ports.iter().find(|p| p.service_port == port))
        .map(|p| p.target_port)
        .filter(|p| *p != 0);
    let declared = service
        .ports
        .iter()
        .find(|p| p.service_port == port)
        .map(|p| {
            if p.target_port == 0 {
                port
            } else {
                p.target_port
            }
        });
    match (mapped, declared) {
        (Some(target), _) | (None, Some(target)) => Ok(target),
        // A service that declares no ports serves them all as they are.
        (None, None) if service.ports.is_empty() => Ok(port),
        (None, None) => Err(Failure::BadDestination(format!(
            "service {} has no port {port}",
            service.key()
        ))),
    }
}

/// Who is on the other end of a connection being delivered, as far as the path knows.
#[derive(Clone, Copy, Debug)]
pub enum Client<'a> {
    /// A pod enrolled on this node (same-node delivery), and mesh-node's socket towards it
    /// when that joined the kernel path.
    LocalPod {
        pod: &'a Pod,
        toward_client: Option<SockKey>,
    },
    /// An HBONE tunnel: what the source said of itself, and whether it came through an
    /// east-west gateway (then its address means nothing here).
    Tunnel {
        baggage: &'a Baggage,
        via_gateway: bool,
        /// The service it was addressed to, when the CONNECT named it (double HBONE).
        service: Option<&'a str>,
    },
    /// Captured plaintext: only its address.
    Plain,
}

/// An application connection inside a local pod, authorized, and how to learn that policy
/// took the authorization back.
pub struct Delivered {
    pub stream: TcpStream,
    pub revocation: Revocation,
    /// The destination side's report, to close when the connection ends.
    pub report: Report,
    /// Held for the connection's life when it comes from the client's address.
    pub announced: Option<Announced>,
}

/// Authorizes `conn` and connects to the application at its destination. Every path into a
/// pod (HBONE, same-node, captured plaintext) comes through here, so all of them obey policy
/// and are reported (`reporter="destination"`). `src` is the client's address.
pub async fn deliver(
    ctx: &ProxyContext,
    conn: Inbound,
    src: SocketAddr,
    client: Client<'_>,
) -> Result<Delivered, Failure> {
    let (pod, dst) = (conn.pod.clone(), conn.destination);
    let (revocation, report) = {
        let state = ctx.state();
        let report = open_report(ctx, &state, &conn, src, client);
        let decision = conn.decide(&state, &ctx.node);
        conn.log_dry_run(&decision);
        if !decision.verdict.is_allowed() {
            tracing::info!(
                connection = %conn,
                reason = %decision.verdict,
                "connection denied by policy"
            );
            let failure = Failure::Denied(decision.verdict);
            report.close(
                failure.outcome(),
                0,
                0,
                "inbound connection denied by policy",
            );
            return Err(failure);
        }
        // Registered while the state is read-locked: a policy change either came before
        // the decision or will recheck this connection.
        (ctx.live.register(conn), report)
    };
    // The socket is made in the destination pod, from the client's address where the pod
    // allows it, else from the pod's own (sk_lookup lets `remote == local` through to the
    // application's listener).
    let pair_with = match client {
        Client::LocalPod {
            toward_client: Some(toward_client),
            ..
        } => Some((pod.netns_cookie, toward_client)),
        _ => None,
    };
    let connected = match app_source(&pod, src, dst, client) {
        Some(from) => {
            connect_as_client(
                &pod.netns,
                from,
                dst,
                ctx.settings.connect_timeout,
                &ctx.original_dsts,
                pair_with,
            )
            .await
        }
        None => connect_from_pod(&pod.netns, dst, ctx.settings.connect_timeout)
            .await
            .map(|stream| (stream, None)),
    };
    match connected {
        Ok((stream, announced)) => {
            // The application is reset unless the connection ends cleanly (see `ending`).
            crate::ending::arm(&stream);
            Ok(Delivered {
                stream,
                revocation,
                report,
                announced,
            })
        }
        Err(source) => {
            let failure = Failure::Connect {
                addr: dst,
                pod: Some(pod.spec.to_string()),
                source,
            };
            report.close(failure.outcome(), 0, 0, "inbound connection failed");
            Err(failure)
        }
    }
}

/// The address the application sees its connection come from: the client's (`src`) when the
/// pod keeps clients' addresses for its family. A same-node or tunnelled client keeps its
/// port where it is free; a captured plaintext client's own connection holds that very
/// address pair in this namespace, so its delivery gets another port. A client at the pod's
/// own address (a pod calling itself through a service) is delivered from there, as today.
fn app_source(
    pod: &Pod,
    src: SocketAddr,
    dst: SocketAddr,
    client: Client<'_>,
) -> Option<SocketAddr> {
    let src = SocketAddr::new(src.ip().to_canonical(), src.port());
    if !pod.original_source.covers(src.ip())
        || src.is_ipv4() != dst.ip().to_canonical().is_ipv4()
        || pod.owns(src.ip())
        || src.ip().is_unspecified()
    {
        return None;
    }
    Some(match client {
        Client::Plain => SocketAddr::new(src.ip(), 0),
        Client::LocalPod { .. } | Client::Tunnel { .. } => src,
    })
}

/// The destination side's report of `conn`: the local pod, and what is known of the client —
/// its pod when it is enrolled here, else the workload at its address (when the identity it
/// proved agrees), else the identity with what its `baggage` says.
fn open_report(
    ctx: &ProxyContext,
    state: &State,
    conn: &Inbound,
    src: SocketAddr,
    client: Client<'_>,
) -> Report {
    let network = &ctx.node.network;
    let source_workload = match client {
        Client::Tunnel {
            via_gateway: true, ..
        } => None,
        _ => state.workload_by_ip(network, conn.source_ip),
    };
    let source = match (client, &conn.source, source_workload) {
        (Client::LocalPod { pod, .. }, _, workload) => Peer::of_pod(pod, workload.as_deref()),
        (_, Some(identity), Some(workload)) if workload.identity() == *identity => {
            Peer::of_workload(&workload)
        }
        (Client::Tunnel { baggage, .. }, Some(identity), _) => {
            Peer::of_identity(identity).described_by(baggage)
        }
        (_, Some(identity), _) => Peer::of_identity(identity),
        (_, None, Some(workload)) => Peer {
            // A plaintext client proved nothing: name its workload, claim no identity.
            principal: Default::default(),
            ..Peer::of_workload(&workload)
        },
        (_, None, None) => Peer::unknown(),
    };
    let destination = Peer::of_pod(
        &conn.pod,
        state
            .workload_by_ip(network, conn.destination.ip())
            .as_deref(),
    );
    let addrs = Addresses {
        src,
        original_dst: conn.destination,
        dst: Some(conn.destination),
    };
    let service = match client {
        Client::Tunnel { service, .. } => service,
        Client::LocalPod { .. } | Client::Plain => None,
    };
    Report::open(
        &ctx.metrics,
        Reporter::Destination,
        &source,
        &destination,
        service,
        conn.source.is_some(),
        addrs,
        "inbound",
    )
}

#[cfg(test)]
mod tests {
    use super::{Client, app_source, tunnel_source};
    use crate::{
        hbone::Baggage,
        identity::Identity,
        netns::NetNs,
        pod::{OriginalSource, Pod, PodSpec},
    };
    use std::net::SocketAddr;

    fn pod(original_source: OriginalSource) -> Pod {
        let spec = PodSpec {
            name: "server".into(),
            namespace: "default".into(),
            service_account: "server".into(),
            netns: "/proc/self/ns/net".into(),
            ips: vec!["10.0.2.9".parse().unwrap(), "fd00::9".parse().unwrap()],
            dns_capture: false,
        };
        Pod {
            identity: Identity::new("cluster.local", "default", "server"),
            netns: NetNs::open(&spec.netns).unwrap(),
            spec,
            netns_cookie: 1,
            id: 1,
            original_source,
        }
    }

    #[test]
    fn the_application_sees_the_client_where_the_pod_allows_it() {
        let v4_only = pod(OriginalSource {
            ipv4: true,
            ipv6: false,
        });
        let app = addr("10.0.2.9:8080");
        let client = addr("10.0.1.5:40000");
        let baggage = Baggage::default();
        let tunnel = Client::Tunnel {
            baggage: &baggage,
            via_gateway: false,
            service: None,
        };
        // Same node and tunnels keep the port; plaintext cannot (its own connection holds it).
        assert_eq!(
            app_source(
                &v4_only,
                client,
                app,
                Client::LocalPod {
                    pod: &v4_only,
                    toward_client: None
                }
            ),
            Some(client)
        );
        assert_eq!(app_source(&v4_only, client, app, tunnel), Some(client));
        assert_eq!(
            app_source(&v4_only, client, app, Client::Plain),
            Some(addr("10.0.1.5:0"))
        );
        // Mapped clients count as IPv4.
        assert_eq!(
            app_source(
                &v4_only,
                addr("[::ffff:10.0.1.5]:40000"),
                app,
                Client::Plain
            ),
            Some(addr("10.0.1.5:0"))
        );
        // The pod calling itself, a family the pod cannot route, a family mismatch, the mode off.
        assert_eq!(
            app_source(&v4_only, addr("10.0.2.9:40000"), app, Client::Plain),
            None
        );
        let v6_app = addr("[fd00::9]:8080");
        assert_eq!(
            app_source(&v4_only, addr("[fd00::5]:40000"), v6_app, Client::Plain),
            None
        );
        assert_eq!(app_source(&v4_only, client, v6_app, Client::Plain), None);
        let off = pod(OriginalSource::default());
        assert_eq!(app_source(&off, client, app, Client::Plain), None);
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_direct_tunnel_is_from_the_address_the_kernel_saw() {
        let peer = addr("10.0.1.5:40000");
        // A forged claim changes nothing.
        assert_eq!(
            tunnel_source(peer, Some(addr("10.9.9.9:1234")), false),
            peer
        );
        assert_eq!(tunnel_source(peer, None, false), peer);
        // The same address: the claim adds the application's port.
        assert_eq!(
            tunnel_source(peer, Some(addr("10.0.1.5:5555")), false),
            addr("10.0.1.5:5555")
        );
        // An IPv6 listener reports IPv4 peers mapped.
        assert_eq!(
            tunnel_source(
                addr("[::ffff:10.0.1.5]:40000"),
                Some(addr("10.0.1.5:5555")),
                false
            ),
            addr("10.0.1.5:5555")
        );
        assert_eq!(
            tunnel_source(addr("[::ffff:10.0.1.5]:40000"), None, false),
            addr("10.0.1.5:40000")
        );
    }

    #[test]
    fn through_a_gateway_the_claim_is_all_there_is() {
        let gateway = addr("192.168.10.1:40000");
        assert_eq!(
            tunnel_source(gateway, Some(addr("10.2.0.7:5555")), true),
            addr("10.2.0.7:5555")
        );
        assert_eq!(tunnel_source(gateway, None, true), gateway);
    }
}
