//! The index the proxy queries: workloads by uid and by (network, IP), services by key and by
//! (network, VIP), each service's endpoints, and the policies.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use super::{NetworkMode, Policy, Service, Workload};
use crate::authz::{Cidr, Scope};

/// What an address the application connected to turned out to be.
#[derive(Clone, Debug)]
pub enum Destination {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
}

/// Addresses per network: network name → IP → entry. Two levels so that a lookup borrows the
/// network name instead of building a key, and each network's name is stored once.
type ByAddress<T> = HashMap<Arc<str>, HashMap<IpAddr, Arc<T>>>;

impl Workload {
    /// The addresses the workload is found by: none for a host-network workload.
    fn indexed_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let own = self.network_mode != NetworkMode::HostNetwork;
        self.addresses.iter().copied().filter(move |_| own)
    }
}

fn addr_get<'a, T>(map: &'a ByAddress<T>, network: &str, ip: IpAddr) -> Option<&'a Arc<T>> {
    map.get(network)?.get(&ip.to_canonical())
}

fn addr_insert<T>(map: &mut ByAddress<T>, network: &Arc<str>, ip: IpAddr, value: Arc<T>) {
    map.entry(network.clone()).or_default().insert(ip, value);
}

/// Removes the entry at (network, ip) if `owned` says it is the one being removed.
fn addr_remove<T>(map: &mut ByAddress<T>, network: &str, ip: IpAddr, owned: impl Fn(&T) -> bool) {
    if let Some(ips) = map.get_mut(network) {
        if ips.get(&ip).is_some_and(|v| owned(v)) {
            ips.remove(&ip);
        }
        if ips.is_empty() {
            map.remove(network);
        }
    }
}

/// Service VIPs of one network: single addresses (several services may share one, such as
/// ServiceEntries of different namespaces, each visible only in its own), and CIDR blocks.
#[derive(Debug, Default)]
struct NetworkVips {
    hosts: HashMap<IpAddr, Vec<Arc<Service>>>,
    ranges: Vec<(Cidr, Arc<Service>)>,
}

impl NetworkVips {
    fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.ranges.is_empty()
    }

    /// The service a workload in `namespace` reaches at `ip`: a single-address VIP before a
    /// block, a longer block before a shorter one; among equals one of the caller's namespace,
    /// then the first by key. Services it cannot see are skipped. No allocation: this runs for
    /// every outbound connection.
    fn find<'a>(&'a self, ip: IpAddr, namespace: Option<&str>) -> Option<&'a Arc<Service>> {
        let visible = |s: &Arc<Service>| namespace.is_none_or(|ns| s.is_visible_to(ns));
        let own = |s: &Arc<Service>| namespace.is_some_and(|ns| *s.namespace == *ns);
        // The best of `(prefix length, service)` candidates, the first among equals.
        let best = |candidates: &mut dyn Iterator<Item = (u8, &'a Arc<Service>)>| {
            let mut best: Option<((u8, bool), &'a Arc<Service>)> = None;
            for (prefix, service) in candidates {
                let rank = (prefix, own(service));
                if best.is_none_or(|(top, _)| rank > top) {
                    best = Some((rank, service));
                }
            }
            best.map(|(_, service)| service)
        };
        if let Some(services) = self.hosts.get(&ip) {
            let mut at = services.iter().filter(|s| visible(s)).map(|s| (0, s));
            if let Some(found) = best(&mut at) {
                return Some(found);
            }
        }
        let mut covering = self
            .ranges
            .iter()
            .filter(|(cidr, s)| cidr.contains(ip) && visible(s))
            .map(|(cidr, s)| (cidr.prefix(), s));
        best(&mut covering)
    }
}

