//! What `mesh-node bpf` asks the kernel directly: link attach points (which aya does not
//! expose), feature probes, cgroup paths by id, and whether run statistics are on.
use std::{
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// Where a link is attached, from `BPF_OBJ_GET_INFO_BY_FD`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachPoint {
    /// A cgroup, by id (the inode number of its directory in the cgroup2 mount).
    Cgroup(u64),
    /// A network namespace, by inode number.
    Netns(u32),
    Other(u32),
}

/// `struct bpf_link_info` up to and including the part of its union we read.
#[repr(C)]
#[derive(Default)]
struct LinkInfoRaw {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    /// The union: cgroup `{ u64 cgroup_id; u32 attach_type; }`, netns `{ u32 netns_ino; u32
    /// attach_type; }`, and larger members we do not read.
    union: [u64; 8],
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_NETNS: u32 = 5;

/// A pinned link as the kernel describes it.
#[derive(Clone, Copy, Debug)]
pub struct LinkDescription {
    pub id: u32,
    pub program_id: u32,
    pub attach_point: AttachPoint,
}

/// Opens the link pinned at `path` and asks the kernel what it is and where it is attached.
pub fn pinned_link(path: &Path) -> io::Result<LinkDescription> {
    let fd = crate::dataplane::sys::obj_get(path)?;
    let mut info = LinkInfoRaw::default();
    let attr = InfoByFdAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<LinkInfoRaw>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: `attr` is a valid BPF_OBJ_GET_INFO_BY_FD argument of the size passed; the kernel
    // writes at most `info_len` bytes to `info`, which lives until the call returns.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const attr,
            size_of::<InfoByFdAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let attach_point = match info.link_type {
        BPF_LINK_TYPE_CGROUP => AttachPoint::Cgroup(info.union[0]),
        // netns_ino is the union's first u32: the low half of the first word on little endian.
        BPF_LINK_TYPE_NETNS => AttachPoint::Netns(u32::from_ne_bytes(
            info.union[0].to_ne_bytes()[..4]
                .try_into()
                .unwrap_or_default(),
        )),
        other => AttachPoint::Other(other),
    };
    Ok(LinkDescription {
        id: info.id,
        program_id: info.prog_id,
        attach_point,
    })
}

/// The directory of the cgroup with this id under `mount` (cgroup ids are the directories'
/// inode numbers in cgroup v2), searched breadth-first.
pub fn cgroup_path(mount: &Path, id: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut queue = std::collections::VecDeque::from([mount.to_owned()]);
    while let Some(dir) = queue.pop_front() {
        if fs::metadata(&dir).is_ok_and(|meta| meta.ino() == id) {
            return Some(dir);
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            queue.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|entry| entry.path()),
            );
        }
    }
    None
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// `(major, minor)` of a release string such as `6.18.0-1-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether the kernel counts program runs (`kernel.bpf_stats_enabled`).
pub fn run_stats_enabled() -> bool {
    fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}

/// One capability mesh-node relies on, probed on this kernel.
#[derive(Debug, serde::Serialize)]
pub struct Feature {
    pub name: &'static str,
    /// What needs it.
    pub used_for: &'static str,
    /// `None` when the probe itself failed.
    pub present: Option<bool>,
}

/// Probes every program type, map type and helper the programs use.
pub fn probe_features() -> Vec<Feature> {
    let program = |name, used_for, kind| Feature {
        name,
        used_for,
        present: is_program_supported(kind).ok(),
    };
    let map = |name, used_for, kind| Feature {
        name,
        used_for,
        present: is_map_supported(kind).ok(),
    };
    let helper = |name, used_for, kind, helper: BpfHelper| Feature {
        name,
        used_for,
        present: is_helper_supported(kind, helper).ok(),
    };
    vec![
        program(
            "cgroup sock_addr programs",
            "outbound capture, getpeername",
            ProgramType::CgroupSockAddr,
        ),
        program(
            "sock_ops programs",
            "source-port tracking",
            ProgramType::SockOps,
        ),
        program(
            "sk_lookup programs",
            "inbound capture",
            ProgramType::SkLookup,
        ),
        map("LRU hash maps", "original destinations", MapType::LruHash),
        map("sockhash maps", "inbound listeners", MapType::SockHash),
        map("ring buffers", "bpf trace", MapType::RingBuf),
        helper(
            "bpf_get_netns_cookie",
            "which pod connects",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ),
        helper(
            "bpf_sk_lookup_tcp",
            "fail-open/closed liveness check",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_sk_lookup_tcp,
        ),
        Feature {
            name: "BTF (/sys/kernel/btf/vmlinux)",
            used_for: "not required",
            present: Some(Path::new("/sys/kernel/btf/vmlinux").exists()),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_read_from_distribution_release_strings() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(
            kernel_version("5.15.153.1-microsoft-standard-WSL2"),
            Some((5, 15))
        );
        assert_eq!(kernel_version("unknown"), None);
    }
}
