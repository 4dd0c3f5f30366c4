//! `mesh-node run`: checks the environment, starts the data plane, enrolls pods, serves until
//! SIGTERM/SIGINT.
//!
//! One multi-threaded runtime carries the data path; control-plane work (xDS, certificate
//! fetches) runs on a single-threaded runtime of its own.
use std::{
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use crate::{
    admin::{self, Admin, BindError, Readiness},
    certs::CertManager,
    config::{GatewayConfig, RunConfig, Settings},
    dataplane::{Dataplane, DataplaneError},
    enroll::{
        Enroller,
        kubernetes::{self, KubeError},
        static_file,
    },
    handover::{self, Inherited, Predecessor, SocketKind},
    identity::{
        CertSource, Identity,
        file_ca::{FileCa, FileCaError},
        is_valid_trust_domain,
        istio_ca::IstioCa,
    },
    preflight::{self, PreflightError},
    proxy::ProxyContext,
    telemetry::Metrics,
    tls::Tls,
    xds::{
        client::{self as xds_client, XdsError},
        local_file::{self, LocalFileError},
        session::XdsStatus,
    },
};

/// How often the HBONE pool looks for idle connections, and how long they may idle.
const POOL_SWEEP: Duration = Duration::from_secs(15);
/// How long a key's last idle HBONE connection is kept (as ztunnel's pool).
const POOL_IDLE: Duration = Duration::from_secs(300);
/// How long the other idle connections of a key (what a peak left) are kept: their memory is
/// given back within about half a minute of the load ending.
const POOL_SURPLUS_IDLE: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    PodsFile(#[from] static_file::StaticFileError),
    #[error(transparent)]
    LocalXds(#[from] LocalFileError),
    #[error(transparent)]
    Xds(#[from] XdsError),
    #[error("--local-xds and --xds-address are exclusive: the mesh state comes from one source")]
    TwoSources,
    #[error("start control-plane thread: {0}")]
    ControlThread(std::io::Error),
    #[error("certificate authority: {0}")]
    Ca(#[from] FileCaError),
    #[error(transparent)]
    IstioCa(crate::istiod::EndpointError),
    #[error("--ca-dir and --ca-address are exclusive: workload certificates come from one CA")]
    TwoCas,
    #[error("trust domain {0:?} may hold only a-z, 0-9, '.', '-' and '_'")]
    TrustDomain(String),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("start runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Endpoint(#[from] BindError),
    #[error("install signal handler: {0}")]
    Signal(std::io::Error),
    #[error(
        "--mode gateway needs a certificate source (--ca-dir or --ca-address): the gateway terminates mutual TLS"
    )]
    GatewayWithoutCa,
    #[error("--mode gateway enrolls no pods: drop --pods and --kubernetes")]
    GatewayWithPods,
    #[error("--pods and --kubernetes are exclusive: pods are enrolled from one source")]
    TwoPodSources,
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
    #[error("gateway listener {addr}: {source}")]
    GatewayListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

pub fn run(config: RunConfig) -> Result<(), RunError> {
    // Everything that can be refused without touching the kernel is checked first.
    if config.kubernetes.is_some() && config.pods_file.is_some() {
        return Err(RunError::TwoPodSources);
    }
    let pods = match &config.pods_file {
        Some(path) => static_file::load(path)?,
        None => Vec::new(),
    };
    if !is_valid_trust_domain(&config.trust_domain) {
        return Err(RunError::TrustDomain(config.trust_domain.clone()));
    }
    if config.local_xds.is_some() && config.xds.is_some() {
        return Err(RunError::TwoSources);
    }
    let xds_endpoint = match &config.xds {
        Some(xds) => Some(xds.endpoint()?),
        None => None,
    };
    let local = match &config.local_xds {
        Some(path) => Some(local_file::load(path, &config.trust_domain)?),
        None => None,
    };
    if config.ca_dir.is_some() && config.ca.is_some() {
        return Err(RunError::TwoCas);
    }
    let file_ca = match &config.ca_dir {
        Some(dir) => Some(FileCa::load(dir, config.cert_ttl)?),
        None => None,
    };
    let control = control_runtime()?;
    let source: Option<(Arc<dyn CertSource>, &str)> = match (file_ca, &config.ca) {
        (Some(ca), _) => Some((Arc::new(ca), "the file CA")),
        (None, Some(ca)) => {
            // The channel belongs to the runtime its calls run on.
            let _control = control.enter();
            let ca = IstioCa::new(ca.clone()).map_err(RunError::IstioCa)?;
            Some((Arc::new(ca), "istiod's CA"))
        }
        (None, None) => None,
    };
    let certs = source.map(|(source, name)| {
        let tls = Arc::new(Tls::new(&config.trust_domain));
        tracing::info!(trust_domain = %config.trust_domain, "HBONE on: workload certificates from {name}");
        Arc::new(CertManager::new(
            source,
            tls,
            control.clone(),
            config.cert_settings,
        ))
    });
    if let Some(gateway) = config.gateway.clone() {
        return run_gateway(config, gateway, certs, control, local, xds_endpoint);
    }
    let kube = match &config.kubernetes {
        // The client's request buffer is a task on the control runtime, where the watcher runs.
        Some(settings) => Some((
            control.block_on(kubernetes::connect(settings))?,
            settings.clone(),
        )),
        None => None,
    };
    preflight::check_capabilities()?;
    let open_files = preflight::raise_open_file_limit();
    let kernel = preflight::check_kernel()?;
    let mount = preflight::cgroup2_mount()?;
    let cgroup: PathBuf = config.cgroup.clone().unwrap_or_else(|| mount.clone());
    preflight::check_cgroup(&cgroup, &mount)?;
    preflight::ensure_bpffs()?;
    let handover_name = handover::Name::new("node", &config.bpffs_dir);
    let (predecessor, mut inherited) = take_over(&handover_name);

    let runtime = data_runtime(config.worker_threads)?;
    let settings = data_settings(config.settings, &runtime);

    runtime.block_on(async move {
        let Endpoints {
            admin,
            readiness,
            metrics,
            ready_tx,
            mut xds_ready,
        } = start_endpoints(&config, certs.clone(), &mut inherited).await?;
        let dataplane = Arc::new(Dataplane::start(
            &config.bpffs_dir,
            &cgroup,
            config.fail_mode,
            config.settings.original_source,
            config.settings.kernel_same_node,
        )?);
        readiness.programs_attached();
        metrics.attach_dataplane(dataplane.clone());
        tracing::info!(
            kernel,
            cgroup = %cgroup.display(),
            pin_dir = %config.bpffs_dir.display(),
            fail_mode = ?config.fail_mode,
            original_source = config.settings.original_source,
            kernel_same_node = config.settings.kernel_same_node,
            open_files,
            "data plane loaded"
        );
        if certs.is_none() {
            tracing::warn!("no --ca-dir or --ca-address: HBONE off; traffic to mesh workloads will fail, other traffic passes through");
        }
        let ctx = Arc::new(ProxyContext::new(
            dataplane.clone(),
            config.node.clone(),
            certs,
            settings,
            metrics,
        ));
        let _ = admin.ctx.set(ctx.clone());
        feed_state(&ctx, local, &control, config.xds.clone().zip(xds_endpoint), ready_tx);
        let sweeper = ctx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POOL_SWEEP).await;
                let evicted = sweeper.pool.evict(POOL_IDLE, POOL_SURPLUS_IDLE);
                if evicted > 0 {
                    tracing::debug!(evicted, "idle HBONE connections closed");
                }
            }
        });
        let mut enroller = Enroller::new(ctx.clone(), dataplane.clone(), &config.trust_domain)
            .with_dns(config.dns.clone())
            .with_host_proc(&config.host_proc);
        if predecessor.is_some() {
            enroller = enroller.with_inherited(inherited);
        }
        let enroller = Arc::new(enroller);
        let _ = admin.enroller.set(enroller.clone());
        let shutdown = wait_for_shutdown();
        tokio::pin!(shutdown);
        let (enrolled, total) = match kube {
            Some((client, settings)) => {
                let (synced_tx, synced) = tokio::sync::oneshot::channel();
                let controller = kubernetes::Controller::new(client, settings, enroller.clone());
                control.spawn(controller.run(synced_tx));
                // Readiness waits until the pods already running here are enrolled.
                tokio::select! {
                    result = &mut shutdown => return result,
                    enrolled = synced => {
                        let enrolled = enrolled.unwrap_or(0);
                        (enrolled, enrolled)
                    }
                }
            }
            None => {
                let total = pods.len();
                let mut enrolled = 0;
                for pod in pods {
                    // One pod's failure (netns gone, port taken) must not stop the others.
                    match enroller.enroll(pod) {
                        Ok(_) => enrolled += 1,
                        Err(error) => tracing::error!(%error, "pod not enrolled"),
                    }
                }
                (enrolled, total)
            }
        };
        readiness.startup_enrollment_done();
        let cookies = enroller.netns_cookies();
        let stale = dataplane.retain_enrolled(&cookies)?;
        let stale_links = dataplane.retain_inbound(&cookies)?;
        if stale + stale_links > 0 {
            tracing::info!(
                stale,
                stale_links,
                "removed namespaces and inbound links an earlier run enrolled that are gone now"
            );
        }
        tokio::select! {
            result = &mut shutdown => return result,
            _ = xds_ready.wait_for(|status| status.synced) => {}
        }
        if let Some(predecessor) = predecessor {
            tokio::select! {
                result = &mut shutdown => return result,
                () = fully_ready(&readiness) => {}
            }
            enroller.start_accepting();
            succeed(predecessor).await;
            let untaken = enroller.discard_inherited();
            if untaken > 0 {
                tracing::info!(namespaces = untaken, "closed the handed-over sockets of pods not enrolled here");
            }
        }
        tracing::info!(enrolled, failed = total - enrolled, "mesh-node is ready");
        crate::memory::trim_after_startup();
        // Certificates for the enrolled pods may still be on their way; /healthz/ready waits.
        let missing = readiness.missing();
        if !missing.is_empty() {
            tracing::info!(waiting_for = ?missing, "readiness endpoint still waiting");
        }
        let successor = Arc::new(AtomicU32::new(0));
        let sockets = enroller.clone();
        serve_successor(
            handover_name,
            Handing {
                admin: admin.clone(),
                ctx: ctx.clone(),
                listeners: Box::new(move || sockets.handover_sockets()),
                successor: successor.clone(),
            },
        );

        let by_signal = tokio::select! {
            result = &mut shutdown => { result?; true }
            () = ctx.drain.started() => false,
        };
        let signalled = drain(
            &ctx,
            &readiness,
            config.drain_timeout,
            || enroller.stop_accepting(),
            "pods",
            by_signal,
        )
        .await;
        if successor.load(Ordering::Relaxed) != 0 && config.kubernetes.is_some() && !signalled {
            // A container that exits by itself is restarted by the kubelet, and would take the
            // node back from its successor: it ends when its pod is deleted.
            tracing::info!("handed over and drained: waiting for SIGTERM as the pod is deleted");
            wait_for_shutdown().await?;
        }
        tracing::info!(
            fail_mode = ?config.fail_mode,
            "shutting down; capture hooks stay pinned and apply the fail mode until mesh-node returns"
        );
        Ok(())
    })
}

