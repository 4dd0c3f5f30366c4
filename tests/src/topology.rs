//! Nodes and pods out of network namespaces.
//!
//! Addressing: node `i` (1-based) owns pod subnet 198.18.i.0/24 (RFC 2544 test range) and has
//! 198.19.0.i on the node-to-node link; pod `j` on node `i` is 198.18.i.(10+j) behind its own
//! veth, with the node answering as 198.18.i.1. A dual-stack topology adds IPv6 beside every
//! address: pods fd00:18:i::(10+j), their node fd00:18:i::1, the link fd00:19::i. Every
//! interface is created directly inside the namespaces it belongs to, so the machine's own
//! network is never touched.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail, ensure};

/// Prefix of every namespace, cgroup and pin directory the harness creates.
const PREFIX: &str = "meshtest";

/// The trust domain of the test meshes.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// A node to build, with its pods.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: &'static str,
    pub pods: Vec<PodSpec>,
}

/// A pod to build. `enrolled` pods are listed in the node's pods file.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: &'static str,
    pub enrolled: bool,
    /// Kubernetes namespace ("default" unless set); the service account is the pod's name.
    pub namespace: &'static str,
    /// Its DNS queries go to mesh-node (pods file `dnsCapture`; default true).
    pub dns_capture: bool,
    /// In a dual-stack topology: IPv6 only (no IPv4 address on its interface or in the files).
    pub ipv6_only: bool,
}

impl PodSpec {
    pub fn enrolled(name: &'static str) -> Self {
        Self {
            name,
            enrolled: true,
            namespace: "default",
            dns_capture: true,
            ipv6_only: false,
        }
    }
    pub fn plain(name: &'static str) -> Self {
        Self {
            name,
            enrolled: false,
            namespace: "default",
            dns_capture: true,
            ipv6_only: false,
        }
    }
    /// An IPv6-only pod (in a dual-stack topology).
    pub fn ipv6_only(self) -> Self {
        Self {
            ipv6_only: true,
            ..self
        }
    }
    pub fn in_namespace(self, namespace: &'static str) -> Self {
        Self { namespace, ..self }
    }
    /// Enrolled, but its DNS queries are left alone (`dnsCapture: false`).
    pub fn without_dns_capture(self) -> Self {
        Self {
            dns_capture: false,
            ..self
        }
    }
}

#[derive(Debug)]
pub struct Node {
    pub name: &'static str,
    pub netns: String,
    /// Attach point of this node's mesh-node; pods' cgroups are below it.
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub pods_file: PathBuf,
    pub pods: Vec<Pod>,
}

impl Node {
    /// The node's network namespace file, for `setns`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
}

#[derive(Debug)]
pub struct Pod {
    pub name: &'static str,
    pub namespace: &'static str,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, in a dual-stack topology.
    pub ip6: Option<Ipv6Addr>,
    pub cgroup: PathBuf,
    pub enrolled: bool,
    pub dns_capture: bool,
    /// It has no IPv4 address (`ip` is only reserved for it).
    pub ipv6_only: bool,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// Its addresses: IPv4 (unless IPv6-only), then IPv6 when it has one.
    pub fn ips(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.ip))
            .filter(|_| !self.ipv6_only)
            .chain(self.ip6.map(IpAddr::V6))
            .collect()
    }

    /// Its IPv6 address; panics in a topology without IPv6.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ip6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address", self.name))
    }
}

/// Pod `j` (0-based) of node `i` (1-based) in a dual-stack topology.
pub fn pod_ipv6(node: u8, j: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x18,
        u16::from(node),
        0,
        0,
        0,
        0,
        0x10 + u16::from(j),
    )
}

/// The built topology; dropping it removes everything it made.
#[derive(Debug)]
pub struct Topology {
    pub id: String,
    pub nodes: Vec<Node>,
    pub workdir: PathBuf,
    cgroup_root: PathBuf,
    namespaces: Vec<String>,
    /// Pods and node links have IPv6 addresses too.
    pub dual_stack: bool,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn two_node_specs(node1: Vec<PodSpec>, node2: Vec<PodSpec>) -> [NodeSpec; 2] {
    [
        NodeSpec {
            name: "node1",
            pods: node1,
        },
        NodeSpec {
            name: "node2",
            pods: node2,
        },
    ]
}

impl Topology {
    /// The scenarios' usual cluster: `node1` and `node2`, linked, with these pods; panics (a
    /// test set-up failure) with the reason if it cannot be built.
    pub fn two_nodes(node1: Vec<PodSpec>, node2: Vec<PodSpec>) -> Self {
        Self::build(&two_node_specs(node1, node2))
            .unwrap_or_else(|error| panic!("build the two-node topology: {error:#}"))
    }

