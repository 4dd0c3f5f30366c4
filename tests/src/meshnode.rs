//! A mesh-node process running in a node's namespace, logging to a file the test can read.
use std::{
    fs::{self, File},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::topology::{Node, Topology};

const READY_LINE: &str = "mesh-node is ready";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The mesh-node binary: `MESH_NODE_BIN`, else the workspace's debug build.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MESH_NODE_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug/mesh-node")
}

/// A running mesh-node; killed when dropped.
#[derive(Debug)]
pub struct MeshNode {
    child: Option<Child>,
    pub log: PathBuf,
}

impl MeshNode {
    /// Starts mesh-node for `node` with extra arguments and waits until it reports ready.
    pub fn start(topo: &Topology, node: &str, extra: &[&str]) -> Result<Self> {
        let mut mesh = Self::spawn(topo, node, extra)?;
        mesh.wait_ready()?;
        Ok(mesh)
    }

    /// Starts mesh-node with HBONE on (the topology's CA and state file) plus `extra`.
    pub fn start_hbone(topo: &Topology, node: &str, extra: &[&str]) -> Result<Self> {
        let mut args = topo.hbone_args();
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start(topo, node, &args)
    }

    /// Starts mesh-node without waiting (for tests of start-up failures).
    pub fn spawn(topo: &Topology, node: &str, extra: &[&str]) -> Result<Self> {
        Self::spawn_in(topo, node, &node_args(topo.node(node)), extra)
    }

    /// Starts mesh-node for `node` enrolling pods from the Kubernetes API in `kubeconfig`
    /// (no pods file), HBONE on, plus `extra`; waits until it reports ready.
    pub fn start_kubernetes(
        topo: &Topology,
        node: &str,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let n: &Node = topo.node(node);
        let mut base = vec![
            "--kubernetes".to_owned(),
            "--kubeconfig".to_owned(),
            kubeconfig.display().to_string(),
            "--node-name".to_owned(),
            n.name.to_owned(),
            "--cgroup".to_owned(),
            n.cgroup.display().to_string(),
            "--bpffs".to_owned(),
            n.bpffs.display().to_string(),
        ];
        base.extend(topo.hbone_args());
        let mut mesh = Self::spawn_in(topo, node, &base, extra)?;
        mesh.wait_ready()?;
        Ok(mesh)
    }

    /// Starts `mesh-node run --mode gateway` in node `node`'s namespace (no pods, no eBPF) and
    /// waits until it reports ready.
    pub fn start_gateway(topo: &Topology, node: &str, extra: &[&str]) -> Result<Self> {
        let base = ["--mode".to_owned(), "gateway".to_owned()];
        let mut gateway = Self::spawn_in(topo, node, &base, extra)?;
        gateway.wait_ready()?;
        Ok(gateway)
    }

    /// Starts mesh-node with HBONE on as it runs in a container: its own `/proc/sys` read-only
    /// (in a mount namespace of its own), and, when `host_proc` is given, a procfs of its own
    /// mounted there, writable, and passed as `--host-proc`.
    pub fn start_hbone_with_read_only_proc_sys(
        topo: &Topology,
        node: &str,
        host_proc: Option<&Path>,
    ) -> Result<Self> {
        let mut base = node_args(topo.node(node));
        base.extend(topo.hbone_args());
        if let Some(dir) = host_proc {
            fs::create_dir_all(dir)?;
            base.extend(["--host-proc".to_owned(), dir.display().to_string()]);
        }
        let mut mesh = Self::spawn_with(topo, node, &base, &[], |cmd| {
            read_only_proc_sys_at_exec(cmd, host_proc)
        })?;
        mesh.wait_ready()?;
        Ok(mesh)
    }

    fn spawn_in(topo: &Topology, node: &str, base: &[String], extra: &[&str]) -> Result<Self> {
        Self::spawn_with(topo, node, base, extra, |_| Ok(()))
    }

