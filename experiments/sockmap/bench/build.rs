//! Builds the redirect programs (nightly + bpf-linker, as mesh-node's own) into OUT_DIR.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=MESH_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("MESH_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned());
    aya_build::build_ebpf(
        [Package {
            name: "sockmap-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
