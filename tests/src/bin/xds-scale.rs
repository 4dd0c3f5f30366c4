//! Scale benchmark of the control-plane path: the test control plane pushes N workloads and
//! N/10 services over delta ADS (TLS, loopback) to a separate process running mesh-node's xDS
//! client and state index, which reports how long the first sync took, how long the state's
//! lock was held and waited for, and its memory (the allocator's bytes in use; RSS right after
//! the push and once the allocator has given back what decoding freed).
//!
//! `xds-scale [SIZES]` (default `1000,10000,100000`) prints a Markdown table and writes
//! `target/bench/xds-scale.json` (or `$XDS_SCALE_OUT`). `xds-scale client ADDR ROOT_CERT` is the measured process.
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_node::{
    identity::file_ca::FileCa,
    state::State,
    xds::{client::XdsConfig, proto::workload as pb},
};
use mesh_tests::control_plane::{ControlPlane, SERVER_NAME};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["client", addr, root] => client(addr, root),
        [] => bench(&[1_000, 10_000, 100_000]),
        [sizes] => bench(
            &sizes
                .split(',')
                .map(|s| s.parse().with_context(|| format!("size {s:?}")))
                .collect::<Result<Vec<usize>>>()?,
        ),
        _ => bail!("usage: xds-scale [SIZE,SIZE,...] | xds-scale client ADDR ROOT_CERT"),
    }
}

struct Row {
    workloads: usize,
    services: usize,
    wire_bytes: usize,
    idle_rss_kib: u64,
    idle_heap_kib: u64,
    synced: Synced,
}

/// What the measured process reported once synced.
struct Synced {
    ms: f64,
    /// Right after the push was applied, with what decoding it freed still mapped.
    rss_kib: u64,
    /// After the allocator gave that back, as a running mesh-node's periodic check does.
    settled_rss_kib: u64,
    /// Bytes allocated and not freed: the state, its indexes, the session's version table.
    heap_kib: u64,
    /// Longest a reader waited for the state during the push.
    wait_ms: f64,
    /// Longest the state's write lock was held at a time.
    hold_ms: f64,
}

