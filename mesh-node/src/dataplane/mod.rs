//! The kernel side of mesh-node: loads the eBPF object, attaches (or finds already attached)
//! programs, and gives typed access to the shared maps.
mod attach;

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
};
use mesh_common::{ConnKey, Counter, DataplaneConfig, EnrolledPod, FailMode, OrigDst, map_names};

pub use attach::{AttachedLink, LinkOrigin};

/// The eBPF object built from mesh-ebpf; empty when the build skipped it (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "this mesh-node was built without its eBPF programs (bpf-linker or the nightly toolchain \
         was missing at build time): run `cargo xtask setup`, then rebuild"
    )]
    NoPrograms,
    #[error("create pin directory {path}: {io_error}")]
    PinDir { path: PathBuf, io_error: io::Error },
    #[error("load eBPF object (maps pinned under {pin_dir}): {source}")]
    LoadObject {
        pin_dir: PathBuf,
        source: Box<EbpfError>,
    },
    #[error("map {map} missing from the eBPF object")]
    MissingMap { map: &'static str },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error(transparent)]
    Attach(#[from] Box<attach::AttachError>),
}

/// Loaded programs, their links and the maps they share with user space.
pub struct Dataplane {
    links: Vec<AttachedLink>,
    enrolled: Mutex<HashMap<MapData, u64, EnrolledPod>>,
    conn_orig: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    counters: PerCpuArray<MapData, u64>,
    // Keeps the program file descriptors of freshly attached links alive with the process.
    _ebpf: Ebpf,
}

impl Dataplane {
    /// Loads the programs with their maps pinned under `pin_dir`, attaches them to `cgroup`
    /// (reusing links pinned by an earlier run) and records `fail_mode` for the kernel.
    pub fn start(
        pin_dir: &Path,
        cgroup: &Path,
        fail_mode: FailMode,
    ) -> Result<Self, DataplaneError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NoPrograms);
        }
        let links_dir = pin_dir.join("links");
        fs::create_dir_all(&links_dir).map_err(|io_error| DataplaneError::PinDir {
            path: links_dir.clone(),
            io_error,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .map_err(|source| DataplaneError::LoadObject {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;

        let mut config: Array<MapData, DataplaneConfig> = take_map(&mut ebpf, map_names::CONFIG)?;
        let value = DataplaneConfig {
            fail_mode: fail_mode as u32,
            _reserved: 0,
        };
        config
            .set(0, value, 0)
            .map_err(|source| DataplaneError::Map {
                map: map_names::CONFIG,
                source,
            })?;

        let links = attach::attach_all(&mut ebpf, cgroup, &links_dir).map_err(Box::new)?;
        Ok(Self {
            links,
            enrolled: Mutex::new(take_map(&mut ebpf, map_names::ENROLLED)?),
            conn_orig: Mutex::new(take_map(&mut ebpf, map_names::CONN_ORIG)?),
            counters: take_map(&mut ebpf, map_names::COUNTERS)?,
            _ebpf: ebpf,
        })
    }

    pub fn links(&self) -> &[AttachedLink] {
        &self.links
    }

    /// Starts capturing the network namespace with this cookie.
    pub fn enroll(&self, netns_cookie: u64, pod_id: u32) -> Result<(), DataplaneError> {
        let pod = EnrolledPod { pod_id, flags: 0 };
        lock(&self.enrolled)
            .insert(netns_cookie, pod, 0)
            .map_err(|source| DataplaneError::Map {
                map: map_names::ENROLLED,
                source,
            })
    }

    /// Stops capturing the network namespace with this cookie. Absent entries are not an error.
    pub fn unenroll(&self, netns_cookie: u64) -> Result<(), DataplaneError> {
        match lock(&self.enrolled).remove(&netns_cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DataplaneError::Map {
                map: map_names::ENROLLED,
                source,
            }),
        }
    }

    /// Removes every enrolled namespace not in `keep`: pods a previous run enrolled that are gone.
    pub fn retain_enrolled(&self, keep: &[u64]) -> Result<usize, DataplaneError> {
        let mut map = lock(&self.enrolled);
        let stale: Vec<u64> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|cookie| !keep.contains(cookie))
            .collect();
        for cookie in &stale {
            match map.remove(cookie) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(DataplaneError::Map {
                        map: map_names::ENROLLED,
                        source,
                    });
                }
            }
        }
        Ok(stale.len())
    }

    /// The destination a captured connection was headed for, looked up by the client's network
    /// namespace and source port as seen on accept. The entry is consumed.
    pub fn take_original_dst(&self, netns_cookie: u64, src_port: u16) -> Option<OrigDst> {
        let key = ConnKey::new(netns_cookie, src_port);
        let mut map = lock(&self.conn_orig);
        let orig = map.get(&key, 0).ok()?;
        // The LRU map would evict it anyway; removing keeps room for live connections.
        let _ = map.remove(&key);
        Some(orig)
    }

    /// Sums a kernel counter over all CPUs.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters
            .get(&(counter as u32), 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap { map: name })?;
    T::try_from(map).map_err(|source| DataplaneError::Map { map: name, source })
}

/// Map handles hold no invariants a panicking holder could break, so a poisoned lock is usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
