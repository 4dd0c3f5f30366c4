//! Builds the eBPF object (mesh-ebpf, nightly + bpf-linker) into OUT_DIR for `include_bytes!`,
//! and the protobuf/gRPC code for xDS with protox (a pure-Rust protobuf compiler, so the build
//! needs no `protoc`).
//!
//! Without bpf-linker or the nightly toolchain, an empty stub is written instead so that
//! `cargo check` and `clippy` still work; the resulting binary refuses to run the data plane and
//! says why. `cargo xtask setup` installs what the real build needs.
use std::{env, fs, path::PathBuf, process::Command};

use aya_build::{Package, Toolchain};

/// Overrides the nightly toolchain used for the eBPF crate (set by `cargo xtask` when the pinned
/// nightly is installed under its dated name).
const TOOLCHAIN_ENV: &str = "MESH_EBPF_TOOLCHAIN";

fn main() -> anyhow::Result<()> {
    compile_protos()?;
    println!("cargo:rerun-if-env-changed={TOOLCHAIN_ENV}");
    let toolchain = env::var(TOOLCHAIN_ENV).unwrap_or_else(|_| "nightly".to_owned());
    let out_dir = PathBuf::from(anyhow::Context::context(
        env::var_os("OUT_DIR"),
        "cargo sets OUT_DIR",
    )?);
    let stub = out_dir.join("mesh-ebpf");

    if let Some(missing) = missing_tool(&toolchain) {
        println!("cargo:warning=################################################################");
        println!("cargo:warning=mesh-node: eBPF programs NOT built: {missing}.");
        println!("cargo:warning=This binary carries an EMPTY stub and cannot capture traffic.");
        println!(
            "cargo:warning=Run `cargo xtask setup` to install the eBPF toolchain, then rebuild."
        );
        println!("cargo:warning=################################################################");
        fs::write(&stub, [])?;
        return Ok(());
    }

    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "mesh-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

/// What stands in the way of building the eBPF object, if anything.
fn missing_tool(toolchain: &str) -> Option<String> {
    if env::var_os("AYA_BUILD_SKIP").is_some() {
        return Some("AYA_BUILD_SKIP is set".to_owned());
    }
    let linker_found = env::var_os("PATH")
        .map(|path| env::split_paths(&path).any(|dir| dir.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !linker_found {
        return Some("bpf-linker is not on PATH".to_owned());
    }
    let nightly_ok = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !nightly_ok {
        return Some(format!("the Rust toolchain `{toolchain}` is not installed"));
    }
    None
}

/// The protos under `proto/` (xDS and the CA): message types, clients, and (for test control
/// planes, test CAs and gateways) servers.
fn compile_protos() -> anyhow::Result<()> {
    let files = [
        "proto/discovery.proto",
        "proto/workload.proto",
        "proto/authorization.proto",
        "proto/ca.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // A response's resource bodies are slices of the buffer it arrived in, not one
        // allocation each (see `proto::Any`).
        .extern_path(".google.protobuf.Any", "crate::proto::Any")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
