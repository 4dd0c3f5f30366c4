//! Picking one endpoint of a service: port mapping, health, routing preference (STRICT or
//! FAILOVER over NODE / CLUSTER / NETWORK / REGION / ZONE / SUBZONE; the default, UNSPECIFIED
//! mode, does not consult it, as in Istio), then a random choice weighted by `capacity`. Pure:
//! the caller passes the random source.
use std::{
    net::IpAddr,
    sync::{Arc, LazyLock},
};

use super::{HealthPolicy, LbMode, LoadBalancing, Locality, Scope, Service, State, Workload};

/// What a service without `load_balancing` gets: no preference, healthy only.
static DEFAULT_LB: LoadBalancing = LoadBalancing {
    routing_preference: Vec::new(),
    mode: LbMode::Standard,
    health_policy: HealthPolicy::OnlyHealthy,
};

/// Where the connection comes from, for routing preferences.
#[derive(Clone, Debug)]
pub struct Origin<'a> {
    pub node: &'a str,
    pub cluster_id: &'a str,
    pub network: &'a str,
    pub locality: &'a Locality,
}

/// The locality of an origin that has none (a node, a pod the control plane has not
/// described): it matches no REGION, ZONE or SUBZONE preference but an empty one.
static NO_LOCALITY: LazyLock<Locality> = LazyLock::new(Locality::default);

impl<'a> Origin<'a> {
    /// A node itself (or a pod on it the control plane has not described yet).
    pub fn of_node(node: &'a str, cluster_id: &'a str, network: &'a str) -> Self {
        Self {
            node,
            cluster_id,
            network,
            locality: &*NO_LOCALITY,
        }
    }

    pub fn of(workload: &'a Workload) -> Self {
        Self {
            node: &workload.node,
            cluster_id: &workload.cluster_id,
            network: &workload.network,
            locality: &workload.locality,
        }
    }
}

/// The endpoint chosen for a connection.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    /// Its address; `None` for an endpoint on another network known only by its network
    /// gateway (the synthetic workload istiod sends for a global service's remote endpoints).
    pub ip: Option<IpAddr>,
    pub port: u16,
}

impl Endpoint {
    /// Reached through the east-west gateway of its network rather than directly.
    pub fn is_remote(&self, origin: &Origin<'_>) -> bool {
        *self.workload.network != *origin.network
    }
}

/// Why no endpoint was chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LbError {
    #[error("service {service} has no port {port}")]
    NoSuchPort { service: String, port: u16 },
    #[error("service {service} has no healthy endpoint reachable from network {network:?}")]
    NoEndpoint { service: String, network: String },
    #[error(
        "service {service}: no endpoint satisfies the STRICT routing preference {preference:?}"
    )]
    StrictPreference {
        service: String,
        preference: Vec<Scope>,
    },
}

/// What to do with a connection to a service VIP.
#[derive(Clone, Debug)]
pub enum Choice {
    Endpoint(Endpoint),
    /// PASSTHROUGH mode: connect to the VIP itself.
    Passthrough,
}

/// Picks an endpoint of `service` for a connection to `port` from `origin`. `random` returns a
/// uniformly distributed u64 on each call.
pub fn pick(
    state: &State,
    service: &Service,
    port: u16,
    origin: &Origin<'_>,
    random: &mut impl FnMut() -> u64,
) -> Result<Choice, LbError> {
    pick_among(state, service, port, origin, Reach::AnyNetwork, random)
}

/// As [`pick`], among the endpoints on the origin's own network only: what an east-west
/// gateway forwards to (never to another network's gateway).
pub fn pick_in_network(
    state: &State,
    service: &Service,
    port: u16,
    origin: &Origin<'_>,
    random: &mut impl FnMut() -> u64,
) -> Result<Choice, LbError> {
    pick_among(state, service, port, origin, Reach::OwnNetwork, random)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    AnyNetwork,
    OwnNetwork,
}

