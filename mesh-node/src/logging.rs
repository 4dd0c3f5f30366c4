//! Logging: one subscriber for diagnostics and the access log (target `access`), with a filter
//! that can change at run time.
//!
//! Lines are written to stderr by a background thread, in batches: a data-path thread only
//! appends its formatted line to a queue under a mutex, and wakes the writer only if it is
//! asleep; the writer lets [`LINGER`] pass, so that a busy moment's lines go out in one
//! `write`. A slow stderr never stalls the data path: past [`MAX_QUEUED`] bytes, lines are
//! dropped and counted, and the count is logged once the writer catches up. (tracing-appender's
//! non-blocking writer, used before, sends every line through a channel whose receiver spins
//! and yields; at a few thousand connections a second that cost about 4% of this 2-core
//! machine in the connection-rate benchmark.)
use std::{
    io::{self, Write},
    mem,
    sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError},
    thread::{self, JoinHandle},
    time::Duration,
};

use tracing_subscriber::{
    EnvFilter, Registry, fmt::MakeWriter, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// How long the writer waits after being woken before writing, to gather more lines.
pub const LINGER: Duration = Duration::from_millis(5);
/// Bytes of lines that may wait for stderr before new ones are dropped.
pub const MAX_QUEUED: usize = 16 << 20;

/// Installs the global subscriber: the filter from `MESH_NODE_LOG` (default `info`). Keep the
/// guard until the process ends; dropping it writes what is still queued.
pub fn init() -> LogGuard {
    let filter =
        EnvFilter::try_from_env("MESH_NODE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let (writer, guard) = batched(io::stderr(), MAX_QUEUED);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry().with(filter).with(fmt).init();
    let _ = FILTER.set(handle);
    if guard.thread.is_none() {
        // Nothing would ever write the queue: say so where an operator will look.
        eprintln!("mesh-node: the log writer thread could not start; log lines will be lost");
    }
    guard
}

/// A writer whose lines `out` receives from a background thread, and the guard that stops it.
pub fn batched<W: Write + Send + 'static>(out: W, max_queued: usize) -> (BatchWriter, LogGuard) {
    let queue = Arc::new(Queue {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        max_queued,
    });
    let writer = {
        let queue = queue.clone();
        thread::Builder::new()
            .name("mesh-log".into())
            .spawn(move || queue.write_out(out))
            .ok()
    };
    (
        BatchWriter(queue.clone()),
        LogGuard {
            queue,
            thread: writer,
        },
    )
}

struct Queue {
    pending: Mutex<Pending>,
    wake: Condvar,
    max_queued: usize,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// The writer is waiting for lines (the next line must wake it).
    writer_asleep: bool,
    closing: bool,
    dropped: u64,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, line: &[u8]) {
        let mut pending = self.lock();
        if pending.bytes.len() + line.len() > self.max_queued {
            pending.dropped += 1;
            return;
        }
        pending.bytes.extend_from_slice(line);
        if mem::take(&mut pending.writer_asleep) {
            drop(pending);
            self.wake.notify_one();
        }
    }

    /// The writer thread: sleeps until lines arrive, lingers, writes them all at once.
    fn write_out(&self, mut out: impl Write) {
        let mut batch = Vec::new();
        loop {
            let closing = {
                let mut pending = self.lock();
                while pending.bytes.is_empty() && pending.dropped == 0 && !pending.closing {
                    pending.writer_asleep = true;
                    pending = self
                        .wake
                        .wait(pending)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if pending.bytes.is_empty() && pending.dropped == 0 {
                    return;
                }
                pending.closing
            };
            if !closing {
                thread::sleep(LINGER);
            }
            let dropped = {
                let mut pending = self.lock();
                mem::swap(&mut pending.bytes, &mut batch);
                mem::take(&mut pending.dropped)
            };
            let _ = out.write_all(&batch);
            if dropped > 0 {
                let _ = writeln!(
                    out,
                    "WARN mesh_node::logging: {dropped} log lines dropped: stderr fell {} MiB behind",
                    self.max_queued >> 20
                );
            }
            let _ = out.flush();
            batch.clear();
            // A burst's buffer is not kept for good.
            batch.shrink_to(64 * 1024);
        }
    }
}

/// Hands formatted lines to the writer thread (`tracing_subscriber`'s fmt layer writes each
/// event with one `write_all`, so lines are never split).
#[derive(Clone)]
pub struct BatchWriter(Arc<Queue>);

/// One event's writer: borrows the queue.
pub struct LineWriter<'a>(&'a Queue);

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.0.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.0)
    }
}

/// Stops the writer thread once everything queued is written.
pub struct LogGuard {
    queue: Arc<Queue>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.queue.lock().closing = true;
        self.queue.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects what the writer thread writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Lines from several threads all arrive, whole and each thread's in order, by the time the
    /// guard is dropped.
    #[test]
    fn every_line_arrives_whole_and_in_order() {
        let sink = Sink::default();
        let (writer, guard) = batched(sink.clone(), 1 << 20);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                thread::spawn(move || {
                    for i in 0..500 {
                        let line = format!("thread {t} line {i}\n");
                        writer.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2000);
        for t in 0..4 {
            let numbers: Vec<usize> = text
                .lines()
                .filter_map(|line| line.strip_prefix(&format!("thread {t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(numbers, (0..500).collect::<Vec<_>>());
        }
    }

    /// A writer that cannot keep up loses lines past the limit, never blocks the caller, and
    /// says how many it lost.
    #[test]
    fn a_stalled_output_drops_lines_and_counts_them() {
        struct Stalled(Sink, Arc<Mutex<()>>);
        impl Write for Stalled {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                let _gate = self.1.lock().unwrap();
                self.0.write(bytes)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let gate = Arc::new(Mutex::new(()));
        let closed = gate.lock().unwrap();
        let (writer, guard) = batched(Stalled(sink.clone(), gate.clone()), 100);
        for i in 0..50 {
            writer
                .make_writer()
                .write_all(format!("line {i:02}\n").as_bytes())
                .unwrap();
        }
        drop(closed);
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let kept = text
            .lines()
            .filter(|line| line.starts_with("line "))
            .count();
        assert!((1..50).contains(&kept), "{text}");
        assert!(
            text.contains(&format!("{} log lines dropped", 50 - kept)),
            "{text}"
        );
    }
}
