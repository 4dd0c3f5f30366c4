//! `mesh-node bpf`: read-only inspection of the kernel side, from the objects pinned under the
//! bpffs directory, so it works while mesh-node runs and after it stopped.
//!
//! Every subcommand gathers a serialisable view first, then renders it as an aligned table or
//! as JSON (`trace` as one JSON object per line).
mod kernel;
mod pinned;
mod table;
mod trace;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::MapError,
    programs::{ProgramInfo, loaded_programs},
};
use mesh_common::{EnrolledPod, FailMode, OrigDst, map_names};
use serde::Serialize;

use crate::dataplane::kernel_ip as addr;
use pinned::{MAPS, Pinned};
use table::{Table, fields};
pub use trace::TraceFilter;

use crate::dataplane::{hook_of, record::PodRecord};

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "no mesh-node state under {dir}: mesh-node has not run with --bpffs {dir} on this node \
         (or bpffs is not mounted there)"
    )]
    NoState { dir: PathBuf },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("unknown map {name:?}; the maps are: {known}")]
    UnknownMap { name: String, known: String },
    #[error(
        "{map} is a ring buffer and cannot be listed without consuming it: use `mesh-node bpf trace`"
    )]
    NotDumpable { map: &'static str },
    #[error("read trace events: {0}")]
    Trace(io::Error),
    #[error("write output: {0}")]
    Write(#[from] io::Error),
}

fn emit(
    out: &mut impl Write,
    output: Output,
    value: &impl Serialize,
    table: impl FnOnce() -> String,
) -> Result<(), InspectError> {
    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut *out, value).map_err(io::Error::from)?;
            writeln!(out)?;
        }
        Output::Table => out.write_all(table().as_bytes())?,
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// status

