//! A service entry of the local file.
use serde::Deserialize;

use super::{Cidr, GatewayEntry, Port, ip_bytes};
use crate::proto::workload as pb;

/// A service address, or a block of them (`10.100.0.0/16`): bare on the default network, or
/// `{network, address}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ServiceAddress {
    Plain(Cidr),
    OnNetwork { network: String, address: Cidr },
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "UPPERCASE")]
pub enum ScopeEntry {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "UPPERCASE")]
pub enum ModeEntry {
    Strict,
    Failover,
    Passthrough,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthEntry {
    OnlyHealthy,
    AllowAll,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancingEntry {
    #[serde(default)]
    routing_preference: Vec<ScopeEntry>,
    #[serde(default)]
    mode: Option<ModeEntry>,
    #[serde(default)]
    health_policy: Option<HealthEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntry {
    name: String,
    namespace: String,
    hostname: String,
    #[serde(default)]
    addresses: Vec<ServiceAddress>,
    #[serde(default)]
    ports: Vec<Port>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    load_balancing: Option<LoadBalancingEntry>,
    #[serde(default)]
    waypoint: Option<GatewayEntry>,
    #[serde(default)]
    visibility: Option<VisibilityEntry>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "UPPERCASE")]
pub enum VisibilityEntry {
    Public,
    Namespace,
}

impl ServiceEntry {
    /// The message istiod would send; `Err` names a field no message could carry.
    pub fn into_proto(self) -> Result<pb::Service, String> {
        use pb::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
        let Self {
            name,
            namespace,
            hostname,
            addresses,
            ports,
            subject_alt_names,
            load_balancing,
            waypoint,
            visibility,
        } = self;
        Ok(pb::Service {
            waypoint: waypoint.map(|w| w.into_proto("waypoint")).transpose()?,
            visibility: match visibility {
                Some(VisibilityEntry::Namespace) => pb::service::Visibility::Namespace,
                Some(VisibilityEntry::Public) | None => pb::service::Visibility::Public,
            } as i32,
            name,
            namespace,
            hostname,
            addresses: addresses
                .into_iter()
                .map(|a| match a {
                    ServiceAddress::Plain(ip) => (String::new(), ip),
                    ServiceAddress::OnNetwork { network, address } => (network, address),
                })
                .map(|(network, cidr)| pb::NetworkAddress {
                    network,
                    address: ip_bytes(&cidr.ip),
                    length: (!cidr.is_host()).then_some(cidr.length.into()),
                })
                .collect(),
            ports: ports.into_iter().map(pb::Port::from).collect(),
            subject_alt_names,
            load_balancing: load_balancing.map(|lb| pb::LoadBalancing {
                routing_preference: lb
                    .routing_preference
                    .into_iter()
                    .map(|s| match s {
                        ScopeEntry::Region => S::Region,
                        ScopeEntry::Zone => S::Zone,
                        ScopeEntry::Subzone => S::Subzone,
                        ScopeEntry::Node => S::Node,
                        ScopeEntry::Cluster => S::Cluster,
                        ScopeEntry::Network => S::Network,
                    } as i32)
                    .collect(),
                mode: match lb.mode {
                    None => M::UnspecifiedMode,
                    Some(ModeEntry::Strict) => M::Strict,
                    Some(ModeEntry::Failover) => M::Failover,
                    Some(ModeEntry::Passthrough) => M::Passthrough,
                } as i32,
                health_policy: match lb.health_policy {
                    Some(HealthEntry::AllowAll) => H::AllowAll,
                    Some(HealthEntry::OnlyHealthy) | None => H::OnlyHealthy,
                } as i32,
            }),
            ..Default::default()
        })
    }
}
