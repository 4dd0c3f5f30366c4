//! The data-path benchmark: the same load over three paths, side by side, on one topology.
//!
//! - **direct**: `plain1` (node1) → `plain2` (node2), neither enrolled: the kernel alone, the
//!   baseline every other figure is compared with;
//! - **same-node**: `client` → `local`, both enrolled on node1: captured and delivered by
//!   node1's mesh-node without TLS;
//! - **cross-node**: `client` (node1) → `server` (node2), both enrolled: captured on node1,
//!   carried in an HBONE tunnel (mutual TLS, HTTP/2 CONNECT) and delivered by node2's mesh-node;
//! - **cross-cluster**: `client` (node1) → the VIP of `far`, whose one endpoint is on node3, in
//!   another network (`net2`) that node1 and node2 have no route into: captured on node1, double
//!   HBONE to the east-west gateway `gw` (mesh-node in gateway mode), relayed to node3's
//!   mesh-node, delivered; the inner TLS resumes earlier sessions;
//! - **cross-cluster, full TLS**: the same from `client2` (node2), whose mesh-node runs with
//!   `--inner-tls-resumption false`: every inner connection pays a full handshake;
//! - **ztunnel** (only with `--compare-ztunnel PATH`): `zclient` (node1) → `zserver` (node2)
//!   through Istio's ztunnel in each pod (see [`ztunnel`]): the cross-node path, another proxy.
//!
//! The load comes from `loadgen` (this package) running inside the pods, against a `loadgen
//! serve` in each server pod. Every figure is taken `runs` times, the paths interleaved within
//! each run so that drift on a shared machine affects them alike; a figure is reported as the
//! median with min–max. Memory is measured first, on freshly started mesh-nodes, so that what
//! the allocator kept from earlier load does not count.
mod measure;
mod proc;
mod report;
pub mod soak;
mod ztunnel;

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

pub use proc::proc_rss_kib;
pub use report::{Compare, Machine, Metric, Report, Stat, markdown};

use crate::{NodeSpec, PodSpec, Server, Topology, podapp::sibling_binary, topology::sysctl};
use measure::{Bench, Found};
use proc::raise_open_file_limit;
use report::metric_defs;

/// The port `loadgen serve` listens on in every server pod.
pub const PORT: u16 = 9000;

/// What to measure and how long.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub runs: usize,
    #[serde(serialize_with = "as_millis")]
    pub warmup: Duration,
    #[serde(serialize_with = "as_millis")]
    pub duration: Duration,
    /// Requests per second of the latency test, spread over `latency_conns` connections.
    pub latency_rate: u32,
    pub latency_conns: usize,
    /// Client threads of the connection-rate test, each opening one connection at a time.
    pub connrate_threads: usize,
    /// Open-connection counts at which mesh-node's resident memory is read.
    pub held: Vec<usize>,
    /// The load peak after which memory must be given back: this many connections are
    /// opened, then closed, and memory is read `after_peak` later.
    pub peak: usize,
    #[serde(serialize_with = "as_millis")]
    pub after_peak: Duration,
    /// Extra `mesh-node run` arguments (experiments: `--workers 1`, …).
    pub mesh_args: Vec<String>,
    /// Paths and tests to run, and whether to measure memory (all, by default; fewer for
    /// quick experiments).
    #[serde(serialize_with = "route_keys")]
    pub routes: Vec<Route>,
    pub tests: Vec<Test>,
    pub memory: bool,
    /// A ztunnel binary to run on the cross-node path beside mesh-node (`--compare-ztunnel`).
    pub ztunnel: Option<PathBuf>,
    #[serde(skip)]
    pub out_dir: PathBuf,
    /// Output file stem in `out_dir`.
    #[serde(skip)]
    pub name: String,
}

fn route_keys<S: serde::Serializer>(routes: &[Route], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(routes.iter().map(|r| r.key()))
}

