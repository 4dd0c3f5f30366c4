//! Control-plane resources (the protobuf messages istiod sends, or the local file's entries
//! after parsing) into [`super`]'s types. Every check that can refuse a resource is here, so
//! xDS and the local file refuse the same things with the same words.
mod authorization;
mod service;
mod workload;

use std::{net::IpAddr, sync::Arc};

pub use authorization::authorization;
pub use service::service;
pub use workload::workload;

use super::{GatewayAddress, GatewayDestination, Service, Workload, intern::intern};
use crate::proto::workload as pb;

/// A resource that cannot be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {field}: {message}")]
pub struct ConvertError {
    /// "workload", "service" or "authorization".
    pub kind: &'static str,
    pub name: String,
    /// The field path, e.g. `addresses[1]`.
    pub field: String,
    pub message: String,
}

/// A decoded `istio.workload.Address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
}

/// Converts an `Address` resource; `default_trust_domain` fills in workloads that omit theirs.
pub fn address(address: pb::Address, default_trust_domain: &str) -> Result<Address, ConvertError> {
    match address.r#type {
        Some(pb::address::Type::Workload(w)) => {
            workload(w, default_trust_domain).map(|w| Address::Workload(Arc::new(w)))
        }
        Some(pb::address::Type::Service(s)) => service(s).map(|s| Address::Service(Arc::new(s))),
        None => Err(ConvertError {
            kind: "address",
            name: String::new(),
            field: "type".into(),
            message: "neither workload nor service is set".into(),
        }),
    }
}

/// A gateway or waypoint address; an error names the field within it (and its message).
pub(super) fn gateway(g: &pb::GatewayAddress) -> Result<GatewayAddress, (String, String)> {
    let destination = match &g.destination {
        Some(pb::gateway_address::Destination::Address(a)) => GatewayDestination::Address {
            network: intern(&a.network),
            ip: ip(&a.address).map_err(|m| ("address.address".to_owned(), m))?,
        },
        Some(pb::gateway_address::Destination::Hostname(h)) => {
            let key = format!("{}/{}", h.namespace, h.hostname);
            if !is_namespaced_hostname(&key) {
                return Err((
                    "hostname".into(),
                    format!("{key:?} is not \"namespace/hostname\""),
                ));
            }
            GatewayDestination::Hostname(key)
        }
        None => {
            return Err((
                "destination".into(),
                "neither address nor hostname is set".into(),
            ));
        }
    };
    // Unset is HBONE's own port, as istiod means it.
    let hbone_mtls_port = match port(g.hbone_mtls_port) {
        Ok(0) => mesh_common::HBONE_PORT,
        Ok(p) => p,
        Err(m) => return Err(("hbone_mtls_port".to_owned(), m)),
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port,
    })
}

pub(super) fn ip(bytes: &[u8]) -> Result<IpAddr, String> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::from(v4));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::from(v6).to_canonical());
    }
    Err(format!(
        "{} bytes is not an IPv4 (4) or IPv6 (16) address",
        bytes.len()
    ))
}

pub(super) fn port(value: u32) -> Result<u16, String> {
    u16::try_from(value).map_err(|_| format!("port {value} is above 65535"))
}

pub(super) fn unknown(value: i32) -> String {
    format!("unknown enum value {value}")
}

pub(super) fn is_namespaced_hostname(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(ns, host)| !ns.is_empty() && !host.is_empty() && !host.contains('/'))
}
