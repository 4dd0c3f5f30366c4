//! Typed, read-only access to the objects a mesh-node pinned under its bpffs directory. Nothing
//! here writes to a map, so `mesh-node bpf` is safe beside a running mesh-node.
use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray, RingBuf, SockHash};
use mesh_common::{
    ConnKey, Counter, DataplaneConfig, DeliveryKey, EnrolledPod, InboundKey, OrigDst, map_names,
};

use super::InspectError;
use crate::dataplane::{inbound_key_ip, record::PodRecord};

/// Link pin files: `(program name, path)` for the cgroup hooks, `(netns cookie, path)` for
/// each pod's sk_lookup link.
pub struct PinnedLinks {
    pub cgroup: Vec<(String, PathBuf)>,
    pub netns: Vec<(u64, PathBuf)>,
}

/// Every map the programs pin, in the order `bpf maps` lists them.
pub const MAPS: [&str; 12] = [
    map_names::ENROLLED,
    map_names::INBOUND,
    map_names::SOCK_ORIG,
    map_names::CONN_ORIG,
    map_names::DELIVERING,
    map_names::SOCKS,
    map_names::PAIR,
    map_names::PASSED,
    map_names::RELAYED,
    map_names::CONFIG,
    map_names::COUNTERS,
    map_names::EVENTS,
];

pub struct Pinned {
    dir: PathBuf,
}

impl Pinned {
    /// The pin directory of a mesh-node (`--bpffs`). It must hold at least the enrolled map.
    pub fn open(dir: &Path) -> Result<Self, InspectError> {
        if !dir.join(map_names::ENROLLED).exists() {
            return Err(InspectError::NoState {
                dir: dir.to_owned(),
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    fn map(&self, name: &'static str) -> Result<Map, InspectError> {
        let path = self.dir.join(name);
        let opened = MapData::from_pin(&path).and_then(Map::from_map_data);
        opened.map_err(|source| InspectError::Map { map: name, source })
    }

    fn typed<T: TryFrom<Map, Error = MapError>>(
        &self,
        name: &'static str,
    ) -> Result<T, InspectError> {
        T::try_from(self.map(name)?).map_err(|source| InspectError::Map { map: name, source })
    }

    /// The kernel's description of a pinned map (type, sizes, capacity).
    pub fn info(&self, name: &'static str) -> Result<MapInfo, InspectError> {
        MapInfo::from_pin(self.dir.join(name))
            .map_err(|source| InspectError::Map { map: name, source })
    }

    /// Enrolled pods by network-namespace cookie, in cookie order.
    pub fn enrolled(&self) -> Result<BTreeMap<u64, PodRecord>, InspectError> {
        let map: HashMap<MapData, u64, EnrolledPod> = self.typed(map_names::ENROLLED)?;
        entries(map_names::ENROLLED, map.iter()).map(|pods| {
            pods.into_iter()
                .map(|(cookie, pod)| (cookie, PodRecord::decode(&pod)))
                .collect()
        })
    }

    /// Addresses with a registered inbound listener.
    pub fn inbound(&self) -> Result<Vec<IpAddr>, InspectError> {
        let map: SockHash<MapData, InboundKey> = self.typed(map_names::INBOUND)?;
        let keys: Result<Vec<InboundKey>, MapError> = map.keys().collect();
        let keys = keys.map_err(|source| InspectError::Map {
            map: map_names::INBOUND,
            source,
        })?;
        Ok(keys.iter().map(inbound_key_ip).collect())
    }

    /// Live captured connections: original destination by socket cookie.
    pub fn sock_orig(&self) -> Result<Vec<(u64, OrigDst)>, InspectError> {
        let map: HashMap<MapData, u64, OrigDst> = self.typed(map_names::SOCK_ORIG)?;
        entries(map_names::SOCK_ORIG, map.iter())
    }

    /// Original destinations waiting for mesh-node to accept their connection.
    pub fn conn_orig(&self) -> Result<Vec<(ConnKey, OrigDst)>, InspectError> {
        let map: HashMap<MapData, ConnKey, OrigDst> = self.typed(map_names::CONN_ORIG)?;
        entries(map_names::CONN_ORIG, map.iter())
    }

    /// Connections into pods from a client's address (announced to `sk_lookup`). A pin
    /// directory from before the map existed has none.
    pub fn delivering(&self) -> Result<Vec<DeliveryKey>, InspectError> {
        if !self.dir.join(map_names::DELIVERING).exists() {
            return Ok(Vec::new());
        }
        let map: HashMap<MapData, DeliveryKey, u8> = self.typed(map_names::DELIVERING)?;
        Ok(map.keys().filter_map(Result::ok).collect())
    }

    /// Whether the map is pinned (maps newer than the mesh-node that pinned the rest are not).
    pub fn has(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }

    /// Entries of a hash map (counted through its keys; nothing is written).
    pub fn hash_len<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<usize, InspectError> {
        let map: HashMap<MapData, K, V> = self.typed(name)?;
        Ok(map.keys().filter(Result::is_ok).count())
    }

    pub fn config(&self) -> Result<DataplaneConfig, InspectError> {
        let map: Array<MapData, DataplaneConfig> = self.typed(map_names::CONFIG)?;
        map.get(&0, 0).map_err(|source| InspectError::Map {
            map: map_names::CONFIG,
            source,
        })
    }

    /// Each counter's per-CPU values.
    pub fn counters(&self) -> Result<Vec<(Counter, Vec<u64>)>, InspectError> {
        let map: PerCpuArray<MapData, u64> = self.typed(map_names::COUNTERS)?;
        Counter::ALL
            .iter()
            .map(|counter| {
                map.get(&(*counter as u32), 0)
                    .map(|values| (*counter, values.iter().copied().collect()))
                    .map_err(|source| InspectError::Map {
                        map: map_names::COUNTERS,
                        source,
                    })
            })
            .collect()
    }

    /// The trace ring buffer, for consuming.
    pub fn events(&self) -> Result<RingBuf<MapData>, InspectError> {
        self.typed(map_names::EVENTS)
    }

    /// The link pin files under `links/`.
    pub fn links(&self) -> PinnedLinks {
        let names = |dir: PathBuf| -> Vec<(String, PathBuf)> {
            let mut found: Vec<(String, PathBuf)> = fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|entry| Some((entry.file_name().into_string().ok()?, entry.path())))
                .collect();
            found.sort();
            found
        };
        let cgroup = names(self.links_dir());
        let netns = names(self.links_dir().join("sk_lookup"))
            .into_iter()
            .filter_map(|(name, path)| Some((name.parse().ok()?, path)))
            .collect();
        PinnedLinks { cgroup, netns }
    }
}

fn entries<K, V>(
    map: &'static str,
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
) -> Result<Vec<(K, V)>, InspectError> {
    iter.collect::<Result<Vec<_>, _>>()
        .map_err(|source| InspectError::Map { map, source })
}