/// Takes the listening sockets of the mesh-node running here, if one is (see [`handover`]).
/// One that cannot be taken over is left alone: this process then binds its own, which fails
/// on the ports the other still holds.
fn take_over(name: &handover::Name) -> (Option<Predecessor>, Inherited) {
    match handover::take_over(name) {
        Ok(Some((predecessor, inherited))) => {
            tracing::info!(
                predecessor = predecessor.pid,
                sockets = predecessor.count,
                "a mesh-node runs here: took over its listening sockets; it serves them until this one is ready"
            );
            (Some(predecessor), inherited)
        }
        Ok(None) => (None, Inherited::default()),
        Err(error) => {
            tracing::warn!(error = %crate::error_chain(&error), "cannot take over from the mesh-node running here; starting on my own");
            (None, Inherited::default())
        }
    }
}

/// Waits until readiness has nothing left to wait for.
async fn fully_ready(readiness: &Readiness) {
    let mut last = Vec::new();
    loop {
        let missing = readiness.missing();
        if missing.is_empty() {
            return;
        }
        if missing != last {
            tracing::info!(waiting_for = ?missing, "the predecessor serves until this mesh-node is ready");
            last = missing;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Now accepting on the handed-over sockets: tells the predecessor to stop and drain.
async fn succeed(predecessor: Predecessor) {
    let pid = predecessor.pid;
    match tokio::task::spawn_blocking(move || predecessor.drain()).await {
        Ok(Ok(open)) => tracing::info!(
            predecessor = pid,
            open,
            "took over: the predecessor accepts no more and drains its open connections"
        ),
        Ok(Err(error)) => {
            tracing::warn!(predecessor = pid, error = %crate::error_chain(&error), "the predecessor did not confirm its drain")
        }
        Err(error) => tracing::warn!(predecessor = pid, %error, "hand-over task failed"),
    }
}

/// Serves a successor's hand-over from now on.
fn serve_successor(name: handover::Name, handing: Handing) {
    if let Err(error) = handover::serve(name, Arc::new(handing)) {
        tracing::warn!(
            error = %crate::error_chain(&error),
            "no successor can take over from this mesh-node: an upgrade will restart it instead"
        );
    }
}

/// What this process hands a successor: the admin endpoints and `listeners`.
struct Handing {
    admin: Arc<Admin>,
    ctx: Arc<ProxyContext>,
    listeners: Box<dyn Fn() -> Vec<(SocketKind, OwnedFd)> + Send + Sync>,
    /// The successor's pid, once it has taken over.
    successor: Arc<AtomicU32>,
}

impl handover::Provider for Handing {
    fn sockets(&self) -> Vec<(SocketKind, OwnedFd)> {
        let mut sockets = self.admin.handover_sockets();
        sockets.extend((self.listeners)());
        sockets
    }

    fn refusal(&self) -> Option<String> {
        self.ctx
            .drain
            .is_draining()
            .then(|| "it is draining".to_owned())
    }

    fn pause_endpoints(&self, paused: bool) {
        self.admin.pause(paused);
    }

    fn drain(&self, successor: u32) -> i64 {
        self.successor.store(successor, Ordering::Relaxed);
        tracing::info!(successor, "the successor is ready and accepting: draining");
        self.ctx.drain.start();
        self.ctx.metrics.open_connections()
    }
}

/// Drains before exit: not ready; listeners closed (`stop_listening`, which says how many
/// `what` stopped); every HBONE connection told GOAWAY (`ctx.drain`); then open connections
/// may finish until `timeout`. A second SIGTERM or SIGINT ends the wait: the second counting
/// the one that started the drain (`by_signal`), so that the SIGTERM a pod's deletion sends
/// after a hand-over or `POST /drain` does not cut it short. What is still open then is cut
/// when the process exits — reset, not closed: a clean end would tell an application a cut
/// stream was complete. Returns whether a signal arrived during the drain.
async fn drain(
    ctx: &ProxyContext,
    readiness: &Readiness,
    timeout: Duration,
    stop_listening: impl FnOnce() -> usize,
    what: &str,
    by_signal: bool,
) -> bool {
    ctx.drain.start();
    readiness.draining();
    let stopped = stop_listening();
    let open = ctx.metrics.open_connections();
    tracing::info!(
        open,
        timeout_s = timeout.as_secs(),
        "draining: listeners closed for {stopped} {what}, HBONE connections told GOAWAY; open connections may finish"
    );
    let started = std::time::Instant::now();
    // Settled once no connection is open and every HBONE socket is closed for good: the last
    // frames of a finished tunnel may still be on their way out, and exiting would cut them.
    // Pooled client connections go as soon as they are idle (an idle h2 client closes).
    let settled = async {
        loop {
            ctx.pool.evict(Duration::ZERO, Duration::ZERO);
            if ctx.metrics.open_connections() <= 0 && crate::hbone::linger::live() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let signalled = std::sync::atomic::AtomicBool::new(false);
    let cut = async {
        if !by_signal {
            let _ = wait_for_shutdown().await;
            signalled.store(true, Ordering::Relaxed);
            tracing::info!(
                "signal received while draining: the process exits once drained; a second one cuts the drain short"
            );
        }
        let _ = wait_for_shutdown().await;
    };
    tokio::select! {
        () = settled => {}
        _ = tokio::time::sleep(timeout) => {}
        () = cut => tracing::warn!("second signal: drain cut short"),
    }
    let left = ctx.metrics.open_connections().max(0);
    let sockets = crate::hbone::linger::live();
    if left == 0 && sockets > 0 {
        tracing::info!(
            sockets,
            "drained: every connection finished; HBONE sockets still closing are cut"
        );
    } else if left == 0 {
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "drained: every connection finished"
        );
    } else {
        ctx.metrics.drain_cut(left as u64);
        tracing::warn!(
            left,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "drain deadline reached: cutting the connections still open (applications see a reset)"
        );
    }
    signalled.load(Ordering::Relaxed)
}

/// `mesh-node run --mode gateway`: the admin endpoints, the mesh state and the gateway's own
/// certificate as for a node, then the gateway listener; no eBPF, no pods.
fn run_gateway(
    config: RunConfig,
    gateway: GatewayConfig,
    certs: Option<Arc<CertManager>>,
    control: tokio::runtime::Handle,
    local: Option<local_file::LocalState>,
    xds_endpoint: Option<tonic::transport::Endpoint>,
) -> Result<(), RunError> {
    let Some(certs) = certs else {
        return Err(RunError::GatewayWithoutCa);
    };
    if config.pods_file.is_some() || config.kubernetes.is_some() {
        return Err(RunError::GatewayWithPods);
    }
    let identity = Identity::new(
        &config.trust_domain,
        &gateway.namespace,
        &gateway.service_account,
    );
    let open_files = preflight::raise_open_file_limit();
    let handover_name = handover::Name::new("gateway", &config.bpffs_dir);
    let (predecessor, mut inherited) = take_over(&handover_name);
    let runtime = data_runtime(config.worker_threads)?;
    let settings = data_settings(config.settings, &runtime);
    runtime.block_on(async move {
        let Endpoints {
            admin,
            readiness,
            metrics,
            ready_tx,
            mut xds_ready,
        } = start_endpoints(&config, Some(certs.clone()), &mut inherited).await?;
        // Nothing to attach and nobody to enroll: readiness waits for the state and the
        // gateway's certificate only.
        readiness.programs_attached();
        readiness.startup_enrollment_done();
        certs.track(&identity);
        let ctx = Arc::new(ProxyContext::new(
            Arc::new(crate::gateway::NoCapture),
            config.node.clone(),
            Some(certs),
            settings,
            metrics,
        ));
        let _ = admin.ctx.set(ctx.clone());
        feed_state(
            &ctx,
            local,
            &control,
            config.xds.clone().zip(xds_endpoint),
            ready_tx,
        );
        let listen_err = |source| RunError::GatewayListen {
            addr: gateway.listen,
            source,
        };
        let handed = inherited
            .take_gateway()
            .map(std::net::TcpListener::from)
            .filter(|listener| {
                listener
                    .local_addr()
                    .is_ok_and(|addr| addr == gateway.listen)
            });
        let listener = match handed {
            Some(listener) => {
                listener.set_nonblocking(true).map_err(listen_err)?;
                tokio::net::TcpListener::from_std(listener).map_err(listen_err)?
            }
            None => tokio::net::TcpListener::bind(gateway.listen)
                .await
                .map_err(listen_err)?,
        };
        let kept = socket2::SockRef::from(&listener)
            .try_clone()
            .map_err(listen_err)?;
        let kept = Arc::new(Mutex::new(Some(OwnedFd::from(kept))));
        tracing::info!(
            listen = %gateway.listen,
            %identity,
            network = %config.node.network,
            open_files,
            "east-west gateway listening"
        );
        // With a predecessor, it accepts on the same socket until this one is ready.
        let gate = tokio::sync::watch::channel(predecessor.is_none()).0;
        let accepting = tokio::spawn(handover::gated(
            gate.subscribe(),
            crate::gateway::serve(listener, identity.clone(), ctx.clone()),
        ));
        let shutdown = wait_for_shutdown();
        tokio::pin!(shutdown);
        tokio::select! {
            result = &mut shutdown => return result,
            _ = xds_ready.wait_for(|status| status.synced) => {}
        }
        // Its one certificate is what it serves with: ready once that is in hand (or its
        // first fetch failed, which readiness then names).
        if let Some(certs) = ctx.certs.clone() {
            tokio::select! {
                result = &mut shutdown => return result,
                got = certs.get(&identity) => if let Err(error) = got {
                    tracing::warn!(%identity, %error, "the gateway has no certificate yet");
                }
            }
        }
        if let Some(predecessor) = predecessor {
            tokio::select! {
                result = &mut shutdown => return result,
                () = fully_ready(&readiness) => {}
            }
            gate.send_replace(true);
            succeed(predecessor).await;
        }
        tracing::info!("mesh-node is ready");
        crate::memory::trim_after_startup();
        let handed = kept.clone();
        serve_successor(
            handover_name,
            Handing {
                admin: admin.clone(),
                ctx: ctx.clone(),
                listeners: Box::new(move || {
                    let kept = handed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    kept.iter()
                        .filter_map(|fd| fd.try_clone().ok())
                        .map(|fd| (SocketKind::Gateway, fd))
                        .collect()
                }),
                successor: Arc::new(AtomicU32::new(0)),
            },
        );
        let by_signal = tokio::select! {
            result = &mut shutdown => { result?; true }
            () = ctx.drain.started() => false,
        };
        drain(
            &ctx,
            &readiness,
            config.drain_timeout,
            || {
                accepting.abort();
                kept.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                1
            },
            "gateway listener",
            by_signal,
        )
        .await;
        tracing::info!("gateway shutting down");
        Ok(())
    })
}

/// The admin, metrics and readiness endpoints, and the channel readiness learns the control
/// plane's progress by.
struct Endpoints {
    admin: Arc<Admin>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    ready_tx: tokio::sync::watch::Sender<XdsStatus>,
    xds_ready: tokio::sync::watch::Receiver<XdsStatus>,
}

/// Brings the endpoints up first, so that readiness answers (503, with the reasons) while the
/// rest starts.
async fn start_endpoints(
    config: &RunConfig,
    certs: Option<Arc<CertManager>>,
    inherited: &mut Inherited,
) -> Result<Endpoints, RunError> {
    let (ready_tx, xds_ready) = tokio::sync::watch::channel(XdsStatus {
        synced: config.xds.is_none(),
        rejected: Vec::new(),
    });
    let readiness = Arc::new(Readiness::new(xds_ready.clone(), certs));
    let metrics = Arc::new(Metrics::new());
    let admin = Arc::new(Admin::new(metrics.clone(), readiness.clone()));
    admin::start(admin.clone(), config.endpoints, inherited).await?;
    Ok(Endpoints {
        admin,
        readiness,
        metrics,
        ready_tx,
        xds_ready,
    })
}

/// Gives `ctx` its mesh state: the local file's now, the control plane's as it comes; and
/// starts giving memory back after load peaks.
fn feed_state(
    ctx: &Arc<ProxyContext>,
    local: Option<local_file::LocalState>,
    control: &tokio::runtime::Handle,
    xds: Option<(xds_client::XdsConfig, tonic::transport::Endpoint)>,
    ready_tx: tokio::sync::watch::Sender<XdsStatus>,
) {
    if let Some(local) = local {
        tracing::info!(
            workloads = local.workloads.len(),
            services = local.services.len(),
            policies = local.policies.len(),
            "mesh state loaded from the local file"
        );
        ctx.update_state(|state| local.apply(state));
    }
    control.spawn(crate::memory::give_back_after_peaks());
    if let Some((xds, endpoint)) = xds {
        start_control_plane(control, xds, endpoint, ctx.clone(), ready_tx);
    }
}

/// The settings with what depends on the data runtime filled in: by default, concurrent
/// tunnels to one peer spread over as many HBONE connections as the runtime has workers.
fn data_settings(settings: Settings, runtime: &tokio::runtime::Runtime) -> Settings {
    Settings {
        connections_per_peer: match settings.connections_per_peer {
            0 => runtime.metrics().num_workers(),
            n => n,
        },
        ..settings
    }
}

fn data_runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime, RunError> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("mesh-data");
    if worker_threads > 0 {
        runtime.worker_threads(worker_threads);
    }
    runtime.build().map_err(RunError::Runtime)
}

/// The control runtime: a single thread of its own for xDS and the CA, so control-plane work
/// never queues behind the data path (and the reverse).
fn control_runtime() -> Result<tokio::runtime::Handle, RunError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("mesh-control".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))
        .map_err(RunError::ControlThread)?;
    Ok(handle)
}

fn start_control_plane(
    control: &tokio::runtime::Handle,
    config: xds_client::XdsConfig,
    endpoint: tonic::transport::Endpoint,
    ctx: Arc<ProxyContext>,
    ready: tokio::sync::watch::Sender<XdsStatus>,
) {
    tracing::info!(address = %config.address, "taking the mesh state from the control plane");
    let metrics = ctx.metrics.clone();
    let apply = move |update: crate::xds::session::Update| {
        let steps = update.into_steps(crate::xds::session::STEP);
        ctx.update_state_in_steps(
            steps
                .into_iter()
                .map(|step| move |state: &mut crate::state::State| step.apply(state)),
        );
    };
    control.spawn(xds_client::run(config, endpoint, apply, ready, metrics));
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
