//! The data-path benchmark: the same load over three paths, side by side, on one topology.
//!
//! - **direct**: `plain1` (node1) → `plain2` (node2), neither enrolled: the kernel alone, the
//!   baseline every other figure is compared with;
//! - **same-node**: `client` → `local`, both enrolled on node1: captured and delivered by
//!   node1's mesh-node without TLS;
//! - **cross-node**: `client` (node1) → `server` (node2), both enrolled: captured on node1,
//!   carried in an HBONE tunnel (mutual TLS, HTTP/2 CONNECT) and delivered by node2's mesh-node.
//!
//! The load comes from `loadgen` (this package) running inside the pods, against a `loadgen
//! serve` in each server pod. Every figure is taken `runs` times, the paths interleaved within
//! each run so that drift on a shared machine affects them alike; a figure is reported as the
//! median with min–max. Memory is measured first, on freshly started mesh-nodes, so that what
//! the allocator kept from earlier load does not count.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::{
    MeshNode, NodeSpec, PodSpec, Server, Topology, meshnode,
    podapp::{self, sibling_binary},
    topology::sysctl,
};

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

/// One of the three measured paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    Direct,
    SameNode,
    CrossNode,
}

impl Route {
    pub const ALL: [Route; 3] = [Route::Direct, Route::SameNode, Route::CrossNode];

    pub fn parse(name: &str) -> Result<Self> {
        Route::ALL
            .into_iter()
            .find(|r| r.key() == name)
            .with_context(|| format!("unknown path {name:?} (direct, same-node, cross-node)"))
    }

    pub fn key(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::SameNode => "same-node",
            Route::CrossNode => "cross-node",
        }
    }

    fn heading(self) -> &'static str {
        match self {
            Route::Direct => "direct (no mesh)",
            Route::SameNode => "same-node",
            Route::CrossNode => "cross-node HBONE",
        }
    }

    fn client(self) -> &'static str {
        match self {
            Route::Direct => "plain1",
            Route::SameNode | Route::CrossNode => "client",
        }
    }

    fn server(self) -> &'static str {
        match self {
            Route::Direct => "plain2",
            Route::SameNode => "local",
            Route::CrossNode => "server",
        }
    }

    /// The nodes whose mesh-node carries this path's traffic.
    fn mesh_nodes(self) -> &'static [&'static str] {
        match self {
            Route::Direct => &[],
            Route::SameNode => &["node1"],
            Route::CrossNode => &["node1", "node2"],
        }
    }
}

/// How a path's figure relates to the direct one in the table.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    /// `×0.42`: a rate, as a fraction of direct.
    Ratio,
    /// `+31`: a latency, as what the path adds to direct.
    Added,
    /// Only the mesh has it (mesh-node's CPU and memory).
    MeshOnly,
}

#[derive(Debug, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

