//! The index the proxy queries: workloads by uid and by (network, IP), services by key and by
//! (network, VIP), each service's endpoints, and the policies.
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use super::{Policy, Service, Workload};

/// What an address the application connected to turned out to be.
#[derive(Clone, Debug)]
pub enum Destination {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
}

/// The mesh as the sources last described it.
#[derive(Debug, Default)]
pub struct State {
    workloads: HashMap<String, Arc<Workload>>,
    workload_addrs: HashMap<(String, IpAddr), Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    service_vips: HashMap<(String, IpAddr), Arc<Service>>,
    /// Service key → endpoint uid → workload. A workload may name a service that has not
    /// arrived yet; its endpoints are waiting here when it does.
    endpoints: HashMap<String, HashMap<String, Arc<Workload>>>,
    policies: HashMap<String, Arc<Policy>>,
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the workload with this uid; addresses and services it no longer has are
    /// let go.
    pub fn upsert_workload(&mut self, workload: Workload) {
        self.remove_workload(&workload.uid);
        let workload = Arc::new(workload);
        for ip in &workload.addresses {
            self.workload_addrs
                .insert((workload.network.clone(), *ip), workload.clone());
        }
        for service in workload.services.keys() {
            self.endpoints
                .entry(service.clone())
                .or_default()
                .insert(workload.uid.clone(), workload.clone());
        }
        self.workloads.insert(workload.uid.clone(), workload);
    }

    pub fn remove_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.workloads.remove(uid)?;
        for ip in &old.addresses {
            let key = (old.network.clone(), *ip);
            if self
                .workload_addrs
                .get(&key)
                .is_some_and(|w| w.uid == old.uid)
            {
                self.workload_addrs.remove(&key);
            }
        }
        for service in old.services.keys() {
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
    pub fn upsert_service(&mut self, service: Service) {
        let key = service.key();
        self.remove_service(&key);
        let service = Arc::new(service);
        for (network, ip) in &service.vips {
            self.service_vips
                .insert((network.clone(), *ip), service.clone());
        }
        self.services.insert(key, service);
    }

    pub fn remove_service(&mut self, key: &str) -> Option<Arc<Service>> {
        let old = self.services.remove(key)?;
        for vip in &old.vips {
            if self.service_vips.get(vip).is_some_and(|s| s.key() == key) {
                self.service_vips.remove(vip);
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
        let key = format!("{}/{}", policy.namespace, policy.name);
        self.policies.insert(key, Arc::new(policy));
    }

    pub fn remove_policy(&mut self, key: &str) -> bool {
        self.policies.remove(key).is_some()
    }

    /// The service or workload at `ip` on `network`. Service VIPs win: a VIP is never also a
    /// workload's address.
    pub fn lookup(&self, network: &str, ip: IpAddr) -> Option<Destination> {
        let key = (network.to_owned(), ip.to_canonical());
        if let Some(service) = self.service_vips.get(&key) {
            return Some(Destination::Service(service.clone()));
        }
        self.workload_addrs
            .get(&key)
            .map(|w| Destination::Workload(w.clone()))
    }

    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        self.workload_addrs
            .get(&(network.to_owned(), ip.to_canonical()))
            .cloned()
    }

    pub fn workload(&self, uid: &str) -> Option<Arc<Workload>> {
        self.workloads.get(uid).cloned()
    }

    pub fn service(&self, key: &str) -> Option<Arc<Service>> {
        self.services.get(key).cloned()
    }

    /// The workloads that declare themselves endpoints of the service `key`.
    pub fn endpoints(&self, key: &str) -> impl Iterator<Item = &Arc<Workload>> {
        self.endpoints.get(key).into_iter().flat_map(|e| e.values())
    }

    pub fn policy(&self, key: &str) -> Option<Arc<Policy>> {
        self.policies.get(key).cloned()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.values()
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
