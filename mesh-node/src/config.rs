//! Run-time configuration of `mesh-node run`, with the production defaults.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use mesh_common::FailMode;

/// Kubernetes' default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Default directory under bpffs for pinned links and maps.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/mesh-node";

#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Static enrollment file (YAML). `None`: no pods until another source adds them.
    pub pods_file: Option<PathBuf>,
    /// The host's `/proc` (`--host-proc`): where pods' namespaces are found in Kubernetes, and
    /// where a pod namespace's sysctl is written when mesh-node's own `/proc/sys` is read-only
    /// (a container's).
    pub host_proc: PathBuf,
    /// cgroup v2 directory the connect/sock_ops hooks attach to. `None`: the root of the cgroup2
    /// mount found in /proc/self/mounts.
    pub cgroup: Option<PathBuf>,
    /// Directory on bpffs for this instance's pinned links and maps.
    pub bpffs_dir: PathBuf,
    /// What the kernel does with an enrolled pod's connections while mesh-node is not serving.
    pub fail_mode: FailMode,
    /// Data-path worker threads; 0 means one per CPU.
    pub worker_threads: usize,
    /// Directory of the file-backed CA (`mesh-node ca init`). `None`: no workload certificates,
    /// so no HBONE; captured traffic to mesh workloads fails, the rest passes through.
    pub ca_dir: Option<PathBuf>,
    /// istiod's CA; exclusive with `ca_dir`.
    pub ca: Option<crate::identity::istio_ca::IstioCaConfig>,
    /// Bounds and retry pacing of certificate fetches.
    pub cert_settings: crate::certs::CertSettings,
    /// Lifetime of the workload certificates this node signs.
    pub cert_ttl: Duration,
    /// The mesh's SPIFFE trust domain.
    pub trust_domain: String,
    /// Local state file (workloads) used instead of a control plane.
    pub local_xds: Option<PathBuf>,
    /// Data-path timeouts.
    pub settings: Settings,
    /// This node's name, cluster and network.
    pub node: NodeInfo,
    /// The control plane (istiod) to take the mesh state from; exclusive with `local_xds`.
    pub xds: Option<crate::xds::client::XdsConfig>,
    /// Admin (15000), metrics (15020) and readiness (15021) listeners.
    pub endpoints: Addresses,
    /// `Some`: run as the east-west gateway of `node.network` instead of a node proxy.
    pub gateway: Option<GatewayConfig>,
    /// `Some`: enroll this node's pods from the Kubernetes API (exclusive with `pods_file`).
    pub kubernetes: Option<KubeSettings>,
    /// `Some`: enrolled pods' DNS queries go to mesh-node's DNS proxy (pods may opt out).
    pub dns: Option<DnsSettings>,
    /// How long open connections may finish after SIGTERM (or `POST /drain`).
    pub drain_timeout: Duration,
}

/// The pods' DNS proxy.
#[derive(Clone, Debug)]
pub struct DnsSettings {
    /// The cluster's DNS domain, for short service names and search domains.
    pub domain: String,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            domain: "cluster.local".to_owned(),
        }
    }
}

/// Enrollment from the Kubernetes API (`--kubernetes`).
#[derive(Clone, Debug)]
pub struct KubeSettings {
    /// A kubeconfig file; `None`: the in-cluster service account (or `KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    /// Only pods scheduled here are watched (`spec.nodeName`).
    pub node_name: String,
    /// The host's `/proc` (the DaemonSet mounts it), where pods' namespaces are found.
    pub host_proc: PathBuf,
    /// The label on namespaces and pods, its value that enables and the one that opts out.
    pub label: String,
    pub enabled_value: String,
    pub disabled_value: String,
    /// mesh-node's own pod (`namespace`, `name`), never enrolled.
    pub own_pod: Option<(String, String)>,
}

/// The east-west gateway (`mesh-node run --mode gateway`).
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Where other networks' nodes connect (`<address>:15008`).
    pub listen: std::net::SocketAddr,
    /// The identity its certificate carries: the gateway workload's service account, which
    /// clients check the outer TLS against.
    pub namespace: String,
    pub service_account: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            pods_file: None,
            host_proc: PathBuf::from("/proc"),
            cgroup: None,
            bpffs_dir: PathBuf::from(DEFAULT_BPFFS_DIR),
            fail_mode: FailMode::Open,
            worker_threads: 0,
            ca_dir: None,
            ca: None,
            cert_settings: crate::certs::CertSettings::default(),
            cert_ttl: crate::identity::file_ca::DEFAULT_WORKLOAD_TTL,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            local_xds: None,
            settings: Settings::default(),
            node: NodeInfo::default(),
            xds: None,
            endpoints: Addresses::default(),
            gateway: None,
            kubernetes: None,
            dns: Some(DnsSettings::default()),
            drain_timeout: Duration::from_secs(25),
        }
    }
}

/// Timeouts of the data path.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// TCP connect to an upstream or a peer's 15008.
    pub connect_timeout: Duration,
    /// TLS plus HTTP/2 handshake of an inbound HBONE connection.
    pub handshake_timeout: Duration,
    /// Double HBONE's inner TLS resumes earlier sessions with the same identities.
    pub inner_tls_resumption: bool,
    /// Applications see connections from their clients' addresses (else from their own).
    pub original_source: bool,
    /// The kernel carries same-node connections' bytes once mesh-node has set them up.
    pub kernel_same_node: bool,
    /// HBONE connections per peer that concurrent tunnels open before they share one
    /// (0: one per data-path worker thread).
    pub connections_per_peer: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            inner_tls_resumption: true,
            original_source: true,
            kernel_same_node: false,
            connections_per_peer: 0,
        }
    }
}

/// Where this mesh-node runs, for routing preferences of pods the control plane has not
/// described (yet).
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub node_name: String,
    pub cluster_id: String,
    /// The network this node's pods are on ("" is the default network).
    pub network: String,
}

/// Where each endpoint listens.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

/// Istio's ports: admin on loopback only (it can change the log level), metrics and readiness
/// on every address, for Prometheus and the kubelet.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS: &str = "0.0.0.0:15021";

impl Default for Addresses {
    fn default() -> Self {
        let parse = |addr: &str| {
            addr.parse()
                .unwrap_or_else(|_| unreachable!("constant address"))
        };
        Self {
            admin: parse(DEFAULT_ADMIN),
            metrics: parse(DEFAULT_METRICS),
            readiness: parse(DEFAULT_READINESS),
        }
    }
}
