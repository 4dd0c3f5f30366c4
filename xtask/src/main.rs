//! `cargo xtask`: the project's one-command workflows.
//!
//! - `setup`: make this machine ready (pinned nightly + rust-src, bpf-linker, Debian packages).
//!   Idempotent and quick when nothing is missing.
//! - `demo`: setup, build, then run the two-node demo.
//! - `test`: setup, build, lint, then every test, privileged integration tests included (a missing
//!   privilege fails the run instead of skipping).
//! - `bench [datapath [--smoke] [--runs N] …]`: release build, then the data-path
//!   benchmark (direct vs same-node vs cross-node HBONE).
//! - `bench xds [SIZES]`: release build, then the control-plane scale benchmark.
//! - `bench soak [--smoke] [--conns N] [--seconds S] [--rate R]`: release build, then the soak
//!   benchmark (long-held connections, policy pushes, memory and descriptors over time).
//! - `bench sockmap [--runs N] [TEST…]`: the sockmap experiment (`experiments/sockmap`, a
//!   workspace of its own): the kernel's socket redirects against a same-node relay.
//! - `release`: setup, then the release build of mesh-node (what the image's build stage runs).
//! - `fuzz [--seconds N] [TARGET…]`: cargo fuzz (libFuzzer, pinned nightly) on every target of
//!   `fuzz/`, seeded from `fuzz/corpus/<target>`; `test` runs it for a few seconds each.
//! - `image [--tag T]`: the container image from `Containerfile`, with buildah or podman.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// The nightly whose LLVM (22) bpf-linker 0.10.0 loads. Identified by rustc's commit date; when
/// no installed `nightly` has it, it is installed under its dated name.
const PINNED_NIGHTLY_COMMIT_DATE: &str = "2026-05-19";
const PINNED_NIGHTLY_NAME: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.10.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The sockmap experiment's own workspace (`bench sockmap`).
const SOCKMAP_MANIFEST: &str = "experiments/sockmap/Cargo.toml";
/// Seconds per fuzz target in `cargo xtask test` (a smoke run; `cargo xtask fuzz` runs longer).
const FUZZ_SMOKE_SECONDS: u64 = 5;
/// Commands the harness and mesh-node rely on, with the Debian package that provides each
/// (`iptables`: only the benchmark's ztunnel comparison, for its client pod's redirect).
const DEBIAN_TOOLS: [(&str, &str); 2] = [("ip", "iproute2"), ("iptables", "iptables")];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need.
    Setup,
    /// Set up, build, and run a local demo (needs root): two clusters joined by an east-west
    /// gateway, failing over and back (default), or `single`: two nodes of one cluster.
    Demo {
        /// `multicluster` (default) or `single`.
        which: Option<String>,
    },
    /// Set up, build, lint and run every test (integration tests need root).
    Test,
    /// Set up and build mesh-node with optimisations (target/release/mesh-node).
    Release,
    /// Fuzz the decoders (cargo fuzz on the pinned nightly), each target for --seconds.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: every one in fuzz/Cargo.toml).
        targets: Vec<String>,
    },
    /// Build the container image (Containerfile) with buildah or podman, whichever is present.
    Image {
        #[arg(long, default_value = "mesh-node:dev")]
        tag: String,
    },
    /// Build with optimisations and run a benchmark suite (default: the data path; needs root).
    Bench {
        /// Also run Istio's ztunnel (this binary) on the cross-node path of the data-path
        /// benchmark, as another column.
        #[arg(long, value_name = "ZTUNNEL")]
        compare_ztunnel: Option<PathBuf>,
        #[command(subcommand)]
        suite: Option<BenchSuite>,
    },
}