#[derive(Serialize)]
struct Status {
    kernel: String,
    pin_dir: PathBuf,
    fail_mode: &'static str,
    enrolled_pods: usize,
    inbound_listeners: usize,
    run_stats_enabled: bool,
    features: Vec<kernel::Feature>,
    hooks: Vec<Hook>,
    counters: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct Hook {
    hook: &'static str,
    program: String,
    min_kernel: &'static str,
    /// `attached` or why not.
    state: String,
    link_pin: PathBuf,
    link_id: Option<u32>,
    program_id: Option<u32>,
    attached_to: Option<String>,
    run_count: Option<u64>,
    run_time_ns: Option<u64>,
}

pub fn status(dir: &Path, output: Output, out: &mut impl Write) -> Result<(), InspectError> {
    let pinned = Pinned::open(dir)?;
    let release = kernel::kernel_release();
    let version = kernel::kernel_version(&release);
    let enrolled = pinned.enrolled()?;
    let programs: Vec<ProgramInfo> = loaded_programs().filter_map(Result::ok).collect();
    let stats = kernel::run_stats_enabled();
    let cgroup_mount = crate::preflight::cgroup2_mount().ok();

    let links = pinned.links();
    let (cgroup_links, netns_links) = (links.cgroup, links.netns);
    let mut hooks = Vec::new();
    // Every cgroup hook is normally on the same cgroup: walk the cgroup tree once per id.
    let mut cgroup_names: BTreeMap<u64, String> = BTreeMap::new();
    let mut cgroup_name = |id: u64| {
        cgroup_names
            .entry(id)
            .or_insert_with(|| {
                cgroup_mount
                    .as_deref()
                    .and_then(|mount| kernel::cgroup_path(mount, id))
                    .map_or_else(|| format!("cgroup id {id}"), |p| p.display().to_string())
            })
            .clone()
    };
    for (program, path) in &cgroup_links {
        hooks.push(hook_status(
            program,
            path,
            &programs,
            stats,
            version,
            |point| match point {
                kernel::AttachPoint::Cgroup(id) => Some(cgroup_name(id)),
                _ => None,
            },
        ));
    }
    for (cookie, path) in &netns_links {
        let pod = enrolled
            .get(cookie)
            .map_or("not enrolled".to_owned(), PodRecord::key);
        hooks.push(hook_status(
            mesh_common::program_names::SK_LOOKUP,
            path,
            &programs,
            stats,
            version,
            |point| match point {
                kernel::AttachPoint::Netns(ino) => Some(format!("netns {ino} ({pod})")),
                _ => None,
            },
        ));
    }
    for (program, _, _) in crate::dataplane::CGROUP_PROGRAMS {
        if !cgroup_links.iter().any(|(name, _)| name == program) {
            let (hook, min_kernel) = hook_of(program).unwrap_or(("?", "?"));
            hooks.push(Hook {
                hook,
                program: program.to_owned(),
                min_kernel,
                state: "not attached (no pinned link)".to_owned(),
                link_pin: pinned.links_dir().join(program),
                link_id: None,
                program_id: None,
                attached_to: None,
                run_count: None,
                run_time_ns: None,
            });
        }
    }
    let config = pinned.config()?;
    let status = Status {
        kernel: release,
        pin_dir: dir.to_owned(),
        fail_mode: if config.fail_mode == FailMode::Closed as u32 {
            "closed"
        } else {
            "open"
        },
        enrolled_pods: enrolled.len(),
        inbound_listeners: pinned.inbound()?.len(),
        run_stats_enabled: stats,
        features: kernel::probe_features(),
        hooks,
        counters: pinned
            .counters()?
            .into_iter()
            .map(|(counter, values)| (counter.name(), values.iter().sum()))
            .collect(),
    };
    emit(out, output, &status, || render_status(&status))
}

fn hook_status(
    program: &str,
    path: &Path,
    programs: &[ProgramInfo],
    stats: bool,
    version: Option<(u32, u32)>,
    describe: impl FnOnce(kernel::AttachPoint) -> Option<String>,
) -> Hook {
    let (hook, min_kernel) = hook_of(program).unwrap_or(("unknown", "?"));
    let mut view = Hook {
        hook,
        program: program.to_owned(),
        min_kernel,
        state: String::new(),
        link_pin: path.to_owned(),
        link_id: None,
        program_id: None,
        attached_to: None,
        run_count: None,
        run_time_ns: None,
    };
    let link = match kernel::pinned_link(path) {
        Ok(link) => link,
        Err(error) => {
            view.state = format!("pinned link unreadable: {error}");
            return view;
        }
    };
    view.link_id = Some(link.id);
    view.program_id = Some(link.program_id);
    view.attached_to = describe(link.attach_point);
    if stats && let Some(info) = programs.iter().find(|p| Some(p.id()) == view.program_id) {
        view.run_count = Some(info.run_count());
        view.run_time_ns = Some(info.run_time().as_nanos() as u64);
    }
    if view.state.is_empty() {
        let too_old = match (version, kernel::kernel_version(min_kernel)) {
            (Some(have), Some(need)) => have < need,
            _ => false,
        };
        view.state = if too_old {
            format!("attached, but the kernel is older than {min_kernel}")
        } else {
            "attached".to_owned()
        };
    }
    view
}

fn render_status(status: &Status) -> String {
    let present = |p: Option<bool>| match p {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "probe failed",
    };
    let mut text = fields(&[
        ("kernel", status.kernel.clone()),
        ("pin dir", status.pin_dir.display().to_string()),
        (
            "fail mode",
            format!(
                "{} (while mesh-node is not serving a pod)",
                status.fail_mode
            ),
        ),
        ("enrolled pods", status.enrolled_pods.to_string()),
        ("inbound listeners", status.inbound_listeners.to_string()),
    ]);
    let mut features = Table::new(&["FEATURE", "PRESENT", "USED FOR"]);
    for feature in &status.features {
        features.row(vec![
            feature.name.into(),
            present(feature.present).into(),
            feature.used_for.into(),
        ]);
    }
    let mut hooks = Table::new(&["HOOK", "LINK#", "PROG#", "RUNS#", "AVG NS#", "ATTACHED TO"]);
    for hook in &status.hooks {
        let id = |id: Option<u32>| id.map_or("-".to_owned(), |id| id.to_string());
        let avg = match (hook.run_count, hook.run_time_ns) {
            (Some(runs), Some(ns)) if runs > 0 => (ns / runs).to_string(),
            _ => "-".to_owned(),
        };
        let attached = if hook.state == "attached" {
            hook.attached_to.clone().unwrap_or_else(|| "?".to_owned())
        } else {
            hook.state.clone()
        };
        hooks.row(vec![
            hook.hook.into(),
            id(hook.link_id),
            id(hook.program_id),
            hook.run_count.map_or("-".to_owned(), |n| n.to_string()),
            avg,
            attached,
        ]);
    }
    let mut counters = Table::new(&["COUNTER", "VALUE#"]);
    for (name, value) in &status.counters {
        counters.row(vec![(*name).into(), value.to_string()]);
    }
    let _ = write!(text, "\n{features}\n{hooks}");
    if !status.run_stats_enabled {
        text.push_str("(run counts need `sysctl kernel.bpf_stats_enabled=1`)\n");
    }
    let _ = write!(text, "\n{counters}");
    text
}

// ---------------------------------------------------------------------------------------------
// pods

#[derive(Serialize)]
struct PodView {
    pod: String,
    pod_id: u32,
    service_account: String,
    ips: Vec<IpAddr>,
    netns_cookie: u64,
    /// mesh-node's listeners opened in the pod's namespace.
    listeners: Vec<&'static str>,
    /// Inbound capture: the sk_lookup link is pinned and every address has a live listener.
    inbound_capture: &'static str,
    truncated: bool,
}

const LISTENERS: [(u32, &str); 5] = [
    (EnrolledPod::LISTENER_OUTBOUND4, "127.0.0.1:15001"),
    (EnrolledPod::LISTENER_OUTBOUND6, "[::1]:15001"),
    (EnrolledPod::LISTENER_INBOUND4, "127.0.0.1:15006"),
    (EnrolledPod::LISTENER_INBOUND6, "[::1]:15006"),
    (EnrolledPod::LISTENER_HBONE, "<pod IP>:15008"),
];

pub fn pods(dir: &Path, output: Output, out: &mut impl Write) -> Result<(), InspectError> {
    let pinned = Pinned::open(dir)?;
    let registered = pinned.inbound()?;
    let netns_links = pinned.links().netns;
    let views: Vec<PodView> = pinned
        .enrolled()?
        .into_iter()
        .map(|(cookie, pod)| {
            let linked = netns_links.iter().any(|(c, _)| *c == cookie);
            let serving = pod.ips.iter().all(|ip| registered.contains(ip));
            PodView {
                pod: pod.key(),
                pod_id: pod.pod_id,
                service_account: pod.service_account.clone(),
                ips: pod.ips.clone(),
                netns_cookie: cookie,
                listeners: LISTENERS
                    .iter()
                    .filter(|(bit, _)| pod.listeners & bit != 0)
                    .map(|(_, name)| *name)
                    .collect(),
                inbound_capture: match (linked, serving) {
                    (true, true) => "on",
                    (true, false) => "not serving",
                    (false, _) => "no link",
                },
                truncated: pod.truncated,
            }
        })
        .collect();
    emit(out, output, &views, || {
        let mut table = Table::new(&["POD", "IPS", "SERVICE ACCOUNT", "LISTENERS", "INBOUND"]);
        for view in &views {
            let ports: Vec<&str> = view
                .listeners
                .iter()
                .map(|l| l.rsplit(':').next().unwrap_or(l))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            table.row(vec![
                view.pod.clone(),
                join(&view.ips),
                view.service_account.clone(),
                ports.join(","),
                view.inbound_capture.into(),
            ]);
        }
        if table.is_empty() {
            return "no enrolled pods\n".to_owned();
        }
        table.to_string()
    })
}

fn join(items: &[impl ToString]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

// ---------------------------------------------------------------------------------------------
// maps

#[derive(Serialize)]
struct MapView {
    name: &'static str,
    kind: String,
    id: u32,
    key_size: u32,
    value_size: u32,
    capacity: u32,
    /// Entries in use; `None` where it cannot be read without side effects (the ring buffer).
    entries: Option<usize>,
    holds: &'static str,
}

pub fn maps(dir: &Path, output: Output, out: &mut impl Write) -> Result<(), InspectError> {
    let pinned = Pinned::open(dir)?;
    let mut views = Vec::new();
    for name in MAPS {
        let info = pinned.info(name)?;
        let (entries, holds) = match name {
            map_names::ENROLLED => (
                Some(pinned.enrolled()?.len()),
                "enrolled pods by netns cookie",
            ),
            map_names::INBOUND => (
                Some(pinned.inbound()?.len()),
                "inbound listeners by pod address",
            ),
            map_names::SOCK_ORIG => (Some(pinned.sock_orig()?.len()), "live captured connections"),
            map_names::CONN_ORIG => (
                Some(pinned.conn_orig()?.len()),
                "destinations awaiting accept",
            ),
            map_names::CONFIG => (Some(1), "fail mode"),
            map_names::COUNTERS => (Some(pinned.counters()?.len()), "per-CPU decision counters"),
            _ => (None, "trace events"),
        };
        views.push(MapView {
            name,
            kind: info
                .map_type()
                .map_or_else(|_| "unknown".to_owned(), |t| format!("{t:?}")),
            id: info.id(),
            key_size: info.key_size(),
            value_size: info.value_size(),
            capacity: info.max_entries(),
            entries,
            holds,
        });
    }
    emit(out, output, &views, || {
        let mut table = Table::new(&["MAP", "TYPE", "ENTRIES#", "CAPACITY#", "HOLDS"]);
        for view in &views {
            let entries = view.entries.map_or("-".to_owned(), |n| n.to_string());
            let capacity = if view.kind == "RingBuf" {
                format!("{} KiB", view.capacity / 1024)
            } else {
                view.capacity.to_string()
            };
            table.row(vec![
                view.name.into(),
                view.kind.clone(),
                entries,
                capacity,
                view.holds.into(),
            ]);
        }
        table.to_string()
    })
}

/// The map a user named: exact, any case, with or without the `MESH_` prefix.
fn map_named(name: &str) -> Result<&'static str, InspectError> {
    let wanted = name.to_ascii_uppercase();
    MAPS.iter()
        .find(|map| **map == wanted || map.strip_prefix("MESH_") == Some(wanted.as_str()))
        .copied()
        .ok_or_else(|| InspectError::UnknownMap {
            name: name.to_owned(),
            known: MAPS.join(", "),
        })
}

/// A captured connection's original destination, decoded.
#[derive(Serialize)]
struct OrigView {
    pod: String,
    netns_cookie: u64,
    src_port: u16,
    original_dst: SocketAddr,
}

fn orig_view(orig: &OrigDst, pods: &BTreeMap<u64, PodRecord>) -> OrigView {
    OrigView {
        pod: pods
            .get(&orig.netns_cookie)
            .map_or_else(|| "?".to_owned(), PodRecord::key),
        netns_cookie: orig.netns_cookie,
        src_port: orig.src_port,
        original_dst: SocketAddr::new(addr(orig.family, orig.ip), orig.port),
    }
}

pub fn dump(
    dir: &Path,
    name: &str,
    output: Output,
    out: &mut impl Write,
) -> Result<(), InspectError> {
    let map = map_named(name)?;
    let pinned = Pinned::open(dir)?;
    let pods = pinned.enrolled()?;
    match map {
        map_names::ENROLLED => {
            #[derive(Serialize)]
            struct Entry<'a> {
                netns_cookie: u64,
                #[serde(flatten)]
                pod: &'a PodRecord,
            }
            let entries: Vec<Entry> = pods
                .iter()
                .map(|(cookie, pod)| Entry {
                    netns_cookie: *cookie,
                    pod,
                })
                .collect();
            emit(out, output, &entries, || {
                let mut table =
                    Table::new(&["NETNS COOKIE#", "ID#", "POD", "SERVICE ACCOUNT", "IPS"]);
                for e in &entries {
                    table.row(vec![
                        e.netns_cookie.to_string(),
                        e.pod.pod_id.to_string(),
                        e.pod.key(),
                        e.pod.service_account.clone(),
                        join(&e.pod.ips),
                    ]);
                }
                table.to_string()
            })
        }
        map_names::INBOUND => {
            let entries = pinned.inbound()?;
            emit(out, output, &entries, || {
                let mut table = Table::new(&["POD ADDRESS", "POD"]);
                for ip in &entries {
                    let pod = pods
                        .values()
                        .find(|p| p.ips.contains(ip))
                        .map_or("?".to_owned(), PodRecord::key);
                    table.row(vec![ip.to_string(), pod]);
                }
                table.to_string()
            })
        }
        map_names::SOCK_ORIG => {
            #[derive(Serialize)]
            struct Entry {
                socket_cookie: u64,
                #[serde(flatten)]
                orig: OrigView,
            }
            let entries: Vec<Entry> = pinned
                .sock_orig()?
                .iter()
                .map(|(cookie, orig)| Entry {
                    socket_cookie: *cookie,
                    orig: orig_view(orig, &pods),
                })
                .collect();
            emit(out, output, &entries, || {
                let mut table = Table::new(&["SOCKET COOKIE#", "POD", "SRC PORT#", "ORIGINAL DST"]);
                for e in &entries {
                    table.row(vec![
                        e.socket_cookie.to_string(),
                        e.orig.pod.clone(),
                        e.orig.src_port.to_string(),
                        e.orig.original_dst.to_string(),
                    ]);
                }
                table.to_string()
            })
        }
        map_names::CONN_ORIG => {
            let entries: Vec<OrigView> = pinned
                .conn_orig()?
                .iter()
                .map(|(key, orig)| OrigView {
                    src_port: key.src_port,
                    ..orig_view(orig, &pods)
                })
                .collect();
            emit(out, output, &entries, || orig_table(&entries))
        }
        map_names::CONFIG => {
            let config = pinned.config()?;
            let fail_mode = if config.fail_mode == FailMode::Closed as u32 {
                "closed"
            } else {
                "open"
            };
            let value = serde_json::json!({ "fail_mode": fail_mode });
            emit(out, output, &value, || {
                fields(&[("fail mode", fail_mode.to_owned())])
            })
        }
        map_names::COUNTERS => {
            #[derive(Serialize)]
            struct Entry {
                counter: &'static str,
                total: u64,
                per_cpu: Vec<u64>,
            }
            let entries: Vec<Entry> = pinned
                .counters()?
                .into_iter()
                .map(|(counter, per_cpu)| Entry {
                    counter: counter.name(),
                    total: per_cpu.iter().sum(),
                    per_cpu,
                })
                .collect();
            emit(out, output, &entries, || {
                let mut table = Table::new(&["COUNTER", "TOTAL#", "PER CPU"]);
                for e in &entries {
                    table.row(vec![
                        e.counter.into(),
                        e.total.to_string(),
                        join(&e.per_cpu),
                    ]);
                }
                table.to_string()
            })
        }
        _ => Err(InspectError::NotDumpable { map }),
    }
}

