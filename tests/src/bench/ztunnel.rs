//! Istio's ztunnel on the benchmark's cross-node path, for `--compare-ztunnel PATH`.
//!
//! Two more pods, `zclient` on node1 and `zserver` on node2, neither enrolled with mesh-node,
//! each with a ztunnel in its network namespace in dedicated mode (the way ztunnel's own docs
//! run it outside Kubernetes): a local config instead of xDS, its built-in test CA
//! (`FAKE_CA=true`), its default worker threads and log level. ztunnel does no capture of its
//! own; in dedicated mode the CNI's iptables rules redirect the pod's outbound connections to
//! its port 15001, so the benchmark adds one such rule in `zclient` for the one destination
//! the load goes to (`zserver:9000`). ztunnel's tunnel to `zserver:15008` does not match it.
//! The same `loadgen` against the same `loadgen serve` on the same link as mesh-node's
//! cross-node path; CPU and memory are the two ztunnel processes'.
use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use tokio::net::TcpStream;

use super::PORT;
use crate::{Topology, hbone_client};

/// The client and server pods of the ztunnel path.
pub(super) const CLIENT: &str = "zclient";
pub(super) const SERVER: &str = "zserver";

/// ztunnel's local config: both pods as HBONE workloads.
fn config(topo: &Topology) -> String {
    let mut yaml = String::from("workloads:\n");
    for (pod, node) in [(CLIENT, "node1"), (SERVER, "node2")] {
        let ip = topo.pod(pod).ip;
        yaml.push_str(&format!(
            "- uid: Kubernetes//Pod/default/{pod}\n  name: {pod}\n  workloadName: {pod}\n  \
             workloadType: deployment\n  namespace: default\n  trustDomain: cluster.local\n  \
             serviceAccount: {pod}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  \
             node: {node}\n  services: {{}}\n"
        ));
    }
    yaml.push_str("services: []\n");
    yaml
}

/// The two ztunnels; killed on drop.
pub(super) struct Ztunnels {
    pub(super) client: Ztunnel,
    pub(super) server: Ztunnel,
}

impl Ztunnels {
    /// Starts one ztunnel in each pod and waits until both accept.
    pub(super) fn start(bin: &Path, topo: &Topology) -> Result<Self> {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let generation = STARTS.fetch_add(1, Ordering::Relaxed);
        let config_path = topo.workdir.join("ztunnel.yaml");
        fs::write(&config_path, config(topo)).context("write ztunnel's config")?;
        let start = |pod| Ztunnel::start(bin, topo, pod, &config_path, generation);
        Ok(Self {
            client: start(CLIENT)?,
            server: start(SERVER)?,
        })
    }

    pub(super) fn pids(&self) -> Vec<u32> {
        vec![self.client.0.pid(), self.server.0.pid()]
    }

    /// The figures count only if the load went through ztunnel: its client logged completed
    /// outbound connections to the server pod.
    pub(super) fn check_route(&self, target: &str) -> Result<()> {
        let log = self.client.0.log_text();
        let carried = log
            .lines()
            .filter(|l| l.contains("connection complete") && l.contains(target))
            .count();
        ensure!(
            carried > 0,
            "ztunnel in {CLIENT} logged no completed connection to {target}; its log:\n{}",
            self.client.0.log_tail()
        );
        Ok(())
    }
}

/// One pod's ztunnel, started and ready.
pub(super) struct Ztunnel(crate::ztunnel::Ztunnel);

impl Ztunnel {
    fn start(
        bin: &Path,
        topo: &Topology,
        pod_name: &str,
        config: &Path,
        generation: usize,
    ) -> Result<Self> {
        let pod = topo.pod(pod_name);
        let log = topo
            .workdir
            .join(format!("ztunnel-{pod_name}-{generation}.log"));
        let workload = format!("default/{pod_name}/{pod_name}");
        let mut z = crate::ztunnel::Ztunnel::spawn(
            bin,
            &pod.netns_path(),
            config,
            &[
                ("PROXY_WORKLOAD_INFO", &workload),
                // Without IP_TRANSPARENT, as mesh-node's benchmark runs it (no original source).
                ("ENABLE_ORIG_SRC", "false"),
            ],
            log,
            &topo.workdir,
        )?;
        let listeners = [
            SocketAddr::from((pod.ip, 15008)),
            SocketAddr::from(([127, 0, 0, 1], 15001)),
        ];
        let netns_path = pod.netns_path();
        let ready = |z: &crate::ztunnel::Ztunnel| {
            z.says_ready()
                && hbone_client::run_in(&netns_path, || async {
                    for addr in listeners {
                        if TcpStream::connect(addr).await.is_err() {
                            return false;
                        }
                    }
                    true
                })
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ready(&z) {
            if let Some(status) = z.exited()? {
                bail!(
                    "ztunnel in {pod_name} exited ({status}); its log:\n{}",
                    z.log_tail()
                );
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "ztunnel in {pod_name} not ready after 20 s; its log:\n{}",
                    z.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self(z))
    }
}

/// Sends `zclient`'s connections to the server pod's port to its ztunnel, as the CNI's rule
/// does for a dedicated-mode ztunnel.
pub(super) fn redirect_outbound(topo: &Topology) -> Result<()> {
    let server = topo.pod(SERVER).ip;
    let netns = topo.pod(CLIENT).netns_path();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d"])
        .arg(server.to_string())
        .args([
            "--dport",
            &PORT.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ])
        .output()
        .context("run iptables (apt-get install iptables)")?;
    ensure!(
        out.status.success(),
        "iptables in {CLIENT}'s namespace: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