fn pick_among(
    state: &State,
    service: &Service,
    port: u16,
    origin: &Origin<'_>,
    reach: Reach,
    random: &mut impl FnMut() -> u64,
) -> Result<Choice, LbError> {
    let lb = service.load_balancing.as_ref().unwrap_or(&DEFAULT_LB);
    if lb.mode == LbMode::Passthrough {
        return Ok(Choice::Passthrough);
    }
    let key = service.key();
    let service_port = match service.ports.iter().find(|p| p.service_port == port) {
        Some(p) => *p,
        None if service.ports.is_empty() => super::ServicePort {
            service_port: port,
            target_port: port,
            app_protocol: "UNKNOWN",
        },
        None => {
            return Err(LbError::NoSuchPort {
                service: key.to_owned(),
                port,
            });
        }
    };
    // Candidates with their rank: how many leading preference scopes they share with the origin.
    let mut best_rank = 0;
    let mut candidates: Vec<(usize, Endpoint)> = Vec::new();
    for workload in state.endpoints(key) {
        if lb.health_policy == HealthPolicy::OnlyHealthy && !workload.healthy {
            continue;
        }
        if workload.capacity == 0 {
            continue;
        }
        // On our network an endpoint is reached by its address. Another network's endpoints
        // are reached through its east-west gateway: the synthetic workload istiod sends for
        // them has no address; one with neither address nor gateway is unreachable. istiod
        // sends every client the synthetic workloads of every network, so the one standing for
        // our own network (no address, on our network) is skipped. As ztunnel's
        // `load_balance`.
        let ip = workload.addresses.first().copied();
        let in_network = *workload.network == *origin.network;
        if ip.is_none() && (in_network || workload.network_gateway.is_none()) {
            continue;
        }
        if !in_network && reach == Reach::OwnNetwork {
            continue;
        }
        let target = workload
            .service_ports(key)
            .and_then(|ports| ports.iter().find(|p| p.service_port == port))
            .map(|p| p.target_port)
            .filter(|p| *p != 0)
            .unwrap_or(if service_port.target_port != 0 {
                service_port.target_port
            } else {
                port
            });
        let preference: &[Scope] = match lb.mode {
            LbMode::Strict | LbMode::Failover => &lb.routing_preference,
            LbMode::Standard | LbMode::Passthrough => &[],
        };
        let Some(rank) = rank(preference, lb.mode == LbMode::Strict, origin, workload) else {
            continue;
        };
        best_rank = best_rank.max(rank);
        candidates.push((
            rank,
            Endpoint {
                workload: workload.clone(),
                ip,
                port: target,
            },
        ));
    }
    candidates.retain(|(rank, _)| *rank == best_rank);
    let candidates = candidates
        .into_iter()
        .map(|(_, endpoint)| endpoint)
        .collect();
    match weighted(candidates, |e| e.workload.capacity, random) {
        Some(endpoint) => Ok(Choice::Endpoint(endpoint)),
        None if lb.mode == LbMode::Strict && !lb.routing_preference.is_empty() => {
            Err(LbError::StrictPreference {
                service: key.to_owned(),
                preference: lb.routing_preference.clone(),
            })
        }
        None => Err(LbError::NoEndpoint {
            service: key.to_owned(),
            network: origin.network.to_owned(),
        }),
    }
}

/// One endpoint of a waypoint's (or gateway's) service, to send HBONE to on its own port: no
/// service port mapping and no routing preference, only health, capacity and the origin's
/// network. `None` when it has no such endpoint.
pub fn pick_hbone_endpoint(
    state: &State,
    service: &Service,
    origin: &Origin<'_>,
    random: &mut impl FnMut() -> u64,
) -> Option<(Arc<Workload>, IpAddr)> {
    let candidates = state
        .endpoints(service.key())
        .filter(|w| w.healthy && w.capacity > 0 && *w.network == *origin.network)
        .filter_map(|w| Some((w.clone(), w.addresses.first().copied()?)))
        .collect();
    weighted(candidates, |(w, _)| w.capacity, random)
}

/// One endpoint of an east-west gateway's service, on whatever network it is (a gateway's
/// endpoints are on the network it fronts): health and capacity only.
pub fn pick_gateway_endpoint(
    state: &State,
    service: &Service,
    random: &mut impl FnMut() -> u64,
) -> Option<(Arc<Workload>, IpAddr)> {
    let candidates = state
        .endpoints(service.key())
        .filter(|w| w.healthy && w.capacity > 0)
        .filter_map(|w| Some((w.clone(), w.addresses.first().copied()?)))
        .collect();
    weighted(candidates, |(w, _)| w.capacity, random)
}

/// One of `candidates`, at random, each as likely as its weight (all alike when every weight
/// is 0).
pub fn weighted<T>(
    mut candidates: Vec<T>,
    weight: impl Fn(&T) -> u32,
    random: &mut impl FnMut() -> u64,
) -> Option<T> {
    if candidates.is_empty() {
        return None;
    }
    let total: u64 = candidates.iter().map(|c| u64::from(weight(c))).sum();
    if total == 0 {
        let i = (random() % candidates.len() as u64) as usize;
        return Some(candidates.swap_remove(i));
    }
    let mut ticket = random() % total;
    let mut chosen = candidates.len() - 1;
    for (i, candidate) in candidates.iter().enumerate() {
        let weight = u64::from(weight(candidate));
        if ticket < weight {
            chosen = i;
            break;
        }
        ticket -= weight;
    }
    Some(candidates.swap_remove(chosen))
}

/// How well `workload` fits the routing preference: how many leading scopes it shares with
/// the origin, `None` when STRICT and not all. As ztunnel, a preference that starts with
/// NETWORK ranks every endpoint on the origin's network above every other (a remote endpoint
/// is still ranked by the scopes after it, so failover picks the nearest remote locality).
fn rank(
    preference: &[Scope],
    strict: bool,
    origin: &Origin<'_>,
    workload: &Workload,
) -> Option<usize> {
    let network_first = preference.first() == Some(&Scope::Network);
    let (mut rank, mut adjust) = (0, 0);
    for scope in preference {
        if network_first && *scope == Scope::Network {
            if *origin.network == *workload.network {
                rank += 1;
                adjust = preference.len() - 1;
            }
            continue;
        }
        if !matches(*scope, origin, workload) {
            break;
        }
        rank += 1;
    }
    if strict && rank < preference.len() {
        return None;
    }
    Some(rank + adjust)
}

fn matches(scope: Scope, origin: &Origin<'_>, workload: &Workload) -> bool {
    let (a, b) = (origin.locality, &workload.locality);
    match scope {
        Scope::Region => a.region == b.region,
        Scope::Zone => a.region == b.region && a.zone == b.zone,
        Scope::Subzone => a.region == b.region && a.zone == b.zone && a.subzone == b.subzone,
        Scope::Node => *origin.node == *workload.node,
        Scope::Cluster => *origin.cluster_id == *workload.cluster_id,
        Scope::Network => *origin.network == *workload.network,
    }
}
