//! The local file's YAML shapes, typed so that serde reports bad values with their line, and
//! their translation into the protobuf messages istiod would send.
mod policy;
mod service;
mod workload;

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer, de};

pub use policy::PolicyEntry;
pub use service::ServiceEntry;
pub use workload::WorkloadEntry;

use crate::proto::workload as pb;

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

/// A waypoint: `{address: IP, network: N, port: P}` or `{hostname: namespace/hostname, port: P}`;
/// the port defaults to 15008.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayEntry {
    #[serde(default)]
    address: Option<IpAddr>,
    #[serde(default)]
    network: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    port: Option<u16>,
}

impl GatewayEntry {
    /// The gateway address of field `field` (`waypoint`, `networkGateway`); refuses an entry
    /// that names both an address and a hostname, or neither (a network without an address,
    /// say), by field.
    fn into_proto(self, field: &str) -> Result<pb::GatewayAddress, String> {
        use pb::gateway_address::Destination;
        let Self {
            address,
            network,
            hostname,
            port,
        } = self;
        let destination = match (address, hostname) {
            (Some(_), Some(_)) => {
                return Err(format!("{field}: address and hostname are exclusive"));
            }
            (None, None) => return Err(format!("{field}: needs an address or a hostname")),
            (Some(ip), None) => Some(Destination::Address(pb::NetworkAddress {
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
        };
        Ok(pb::GatewayAddress {
            destination,
            hbone_mtls_port: port.unwrap_or(mesh_common::HBONE_PORT).into(),
        })
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

pub(super) fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}
