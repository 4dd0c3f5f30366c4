//! The soak benchmark (`cargo xtask bench soak`): many cross-node connections held for a long
//! time, each with a trickle of traffic, plus a steady rate of new connections, while the
//! control plane pushes a policy change every few seconds that makes the destination node
//! authorize every live connection again.
//!
//! What it reports: errors of every kind (opening, trickle echoes, new connections, held
//! connections that did not close cleanly; all should be 0); both mesh-nodes' resident memory
//! sampled over the run (it should stay flat); the time one policy re-check takes at this many
//! live connections (`mesh_authz_recheck_duration_seconds` of the destination node); and the
//! open file descriptors of both mesh-nodes before the load and after it has ended and the
//! pools have let their surplus go (they should be equal).
use std::{
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_node::xds::proto::security as pb;
use serde::Serialize;

use super::{PORT, proc::raise_open_file_limit, proc_rss_kib};
use crate::{
    PodSpec, Server, Topology,
    control_plane::ControlPlane,
    http_probe,
    podapp::{self, sibling_binary},
    topology::sysctl,
};

/// What the soak holds and for how long.
#[derive(Clone, Debug, Serialize)]
pub struct SoakConfig {
    pub conns: usize,
    pub seconds: u64,
    /// Each held connection echoes 32 bytes this often.
    pub trickle_ms: u64,
    /// New connections per second, beside the held ones.
    pub rate: u32,
    /// A policy change is pushed this often.
    pub push_every_ms: u64,
    /// RSS is sampled this often.
    pub sample_every_ms: u64,
    /// Time after the load for the pools to close their surplus before descriptors are counted.
    pub settle_ms: u64,
    #[serde(skip)]
    pub out_dir: PathBuf,
    #[serde(skip)]
    pub name: String,
}

impl SoakConfig {
    /// The real soak: 10,000 connections for 10 minutes.
    pub fn full(out_dir: PathBuf) -> Self {
        Self {
            conns: 10_000,
            seconds: 600,
            trickle_ms: 10_000,
            rate: 50,
            push_every_ms: 5_000,
            sample_every_ms: 10_000,
            // The pool closes surplus idle connections after 20 s, checked every 15 s; the
            // wait ends as soon as the counts are back.
            settle_ms: 90_000,
            out_dir,
            name: "soak".into(),
        }
    }

    /// Every code path in seconds, for CI: the figures mean nothing.
    pub fn smoke(out_dir: PathBuf) -> Self {
        Self {
            conns: 200,
            seconds: 6,
            trickle_ms: 1_000,
            rate: 20,
            push_every_ms: 1_000,
            sample_every_ms: 2_000,
            // Long enough for the pool's surplus connection to go (idle 20 s, checked every
            // 15 s), so the suite checks that descriptors come back.
            settle_ms: 60_000,
            name: "soak-smoke".into(),
            ..Self::full(out_dir)
        }
    }
}

/// One sample of both mesh-nodes' resident memory.
#[derive(Clone, Debug, Serialize)]
pub struct RssSample {
    pub seconds: u64,
    pub source_kib: u64,
    pub destination_kib: u64,
    /// Connections the destination relays at that moment.
    pub open: f64,
}

/// The loadgen's own account (see `loadgen soak`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadCounts {
    pub opened: u64,
    pub open_errors: u64,
    pub trickles: u64,
    pub trickle_errors: u64,
    pub new_ok: u64,
    pub new_errors: u64,
    pub closed_ok: u64,
    pub lost: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub config: SoakConfig,
    pub load: LoadCounts,
    pub policy_pushes: usize,
    /// Re-checks the destination ran, and their mean and total time.
    pub rechecks: f64,
    pub recheck_mean_ms: f64,
    pub rss: Vec<RssSample>,
    /// Descriptors of (source, destination) before the load and after it.
    pub fds_before: (usize, usize),
    pub fds_after: (usize, usize),
    /// How long after the load `fds_after` was counted.
    pub settled_ms: u64,
    /// Descriptors (source, destination) open then that were not before.
    pub fds_new: (Vec<String>, Vec<String>),
    /// Kernel-side resets or failures any mesh-node logged as an error.
    pub errors: Vec<String>,
}

