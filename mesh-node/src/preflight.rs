//! Start-up checks that turn an unusable environment into one clear line instead of an obscure
//! failure later: privileges, cgroup v2, bpffs, kernel version.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The oldest kernel with every hook and helper mesh-node uses: sk_lookup (5.9), getpeername
/// hooks (5.8), netns cookies in sock_addr programs (5.7), `SO_NETNS_COOKIE` (5.14).
pub const MIN_KERNEL: (u32, u32) = (5, 14);

/// Capabilities the data plane needs, by number (linux/capability.h).
const REQUIRED_CAPS: [(u32, &str); 3] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "missing capability {name}: run mesh-node as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN"
    )]
    MissingCapability { name: &'static str },
    #[error("read {path}: {io_error}")]
    Read { path: PathBuf, io_error: io::Error },
    #[error(
        "no cgroup2 filesystem is mounted (no `cgroup2` line in /proc/self/mounts); mesh-node needs cgroup v2"
    )]
    NoCgroup2,
    #[error("cgroup {path} is not inside the cgroup2 mount {mount}")]
    CgroupOutsideMount { path: PathBuf, mount: PathBuf },
    #[error("cgroup {path} does not exist")]
    CgroupMissing { path: PathBuf },
    #[error("mount bpffs at {path}: {io_error}")]
    MountBpffs { path: PathBuf, io_error: io::Error },
    #[error("kernel {found} is too old: mesh-node needs Linux {}.{} or newer", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { found: String },
}

/// Fails with the first missing capability.
pub fn check_capabilities() -> Result<(), PreflightError> {
    let path = Path::new("/proc/self/status");
    let status = fs::read_to_string(path).map_err(|io_error| PreflightError::Read {
        path: path.to_owned(),
        io_error,
    })?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    match missing_capability(effective) {
        Some(name) => Err(PreflightError::MissingCapability { name }),
        None => Ok(()),
    }
}

fn missing_capability(effective: u64) -> Option<&'static str> {
    REQUIRED_CAPS
        .iter()
        .find(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
}

/// The mount point of the cgroup2 filesystem, from /proc/self/mounts.
pub fn cgroup2_mount() -> Result<PathBuf, PreflightError> {
    let path = Path::new("/proc/self/mounts");
    let mounts = fs::read_to_string(path).map_err(|io_error| PreflightError::Read {
        path: path.to_owned(),
        io_error,
    })?;
    find_mount(&mounts, "cgroup2").ok_or(PreflightError::NoCgroup2)
}

/// Checks that `cgroup` exists inside the cgroup2 mount (attaching to a v1 directory fails with
/// an unhelpful EBADF).
pub fn check_cgroup(cgroup: &Path, mount: &Path) -> Result<(), PreflightError> {
    if !cgroup.starts_with(mount) {
        return Err(PreflightError::CgroupOutsideMount {
            path: cgroup.to_owned(),
            mount: mount.to_owned(),
        });
    }
    if !cgroup.is_dir() {
        return Err(PreflightError::CgroupMissing {
            path: cgroup.to_owned(),
        });
    }
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf when nothing of type bpf is mounted there yet.
pub fn ensure_bpffs() -> Result<(), PreflightError> {
    let target = Path::new("/sys/fs/bpf");
    let path = Path::new("/proc/self/mounts");
    let mounts = fs::read_to_string(path).map_err(|io_error| PreflightError::Read {
        path: path.to_owned(),
        io_error,
    })?;
    if mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        matches!((fields.next(), fields.next(), fields.next()), (_, Some(dir), Some("bpf")) if dir == "/sys/fs/bpf")
    }) {
        return Ok(());
    }
    let mount_err = |io_error| PreflightError::MountBpffs {
        path: target.to_owned(),
        io_error,
    };
    fs::create_dir_all(target).map_err(mount_err)?;
    // SAFETY: all arguments are NUL-terminated static strings; no data pointer is passed.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(mount_err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Checks the running kernel against [`MIN_KERNEL`].
pub fn check_kernel() -> Result<String, PreflightError> {
    let path = Path::new("/proc/sys/kernel/osrelease");
    let release = fs::read_to_string(path).map_err(|io_error| PreflightError::Read {
        path: path.to_owned(),
        io_error,
    })?;
    let release = release.trim().to_owned();
    match parse_kernel_version(&release) {
        Some(version) if version >= MIN_KERNEL => Ok(release),
        _ => Err(PreflightError::KernelTooOld { found: release }),
    }
}

fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn find_mount(mounts: &str, fs_type: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fs_type).then(|| PathBuf::from(dir))
    })
}

/// Raises the soft open-file limit to the hard limit, as proxies do: every proxied connection
/// holds one or two descriptors, and runtimes often start processes at a soft limit of 1024.
/// Returns the limit now in force; failing to raise it is not fatal.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_line_wherever_it_is_mounted() {
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            find_mount(mounts, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount("proc /proc proc rw 0 0\n", "cgroup2"), None);
    }

    #[test]
    fn kernel_versions_compare_numerically() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert!(parse_kernel_version("5.4.0").unwrap() < MIN_KERNEL);
        assert!(parse_kernel_version("5.15.0").unwrap() >= MIN_KERNEL);
        assert_eq!(parse_kernel_version("garbage"), None);
    }

    #[test]
    fn names_the_first_missing_capability() {
        let all = (1u64 << 39) | (1 << 12) | (1 << 21);
        assert_eq!(missing_capability(all), None);
        assert_eq!(missing_capability(all & !(1 << 39)), Some("CAP_BPF"));
        assert_eq!(missing_capability(0), Some("CAP_BPF"));
    }

    #[test]
    fn cgroup_must_be_inside_the_mount() {
        let err = check_cgroup(Path::new("/tmp"), Path::new("/sys/fs/cgroup")).unwrap_err();
        assert!(
            err.to_string().contains("not inside the cgroup2 mount"),
            "{err}"
        );
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let raised = raise_open_file_limit();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct passed in.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!((raised, limit.rlim_cur), (limit.rlim_max, limit.rlim_max));
    }
}
