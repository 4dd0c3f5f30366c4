//! What the mesh looks like: workloads, services and their endpoints, authorization policies.
//! Pure data, no I/O. Sources (istiod over xDS, or the local file) turn resources into these
//! types with [`convert`] and apply them to a [`State`]; the proxy asks it questions, and
//! [`lb`] picks a service's endpoint.
pub mod convert;
mod index;
pub mod intern;
pub mod lb;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod wire_tests;

use std::{net::IpAddr, sync::Arc};

use serde::Serialize;

pub use index::{Destination, State};

use crate::{
    authz::Cidr,
    identity::{Identity, San},
};

/// How a workload accepts mesh traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum TunnelProtocol {
    /// Plain TCP: not in the mesh (or not capturable); traffic passes through unchanged.
    #[default]
    None,
    /// HBONE on port 15008.
    Hbone,
}

/// Whether a workload has a network namespace of its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum NetworkMode {
    #[default]
    Standard,
    /// Shares the node's network: several such workloads have the node's IP, so none of them
    /// is found by address (as ztunnel).
    HostNetwork,
}

/// Where a workload runs, for routing preferences.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Locality {
    pub region: Arc<str>,
    pub zone: Arc<str>,
    pub subzone: Arc<str>,
}

/// One service port a workload serves, and the port it really listens on (0: the service's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PortMapping {
    pub service_port: u16,
    pub target_port: u16,
}

/// An east-west gateway or waypoint: where to send HBONE, and on which port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayDestination {
    /// A workload or a service VIP.
    Address { network: Arc<str>, ip: IpAddr },
    /// A service, by "namespace/hostname", resolved through our own state (not DNS).
    Hostname(String),
}

/// A workload's own tunnel listener (a waypoint's PROXY-protocol port), decoded and shown only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ApplicationTunnel {
    pub protocol: ApplicationProtocol,
    pub port: u16,
}

/// What an application tunnel puts in front of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ApplicationProtocol {
    None,
    Proxy,
}

/// The kind of controller a workload belongs to, as Istio's `WorkloadType`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    #[default]
    Deployment,
    Cronjob,
    Pod,
    Job,
}

impl WorkloadKind {
    /// As Istio's metrics label it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "deployment",
            Self::Cronjob => "cronjob",
            Self::Pod => "pod",
            Self::Job => "job",
        }
    }
}

/// A workload (pod or VM) as the control plane describes it.
///
/// Sized for a million of them: strings many workloads repeat are interned ([`intern`]), the
/// uid is one allocation shared with every index that keys by it, fields few workloads set
/// are boxed, and lists are boxed slices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub uid: Arc<str>,
    pub name: Box<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
    pub trust_domain: Arc<str>,
    /// Canonical (IPv4-mapped addresses unmapped).
    pub addresses: Box<[IpAddr]>,
    /// A workload without addresses (a VM, a ServiceEntry endpoint known by name) has one.
    pub hostname: Box<str>,
    pub network: Arc<str>,
    pub network_mode: NetworkMode,
    pub node: Arc<str>,
    pub cluster_id: Arc<str>,
    /// Shared with every workload of the same locality ([`intern::locality`]).
    pub locality: Arc<Locality>,
    pub protocol: TunnelProtocol,
    pub healthy: bool,
    /// Relative share of a service's traffic; 0 takes none.
    pub capacity: u32,
    /// Services this workload is an endpoint of, by "namespace/hostname", each once (a map
    /// in the config dump, as istiod sends it).
    #[serde(serialize_with = "services_as_map")]
    pub services: Box<[EndpointOf]>,
    /// Further policies that apply to it ("namespace/name"), whatever their scope.
    pub authorization_policies: Box<[Arc<str>]>,
    /// The waypoint traffic addressed to this workload goes through.
    pub waypoint: Option<Box<GatewayAddress>>,
    pub network_gateway: Option<Box<GatewayAddress>>,
    pub canonical_name: Arc<str>,
    pub canonical_revision: Arc<str>,
    pub workload_name: Arc<str>,
    pub workload_type: WorkloadKind,
    /// Speaks HBONE itself (no node proxy in front of it); decoded and shown.
    pub native_tunnel: bool,
    pub application_tunnel: Option<ApplicationTunnel>,
}

