//! Where a captured outbound connection goes, decided over one read of the mesh state and
//! nothing else (no I/O, the random source passed in), so every case is unit-tested:
//!
//! - a service VIP with a waypoint → HBONE to the waypoint, `:authority` the VIP and port;
//! - a service VIP → one of its endpoints (see [`lb::pick`]), then as for a workload; the
//!   endpoint's own waypoint is not consulted (as ztunnel: the service was addressed);
//! - an endpoint (or a service's waypoint) on another network → double HBONE through that
//!   network's east-west gateway, `:authority` the service's hostname and port on both layers;
//! - a workload with a waypoint, unless the connection comes from that waypoint → HBONE to
//!   the waypoint, `:authority` the workload's address and port;
//! - a pod enrolled on this node → straight into it;
//! - an HBONE workload → a tunnel to its `15008`;
//! - anything else → plain TCP, unchanged.
use std::{net::IpAddr, net::SocketAddr, sync::Arc};

use super::NodeInfo;
use crate::{
    identity::{Identity, San},
    state::{
        Destination, GatewayAddress, GatewayDestination, Service, State, TunnelProtocol, Workload,
        lb::{self, Choice, Origin},
    },
};

/// The way a connection takes. `P` is how the caller names a local pod.
#[derive(Debug)]
pub enum Route<P> {
    /// The destination is enrolled on this node: no TLS, no network.
    Local { pod: P, dst: SocketAddr },
    /// An HBONE tunnel to another node, or to a waypoint.
    Hbone(Tunnel),
    /// A tunnel inside a tunnel, through the east-west gateway of another network.
    Gateway(GatewayTunnel),
    /// Not in the mesh (or an endpoint without HBONE): plain TCP.
    Passthrough(SocketAddr),
    /// Neither delivered nor passed through, and why (no endpoint, a waypoint that cannot be
    /// reached: passing such a connection by the waypoint would skip its policy).
    Refused(String),
}

/// One HBONE tunnel to open.
#[derive(Debug, Clone)]
pub struct Tunnel {
    /// Who answers it: the destination workload, or the waypoint in front of it.
    pub workload: Arc<Workload>,
    /// The `:authority`: where the application's bytes are to go.
    pub authority: SocketAddr,
    /// The TLS peer: `<ip>:<HBONE port>` of that workload.
    pub peer: SocketAddr,
    /// The names its certificate may carry: its identity, and its services' SANs.
    pub expected: Vec<San>,
    /// The tunnel goes to the destination's waypoint.
    pub waypoint: bool,
}

/// Double HBONE: the outer tunnel ends at the gateway, which relays the inner one (its own
/// TLS, end to end with the remote node) to an endpoint it picks in its network.
#[derive(Debug, Clone)]
pub struct GatewayTunnel {
    /// The gateway's workload: who answers the outer TLS.
    pub gateway: Arc<Workload>,
    /// The outer TLS peer: `<gateway ip>:<hbone_mtls_port>`.
    pub peer: SocketAddr,
    /// The names the gateway's certificate may carry.
    pub outer_expected: Vec<San>,
    /// `<service hostname>:<service port>` (never a VIP): how the gateway routes it.
    pub authority: String,
    /// The names the remote end's certificate (the inner TLS) may carry.
    pub inner_expected: Vec<San>,
    /// The endpoint chosen: the synthetic workload standing for the remote network's
    /// endpoints of the service (or its waypoint there).
    pub endpoint: Arc<Workload>,
    /// The inner tunnel goes to the service's waypoint on that network.
    pub waypoint: bool,
}

impl<P> Route<P> {
    /// For the access log's `route=`.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Local { .. } => "local",
            Route::Gateway(_) => "gateway",
            Route::Hbone(Tunnel { waypoint: true, .. }) => "waypoint",
            Route::Hbone(_) => "hbone",
            Route::Passthrough(_) => "passthrough",
            Route::Refused(_) => "refused",
        }
    }
}

/// The application that made the connection.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub ip: IpAddr,
    pub namespace: &'a str,
    pub identity: &'a Identity,
}

