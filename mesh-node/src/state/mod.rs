//! What the mesh looks like: workloads, services and their endpoints, authorization policies.
//! Pure data, no I/O. Sources (istiod over xDS, or the local file) turn resources into these
//! types with [`convert`] and apply them to a [`State`]; the proxy asks it questions, and
//! [`lb`] picks a service's endpoint.
pub mod convert;
mod index;
pub mod lb;
#[cfg(test)]
mod tests;

use std::{collections::HashMap, net::IpAddr};

pub use index::{Destination, State};

use crate::identity::Identity;

/// How a workload accepts mesh traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TunnelProtocol {
    /// Plain TCP: not in the mesh (or not capturable); traffic passes through unchanged.
    #[default]
    None,
    /// HBONE on port 15008.
    Hbone,
}

/// Where a workload runs, for routing preferences.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// One service port a workload serves, and the port it really listens on (0: the service's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub service_port: u16,
    pub target_port: u16,
}

/// An east-west gateway (or waypoint) address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayDestination {
    Address {
        network: String,
        ip: IpAddr,
    },
    /// A service, by "namespace/hostname".
    Hostname(String),
}

/// A workload (pod or VM) as the control plane describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    /// Canonical (IPv4-mapped addresses unmapped).
    pub addresses: Vec<IpAddr>,
    pub network: String,
    pub node: String,
    pub cluster_id: String,
    pub locality: Locality,
    pub protocol: TunnelProtocol,
    pub healthy: bool,
    /// Relative share of a service's traffic; 0 takes none.
    pub capacity: u32,
    /// Services this workload is an endpoint of, by "namespace/hostname".
    pub services: HashMap<String, Vec<PortMapping>>,
    /// WORKLOAD_SELECTOR policies that select it, by "namespace/name".
    pub authorization_policies: Vec<String>,
    pub network_gateway: Option<GatewayAddress>,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }
}

/// A service port and the port its endpoints listen on (0: same as the service port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub service_port: u16,
    pub target_port: u16,
}

/// Scopes of a routing preference, as in Istio's `LoadBalancing.Scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

/// What to do with a routing preference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbMode {
    /// Only endpoints that match every scope.
    Strict,
    /// Endpoints that match the most leading scopes; fall back to fewer, then any.
    #[default]
    Failover,
    /// No endpoint selection: connect to the address the application asked for.
    Passthrough,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    AllowAll,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadBalancing {
    pub routing_preference: Vec<Scope>,
    pub mode: LbMode,
    pub health_policy: HealthPolicy,
}

/// A service: virtual addresses in front of a set of workloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// "namespace/hostname", kept because every connection to the service looks it up.
    key: String,
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// Virtual IPs, each on a network.
    pub vips: Vec<(String, IpAddr)>,
    pub ports: Vec<ServicePort>,
    /// Identities a tunnel to one of its endpoints may present besides the endpoint's own.
    pub subject_alt_names: Vec<Identity>,
    pub load_balancing: Option<LoadBalancing>,
}

impl Service {
    /// The xDS resource name and the key workloads use: "namespace/hostname".
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// An authorization policy, keyed "namespace/name", in the form the policy engine evaluates.
pub type Policy = crate::authz::Policy;
