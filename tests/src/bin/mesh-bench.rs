//! `mesh-bench [--smoke] [--runs N] [--out DIR] [-- MESH_NODE_ARGS…]`: the data-path benchmark
//! (see `mesh_tests::bench`). Prints the Markdown table on stdout, progress on stderr, and writes
//! `DIR/datapath.json` and `DIR/datapath.md` (default `DIR`: `target/bench`).
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use mesh_tests::bench::{self, Config};

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
    let (mut smoke, mut runs, mut out, mut mesh_args) = (false, None, default_out, Vec::new());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => smoke = true,
            "--runs" => {
                let n = args.next().context("--runs needs a number")?;
                runs = Some(n.parse().with_context(|| format!("--runs {n:?}"))?);
            }
            "--out" => out = PathBuf::from(args.next().context("--out needs a directory")?),
            "--" => mesh_args.extend(args.by_ref()),
            other => bail!(
                "unknown argument {other:?}; usage: mesh-bench [--smoke] [--runs N] [--out DIR] [-- MESH_NODE_ARGS…]"
            ),
        }
    }
    let mut config = if smoke {
        Config::smoke(out)
    } else {
        Config::full(out)
    };
    if let Some(runs) = runs {
        config.runs = runs;
    }
    config.mesh_args = mesh_args;
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
