//! Running the pod application (`podapp`) inside a pod: its network namespace and its cgroup,
//! exactly where the capture hooks look.
use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader},
    net::SocketAddr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// The byte at `offset` of the stream every podapp client sends: not periodic at any power of
/// two, so a dropped, duplicated or reordered chunk cannot go unnoticed.
pub fn pattern(offset: usize) -> u8 {
    (offset.wrapping_mul(31) ^ (offset / 251)) as u8
}

/// `len` bytes of the client stream starting at `offset`, to look for on the wire.
pub fn pattern_bytes(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(pattern).collect()
}

/// The podapp binary: `PODAPP_BIN`, else next to the running executable.
pub fn binary() -> Result<PathBuf> {
    sibling_binary("podapp", "PODAPP_BIN")
}

/// A binary of this package: `$env` if set, else next to the running executable (test
/// binaries live in `target/<profile>/deps`, binaries in `target/<profile>`).
pub fn sibling_binary(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    [dir.join(name), dir.join("..").join(name)]
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| {
            format!("{name} binary not found next to the running executable: build the mesh-tests package")
        })
}

/// A command that joins `cgroup` and then `netns` before it execs. The cgroup move comes first:
/// it needs the cgroup2 mount, which is visible in the parent's mount namespace.
pub fn command_in(netns: &Path, cgroup: &Path, args: &[String]) -> Result<(Command, [File; 2])> {
    command_of(&binary()?, netns, cgroup, args)
}

/// Like [`command_in`], for any program.
pub fn command_of(
    program: &Path,
    netns: &Path,
    cgroup: &Path,
    args: &[String],
) -> Result<(Command, [File; 2])> {
    let ns = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("open {}/cgroup.procs", cgroup.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let (ns_fd, procs_fd) = (ns.as_raw_fd(), procs.as_raw_fd());
    // SAFETY: only write(2) and setns(2) run between fork and exec; the files are returned to the
    // caller, who keeps them open until the spawn.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process itself.
            if libc::write(procs_fd, c"0".as_ptr().cast(), 1) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok((cmd, [ns, procs]))
}

/// An echo server in a pod; killed when dropped.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(netns: &Path, cgroup: &Path, addr: SocketAddr) -> Result<Self> {
        Self::start_program(&binary()?, netns, cgroup, addr)
    }

    /// Starts `program serve ADDR` in a pod; the program prints `listening …` once bound.
    pub fn start_program(
        program: &Path,
        netns: &Path,
        cgroup: &Path,
        addr: SocketAddr,
    ) -> Result<Self> {
        let (mut cmd, _files) =
            command_of(program, netns, cgroup, &["serve".into(), addr.to_string()])?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("listening") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} serve {addr} did not start: {line:?}", program.display());
        }
        Ok(Self { child, addr })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A podapp server in a pod started with `args` (`source …`, `sink …`), whose report lines
/// (`ended …`) are collected as they come; killed when dropped.
#[derive(Debug)]
pub struct Recorder {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Recorder {
    pub fn start(netns: &Path, cgroup: &Path, args: &[String]) -> Result<Self> {
        let (mut cmd, _files) = command_in(netns, cgroup, args)?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("podapp stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if !line.starts_with("listening") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("podapp {args:?} did not start: {line:?}");
        }
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(line);
            }
        });
        Ok(Self { child, lines })
    }

    /// The connections the server has seen end, in order.
    pub fn endings(&self) -> Vec<Ending> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(|line| Ending::parse(line))
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How one connection ended, as a podapp side saw it: bytes read (or sent) and `eof`,
/// `reset`, `done` or `error:…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ending {
    pub bytes: u64,
    pub how: String,
}

impl Ending {
    fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("ended ")?;
        let field = |name: &str| {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        };
        Some(Self {
            bytes: field("bytes")?.parse().ok()?,
            how: field("how")?.to_owned(),
        })
    }
}

