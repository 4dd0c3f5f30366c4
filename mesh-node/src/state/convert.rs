//! Control-plane resources (the protobuf messages istiod sends, or the local file's entries
//! after parsing) into [`super`]'s types. Every check that can refuse a resource is here, so
//! xDS and the local file refuse the same things with the same words.
use std::{collections::HashMap, net::IpAddr};

use super::{
    ApplicationTunnel, GatewayAddress, GatewayDestination, HealthPolicy, LbMode, LoadBalancing,
    Locality, NetworkMode, PortMapping, Scope, Service, ServicePort, TunnelProtocol, Vip,
    Visibility, WeightedWaypoint, Workload,
};
use crate::{
    authz,
    identity::{San, is_valid_trust_domain},
    proto::{security, workload as pb},
};

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
    Workload(Box<Workload>),
    Service(Box<Service>),
}

/// Converts an `Address` resource; `default_trust_domain` fills in workloads that omit theirs.
pub fn address(address: pb::Address, default_trust_domain: &str) -> Result<Address, ConvertError> {
    match address.r#type {
        Some(pb::address::Type::Workload(w)) => {
            workload(w, default_trust_domain).map(|w| Address::Workload(Box::new(w)))
        }
        Some(pb::address::Type::Service(s)) => service(s).map(|s| Address::Service(Box::new(s))),
        None => Err(ConvertError {
            kind: "address",
            name: String::new(),
            field: "type".into(),
            message: "neither workload nor service is set".into(),
        }),
    }
}

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
        Ok(pb::WorkloadType::Deployment) => "deployment",
        Ok(pb::WorkloadType::Cronjob) => "cronjob",
        Ok(pb::WorkloadType::Pod) => "pod",
        Ok(pb::WorkloadType::Job) => "job",
        Err(_) => return Err(fail("workload_type", unknown(w.workload_type))),
    };
    let application_tunnel = match &w.application_tunnel {
        Some(tunnel) => {
            use pb::application_tunnel::Protocol as P;
            let protocol = match P::try_from(tunnel.protocol) {
                Ok(P::None) => "NONE",
                Ok(P::Proxy) => "PROXY",
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
        default_trust_domain.to_owned()
    } else {
        w.trust_domain.clone()
    };
    if !is_valid_trust_domain(&trust_domain) {
        return Err(fail(
            "trust_domain",
            format!("{trust_domain:?} may hold only a-z, 0-9, '.', '-' and '_'"),
        ));
    }
    let service_account = if w.service_account.is_empty() {
        "default".to_owned()
    } else {
        w.service_account.clone()
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
    let mut services = HashMap::with_capacity(w.services.len());
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
        services.insert(key.clone(), ports);
    }
    let network_gateway = match &w.network_gateway {
        Some(g) => {
            Some(gateway(g).map_err(|(field, m)| fail(&format!("network_gateway.{field}"), m))?)
        }
        None => None,
    };
    let waypoint = match &w.waypoint {
        Some(g) => Some(gateway(g).map_err(|(field, m)| fail(&format!("waypoint.{field}"), m))?),
        None => None,
    };
    let locality = w.locality.clone().unwrap_or_default();
    Ok(Workload {
        addresses,
        protocol,
        trust_domain,
        service_account,
        healthy,
        services,
        network_gateway,
        waypoint,
        network_mode,
        workload_type,
        application_tunnel,
        native_tunnel: w.native_tunnel,
        capacity: w.capacity.unwrap_or(1),
        locality: Locality {
            region: locality.region,
            zone: locality.zone,
            subzone: locality.subzone,
        },
        uid: w.uid,
        hostname: w.hostname,
        name: w.name,
        namespace: w.namespace,
        network: w.network,
        node: w.node,
        cluster_id: w.cluster_id,
        authorization_policies: w.authorization_policies,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_name: w.workload_name,
    })
}

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
            network: a.network.clone(),
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
        key: format!("{}/{}", s.namespace, s.hostname),
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
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
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

fn gateway(g: &pb::GatewayAddress) -> Result<GatewayAddress, (String, String)> {
    let destination = match &g.destination {
        Some(pb::gateway_address::Destination::Address(a)) => GatewayDestination::Address {
            network: a.network.clone(),
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

/// An authorization policy, checked (enums, CIDRs, ports, string matches) and made ready for
/// the policy engine.
pub fn authorization(policy: security::Authorization) -> Result<authz::Policy, ConvertError> {
    let fail = |field: String, message: String| ConvertError {
        kind: "authorization",
        name: format!("{}/{}", policy.namespace, policy.name),
        field,
        message,
    };
    if policy.name.trim().is_empty() {
        return Err(fail("name".into(), "must not be empty".into()));
    }
    if policy.namespace.trim().is_empty() {
        return Err(fail("namespace".into(), "must not be empty".into()));
    }
    let scope = match security::Scope::try_from(policy.scope) {
        Ok(security::Scope::Global) => authz::Scope::Global,
        Ok(security::Scope::Namespace) => authz::Scope::Namespace,
        Ok(security::Scope::WorkloadSelector) => authz::Scope::WorkloadSelector,
        Err(_) => return Err(fail("scope".into(), unknown(policy.scope))),
    };
    let action = match security::Action::try_from(policy.action) {
        Ok(security::Action::Allow) => authz::Action::Allow,
        Ok(security::Action::Deny) => authz::Action::Deny,
        Err(_) => return Err(fail("action".into(), unknown(policy.action))),
    };
    let mut rules = Vec::with_capacity(policy.rules.len());
    for (r, rule) in policy.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (m, matched) in clause.matches.iter().enumerate() {
                let at = format!("rules[{r}].clauses[{c}].matches[{m}]");
                matches.push(
                    authz_match(matched)
                        .map_err(|(field, message)| fail(format!("{at}.{field}"), message))?,
                );
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    Ok(authz::Policy {
        name: policy.name.clone(),
        namespace: policy.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: policy.dry_run,
    })
}

/// One match's fields; an error names the field and index within the match.
fn authz_match(m: &security::Match) -> Result<authz::Match, (String, String)> {
    let cidrs = |field: &str, list: &[security::Address]| {
        list.iter()
            .enumerate()
            .map(|(i, cidr)| {
                let at = || format!("{field}[{i}]");
                let addr = ip(&cidr.address).map_err(|m| (at(), m))?;
                u8::try_from(cidr.length)
                    .ok()
                    .and_then(|len| authz::Cidr::new(addr, len))
                    .ok_or_else(|| {
                        let max = if addr.is_ipv4() { 32 } else { 128 };
                        (at(), format!("prefix length {} exceeds {max}", cidr.length))
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |field: &str, list: &[u32]| {
        list.iter()
            .enumerate()
            .map(|(i, p)| port(*p).map_err(|m| (format!("{field}[{i}]"), m)))
            .collect::<Result<Vec<_>, _>>()
    };
    let strings = |field: &str, list: &[security::StringMatch]| {
        use security::string_match::MatchType;
        list.iter()
            .enumerate()
            .map(|(i, s)| match &s.match_type {
                Some(MatchType::Exact(v)) => Ok(authz::StringMatch::Exact(v.clone())),
                Some(MatchType::Prefix(v)) => Ok(authz::StringMatch::Prefix(v.clone())),
                Some(MatchType::Suffix(v)) => Ok(authz::StringMatch::Suffix(v.clone())),
                Some(MatchType::Presence(())) => Ok(authz::StringMatch::Presence),
                None => Err((
                    format!("{field}[{i}]"),
                    "no match type (exact, prefix, suffix or presence) is set".to_owned(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let accounts = |field: &str, list: &[security::ServiceAccountMatch]| {
        list.iter()
            .enumerate()
            .map(|(i, sa)| {
                let bad = |what: &str| {
                    (
                        format!("{field}[{i}].{what}"),
                        "must be a non-empty name without '/'".to_owned(),
                    )
                };
                if sa.namespace.trim().is_empty() || sa.namespace.contains('/') {
                    return Err(bad("namespace"));
                }
                if sa.service_account.trim().is_empty() || sa.service_account.contains('/') {
                    return Err(bad("serviceAccount"));
                }
                Ok(authz::ServiceAccount {
                    namespace: sa.namespace.clone(),
                    name: sa.service_account.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(authz::Match {
        namespaces: strings("namespaces", &m.namespaces)?,
        not_namespaces: strings("not_namespaces", &m.not_namespaces)?,
        service_accounts: accounts("service_accounts", &m.service_accounts)?,
        not_service_accounts: accounts("not_service_accounts", &m.not_service_accounts)?,
        principals: strings("principals", &m.principals)?,
        not_principals: strings("not_principals", &m.not_principals)?,
        source_ips: cidrs("source_ips", &m.source_ips)?,
        not_source_ips: cidrs("not_source_ips", &m.not_source_ips)?,
        destination_ips: cidrs("destination_ips", &m.destination_ips)?,
        not_destination_ips: cidrs("not_destination_ips", &m.not_destination_ips)?,
        destination_ports: ports("destination_ports", &m.destination_ports)?,
        not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
    })
}

fn ip(bytes: &[u8]) -> Result<IpAddr, String> {
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

fn port(value: u32) -> Result<u16, String> {
    u16::try_from(value).map_err(|_| format!("port {value} is above 65535"))
}

fn unknown(value: i32) -> String {
    format!("unknown enum value {value}")
}

fn is_namespaced_hostname(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(ns, host)| !ns.is_empty() && !host.is_empty() && !host.contains('/'))
}