fn orig_table(entries: &[OrigView]) -> String {
    let mut table = Table::new(&["POD", "SRC PORT#", "ORIGINAL DST"]);
    for e in entries {
        table.row(vec![
            e.pod.clone(),
            e.src_port.to_string(),
            e.original_dst.to_string(),
        ]);
    }
    if table.is_empty() {
        return "no entries\n".to_owned();
    }
    table.to_string()
}

// ---------------------------------------------------------------------------------------------
// conns

/// Live captured connections (outbound: what enrolled pods connected to), optionally of one pod.
pub fn conns(
    dir: &Path,
    pod: Option<&str>,
    output: Output,
    out: &mut impl Write,
) -> Result<(), InspectError> {
    let pinned = Pinned::open(dir)?;
    let pods = pinned.enrolled()?;
    let mut views: Vec<OrigView> = pinned
        .sock_orig()?
        .iter()
        .map(|(_, orig)| orig_view(orig, &pods))
        .filter(|view| pod.is_none_or(|wanted| trace::pod_matches(&view.pod, wanted)))
        .collect();
    views.sort_by(|a, b| {
        (&a.pod, a.original_dst, a.src_port).cmp(&(&b.pod, b.original_dst, b.src_port))
    });
    emit(out, output, &views, || {
        if views.is_empty() {
            return "no live captured connections\n".to_owned();
        }
        orig_table(&views)
    })
}

// ---------------------------------------------------------------------------------------------
// trace

/// Streams redirect decisions until `limit` events matched or `duration` passed (both optional:
/// without them, until interrupted).
pub fn trace(
    dir: &Path,
    filter: &TraceFilter,
    limit: Option<u64>,
    duration: Option<Duration>,
    output: Output,
    out: &mut impl Write,
) -> Result<(), InspectError> {
    let pinned = Pinned::open(dir)?;
    trace::run(&pinned, filter, limit, duration, output, out)
}
