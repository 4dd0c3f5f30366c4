//! The data-path benchmark in smoke mode, so that `cargo xtask bench` keeps working: every path
//! measured, every figure present and plausible, nothing failed. No timing is asserted — the
//! figures of a few hundred milliseconds on a loaded CI machine mean nothing.
use mesh_tests::{
    bench::{self, Config, Route},
    privileged,
};

#[test]
fn smoke_run_measures_every_path() {
    if !privileged() {
        return;
    }
    let out = std::env::temp_dir().join(format!("meshtest-bench-{}", std::process::id()));
    let config = Config::smoke(out.clone());
    let result = bench::run(&config);
    let written = std::fs::read_to_string(out.join("datapath-smoke.json"));
    let _ = std::fs::remove_dir_all(&out);
    let report = result.expect("the smoke benchmark runs");
    assert!(report.errors.is_empty(), "errors: {:?}", report.errors);

    let mesh = [
        Route::SameNode,
        Route::CrossNode,
        Route::CrossCluster,
        Route::CrossClusterFullTls,
    ];
    // Memory is measured once per kind of path: the full-TLS variant holds connections alike.
    let memory = [Route::SameNode, Route::CrossNode, Route::CrossCluster];
    let gateway = [Route::CrossCluster];
    let mut expected = vec![
        ("throughput_1", &Route::ALL[..]),
        ("throughput_8", &Route::ALL[..]),
        ("cpu_per_gb_1", &mesh[..]),
        ("cpu_per_gb_8", &mesh[..]),
        ("latency_p50", &Route::ALL[..]),
        ("latency_p99", &Route::ALL[..]),
        ("latency_max", &Route::ALL[..]),
        ("switches_per_request", &mesh[..]),
        ("conn_rate", &Route::ALL[..]),
        ("connect_p99", &Route::ALL[..]),
        ("exchange_p99", &Route::ALL[..]),
        ("rss_idle", &memory[..]),
        ("rss_idle_anon", &memory[..]),
        ("rss_peak", &memory[..]),
        ("rss_after_peak", &memory[..]),
        ("gateway_rss_idle", &gateway[..]),
    ];
    let held: Vec<String> = config.held.iter().map(|n| format!("rss_{n}")).collect();
    expected.extend(held.iter().map(|k| (k.as_str(), &memory[..])));
    let tunnels: Vec<String> = config
        .held
        .iter()
        .map(|n| format!("gateway_rss_{n}"))
        .collect();
    expected.extend(tunnels.iter().map(|k| (k.as_str(), &gateway[..])));
    for (key, routes) in expected {
        let metric = report
            .metric(key)
            .unwrap_or_else(|| panic!("no metric {key}"));
        let measured: Vec<&str> = metric.paths.keys().copied().collect();
        let wanted: Vec<&str> = routes.iter().map(|r| r.key()).collect();
        assert_eq!(measured, sorted(wanted), "{key} measured on");
        for (path, stat) in &metric.paths {
            assert!(
                stat.median.is_finite() && stat.median > 0.0,
                "{key} on {path}: {stat:?}"
            );
            assert!(stat.min <= stat.median && stat.median <= stat.max);
        }
    }
    // Cross-node memory is two mesh-nodes, cross-cluster three; each path's held connections
    // cost memory, the gateway's tunnels too.
    let rss = |key: &str, route: Route| report.metric(key).unwrap().paths[route.key()].median;
    let most = config.held.iter().max().unwrap();
    for route in memory {
        assert!(
            rss(&format!("rss_{most}"), route) > rss("rss_idle", route),
            "{route:?}"
        );
    }
    assert!(
        rss(&format!("gateway_rss_{most}"), Route::CrossCluster)
            > rss("gateway_rss_idle", Route::CrossCluster)
    );

    let json: serde_json::Value =
        serde_json::from_str(&written.expect("JSON written")).expect("JSON parses");
    assert_eq!(
        json["metrics"].as_array().map(Vec::len),
        Some(report.metrics.len())
    );
    let table = bench::markdown(&report);
    assert!(
        table.contains("| throughput, 1 stream (Gbit/s) |"),
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.starts_with("| ")).count(),
        report.metrics.len() + 1
    );
}

fn sorted(mut keys: Vec<&str>) -> Vec<&str> {
    keys.sort_unstable();
    keys
}

/// The soak benchmark (`cargo xtask bench soak`) in smoke mode: its load ran, every count adds
/// up, nothing failed, and every descriptor the load opened is closed again. No figure of time
/// or memory is asserted.
#[test]
fn soak_smoke_run_holds_pushes_and_counts() {
    if !privileged() {
        return;
    }
    let out = std::env::temp_dir().join(format!("meshtest-soak-{}", std::process::id()));
    let config = bench::soak::SoakConfig::smoke(out.clone());
    let result = bench::soak::run(&config);
    let written = std::fs::read_to_string(out.join("soak-smoke.md"));
    let _ = std::fs::remove_dir_all(&out);
    let report = result.expect("the soak runs");
    assert_eq!(report.error_count(), 0, "{report:#?}");
    let load = &report.load;
    assert_eq!(load.opened, config.conns as u64);
    assert_eq!(load.closed_ok, config.conns as u64);
    assert!(load.trickles >= config.conns as u64, "{load:?}");
    assert!(load.new_ok > 0, "{load:?}");
    assert!(
        report.policy_pushes > 0 && report.rechecks > 0.0,
        "{report:#?}"
    );
    assert!(report.recheck_mean_ms > 0.0);
    assert!(
        report.fds_after.0 <= report.fds_before.0 && report.fds_after.1 <= report.fds_before.1,
        "descriptors {:?} -> {:?}, new: {:?}",
        report.fds_before,
        report.fds_after,
        report.fds_new
    );
    assert!(!report.rss.is_empty());
    assert!(
        report
            .rss
            .iter()
            .all(|s| s.source_kib > 0 && s.destination_kib > 0)
    );
    assert!(
        written
            .expect("soak-smoke.md")
            .contains("re-check of every live connection")
    );
}
