//! The kernel side of mesh-node: loads the eBPF object, attaches (or finds already attached)
//! programs, and gives typed access to the shared maps.
mod attach;
pub mod record;
pub mod sys;

use std::{
    fs, io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockHash},
};
use mesh_common::{
    ConnKey, Counter, DataplaneConfig, DeliveryKey, EnrolledPod, FailMode, InboundKey, OrigDst,
    SockKey, SockPair, map_names,
};

/// The cgroup programs: `(program, hook, minimum kernel)`.
pub(crate) use attach::PROGRAMS as CGROUP_PROGRAMS;
pub use attach::{AttachedLink, LinkOrigin};

/// The hook a program of ours attaches to and the kernel that hook needs.
pub fn hook_of(program: &str) -> Option<(&'static str, &'static str)> {
    attach::PROGRAMS
        .iter()
        .chain([&attach::SK_LOOKUP, &attach::SOCK_JOIN])
        .find(|(name, _, _)| *name == program)
        .map(|(_, hook, min_kernel)| (*hook, *min_kernel))
}

/// The eBPF object built from mesh-ebpf; empty when the build skipped it (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "this mesh-node was built without its eBPF programs (bpf-linker or the nightly toolchain \
         was missing at build time): run `cargo xtask setup`, then rebuild"
    )]
    NoPrograms,
    #[error("the kernel path for same-node connections is off (--kernel-same-node)")]
    KernelPathOff,
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
    #[error("parse the eBPF object: {0}")]
    ParseObject(String),
    #[error("remove incompatible pinned map {path}: {io_error}")]
    ReplacePin { path: PathBuf, io_error: io::Error },
    #[error("remove pinned link {path}: {io_error}")]
    Unpin { path: PathBuf, io_error: io::Error },
}

/// Loaded programs, their links and the maps they share with user space.
pub struct Dataplane {
    links: Vec<AttachedLink>,
    enrolled: Mutex<HashMap<MapData, u64, EnrolledPod>>,
    conn_orig: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    dns_upstream: HashMap<MapData, u64, OrigDst>,
    delivering: Mutex<HashMap<MapData, DeliveryKey, u8>>,
    inbound: Mutex<HashOfSockets>,
    counters: PerCpuArray<MapData, u64>,
    /// `--kernel-same-node`'s maps; `None` when it is off.
    kernel_path: Option<KernelPath>,
    netns_links_dir: PathBuf,
    // Owns the programs: the sk_lookup program is attached to each new pod from here.
    ebpf: Mutex<Ebpf>,
}

type HashOfSockets = SockHash<MapData, InboundKey>;

/// The maps through which mesh-node pairs same-node connections for the kernel.
struct KernelPath {
    socks: Mutex<SockHash<MapData, SockKey>>,
    pair: Mutex<HashMap<MapData, SockKey, SockPair>>,
    relayed: Mutex<HashMap<MapData, SockKey, u64>>,
}

