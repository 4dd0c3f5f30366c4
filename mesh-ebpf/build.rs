//! Rebuild when bpf-linker changes: cargo cannot see this dependency on its own.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    let Some(path) = env::var_os("PATH") else {
        return;
    };
    for dir in env::split_paths(&path) {
        let linker: PathBuf = dir.join("bpf-linker");
        if linker.exists() {
            println!("cargo:rerun-if-changed={}", linker.display());
            return;
        }
    }
}
