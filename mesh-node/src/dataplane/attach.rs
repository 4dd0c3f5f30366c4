//! Attaching the programs: each link is pinned under `<pin dir>/links/<program>`, so capture
//! survives mesh-node restarts and a restarted mesh-node reuses the links it finds.
use std::{
    fmt,
    fs::File,
    io,
    path::{Path, PathBuf},
};

use std::os::fd::AsFd;

use super::sys;
use aya::{
    Ebpf,
    maps::sock::SockMapFd,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SkMsg, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use mesh_common::program_names;

/// Each program with the hook it attaches to and the kernel that hook needs.
pub(crate) const PROGRAMS: [(&str, &str, &str); 9] = [
    (program_names::CONNECT4, "cgroup/connect4", "5.7"),
    (program_names::CONNECT6, "cgroup/connect6", "5.7"),
    (program_names::SOCK_OPS, "sockops", "5.0"),
    (program_names::GETPEERNAME4, "cgroup/getpeername4", "5.8"),
    (program_names::GETPEERNAME6, "cgroup/getpeername6", "5.8"),
    (program_names::SENDMSG4, "cgroup/sendmsg4", "4.18"),
    (program_names::RECVMSG4, "cgroup/recvmsg4", "5.2"),
    (program_names::SENDMSG6, "cgroup/sendmsg6", "4.18"),
    (program_names::RECVMSG6, "cgroup/recvmsg6", "5.2"),
];

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program {program} missing from the eBPF object")]
    MissingProgram { program: &'static str },
    #[error("open cgroup {path}: {io_error}")]
    OpenCgroup { path: PathBuf, io_error: io::Error },
    #[error("{hook} ({program}): kernel refused to load it (needs Linux {min_kernel}+): {source}")]
    Load {
        hook: &'static str,
        program: &'static str,
        min_kernel: &'static str,
        source: Box<ProgramError>,
    },
    #[error(
        "--kernel-same-node: the kernel refused {program} (the kernel path needs bpf_get_netns_cookie in sock_ops and sk_msg programs; tested on Linux 6.18): {source}"
    )]
    KernelPath {
        program: &'static str,
        source: Box<ProgramError>,
    },
    #[error("remove pinned link {path}: {io_error}")]
    Unpin { path: PathBuf, io_error: io::Error },
    #[error("attach {hook} to {cgroup}: {source}")]
    Attach {
        hook: &'static str,
        cgroup: PathBuf,
        source: Box<ProgramError>,
    },
    #[error("pin {hook} link at {path}: {message}")]
    Pin {
        hook: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error(
        "attach {hook}: the kernel gave a legacy attachment, not a BPF link, so it cannot be pinned (needs Linux 5.7+)"
    )]
    NotALink { hook: &'static str },
    #[error("attach sk_lookup to network namespace {netns}: {source}")]
    AttachNetns {
        netns: PathBuf,
        source: Box<ProgramError>,
    },
    #[error("replace the program of the pinned {hook} link {path}: {io_error}")]
    Update {
        hook: &'static str,
        path: PathBuf,
        io_error: io::Error,
    },
    #[error("open pinned link {path}: {source}")]
    Reuse {
        path: PathBuf,
        source: Box<LinkError>,
    },
}

/// Whether a link was created by this process or found pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkOrigin {
    Attached,
    Reused,
}

impl fmt::Display for LinkOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkOrigin::Attached => "attached",
            LinkOrigin::Reused => "reused",
        })
    }
}

/// A program attached through a pinned link.
#[derive(Debug)]
pub struct AttachedLink {
    pub hook: &'static str,
    pub program: &'static str,
    pub pin_path: PathBuf,
    pub link_id: u32,
    pub program_id: u32,
    pub origin: LinkOrigin,
}

pub fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    links_dir: &Path,
) -> Result<Vec<AttachedLink>, AttachError> {
    let cgroup_file = File::open(cgroup).map_err(|io_error| AttachError::OpenCgroup {
        path: cgroup.to_owned(),
        io_error,
    })?;
    let mut links = Vec::with_capacity(PROGRAMS.len());
    for (program, hook, min_kernel) in PROGRAMS {
        links.push(attach_pinned(
            ebpf,
            &cgroup_file,
            cgroup,
            links_dir,
            program,
            hook,
            min_kernel,
        )?);
    }
    Ok(links)
}