impl Dataplane {
    /// Loads the programs with their maps pinned under `pin_dir`, attaches them to `cgroup`
    /// (reusing links pinned by an earlier run) and records `fail_mode` (and whether
    /// applications see their clients' addresses, for `mesh-node bpf status`) for the kernel.
    pub fn start(
        pin_dir: &Path,
        cgroup: &Path,
        fail_mode: FailMode,
        original_source: bool,
        kernel_same_node: bool,
    ) -> Result<Self, DataplaneError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NoPrograms);
        }
        let links_dir = pin_dir.join("links");
        fs::create_dir_all(&links_dir).map_err(|io_error| DataplaneError::PinDir {
            path: links_dir.clone(),
            io_error,
        })?;
        replace_incompatible_pins(pin_dir)?;
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
            flags: if original_source {
                DataplaneConfig::ORIGINAL_SOURCE
            } else {
                0
            } | if kernel_same_node {
                DataplaneConfig::KERNEL_SAME_NODE
            } else {
                0
            },
        };
        config
            .set(0, value, 0)
            .map_err(|source| DataplaneError::Map {
                map: map_names::CONFIG,
                source,
            })?;

        let mut links = attach::attach_all(&mut ebpf, cgroup, &links_dir).map_err(Box::new)?;
        let socks: SockHash<MapData, SockKey> = take_map(&mut ebpf, map_names::SOCKS)?;
        let join =
            attach::attach_kernel_path(&mut ebpf, cgroup, &links_dir, socks.fd(), kernel_same_node)
                .map_err(Box::new)?;
        links.extend(join);
        // A predecessor that was killed left its pairings behind; their sockets died with it,
        // and a stale entry could pair a new connection that happens to reuse a 4-tuple with
        // a socket of another one. None of them is valid now.
        let mut pair: HashMap<MapData, SockKey, SockPair> = take_map(&mut ebpf, map_names::PAIR)?;
        let mut relayed: HashMap<MapData, SockKey, u64> = take_map(&mut ebpf, map_names::RELAYED)?;
        let stale = clear(&mut pair) + clear(&mut relayed);
        if stale > 0 {
            tracing::info!(entries = stale, "removed pairings left by an earlier run");
        }
        attach::load_sk_lookup(&mut ebpf).map_err(Box::new)?;
        let netns_links_dir = links_dir.join("sk_lookup");
        fs::create_dir_all(&netns_links_dir).map_err(|io_error| DataplaneError::PinDir {
            path: netns_links_dir.clone(),
            io_error,
        })?;
        Ok(Self {
            links,
            enrolled: Mutex::new(take_map(&mut ebpf, map_names::ENROLLED)?),
            conn_orig: Mutex::new(take_map(&mut ebpf, map_names::CONN_ORIG)?),
            dns_upstream: take_map(&mut ebpf, map_names::DNS_UPSTREAM)?,
            delivering: Mutex::new(take_map(&mut ebpf, map_names::DELIVERING)?),
            inbound: Mutex::new(take_map(&mut ebpf, map_names::INBOUND)?),
            counters: take_map(&mut ebpf, map_names::COUNTERS)?,
            kernel_path: kernel_same_node.then(|| KernelPath {
                socks: Mutex::new(socks),
                pair: Mutex::new(pair),
                relayed: Mutex::new(relayed),
            }),
            netns_links_dir,
            ebpf: Mutex::new(ebpf),
        })
    }

    /// Attaches inbound capture (sk_lookup) to a pod's network namespace, or finds it attached
    /// by an earlier run. The link is pinned under `<pin dir>/links/sk_lookup/<netns cookie>`.
    pub fn attach_inbound(
        &self,
        netns: impl AsFd,
        netns_path: &Path,
        netns_cookie: u64,
    ) -> Result<(u32, LinkOrigin), DataplaneError> {
        let pin_path = self.netns_links_dir.join(netns_cookie.to_string());
        let mut ebpf = lock(&self.ebpf);
        attach::attach_netns(&mut ebpf, netns, netns_path, &pin_path)
            .map_err(|error| DataplaneError::Attach(Box::new(error)))
    }

    /// Removes a pod's inbound capture link. Absent links are not an error.
    pub fn detach_inbound(&self, netns_cookie: u64) -> Result<(), DataplaneError> {
        let path = self.netns_links_dir.join(netns_cookie.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(io_error) => Err(DataplaneError::Unpin { path, io_error }),
        }
    }

    /// Removes inbound capture links of namespaces not in `keep` (pods an earlier run enrolled
    /// that are gone). Returns how many went.
    pub fn retain_inbound(&self, keep: &[u64]) -> Result<usize, DataplaneError> {
        let entries =
            fs::read_dir(&self.netns_links_dir).map_err(|io_error| DataplaneError::PinDir {
                path: self.netns_links_dir.clone(),
                io_error,
            })?;
        let mut removed = 0;
        for entry in entries.filter_map(Result::ok) {
            let cookie = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u64>().ok());
            if let Some(cookie) = cookie
                && !keep.contains(&cookie)
            {
                self.detach_inbound(cookie)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Registers mesh-node's plaintext listener for connections to `ip`. The entry lives as long
    /// as the socket.
    pub fn register_inbound(
        &self,
        ip: IpAddr,
        listener: &impl AsRawFd,
    ) -> Result<(), DataplaneError> {
        let key = inbound_key(ip);
        lock(&self.inbound)
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(|source| DataplaneError::Map {
                map: map_names::INBOUND,
                source,
            })
    }

    /// Stops steering connections for `ip`. Absent entries are not an error.
    pub fn unregister_inbound(&self, ip: IpAddr) -> Result<(), DataplaneError> {
        match lock(&self.inbound).remove(&inbound_key(ip)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DataplaneError::Map {
                map: map_names::INBOUND,
                source,
            }),
        }
    }

    pub fn links(&self) -> &[AttachedLink] {
        &self.links
    }

    /// Starts capturing the network namespace with this cookie; `pod` is what the programs and
    /// `mesh-node bpf` know of it (see [`record::enrolled_pod`]).
    pub fn enroll(&self, netns_cookie: u64, pod: &EnrolledPod) -> Result<(), DataplaneError> {
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
    pub fn take_original_dst(&self, netns_cookie: u64, src_port: u16) -> Option<SocketAddr> {
        let key = ConnKey::new(netns_cookie, src_port);
        let mut map = lock(&self.conn_orig);
        let orig: OrigDst = map.get(&key, 0).ok()?;
        // The LRU map would evict it anyway; removing keeps room for live connections.
        let _ = map.remove(&key);
        Some(original_destination(&orig))
    }

    /// The resolver the pod in `netns_cookie` addressed last (recorded by the DNS capture).
    pub fn dns_upstream(&self, netns_cookie: u64) -> Option<SocketAddr> {
        let orig: OrigDst = self.dns_upstream.get(&netns_cookie, 0).ok()?;
        Some(original_destination(&orig))
    }

    /// Lets the SYN of a connection from `client` to the application at `app` through to the
    /// application (not steered to mesh-node's plaintext listener), until
    /// [`Self::end_delivery`].
    pub fn begin_delivery(
        &self,
        client: SocketAddr,
        app: SocketAddr,
    ) -> Result<(), DataplaneError> {
        lock(&self.delivering)
            .insert(delivery_key(client, app), 1, 0)
            .map_err(|source| DataplaneError::Map {
                map: map_names::DELIVERING,
                source,
            })
    }

    /// The connect is over: later packets of the connection match its socket, not a listener.
    pub fn end_delivery(&self, client: SocketAddr, app: SocketAddr) {
        let _ = lock(&self.delivering).remove(&delivery_key(client, app));
    }

    /// Whether same-node connections are paired for the kernel (`--kernel-same-node`).
    pub fn kernel_same_node(&self) -> bool {
        self.kernel_path.is_some()
    }

    /// Adds one of mesh-node's sockets to the SOCKHASH under `key` (its own 4-tuple), where
    /// paired applications' writes can be sent out of it. It leaves when it closes.
    pub fn join(&self, key: SockKey, socket: &impl AsRawFd) -> Result<(), DataplaneError> {
        let Some(path) = &self.kernel_path else {
            return Err(DataplaneError::KernelPathOff);
        };
        lock(&path.socks)
            .insert(key, socket.as_raw_fd(), 0)
            .map_err(|source| DataplaneError::Map {
                map: map_names::SOCKS,
                source,
            })
    }

    /// From now on, what the socket `sender` writes goes out of mesh-node's socket `target`
    /// (once the hand-over allows it, for a client with a count).
    pub fn pair(
        &self,
        sender: SockKey,
        target: SockKey,
        handover: bool,
    ) -> Result<(), DataplaneError> {
        let Some(path) = &self.kernel_path else {
            return Err(DataplaneError::KernelPathOff);
        };
        let pair = SockPair {
            target,
            redirected: 0,
            flags: if handover { SockPair::HANDOVER } else { 0 },
        };
        lock(&path.pair)
            .insert(sender, pair, 0)
            .map_err(|source| DataplaneError::Map {
                map: map_names::PAIR,
                source,
            })
    }

    /// mesh-node has written on `bytes` of what the client `sender` sent through it.
    pub fn relayed(&self, sender: SockKey, bytes: u64) -> Result<(), DataplaneError> {
        let Some(path) = &self.kernel_path else {
            return Err(DataplaneError::KernelPathOff);
        };
        lock(&path.relayed)
            .insert(sender, bytes, 0)
            .map_err(|source| DataplaneError::Map {
                map: map_names::RELAYED,
                source,
            })
    }

    /// Takes a socket off the SOCKHASH (the kernel gives it back its ordinary TCP code).
    /// Absent entries are not an error.
    pub fn leave(&self, key: SockKey) {
        if let Some(path) = &self.kernel_path {
            let _ = lock(&path.socks).remove(&key);
        }
    }

    /// Ends a pairing: the bytes the kernel sent for `sender`, and its entries gone.
    pub fn unpair(&self, sender: SockKey) -> u64 {
        let Some(path) = &self.kernel_path else {
            return 0;
        };
        let mut pairs = lock(&path.pair);
        let redirected = pairs.get(&sender, 0).map_or(0, |pair| pair.redirected);
        let _ = pairs.remove(&sender);
        drop(pairs);
        let _ = lock(&path.relayed).remove(&sender);
        redirected
    }

    /// Sums a kernel counter over all CPUs.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters
            .get(&(counter as u32), 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }
}

/// An address as the programs store it (network-order words, IPv4 in the first word for
/// `FAMILY_INET`); IPv4-mapped IPv6 addresses come back as IPv4.
pub fn kernel_ip(family: u16, words: [u32; 4]) -> IpAddr {
    if family == mesh_common::FAMILY_INET {
        return IpAddr::from(words[0].to_ne_bytes());
    }
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    IpAddr::from(octets).to_canonical()
}

/// The socket address the application asked for. IPv4-mapped IPv6 destinations become IPv4.
pub fn original_destination(orig: &OrigDst) -> SocketAddr {
    SocketAddr::new(kernel_ip(orig.family, orig.ip), orig.port)
}

/// The pod address an [`InboundKey`] stands for (the inverse of the key mesh-node registers).
pub fn inbound_key_ip(key: &InboundKey) -> IpAddr {
    kernel_ip(mesh_common::FAMILY_INET6, key.ip)
}

fn inbound_key(ip: IpAddr) -> InboundKey {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    InboundKey::from_octets(octets)
}

/// Unpins every map under `pin_dir` whose layout (key size, value size, capacity) is not the
/// one this build's programs use — a pin directory left by an older release across a layout
/// change — so that the loader creates it anew instead of handing the programs a map they
/// would misread. Its entries are lost: enrolled pods are enrolled again at start, and
/// captured connections in flight lose their original destination. Programs still attached
/// keep the old map until their links are given this build's programs.
fn replace_incompatible_pins(pin_dir: &Path) -> Result<(), DataplaneError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT)
        .map_err(|error| DataplaneError::ParseObject(error.to_string()))?;
    for (name, map) in &object.maps {
        let path = pin_dir.join(name);
        let Ok(pinned) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let wanted = (map.key_size(), map.value_size(), map.max_entries());
        let found = (pinned.key_size(), pinned.value_size(), pinned.max_entries());
        if wanted == found {
            continue;
        }
        tracing::warn!(
            map = %name,
            pinned_key_value_capacity = ?found,
            this_build = ?wanted,
            "pinned map from an incompatible release replaced; its entries are lost"
        );
        fs::remove_file(&path).map_err(|io_error| DataplaneError::ReplacePin {
            path: path.clone(),
            io_error,
        })?;
    }
    Ok(())
}

