//! Which mesh name a query is for (pure: a read of the state). As ztunnel's DNS proxy: a
//! service is known by its hostname and by the short forms Kubernetes gives it (`name.ns`,
//! `name.ns.svc`, and `name` from its own namespace), also after the pod's resolver appended one
//! of its search domains (`<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`); the answer is the
//! service's VIPs on the asking pod's network.
use std::net::IpAddr;

use crate::state::{Service, State};

/// Who asks, for visibility and which VIPs it gets.
#[derive(Clone, Copy, Debug)]
pub struct Asker<'a> {
    pub namespace: &'a str,
    pub network: &'a str,
}

/// The service a query names, with its addresses for `asker` (possibly none of the asked
/// family: a NODATA answer, not a forward).
pub fn find(state: &State, qname: &str, asker: Asker<'_>, domain: &str) -> Option<Vec<IpAddr>> {
    let name = qname.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return None;
    }
    let searches = [
        format!(".{}.svc.{domain}", asker.namespace),
        format!(".svc.{domain}"),
        format!(".{domain}"),
    ];
    let stripped = searches
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix.as_str()));
    std::iter::once(name.as_str())
        .chain(stripped)
        .find_map(|candidate| service_named(state, candidate, asker, domain))
        .map(|service| addresses(&service, asker))
}

/// The service `candidate` names for `asker`: its hostname, or a short form of it.
fn service_named(
    state: &State,
    candidate: &str,
    asker: Asker<'_>,
    domain: &str,
) -> Option<std::sync::Arc<Service>> {
    let labels = candidate.split('.').count();
    let mut names = vec![candidate.to_owned()];
    match labels {
        1 => names.push(format!("{candidate}.{}.svc.{domain}", asker.namespace)),
        2 => names.push(format!("{candidate}.svc.{domain}")),
        3 if candidate.ends_with(".svc") => names.push(format!("{candidate}.{domain}")),
        _ => {}
    }
    names.iter().find_map(|hostname| {
        state
            .services_by_hostname(hostname)
            .find(|service| service.is_visible_to(asker.namespace))
            .cloned()
    })
}

/// The service's single addresses on the asker's network (ranges are not answers).
fn addresses(service: &Service, asker: Asker<'_>) -> Vec<IpAddr> {
    service
        .vips
        .iter()
        .filter(|vip| vip.is_host() && *vip.network == *asker.network)
        .map(|vip| vip.cidr.addr())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        proto::workload as pb,
        state::{State, convert},
    };

    fn service(name: &str, ns: &str, host: &str, vips: &[(&str, &str)]) -> pb::Service {
        pb::Service {
            name: name.into(),
            namespace: ns.into(),
            hostname: host.into(),
            addresses: vips
                .iter()
                .map(|(network, ip)| pb::NetworkAddress {
                    network: (*network).into(),
                    address: match ip.parse::<IpAddr>().unwrap() {
                        IpAddr::V4(v4) => v4.octets().to_vec(),
                        IpAddr::V6(v6) => v6.octets().to_vec(),
                    },
                    length: None,
                })
                .collect(),
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 8080,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn state() -> State {
        let mut state = State::new();
        for s in [
            service(
                "reviews",
                "shop",
                "reviews.shop.svc.cluster.local",
                &[("", "10.96.0.10"), ("", "fd00::10"), ("net2", "10.97.0.10")],
            ),
            service("api", "ext", "api.example.com", &[("", "240.240.0.1")]),
            service(
                "db",
                "other",
                "db.other.svc.cluster.local",
                &[("", "10.96.0.20")],
            ),
        ] {
            state.upsert_service(convert::service(s).unwrap());
        }
        let mut private = service(
            "secret",
            "other",
            "secret.other.svc.cluster.local",
            &[("", "10.96.0.30")],
        );
        private.visibility = pb::service::Visibility::Namespace as i32;
        state.upsert_service(convert::service(private).unwrap());
        state
    }

    const SHOP: Asker<'static> = Asker {
        namespace: "shop",
        network: "",
    };

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn every_form_a_pods_resolver_sends_finds_the_service() {
        let state = state();
        let both = ips(&["10.96.0.10", "fd00::10"]);
        for name in [
            "reviews.shop.svc.cluster.local.",
            "REVIEWS.shop.svc.cluster.local",
            "reviews",
            "reviews.shop",
            "reviews.shop.svc",
            // Short names with a search domain appended by the resolver.
            "reviews.shop.svc.cluster.local",
            "reviews.shop.shop.svc.cluster.local",
            "reviews.shop.svc.cluster.local.cluster.local",
            "reviews.shop.svc.svc.cluster.local",
        ] {
            assert_eq!(
                find(&state, name, SHOP, "cluster.local"),
                Some(both.clone()),
                "{name}"
            );
        }
    }

    #[test]
    fn other_namespaces_need_the_namespace_and_private_services_stay_private() {
        let state = state();
        assert_eq!(find(&state, "db", SHOP, "cluster.local"), None);
        assert_eq!(
            find(&state, "db.other", SHOP, "cluster.local"),
            Some(ips(&["10.96.0.20"]))
        );
        assert_eq!(
            find(
                &state,
                "secret.other.svc.cluster.local",
                SHOP,
                "cluster.local"
            ),
            None
        );
        let other = Asker {
            namespace: "other",
            network: "",
        };
        assert_eq!(
            find(&state, "secret", other, "cluster.local"),
            Some(ips(&["10.96.0.30"]))
        );
    }

    #[test]
    fn service_entry_hosts_and_the_askers_network() {
        let state = state();
        assert_eq!(
            find(&state, "api.example.com", SHOP, "cluster.local"),
            Some(ips(&["240.240.0.1"]))
        );
        let net2 = Asker {
            namespace: "shop",
            network: "net2",
        };
        assert_eq!(
            find(
                &state,
                "reviews.shop.svc.cluster.local",
                net2,
                "cluster.local"
            ),
            Some(ips(&["10.97.0.10"]))
        );
        // A service with no VIP on this network is still a mesh name: NODATA, not a forward.
        assert_eq!(
            find(&state, "api.example.com", net2, "cluster.local"),
            Some(Vec::new())
        );
    }

    #[test]
    fn names_outside_the_mesh_are_not_found() {
        let state = state();
        for name in [
            "example.org",
            "kubernetes.default",
            "",
            ".",
            "reviews.other",
            "pod-0.reviews.shop.svc.cluster.local",
        ] {
            assert_eq!(find(&state, name, SHOP, "cluster.local"), None, "{name}");
        }
    }
}
