//! The `mesh-node` binary: argument parsing and logging set-up around the library.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use mesh_node::config::{DEFAULT_BPFFS_DIR, FailMode, RunConfig};

#[derive(Parser)]
#[command(
    name = "mesh-node",
    about = "eBPF-accelerated node-level service-mesh proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node proxy.
    Run(RunArgs),
    /// Print the version.
    Version,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Static enrollment file (YAML list of pods).
    #[arg(long, env = "MESH_NODE_PODS")]
    pods: Option<PathBuf>,
    /// cgroup v2 directory to attach the capture hooks to [default: the cgroup2 mount root].
    #[arg(long, env = "MESH_NODE_CGROUP")]
    cgroup: Option<PathBuf>,
    /// bpffs directory for this instance's pinned links and maps.
    #[arg(long, env = "MESH_NODE_BPFFS", default_value = DEFAULT_BPFFS_DIR)]
    bpffs: PathBuf,
    /// What happens to enrolled pods' connections while mesh-node is not serving.
    #[arg(long, env = "MESH_NODE_FAIL_MODE", value_enum, default_value_t = FailModeArg::Open)]
    fail_mode: FailModeArg,
    /// Data-path worker threads [default: one per CPU].
    #[arg(long, env = "MESH_NODE_WORKERS", default_value_t = 0)]
    workers: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum FailModeArg {
    /// Let traffic through uncaptured.
    Open,
    /// Refuse new connections.
    Closed,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Version => {
            println!("mesh-node {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            let config = RunConfig {
                pods_file: args.pods,
                cgroup: args.cgroup,
                bpffs_dir: args.bpffs,
                fail_mode: match args.fail_mode {
                    FailModeArg::Open => FailMode::Open,
                    FailModeArg::Closed => FailMode::Closed,
                },
                worker_threads: args.workers,
            };
            match mesh_node::app::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("mesh-node: error: {}", error_chain(&error));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("MESH_NODE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The error and its causes on one line, skipping causes a message already quotes.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(err) = cause {
        let text = err.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = err.source();
    }
    line
}