/// A service key and the ports a workload serves for it (a list shared by the workloads that
/// serve the same ones, [`intern::ports`]).
pub type EndpointOf = (Arc<str>, Arc<[PortMapping]>);

fn services_as_map<S: serde::Serializer>(
    services: &[EndpointOf],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(services.iter().map(|(key, ports)| (key, ports)))
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// The ports it serves for the service `key`, if it is one of its endpoints.
    pub fn service_ports(&self, key: &str) -> Option<&[PortMapping]> {
        self.services
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, ports)| &**ports)
    }

    /// The address to reach it at for a connection to `dst`: `dst` itself when it is one of
    /// its addresses, else its first of `dst`'s family, else its first (as ztunnel: a
    /// dual-stack endpoint is called in the family the application used).
    pub fn address_for(&self, dst: IpAddr) -> Option<IpAddr> {
        let dst = dst.to_canonical();
        if self.addresses.contains(&dst) {
            return Some(dst);
        }
        self.addresses
            .iter()
            .find(|ip| ip.is_ipv6() == dst.is_ipv6())
            .or(self.addresses.first())
            .copied()
    }
}

/// A service port and the port its endpoints listen on (0: same as the service port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub service_port: u16,
    pub target_port: u16,
    /// As declared ("TCP", "HTTP11" …); shown, not used (L4 only).
    pub app_protocol: &'static str,
}

/// Scopes of a routing preference, as in Istio's `LoadBalancing.Scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

/// What to do with a routing preference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum LbMode {
    /// Istio's UNSPECIFIED mode: the routing preference is not consulted.
    #[default]
    Standard,
    /// Only endpoints that match every scope.
    Strict,
    /// Endpoints that match the most leading scopes; fall back to fewer, then any.
    Failover,
    /// No endpoint selection: connect to the address the application asked for.
    Passthrough,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    AllowAll,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadBalancing {
    pub routing_preference: Vec<Scope>,
    pub mode: LbMode,
    pub health_policy: HealthPolicy,
}

/// Who may see a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Visibility {
    #[default]
    Public,
    /// Only workloads of the service's own namespace; to anyone else its addresses are not
    /// the service's.
    Namespace,
}

/// A virtual address of a service: one IP, or a CIDR block (a ServiceEntry's address range),
/// on a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Vip {
    pub network: Arc<str>,
    pub cidr: Cidr,
}

impl Vip {
    /// A single address, not a range.
    pub fn is_host(&self) -> bool {
        self.cidr.is_host()
    }
}

/// One of a service's waypoints, taking `weight` of its traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WeightedWaypoint {
    pub destination: GatewayAddress,
    pub weight: u32,
}

/// A service: virtual addresses in front of a set of workloads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    /// "namespace/hostname", kept because every connection to the service looks it up; the
    /// same allocation as its endpoints' references to it.
    #[serde(skip)]
    key: Arc<str>,
    pub name: Box<str>,
    pub namespace: Arc<str>,
    pub hostname: Box<str>,
    pub vips: Vec<Vip>,
    pub ports: Vec<ServicePort>,
    /// Names a tunnel to one of its endpoints may present besides the endpoint's identity.
    pub subject_alt_names: Vec<San>,
    pub load_balancing: Option<LoadBalancing>,
    /// The waypoint traffic addressed to this service goes through.
    pub waypoint: Option<GatewayAddress>,
    /// When set, these take the traffic instead of `waypoint`, by weight.
    pub weighted_waypoints: Vec<WeightedWaypoint>,
    /// Ingress gateways send to the waypoint too (their concern; shown only).
    pub ingress_use_waypoint: bool,
    pub visibility: Visibility,
    /// The Kubernetes Service for its hostname, rather than a ServiceEntry (shown only).
    pub canonical: bool,
    /// "AUTOMATIC", "IPV4_ONLY", "IPV6_ONLY" or "DUAL" (shown only).
    pub ip_families: &'static str,
}

impl Service {
    /// The xDS resource name and the key workloads use: "namespace/hostname".
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key, shared.
    pub fn shared_key(&self) -> &Arc<str> {
        &self.key
    }

    /// Whether a workload in `namespace` may use this service.
    pub fn is_visible_to(&self, namespace: &str) -> bool {
        self.visibility == Visibility::Public || *self.namespace == *namespace
    }
}

/// An authorization policy, keyed "namespace/name", in the form the policy engine evaluates.
pub type Policy = crate::authz::Policy;