/// One of the timed tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Test {
    Throughput,
    Latency,
    ConnRate,
}

impl Test {
    pub const ALL: [Test; 3] = [Test::Throughput, Test::Latency, Test::ConnRate];

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "throughput" => Test::Throughput,
            "latency" => Test::Latency,
            "connrate" => Test::ConnRate,
            other => bail!("unknown test {other:?} (throughput, latency, connrate)"),
        })
    }
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl Config {
    /// The real measurement: about five minutes on two cores.
    pub fn full(out_dir: PathBuf) -> Self {
        Self {
            runs: 5,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(4),
            latency_rate: 1000,
            latency_conns: 4,
            connrate_threads: 4,
            held: vec![1000, 10_000],
            peak: 5000,
            after_peak: Duration::from_secs(60),
            mesh_args: Vec::new(),
            routes: Route::ALL.to_vec(),
            tests: Test::ALL.to_vec(),
            memory: true,
            ztunnel: None,
            out_dir,
            name: "datapath".into(),
        }
    }

    /// Every code path of the benchmark in seconds, for CI: the figures mean nothing.
    pub fn smoke(out_dir: PathBuf) -> Self {
        Self {
            runs: 1,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(300),
            latency_rate: 200,
            latency_conns: 2,
            connrate_threads: 2,
            held: vec![20, 200],
            peak: 200,
            after_peak: Duration::from_secs(1),
            name: "datapath-smoke".into(),
            ..Self::full(out_dir)
        }
    }

    fn settle(&self) -> Duration {
        (self.warmup / 2).max(Duration::from_millis(100))
    }
}

/// One of the measured paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    Direct,
    SameNode,
    CrossNode,
    CrossCluster,
    CrossClusterFullTls,
    /// Istio's ztunnel on the cross-node path.
    Ztunnel,
}

/// The VIP of the service `far`, whose endpoint is in the other network.
pub const FAR_VIP: [u8; 4] = [10, 96, 3, 10];
const FAR_HOST: &str = "far.default.svc.cluster.local";

impl Route {
    /// mesh-node's paths and the baseline: what a run measures by default.
    pub const ALL: [Route; 5] = [
        Route::Direct,
        Route::SameNode,
        Route::CrossNode,
        Route::CrossCluster,
        Route::CrossClusterFullTls,
    ];

    /// Every path, ztunnel's included, in table order.
    pub const EVERY: [Route; 6] = [
        Route::Direct,
        Route::SameNode,
        Route::CrossNode,
        Route::Ztunnel,
        Route::CrossCluster,
        Route::CrossClusterFullTls,
    ];

    pub fn parse(name: &str) -> Result<Self> {
        Route::EVERY
            .into_iter()
            .find(|r| r.key() == name)
            .with_context(|| {
                format!(
                    "unknown path {name:?} (direct, same-node, cross-node, cross-cluster, \
                     cross-cluster-full-tls, ztunnel)"
                )
            })
    }