    fn spawn_with(
        topo: &Topology,
        node: &str,
        base: &[String],
        extra: &[&str],
        prepare: impl FnOnce(&mut Command) -> Result<()>,
    ) -> Result<Self> {
        let node: &Node = topo.node(node);
        let bin = binary();
        if !bin.exists() {
            bail!(
                "{} not found: build mesh-node first (`cargo xtask test` does)",
                bin.display()
            );
        }
        let log = next_log_path(&topo.workdir, node.name);
        let log_file = File::create(&log)?;
        let netns = File::open(node.netns_path())?;
        let mut cmd = Command::new(&bin);
        let workers: &[&str] = if extra.contains(&"--workers") {
            &[]
        } else {
            &["--workers", "2"]
        };
        // Tests that stop mesh-node with connections open should not wait the production 25 s.
        let drain: &[&str] =
            if extra.contains(&"--drain-timeout") || base.iter().any(|a| a == "--drain-timeout") {
                &[]
            } else {
                &["--drain-timeout", "3"]
            };
        cmd.arg("run")
            .args(base)
            .args(workers)
            .args(drain)
            .args(extra)
            .env(
                "MESH_NODE_LOG",
                std::env::var("MESH_NODE_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        enter_netns_at_exec(&mut cmd, &netns);
        prepare(&mut cmd)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    pub fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if self.log_text().contains(READY_LINE) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "mesh-node exited ({status}) before ready:\n{}",
                    self.log_text()
                );
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "mesh-node not ready after {READY_TIMEOUT:?}:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32> {
        let started = Instant::now();
        let child = self.child.as_mut().context("already stopped")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code().unwrap_or(-1));
            }
            if started.elapsed() > timeout {
                bail!(
                    "mesh-node still running after {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Graceful stop: SIGTERM, then wait.
    /// The process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let started = Instant::now();
            while child.try_wait()?.is_none() {
                if started.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("mesh-node ignored SIGTERM for 10s");
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Kills the process (SIGKILL: no chance to clean up, as a crash or the OOM killer).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log so far. mesh-node writes its log from a background thread (so that a slow
    /// stderr never stalls a connection), so a line may land a moment after what it reports:
    /// this waits until the file has stopped growing for 50 ms (at most 1 s) before reading.
    pub fn log_text(&self) -> String {
        let len = || fs::metadata(&self.log).map_or(0, |meta| meta.len());
        let mut last = len();
        for _ in 0..20 {
            thread::sleep(Duration::from_millis(50));
            let now = len();
            if now == last {
                break;
            }
            last = now;
        }
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines containing every one of `needles`.
    pub fn log_lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for MeshNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn next_log_path(workdir: &Path, node: &str) -> PathBuf {
    (1..)
        .map(|n| workdir.join(format!("mesh-node-{node}-{n}.log")))
        .find(|p| !p.exists())
        .expect("an unused log name")
}

/// Makes `cmd`'s process enter the network namespace `netns` before it runs; the caller keeps
/// `netns` open until the spawn.
pub fn enter_netns_at_exec(cmd: &mut Command, netns: &File) {
    let ns_fd = netns.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setns) between fork and exec; the caller keeps the
    // file open until the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The arguments every node's mesh-node runs with: its pods file, cgroup and pin directory.
fn node_args(n: &Node) -> Vec<String> {
    vec![
        "--pods".to_owned(),
        n.pods_file.display().to_string(),
        "--cgroup".to_owned(),
        n.cgroup.display().to_string(),
        "--bpffs".to_owned(),
        n.bpffs.display().to_string(),
    ]
}

/// Makes `cmd`'s process run in a mount namespace of its own where `/proc/sys` is read-only,
/// as a container runtime leaves it, with a fresh (writable) procfs at `host_proc` if given.
fn read_only_proc_sys_at_exec(cmd: &mut Command, host_proc: Option<&Path>) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let target = host_proc
        .map(|dir| std::ffi::CString::new(dir.as_os_str().as_bytes()))
        .transpose()?;
    // SAFETY: only async-signal-safe calls (unshare, mount) between fork and exec, on
    // NUL-terminated strings that live in the closure.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            let null = std::ptr::null();
            let sys = c"/proc/sys".as_ptr();
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(sys, sys, null, libc::MS_BIND, std::ptr::null()))?;
            check(libc::mount(
                null,
                sys,
                null,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            ))?;
            if let Some(target) = &target {
                let proc = c"proc".as_ptr();
                check(libc::mount(
                    proc,
                    target.as_ptr(),
                    proc,
                    0,
                    std::ptr::null(),
                ))?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// `mesh-node bpf ARGS --output json` on the pins of `node`, parsed; panics on failure.
pub fn bpf_json(topo: &Topology, node: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(binary())
        .arg("bpf")
        .arg("--bpffs")
        .arg(&topo.node(node).bpffs)
        .args(args)
        .args(["--output", "json"])
        .output()
        .expect("run mesh-node bpf");
    assert!(
        out.status.success(),
        "mesh-node bpf {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|error| {
        panic!(
            "mesh-node bpf {args:?}: not JSON ({error}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
