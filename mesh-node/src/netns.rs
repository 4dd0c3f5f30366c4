//! Network-namespace helpers: run a closure inside a pod's namespace, read a socket's namespace
//! cookie. Unsafe lives here, one `SAFETY` line per call.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::LazyLock,
};

/// `SO_NETNS_COOKIE` (Linux 5.14); libc does not export it on every target.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The namespace mesh-node's threads live in, opened on first use: `run` always returns a thread
/// here, so it is the same for every thread and never changes, and the upstream path calls `run`
/// once per connection. One handle for the process, not one per thread: a handle per runtime
/// worker and blocking thread showed up as descriptors opened whenever a new thread first
/// connected (the soak benchmark's before/after count).
static HOME_NETNS: LazyLock<io::Result<File>> =
    LazyLock::new(|| File::open("/proc/thread-self/ns/net"));

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("open network namespace {path}: {io_error}")]
    Open { path: PathBuf, io_error: io::Error },
    #[error("{path} is not a network namespace")]
    NotNetNs { path: PathBuf },
    #[error("setns({call}): {io_error}")]
    SetNs {
        call: &'static str,
        io_error: io::Error,
    },
}

impl NetNs {
    /// Opens a namespace file such as `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub fn open(path: &Path) -> Result<Self, NetNsError> {
        let file = File::open(path).map_err(|io_error| NetNsError::Open {
            path: path.to_owned(),
            io_error,
        })?;
        // Entering and leaving proves it is a network namespace (setns checks the type).
        Self::from_file(file, path)
    }

    /// Takes an already open namespace file (`path` names it in messages), checked as
    /// [`NetNs::open`] checks.
    pub fn from_file(file: File, path: &Path) -> Result<Self, NetNsError> {
        let netns = Self {
            file,
            path: path.to_owned(),
        };
        netns.run(|| ()).map_err(|_| NetNsError::NotNetNs {
            path: path.to_owned(),
        })?;
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open namespace file, for attaching programs to the namespace.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` on the current thread inside this namespace, then returns the thread to
    /// mesh-node's own namespace. Sockets created by `f` stay in this namespace for their whole
    /// life. `f` must not block: it runs on whatever thread calls this, possibly a runtime worker.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetNsError> {
        let home = HOME_NETNS.as_ref().map_err(|error| NetNsError::SetNs {
            call: "open own netns",
            io_error: io::Error::new(error.kind(), error.to_string()),
        })?;
        setns(&self.file).map_err(|io_error| NetNsError::SetNs {
            call: "enter",
            io_error,
        })?;
        let result = f();
        // Failing to return would leave this thread (possibly a runtime worker, which
        // survives a panic) in the pod's namespace, silently opening later sockets there.
        // Stop instead.
        if let Err(io_error) = setns(home) {
            tracing::error!(%io_error, "setns back to the original network namespace failed");
            std::process::abort();
        }
        Ok(result)
    }
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: `ns` is an open namespace file descriptor owned for the duration of the call.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The cookie of the network namespace a socket lives in, as `bpf_get_netns_cookie` reports it.
pub fn socket_netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the out-pointers reference live locals of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}