/// The kernel path for same-node connections (`--kernel-same-node`): the `sock_ops` program
/// that joins sockets to the SOCKHASH, through a pinned link like the others, and the
/// `sk_msg` program attached to that map. Off, a join link pinned by an earlier run is
/// removed, so no socket joins any more.
pub fn attach_kernel_path(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    links_dir: &Path,
    socks: &SockMapFd,
    enabled: bool,
) -> Result<Option<AttachedLink>, AttachError> {
    let (program, hook, min_kernel) = SOCK_JOIN;
    if !enabled {
        let pin_path = links_dir.join(program);
        match std::fs::remove_file(&pin_path) {
            Ok(()) => tracing::info!(hook, "kernel path for same-node connections switched off"),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(io_error) => {
                return Err(AttachError::Unpin {
                    path: pin_path,
                    io_error,
                });
            }
        }
        return Ok(None);
    }
    let kernel_path_err = |program: &'static str| {
        move |error: AttachError| match error {
            AttachError::Load { source, .. } => AttachError::KernelPath { program, source },
            other => other,
        }
    };
    let cgroup_file = File::open(cgroup).map_err(|io_error| AttachError::OpenCgroup {
        path: cgroup.to_owned(),
        io_error,
    })?;
    let link = attach_pinned(
        ebpf,
        &cgroup_file,
        cgroup,
        links_dir,
        program,
        hook,
        min_kernel,
    )
    .map_err(kernel_path_err(program))?;
    let program = program_names::SK_MSG;
    let to_error = |source: ProgramError| AttachError::KernelPath {
        program,
        source: Box::new(source),
    };
    let prog: &mut SkMsg = ebpf
        .program_mut(program)
        .ok_or(AttachError::MissingProgram { program })?
        .try_into()
        .map_err(to_error)?;
    prog.load().map_err(to_error)?;
    // Not a BPF link: the attachment belongs to the map, and the program attached there by a
    // predecessor is replaced.
    prog.attach(socks).map_err(to_error)?;
    Ok(Some(link))
}

/// Attaches one cgroup program through a link pinned under `links_dir`, or takes over the
/// link an earlier run pinned there (its program replaced by this build's).
fn attach_pinned(
    ebpf: &mut Ebpf,
    cgroup_file: &File,
    cgroup: &Path,
    links_dir: &Path,
    program: &'static str,
    hook: &'static str,
    min_kernel: &'static str,
) -> Result<AttachedLink, AttachError> {
    let pin_path = links_dir.join(program);
    let (fd_link, origin) = if pin_path.exists() {
        let pinned = PinnedLink::from_pin(&pin_path).map_err(|source| AttachError::Reuse {
            path: pin_path.clone(),
            source: Box::new(source),
        })?;
        // The link stays (capture never pauses); its program becomes this build's, so an
        // upgraded mesh-node runs its own kernel code, not its predecessor's.
        let prog_fd = load_one(ebpf, program, hook, min_kernel)?;
        let link_fd = sys::obj_get(&pin_path).map_err(|io_error| AttachError::Update {
            hook,
            path: pin_path.clone(),
            io_error,
        })?;
        sys::link_update(link_fd.as_fd(), prog_fd.as_fd()).map_err(|io_error| {
            AttachError::Update {
                hook,
                path: pin_path.clone(),
                io_error,
            }
        })?;
        (FdLink::from(pinned), LinkOrigin::Reused)
    } else {
        let fd_link = attach_one(ebpf, cgroup_file, cgroup, program, hook, min_kernel)?;
        let pinned = fd_link.pin(&pin_path).map_err(|error| AttachError::Pin {
            hook,
            path: pin_path.clone(),
            message: error.to_string(),
        })?;
        (FdLink::from(pinned), LinkOrigin::Attached)
    };
    let info = fd_link.info().map_err(|source| AttachError::Reuse {
        path: pin_path.clone(),
        source: Box::new(source),
    })?;
    tracing::info!(hook, program, link_id = info.id(), program_id = info.program_id(), %origin, "capture hook in place");
    Ok(AttachedLink {
        hook,
        program,
        pin_path,
        link_id: info.id(),
        program_id: info.program_id(),
        origin,
    })
}

/// Loads (verifies) one of the cgroup programs and returns its descriptor.
fn load_one(
    ebpf: &mut Ebpf,
    program: &'static str,
    hook: &'static str,
    min_kernel: &'static str,
) -> Result<std::os::fd::OwnedFd, AttachError> {
    let prog = ebpf
        .program_mut(program)
        .ok_or(AttachError::MissingProgram { program })?;
    let load_err = |source: ProgramError| AttachError::Load {
        hook,
        program,
        min_kernel,
        source: Box::new(source),
    };
    let fd = if is_sock_ops(program) {
        let prog: &mut SockOps = prog.try_into().map_err(load_err)?;
        prog.load().map_err(load_err)?;
        prog.fd().map_err(load_err)?.as_fd().try_clone_to_owned()
    } else {
        let prog: &mut CgroupSockAddr = prog.try_into().map_err(load_err)?;
        prog.load().map_err(load_err)?;
        prog.fd().map_err(load_err)?.as_fd().try_clone_to_owned()
    };
    fd.map_err(|io_error| AttachError::Update {
        hook,
        path: PathBuf::from(program),
        io_error,
    })
}

