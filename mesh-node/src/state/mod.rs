//! What the mesh looks like: workloads by address. Pure data, no I/O; sources (the local file
//! today, xDS later) replace its contents and the proxy asks it questions.
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::identity::Identity;

/// How a workload accepts mesh traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TunnelProtocol {
    /// Plain TCP: not in the mesh (or not capturable); traffic passes through unchanged.
    #[default]
    None,
    /// HBONE on port 15008.
    Hbone,
}

/// A workload (pod or VM) as the control plane describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub addresses: Vec<IpAddr>,
    pub network: String,
    pub node: String,
    pub protocol: TunnelProtocol,
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }
}

/// Workloads by uid and by address.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    by_uid: HashMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
}

impl WorkloadIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the workload with this uid; addresses it no longer has are freed.
    pub fn insert(&mut self, workload: Workload) {
        self.remove(&workload.uid);
        let workload = Arc::new(workload);
        for ip in &workload.addresses {
            self.by_ip.insert(*ip, workload.clone());
        }
        self.by_uid.insert(workload.uid.clone(), workload);
    }

    pub fn remove(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.by_uid.remove(uid)?;
        for ip in &old.addresses {
            if self.by_ip.get(ip).is_some_and(|w| w.uid == old.uid) {
                self.by_ip.remove(ip);
            }
        }
        Some(old)
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical()).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(uid: &str, ips: &[&str]) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "default".into(),
            service_account: "sa".into(),
            trust_domain: "cluster.local".into(),
            addresses: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            network: String::new(),
            node: "node-a".into(),
            protocol: TunnelProtocol::Hbone,
        }
    }

    #[test]
    fn finds_workloads_by_any_address_and_forgets_old_ones() {
        let mut index = WorkloadIndex::new();
        index.insert(workload("a", &["10.0.0.1", "fd00::1"]));
        assert_eq!(index.by_ip("fd00::1".parse().unwrap()).unwrap().uid, "a");
        assert_eq!(
            index.by_ip("::ffff:10.0.0.1".parse().unwrap()).unwrap().uid,
            "a"
        );
        index.insert(workload("a", &["10.0.0.2"]));
        assert!(index.by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert_eq!(index.by_ip("10.0.0.2".parse().unwrap()).unwrap().uid, "a");
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn removing_a_workload_keeps_an_address_another_took_over() {
        let mut index = WorkloadIndex::new();
        index.insert(workload("a", &["10.0.0.1"]));
        index.insert(workload("b", &["10.0.0.1"]));
        index.remove("a");
        assert_eq!(index.by_ip("10.0.0.1".parse().unwrap()).unwrap().uid, "b");
        assert_eq!(
            index
                .by_ip("10.0.0.1".parse().unwrap())
                .unwrap()
                .identity()
                .to_string(),
            "spiffe://cluster.local/ns/default/sa/sa"
        );
    }
}
