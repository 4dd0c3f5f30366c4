//! Pods enrolled on this node: what a pod is (a leaf type the proxy, telemetry and
//! authorization share), and the registry of local pods by address. The enroller (`enroll`)
//! fills the registry; nothing here depends on it.
use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock},
};

use crate::{identity::Identity, netns::NetNs};

/// A pod to enroll, whatever the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod's network namespace file (`/run/netns/…`, `/proc/<pid>/ns/net`, …).
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    /// Its DNS queries go to mesh-node's DNS proxy (when DNS capture is on at all).
    pub dns_capture: bool,
}

impl PodSpec {
    /// `namespace/name`, unique per cluster.
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for PodSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An enrolled pod as the proxy sees it.
#[derive(Debug)]
pub struct Pod {
    pub spec: PodSpec,
    pub identity: Identity,
    pub netns: NetNs,
    pub netns_cookie: u64,
    pub id: u32,
    /// The families for which mesh-node connects to the application from the client's
    /// address (see `source_routing`); none when the mode is off or could not be set up.
    pub original_source: OriginalSource,
}

/// Which address families of a pod deliver from the client's address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalSource {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl OriginalSource {
    pub fn covers(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(_) => self.ipv4,
            IpAddr::V6(_) => self.ipv6,
        }
    }
}

impl Pod {
    /// `ip` is one of the pod's addresses.
    pub fn owns(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.spec.ips.iter().any(|own| own.to_canonical() == ip)
    }

    /// Its address of `dst`'s family (what a connection to `dst` leaves with), else its
    /// primary one.
    pub fn ip_for(&self, dst: IpAddr) -> IpAddr {
        let v4 = dst.to_canonical().is_ipv4();
        self.spec
            .ips
            .iter()
            .map(|ip| ip.to_canonical())
            .find(|ip| ip.is_ipv4() == v4)
            .unwrap_or_else(|| self.primary_ip())
    }

    /// The address its connections leave with (a pod is enrolled only once it has one).
    pub fn primary_ip(&self) -> IpAddr {
        self.spec
            .ips
            .first()
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
}

/// Pods enrolled on this node, by address.
#[derive(Default)]
pub struct LocalPods {
    by_ip: RwLock<HashMap<IpAddr, Arc<Pod>>>,
}

impl LocalPods {
    pub fn get(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        self.by_ip
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ip.to_canonical())
            .cloned()
    }

    pub fn insert(&self, pod: &Arc<Pod>) {
        let mut map = self.by_ip.write().unwrap_or_else(PoisonError::into_inner);
        for ip in &pod.spec.ips {
            map.insert(ip.to_canonical(), pod.clone());
        }
    }

    pub fn remove(&self, pod: &Pod) {
        let mut map = self.by_ip.write().unwrap_or_else(PoisonError::into_inner);
        for ip in &pod.spec.ips {
            if map.get(&ip.to_canonical()).is_some_and(|p| p.id == pod.id) {
                map.remove(&ip.to_canonical());
            }
        }
    }
}