fn attach_one(
    ebpf: &mut Ebpf,
    cgroup_file: &File,
    cgroup: &Path,
    program: &'static str,
    hook: &'static str,
    min_kernel: &'static str,
) -> Result<FdLink, AttachError> {
    let prog = ebpf
        .program_mut(program)
        .ok_or(AttachError::MissingProgram { program })?;
    let load_err = |source: ProgramError| AttachError::Load {
        hook,
        program,
        min_kernel,
        source: Box::new(source),
    };
    let attach_err = |source: ProgramError| AttachError::Attach {
        hook,
        cgroup: cgroup.to_owned(),
        source: Box::new(source),
    };
    // BPF links on cgroups always coexist with other programs (a CNI's, another tool's); the
    // kernel refuses any attach flag on link creation, and `Single` is the one that sends none.
    let mode = CgroupAttachMode::Single;
    let link: Result<FdLink, _> = if is_sock_ops(program) {
        let prog: &mut SockOps = prog.try_into().map_err(load_err)?;
        prog.load().map_err(load_err)?;
        let id = prog.attach(cgroup_file, mode).map_err(attach_err)?;
        FdLink::try_from(prog.take_link(id).map_err(attach_err)?)
    } else {
        let prog: &mut CgroupSockAddr = prog.try_into().map_err(load_err)?;
        prog.load().map_err(load_err)?;
        let id = prog.attach(cgroup_file, mode).map_err(attach_err)?;
        FdLink::try_from(prog.take_link(id).map_err(attach_err)?)
    };
    link.map_err(|_| AttachError::NotALink { hook })
}

fn is_sock_ops(program: &str) -> bool {
    program == program_names::SOCK_OPS || program == program_names::SOCK_JOIN
}

/// The kernel path's join hook (`--kernel-same-node`); the kernel it needs was not pinned
/// down beyond the one it is tested on.
pub(crate) const SOCK_JOIN: (&str, &str, &str) =
    (program_names::SOCK_JOIN, "sockops", "6.18 (tested)");

/// The sk_lookup hook and the kernel it needs.
pub(crate) const SK_LOOKUP: (&str, &str, &str) = (program_names::SK_LOOKUP, "sk_lookup", "5.9");

/// Loads the sk_lookup program so the kernel verifies it at start-up, before any pod needs it.
pub fn load_sk_lookup(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    let (program, hook, min_kernel) = SK_LOOKUP;
    let load_err = |source: ProgramError| AttachError::Load {
        hook,
        program,
        min_kernel,
        source: Box::new(source),
    };
    let prog: &mut SkLookup = ebpf
        .program_mut(program)
        .ok_or(AttachError::MissingProgram { program })?
        .try_into()
        .map_err(load_err)?;
    prog.load().map_err(load_err)
}

/// Attaches sk_lookup to a network namespace through a link pinned at `pin_path`, or reuses the
/// link already pinned there. Returns the link id.
pub fn attach_netns(
    ebpf: &mut Ebpf,
    netns: impl AsFd,
    netns_path: &Path,
    pin_path: &Path,
) -> Result<(u32, LinkOrigin), AttachError> {
    let (program, hook, _) = SK_LOOKUP;
    let (fd_link, origin) = if pin_path.exists() {
        let pinned = PinnedLink::from_pin(pin_path).map_err(|source| AttachError::Reuse {
            path: pin_path.to_owned(),
            source: Box::new(source),
        })?;
        // As for the cgroup links: this build's program, swapped in place.
        let update_err = |io_error| AttachError::Update {
            hook,
            path: pin_path.to_owned(),
            io_error,
        };
        let prog: &mut SkLookup = ebpf
            .program_mut(program)
            .ok_or(AttachError::MissingProgram { program })?
            .try_into()
            .map_err(|source| AttachError::AttachNetns {
                netns: netns_path.to_owned(),
                source: Box::new(source),
            })?;
        let prog_fd = prog
            .fd()
            .map_err(|source| AttachError::AttachNetns {
                netns: netns_path.to_owned(),
                source: Box::new(source),
            })?
            .as_fd()
            .try_clone_to_owned()
            .map_err(update_err)?;
        let link_fd = sys::obj_get(pin_path).map_err(update_err)?;
        sys::link_update(link_fd.as_fd(), prog_fd.as_fd()).map_err(update_err)?;
        (FdLink::from(pinned), LinkOrigin::Reused)
    } else {
        let attach_err = |source: ProgramError| AttachError::AttachNetns {
            netns: netns_path.to_owned(),
            source: Box::new(source),
        };
        let prog: &mut SkLookup = ebpf
            .program_mut(program)
            .ok_or(AttachError::MissingProgram { program })?
            .try_into()
            .map_err(attach_err)?;
        let id = prog.attach(netns).map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd_link = FdLink::from(link);
        let pinned = fd_link.pin(pin_path).map_err(|error| AttachError::Pin {
            hook,
            path: pin_path.to_owned(),
            message: error.to_string(),
        })?;
        (FdLink::from(pinned), LinkOrigin::Attached)
    };
    let info = fd_link.info().map_err(|source| AttachError::Reuse {
        path: pin_path.to_owned(),
        source: Box::new(source),
    })?;
    Ok((info.id(), origin))
}
