//! `istio.workload.Service` into a [`Service`], with its load balancing.
use super::{ConvertError, gateway, ip, port, unknown};
use crate::{
    authz,
    identity::San,
    proto::workload as pb,
    state::{
        HealthPolicy, LbMode, LoadBalancing, Scope, Service, ServicePort, Vip, Visibility,
        WeightedWaypoint, intern::intern,
    },
};

pub fn service(s: pb::Service) -> Result<Service, ConvertError> {
    let fail = |field: &str, message: String| ConvertError {
        kind: "service",
        name: format!("{}/{}", s.namespace, s.hostname),
        field: field.to_owned(),
        message,
    };
    for (field, value) in [("namespace", &s.namespace), ("hostname", &s.hostname)] {
        if value.trim().is_empty() || value.contains('/') {
            return Err(fail(field, format!("{value:?} is not a name")));
        }
    }
    let mut vips = Vec::with_capacity(s.addresses.len());
    for (i, a) in s.addresses.iter().enumerate() {
        let addr = ip(&a.address).map_err(|m| fail(&format!("addresses[{i}].address"), m))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let length = a.length.unwrap_or(max);
        let cidr = u8::try_from(length)
            .ok()
            .and_then(|len| authz::Cidr::new(addr, len))
            .ok_or_else(|| {
                fail(
                    &format!("addresses[{i}].length"),
                    format!("prefix length {length} exceeds {max}"),
                )
            })?;
        vips.push(Vip {
            network: intern(&a.network),
            cidr,
        });
    }
    let mut ports = Vec::with_capacity(s.ports.len());
    for (i, p) in s.ports.iter().enumerate() {
        let field = format!("ports[{i}]");
        let service_port = port(p.service_port).map_err(|m| fail(&field, m))?;
        if service_port == 0 {
            return Err(fail(&field, "service_port must not be 0".into()));
        }
        let app_protocol = match pb::AppProtocol::try_from(p.app_protocol) {
            Ok(protocol) => protocol.as_str_name(),
            Err(_) => {
                return Err(fail(
                    &format!("{field}.app_protocol"),
                    unknown(p.app_protocol),
                ));
            }
        };
        ports.push(ServicePort {
            service_port,
            target_port: port(p.target_port).map_err(|m| fail(&field, m))?,
            app_protocol,
        });
    }
    let mut subject_alt_names = Vec::with_capacity(s.subject_alt_names.len());
    for (i, san) in s.subject_alt_names.iter().enumerate() {
        if san.trim().is_empty() {
            return Err(fail(
                &format!("subject_alt_names[{i}]"),
                "must not be empty".into(),
            ));
        }
        // A SPIFFE ID is compared as an identity; anything else (istiod copies a ServiceEntry's
        // SANs as written) as a name the certificate must carry.
        subject_alt_names.push(San::parse(san));
    }
    let waypoint = match &s.waypoint {
        Some(g) => Some(gateway(g).map_err(|(field, m)| fail(&format!("waypoint.{field}"), m))?),
        None => None,
    };
    let mut weighted_waypoints = Vec::with_capacity(s.weighted_waypoints.len());
    for (i, w) in s.weighted_waypoints.iter().enumerate() {
        let at = format!("weighted_waypoints[{i}]");
        let destination = w
            .destination
            .as_ref()
            .ok_or_else(|| fail(&format!("{at}.destination"), "not set".into()))
            .and_then(|g| {
                gateway(g).map_err(|(field, m)| fail(&format!("{at}.destination.{field}"), m))
            })?;
        weighted_waypoints.push(WeightedWaypoint {
            destination,
            weight: w.weight,
        });
    }
    let visibility = match pb::service::Visibility::try_from(s.visibility) {
        Ok(pb::service::Visibility::Public) => Visibility::Public,
        Ok(pb::service::Visibility::Namespace) => Visibility::Namespace,
        Err(_) => return Err(fail("visibility", unknown(s.visibility))),
    };
    let ip_families = match pb::IpFamilies::try_from(s.ip_families) {
        Ok(families) => families.as_str_name(),
        Err(_) => return Err(fail("ip_families", unknown(s.ip_families))),
    };
    let load_balancing = match &s.load_balancing {
        Some(lb) => Some(
            load_balancing(lb).map_err(|(field, m)| fail(&format!("load_balancing.{field}"), m))?,
        ),
        None => None,
    };
    Ok(Service {
        // Shared with the workloads that name it.
        key: intern(&format!("{}/{}", s.namespace, s.hostname)),
        vips,
        ports,
        subject_alt_names,
        load_balancing,
        waypoint,
        weighted_waypoints,
        visibility,
        ip_families,
        ingress_use_waypoint: s.ingress_use_waypoint,
        canonical: s.canonical,
        name: s.name.into_boxed_str(),
        namespace: intern(&s.namespace),
        hostname: s.hostname.into_boxed_str(),
    })
}

fn load_balancing(lb: &pb::LoadBalancing) -> Result<LoadBalancing, (String, String)> {
    use pb::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
    let mut routing_preference = Vec::with_capacity(lb.routing_preference.len());
    for (i, value) in lb.routing_preference.iter().enumerate() {
        routing_preference.push(match S::try_from(*value) {
            Ok(S::Region) => Scope::Region,
            Ok(S::Zone) => Scope::Zone,
            Ok(S::Subzone) => Scope::Subzone,
            Ok(S::Node) => Scope::Node,
            Ok(S::Cluster) => Scope::Cluster,
            Ok(S::Network) => Scope::Network,
            Ok(S::UnspecifiedScope) | Err(_) => {
                return Err((format!("routing_preference[{i}]"), unknown(*value)));
            }
        });
    }
    let mode = match M::try_from(lb.mode) {
        Ok(M::UnspecifiedMode) => LbMode::Standard,
        Ok(M::Strict) => LbMode::Strict,
        Ok(M::Failover) => LbMode::Failover,
        Ok(M::Passthrough) => LbMode::Passthrough,
        Err(_) => return Err(("mode".into(), unknown(lb.mode))),
    };
    let health_policy = match H::try_from(lb.health_policy) {
        Ok(H::OnlyHealthy) => HealthPolicy::OnlyHealthy,
        Ok(H::AllowAll) => HealthPolicy::AllowAll,
        Err(_) => return Err(("health_policy".into(), unknown(lb.health_policy))),
    };
    Ok(LoadBalancing {
        routing_preference,
        mode,
        health_policy,
    })
}