impl SoakReport {
    /// Every error count of the run, summed.
    pub fn error_count(&self) -> u64 {
        self.load.open_errors
            + self.load.trickle_errors
            + self.load.new_errors
            + self.load.lost
            + self.errors.len() as u64
    }
}

fn fd_count(pid: u32) -> Result<usize> {
    Ok(fds(pid)?.len())
}

/// A process's descriptors as `N -> target` (`socket:[inode]`, a path, `anon_inode:…`).
fn fds(pid: u32) -> Result<Vec<String>> {
    let mut fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("list /proc/{pid}/fd"))?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let target = fs::read_link(entry.path()).ok()?;
            Some(format!(
                "{} -> {}",
                entry.file_name().to_string_lossy(),
                target.display()
            ))
        })
        .collect();
    fds.sort();
    Ok(fds)
}

/// A policy in the destination's namespace that allows the client, plus a rule naming
/// `other` (different each push, so every push changes what authorization depends on).
fn policy(other: usize) -> pb::Authorization {
    let principal = |p: String| pb::Match {
        principals: vec![pb::StringMatch {
            match_type: Some(pb::string_match::MatchType::Exact(p)),
        }],
        ..Default::default()
    };
    let rule = |m: pb::Match| pb::Rule {
        clauses: vec![pb::Clause { matches: vec![m] }],
    };
    pb::Authorization {
        name: "soak".into(),
        namespace: "default".into(),
        scope: pb::Scope::Namespace as i32,
        action: pb::Action::Allow as i32,
        rules: vec![
            rule(principal("cluster.local/ns/default/sa/client".into())),
            rule(principal(format!(
                "cluster.local/ns/default/sa/other-{other}"
            ))),
        ],
        ..Default::default()
    }
}

