//! Istio's ztunnel as a process of the harness, for the comparisons that need one (the
//! benchmark's `--compare-ztunnel`, the ignored interop tests): started in a pod's network
//! namespace in dedicated mode with its built-in test CA, its output in a log file, killed on
//! drop. What it serves is the caller's: a local config and the environment on top of these.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
};

use anyhow::{Context, Result};

use crate::meshnode::enter_netns_at_exec;

/// The environment every harness ztunnel runs with: no control plane, a local config, the
/// fake CA, one workload of its own (`PROXY_WORKLOAD_INFO`, which the caller adds).
fn base_env(config: &Path) -> Result<Vec<(String, String)>> {
    let config = config.to_str().context("ztunnel config path")?;
    Ok([
        ("FAKE_CA", "true"),
        ("XDS_ADDRESS", ""),
        ("LOCAL_XDS_PATH", config),
        ("PROXY_MODE", "dedicated"),
        ("RUST_LOG", "info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect())
}

pub struct Ztunnel {
    child: Child,
    log: PathBuf,
}

impl Ztunnel {
    /// Starts `bin` in the network namespace at `netns`, reading `config`, with `env` on top of
    /// the base environment, writing its output to `log`.
    pub fn spawn(
        bin: &Path,
        netns: &Path,
        config: &Path,
        env: &[(&str, &str)],
        log: PathBuf,
        cwd: &Path,
    ) -> Result<Self> {
        let out = fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let netns_file =
            fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .envs(base_env(config)?)
            .envs(env.iter().copied())
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        enter_netns_at_exec(&mut cmd, &netns_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Self { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Says it is ready (its own log line).
    pub fn says_ready(&self) -> bool {
        self.log_text().contains("marking server ready")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 30 lines of its log, for errors.
    pub fn log_tail(&self) -> String {
        let log = self.log_text();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