impl Stat {
    fn of(mut runs: Vec<f64>) -> Option<Self> {
        if runs.is_empty() {
            return None;
        }
        let unsorted = runs.clone();
        runs.sort_by(f64::total_cmp);
        let n = runs.len();
        let median = if n % 2 == 1 {
            runs[n / 2]
        } else {
            (runs[n / 2 - 1] + runs[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: runs[0],
            max: runs[n - 1],
            runs: unsorted,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Metric {
    pub key: String,
    pub label: String,
    pub unit: &'static str,
    pub compare: Compare,
    /// By path key (`direct`, `same-node`, `cross-node`).
    pub paths: BTreeMap<&'static str, Stat>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub revision: String,
    pub date: String,
    pub mesh_node: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub config: Config,
    pub metrics: Vec<Metric>,
    /// Failed connections or requests, by path and test; empty on a clean run.
    pub errors: Vec<String>,
    /// What could not be measured on this machine, and why.
    pub notes: Vec<String>,
}

impl Report {
    pub fn metric(&self, key: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.key == key)
    }
}

/// Runs the benchmark, writes `<out_dir>/<name>.json` and `.md`, and returns the report.
pub fn run(config: &Config) -> Result<Report> {
    let open_files = raise_open_file_limit();
    let topo = Topology::build(&[
        NodeSpec {
            name: "node1",
            pods: vec![
                PodSpec::enrolled("client"),
                PodSpec::enrolled("local"),
                PodSpec::plain("plain1"),
            ],
        },
        NodeSpec {
            name: "node2",
            pods: vec![PodSpec::enrolled("server"), PodSpec::plain("plain2")],
        },
    ])
    .context("build the benchmark topology")?;
    // Thousands of short connections per second: ports in TIME_WAIT must be reusable.
    for pod in topo.nodes.iter().flat_map(|n| &n.pods) {
        sysctl(&pod.netns, "net.ipv4.tcp_tw_reuse=1")?;
        sysctl(&pod.netns, "net.ipv4.ip_local_port_range=1024 65000")?;
    }
    let loadgen = sibling_binary("loadgen", "LOADGEN_BIN")?;
    let _servers = ["local", "server", "plain2"]
        .into_iter()
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
        for route in config
            .routes
            .iter()
            .copied()
            .filter(|r| *r != Route::Direct)
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
                    Test::Latency => bench.latency(&tag, route, &mut found)?,
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
                let paths = Route::ALL
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
    fs::create_dir_all(&config.out_dir)
        .with_context(|| format!("create {}", config.out_dir.display()))?;
    let json = config.out_dir.join(format!("{}.json", config.name));
    fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", json.display()))?;
    let md = config.out_dir.join(format!("{}.md", config.name));
    fs::write(&md, markdown(&report)).with_context(|| format!("write {}", md.display()))?;
    Ok(report)
}

/// Every metric in table order: key, label, unit, comparison.
fn metric_defs(config: &Config) -> Vec<(String, String, &'static str, Compare)> {
    use Compare::*;
    let mut defs: Vec<(String, String, &'static str, Compare)> = vec![
        ("throughput_1", "throughput, 1 stream", "Gbit/s", Ratio),
        ("throughput_8", "throughput, 8 streams", "Gbit/s", Ratio),
        ("cpu_per_gb_1", "mesh-node CPU, 1 stream", "s/GB", MeshOnly),
        ("cpu_per_gb_8", "mesh-node CPU, 8 streams", "s/GB", MeshOnly),
    ]
    .into_iter()
    .map(|(k, l, u, c)| (k.to_owned(), l.to_owned(), u, c))
    .collect();
    for p in ["p50", "p90", "p99", "max"] {
        defs.push((
            format!("latency_{p}"),
            format!("1 KiB echo at {}/s, {p}", config.latency_rate),
            "µs",
            Added,
        ));
    }
    defs.push(("conn_rate".into(), "new connections".into(), "/s", Ratio));
    for (key, label) in [
        ("connect_p50", "connect() p50"),
        ("connect_p99", "connect() p99"),
        ("exchange_p50", "connect + 1-byte echo p50"),
        ("exchange_p99", "connect + 1-byte echo p99"),
    ] {
        defs.push((key.into(), label.into(), "µs", Added));
    }
    defs.push((
        "rss_idle".into(),
        "mesh-node RSS, idle".into(),
        "MiB",
        MeshOnly,
    ));
    for n in &config.held {
        defs.push((
            format!("rss_{n}"),
            format!("mesh-node RSS, {n} open connections"),
            "MiB",
            MeshOnly,
        ));
    }
    defs.push((
        "rss_peak".into(),
        format!("mesh-node RSS, {} open connections (the peak)", config.peak),
        "MiB",
        MeshOnly,
    ));
    defs.push((
        "rss_after_peak".into(),
        format!(
            "mesh-node RSS, {} s after the peak closed",
            config.after_peak.as_secs_f64()
        ),
        "MiB",
        MeshOnly,
    ));
    defs
}

/// The table: one row per metric, one column per path; `median (min–max)`, then the ratio to
/// direct (`×`) or what the path adds to it (`+`).
pub fn markdown(report: &Report) -> String {
    let m = &report.machine;
    let c = &report.config;
    let mut out = format!(
        "mesh-node data path: {} run{} of {} s each after {} s warm-up; median (min–max); \
         × ratio to direct, + added to direct.\n\
         {}, {} cores, {:.0} GiB, Linux {}; mesh-node {} ({}), {}.\n\n",
        c.runs,
        if c.runs == 1 { "" } else { "s" },
        c.duration.as_secs_f64(),
        c.warmup.as_secs_f64(),
        m.cpu,
        m.cores,
        m.memory_gib,
        m.kernel,
        m.revision,
        m.mesh_node,
        m.date,
    );
    if !c.mesh_args.is_empty() {
        out.push_str(&format!(
            "mesh-node arguments: {}\n\n",
            c.mesh_args.join(" ")
        ));
    }
    out.push_str("| metric |");
    for route in Route::ALL {
        out.push_str(&format!(" {} |", route.heading()));
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(Route::ALL.len()));
    out.push('\n');
    for metric in &report.metrics {
        out.push_str(&format!("| {} ({}) |", metric.label, metric.unit));
        let direct = metric.paths.get(Route::Direct.key());
        for route in Route::ALL {
            let Some(stat) = metric.paths.get(route.key()) else {
                out.push_str(" – |");
                continue;
            };
            let mut cell = format!(
                "{} ({}–{})",
                number(stat.median),
                number(stat.min),
                number(stat.max)
            );
            match (metric.compare, direct, route) {
                (_, _, Route::Direct) | (Compare::MeshOnly, _, _) | (_, None, _) => {}
                (Compare::Ratio, Some(d), _) if d.median > 0.0 => {
                    cell.push_str(&format!(" ×{:.2}", stat.median / d.median));
                }
                (Compare::Added, Some(d), _) => {
                    let added = stat.median - d.median;
                    let sign = if added < 0.0 { '−' } else { '+' };
                    cell.push_str(&format!(" {sign}{}", number(added.abs())));
                }
                _ => {}
            }
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    for note in &report.notes {
        out.push_str(&format!("\nNote: {note}.\n"));
    }
    if !report.errors.is_empty() {
        out.push_str("\nerrors:\n");
        for error in &report.errors {
            out.push_str(&format!("- {error}\n"));
        }
    }
    out
}

/// Three significant figures, no exponent.
fn number(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

#[derive(Default)]
struct Samples(BTreeMap<(String, Route), Vec<f64>>);

impl Samples {
    fn add(&mut self, key: &str, route: Route, value: f64) {
        self.0
            .entry((key.to_owned(), route))
            .or_default()
            .push(value);
    }

    fn take(&mut self, key: &str, route: Route) -> Vec<f64> {
        self.0.remove(&(key.to_owned(), route)).unwrap_or_default()
    }
}

struct Bench<'a> {
    config: &'a Config,
    topo: &'a Topology,
    loadgen: PathBuf,
}

/// What a run found: figures, failures, and what could not be measured.
#[derive(Default)]
struct Found {
    samples: Samples,
    errors: Vec<String>,
    notes: Vec<String>,
}

impl Bench<'_> {
    /// mesh-node's resident memory on fresh processes: idle, then holding each count of open
    /// connections in turn.
    fn memory(&self, route: Route, open_files: u64, found: &mut Found) -> Result<()> {
        let meshes = self.start_meshes()?;
        thread::sleep(self.config.settle());
        found.samples.add("rss_idle", route, meshes.rss_mib(route)?);
        for &n in &self.config.held {
            let needed = descriptors_needed(route, n);
            if needed > open_files {
                found.notes.push(format!(
                    "{} with {n} open connections not measured: its mesh-node would need {needed} \
                     file descriptors, and the open-file limit here is {open_files} (raising it \
                     needs CAP_SYS_RESOURCE)",
                    route.key()
                ));
                continue;
            }
            let held = self.hold_counted(route, n, "held", found)?;
            let rss = meshes.rss_mib(route)?;
            eprintln!(
                "bench: {} with {n} open connections: {rss:.1} MiB",
                route.key()
            );
            found.samples.add(&format!("rss_{n}"), route, rss);
            held.close()?;
        }
        // A fresh pair of processes for the peak, so that what the held counts above left
        // behind does not count against it.
        drop(meshes);
        let n = self.config.peak;
        if descriptors_needed(route, n) > open_files {
            found.notes.push(format!(
                "{}: the peak of {n} connections not measured (open-file limit {open_files})",
                route.key()
            ));
            return Ok(());
        }
        let meshes = self.start_meshes()?;
        thread::sleep(self.config.settle());
        let held = self.hold_counted(route, n, "peak", found)?;
        let at_peak = meshes.rss_mib(route)?;
        found.samples.add("rss_peak", route, at_peak);
        eprintln!(
            "bench: {} peak of {n} open connections: {at_peak:.1} MiB (mesh-node pids {:?}); closing them",
            route.key(),
            meshes.pids(route)?
        );
        held.close()?;
        thread::sleep(self.config.after_peak);
        let after = meshes.rss_mib(route)?;
        eprintln!(
            "bench: {} with {n} open connections {at_peak:.1} MiB, {:.0} s after they closed {after:.1} MiB",
            route.key(),
            self.config.after_peak.as_secs_f64()
        );
        found.samples.add("rss_after_peak", route, after);
        Ok(())
    }

    /// Bulk upload on `streams` connections; mesh-node's CPU time over the whole run, per GB.
    fn throughput(
        &self,
        tag: &str,
        route: Route,
        streams: usize,
        meshes: &Meshes,
        found: &mut Found,
    ) -> Result<()> {
        let cpu_before = meshes.cpu_seconds(route)?;
        let out = self.client(
            route,
            &["throughput".into(), streams.to_string()],
            &[self.config.warmup, self.config.duration],
        )?;
        let cpu = meshes.cpu_seconds(route)? - cpu_before;
        let gbit = out.get("measured_bytes")? * 8.0 / out.get("seconds")? / 1e9;
        eprintln!("bench: {tag} throughput, {streams} stream(s): {gbit:.2} Gbit/s");
        found
            .samples
            .add(&format!("throughput_{streams}"), route, gbit);
        if !route.mesh_nodes().is_empty() {
            let gb = out.get("bytes")? / 1e9;
            found
                .samples
                .add(&format!("cpu_per_gb_{streams}"), route, cpu / gb);
        }
        Ok(())
    }

    fn latency(&self, tag: &str, route: Route, found: &mut Found) -> Result<()> {
        let out = self.client(
            route,
            &[
                "latency".into(),
                self.config.latency_conns.to_string(),
                self.config.latency_rate.to_string(),
            ],
            &[self.config.warmup, self.config.duration],
        )?;
        let failed = out.get("errors")?;
        if failed > 0.0 || out.get("count")? == 0.0 {
            found.errors.push(format!(
                "{tag} latency: {failed} failed connections, {} requests answered",
                out.get("count")?
            ));
        }
        for p in ["p50", "p90", "p99", "max"] {
            found
                .samples
                .add(&format!("latency_{p}"), route, out.get(&format!("{p}_us"))?);
        }
        eprintln!(
            "bench: {tag} latency p50 {:.0} µs, p99 {:.0} µs",
            out.get("p50_us")?,
            out.get("p99_us")?
        );
        Ok(())
    }

    fn connrate(&self, tag: &str, route: Route, found: &mut Found) -> Result<()> {
        let out = self.client(
            route,
            &["connrate".into(), self.config.connrate_threads.to_string()],
            &[self.config.warmup, self.config.duration],
        )?;
        let failed = out.get("errors")?;
        if failed > 0.0 || out.get("conns")? == 0.0 {
            found.errors.push(format!(
                "{tag} connection rate: {failed} failed, {} completed",
                out.get("conns")?
            ));
        }
        let rate = out.get("conns")? / out.get("seconds")?;
        eprintln!("bench: {tag} {rate:.0} connections/s");
        found.samples.add("conn_rate", route, rate);
        for key in ["connect_p50", "connect_p99", "exchange_p50", "exchange_p99"] {
            found
                .samples
                .add(key, route, out.get(&format!("{key}_us"))?);
        }
        Ok(())
    }

    fn start_meshes(&self) -> Result<Meshes> {
        let args: Vec<&str> = self.config.mesh_args.iter().map(String::as_str).collect();
        Ok(Meshes {
            node1: MeshNode::start_hbone(self.topo, "node1", &args)?,
            node2: MeshNode::start_hbone(self.topo, "node2", &args)?,
        })
    }

    fn target(&self, route: Route) -> String {
        SocketAddr::from((self.topo.pod(route.server()).ip, PORT)).to_string()
    }

    /// Runs `loadgen <mode> <target> <args…> <durations in ms…>` in the path's client pod and
    /// returns its `result` line.
    fn client(&self, route: Route, args: &[String], durations: &[Duration]) -> Result<Outcome> {
        let mut all = vec![args[0].clone(), self.target(route)];
        all.extend(args[1..].iter().cloned());
        all.extend(durations.iter().map(|d| d.as_millis().to_string()));
        let pod = self.topo.pod(route.client());
        let (mut cmd, _files) =
            podapp::command_of(&self.loadgen, &pod.netns_path(), &pod.cgroup, &all)?;
        let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let limit = durations.iter().sum::<Duration>() + Duration::from_secs(60);
        let out = podapp::wait_with_timeout(child, limit)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "loadgen {} on {} failed ({}): {}",
            all.join(" "),
            route.key(),
            out.status,
            stderr.trim()
        );
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("result "))
            .with_context(|| format!("loadgen {} printed no result: {stdout}", all[0]))?;
        Outcome::parse(line)
    }

    /// The figures are only worth something if each path went where it says: node1's mesh-node
    /// logged the captured paths' connections with their route, and none of the direct ones.
    fn check_routes(&self, meshes: &Meshes) -> Result<()> {
        for &route in &self.config.routes {
            let dst = format!("original_dst={}", self.target(route));
            let carried = meshes
                .node1
                .log_lines_with(&["outbound connection closed", &dst]);
            let expected = match route {
                Route::Direct => None,
                Route::SameNode => Some("route=local"),
                Route::CrossNode => Some("route=hbone"),
            };
            match expected {
                None => ensure!(
                    carried.is_empty(),
                    "the direct path went through mesh-node: {}",
                    carried[0]
                ),
                Some(how) => ensure!(
                    carried.iter().any(|line| line.contains(how)),
                    "mesh-node on node1 logged no {} connection with {how}",
                    route.key()
                ),
            }
        }
        Ok(())
    }

    /// Holds `n` connections open on `route`, notes any that failed (as `what` connections),
    /// and lets mesh-node settle.
    fn hold_counted(&self, route: Route, n: usize, what: &str, found: &mut Found) -> Result<Held> {
        let held = self.hold(route, n)?;
        if held.errors > 0 {
            found.errors.push(format!(
                "{}: {} of {n} {what} connections failed",
                route.key(),
                held.errors
            ));
        }
        thread::sleep(self.config.settle());
        Ok(held)
    }

    fn hold(&self, route: Route, n: usize) -> Result<Held> {
        let pod = self.topo.pod(route.client());
        let args = ["hold".into(), self.target(route), n.to_string()];
        let (mut cmd, _files) =
            podapp::command_of(&self.loadgen, &pod.netns_path(), &pod.cgroup, &args)?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("loadgen stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(rest) = line.strip_prefix("held ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "loadgen hold {n} on {} did not report: {line:?}",
                route.key()
            );
        };
        let outcome = Outcome::parse(rest)?;
        Ok(Held {
            child: Some(child),
            stdin,
            errors: outcome.get("errors")? as usize,
        })
    }
}

/// Open connections held by a `loadgen hold`; closing stdin releases them.
struct Held {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    errors: usize,
}

impl Held {
    fn close(mut self) -> Result<()> {
        drop(self.stdin.take());
        let child = self.child.take().context("already closed")?;
        let out = podapp::wait_with_timeout(child, Duration::from_secs(30))?;
        ensure!(
            out.status.success(),
            "loadgen hold exited with {}",
            out.status
        );
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Meshes {
    node1: MeshNode,
    node2: MeshNode,
}

impl Meshes {
    fn pids(&self, route: Route) -> Result<Vec<u32>> {
        route
            .mesh_nodes()
            .iter()
            .map(|node| {
                let mesh = if *node == "node1" {
                    &self.node1
                } else {
                    &self.node2
                };
                mesh.pid()
                    .with_context(|| format!("mesh-node on {node} is not running"))
            })
            .collect()
    }

    /// Resident memory of the path's mesh-nodes together.
    fn rss_mib(&self, route: Route) -> Result<f64> {
        let mut kib = 0;
        for pid in self.pids(route)? {
            kib += proc_rss_kib(pid)?;
        }
        Ok(kib as f64 / 1024.0)
    }

    /// User + system CPU time of the path's mesh-nodes together.
    fn cpu_seconds(&self, route: Route) -> Result<f64> {
        let mut total = 0.0;
        for pid in self.pids(route)? {
            total += proc_cpu_seconds(pid)?;
        }
        Ok(total)
    }
}

/// A `key=value …` line from loadgen.
struct Outcome(BTreeMap<String, f64>);

impl Outcome {
    fn parse(line: &str) -> Result<Self> {
        line.split_whitespace()
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("loadgen field {kv:?}"))?;
                let v: f64 = v.parse().with_context(|| format!("loadgen field {kv:?}"))?;
                Ok((k.to_owned(), v))
            })
            .collect::<Result<_>>()
            .map(Self)
    }

    fn get(&self, key: &str) -> Result<f64> {
        self.0
            .get(key)
            .copied()
            .with_context(|| format!("loadgen result has no {key}"))
    }
}

/// Resident memory of process `pid` (`VmRSS` of `/proc/<pid>/status`).
pub fn proc_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    kib_field(&status, "VmRSS:").with_context(|| format!("no VmRSS in {path}"))
}

