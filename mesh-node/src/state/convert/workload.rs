//! `istio.workload.Workload` into a [`Workload`].
use super::{ConvertError, gateway, ip, is_namespaced_hostname, port, unknown};
use crate::{
    identity::is_valid_trust_domain,
    proto::workload as pb,
    state::{
        ApplicationProtocol, ApplicationTunnel, Locality, NetworkMode, PortMapping, TunnelProtocol,
        Workload, WorkloadKind,
        intern::{self, intern},
    },
};

pub fn workload(w: pb::Workload, default_trust_domain: &str) -> Result<Workload, ConvertError> {
    let fail = |field: &str, message: String| ConvertError {
        kind: "workload",
        name: w.uid.clone(),
        field: field.to_owned(),
        message,
    };
    if w.uid.trim().is_empty() {
        return Err(fail("uid", "must not be empty".into()));
    }
    let mut addresses = Vec::with_capacity(w.addresses.len());
    for (i, bytes) in w.addresses.iter().enumerate() {
        addresses.push(ip(bytes).map_err(|m| fail(&format!("addresses[{i}]"), m))?);
    }
    let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::None) => TunnelProtocol::None,
        Ok(pb::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
        Ok(pb::TunnelProtocol::LegacyIstioMtls) => {
            return Err(fail(
                "tunnel_protocol",
                "LEGACY_ISTIO_MTLS (a sidecar's mTLS) is not supported by node proxies".into(),
            ));
        }
        Err(_) => return Err(fail("tunnel_protocol", unknown(w.tunnel_protocol))),
    };
    let network_mode = match pb::NetworkMode::try_from(w.network_mode) {
        Ok(pb::NetworkMode::Standard) => NetworkMode::Standard,
        Ok(pb::NetworkMode::HostNetwork) => NetworkMode::HostNetwork,
        Err(_) => return Err(fail("network_mode", unknown(w.network_mode))),
    };
    let workload_type = match pb::WorkloadType::try_from(w.workload_type) {
        Ok(pb::WorkloadType::Deployment) => WorkloadKind::Deployment,
        Ok(pb::WorkloadType::Cronjob) => WorkloadKind::Cronjob,
        Ok(pb::WorkloadType::Pod) => WorkloadKind::Pod,
        Ok(pb::WorkloadType::Job) => WorkloadKind::Job,
        Err(_) => return Err(fail("workload_type", unknown(w.workload_type))),
    };
    let application_tunnel = match &w.application_tunnel {
        Some(tunnel) => {
            use pb::application_tunnel::Protocol as P;
            let protocol = match P::try_from(tunnel.protocol) {
                Ok(P::None) => ApplicationProtocol::None,
                Ok(P::Proxy) => ApplicationProtocol::Proxy,
                Err(_) => {
                    return Err(fail(
                        "application_tunnel.protocol",
                        unknown(tunnel.protocol),
                    ));
                }
            };
            let port = port(tunnel.port).map_err(|m| fail("application_tunnel.port", m))?;
            Some(ApplicationTunnel { protocol, port })
        }
        None => None,
    };
    let trust_domain = if w.trust_domain.is_empty() {
        default_trust_domain
    } else {
        &w.trust_domain
    };
    if !is_valid_trust_domain(trust_domain) {
        return Err(fail(
            "trust_domain",
            format!("{trust_domain:?} may hold only a-z, 0-9, '.', '-' and '_'"),
        ));
    }
    let service_account = if w.service_account.is_empty() {
        "default"
    } else {
        &w.service_account
    };
    if service_account.contains('/') || service_account.trim().is_empty() {
        return Err(fail(
            "service_account",
            format!("{service_account:?} is not a name"),
        ));
    }
    if protocol == TunnelProtocol::Hbone && (w.namespace.is_empty() || w.namespace.contains('/')) {
        return Err(fail(
            "namespace",
            format!(
                "{:?} is not a namespace; an HBONE workload's identity needs one",
                w.namespace
            ),
        ));
    }
    let healthy = match pb::WorkloadStatus::try_from(w.status) {
        Ok(pb::WorkloadStatus::Healthy) => true,
        Ok(pb::WorkloadStatus::Unhealthy) => false,
        Err(_) => return Err(fail("status", unknown(w.status))),
    };
    let mut services = Vec::with_capacity(w.services.len());
    for (key, list) in &w.services {
        if !is_namespaced_hostname(key) {
            return Err(fail(
                &format!("services[{key:?}]"),
                "key must be \"namespace/hostname\"".into(),
            ));
        }
        let mut ports = Vec::with_capacity(list.ports.len());
        for (i, p) in list.ports.iter().enumerate() {
            let field = format!("services[{key:?}].ports[{i}]");
            ports.push(PortMapping {
                service_port: port(p.service_port).map_err(|m| fail(&field, m))?,
                target_port: port(p.target_port).map_err(|m| fail(&field, m))?,
            });
        }
        services.push((intern(key), intern::ports(&ports)));
    }
    // In key order, so that two decodings of one resource compare equal.
    services.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let network_gateway = match &w.network_gateway {
        Some(g) => {
            Some(Box::new(gateway(g).map_err(|(field, m)| {
                fail(&format!("network_gateway.{field}"), m)
            })?))
        }
        None => None,
    };
    let waypoint = match &w.waypoint {
        Some(g) => {
            Some(Box::new(gateway(g).map_err(|(field, m)| {
                fail(&format!("waypoint.{field}"), m)
            })?))
        }
        None => None,
    };
    let locality = w.locality.as_ref();
    let locality_part =
        |part: fn(&pb::Locality) -> &String| intern(locality.map_or("", |l| part(l)));
    Ok(Workload {
        addresses: addresses.into_boxed_slice(),
        protocol,
        trust_domain: intern(trust_domain),
        service_account: intern(service_account),
        healthy,
        services: services.into_boxed_slice(),
        network_gateway,
        waypoint,
        network_mode,
        workload_type,
        application_tunnel,
        native_tunnel: w.native_tunnel,
        capacity: w.capacity.unwrap_or(1),
        locality: intern::locality(Locality {
            region: locality_part(|l| &l.region),
            zone: locality_part(|l| &l.zone),
            subzone: locality_part(|l| &l.subzone),
        }),
        // Unique per workload: not worth a table entry.
        uid: w.uid.as_str().into(),
        hostname: w.hostname.into_boxed_str(),
        name: w.name.into_boxed_str(),
        namespace: intern(&w.namespace),
        network: intern(&w.network),
        node: intern(&w.node),
        cluster_id: intern(&w.cluster_id),
        authorization_policies: w.authorization_policies.iter().map(|p| intern(p)).collect(),
        canonical_name: intern(&w.canonical_name),
        canonical_revision: intern(&w.canonical_revision),
        workload_name: intern(&w.workload_name),
    })
}