/// The destination's re-check histogram: (seconds in all, re-checks).
fn recheck_totals(netns: &std::path::Path) -> Result<(f64, f64)> {
    Ok((
        http_probe::total(netns, "mesh_authz_recheck_duration_seconds_sum", &[])?,
        http_probe::total(netns, "mesh_authz_recheck_duration_seconds_count", &[])?,
    ))
}

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Runs the soak, writes `<out_dir>/<name>.json` and `.md`, and returns the report.
pub fn run(config: &SoakConfig) -> Result<SoakReport> {
    raise_open_file_limit();
    let topo = Topology::two_nodes(
        vec![PodSpec::enrolled("client")],
        vec![PodSpec::enrolled("server")],
    );
    let client = topo.pod("client");
    sysctl(&client.netns, "net.ipv4.tcp_tw_reuse=1")?;
    sysctl(&client.netns, "net.ipv4.ip_local_port_range=1024 65000")?;
    let plane = ControlPlane::on_node1(&topo);
    plane.put_pods(&topo, &[("client", "node1"), ("server", "node2")]);
    plane.put_policy(policy(0));
    let source = plane.start_mesh_node(&topo, "node1");
    let destination = plane.start_mesh_node(&topo, "node2");
    let loadgen = sibling_binary("loadgen", "LOADGEN_BIN")?;
    let server = topo.pod("server");
    let addr = SocketAddr::from((server.ip, PORT));
    let _server = Server::start_program(&loadgen, &server.netns_path(), &server.cgroup, addr)
        .context("start loadgen serve")?;
    let pids = (
        source.pid().context("source mesh-node")?,
        destination.pid().context("destination mesh-node")?,
    );
    let soak_args = |conns: usize, seconds: u64, rate: u32| -> Vec<String> {
        vec![
            "soak".into(),
            addr.to_string(),
            conns.to_string(),
            seconds.to_string(),
            config.trickle_ms.to_string(),
            rate.to_string(),
        ]
    };
    // One connection first, so the tunnel's pool entry exists before descriptors are counted.
    let warm = podapp::command_of(
        &loadgen,
        &client.netns_path(),
        &client.cgroup,
        &soak_args(1, 1, 0),
    )?;
    let (mut warm, _files) = warm;
    let out = warm.output().context("warm-up")?;
    if !String::from_utf8_lossy(&out.stdout).contains("lost=0") {
        bail!(
            "warm-up connection failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    thread::sleep(Duration::from_millis(500));
    let listed_before = (fds(pids.0)?, fds(pids.1)?);
    let fds_before = (listed_before.0.len(), listed_before.1.len());

    let (mut cmd, _files) = podapp::command_of(
        &loadgen,
        &client.netns_path(),
        &client.cgroup,
        &soak_args(config.conns, config.seconds, config.rate),
    )?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start loadgen soak")?;
    let stdout = child.stdout.take().context("loadgen stdout")?;
    let (lines_tx, lines) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut load = LoadCounts::default();
    let mut rss = Vec::new();
    let mut pushes = 0;
    let netns2 = topo.node("node2").netns_path();
    let mut recheck_start = (0.0, 0.0);
    let started = Instant::now();
    let (mut next_push, mut next_sample) = (started, started);
    let open_timeout = Duration::from_secs(60) + Duration::from_millis(config.conns as u64 * 20);
    let deadline = started + open_timeout + Duration::from_secs(config.seconds + 60);
    loop {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the soak did not end by its deadline");
        }
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.starts_with("opened ") => {
                // Re-checks count from here: those of the start-up had nothing to decide.
                recheck_start = recheck_totals(&netns2)?;
                load.opened = field(&line, "ok");
                load.open_errors = field(&line, "errors");
                eprintln!(
                    "mesh-soak: {line} in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(line) if line.starts_with("progress ") => eprintln!("mesh-soak: {line}"),
            Ok(line) if line.starts_with("result ") => {
                load.trickles = field(&line, "trickles");
                load.trickle_errors = field(&line, "trickle_errors");
                load.new_ok = field(&line, "new_ok");
                load.new_errors = field(&line, "new_errors");
                load.closed_ok = field(&line, "closed_ok");
                load.lost = field(&line, "lost");
                eprintln!("mesh-soak: {line}");
                break;
            }
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("loadgen soak ended without a result: {:?}", child.wait())
            }
        }
        let now = Instant::now();
        // Pushes and samples run while the connections are held.
        if load.opened == 0 {
            continue;
        }
        if now >= next_push {
            pushes += 1;
            plane.put_policy(policy(pushes));
            next_push = now + Duration::from_millis(config.push_every_ms);
        }
        if now >= next_sample {
            let open = http_probe::total(&netns2, "mesh_connections_open", &[]).unwrap_or(-1.0);
            let sample = RssSample {
                seconds: started.elapsed().as_secs(),
                source_kib: proc_rss_kib(pids.0)?,
                destination_kib: proc_rss_kib(pids.1)?,
                open,
            };
            eprintln!(
                "mesh-soak: t={}s rss source {} KiB, destination {} KiB, destination open {open}",
                sample.seconds, sample.source_kib, sample.destination_kib
            );
            rss.push(sample);
            next_sample = now + Duration::from_millis(config.sample_every_ms);
        }
    }
    let _ = child.wait();
    let recheck_end = recheck_totals(&netns2)?;
    let (recheck_sum, rechecks) = (
        recheck_end.0 - recheck_start.0,
        recheck_end.1 - recheck_start.1,
    );
    // Descriptors are counted once both are back to their count before the load, or when
    // `settle_ms` is up: the pools close surplus connections only once they have been idle.
    let settling = Instant::now();
    let mut fds_after = (fd_count(pids.0)?, fd_count(pids.1)?);
    while (fds_after.0 > fds_before.0 || fds_after.1 > fds_before.1)
        && settling.elapsed() < Duration::from_millis(config.settle_ms)
    {
        thread::sleep(Duration::from_millis(500));
        fds_after = (fd_count(pids.0)?, fd_count(pids.1)?);
    }
    let settled_ms = settling.elapsed().as_millis() as u64;
    let new_fds = |pid: u32, before: &[String]| -> Result<Vec<String>> {
        Ok(fds(pid)?
            .into_iter()
            .filter(|fd| !before.contains(fd))
            .collect())
    };
    let fds_new = (
        new_fds(pids.0, &listed_before.0)?,
        new_fds(pids.1, &listed_before.1)?,
    );
    let errors = [(&source, "source"), (&destination, "destination")]
        .into_iter()
        .flat_map(|(mesh, which)| {
            mesh.log_lines_with(&[" ERROR "])
                .into_iter()
                .map(move |line| format!("{which}: {line}"))
        })
        .collect();
    let report = SoakReport {
        config: config.clone(),
        load,
        policy_pushes: pushes,
        rechecks,
        recheck_mean_ms: if rechecks > 0.0 {
            recheck_sum / rechecks * 1000.0
        } else {
            0.0
        },
        rss,
        fds_before,
        fds_after,
        settled_ms,
        fds_new,
        errors,
    };
    super::write_report(&config.out_dir, &config.name, &report, &markdown(&report))?;
    drop((source, destination));
    Ok(report)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The report as Markdown: the load, the errors, memory over time, re-check time, descriptors.
pub fn markdown(report: &SoakReport) -> String {
    let c = &report.config;
    let l = &report.load;
    let mut md = format!(
        "Soak: {} cross-node connections held {} s, 32 B echoed on each every {} ms, {} new \
         connections/s, a policy change every {} ms.\n\n",
        c.conns, c.seconds, c.trickle_ms, c.rate, c.push_every_ms
    );
    let rows = [
        (
            "held connections opened / failed",
            format!("{} / {}", l.opened, l.open_errors),
        ),
        (
            "trickle echoes ok / failed",
            format!("{} / {}", l.trickles, l.trickle_errors),
        ),
        (
            "new connections ok / failed",
            format!("{} / {}", l.new_ok, l.new_errors),
        ),
        (
            "held connections closed cleanly / lost",
            format!("{} / {}", l.closed_ok, l.lost),
        ),
        ("mesh-node error lines", report.errors.len().to_string()),
        (
            "policy pushes / re-checks at the destination",
            format!("{} / {}", report.policy_pushes, report.rechecks),
        ),
        (
            "one re-check of every live connection, mean",
            format!("{:.2} ms", report.recheck_mean_ms),
        ),
        (
            "descriptors before → after (source, destination), counted after",
            format!(
                "{} → {}, {} → {}, {:.1} s",
                report.fds_before.0,
                report.fds_after.0,
                report.fds_before.1,
                report.fds_after.1,
                report.settled_ms as f64 / 1000.0
            ),
        ),
    ];
    md.push_str("| | |\n|---|---|\n");
    for (what, value) in rows {
        md.push_str(&format!("| {what} | {value} |\n"));
    }
    md.push('\n');
    for (side, new) in [
        ("source", &report.fds_new.0),
        ("destination", &report.fds_new.1),
    ] {
        if !new.is_empty() {
            md.push_str(&format!(
                "Descriptors new at the {side}: {}.\n\n",
                new.join(", ")
            ));
        }
    }
    md.push_str("| t (s) | source RSS (MiB) | destination RSS (MiB) | destination open |\n");
    md.push_str("|---|---|---|---|\n");
    for s in &report.rss {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            s.seconds,
            mib(s.source_kib),
            mib(s.destination_kib),
            s.open
        ));
    }
    md
}