/// Where a connection from `source` to `dst` goes. `local` finds a pod enrolled on this node by
/// address; `random` returns a uniform u64 on each call.
pub fn decide<P>(
    state: &State,
    node: &NodeInfo,
    source: &Source<'_>,
    dst: SocketAddr,
    local: impl Fn(IpAddr) -> Option<P>,
    random: &mut impl FnMut() -> u64,
) -> Route<P> {
    let network = node.network.as_str();
    let source_workload = state.workload_by_ip(network, source.ip);
    let origin = match &source_workload {
        Some(workload) => Origin::of(workload),
        None => Origin::of_node(&node.node_name, &node.cluster_id, network),
    };
    match state.lookup(network, dst.ip(), Some(source.namespace)) {
        Some(Destination::Service(service)) => {
            if let Some(waypoint) = service_waypoint(&service, random) {
                return via_waypoint(state, waypoint, Some(&service), dst, &origin, random);
            }
            match lb::pick(state, &service, dst.port(), &origin, random) {
                Ok(Choice::Endpoint(endpoint)) if endpoint.is_remote(&origin) => {
                    through_gateway(state, &endpoint.workload, &service, dst, false, random)
                }
                Ok(Choice::Endpoint(lb::Endpoint {
                    workload,
                    ip: Some(first),
                    port,
                })) => {
                    let ip = workload.address_for(dst.ip()).unwrap_or(first);
                    let addr = SocketAddr::new(ip, port);
                    match local(ip) {
                        Some(pod) => Route::Local { pod, dst: addr },
                        None => to_workload(workload, addr, &service.subject_alt_names),
                    }
                }
                // `pick` only returns an endpoint without an address on another network.
                Ok(Choice::Endpoint(endpoint)) => Route::Refused(format!(
                    "endpoint {} of service {} has no address",
                    endpoint.workload.uid,
                    service.key()
                )),
                Ok(Choice::Passthrough) => Route::Passthrough(dst),
                Err(error) => Route::Refused(error.to_string()),
            }
        }
        Some(Destination::Workload(workload)) => {
            if let Some(waypoint) = &workload.waypoint
                && !is_from(state, waypoint, source)
            {
                return via_waypoint(state, waypoint, None, dst, &origin, random);
            }
            match local(dst.ip()) {
                Some(pod) => Route::Local { pod, dst },
                None => to_workload(workload, dst, &[]),
            }
        }
        None => match local(dst.ip()) {
            Some(pod) => Route::Local { pod, dst },
            None => Route::Passthrough(dst),
        },
    }
}

/// An HBONE workload through its tunnel port, anything else as plain TCP.
fn to_workload<P>(workload: Arc<Workload>, dst: SocketAddr, sans: &[San]) -> Route<P> {
    if workload.protocol != TunnelProtocol::Hbone {
        return Route::Passthrough(dst);
    }
    let mut expected = sans.to_vec();
    expected.push(workload.identity().into());
    Route::Hbone(Tunnel {
        peer: SocketAddr::new(dst.ip(), mesh_common::HBONE_PORT),
        authority: dst,
        expected,
        workload,
        waypoint: false,
    })
}

/// The waypoint a service's traffic goes through: one of its weighted waypoints by weight, else
/// its `waypoint`.
fn service_waypoint<'s>(
    service: &'s Service,
    random: &mut impl FnMut() -> u64,
) -> Option<&'s GatewayAddress> {
    let weighted: Vec<_> = service
        .weighted_waypoints
        .iter()
        .filter(|w| w.weight > 0)
        .collect();
    match lb::weighted(weighted, |w| w.weight, random) {
        Some(chosen) => Some(&chosen.destination),
        None => service.waypoint.as_ref(),
    }
}

/// What a gateway address names: a service (the waypoint's own), or one workload.
enum Resolved {
    Service(Arc<Service>),
    Workload(Arc<Workload>),
}

fn resolve(state: &State, gateway: &GatewayAddress) -> Option<Resolved> {
    match &gateway.destination {
        GatewayDestination::Address { network, ip } => match state.lookup(network, *ip, None)? {
            Destination::Service(service) => Some(Resolved::Service(service)),
            Destination::Workload(workload) => Some(Resolved::Workload(workload)),
        },
        GatewayDestination::Hostname(key) => state.service(key).map(Resolved::Service),
    }
}

