//! A workload entry of the local file.
use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize;

use super::{GatewayEntry, Port, ip_bytes};
use crate::proto::workload as pb;

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
    /// None for another network's endpoints known only by their gateway.
    #[serde(default)]
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
    waypoint: Option<GatewayEntry>,
    /// The east-west gateway other networks reach this workload through.
    #[serde(default)]
    network_gateway: Option<GatewayEntry>,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    hostname: String,
}

impl WorkloadEntry {
    /// The message istiod would send; `Err` names a field no message could carry.
    pub fn into_proto(self) -> Result<pb::Workload, String> {
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
            network_gateway,
            host_network,
            hostname,
        } = self;
        Ok(pb::Workload {
            network_gateway: network_gateway
                .map(|g| g.into_proto("networkGateway"))
                .transpose()?,
            waypoint: waypoint.map(|w| w.into_proto("waypoint")).transpose()?,
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
        })
    }
}
