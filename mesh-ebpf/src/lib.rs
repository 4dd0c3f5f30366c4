//! mesh-node's kernel programs live in the binary target (`src/main.rs`), built for
//! `bpfel-unknown-none` by mesh-node's build script. This library target exists so that mesh-node
//! can declare a build-dependency on this crate and cargo rebuilds it when these sources change.
#![no_std]
