//! `mesh-soak [--smoke] [--conns N] [--seconds S] [--rate R] [--out DIR]`: the soak benchmark
//! (see `mesh_tests::bench::soak`). Prints the Markdown report on stdout, progress on stderr,
//! and writes `DIR/soak.json` and `DIR/soak.md` (default `target/bench`). Fails when the run
//! saw any error.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use mesh_tests::bench::soak::{self, SoakConfig};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesh-soak: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the soak builds network namespaces and loads eBPF programs: run it as root");
    }
    let default_out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let mut args = std::env::args().skip(1);
    let (mut smoke, mut out) = (false, default_out);
    let (mut conns, mut seconds, mut rate) = (None, None, None);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--smoke" => smoke = true,
            "--out" => out = PathBuf::from(value()?),
            "--conns" => conns = Some(value()?.parse().context("--conns")?),
            "--seconds" => seconds = Some(value()?.parse().context("--seconds")?),
            "--rate" => rate = Some(value()?.parse().context("--rate")?),
            other => bail!(
                "unknown argument {other:?}; usage: mesh-soak [--smoke] [--conns N] \
                 [--seconds S] [--rate R] [--out DIR]"
            ),
        }
    }
    let mut config = if smoke {
        SoakConfig::smoke(out)
    } else {
        SoakConfig::full(out)
    };
    config.conns = conns.unwrap_or(config.conns);
    config.seconds = seconds.unwrap_or(config.seconds);
    config.rate = rate.unwrap_or(config.rate);
    let report = soak::run(&config)?;
    print!("{}", soak::markdown(&report));
    if report.error_count() > 0 {
        bail!(
            "{} error(s) during the soak: {:?}",
            report.error_count(),
            report.errors
        );
    }
    Ok(())
}
