//! `mesh-bench [--smoke] [--runs N] [--out DIR] [--name NAME] [--paths P,…] [--tests T,…]
//! [--no-memory] [--after-peak SECS] [--compare-ztunnel ZTUNNEL] [--mesh "ARGS"] [-- MESH_NODE_ARGS…]`:
//! the data-path benchmark (see `mesh_tests::bench`); `--compare-ztunnel` adds Istio's ztunnel
//! (the binary given) on the cross-node path as another column.
//! Prints the Markdown table on stdout, progress on stderr, and writes `DIR/NAME.json` and
//! `DIR/NAME.md` (default `target/bench/datapath`). `--paths`, `--tests` and `--no-memory`
//! narrow a run for quick experiments.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::bench::{self, Config, Route, Test};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesh-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark builds network namespaces and loads eBPF programs: run it as root");
    }
    let default_out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let mut args = std::env::args().skip(1);
    let (mut smoke, mut runs, mut out, mut name) = (false, None, default_out, None);
    let (mut routes, mut tests, mut memory, mut mesh_args) = (None, None, true, Vec::new());
    let (mut after_peak, mut ztunnel) = (None, None);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--smoke" => smoke = true,
            "--runs" => {
                let n = value()?;
                let parsed: usize = n.parse().with_context(|| format!("--runs {n:?}"))?;
                ensure!(
                    parsed > 0,
                    "--runs {n}: at least one run is needed to report anything"
                );
                runs = Some(parsed);
            }
            "--out" => out = PathBuf::from(value()?),
            "--name" => name = Some(value()?),
            "--paths" => {
                routes = Some(
                    value()?
                        .split(',')
                        .map(Route::parse)
                        .collect::<Result<Vec<_>>>()?,
                )
            }
            "--tests" => {
                tests = Some(
                    value()?
                        .split(',')
                        .map(Test::parse)
                        .collect::<Result<Vec<_>>>()?,
                )
            }
            "--no-memory" => memory = false,
            "--after-peak" => {
                let secs = value()?;
                after_peak = Some(std::time::Duration::from_secs(
                    secs.parse()
                        .with_context(|| format!("--after-peak {secs:?}"))?,
                ));
            }
            "--compare-ztunnel" => {
                let path = PathBuf::from(value()?);
                ensure!(
                    path.is_file(),
                    "--compare-ztunnel {}: no such file (a ztunnel binary, e.g. \
                     out/rust/release/ztunnel of a ztunnel build)",
                    path.display()
                );
                ztunnel = Some(path.canonicalize()?);
            }
            "--mesh" => mesh_args.extend(value()?.split_whitespace().map(str::to_owned)),
            "--" => mesh_args.extend(args.by_ref()),
            other => bail!(
                "unknown argument {other:?}; usage: mesh-bench [--smoke] [--runs N] [--out DIR] \
                 [--name NAME] [--paths P,…] [--tests T,…] [--no-memory] [--after-peak SECS] \
                 [--compare-ztunnel ZTUNNEL] [--mesh \"ARGS\"] \
                 [-- MESH_NODE_ARGS…]"
            ),
        }
    }
    let mut config = if smoke {
        Config::smoke(out)
    } else {
        Config::full(out)
    };
    config.runs = runs.unwrap_or(config.runs);
    config.name = name.unwrap_or(config.name);
    config.routes = routes.unwrap_or(config.routes);
    config.tests = tests.unwrap_or(config.tests);
    config.memory = memory;
    config.after_peak = after_peak.unwrap_or(config.after_peak);
    config.mesh_args = mesh_args;
    if let Some(path) = ztunnel {
        if !config.routes.contains(&Route::Ztunnel) {
            config.routes.push(Route::Ztunnel);
        }
        config.ztunnel = Some(path);
    }
    let report = bench::run(&config)?;
    print!("{}", bench::markdown(&report));
    eprintln!(
        "mesh-bench: wrote {}",
        config
            .out_dir
            .join(format!("{}.json", config.name))
            .display()
    );
    if !report.errors.is_empty() {
        bail!(
            "{} error(s) during the run (listed above)",
            report.errors.len()
        );
    }
    Ok(())
}