/// The key the programs build for a socket in the namespace `netns_cookie` whose own end is
/// `local`, connected to `remote`.
pub fn sock_key(netns_cookie: u64, local: SocketAddr, remote: SocketAddr) -> SockKey {
    let bytes = |addr: SocketAddr| match addr.ip() {
        IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        IpAddr::V6(ip) => ip.octets(),
    };
    SockKey {
        netns_cookie,
        local: bytes(local),
        remote: bytes(remote),
        local_port: local.port(),
        remote_port: remote.port(),
        _pad: 0,
    }
}

/// The key `sk_lookup` builds from the SYN of a connection from `client` to `app`.
pub fn delivery_key(client: SocketAddr, app: SocketAddr) -> DeliveryKey {
    DeliveryKey {
        remote: inbound_key(client.ip()),
        local: inbound_key(app.ip()),
        remote_port: client.port(),
        local_port: app.port(),
        _pad: 0,
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

/// Removes every entry of a hash map; how many there were.
fn clear<V: aya::Pod>(map: &mut HashMap<MapData, SockKey, V>) -> usize {
    let keys: Vec<SockKey> = map.keys().filter_map(Result::ok).collect();
    keys.iter().filter(|key| map.remove(key).is_ok()).count()
}

/// Map handles hold no invariants a panicking holder could break, so a poisoned lock is usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use mesh_common::FAMILY_INET;

    use super::*;

    #[test]
    fn decodes_kernel_addresses() {
        let v4 = OrigDst {
            ip: [u32::from_ne_bytes([10, 1, 2, 3]), 0, 0, 0],
            port: 8080,
            family: FAMILY_INET,
            ..Default::default()
        };
        assert_eq!(original_destination(&v4), "10.1.2.3:8080".parse().unwrap());

        let mapped: Ipv6Addr = "::ffff:10.1.2.3".parse().unwrap();
        let mut ip = [0u32; 4];
        for (word, chunk) in ip.iter_mut().zip(mapped.octets().chunks_exact(4)) {
            *word = u32::from_ne_bytes(chunk.try_into().unwrap());
        }
        let v6 = OrigDst {
            ip,
            port: 80,
            family: mesh_common::FAMILY_INET6,
            ..Default::default()
        };
        assert_eq!(original_destination(&v6), "10.1.2.3:80".parse().unwrap());
    }
}