#[derive(Subcommand)]
enum BenchSuite {
    /// Data path: throughput, latency, connection rate and memory of mesh-node's paths against
    /// a no-mesh baseline; Markdown on stdout, JSON in target/bench.
    Datapath {
        /// Passed to mesh-bench: `--smoke`, `--runs N`, `--paths P,…`, `--tests T,…`,
        /// `--no-memory`, `--name NAME`, `--mesh "MESH_NODE_ARGS"`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Soak: 10,000 cross-node connections held 10 minutes with a trickle on each, new
    /// connections at a steady rate and a policy push every 5 s; errors, memory over time,
    /// re-check time, descriptors before and after.
    Soak {
        /// Passed to mesh-soak: `--smoke`, `--conns N`, `--seconds S`, `--rate R`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The sockmap experiment (experiments/sockmap): a same-node relay against the kernel's
    /// socket redirects, and no proxy at all; throughput, the machine's CPU, latency, queueing
    /// behind a stalled reader, EOF order. Markdown on stdout.
    Sockmap {
        /// Passed to sockmap-bench: `--runs N`, then tests among `bulk echo slow eof`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Control-plane scale: N workloads + N/10 services pushed over delta ADS; first-sync time
    /// and resident memory of the receiving process.
    Xds {
        /// Comma-separated workload counts.
        #[arg(default_value = "1000,10000,100000")]
        sizes: String,
    },
}

fn main() -> Result<()> {
    let root = workspace_root();
    // Paths given on the command line are the caller's, not the workspace's.
    let invoked_from = env::current_dir()?;
    env::set_current_dir(&root)?;
    match Cli::parse().command {
        Cmd::Setup => {
            setup()?;
        }
        Cmd::Demo { which } => {
            let toolchain = setup()?;
            build(&toolchain)?;
            let mut demo = Command::new(root.join("target/debug/mesh-demo"));
            demo.args(which);
            run(demo)?;
        }
        Cmd::Fuzz { seconds, targets } => {
            let toolchain = setup()?;
            fuzz(&toolchain, seconds, &targets)?;
        }
        Cmd::Release => {
            let toolchain = setup()?;
            cargo(&toolchain, &["build", "--release", "-p", "mesh-node"])?;
        }
        Cmd::Image { tag } => {
            let builder = ["buildah", "podman"]
                .into_iter()
                .find(|tool| Command::new(tool).arg("--version").output().is_ok())
                .context(
                    "neither buildah nor podman is installed (apt-get install buildah, or podman)",
                )?;
            let mut build = command(builder, &["build", "-f", "Containerfile", "-t", &tag, "."]);
            build.current_dir(&root);
            run(build)?;
            eprintln!("xtask: built image {tag} with {builder}");
        }
        Cmd::Bench {
            compare_ztunnel,
            suite,
        } => {
            if compare_ztunnel.is_some()
                && !matches!(suite, None | Some(BenchSuite::Datapath { .. }))
            {
                bail!("--compare-ztunnel is an option of the data-path benchmark");
            }
            let toolchain = setup()?;
            if let Some(BenchSuite::Sockmap { args }) = &suite {
                // Not mesh-node: a workspace of its own, built only when asked for.
                let manifest = root.join(SOCKMAP_MANIFEST);
                let manifest = manifest.to_str().context("workspace path is not UTF-8")?;
                cargo(
                    &toolchain,
                    &["build", "--release", "--manifest-path", manifest],
                )?;
                let mut bench =
                    Command::new(root.join("experiments/sockmap/target/release/sockmap-bench"));
                bench.args(args);
                return run(bench);
            }
            // mesh-node as released; the benchmark's programs in the quicker `tools` profile.
            cargo(&toolchain, &["build", "--release", "-p", "mesh-node"])?;
            cargo(
                &toolchain,
                &["build", "--profile", "tools", "-p", "mesh-tests"],
            )?;
            let release = root.join("target/release");
            let tools = root.join("target/tools");
            match suite.unwrap_or(BenchSuite::Datapath { args: Vec::new() }) {
                BenchSuite::Datapath { args } => {
                    let mut bench = Command::new(tools.join("mesh-bench"));
                    bench
                        .env("MESH_NODE_BIN", release.join("mesh-node"))
                        .args(args);
                    if let Some(path) = compare_ztunnel {
                        bench.arg("--compare-ztunnel").arg(invoked_from.join(path));
                    }
                    run(bench)?;
                }
                BenchSuite::Soak { args } => {
                    let mut bench = Command::new(tools.join("mesh-soak"));
                    bench
                        .env("MESH_NODE_BIN", release.join("mesh-node"))
                        .args(args);
                    run(bench)?;
                }
                BenchSuite::Sockmap { .. } => unreachable!("run above"),
                BenchSuite::Xds { sizes } => {
                    let mut bench = Command::new(tools.join("xds-scale"));
                    bench.arg(sizes);
                    run(bench)?;
                }
            }
        }
        Cmd::Test => {
            let toolchain = setup()?;
            build(&toolchain)?;
            cargo(&toolchain, &["fmt", "--all", "--", "--check"])?;
            cargo(
                &toolchain,
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            )?;
            // The sockmap experiment is no part of mesh-node and is not run here, but it must
            // keep building (its eBPF object included) and stay as clean as the rest.
            let experiment = root.join(SOCKMAP_MANIFEST);
            let experiment = experiment.to_str().context("workspace path is not UTF-8")?;
            cargo(
                &toolchain,
                &[
                    "fmt",
                    "--manifest-path",
                    experiment,
                    "--all",
                    "--",
                    "--check",
                ],
            )?;
            cargo(
                &toolchain,
                &[
                    "clippy",
                    "--manifest-path",
                    experiment,
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            )?;
            let mut test = cargo_cmd(
                &toolchain,
                &["test", "--workspace", "--", "--test-threads", "4"],
            );
            test.env("MESH_REQUIRE_PRIVILEGED", "1")
                .env("MESH_NODE_BIN", root.join("target/debug/mesh-node"));
            run(test)?;
            fuzz(&toolchain, FUZZ_SMOKE_SECONDS, &[])?;
        }
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Makes the machine ready; returns the nightly toolchain name for the eBPF build.
fn setup() -> Result<String> {
    let toolchain = ensure_nightly()?;
    ensure_rust_src(&toolchain)?;
    ensure_bpf_linker()?;
    ensure_debian_tools()?;
    ensure_cargo_fuzz()?;
    check_kustomize()?;
    eprintln!("xtask: set up (eBPF toolchain {toolchain}, bpf-linker {BPF_LINKER_VERSION})");
    Ok(toolchain)
}

fn ensure_nightly() -> Result<String> {
    for name in ["nightly", PINNED_NIGHTLY_NAME] {
        if nightly_commit_date(name).as_deref() == Some(PINNED_NIGHTLY_COMMIT_DATE) {
            return Ok(name.to_owned());
        }
    }
    eprintln!(
        "xtask: installing {PINNED_NIGHTLY_NAME} (rustc commit {PINNED_NIGHTLY_COMMIT_DATE})"
    );
    run(command(
        "rustup",
        &[
            "toolchain",
            "install",
            PINNED_NIGHTLY_NAME,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ],
    ))?;
    match nightly_commit_date(PINNED_NIGHTLY_NAME) {
        Some(date) if date == PINNED_NIGHTLY_COMMIT_DATE => Ok(PINNED_NIGHTLY_NAME.to_owned()),
        other => bail!(
            "{PINNED_NIGHTLY_NAME} reports commit date {other:?}, expected {PINNED_NIGHTLY_COMMIT_DATE}: \
             bpf-linker {BPF_LINKER_VERSION} needs that nightly's LLVM"
        ),
    }
}

fn nightly_commit_date(toolchain: &str) -> Option<String> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "-vV"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("commit-date: ").map(str::to_owned))
}

fn ensure_rust_src(toolchain: &str) -> Result<()> {
    let installed = output(command(
        "rustup",
        &["component", "list", "--installed", "--toolchain", toolchain],
    ))?;
    if !installed.lines().any(|line| line.starts_with("rust-src")) {
        run(command(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", toolchain],
        ))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = current
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (a few minutes, once)");
    run(command(
        "cargo",
        &[
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ],
    ))
}

fn ensure_debian_tools() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_TOOLS
        .iter()
        .filter(|(tool, _)| Command::new(tool).arg("-V").output().is_err())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {missing:?}");
    run(command("apt-get", &["update"]))?;
    let mut install = command("apt-get", &["install", "-y", "--no-install-recommends"]);
    install
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install)
}

fn ensure_cargo_fuzz() -> Result<()> {
    if env::var_os("MESH_SKIP_KUBECTL_CHECK").is_some() {
        return Ok(()); // the image's build stage fuzzes nothing
    }
    let installed = output(command("cargo", &["fuzz", "--version"])).unwrap_or_default();
    if installed.contains(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    run(command(
        "cargo",
        &[
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ],
    ))
}

/// The targets of `fuzz/Cargo.toml` (its `[[bin]]` names).
fn fuzz_targets(root: &Path) -> Result<Vec<String>> {
    let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml"))?;
    Ok(manifest
        .lines()
        .filter_map(|line| line.trim().strip_prefix("name = \""))
        .filter_map(|rest| rest.strip_suffix('"'))
        .filter(|name| *name != "mesh-node-fuzz")
        .map(str::to_owned)
        .collect())
}

/// Builds the fuzz targets and runs each for `seconds`, new inputs going to a scratch corpus
/// (the repository's seeds are read, not grown). A crash fails the run; its input is kept in
/// fuzz/artifacts/<target>/.
fn fuzz(toolchain: &str, seconds: u64, only: &[String]) -> Result<()> {
    let root = workspace_root();
    let targets = if only.is_empty() {
        fuzz_targets(&root)?
    } else {
        only.to_vec()
    };
    let fuzz_dir = root.join("fuzz");
    let plus = format!("+{toolchain}");
    let mut build = command("cargo", &[&plus, "fuzz", "build", "-O"]);
    build
        .current_dir(&fuzz_dir)
        .env("MESH_EBPF_TOOLCHAIN", toolchain);
    run(build)?;
    let scratch = env::temp_dir().join(format!("mesh-fuzz-{}", std::process::id()));
    for target in &targets {
        let grown = scratch.join(target);
        std::fs::create_dir_all(&grown)?;
        let seeds = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&seeds)?;
        let max_time = format!("-max_total_time={seconds}");
        let mut fuzz_run = command("cargo", &[&plus, "fuzz", "run", "-O", target]);
        fuzz_run
            .arg(&grown)
            .arg(&seeds)
            .args(["--", &max_time, "-print_final_stats=1"])
            .current_dir(&fuzz_dir)
            .env("MESH_EBPF_TOOLCHAIN", toolchain);
        let out = fuzz_run
            .output()
            .with_context(|| format!("run fuzz target {target}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let executed = stderr
            .lines()
            .find_map(|line| line.strip_prefix("stat::number_of_executed_units:"))
            .map_or("?", str::trim)
            .to_owned();
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&scratch);
            bail!("fuzz target {target} failed after {executed} runs:\n{stderr}");
        }
        eprintln!("xtask: fuzz {target}: {executed} runs in {seconds} s, no crash");
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// The manifest tests render deploy/ with `kubectl kustomize` (kustomize v5 syntax). Debian has
/// no kubectl recent enough, so its absence is reported, not installed. Only checked where the
/// tests run (not in the image's build stage, which has no use for it).
fn check_kustomize() -> Result<()> {
    if env::var_os("MESH_SKIP_KUBECTL_CHECK").is_some() {
        return Ok(());
    }
    let version = output(command("kubectl", &["version", "--client"])).context(
        "kubectl (with kustomize v5) is needed by the manifest tests: install it from \
         https://kubernetes.io/docs/tasks/tools/ (or set MESH_SKIP_KUBECTL_CHECK=1 where no \
         test runs)",
    )?;
    let kustomize = version
        .lines()
        .find_map(|line| line.strip_prefix("Kustomize Version: v"))
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
    match kustomize {
        Some(major) if major >= 5 => Ok(()),
        _ => bail!(
            "kubectl's kustomize is older than v5 ({version:?}): install a kubectl of 1.27 or later"
        ),
    }
}

fn build(toolchain: &str) -> Result<()> {
    cargo(toolchain, &["build", "-p", "mesh-node", "-p", "mesh-tests"])
}

fn cargo(toolchain: &str, args: &[&str]) -> Result<()> {
    run(cargo_cmd(toolchain, args))
}

fn cargo_cmd(toolchain: &str, args: &[&str]) -> Command {
    let mut cmd = command(
        &env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()),
        args,
    );
    cmd.env("MESH_EBPF_TOOLCHAIN", toolchain);
    cmd
}

fn command(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

fn run(mut cmd: Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(mut cmd: Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