    pub fn build(specs: &[NodeSpec]) -> Result<Self> {
        Self::build_routed(specs, |_, _| true)
    }

    /// [`Topology::two_nodes`], every pod and node link with an IPv6 address beside its IPv4.
    pub fn two_nodes_dual_stack(node1: Vec<PodSpec>, node2: Vec<PodSpec>) -> Self {
        Self::build_with(&two_node_specs(node1, node2), &|_, _| true, true)
            .unwrap_or_else(|error| panic!("build the dual-stack topology: {error:#}"))
    }

    /// As [`Topology::build`], every node on one shared segment (a bridge in a namespace of
    /// its own when there are more than two), where node `a` routes to the pods of node `b`
    /// only when `routes(a, b)`: clusters whose pods can reach each other only through a
    /// gateway node are built this way.
    pub fn build_routed(specs: &[NodeSpec], routes: impl Fn(&str, &str) -> bool) -> Result<Self> {
        Self::build_with(specs, &routes, false)
    }

    fn build_with(
        specs: &[NodeSpec],
        routes: &dyn Fn(&str, &str) -> bool,
        dual_stack: bool,
    ) -> Result<Self> {
        sweep_leftovers();
        let id = format!(
            "{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup_root = cgroup2_mount()?.join(format!("{PREFIX}-{id}"));
        let workdir = std::env::temp_dir().join(format!("{PREFIX}-{id}"));
        let mut topo = Topology {
            id,
            nodes: Vec::new(),
            workdir,
            cgroup_root,
            namespaces: Vec::new(),
            dual_stack,
        };
        // From here on, Drop cleans up whatever was made, also on error.
        fs::create_dir_all(&topo.workdir)?;
        fs::create_dir_all(&topo.cgroup_root)?;
        for (index, spec) in specs.iter().enumerate() {
            let node = topo.build_node(index as u8 + 1, spec)?;
            topo.nodes.push(node);
        }
        topo.link_nodes(routes)?;
        for node in &topo.nodes {
            write_pods_file(node)?;
        }
        mesh_node::identity::file_ca::FileCa::init(&topo.ca_dir(), TRUST_DOMAIN)
            .context("create the mesh root")?;
        topo.write_state_file(&topo.state_file(), |_| None)?;
        Ok(topo)
    }

    /// The file CA shared by every node's mesh-node (`mesh-node ca init`).
    pub fn ca_dir(&self) -> PathBuf {
        self.workdir.join("ca")
    }

    /// The local state file: every enrolled pod as an HBONE workload whose service account is
    /// its name, every plain pod as a non-mesh workload.
    pub fn state_file(&self) -> PathBuf {
        self.workdir.join("mesh-state.yaml")
    }

    /// Writes a state file like [`Topology::state_file`] to `path`, with the service account of
    /// some pods replaced (`override_sa(pod name)`), for identity-mismatch tests.
    pub fn write_state_file(
        &self,
        path: &Path,
        override_sa: impl Fn(&str) -> Option<&'static str>,
    ) -> Result<()> {
        let mut yaml = String::from("workloads:\n");
        for node in &self.nodes {
            for pod in &node.pods {
                let sa = override_sa(pod.name).unwrap_or(pod.name);
                let protocol = if pod.enrolled { "HBONE" } else { "NONE" };
                let addresses = join(&pod.ips());
                yaml.push_str(&format!(
                    "  - name: {}\n    namespace: {}\n    serviceAccount: {sa}\n    addresses: [{addresses}]\n    node: {}\n    tunnelProtocol: {protocol}\n",
                    pod.name, pod.namespace, node.name
                ));
            }
        }
        fs::write(path, yaml).with_context(|| format!("write {}", path.display()))
    }

    /// `mesh-node run` arguments that turn HBONE on with this topology's CA and state file.
    pub fn hbone_args(&self) -> Vec<String> {
        vec![
            "--ca-dir".into(),
            self.ca_dir().display().to_string(),
            "--local-xds".into(),
            self.state_file().display().to_string(),
        ]
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// A cgroup for processes that run in a node's own namespace (host-network processes),
    /// below the node's attach point so that the hooks do see them.
    pub fn host_cgroup(&self, node: &str) -> Result<PathBuf> {
        let path = self.node(node).cgroup.join("host");
        fs::create_dir_all(&path)?;
        Ok(path)
    }

    fn add_netns(&mut self, name: String) -> Result<String> {
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    fn build_node(&mut self, index: u8, spec: &NodeSpec) -> Result<Node> {
        let netns = self.add_netns(format!("{PREFIX}-{}-{}", self.id, spec.name))?;
        sysctl(&netns, "net.ipv4.ip_forward=1")?;
        // Pods think their /24 is on-link: the node answers ARP for its other pods, so that
        // pods on one node reach each other without the mesh (as a waypoint pod is reached).
        sysctl(&netns, "net.ipv4.conf.all.proxy_arp=1")?;
        if self.dual_stack {
            sysctl(&netns, "net.ipv6.conf.all.forwarding=1")?;
        }
        let cgroup = self.cgroup_root.join(spec.name);
        fs::create_dir_all(&cgroup)?;
        let bpffs =
            PathBuf::from("/sys/fs/bpf").join(format!("{PREFIX}-{}-{}", self.id, spec.name));
        let gateway = Ipv4Addr::new(198, 18, index, 1);
        let mut pods = Vec::new();
        for (j, pod) in spec.pods.iter().enumerate() {
            let pod_ns = self.add_netns(format!("{PREFIX}-{}-{}", self.id, pod.name))?;
            let ip_addr = Ipv4Addr::new(198, 18, index, 10 + j as u8);
            let host_if = format!("p{j}");
            ip(&[
                "-n", &netns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
                "netns", &pod_ns,
            ])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{gateway}/32"),
                "dev",
                &host_if,
            ])?;
            ip(&["-n", &netns, "link", "set", &host_if, "up"])?;
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                &format!("{ip_addr}/32"),
                "dev",
                &host_if,
            ])?;
            let ipv4 = !(pod.ipv6_only && self.dual_stack);
            if ipv4 {
                ip(&[
                    "-n",
                    &pod_ns,
                    "addr",
                    "add",
                    &format!("{ip_addr}/24"),
                    "dev",
                    "eth0",
                ])?;
            }
            ip(&["-n", &pod_ns, "link", "set", "eth0", "up"])?;
            if ipv4 {
                ip(&[
                    "-n",
                    &pod_ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &gateway.to_string(),
                ])?;
            }
            let ip6 = self.dual_stack.then(|| pod_ipv6(index, j as u8));
            if let Some(ip6) = ip6 {
                // A /128 each side, no duplicate-address wait: the pod reaches everything
                // through its node, as over IPv4.
                let gateway6 = Ipv6Addr::new(0xfd00, 0x18, u16::from(index), 0, 0, 0, 0, 1);
                let (gw, addr) = (format!("{gateway6}/128"), format!("{ip6}/128"));
                ip(&[
                    "-n", &netns, "-6", "addr", "add", &gw, "dev", &host_if, "nodad",
                ])?;
                ip(&["-n", &netns, "-6", "route", "add", &addr, "dev", &host_if])?;
                ip(&[
                    "-n", &pod_ns, "-6", "addr", "add", &addr, "dev", "eth0", "nodad",
                ])?;
                let gw = gateway6.to_string();
                ip(&["-n", &pod_ns, "-6", "route", "add", &gw, "dev", "eth0"])?;
                ip(&["-n", &pod_ns, "-6", "route", "add", "default", "via", &gw])?;
            }
            let pod_cgroup = cgroup.join(pod.name);
            fs::create_dir_all(&pod_cgroup)?;
            pods.push(Pod {
                name: pod.name,
                namespace: pod.namespace,
                netns: pod_ns,
                ip: ip_addr,
                ip6,
                cgroup: pod_cgroup,
                enrolled: pod.enrolled,
                dns_capture: pod.dns_capture,
                ipv6_only: pod.ipv6_only,
            });
        }
        let pods_file = self.workdir.join(format!("{}-pods.yaml", spec.name));
        Ok(Node {
            name: spec.name,
            netns,
            cgroup,
            bpffs,
            pods_file,
            pods,
        })
    }

