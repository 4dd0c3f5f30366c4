//! The `mesh-node` binary: argument parsing and logging set-up around the library.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use mesh_node::{
    admin,
    certs::CertSettings,
    config::{
        DEFAULT_BPFFS_DIR, DEFAULT_TRUST_DOMAIN, DnsSettings, FailMode, GatewayConfig,
        KubeSettings, NodeInfo, RunConfig, Settings,
    },
    error_chain,
    identity::{file_ca::FileCa, istio_ca::IstioCaConfig},
    istiod,
    xds::client::XdsConfig,
};

#[derive(Parser)]
#[command(
    name = "mesh-node",
    about = "eBPF-accelerated node-level service-mesh proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node proxy.
    Run(Box<RunArgs>),
    /// Manage the file-backed certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Inspect the kernel side: hooks, enrolled pods, maps, live connections, redirect decisions.
    /// Read-only; works while mesh-node runs and after it stopped.
    Bpf(BpfArgs),
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new mesh root (ECDSA P-256) to DIR: root-cert.pem and root-key.pem (mode 0600).
    Init {
        /// Directory to write the root to (created if absent; existing roots are not replaced).
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain recorded in the root's subject.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

#[derive(clap::Args)]
struct BpfArgs {
    /// bpffs directory the mesh-node pinned its objects in (its --bpffs).
    #[arg(long, env = "MESH_NODE_BPFFS", default_value = DEFAULT_BPFFS_DIR, global = true)]
    bpffs: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputArg::Table, global = true)]
    output: OutputArg,
    #[command(subcommand)]
    command: BpfCommand,
}