    pub fn key(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::SameNode => "same-node",
            Route::CrossNode => "cross-node",
            Route::CrossCluster => "cross-cluster",
            Route::CrossClusterFullTls => "cross-cluster-full-tls",
            Route::Ztunnel => "ztunnel",
        }
    }

    fn heading(self) -> &'static str {
        match self {
            Route::Direct => "direct (no mesh)",
            Route::SameNode => "same-node",
            Route::CrossNode => "cross-node HBONE",
            Route::CrossCluster => "cross-cluster via gateway",
            Route::CrossClusterFullTls => "cross-cluster, no inner resumption",
            Route::Ztunnel => "ztunnel HBONE (cross-node)",
        }
    }

    fn client(self) -> &'static str {
        match self {
            Route::Direct => "plain1",
            Route::SameNode | Route::CrossNode | Route::CrossCluster => "client",
            Route::CrossClusterFullTls => "client2",
            Route::Ztunnel => ztunnel::CLIENT,
        }
    }

    fn server(self) -> &'static str {
        match self {
            Route::Direct => "plain2",
            Route::SameNode => "local",
            Route::CrossNode => "server",
            Route::CrossCluster | Route::CrossClusterFullTls => "far",
            Route::Ztunnel => ztunnel::SERVER,
        }
    }

    /// The nodes whose mesh-node carries this path's traffic (the gateway's included).
    fn mesh_nodes(self) -> &'static [&'static str] {
        match self {
            Route::Direct | Route::Ztunnel => &[],
            Route::SameNode => &["node1"],
            Route::CrossNode => &["node1", "node2"],
            Route::CrossCluster => &["node1", "gw", "node3"],
            Route::CrossClusterFullTls => &["node2", "gw", "node3"],
        }
    }

    /// What the source node's access line says of this path's connections.
    fn logged_route(self) -> Option<&'static str> {
        match self {
            Route::Direct | Route::Ztunnel => None,
            Route::SameNode => Some("route=local"),
            Route::CrossNode => Some("route=hbone"),
            Route::CrossCluster | Route::CrossClusterFullTls => Some("route=gateway"),
        }
    }
}

/// The mesh state every node and the gateway read: the pods as HBONE workloads (`far` on
/// network `net2`, behind the gateway), the gateway's own workload, and the service `far`.
fn state_yaml(topo: &Topology) -> String {
    let gateway = topo.link_ip("gw");
    let mut yaml = String::from("workloads:\n");
    for node in &topo.nodes {
        for pod in &node.pods {
            let protocol = if pod.enrolled { "HBONE" } else { "NONE" };
            yaml.push_str(&format!(
                "  - name: {}\n    namespace: default\n    serviceAccount: {}\n    addresses: [{}]\n    node: {}\n    tunnelProtocol: {protocol}\n",
                pod.name, pod.name, pod.ip, node.name
            ));
            if pod.name == "far" {
                yaml.push_str(&format!(
                    "    network: net2\n    networkGateway: {{network: net2, address: {gateway}}}\n    services: {{default/{FAR_HOST}: [{{servicePort: {PORT}, targetPort: {PORT}}}]}}\n"
                ));
            }
        }
    }
    yaml.push_str(&format!(
        "  - uid: NetworkGateway/net2/{gateway}/15008\n    name: istio-eastwestgateway\n    namespace: istio-system\n    serviceAccount: istio-eastwestgateway\n    addresses: [{gateway}]\n    network: net2\n    tunnelProtocol: HBONE\n"
    ));
    let vip = std::net::Ipv4Addr::from(FAR_VIP);
    yaml.push_str(&format!(
        "services:\n  - name: far\n    namespace: default\n    hostname: {FAR_HOST}\n    addresses: [{vip}, {{network: net2, address: {vip}}}]\n    ports: [{{servicePort: {PORT}, targetPort: {PORT}}}]\n"
    ));
    yaml
}