/// The mesh as the sources last described it.
#[derive(Debug, Default)]
pub struct State {
    /// Keyed by the workload's own uid allocation.
    workloads: HashMap<Arc<str>, Arc<Workload>>,
    /// Workloads with their own network namespace, by address; host-network ones share the
    /// node's and are found by uid only.
    workload_addrs: ByAddress<Workload>,
    services: HashMap<Arc<str>, Arc<Service>>,
    service_vips: HashMap<Arc<str>, NetworkVips>,
    /// Hostname → keys ("namespace/hostname") of the services with it: a gateway routes the
    /// `hostname:port` of a CONNECT, and a node delivers one, by it.
    service_hostnames: HashMap<Box<str>, BTreeSet<Arc<str>>>,
    /// Service key → endpoint uid → workload. A workload may name a service that has not
    /// arrived yet; its endpoints are waiting here when it does.
    endpoints: HashMap<Arc<str>, HashMap<Arc<str>, Arc<Workload>>>,
    policies: HashMap<String, Arc<Policy>>,
    /// Keys of GLOBAL policies, and of NAMESPACE policies by namespace (sorted, so that which
    /// policy a log names does not depend on hashing).
    global_policies: BTreeSet<String>,
    namespace_policies: HashMap<String, BTreeSet<String>>,
    /// Moves whenever what a connection's authorization depends on may have changed: a policy,
    /// or a workload's namespace or selecting policies.
    authz_version: u64,
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes room for this many more workloads and services (some may replace ones held).
    pub fn reserve(&mut self, workloads: usize, services: usize) {
        self.workloads.reserve(workloads);
        self.services.reserve(services);
    }

    /// Adds or replaces the workload with this uid; addresses and services it no longer has are
    /// let go. (xDS hands over the `Arc` the workload was converted into: one made here instead
    /// would leave the converted copy's allocation as a hole between the state's own.)
    pub fn upsert_workload(&mut self, workload: impl Into<Arc<Workload>>) {
        let workload = workload.into();
        // What the policy engine reads of a workload: which addresses it has, its namespace,
        // the policies that select it.
        let same_authz = self.workloads.get(&workload.uid).is_some_and(|old| {
            old.namespace == workload.namespace
                && old.authorization_policies == workload.authorization_policies
                && old.network == workload.network
                && old.addresses == workload.addresses
                && old.network_mode == workload.network_mode
        });
        self.unindex_workload(&workload.uid);
        if !same_authz {
            self.authz_version += 1;
        }
        for ip in workload.indexed_addresses() {
            addr_insert(
                &mut self.workload_addrs,
                &workload.network,
                ip,
                workload.clone(),
            );
        }
        for (service, _) in &workload.services {
            self.endpoints
                .entry(service.clone())
                .or_default()
                .insert(workload.uid.clone(), workload.clone());
        }
        self.workloads.insert(workload.uid.clone(), workload);
    }