#[derive(Subcommand)]
enum BpfCommand {
    /// Kernel version and features, attached hooks with their links and run counts, fail mode,
    /// decision counters.
    Status,
    /// Enrolled pods: addresses, identity, mesh-node's listeners, inbound capture state.
    Pods,
    /// Each map's type, fill and capacity; `--dump NAME` prints one map's entries decoded.
    Maps {
        /// Map to print (MESH_SOCK_ORIG, sock_orig, …).
        #[arg(long, value_name = "NAME")]
        dump: Option<String>,
    },
    /// Live captured connections with their original destinations.
    Conns {
        /// Only this pod (`namespace/name` or `name`).
        #[arg(long)]
        pod: Option<String>,
    },
    /// Stream redirect decisions as they happen (captured / passed / refused, and why).
    Trace {
        /// Only this pod (`namespace/name` or `name`).
        #[arg(long)]
        pod: Option<String>,
        /// Only connections to or from this port.
        #[arg(long)]
        port: Option<u16>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, value_name = "SECONDS")]
        duration: Option<f64>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputArg {
    Table,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// `node`: the node proxy of the pods on this node. `gateway`: the east-west gateway of
    /// --network (no eBPF, no pods).
    #[arg(long, env = "MESH_NODE_MODE", value_enum, default_value_t = ModeArg::Node)]
    mode: ModeArg,
    /// Gateway mode: where other networks' nodes connect.
    #[arg(
        long,
        env = "MESH_NODE_GATEWAY_LISTEN",
        default_value = "0.0.0.0:15008"
    )]
    gateway_listen: SocketAddr,
    /// Gateway mode: the gateway's identity as NAMESPACE/SERVICE_ACCOUNT (that of its
    /// workload in the control plane's state, which clients verify).
    #[arg(
        long,
        env = "MESH_NODE_GATEWAY_IDENTITY",
        default_value = "istio-system/istio-eastwestgateway"
    )]
    gateway_identity: String,
    /// Static enrollment file (YAML list of pods).
    #[arg(long, env = "MESH_NODE_PODS")]
    pods: Option<PathBuf>,
    /// Enroll this node's pods from the Kubernetes API (namespace and pod label
    /// --enrollment-label), instead of --pods.
    #[arg(long, env = "MESH_NODE_KUBERNETES")]
    kubernetes: bool,
    /// kubeconfig for --kubernetes; default: the pod's service account (or KUBECONFIG).
    #[arg(long, env = "MESH_NODE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The host's /proc, where --kubernetes finds pods' network namespaces (and where a pod
    /// namespace's sysctl is written when mesh-node's own /proc/sys is read-only).
    #[arg(long, env = "MESH_NODE_HOST_PROC", default_value = "/proc")]
    host_proc: PathBuf,
    /// The label (on namespaces and pods) that enables the mesh.
    #[arg(
        long,
        env = "MESH_NODE_ENROLLMENT_LABEL",
        default_value = "istio.io/dataplane-mode"
    )]
    enrollment_label: String,
    /// Its value that enrolls a namespace or a pod.
    #[arg(long, env = "MESH_NODE_ENROLLMENT_ENABLED", default_value = "ambient")]
    enrollment_enabled: String,
    /// Capture enrolled pods' DNS queries (UDP and TCP port 53) and answer mesh names from the
    /// mesh state, forwarding the rest to the pod's resolver. A pod opts out with the
    /// annotation `ambient.istio.io/dns-capture: "false"` (pods file: `dnsCapture: false`).
    #[arg(
        long,
        env = "MESH_NODE_DNS_CAPTURE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    dns_capture: bool,
    /// The cluster's DNS domain (short service names, search domains).
    #[arg(long, env = "MESH_NODE_DNS_DOMAIN", default_value = "cluster.local")]
    dns_domain: String,
    /// Its value that keeps a pod out, whatever its namespace says.
    #[arg(long, env = "MESH_NODE_ENROLLMENT_DISABLED", default_value = "none")]
    enrollment_disabled: String,
    /// cgroup v2 directory to attach the capture hooks to [default: the cgroup2 mount root].
    #[arg(long, env = "MESH_NODE_CGROUP")]
    cgroup: Option<PathBuf>,
    /// bpffs directory for this instance's pinned links and maps.
    #[arg(long, env = "MESH_NODE_BPFFS", default_value = DEFAULT_BPFFS_DIR)]
    bpffs: PathBuf,
    /// What happens to enrolled pods' connections while mesh-node is not serving.
    #[arg(long, env = "MESH_NODE_FAIL_MODE", value_enum, default_value_t = FailModeArg::Open)]
    fail_mode: FailModeArg,
    /// Data-path worker threads [default: one per CPU].
    #[arg(long, env = "MESH_NODE_WORKERS", default_value_t = 0)]
    workers: usize,
    /// HBONE connections to one peer that concurrent tunnels open before they share one (each
    /// connection encrypts on one thread at a time) [default: one per worker thread].
    #[arg(long, env = "MESH_NODE_CONNECTIONS_PER_PEER", default_value_t = 0)]
    connections_per_peer: usize,
    /// File-backed CA directory (from `mesh-node ca init`); without it HBONE is off.
    #[arg(long, env = "MESH_NODE_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// istiod's CA address, host:port (usually istiod.istio-system.svc:15012); workload
    /// certificates come from it. Exclusive with --ca-dir.
    #[arg(long, env = "MESH_NODE_CA_ADDRESS")]
    ca_address: Option<String>,
    /// CA certificate (PEM) of the CA's serving certificate and the mesh root
    /// [default: --xds-root-cert].
    #[arg(long, env = "MESH_NODE_CA_ROOT_CERT")]
    ca_root_cert: Option<PathBuf>,
    /// Name the CA's certificate must carry [default: --xds-server-name, else the host of
    /// --ca-address].
    #[arg(long, env = "MESH_NODE_CA_SERVER_NAME")]
    ca_server_name: Option<String>,
    /// Certificate fetches in flight at once.
    #[arg(long, env = "MESH_NODE_CA_MAX_CONCURRENT", default_value_t = 8)]
    ca_max_concurrent: usize,
    /// Lifetime of workload certificates, in seconds (renewed at half-life).
    #[arg(long, env = "MESH_NODE_CERT_TTL", default_value_t = 86400)]
    cert_ttl: u64,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "MESH_NODE_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Local state file (YAML workloads), used instead of a control plane.
    #[arg(long, env = "MESH_NODE_LOCAL_XDS")]
    local_xds: Option<PathBuf>,
    /// Seconds an inbound HBONE connection has to finish its TLS and HTTP/2 handshakes.
    #[arg(long, env = "MESH_NODE_HANDSHAKE_TIMEOUT", default_value_t = 10)]
    handshake_timeout: u64,
    /// Control plane (istiod) xDS address, host:port (usually istiod.istio-system.svc:15012).
    #[arg(long, env = "MESH_NODE_XDS_ADDRESS")]
    xds_address: Option<String>,
    /// CA certificate (PEM) that signed the control plane's serving certificate.
    #[arg(
        long,
        env = "MESH_NODE_XDS_ROOT_CERT",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    xds_root_cert: PathBuf,
    /// Name the control plane's certificate must carry [default: the host of --xds-address].
    #[arg(long, env = "MESH_NODE_XDS_SERVER_NAME")]
    xds_server_name: Option<String>,
    /// Bearer token file sent to the control plane and the CA (a service-account token).
    #[arg(long, env = "MESH_NODE_XDS_TOKEN_FILE")]
    xds_token_file: Option<PathBuf>,
    /// This cluster's id, sent to the control plane and used for routing preferences.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// The Kubernetes node this mesh-node runs on.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    /// This node's network ("" is the default network).
    #[arg(long, env = "NETWORK", default_value = "")]
    network: String,
    /// mesh-node's own pod name and namespace, for its identity toward the control plane.
    #[arg(long, env = "POD_NAME", default_value = "mesh-node")]
    pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pod_namespace: String,
    /// mesh-node's own IP (INSTANCE_IPS toward the control plane).
    #[arg(long, env = "INSTANCE_IP")]
    instance_ip: Vec<std::net::IpAddr>,
    /// Admin endpoint (config dump, log level); keep it on loopback.
    #[arg(long, env = "MESH_NODE_ADMIN_ADDRESS", default_value = admin::DEFAULT_ADMIN)]
    admin_address: SocketAddr,
    /// Prometheus metrics endpoint (/stats/prometheus).
    #[arg(long, env = "MESH_NODE_METRICS_ADDRESS", default_value = admin::DEFAULT_METRICS)]
    metrics_address: SocketAddr,
    /// Readiness endpoint (/healthz/ready).
    #[arg(long, env = "MESH_NODE_READINESS_ADDRESS", default_value = admin::DEFAULT_READINESS)]
    readiness_address: SocketAddr,
    /// Resume TLS sessions on double HBONE's inner connections (to another network's
    /// endpoints, never pooled): a resumed handshake skips the certificates and signatures.
    #[arg(
        long,
        env = "MESH_NODE_INNER_TLS_RESUMPTION",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    inner_tls_resumption: bool,
    /// Applications see connections from their clients' addresses (same-node and plaintext:
    /// the client's; HBONE: the source pod's), as with a sidecar or ztunnel; false: from the
    /// pod's own address. Needs policy routing in each pod's namespace (no iptables).
    #[arg(
        long,
        env = "MESH_NODE_ORIGINAL_SOURCE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    original_source: bool,
    /// Same-node connections' bytes go from one application's socket straight out of
    /// mesh-node's socket towards the other (`sk_msg`), once mesh-node has accepted, decided
    /// policy and connected, instead of through its relay; ends, policy and telemetry stay in
    /// mesh-node. Every captured socket then runs the kernel's sockmap code.
    #[arg(
        long,
        env = "MESH_NODE_KERNEL_SAME_NODE",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    kernel_same_node: bool,
    /// Seconds open connections may finish after SIGTERM or `POST /drain` (listeners closed,
    /// HBONE connections told GOAWAY at once); what is left then is cut. Fits a 30 s grace period.
    #[arg(long, env = "MESH_NODE_DRAIN_TIMEOUT", default_value_t = 25)]
    drain_timeout: u64,
    /// Seconds to wait for a TCP connect (upstreams, peers' 15008).
    #[arg(long, env = "MESH_NODE_CONNECT_TIMEOUT", default_value_t = 10)]
    connect_timeout: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Node,
    Gateway,
}