/// Runs a podapp client (`fetch …`, `push …`) in a pod to its end.
pub fn run_client(netns: &Path, cgroup: &Path, args: &[String]) -> Result<Ending> {
    let (mut cmd, _files) = command_in(netns, cgroup, args)?;
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let out = wait_with_timeout(child, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().find_map(Ending::parse).with_context(|| {
        format!(
            "podapp {args:?} reported no ending: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// One connection as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnResult {
    /// `getsockname()` of the client socket.
    pub local: SocketAddr,
    /// `getpeername()` of the client socket: what the application believes it is connected to.
    pub peer: SocketAddr,
    /// The client address the server reported for this connection.
    pub server_saw: SocketAddr,
    /// The server's own address on this connection (which pod answered).
    pub server_local: SocketAddr,
    /// Bytes sent, echoed back and verified.
    pub bytes: usize,
}

/// Asserts that every one of `conns` connections of `run` completed, each echoing `bytes`.
pub fn assert_all_ok(run: &PodRun, conns: usize, bytes: usize) {
    assert!(run.errors.is_empty(), "connection errors: {:?}", run.errors);
    assert_eq!(run.ok.len(), conns);
    for conn in &run.ok {
        assert_eq!(conn.bytes, bytes, "{conn:?}");
    }
}

/// The outcome of one `podapp connect` run.
#[derive(Debug)]
pub struct PodRun {
    pub ok: Vec<ConnResult>,
    pub errors: Vec<String>,
}

/// Runs `conns` parallel connections from inside a pod, each sending `bytes` and verifying the
/// echo.
pub fn connect(
    netns: &Path,
    cgroup: &Path,
    target: SocketAddr,
    bytes: usize,
    conns: usize,
) -> Result<PodRun> {
    connect_holding(netns, cgroup, target, bytes, conns, Duration::ZERO)
}

/// Like [`connect`], but each connection stays open for `hold` after the server has answered
/// and before the transfer.
pub fn connect_holding(
    netns: &Path,
    cgroup: &Path,
    target: SocketAddr,
    bytes: usize,
    conns: usize,
    hold: Duration,
) -> Result<PodRun> {
    let args = [
        "connect".into(),
        target.to_string(),
        bytes.to_string(),
        conns.to_string(),
        hold.as_millis().to_string(),
    ];
    let (mut cmd, _files) = command_in(netns, cgroup, &args)?;
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let out = wait_with_timeout(child, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut run = PodRun {
        ok: Vec::new(),
        errors: Vec::new(),
    };
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("ok ") {
            run.ok
                .push(parse_ok(rest).with_context(|| format!("podapp line {line:?}"))?);
        } else if let Some(rest) = line.strip_prefix("error ") {
            run.errors.push(rest.to_owned());
        }
    }
    if run.ok.len() + run.errors.len() != conns {
        bail!(
            "podapp reported {} of {conns} connections; stderr: {}",
            run.ok.len() + run.errors.len(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(run)
}

fn parse_ok(rest: &str) -> Result<ConnResult> {
    let field = |name: &str| -> Result<&str> {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .with_context(|| format!("missing {name}"))
    };
    Ok(ConnResult {
        local: field("local")?.parse()?,
        peer: field("peer")?.parse()?,
        server_saw: field("server_saw")?.parse()?,
        server_local: field("server_local")?.parse()?,
        bytes: field("bytes")?.parse()?,
    })
}

pub fn wait_with_timeout(child: Child, timeout: Duration) -> Result<std::process::Output> {
    // Reading the pipes on another thread keeps a chatty child from blocking on a full pipe.
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid; it has not been reaped (the waiter is blocked).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            bail!("podapp ran past {timeout:?} and was killed")
        }
    }
}

/// What `podapp resolve` got: the response code (`NOERROR`, `NXDOMAIN`, …), the transport
/// that carried the answer, where the reply seemed to come from, `getpeername()`, the addresses.
#[derive(Debug)]
pub struct Resolved {
    pub rcode: String,
    pub transport: String,
    pub from: SocketAddr,
    pub peer: SocketAddr,
    pub ips: Vec<std::net::IpAddr>,
}

/// Runs `podapp resolve SERVER NAME QTYPE MODE` in a pod (see the podapp binary).
pub fn resolve(
    netns: &Path,
    cgroup: &Path,
    server: SocketAddr,
    name: &str,
    qtype: &str,
    mode: &str,
) -> Result<Resolved> {
    let args = [
        "resolve".to_owned(),
        server.to_string(),
        name.to_owned(),
        qtype.to_owned(),
        mode.to_owned(),
    ];
    let (mut cmd, _files) = command_in(netns, cgroup, &args)?;
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let out = wait_with_timeout(child, Duration::from_secs(20))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().find_map(|l| l.strip_prefix("answer ")) else {
        bail!(
            "resolve {name} {qtype} {mode}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .unwrap_or("")
            .to_owned()
    };
    Ok(Resolved {
        rcode: field("rcode"),
        transport: field("transport"),
        from: field("from").parse()?,
        peer: field("peer").parse()?,
        ips: field("ips")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()?,
    })
}
