//! Taking the figures: the load generator in the pods, held connections, the mesh-nodes'
//! memory and CPU.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, ChildStdin, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use super::{
    Config, PORT, Route,
    proc::{
        descriptors_needed, proc_context_switches, proc_cpu_seconds, proc_rss_anon_kib,
        proc_rss_kib,
    },
    ztunnel::Ztunnels,
};
use crate::{MeshNode, Topology, podapp};

#[derive(Default)]
pub(super) struct Samples(pub(super) BTreeMap<(String, Route), Vec<f64>>);

impl Samples {
    pub(super) fn add(&mut self, key: &str, route: Route, value: f64) {
        self.0
            .entry((key.to_owned(), route))
            .or_default()
            .push(value);
    }

    pub(super) fn take(&mut self, key: &str, route: Route) -> Vec<f64> {
        self.0.remove(&(key.to_owned(), route)).unwrap_or_default()
    }
}

pub(super) struct Bench<'a> {
    pub(super) config: &'a Config,
    pub(super) topo: &'a Topology,
    pub(super) loadgen: PathBuf,
}

/// What a run found: figures, failures, and what could not be measured.
#[derive(Default)]
pub(super) struct Found {
    pub(super) samples: Samples,
    pub(super) errors: Vec<String>,
    pub(super) notes: Vec<String>,
}