    /// Two nodes: one veth between them. More: a bridge in a namespace of its own, each node
    /// on it by a veth. Node `i` is 198.19.0.i on it and routes to the pods of each node it
    /// `routes` to.
    fn link_nodes(&mut self, routes: &dyn Fn(&str, &str) -> bool) -> Result<()> {
        let count = self.nodes.len();
        ensure!(count < 200, "the harness links fewer than 200 nodes");
        if count < 2 {
            return Ok(());
        }
        if count == 2 {
            let (a, b) = (self.nodes[0].netns.clone(), self.nodes[1].netns.clone());
            ip(&[
                "-n", &a, "link", "add", "n0", "type", "veth", "peer", "name", "n0", "netns", &b,
            ])?;
        } else {
            let wan = self.add_netns(format!("{PREFIX}-{}-wan", self.id))?;
            ip(&["-n", &wan, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &wan, "link", "set", "br0", "up"])?;
            for (i, node) in self.nodes.iter().enumerate() {
                let port = format!("v{i}");
                ip(&[
                    "-n",
                    &wan,
                    "link",
                    "add",
                    &port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "n0",
                    "netns",
                    &node.netns,
                ])?;
                ip(&["-n", &wan, "link", "set", &port, "master", "br0"])?;
                ip(&["-n", &wan, "link", "set", &port, "up"])?;
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let ns = &node.netns;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("198.19.0.{}/24", i + 1),
                "dev",
                "n0",
            ])?;
            if self.dual_stack {
                let link = format!("fd00:19::{}/64", i + 1);
                ip(&["-n", ns, "-6", "addr", "add", &link, "dev", "n0", "nodad"])?;
            }
            ip(&["-n", ns, "link", "set", "n0", "up"])?;
            for (j, other) in self.nodes.iter().enumerate() {
                if i == j || !routes(node.name, other.name) {
                    continue;
                }
                ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &format!("198.18.{}.0/24", j + 1),
                    "via",
                    &format!("198.19.0.{}", j + 1),
                ])?;
                if self.dual_stack {
                    ip(&[
                        "-n",
                        ns,
                        "-6",
                        "route",
                        "add",
                        &format!("fd00:18:{:x}::/64", j + 1),
                        "via",
                        &format!("fd00:19::{}", j + 1),
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// Node `name`'s address on the segment between the nodes.
    pub fn link_ip(&self, name: &str) -> Ipv4Addr {
        let index = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"));
        Ipv4Addr::new(198, 19, 0, index as u8 + 1)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Processes are owned (and killed) by their handles, which tests drop before this.
        for ns in self.namespaces.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
        for node in &self.nodes {
            let _ = fs::remove_dir_all(&node.bpffs);
        }
        remove_cgroup_tree(&self.cgroup_root);
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

fn write_pods_file(node: &Node) -> Result<()> {
    let mut yaml = String::from("pods:\n");
    for pod in node.pods.iter().filter(|p| p.enrolled) {
        yaml.push_str(&format!(
            "  - name: {}\n    namespace: {}\n    serviceAccount: {}\n    netns: {}\n    ips: [{}]\n",
            pod.name,
            pod.namespace,
            pod.name,
            pod.netns_path().display(),
            join(&pod.ips())
        ));
        if !pod.dns_capture {
            yaml.push_str("    dnsCapture: false\n");
        }
    }
    fs::write(&node.pods_file, yaml).with_context(|| format!("write {}", node.pods_file.display()))
}

/// Addresses as a YAML flow list: IPv4 bare (as tests that edit these files expect), IPv6
/// quoted.
fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|ip| match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"{v6}\""),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Sets a sysctl inside `netns` (`key=value`).
pub fn sysctl(netns: &str, setting: &str) -> Result<()> {
    let (key, value) = setting.split_once('=').context("sysctl setting")?;
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "sh",
            "-c",
            &format!("echo {value} > {path}"),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "sysctl {setting} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The cgroup2 mount point, found the same way mesh-node finds it (never assumed).
pub fn cgroup2_mount() -> Result<PathBuf> {
    Ok(mesh_node::preflight::cgroup2_mount()?)
}

/// Removes a cgroup directory tree bottom-up (cgroupfs only allows rmdir of empty cgroups).
fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(path);
}

/// Removes namespaces, cgroups, pin directories and work directories left by harness runs whose
/// process no longer exists (a run killed before its Drop ran).
fn sweep_leftovers() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX).and_then(|r| r.strip_prefix('-')) else {
            return false;
        };
        let pid = rest.split('x').next().unwrap_or("");
        pid.parse::<u32>()
            .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|it| {
                it.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    for name in names(Path::new("/run/netns"))
        .into_iter()
        .filter(|n| dead(n))
    {
        let _ = ip(&["netns", "del", &name]);
    }
    for name in names(Path::new("/sys/fs/bpf"))
        .into_iter()
        .filter(|n| dead(n))
    {
        let _ = fs::remove_dir_all(Path::new("/sys/fs/bpf").join(name));
    }
    if let Ok(mount) = cgroup2_mount() {
        for name in names(&mount).into_iter().filter(|n| dead(n)) {
            remove_cgroup_tree(&mount.join(name));
        }
    }
    let tmp = std::env::temp_dir();
    for name in names(&tmp).into_iter().filter(|n| dead(n)) {
        let _ = fs::remove_dir_all(tmp.join(name));
    }
}
