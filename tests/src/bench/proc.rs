//! What `/proc` says of a process, and the open-file limit.
use std::fs;

use anyhow::{Context, Result};

use super::Route;

/// Resident memory of process `pid` (`VmRSS` of `/proc/<pid>/status`).
pub fn proc_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    kib_field(&status, "VmRSS:").with_context(|| format!("no VmRSS in {path}"))
}

/// The anonymous part of it (`RssAnon`: heap, stacks, buffers), the rest being pages of the
/// executable and libraries that the process touched.
pub fn proc_rss_anon_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    kib_field(&status, "RssAnon:").with_context(|| format!("no RssAnon in {path}"))
}

/// Context switches of every thread of process `pid` so far (voluntary: it slept and was
/// woken; involuntary: preempted), from `/proc/<pid>/task/*/status`.
pub(super) fn proc_context_switches(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        // A thread that ended in between has no status any more.
        let Ok(status) = fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        for field in ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"] {
            total += kib_field(&status, field).unwrap_or(0);
        }
    }
    Ok(total)
}

/// A `Name:   1234 kB` (or `Name: 1234`) line of a /proc file.
pub(super) fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub(super) fn proc_cpu_seconds(pid: u32) -> Result<f64> {
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
pub(super) fn descriptors_needed(route: Route, n: usize) -> u64 {
    // The busiest mesh-node's sockets per connection: same-node and the destination of a
    // cross-cluster call hold two (client or tunnel, and the application).
    let per_connection = match route {
        Route::SameNode | Route::CrossCluster | Route::CrossClusterFullTls => 2,
        Route::Direct | Route::CrossNode | Route::Ztunnel => 1,
    };
    (per_connection * n + 200) as u64
}

/// Raises this process's open-file limit, which the mesh-nodes and load generators it starts
/// inherit: the hard limit too if allowed (root with CAP_SYS_RESOURCE), else the soft limit up to
/// the hard one, as mesh-node does for itself. Returns the soft limit in force.
pub(super) fn raise_open_file_limit() -> u64 {
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