    pub fn remove_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.unindex_workload(uid)?;
        self.authz_version += 1;
        Some(old)
    }

    fn unindex_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.workloads.remove(uid)?;
        for ip in old.indexed_addresses() {
            addr_remove(&mut self.workload_addrs, &old.network, ip, |w| {
                w.uid == old.uid
            });
        }
        for (service, _) in &old.services {
            if let Some(endpoints) = self.endpoints.get_mut(service) {
                endpoints.remove(uid);
                if endpoints.is_empty() {
                    self.endpoints.remove(service);
                }
            }
        }
        Some(old)
    }

    /// Adds or replaces the service with this "namespace/hostname".
    pub fn upsert_service(&mut self, service: impl Into<Arc<Service>>) {
        let service = service.into();
        self.remove_service(service.key());
        for vip in &service.vips {
            let vips = self.service_vips.entry(vip.network.clone()).or_default();
            if vip.is_host() {
                let at = vips.hosts.entry(vip.cidr.addr()).or_default();
                at.push(service.clone());
                at.sort_by(|a, b| a.key().cmp(b.key()));
            } else {
                vips.ranges.push((vip.cidr, service.clone()));
                vips.ranges.sort_by(|a, b| a.1.key().cmp(b.1.key()));
            }
        }
        self.service_hostnames
            .entry(service.hostname.clone())
            .or_default()
            .insert(service.shared_key().clone());
        self.services.insert(service.shared_key().clone(), service);
    }

    pub fn remove_service(&mut self, key: &str) -> Option<Arc<Service>> {
        let old = self.services.remove(key)?;
        if let Some(keys) = self.service_hostnames.get_mut(&old.hostname) {
            keys.remove(key);
            if keys.is_empty() {
                self.service_hostnames.remove(&old.hostname);
            }
        }
        for vip in &old.vips {
            let Some(vips) = self.service_vips.get_mut(&vip.network) else {
                continue;
            };
            if vip.is_host() {
                if let Some(at) = vips.hosts.get_mut(&vip.cidr.addr()) {
                    at.retain(|s| s.key() != key);
                    if at.is_empty() {
                        vips.hosts.remove(&vip.cidr.addr());
                    }
                }
            } else {
                vips.ranges.retain(|(_, s)| s.key() != key);
            }
            if vips.is_empty() {
                self.service_vips.remove(&vip.network);
            }
        }
        Some(old)
    }

    /// Removes the `istio.workload.Address` resource of this name: a workload uid or a
    /// service's "namespace/hostname".
    pub fn remove_address(&mut self, name: &str) -> bool {
        self.remove_workload(name).is_some() || self.remove_service(name).is_some()
    }

    /// Adds or replaces a policy under "namespace/name".
    pub fn upsert_policy(&mut self, policy: Policy) {
        let key = policy.key();
        self.remove_policy(&key);
        match policy.scope {
            Scope::Global => {
                self.global_policies.insert(key.clone());
            }
            Scope::Namespace => {
                self.namespace_policies
                    .entry(policy.namespace.clone())
                    .or_default()
                    .insert(key.clone());
            }
            // Found through the workloads that name them.
            Scope::WorkloadSelector => {}
        }
        self.policies.insert(key, Arc::new(policy));
        self.authz_version += 1;
    }

    pub fn remove_policy(&mut self, key: &str) -> bool {
        let Some(old) = self.policies.remove(key) else {
            return false;
        };
        self.global_policies.remove(key);
        if let Some(keys) = self.namespace_policies.get_mut(&old.namespace) {
            keys.remove(key);
            if keys.is_empty() {
                self.namespace_policies.remove(&old.namespace);
            }
        }
        self.authz_version += 1;
        true
    }

    /// The policies that may apply to a workload in `namespace` selected by the
    /// WORKLOAD_SELECTOR policies `selected_by`: GLOBAL, then its namespace's, then those.
    pub fn policies_for<'a>(
        &'a self,
        namespace: &str,
        selected_by: &'a [Arc<str>],
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        let namespaced = self.namespace_policies.get(namespace).into_iter().flatten();
        self.global_policies
            .iter()
            .chain(namespaced)
            .map(String::as_str)
            .chain(selected_by.iter().map(|key| &**key))
            .filter_map(|key| self.policies.get(key).map(|p| &**p))
    }

    /// Changes whenever a connection's authorization may have changed.
    pub fn authz_version(&self) -> u64 {
        self.authz_version
    }

    /// The service or workload at `ip` on `network`, as a workload in `namespace` sees it
    /// (`None`: whoever asks, every service visible). Service VIPs win: a VIP is never also a
    /// workload's address.
    pub fn lookup(
        &self,
        network: &str,
        ip: IpAddr,
        namespace: Option<&str>,
    ) -> Option<Destination> {
        if let Some(service) = self.service_at(network, ip, namespace) {
            return Some(Destination::Service(service));
        }
        self.workload_by_ip(network, ip).map(Destination::Workload)
    }

    /// The service whose VIP (or VIP block) holds `ip` on `network`, visible to `namespace`.
    pub fn service_at(
        &self,
        network: &str,
        ip: IpAddr,
        namespace: Option<&str>,
    ) -> Option<Arc<Service>> {
        self.service_vips
            .get(network)?
            .find(ip.to_canonical(), namespace)
            .cloned()
    }

    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        addr_get(&self.workload_addrs, network, ip).cloned()
    }

    pub fn workload(&self, uid: &str) -> Option<Arc<Workload>> {
        self.workloads.get(uid).cloned()
    }

    pub fn service(&self, key: &str) -> Option<Arc<Service>> {
        self.services.get(key).cloned()
    }

    /// The workloads that declare themselves endpoints of the service `key`.
    /// The services with this hostname, in key order (one, unless the same host is declared
    /// in several namespaces).
    pub fn services_by_hostname<'a>(
        &'a self,
        hostname: &str,
    ) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.service_hostnames
            .get(hostname)
            .into_iter()
            .flatten()
            .filter_map(|key| self.services.get(&**key))
    }

    pub fn endpoints(&self, key: &str) -> impl Iterator<Item = &Arc<Workload>> {
        self.endpoints.get(key).into_iter().flat_map(|e| e.values())
    }

    pub fn policy(&self, key: &str) -> Option<Arc<Policy>> {
        self.policies.get(key).cloned()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.values()
    }

    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }
}