impl Bench<'_> {
    /// mesh-node's resident memory on fresh processes: idle, then holding each count of open
    /// connections in turn.
    pub(super) fn memory(&self, route: Route, open_files: u64, found: &mut Found) -> Result<()> {
        let meshes = self.start_meshes()?;
        thread::sleep(self.config.settle());
        found.samples.add("rss_idle", route, meshes.rss_mib(route)?);
        found
            .samples
            .add("rss_idle_anon", route, meshes.rss_anon_mib(route)?);
        if route == Route::CrossCluster {
            found
                .samples
                .add("gateway_rss_idle", route, meshes.gateway_rss_mib()?);
        }
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
            if route == Route::CrossCluster {
                found.samples.add(
                    &format!("gateway_rss_{n}"),
                    route,
                    meshes.gateway_rss_mib()?,
                );
            }
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
            "bench: {} peak of {n} open connections: {at_peak:.1} MiB (proxy pids {:?}); closing them",
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
    pub(super) fn throughput(
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
        if route != Route::Direct {
            let gb = out.get("bytes")? / 1e9;
            found
                .samples
                .add(&format!("cpu_per_gb_{streams}"), route, cpu / gb);
        }
        Ok(())
    }

    pub(super) fn latency(
        &self,
        tag: &str,
        route: Route,
        meshes: &Meshes,
        found: &mut Found,
    ) -> Result<()> {
        let switches_before = meshes.context_switches(route)?;
        let cpu_before = meshes.cpu_seconds(route)?;
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
        if route != Route::Direct {
            // Every request of the run, warm-up included, at the fixed rate.
            let requests = f64::from(self.config.latency_rate)
                * (self.config.warmup + self.config.duration).as_secs_f64();
            let switches = meshes.context_switches(route)? - switches_before;
            found
                .samples
                .add("switches_per_request", route, switches as f64 / requests);
            let cpu = meshes.cpu_seconds(route)? - cpu_before;
            found
                .samples
                .add("cpu_per_request", route, cpu * 1e6 / requests);
        }
        eprintln!(
            "bench: {tag} latency p50 {:.0} µs, p99 {:.0} µs",
            out.get("p50_us")?,
            out.get("p99_us")?
        );
        Ok(())
    }

    pub(super) fn connrate(&self, tag: &str, route: Route, found: &mut Found) -> Result<()> {
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

    pub(super) fn start_meshes(&self) -> Result<Meshes> {
        let with = |extra: &[&str]| -> Vec<String> {
            self.config
                .mesh_args
                .iter()
                .cloned()
                .chain(extra.iter().map(|arg| (*arg).to_owned()))
                .collect()
        };
        let start = |node: &str, args: Vec<String>| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            MeshNode::start_hbone(self.topo, node, &args)
        };
        let gateway = {
            let mut args = self.topo.hbone_args();
            args.extend(with(&[
                "--network",
                "net2",
                "--gateway-listen",
                &format!("{}:15008", self.topo.link_ip("gw")),
            ]));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            MeshNode::start_gateway(self.topo, "gw", &args)?
        };
        Ok(Meshes {
            node1: start("node1", with(&[]))?,
            // node2's outbound is only the full-TLS cross-cluster path's.
            node2: start("node2", with(&["--inner-tls-resumption", "false"]))?,
            node3: start("node3", with(&["--network", "net2"]))?,
            gw: gateway,
            ztunnel: match &self.config.ztunnel {
                Some(bin) if self.config.routes.contains(&Route::Ztunnel) => {
                    Some(Ztunnels::start(bin, self.topo)?)
                }
                _ => None,
            },
        })
    }

    pub(super) fn target(&self, route: Route) -> String {
        match route {
            Route::CrossCluster | Route::CrossClusterFullTls => {
                SocketAddr::from((super::FAR_VIP, PORT)).to_string()
            }
            _ => SocketAddr::from((self.topo.pod(route.server()).ip, PORT)).to_string(),
        }
    }

    /// Runs `loadgen <mode> <target> <args…> <durations in ms…>` in the path's client pod and
    /// returns its `result` line.
    pub(super) fn client(
        &self,
        route: Route,
        args: &[String],
        durations: &[Duration],
    ) -> Result<Outcome> {
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

    /// The figures are only worth something if each path went where it says: the source
    /// node's mesh-node logged the captured paths' connections with their route, and none of
    /// the direct ones.
    pub(super) fn check_routes(&self, meshes: &Meshes) -> Result<()> {
        for &route in &self.config.routes {
            if route == Route::Ztunnel {
                let ztunnel = meshes.ztunnel.as_ref().context("ztunnel is not running")?;
                ztunnel.check_route(&self.target(route))?;
                continue;
            }
            let dst = format!("original_dst={}", self.target(route));
            let source = match route {
                Route::CrossClusterFullTls => &meshes.node2,
                _ => &meshes.node1,
            };
            let carried = source.log_lines_with(&["outbound connection closed", &dst]);
            match route.logged_route() {
                None => ensure!(
                    carried.is_empty(),
                    "the direct path went through mesh-node: {}",
                    carried[0]
                ),
                Some(how) => ensure!(
                    carried.iter().any(|line| line.contains(how)),
                    "the source mesh-node logged no {} connection with {how}",
                    route.key()
                ),
            }
        }
        Ok(())
    }

    /// Holds `n` connections open on `route`, notes any that failed (as `what` connections),
    /// and lets mesh-node settle.
    pub(super) fn hold_counted(
        &self,
        route: Route,
        n: usize,
        what: &str,
        found: &mut Found,
    ) -> Result<Held> {
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

    pub(super) fn hold(&self, route: Route, n: usize) -> Result<Held> {
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
pub(super) struct Held {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    errors: usize,
}

impl Held {
    pub(super) fn close(mut self) -> Result<()> {
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

pub(super) struct Meshes {
    node1: MeshNode,
    node2: MeshNode,
    node3: MeshNode,
    gw: MeshNode,
    ztunnel: Option<Ztunnels>,
}

impl Meshes {
    pub(super) fn pids(&self, route: Route) -> Result<Vec<u32>> {
        if route == Route::Ztunnel {
            let ztunnel = self.ztunnel.as_ref().context("ztunnel is not running")?;
            return Ok(ztunnel.pids());
        }
        route
            .mesh_nodes()
            .iter()
            .map(|node| {
                self.node(node)
                    .pid()
                    .with_context(|| format!("mesh-node on {node} is not running"))
            })
            .collect()
    }

    fn node(&self, name: &str) -> &MeshNode {
        match name {
            "node1" => &self.node1,
            "node2" => &self.node2,
            "node3" => &self.node3,
            _ => &self.gw,
        }
    }

    /// Resident memory of the gateway alone.
    pub(super) fn gateway_rss_mib(&self) -> Result<f64> {
        let pid = self.gw.pid().context("the gateway is not running")?;
        Ok(proc_rss_kib(pid)? as f64 / 1024.0)
    }

    /// Resident memory of the path's mesh-nodes together.
    pub(super) fn rss_mib(&self, route: Route) -> Result<f64> {
        let mut kib = 0;
        for pid in self.pids(route)? {
            kib += proc_rss_kib(pid)?;
        }
        Ok(kib as f64 / 1024.0)
    }

    /// The anonymous part of the path's mesh-nodes' resident memory, together.
    pub(super) fn rss_anon_mib(&self, route: Route) -> Result<f64> {
        let mut kib = 0;
        for pid in self.pids(route)? {
            kib += proc_rss_anon_kib(pid)?;
        }
        Ok(kib as f64 / 1024.0)
    }

    /// Context switches of every thread of the path's mesh-nodes so far, together.
    pub(super) fn context_switches(&self, route: Route) -> Result<u64> {
        let mut total = 0;
        for pid in self.pids(route)? {
            total += proc_context_switches(pid)?;
        }
        Ok(total)
    }

    /// User + system CPU time of the path's mesh-nodes together.
    pub(super) fn cpu_seconds(&self, route: Route) -> Result<f64> {
        let mut total = 0.0;
        for pid in self.pids(route)? {
            total += proc_cpu_seconds(pid)?;
        }
        Ok(total)
    }
}

/// A `key=value …` line from loadgen.
pub(super) struct Outcome(BTreeMap<String, f64>);

impl Outcome {
    pub(super) fn parse(line: &str) -> Result<Self> {
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

    pub(super) fn get(&self, key: &str) -> Result<f64> {
        self.0
            .get(key)
            .copied()
            .with_context(|| format!("loadgen result has no {key}"))
    }
}
