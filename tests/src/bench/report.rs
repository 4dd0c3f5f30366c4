//! What a benchmark run reports: each figure's median and range per path, the machine, and
//! the Markdown table.
use std::{collections::BTreeMap, fs, path::Path, thread};

use serde::Serialize;

use super::{Config, Route, proc::kib_field};
use crate::meshnode;

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
    pub(super) fn of(mut runs: Vec<f64>) -> Option<Self> {
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

/// Every metric in table order: key, label, unit, comparison.
pub(super) fn metric_defs(config: &Config) -> Vec<(String, String, &'static str, Compare)> {
    use Compare::*;
    let mut defs: Vec<(String, String, &'static str, Compare)> = vec![
        ("throughput_1", "throughput, 1 stream", "Gbit/s", Ratio),
        ("throughput_8", "throughput, 8 streams", "Gbit/s", Ratio),
        ("cpu_per_gb_1", "proxy CPU, 1 stream", "s/GB", MeshOnly),
        ("cpu_per_gb_8", "proxy CPU, 8 streams", "s/GB", MeshOnly),
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
    defs.push((
        "switches_per_request".into(),
        "proxy context switches per 1 KiB echo".into(),
        "",
        MeshOnly,
    ));
    defs.push((
        "cpu_per_request".into(),
        "proxy CPU per 1 KiB echo".into(),
        "µs",
        MeshOnly,
    ));
    defs.push(("conn_rate".into(), "new connections".into(), "/s", Ratio));
    for (key, label) in [
        ("connect_p50", "connect() p50"),
        ("connect_p99", "connect() p99"),
        ("exchange_p50", "connect + 1-byte echo p50"),
        ("exchange_p99", "connect + 1-byte echo p99"),
    ] {
        defs.push((key.into(), label.into(), "µs", Added));
    }
    defs.push(("rss_idle".into(), "proxy RSS, idle".into(), "MiB", MeshOnly));
    defs.push((
        "rss_idle_anon".into(),
        "… of it anonymous (heap, stacks; the rest is the binary's pages)".into(),
        "MiB",
        MeshOnly,
    ));
    for n in &config.held {
        defs.push((
            format!("rss_{n}"),
            format!("proxy RSS, {n} open connections"),
            "MiB",
            MeshOnly,
        ));
    }
    defs.push((
        "gateway_rss_idle".into(),
        "gateway RSS, idle".into(),
        "MiB",
        MeshOnly,
    ));
    for n in &config.held {
        defs.push((
            format!("gateway_rss_{n}"),
            format!("gateway RSS, {n} open tunnels"),
            "MiB",
            MeshOnly,
        ));
    }
    defs.push((
        "rss_peak".into(),
        format!("proxy RSS, {} open connections (the peak)", config.peak),
        "MiB",
        MeshOnly,
    ));
    defs.push((
        "rss_after_peak".into(),
        format!(
            "proxy RSS, {} s after the peak closed",
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
    if c.routes.contains(&Route::Ztunnel) {
        out.push_str(&format!(
            "ztunnel: {} (dedicated mode in the pods zclient and zserver; its CPU and RSS are \
             those two processes').\n\n",
            c.ztunnel
                .as_ref()
                .map_or_else(|| "?".to_owned(), |p| p.display().to_string())
        ));
    }
    let routes: Vec<Route> = Route::EVERY
        .into_iter()
        .filter(|r| c.routes.contains(r))
        .collect();
    out.push_str("| metric |");
    for route in &routes {
        out.push_str(&format!(" {} |", route.heading()));
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(routes.len()));
    out.push('\n');
    for metric in report.metrics.iter().filter(|m| !m.paths.is_empty()) {
        match metric.unit {
            "" => out.push_str(&format!("| {} |", metric.label)),
            unit => out.push_str(&format!("| {} ({unit}) |", metric.label)),
        }
        let direct = metric.paths.get(Route::Direct.key());
        for &route in &routes {
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

impl Machine {
    pub(super) fn read() -> Self {
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