/// HBONE to the waypoint, carrying the original destination as `:authority`. A waypoint that
/// cannot be resolved refuses the connection: sending it past the waypoint would skip the
/// policy the waypoint enforces.
fn via_waypoint<P>(
    state: &State,
    gateway: &GatewayAddress,
    service: Option<&Service>,
    dst: SocketAddr,
    origin: &Origin<'_>,
    random: &mut impl FnMut() -> u64,
) -> Route<P> {
    let (workload, ip, sans) = match resolve(state, gateway) {
        Some(Resolved::Service(service)) => {
            match lb::pick_hbone_endpoint(state, &service, origin, random) {
                Some((workload, first)) => {
                    let ip = workload.address_for(dst.ip()).unwrap_or(first);
                    (workload, ip, service.subject_alt_names.clone())
                }
                None => {
                    return Route::Refused(format!(
                        "waypoint {} has no healthy endpoint on network {:?}",
                        service.key(),
                        origin.network
                    ));
                }
            }
        }
        Some(Resolved::Workload(workload)) => {
            let Some(ip) = workload.address_for(dst.ip()) else {
                return Route::Refused(format!("waypoint {} has no address", workload.uid));
            };
            (workload, ip, Vec::new())
        }
        None => {
            return Route::Refused(format!(
                "waypoint {} is not known to the control plane",
                describe(gateway)
            ));
        }
    };
    if *workload.network != *origin.network {
        // A service's waypoint on another network is reached as the service would be: through
        // that network's gateway, by the service's hostname (as ztunnel). A workload's cannot
        // be: only service-addressed traffic crosses networks.
        return match service {
            Some(service) => through_gateway(state, &workload, service, dst, true, random),
            None => Route::Refused(format!(
                "waypoint {} is on network {:?}: only traffic addressed to a service crosses networks",
                workload.uid, workload.network
            )),
        };
    }
    let mut expected = sans;
    expected.push(workload.identity().into());
    Route::Hbone(Tunnel {
        peer: SocketAddr::new(ip, gateway.hbone_mtls_port),
        authority: dst,
        expected,
        workload,
        waypoint: true,
    })
}

/// Double HBONE to `endpoint` (a workload on another network) through its network's gateway.
/// The gateway routes by the service's hostname, so both layers carry it, with the port the
/// application asked for. A missing or unknown gateway refuses the connection.
fn through_gateway<P>(
    state: &State,
    endpoint: &Arc<Workload>,
    service: &Service,
    dst: SocketAddr,
    waypoint: bool,
    random: &mut impl FnMut() -> u64,
) -> Route<P> {
    let network = &endpoint.network;
    let Some(gateway) = &endpoint.network_gateway else {
        return Route::Refused(format!(
            "no gateway for network {network:?} (endpoint {} of service {})",
            endpoint.uid,
            service.key()
        ));
    };
    let (workload, ip, mut outer_expected) = match resolve(state, gateway) {
        Some(Resolved::Workload(workload)) => match workload.addresses.first().copied() {
            Some(ip) => (workload, ip, Vec::new()),
            None => {
                return Route::Refused(format!(
                    "gateway {} of network {network:?} has no address",
                    workload.uid
                ));
            }
        },
        // A gateway service's endpoints are on the gateway's network, not ours: pick among
        // them without the network filter a waypoint's endpoints get.
        Some(Resolved::Service(gateway_service)) => {
            match lb::pick_gateway_endpoint(state, &gateway_service, random) {
                Some((workload, ip)) => (workload, ip, gateway_service.subject_alt_names.clone()),
                None => {
                    return Route::Refused(format!(
                        "gateway {} of network {network:?} has no healthy endpoint",
                        gateway_service.key()
                    ));
                }
            }
        }
        None => {
            return Route::Refused(format!(
                "no gateway for network {network:?}: {} is not known to the control plane",
                describe(gateway)
            ));
        }
    };
    outer_expected.push(workload.identity().into());
    // The far end proves the service's identity: its SANs, else (istiod sends none for most
    // Kubernetes services) the identity of the workload standing for the remote endpoints
    // (its service account, "default" when unnamed). ztunnel accepts only the SANs.
    let inner_expected = if service.subject_alt_names.is_empty() {
        vec![endpoint.identity().into()]
    } else {
        service.subject_alt_names.clone()
    };
    Route::Gateway(GatewayTunnel {
        gateway: workload,
        peer: SocketAddr::new(ip, gateway.hbone_mtls_port),
        outer_expected,
        authority: format!("{}:{}", service.hostname, dst.port()),
        inner_expected,
        endpoint: endpoint.clone(),
        waypoint,
    })
}

/// Whether `source` is (one of the workloads of) the waypoint `gateway`: then its traffic has
/// been through the waypoint already and goes on to the workload.
fn is_from(state: &State, gateway: &GatewayAddress, source: &Source<'_>) -> bool {
    let is_source =
        |w: &Workload| w.addresses.contains(&source.ip) && w.identity() == *source.identity;
    match resolve(state, gateway) {
        Some(Resolved::Workload(workload)) => is_source(&workload),
        Some(Resolved::Service(service)) => state.endpoints(service.key()).any(|w| is_source(w)),
        None => false,
    }
}

fn describe(gateway: &GatewayAddress) -> String {
    match &gateway.destination {
        GatewayDestination::Address { network, ip } if network.is_empty() => ip.to_string(),
        GatewayDestination::Address { network, ip } => format!("{network}/{ip}"),
        GatewayDestination::Hostname(key) => key.clone(),
    }
}

#[cfg(test)]
mod network_tests;
#[cfg(test)]
mod tests;