fn bench(sizes: &[usize]) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("xds-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    FileCa::init(&dir, "cluster.local")?;
    let mut rows = Vec::new();
    for &n in sizes {
        rows.push(one(&dir, n)?);
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "| workloads | services | pushed (MiB) | first sync (ms) | longest write hold (ms) | longest lookup wait (ms) | RSS idle (MiB) | RSS synced (MiB) | RSS settled (MiB) | heap per workload+service (bytes) | RSS per workload+service (bytes) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut json = Vec::new();
    for r in &rows {
        let resources = (r.workloads + r.services) as f64;
        let per = |kib: u64, base: u64| (kib.saturating_sub(base) * 1024) as f64 / resources;
        let heap = per(r.synced.heap_kib, r.idle_heap_kib);
        let rss = per(r.synced.settled_rss_kib, r.idle_rss_kib);
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {heap:.0} | {rss:.0} |",
            r.workloads,
            r.services,
            r.wire_bytes as f64 / 1048576.0,
            r.synced.ms,
            r.synced.hold_ms,
            r.synced.wait_ms,
            mib(r.idle_rss_kib),
            mib(r.synced.rss_kib),
            mib(r.synced.settled_rss_kib),
        );
        json.push(format!(
            "{{\"workloads\":{},\"services\":{},\"wire_bytes\":{},\"sync_ms\":{:.1},\"longest_hold_ms\":{:.2},\"longest_wait_ms\":{:.2},\"idle_rss_kib\":{},\"synced_rss_kib\":{},\"settled_rss_kib\":{},\"heap_bytes_per_resource\":{heap:.0},\"bytes_per_resource\":{rss:.0}}}",
            r.workloads,
            r.services,
            r.wire_bytes,
            r.synced.ms,
            r.synced.hold_ms,
            r.synced.wait_ms,
            r.idle_rss_kib,
            r.synced.rss_kib,
            r.synced.settled_rss_kib,
        ));
    }
    // XDS_SCALE_OUT: where the smoke test writes, so it never replaces real results.
    let path = match std::env::var_os("XDS_SCALE_OUT") {
        Some(path) => std::path::PathBuf::from(path),
        None => {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/xds-scale.json")
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, format!("[{}]\n", json.join(",\n ")))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn one(ca_dir: &std::path::Path, workloads: usize) -> Result<Row> {
    let services = (workloads / 10).max(1);
    let plane = ControlPlane::start(
        std::path::Path::new("/proc/self/ns/net"),
        "127.0.0.1:0".parse()?,
        ca_dir,
    )?;
    let mut wire_bytes = 0;
    for i in 0..services {
        let s = service(i);
        wire_bytes += prost::Message::encoded_len(&s);
        plane.put_service(s);
    }
    for i in 0..workloads {
        let w = workload(i, services);
        wire_bytes += prost::Message::encoded_len(&w);
        plane.put_workload(w);
    }
    let mut child = Command::new(std::env::current_exe()?)
        .args(["client", &plane.addr().to_string()])
        .arg(ca_dir.join("root-cert.pem"))
        .stdout(Stdio::piped())
        .stdin(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut idle = None;
    let mut synced = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let field = |name: &str| -> Option<f64> {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        };
        if line.starts_with("idle") {
            idle = field("rss_kib").zip(field("heap_kib"));
        } else if line.starts_with("synced") {
            synced = Some(Synced {
                ms: field("ms").unwrap_or(0.0),
                rss_kib: field("rss_kib").unwrap_or(0.0) as u64,
                settled_rss_kib: field("settled_rss_kib").unwrap_or(0.0) as u64,
                heap_kib: field("heap_kib").unwrap_or(0.0) as u64,
                wait_ms: field("wait_ms").unwrap_or(0.0),
                hold_ms: field("hold_ms").unwrap_or(0.0),
            });
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let (Some((idle_rss, idle_heap)), Some(synced)) = (idle, synced) else {
        bail!("the client process did not report a sync for {workloads} workloads");
    };
    Ok(Row {
        workloads,
        services,
        wire_bytes,
        idle_rss_kib: idle_rss as u64,
        idle_heap_kib: idle_heap as u64,
        synced,
    })
}

/// A workload as istiod describes a pod: every field a real one carries.
fn workload(i: usize, services: usize) -> pb::Workload {
    let ns = format!("ns-{}", i % 100);
    let ip = [10, (i >> 16) as u8, (i >> 8) as u8, i as u8];
    let service = i % services;
    pb::Workload {
        uid: format!("cluster1//Pod/{ns}/app-{i}-7d9f8c6b5-x2k4q"),
        name: format!("app-{i}-7d9f8c6b5-x2k4q"),
        namespace: ns.clone(),
        addresses: vec![ip.to_vec()],
        network: "network1".into(),
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        service_account: format!("app-{}", i % 1000),
        node: format!("node-{}", i % 500),
        canonical_name: format!("app-{}", i % 1000),
        canonical_revision: "v1".into(),
        workload_type: pb::WorkloadType::Pod as i32,
        workload_name: format!("app-{}", i % 1000),
        cluster_id: "cluster1".into(),
        locality: Some(pb::Locality {
            region: "us-east1".into(),
            zone: format!("us-east1-{}", ["b", "c", "d"][i % 3]),
            subzone: String::new(),
        }),
        services: [(
            format!(
                "ns-{}/svc-{service}.ns-{}.svc.cluster.local",
                service % 100,
                service % 100
            ),
            pb::PortList {
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
            },
        )]
        .into(),
        ..Default::default()
    }
}

fn service(i: usize) -> pb::Service {
    let ns = format!("ns-{}", i % 100);
    pb::Service {
        name: format!("svc-{i}"),
        hostname: format!("svc-{i}.{ns}.svc.cluster.local"),
        namespace: ns,
        addresses: vec![pb::NetworkAddress {
            network: "network1".into(),
            address: vec![172, 16 + (i >> 16) as u8, (i >> 8) as u8, i as u8],
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The measured process: mesh-node's xDS client and state index, nothing else.
fn client(addr: &str, root: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let config = XdsConfig {
        address: addr.parse::<SocketAddr>()?.to_string(),
        root_cert: root.into(),
        server_name: Some(SERVER_NAME.into()),
        token_file: None,
        cluster_id: "cluster1".into(),
        pod_name: "mesh-node-bench".into(),
        pod_namespace: "istio-system".into(),
        node_name: "node-0".into(),
        instance_ips: vec![],
        trust_domain: "cluster.local".into(),
    };
    let endpoint = config.endpoint()?;
    // The lock mesh-node's proxy context uses, handed over the same way between steps.
    let state = Arc::new(parking_lot::RwLock::new(State::new()));
    println!(
        "idle rss_kib={} heap_kib={}",
        rss_kib()?,
        mesh_node::memory::allocated_bytes() >> 10
    );
    let (ready_tx, mut ready) = tokio::sync::watch::channel(Default::default());
    let sink = state.clone();
    // A reader standing in for connections being routed: how long it waits for the read
    // lock while the push is applied.
    let syncing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = {
        let (state, syncing) = (state.clone(), syncing.clone());
        std::thread::spawn(move || {
            let mut longest = Duration::ZERO;
            while syncing.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = Instant::now();
                drop(state.read());
                longest = longest.max(asked.elapsed());
                std::thread::sleep(Duration::from_micros(200));
            }
            longest
        })
    };
    // XDS_SCALE_ONE_LOCK=1: the whole response under one hold, as before steps, to compare.
    let step = match std::env::var_os("XDS_SCALE_ONE_LOCK") {
        Some(_) => usize::MAX,
        None => mesh_node::xds::session::STEP,
    };
    let longest_hold = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hold = longest_hold.clone();
    let started = Instant::now();
    runtime.block_on(async move {
        let apply = move |update: mesh_node::xds::session::Update| {
            for step in update.into_steps(step) {
                let mut state = sink.write();
                let held = Instant::now();
                step.apply(&mut state);
                let held = held.elapsed().as_micros() as u64;
                parking_lot::RwLockWriteGuard::unlock_fair(state);
                longest_hold.fetch_max(held, std::sync::atomic::Ordering::Relaxed);
            }
        };
        let metrics = std::sync::Arc::new(mesh_node::telemetry::Metrics::new());
        tokio::spawn(mesh_node::xds::client::run(
            config, endpoint, apply, ready_tx, metrics,
        ));
        ready
            .wait_for(|r: &mesh_node::xds::session::XdsStatus| r.synced)
            .await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        syncing.store(false, std::sync::atomic::Ordering::Relaxed);
        let longest_wait = reader.join().expect("reader thread");
        let (w, s) = {
            let state = state.read();
            (state.workload_count(), state.service_count())
        };
        let synced_rss = rss_kib()?;
        // What mesh-node keeps of the push: its next periodic look at the allocator gives
        // back the decode buffers the push freed, as this one does.
        mesh_node::memory::check(&mut 0);
        println!(
            "synced ms={ms:.1} rss_kib={synced_rss} settled_rss_kib={} heap_kib={} workloads={w} services={s} wait_ms={:.2} hold_ms={:.2}",
            rss_kib()?,
            mesh_node::memory::allocated_bytes() >> 10,
            longest_wait.as_secs_f64() * 1000.0,
            hold.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0
        );
        // Stay alive (and resident) until the parent has read the figures and kills us.
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(())
    })
}

fn rss_kib() -> Result<u64> {
    mesh_tests::bench::proc_rss_kib(std::process::id())
}
