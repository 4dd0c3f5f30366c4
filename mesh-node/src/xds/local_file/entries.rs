//! The local file's YAML shapes, typed so that serde reports bad values with their line, and
//! their translation into the protobuf messages istiod would send.
use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer, de};

use crate::xds::proto::{security as sec, workload as pb};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub workloads: Vec<WorkloadEntry>,
    #[serde(default)]
    pub services: Vec<ServiceEntry>,
    #[serde(default)]
    pub policies: Vec<PolicyEntry>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    None,
    Hbone,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Healthy,
    Unhealthy,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    subzone: String,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Port {
    service_port: u16,
    #[serde(default)]
    target_port: u16,
}

impl From<Port> for pb::Port {
    fn from(p: Port) -> Self {
        pb::Port {
            service_port: p.service_port.into(),
            target_port: p.target_port.into(),
            app_protocol: pb::AppProtocol::Unknown as i32,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadEntry {
    #[serde(default)]
    uid: Option<String>,
    name: String,
    namespace: String,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    trust_domain: String,
    addresses: Vec<IpAddr>,
    #[serde(default)]
    node: String,
    #[serde(default)]
    tunnel_protocol: Option<Protocol>,
    #[serde(default)]
    network: String,
    #[serde(default)]
    cluster_id: String,
    #[serde(default)]
    locality: Option<Locality>,
    #[serde(default)]
    status: Option<Status>,
    #[serde(default)]
    capacity: Option<u32>,
    #[serde(default)]
    services: BTreeMap<String, Vec<Port>>,
    #[serde(default)]
    authorization_policies: Vec<String>,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    waypoint: Option<WaypointEntry>,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    hostname: String,
}

/// A waypoint: `{address: IP, network: N, port: P}` or `{hostname: namespace/hostname, port: P}`;
/// the port defaults to 15008.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WaypointEntry {
    #[serde(default)]
    address: Option<IpAddr>,
    #[serde(default)]
    network: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    port: Option<u16>,
}

impl WaypointEntry {
    fn into_proto(self) -> pb::GatewayAddress {
        use pb::gateway_address::Destination;
        let Self {
            address,
            network,
            hostname,
            port,
        } = self;
        let destination = match (address, hostname) {
            (Some(ip), _) => Some(Destination::Address(pb::NetworkAddress {
                network,
                address: ip_bytes(&ip),
                length: None,
            })),
            (None, Some(key)) => {
                let (namespace, hostname) = key.split_once('/').unwrap_or(("", &key));
                Some(Destination::Hostname(pb::NamespacedHostname {
                    namespace: namespace.to_owned(),
                    hostname: hostname.to_owned(),
                }))
            }
            // Refused, by name, by the conversion's check.
            (None, None) => None,
        };
        pb::GatewayAddress {
            destination,
            hbone_mtls_port: port.unwrap_or(mesh_common::HBONE_PORT).into(),
        }
    }
}

impl WorkloadEntry {
    pub fn into_proto(self) -> pb::Workload {
        let Self {
            uid,
            name,
            namespace,
            service_account,
            trust_domain,
            addresses,
            node,
            tunnel_protocol,
            network,
            cluster_id,
            locality,
            status,
            capacity,
            services,
            authorization_policies,
            canonical_name,
            canonical_revision,
            waypoint,
            host_network,
            hostname,
        } = self;
        pb::Workload {
            waypoint: waypoint.map(WaypointEntry::into_proto),
            network_mode: if host_network {
                pb::NetworkMode::HostNetwork
            } else {
                pb::NetworkMode::Standard
            } as i32,
            hostname,
            uid: uid.unwrap_or_else(|| format!("{namespace}/{name}")),
            addresses: addresses.iter().map(ip_bytes).collect(),
            tunnel_protocol: match tunnel_protocol {
                Some(Protocol::Hbone) => pb::TunnelProtocol::Hbone,
                Some(Protocol::None) | None => pb::TunnelProtocol::None,
            } as i32,
            status: match status {
                Some(Status::Unhealthy) => pb::WorkloadStatus::Unhealthy,
                Some(Status::Healthy) | None => pb::WorkloadStatus::Healthy,
            } as i32,
            locality: locality.map(|l| pb::Locality {
                region: l.region,
                zone: l.zone,
                subzone: l.subzone,
            }),
            services: services
                .into_iter()
                .map(|(key, ports)| {
                    let ports = ports.into_iter().map(pb::Port::from).collect();
                    (key, pb::PortList { ports })
                })
                .collect(),
            workload_name: name.clone(),
            name,
            namespace,
            service_account,
            trust_domain,
            node,
            network,
            cluster_id,
            capacity,
            authorization_policies,
            canonical_name,
            canonical_revision,
            ..Default::default()
        }
    }
}

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
    waypoint: Option<WaypointEntry>,
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
    pub fn into_proto(self) -> pb::Service {
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
        pb::Service {
            waypoint: waypoint.map(WaypointEntry::into_proto),
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
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyScope {
    #[default]
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Debug, Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyEntry {
    name: String,
    namespace: String,
    #[serde(default)]
    scope: PolicyScope,
    #[serde(default)]
    action: Action,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    rules: Vec<RuleEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    #[serde(default)]
    clauses: Vec<ClauseEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClauseEntry {
    #[serde(default)]
    matches: Vec<MatchEntry>,
}

/// `{exact: x}`, `{prefix: x}`, `{suffix: x}` or `presence`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StringMatchEntry {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchEntry {
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    namespaces: Vec<StringMatchEntry>,
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    not_namespaces: Vec<StringMatchEntry>,
    #[serde(default)]
    service_accounts: Vec<ServiceAccountEntry>,
    #[serde(default)]
    not_service_accounts: Vec<ServiceAccountEntry>,
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    principals: Vec<StringMatchEntry>,
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    not_principals: Vec<StringMatchEntry>,
    #[serde(default)]
    source_ips: Vec<Cidr>,
    #[serde(default)]
    not_source_ips: Vec<Cidr>,
    #[serde(default)]
    destination_ips: Vec<Cidr>,
    #[serde(default)]
    not_destination_ips: Vec<Cidr>,
    #[serde(default)]
    destination_ports: Vec<u16>,
    #[serde(default)]
    not_destination_ports: Vec<u16>,
}

/// `{namespace: shop, serviceAccount: cart}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceAccountEntry {
    namespace: String,
    service_account: String,
}

impl PolicyEntry {
    pub fn into_proto(self) -> sec::Authorization {
        let Self {
            name,
            namespace,
            scope,
            action,
            dry_run,
            rules,
        } = self;
        let strings = |list: Vec<StringMatchEntry>| -> Vec<sec::StringMatch> {
            use sec::string_match::MatchType;
            list.into_iter()
                .map(|m| sec::StringMatch {
                    match_type: Some(match m {
                        StringMatchEntry::Exact(v) => MatchType::Exact(v),
                        StringMatchEntry::Prefix(v) => MatchType::Prefix(v),
                        StringMatchEntry::Suffix(v) => MatchType::Suffix(v),
                        StringMatchEntry::Presence => MatchType::Presence(()),
                    }),
                })
                .collect()
        };
        let cidrs = |list: Vec<Cidr>| -> Vec<sec::Address> {
            list.into_iter()
                .map(|c| sec::Address {
                    address: ip_bytes(&c.ip),
                    length: c.length.into(),
                })
                .collect()
        };
        let ports = |list: Vec<u16>| list.into_iter().map(u32::from).collect();
        let accounts = |list: Vec<ServiceAccountEntry>| {
            list.into_iter()
                .map(|sa| sec::ServiceAccountMatch {
                    namespace: sa.namespace,
                    service_account: sa.service_account,
                })
                .collect()
        };
        sec::Authorization {
            name,
            namespace,
            scope: match scope {
                PolicyScope::Global => sec::Scope::Global,
                PolicyScope::Namespace => sec::Scope::Namespace,
                PolicyScope::WorkloadSelector => sec::Scope::WorkloadSelector,
            } as i32,
            action: match action {
                Action::Allow => sec::Action::Allow,
                Action::Deny => sec::Action::Deny,
            } as i32,
            dry_run,
            extensions: Vec::new(),
            rules: rules
                .into_iter()
                .map(|rule| sec::Rule {
                    clauses: rule
                        .clauses
                        .into_iter()
                        .map(|clause| sec::Clause {
                            matches: clause
                                .matches
                                .into_iter()
                                .map(|m| sec::Match {
                                    namespaces: strings(m.namespaces),
                                    not_namespaces: strings(m.not_namespaces),
                                    service_accounts: accounts(m.service_accounts),
                                    not_service_accounts: accounts(m.not_service_accounts),
                                    extensions: Vec::new(),
                                    principals: strings(m.principals),
                                    not_principals: strings(m.not_principals),
                                    source_ips: cidrs(m.source_ips),
                                    not_source_ips: cidrs(m.not_source_ips),
                                    destination_ips: cidrs(m.destination_ips),
                                    not_destination_ips: cidrs(m.not_destination_ips),
                                    destination_ports: ports(m.destination_ports),
                                    not_destination_ports: ports(m.not_destination_ports),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// `10.0.0.0/8`, `fd00::/64`, or a bare address (a full-length prefix).
#[derive(Debug, Clone, Copy)]
pub struct Cidr {
    ip: IpAddr,
    length: u8,
}

impl Cidr {
    fn is_host(&self) -> bool {
        self.length == if self.ip.is_ipv4() { 32 } else { 128 }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (ip, length) = match text.split_once('/') {
            Some((ip, length)) => (ip, Some(length)),
            None => (text, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let length = match length {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Self { ip, length })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Cidr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address or CIDR such as 10.0.0.0/8")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Cidr, E> {
                value.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}
