//! `mesh-node bpf`: read-only inspection of the kernel side, from the objects pinned under the
//! bpffs directory, so it works while mesh-node runs and after it stopped.
//!
//! Every subcommand gathers a serialisable view first, then renders it as an aligned table or
//! as JSON (`trace` as one JSON object per line).
mod kernel;
mod maps;
mod pinned;
mod pods;
mod raw;
mod status;
mod table;
mod trace;

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::MapError;
use serde::Serialize;

pub use maps::{conns, dump, maps};
use pinned::Pinned;
pub use pods::pods;
pub use raw::render as render_raw;
pub use status::status;
pub use trace::TraceFilter;

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "no mesh-node state under {dir}: mesh-node has not run with --bpffs {dir} on this node \
         (or bpffs is not mounted there)"
    )]
    NoState { dir: PathBuf },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("unknown map {name:?}; the maps are: {known}")]
    UnknownMap { name: String, known: String },
    #[error(
        "{map} is a ring buffer and cannot be listed without consuming it: use `mesh-node bpf trace`"
    )]
    NotDumpable { map: &'static str },
    #[error("read trace events: {0}")]
    Trace(io::Error),
    #[error("write output: {0}")]
    Write(#[from] io::Error),
}

fn emit(
    out: &mut impl Write,
    output: Output,
    value: &impl Serialize,
    table: impl FnOnce() -> String,
) -> Result<(), InspectError> {
    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut *out, value).map_err(io::Error::from)?;
            writeln!(out)?;
        }
        Output::Table => out.write_all(table().as_bytes())?,
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// trace

/// Streams redirect decisions until `limit` events matched or `duration` passed (both optional:
/// without them, until interrupted).
pub fn trace(
    dir: &Path,
    filter: &TraceFilter,
    limit: Option<u64>,
    duration: Option<Duration>,
    output: Output,
    out: &mut impl Write,
) -> Result<(), InspectError> {
    let pinned = Pinned::open(dir)?;
    trace::run(&pinned, filter, limit, duration, output, out)
}