/// A `Name:   1234 kB` line of a /proc file.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn proc_cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("malformed {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("malformed {path}"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// Descriptors the busiest process of a path needs to hold `n` connections: a same-node
/// connection is two sockets in node1's mesh-node, a cross-node one a socket on each node (the
/// tunnels share a few TLS connections); the load generator holds one each. Plus headroom for
/// mesh-node's own (BPF objects, listeners, log).
fn descriptors_needed(route: Route, n: usize) -> u64 {
    let per_connection = match route {
        Route::SameNode => 2,
        Route::Direct | Route::CrossNode => 1,
    };
    (per_connection * n + 200) as u64
}

/// Raises this process's open-file limit, which the mesh-nodes and load generators it starts
/// inherit: the hard limit too if allowed (root with CAP_SYS_RESOURCE), else the soft limit up to
/// the hard one, as mesh-node does for itself. Returns the soft limit in force.
fn raise_open_file_limit() -> u64 {
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let wanted = nr_open.min(1 << 20);
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: wanted,
    };
    // SAFETY: setrlimit only reads the struct passed in.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return wanted;
    }
    mesh_node::preflight::raise_open_file_limit()
}

impl Machine {
    fn read() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown CPU".to_owned(), |(_, v)| v.trim().to_owned());
        let memory_kib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| kib_field(&m, "MemTotal:"))
            .unwrap_or(0) as f64;
        let command = |program: &str, args: &[&str]| {
            std::process::Command::new(program)
                .args(args)
                .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|| "unknown".to_owned())
        };
        Self {
            cpu,
            cores: thread::available_parallelism().map_or(0, usize::from),
            memory_gib: memory_kib / 1048576.0,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned()),
            revision: command("git", &["rev-parse", "--short", "HEAD"]),
            date: command("date", &["-u", "+%Y-%m-%d"]),
            mesh_node: meshnode::binary().display().to_string(),
        }
    }
}
