//! What a kubelet would have made of a harness pod, for the Kubernetes enrollment tests: the
//! pod object the API server serves, and a sandbox process in the pod's network namespace
//! inside a cgroup named as the kubelet names pod cgroups (systemd or cgroupfs driver), below
//! the node's attach point.
use std::{
    fs,
    path::PathBuf,
    process::{Child, Stdio},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{Topology, podapp};

/// The kubelet's cgroup driver, which decides how pod cgroups are named.
#[derive(Clone, Copy, Debug)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`
    Systemd,
    /// `kubepods/besteffort/pod<uid>/<id>`
    Cgroupfs,
}

/// A pod's UID, unique per test run (the form the API server gives: a UUID).
pub fn pod_uid(topo: &Topology, pod: &str) -> String {
    let hash = pod.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    let id: u64 = topo
        .id
        .bytes()
        .fold(0, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (hash >> 32) as u32,
        (hash >> 16) as u16,
        hash as u16 & 0xfff,
        id as u16 & 0xfff,
        (id ^ hash) & 0xffff_ffff_ffff
    )
}

/// The pod as the API server serves it: running on its node with its IP, service account =
/// pod name, plus `extra` merged in (labels, annotations, status…).
pub fn pod_object(topo: &Topology, pod: &str, extra: Value) -> Value {
    let node = topo
        .nodes
        .iter()
        .find(|n| n.pods.iter().any(|p| p.name == pod))
        .unwrap_or_else(|| panic!("no pod {pod}"));
    let p = topo.pod(pod);
    let mut object = json!({
        "metadata": {"name": p.name, "namespace": p.namespace, "uid": pod_uid(topo, pod)},
        "spec": {
            "nodeName": node.name, "serviceAccountName": p.name,
            "containers": [{"name": "app", "image": "podapp"}]
        },
        "status": {
            "phase": "Running", "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}]
        }
    });
    merge(&mut object, extra);
    object
}

fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

/// The pod's sandbox process; killed (and its cgroups removed) when dropped.
#[derive(Debug)]
pub struct Sandbox {
    child: Child,
    /// Innermost first.
    cgroups: Vec<PathBuf>,
}

impl Sandbox {
    /// Starts a long sleep in the pod's network namespace, in the cgroup the kubelet would
    /// give the pod's sandbox container.
    pub fn start(topo: &Topology, pod: &str, driver: CgroupDriver) -> Result<Self> {
        let node = topo
            .nodes
            .iter()
            .find(|n| n.pods.iter().any(|p| p.name == pod))
            .with_context(|| format!("no pod {pod}"))?;
        let uid = pod_uid(topo, pod);
        let parts: Vec<String> = match driver {
            CgroupDriver::Systemd => vec![
                "kubepods.slice".into(),
                "kubepods-besteffort.slice".into(),
                format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")),
                format!("cri-containerd-{}.scope", &uid[..8]),
            ],
            CgroupDriver::Cgroupfs => vec![
                "kubepods".into(),
                "besteffort".into(),
                format!("pod{uid}"),
                uid[..8].to_owned(),
            ],
        };
        let mut cgroups = Vec::new();
        let mut path = node.cgroup.clone();
        for part in parts {
            path = path.join(part);
            if !path.exists() {
                fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
                cgroups.push(path.clone());
            }
        }
        cgroups.reverse();
        let (mut cmd, _files) = podapp::command_of(
            std::path::Path::new("/bin/sleep"),
            &topo.pod(pod).netns_path(),
            &path,
            &["3600".to_owned()],
        )?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the sandbox process")?;
        Ok(Self { child, cgroups })
    }

    /// Ends the sandbox (as a pod's last process exiting).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop();
        for cgroup in &self.cgroups {
            let _ = fs::remove_dir(cgroup);
        }
    }
}