/// Runs the benchmark, writes `<out_dir>/<name>.json` and `.md`, and returns the report.
pub fn run(config: &Config) -> Result<Report> {
    let open_files = raise_open_file_limit();
    let with_ztunnel = config.routes.contains(&Route::Ztunnel);
    ensure!(
        !with_ztunnel || config.ztunnel.is_some(),
        "the ztunnel path needs a ztunnel binary: --compare-ztunnel PATH"
    );
    let mut node1 = vec![
        PodSpec::enrolled("client"),
        PodSpec::enrolled("local"),
        PodSpec::plain("plain1"),
    ];
    let mut node2 = vec![
        PodSpec::enrolled("server"),
        PodSpec::plain("plain2"),
        PodSpec::enrolled("client2"),
    ];
    if with_ztunnel {
        node1.push(PodSpec::plain(ztunnel::CLIENT));
        node2.push(PodSpec::plain(ztunnel::SERVER));
    }
    let topo = Topology::build_routed(
        &[
            NodeSpec {
                name: "node1",
                pods: node1,
            },
            NodeSpec {
                name: "node2",
                pods: node2,
            },
            NodeSpec {
                name: "node3",
                pods: vec![PodSpec::enrolled("far")],
            },
            NodeSpec {
                name: "gw",
                pods: vec![],
            },
        ],
        // node3 is another network: reached through the gateway only.
        |from, to| !(to == "node3" && (from == "node1" || from == "node2")),
    )
    .context("build the benchmark topology")?;
    fs::write(topo.state_file(), state_yaml(&topo)).context("write the mesh state")?;
    // Thousands of short connections per second: ports in TIME_WAIT must be reusable.
    for pod in topo.nodes.iter().flat_map(|n| &n.pods) {
        sysctl(&pod.netns, "net.ipv4.tcp_tw_reuse=1")?;
        sysctl(&pod.netns, "net.ipv4.ip_local_port_range=1024 65000")?;
    }
    if with_ztunnel {
        ztunnel::redirect_outbound(&topo)?;
    }
    let loadgen = sibling_binary("loadgen", "LOADGEN_BIN")?;
    let servers: &[&str] = if with_ztunnel {
        &["local", "server", "plain2", "far", ztunnel::SERVER]
    } else {
        &["local", "server", "plain2", "far"]
    };
    let _servers = servers
        .iter()
        .copied()
        .map(|name| {
            let pod = topo.pod(name);
            Server::start_program(
                &loadgen,
                &pod.netns_path(),
                &pod.cgroup,
                SocketAddr::from((pod.ip, PORT)),
            )
            .with_context(|| format!("start loadgen serve in {name}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let bench = Bench {
        config,
        topo: &topo,
        loadgen,
    };
    let mut found = Found::default();

    if config.memory {
        // The full-TLS variant holds connections the same way as the resuming one.
        for route in config
            .routes
            .iter()
            .copied()
            .filter(|r| !matches!(r, Route::Direct | Route::CrossClusterFullTls))
        {
            bench.memory(route, open_files, &mut found)?;
        }
    }
    let meshes = bench.start_meshes()?;
    for run in 1..=config.runs {
        for &route in &config.routes {
            let tag = format!("run {run}/{} {}", config.runs, route.key());
            for &test in &config.tests {
                match test {
                    Test::Throughput => {
                        for streams in [1, 8] {
                            bench.throughput(&tag, route, streams, &meshes, &mut found)?;
                        }
                    }
                    Test::Latency => bench.latency(&tag, route, &meshes, &mut found)?,
                    Test::ConnRate => bench.connrate(&tag, route, &mut found)?,
                }
            }
        }
    }
    bench.check_routes(&meshes)?;
    drop(meshes);

    let Found {
        mut samples,
        errors,
        notes,
    } = found;
    let report = Report {
        machine: Machine::read(),
        config: config.clone(),
        metrics: metric_defs(config)
            .into_iter()
            .map(|(key, label, unit, compare)| {
                let paths = Route::EVERY
                    .into_iter()
                    .filter_map(|route| {
                        Stat::of(samples.take(&key, route)).map(|stat| (route.key(), stat))
                    })
                    .collect();
                Metric {
                    key,
                    label,
                    unit,
                    compare,
                    paths,
                }
            })
            .collect(),
        errors,
        notes,
    };
    write_report(&config.out_dir, &config.name, &report, &markdown(&report))?;
    Ok(report)
}

/// Writes a report as `<out_dir>/<name>.json` and its Markdown as `<name>.md`.
pub(crate) fn write_report(
    out_dir: &Path,
    name: &str,
    report: &impl Serialize,
    markdown: &str,
) -> Result<()> {
    fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let json = out_dir.join(format!("{name}.json"));
    fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("write {}", json.display()))?;
    let md = out_dir.join(format!("{name}.md"));
    fs::write(&md, markdown).with_context(|| format!("write {}", md.display()))?;
    Ok(())
}
