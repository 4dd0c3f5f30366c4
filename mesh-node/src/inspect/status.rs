//! `mesh-node bpf status`: kernel, features, hooks and their attach points, fail mode, original
//! source, counters.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write,
    path::{Path, PathBuf},
};

use aya::programs::{ProgramInfo, loaded_programs};
use mesh_common::FailMode;
use serde::Serialize;

use super::{
    InspectError, Output, emit, kernel,
    pinned::Pinned,
    table::{Table, fields},
};
use crate::dataplane::{hook_of, record::PodRecord};

#[derive(Serialize)]
struct Status {
    kernel: String,
    pin_dir: PathBuf,
    fail_mode: &'static str,
    /// `on`: applications see their clients' addresses; `off`: their own pod's.
    original_source: &'static str,
    /// `on`: the kernel carries same-node connections' bytes once mesh-node set them up.
    kernel_same_node: &'static str,
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
        original_source: original_source(&config),
        kernel_same_node: if config.flags & mesh_common::DataplaneConfig::KERNEL_SAME_NODE != 0 {
            "on"
        } else {
            "off"
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

/// The original-source mode the running (or last) mesh-node recorded.
pub(super) fn original_source(config: &mesh_common::DataplaneConfig) -> &'static str {
    if config.flags & mesh_common::DataplaneConfig::ORIGINAL_SOURCE != 0 {
        "on"
    } else {
        "off"
    }
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
        (
            "original source",
            format!(
                "{} (applications see {})",
                status.original_source,
                if status.original_source == "on" {
                    "their clients' addresses"
                } else {
                    "connections from their own pod's address"
                }
            ),
        ),
        (
            "kernel same-node",
            format!(
                "{} ({})",
                status.kernel_same_node,
                if status.kernel_same_node == "on" {
                    "sk_msg carries same-node bytes once set up"
                } else {
                    "same-node bytes go through mesh-node's relay"
                }
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
