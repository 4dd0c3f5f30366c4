//! Logging: one subscriber for diagnostics and the access log (target `access`), written by a
//! background thread so that a slow stderr never stalls the data path (lines are dropped, not
//! waited for, if it falls 128k lines behind), with a filter that can change at run time.
use std::sync::OnceLock;

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

pub use tracing_appender::non_blocking::WorkerGuard;

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber: the filter from `MESH_NODE_LOG` (default `info`). Keep the
/// guard until the process ends; dropping it flushes what is still queued.
pub fn init() -> WorkerGuard {
    let filter =
        EnvFilter::try_from_env("MESH_NODE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry().with(filter).with(fmt).init();
    let _ = FILTER.set(handle);
    guard
}

#[derive(Debug, thiserror::Error)]
pub enum LevelError {
    #[error(
        "invalid log filter {spec:?}: {reason} (examples: info, debug, warn,mesh_node::proxy=debug, access=off)"
    )]
    Invalid { spec: String, reason: String },
    #[error("logging was not set up by this process")]
    NotInstalled,
}

/// Replaces the log filter (`EnvFilter` syntax: `debug`, `info,mesh_node::xds=debug`,
/// `access=off` …). Returns the filter now in force.
pub fn set_filter(spec: &str) -> Result<String, LevelError> {
    let filter = EnvFilter::try_new(spec).map_err(|error| LevelError::Invalid {
        spec: spec.to_owned(),
        reason: error.to_string(),
    })?;
    let handle = FILTER.get().ok_or(LevelError::NotInstalled)?;
    handle
        .reload(filter)
        .map_err(|_| LevelError::NotInstalled)?;
    Ok(current_filter())
}

/// The filter in force, in `EnvFilter` syntax.
pub fn current_filter() -> String {
    FILTER
        .get()
        .and_then(|handle| handle.with_current(|filter| filter.to_string()).ok())
        .unwrap_or_default()
}