#[derive(Clone, Copy, ValueEnum)]
enum FailModeArg {
    /// Let traffic through uncaptured.
    Open,
    /// Refuse new connections.
    Closed,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held until main returns: dropping it flushes the log lines still queued.
    let _log_guard = mesh_node::logging::init();
    match cli.command {
        Command::Version => {
            println!("mesh-node {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Ca(CaCommand::Init { dir, trust_domain }) => {
            match FileCa::init(&dir, &trust_domain) {
                Ok(path) => {
                    println!("mesh root written to {}", path.display());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("mesh-node: error: {}", error_chain(&error));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bpf(args) => bpf(args),
        Command::Run(args) => {
            let args = *args;
            let gateway = match args.mode {
                ModeArg::Node => None,
                ModeArg::Gateway => match args.gateway_identity.split_once('/') {
                    Some((namespace, service_account))
                        if [namespace, service_account].iter().all(|part| {
                            !part.is_empty()
                                && !part.contains('/')
                                && !part.chars().any(char::is_whitespace)
                        }) =>
                    {
                        Some(GatewayConfig {
                            listen: args.gateway_listen,
                            namespace: namespace.to_owned(),
                            service_account: service_account.to_owned(),
                        })
                    }
                    _ => {
                        eprintln!(
                            "mesh-node: error: --gateway-identity {:?}: expected NAMESPACE/SERVICE_ACCOUNT",
                            args.gateway_identity
                        );
                        return ExitCode::FAILURE;
                    }
                },
            };
            let ca = args.ca_address.map(|address| IstioCaConfig {
                target: istiod::Target {
                    address,
                    root_cert: args
                        .ca_root_cert
                        .unwrap_or_else(|| args.xds_root_cert.clone()),
                    server_name: args.ca_server_name.or_else(|| args.xds_server_name.clone()),
                },
                token_file: args.xds_token_file.clone(),
                cluster_id: args.cluster_id.clone(),
                ttl: Duration::from_secs(args.cert_ttl.max(60)),
            });
            let kubernetes = args.kubernetes.then(|| KubeSettings {
                kubeconfig: args.kubeconfig.clone(),
                node_name: args.node_name.clone(),
                host_proc: args.host_proc.clone(),
                label: args.enrollment_label.clone(),
                enabled_value: args.enrollment_enabled.clone(),
                disabled_value: args.enrollment_disabled.clone(),
                own_pod: Some((args.pod_namespace.clone(), args.pod_name.clone())),
            });
            let xds = args.xds_address.map(|address| XdsConfig {
                address,
                root_cert: args.xds_root_cert,
                server_name: args.xds_server_name,
                token_file: args.xds_token_file,
                cluster_id: args.cluster_id.clone(),
                pod_name: args.pod_name,
                pod_namespace: args.pod_namespace,
                node_name: args.node_name.clone(),
                instance_ips: args.instance_ip,
                trust_domain: args.trust_domain.clone(),
            });
            let config = RunConfig {
                pods_file: args.pods,
                host_proc: args.host_proc.clone(),
                drain_timeout: Duration::from_secs(args.drain_timeout),
                kubernetes,
                dns: args.dns_capture.then(|| DnsSettings {
                    domain: args.dns_domain.trim_matches('.').to_ascii_lowercase(),
                }),
                cgroup: args.cgroup,
                bpffs_dir: args.bpffs,
                fail_mode: match args.fail_mode {
                    FailModeArg::Open => FailMode::Open,
                    FailModeArg::Closed => FailMode::Closed,
                },
                worker_threads: args.workers,
                ca_dir: args.ca_dir,
                ca,
                cert_settings: CertSettings {
                    max_concurrent_fetches: args.ca_max_concurrent.max(1),
                    ..CertSettings::default()
                },
                cert_ttl: Duration::from_secs(args.cert_ttl.max(60)),
                trust_domain: args.trust_domain,
                local_xds: args.local_xds,
                node: NodeInfo {
                    node_name: args.node_name,
                    cluster_id: args.cluster_id,
                    network: args.network,
                },
                xds,
                settings: Settings {
                    connect_timeout: Duration::from_secs(args.connect_timeout.max(1)),
                    handshake_timeout: Duration::from_secs(args.handshake_timeout.max(1)),
                    inner_tls_resumption: args.inner_tls_resumption,
                    original_source: args.original_source,
                    kernel_same_node: args.kernel_same_node,
                    connections_per_peer: args.connections_per_peer,
                },
                endpoints: admin::Addresses {
                    admin: args.admin_address,
                    metrics: args.metrics_address,
                    readiness: args.readiness_address,
                },
                gateway,
            };
            match mesh_node::app::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("mesh-node: error: {}", error_chain(&error));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn bpf(args: BpfArgs) -> ExitCode {
    use mesh_node::inspect::{self, Output, TraceFilter};
    let output = match args.output {
        OutputArg::Table => Output::Table,
        OutputArg::Json => Output::Json,
    };
    let dir = args.bpffs.as_path();
    let mut out = std::io::stdout().lock();
    let result = match args.command {
        BpfCommand::Status => inspect::status(dir, output, &mut out),
        BpfCommand::Pods => inspect::pods(dir, output, &mut out),
        BpfCommand::Maps { dump: None } => inspect::maps(dir, output, &mut out),
        BpfCommand::Maps { dump: Some(name) } => inspect::dump(dir, &name, output, &mut out),
        BpfCommand::Conns { pod } => inspect::conns(dir, pod.as_deref(), output, &mut out),
        BpfCommand::Trace {
            pod,
            port,
            count,
            duration,
        } => {
            let duration = match duration.map(Duration::try_from_secs_f64) {
                None => None,
                // A duration the clock cannot add is refused like any other bad value.
                Some(Ok(duration)) if std::time::Instant::now().checked_add(duration).is_some() => {
                    Some(duration)
                }
                Some(_) => {
                    eprintln!(
                        "mesh-node bpf: error: --duration {:?}: not a number of seconds >= 0",
                        duration.unwrap_or_default()
                    );
                    return ExitCode::FAILURE;
                }
            };
            let filter = TraceFilter { pod, port };
            inspect::trace(dir, &filter, count, duration, output, &mut out)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is not an error.
        Err(inspect::InspectError::Write(error))
            if error.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("mesh-node bpf: error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
