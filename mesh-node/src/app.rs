//! `mesh-node run`: checks the environment, starts the data plane, enrolls pods, serves until
//! SIGTERM/SIGINT.
//!
//! One multi-threaded runtime carries the data path; control-plane work (xDS, CA, admin) will get
//! its own small runtime when it arrives.
use std::{path::PathBuf, sync::Arc};

use crate::{
    config::RunConfig,
    dataplane::{Dataplane, DataplaneError},
    enroll::{Enroller, static_file},
    preflight::{self, PreflightError},
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    PodsFile(#[from] static_file::StaticFileError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("start runtime: {0}")]
    Runtime(std::io::Error),
    #[error("install signal handler: {0}")]
    Signal(std::io::Error),
}

pub fn run(config: RunConfig) -> Result<(), RunError> {
    // Everything that can be refused without touching the kernel is checked first.
    let pods = match &config.pods_file {
        Some(path) => static_file::load(path)?,
        None => Vec::new(),
    };
    preflight::check_capabilities()?;
    let kernel = preflight::check_kernel()?;
    let mount = preflight::cgroup2_mount()?;
    let cgroup: PathBuf = config.cgroup.clone().unwrap_or_else(|| mount.clone());
    preflight::check_cgroup(&cgroup, &mount)?;
    preflight::ensure_bpffs()?;

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("mesh-data");
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    let runtime = runtime.build().map_err(RunError::Runtime)?;

    runtime.block_on(async move {
        let dataplane = Arc::new(Dataplane::start(&config.bpffs_dir, &cgroup, config.fail_mode)?);
        tracing::info!(
            kernel,
            cgroup = %cgroup.display(),
            pin_dir = %config.bpffs_dir.display(),
            fail_mode = ?config.fail_mode,
            "data plane loaded"
        );
        let enroller = Enroller::new(dataplane.clone());
        let total = pods.len();
        let mut enrolled = 0;
        for pod in pods {
            // One pod's failure (netns gone, port taken) must not stop the others.
            match enroller.enroll(pod) {
                Ok(_) => enrolled += 1,
                Err(error) => tracing::error!(%error, "pod not enrolled"),
            }
        }
        let stale = dataplane.retain_enrolled(&enroller.netns_cookies())?;
        if stale > 0 {
            tracing::info!(stale, "removed namespaces enrolled by an earlier run that are gone now");
        }
        tracing::info!(enrolled, failed = total - enrolled, "mesh-node is ready");

        wait_for_shutdown().await?;
        tracing::info!(
            fail_mode = ?config.fail_mode,
            "shutting down; capture hooks stay pinned and apply the fail mode until mesh-node returns"
        );
        Ok(())
    })
}

async fn wait_for_shutdown() -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
