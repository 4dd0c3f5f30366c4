//! Finding a pod's network namespace on the host: the kubelet names every pod's cgroup after the
//! pod's UID, so a process whose `/proc/<pid>/cgroup` names that UID lives in the pod, and
//! `/proc/<pid>/ns/net` is its namespace.
//!
//! Both kubelet cgroup drivers are recognised:
//! - systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, '-' → '_'>.slice/…`
//!   (`kubepods-pod<uid>.slice` for Guaranteed pods);
//! - cgroupfs: `/kubepods/burstable/pod<uid>/<container>`.
use std::{
    collections::{HashMap, HashSet},
    fs::{self, File},
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// A network namespace found for a pod.
#[derive(Debug)]
pub struct Found {
    /// `<proc>/<pid>/ns/net`, for logs.
    pub path: PathBuf,
    /// The namespace, already open: it stays valid when the process exits.
    pub file: File,
}

/// Scans `proc_root` once for every UID in `uids`. A UID with no live process in a network
/// namespace other than this process's own is missing from the answer (its sandbox has not
/// started yet, or every process of it is gone). Processes that exit during the scan are
/// skipped.
pub fn find(proc_root: &Path, uids: &HashSet<String>) -> io::Result<HashMap<String, Found>> {
    let mut found = HashMap::new();
    if uids.is_empty() {
        return Ok(found);
    }
    let own_netns = fs::metadata(proc_root.join("self/ns/net"))
        .or_else(|_| fs::metadata("/proc/self/ns/net"))
        .map(|m| (m.dev(), m.ino()))
        .ok();
    let patterns: Vec<(String, [String; 2])> = uids
        .iter()
        .map(|uid| {
            (
                uid.clone(),
                [
                    format!("pod{uid}"),
                    format!("pod{}.slice", uid.replace('-', "_")),
                ],
            )
        })
        .collect();
    let mut pids: Vec<u32> = fs::read_dir(proc_root)?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The lowest pid of a pod is usually its sandbox's (pause) process, the longest-lived one.
    pids.sort_unstable();
    for pid in pids {
        if found.len() == uids.len() {
            break;
        }
        let dir = proc_root.join(pid.to_string());
        let Ok(cgroups) = fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let Some(uid) = patterns.iter().find_map(|(uid, names)| {
            (!found.contains_key(uid) && cgroups.lines().any(|line| names_pod(line, names)))
                .then_some(uid)
        }) else {
            continue;
        };
        let path = dir.join("ns/net");
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else {
            continue;
        };
        if own_netns == Some((meta.dev(), meta.ino())) {
            // A process of the pod in the host's namespace (a host-network pod the API did not
            // say was one): capturing it would capture the node.
            tracing::warn!(pid, uid = %uid, "pod process shares mesh-node's network namespace; not used");
            continue;
        }
        found.insert(uid.clone(), Found { path, file });
    }
    Ok(found)
}

/// One `/proc/<pid>/cgroup` line (`ID:controllers:/path`) has a path component naming the pod:
/// `pod<uid>` (cgroupfs) or `…-pod<uid with '_'>.slice` (systemd).
fn names_pod(line: &str, [cgroupfs, systemd]: &[String; 2]) -> bool {
    let Some(path) = line.splitn(3, ':').nth(2) else {
        return false;
    };
    path.split('/').any(|component| {
        component == cgroupfs
            || component
                .strip_suffix(systemd.as_str())
                .is_some_and(|head| head.ends_with('-'))
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A fake `/proc` under the temporary directory, removed on drop.
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "mesh-node-fakeproc-{}-{name}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        /// A process with this cgroup file; `netns`: its `ns/net` links to a real namespace
        /// file (a new one per test would need privileges; any file that opens will do, and
        /// `/proc/1/ns/net` is not ours when the tests run in a namespace, so use a plain file).
        fn process(&self, pid: u32, cgroup: &str, netns: bool) {
            let dir = self.0.join(pid.to_string());
            fs::create_dir_all(dir.join("ns")).unwrap();
            fs::write(dir.join("cgroup"), cgroup).unwrap();
            if netns {
                let target = self.0.join(format!("netns-{pid}"));
                fs::write(&target, b"").unwrap();
                symlink(&target, dir.join("ns/net")).unwrap();
            }
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn uids(list: &[&str]) -> HashSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const UID: &str = "5f0c2a3e-7b1d-4c8e-9a6f-0123456789ab";

    #[test]
    fn systemd_layout() {
        let proc = FakeProc::new("systemd");
        proc.process(
            40,
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5f0c2a3e_7b1d_4c8e_9a6f_0123456789ab.slice/cri-containerd-abc.scope\n",
            true,
        );
        proc.process(41, "0::/system.slice/containerd.service\n", true);
        let found = find(&proc.0, &uids(&[UID])).unwrap();
        assert_eq!(found[UID].path, proc.0.join("40/ns/net"));
    }

    #[test]
    fn guaranteed_pod_systemd_slice() {
        let proc = FakeProc::new("guaranteed");
        proc.process(
            7,
            "0::/kubepods.slice/kubepods-pod5f0c2a3e_7b1d_4c8e_9a6f_0123456789ab.slice/cri-containerd-1.scope\n",
            true,
        );
        assert!(find(&proc.0, &uids(&[UID])).unwrap().contains_key(UID));
    }

    #[test]
    fn cgroupfs_layout_and_cgroup_v1_lines() {
        let proc = FakeProc::new("cgroupfs");
        proc.process(
            12,
            "12:memory:/kubepods/burstable/pod5f0c2a3e-7b1d-4c8e-9a6f-0123456789ab/0123abcd\n0::/\n",
            true,
        );
        let found = find(&proc.0, &uids(&[UID, "other-uid"])).unwrap();
        assert_eq!(found[UID].path, proc.0.join("12/ns/net"));
        assert!(!found.contains_key("other-uid"));
    }

    #[test]
    fn a_pod_whose_first_process_is_gone_is_found_by_another() {
        let proc = FakeProc::new("gone");
        let cgroup = format!("0::/kubepods/besteffort/pod{UID}/c1\n");
        // pid 3 exited between listing and opening: its ns/net is missing.
        proc.process(3, &cgroup, false);
        proc.process(9, &cgroup, true);
        let found = find(&proc.0, &uids(&[UID])).unwrap();
        assert_eq!(found[UID].path, proc.0.join("9/ns/net"));
    }

    #[test]
    fn near_misses_do_not_match() {
        let proc = FakeProc::new("miss");
        // Another pod whose UID starts the same; a container id containing the UID; a slice
        // without the dash before "pod".
        proc.process(5, &format!("0::/kubepods/besteffort/pod{UID}0/c1\n"), true);
        proc.process(6, &format!("0::/kubepods/besteffort/x/c-pod{UID}\n"), true);
        proc.process(
            8,
            "0::/kubepods.slice/xpod5f0c2a3e_7b1d_4c8e_9a6f_0123456789ab.slice\n",
            true,
        );
        proc.process(10, "garbage without colons", true);
        fs::write(proc.0.join("not-a-pid"), b"").unwrap();
        assert!(find(&proc.0, &uids(&[UID])).unwrap().is_empty());
    }

    #[test]
    fn missing_proc_root_is_an_error() {
        assert!(find(Path::new("/nonexistent-proc-root"), &uids(&[UID])).is_err());
    }
}
