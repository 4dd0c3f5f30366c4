//! `mesh-node bpf maps` and `conns`: the pinned maps, their entries, the live captured connections.
use std::{collections::BTreeMap, io::Write, net::SocketAddr, path::Path};

use mesh_common::{DeliveryKey, FailMode, OrigDst, SockKey, SockPair, map_names};
use serde::Serialize;

use super::{
    InspectError, Output, emit,
    pinned::{MAPS, Pinned},
    pods::join,
    table::{Table, fields},
    trace,
};
use crate::dataplane::{inbound_key_ip, kernel_ip as addr, record::PodRecord};

#[derive(Serialize)]
struct MapView {
    name: &'static str,
    kind: String,
    id: u32,
    key_size: u32,
    value_size: u32,
    capacity: u32,
    /// Entries in use; `None` where it cannot be read without side effects (the ring buffer).
    entries: Option<usize>,
    holds: &'static str,
}

pub fn maps(dir: &Path, output: Output, out: &mut impl Write) -> Result<(), InspectError> {
    let pinned = Pinned::open(dir)?;
    let mut views = Vec::new();
    for name in MAPS {
        if !pinned.has(name) {
            continue;
        }
        let info = pinned.info(name)?;
        let (entries, holds) = match name {
            map_names::ENROLLED => (
                Some(pinned.enrolled()?.len()),
                "enrolled pods by netns cookie",
            ),
            map_names::INBOUND => (
                Some(pinned.inbound()?.len()),
                "inbound listeners by pod address",
            ),
            map_names::SOCK_ORIG => (Some(pinned.sock_orig()?.len()), "live captured connections"),
            map_names::CONN_ORIG => (
                Some(pinned.conn_orig()?.len()),
                "destinations awaiting accept",
            ),
            map_names::CONFIG => (Some(1), "fail mode, original source, kernel path"),
            map_names::SOCKS => (None, "sockets on the same-node kernel path"),
            map_names::PAIR => (
                Some(pinned.hash_len::<SockKey, SockPair>(name)?),
                "paired sockets of same-node connections",
            ),
            map_names::PASSED => (
                Some(pinned.hash_len::<SockKey, u64>(name)?),
                "joined clients' hand-over counts",
            ),
            map_names::RELAYED => (
                Some(pinned.hash_len::<SockKey, u64>(name)?),
                "mesh-node's hand-over counts",
            ),
            map_names::DELIVERING => (
                Some(pinned.delivering()?.len()),
                "connections from a client's address into pods",
            ),
            map_names::COUNTERS => (Some(pinned.counters()?.len()), "per-CPU decision counters"),
            _ => (None, "trace events"),
        };
        views.push(MapView {
            name,
            kind: info
                .map_type()
                .map_or_else(|_| "unknown".to_owned(), |t| format!("{t:?}")),
            id: info.id(),
            key_size: info.key_size(),
            value_size: info.value_size(),
            capacity: info.max_entries(),
            entries,
            holds,
        });
    }
    emit(out, output, &views, || {
        let mut table = Table::new(&["MAP", "TYPE", "ENTRIES#", "CAPACITY#", "HOLDS"]);
        for view in &views {
            let entries = view.entries.map_or("-".to_owned(), |n| n.to_string());
            let capacity = if view.kind == "RingBuf" {
                format!("{} KiB", view.capacity / 1024)
            } else {
                view.capacity.to_string()
            };
            table.row(vec![
                view.name.into(),
                view.kind.clone(),
                entries,
                capacity,
                view.holds.into(),
            ]);
        }
        table.to_string()
    })
}

/// The map a user named: exact, any case, with or without the `MESH_` prefix.
fn map_named(name: &str) -> Result<&'static str, InspectError> {
    let wanted = name.to_ascii_uppercase();
    MAPS.iter()
        .find(|map| **map == wanted || map.strip_prefix("MESH_") == Some(wanted.as_str()))
        .copied()
        .ok_or_else(|| InspectError::UnknownMap {
            name: name.to_owned(),
            known: MAPS.join(", "),
        })
}

/// A captured connection's original destination, decoded.
#[derive(Serialize)]
pub(super) struct OrigView {
    pod: String,
    netns_cookie: u64,
    src_port: u16,
    original_dst: SocketAddr,
}

pub(super) fn orig_view(orig: &OrigDst, pods: &BTreeMap<u64, PodRecord>) -> OrigView {
    OrigView {
        pod: pods
            .get(&orig.netns_cookie)
            .map_or_else(|| "?".to_owned(), PodRecord::key),
        netns_cookie: orig.netns_cookie,
        src_port: orig.src_port,
        original_dst: SocketAddr::new(addr(orig.family, orig.ip), orig.port),
    }
}

pub fn dump(
    dir: &Path,
    name: &str,
    output: Output,
    out: &mut impl Write,
) -> Result<(), InspectError> {
    let map = map_named(name)?;
    let pinned = Pinned::open(dir)?;
    let pods = pinned.enrolled()?;
    match map {
        map_names::ENROLLED => {
            #[derive(Serialize)]
            struct Entry<'a> {
                netns_cookie: u64,
                #[serde(flatten)]
                pod: &'a PodRecord,
            }
            let entries: Vec<Entry> = pods
                .iter()
                .map(|(cookie, pod)| Entry {
                    netns_cookie: *cookie,
                    pod,
                })
                .collect();
            emit(out, output, &entries, || {
                let mut table =
                    Table::new(&["NETNS COOKIE#", "ID#", "POD", "SERVICE ACCOUNT", "IPS"]);
                for e in &entries {
                    table.row(vec![
                        e.netns_cookie.to_string(),
                        e.pod.pod_id.to_string(),
                        e.pod.key(),
                        e.pod.service_account.clone(),
                        join(&e.pod.ips),
                    ]);
                }
                table.to_string()
            })
        }
        map_names::INBOUND => {
            let entries = pinned.inbound()?;
            emit(out, output, &entries, || {
                let mut table = Table::new(&["POD ADDRESS", "POD"]);
                for ip in &entries {
                    let pod = pods
                        .values()
                        .find(|p| p.ips.contains(ip))
                        .map_or("?".to_owned(), PodRecord::key);
                    table.row(vec![ip.to_string(), pod]);
                }
                table.to_string()
            })
        }
        map_names::SOCK_ORIG => {
            #[derive(Serialize)]
            struct Entry {
                socket_cookie: u64,
                #[serde(flatten)]
                orig: OrigView,
            }
            let entries: Vec<Entry> = pinned
                .sock_orig()?
                .iter()
                .map(|(cookie, orig)| Entry {
                    socket_cookie: *cookie,
                    orig: orig_view(orig, &pods),
                })
                .collect();
            emit(out, output, &entries, || {
                let mut table = Table::new(&["SOCKET COOKIE#", "POD", "SRC PORT#", "ORIGINAL DST"]);
                for e in &entries {
                    table.row(vec![
                        e.socket_cookie.to_string(),
                        e.orig.pod.clone(),
                        e.orig.src_port.to_string(),
                        e.orig.original_dst.to_string(),
                    ]);
                }
                table.to_string()
            })
        }
        map_names::CONN_ORIG => {
            let entries: Vec<OrigView> = pinned
                .conn_orig()?
                .iter()
                .map(|(key, orig)| OrigView {
                    src_port: key.src_port,
                    ..orig_view(orig, &pods)
                })
                .collect();
            emit(out, output, &entries, || orig_table(&entries))
        }
        map_names::CONFIG => {
            let config = pinned.config()?;
            let fail_mode = if config.fail_mode == FailMode::Closed as u32 {
                "closed"
            } else {
                "open"
            };
            let original_source = super::status::original_source(&config);
            let value = serde_json::json!({
                "fail_mode": fail_mode,
                "original_source": original_source,
            });
            emit(out, output, &value, || {
                fields(&[
                    ("fail mode", fail_mode.to_owned()),
                    ("original source", original_source.to_owned()),
                ])
            })
        }
        map_names::COUNTERS => {
            #[derive(Serialize)]
            struct Entry {
                counter: &'static str,
                total: u64,
                per_cpu: Vec<u64>,
            }
            let entries: Vec<Entry> = pinned
                .counters()?
                .into_iter()
                .map(|(counter, per_cpu)| Entry {
                    counter: counter.name(),
                    total: per_cpu.iter().sum(),
                    per_cpu,
                })
                .collect();
            emit(out, output, &entries, || {
                let mut table = Table::new(&["COUNTER", "TOTAL#", "PER CPU"]);
                for e in &entries {
                    table.row(vec![
                        e.counter.into(),
                        e.total.to_string(),
                        join(&e.per_cpu),
                    ]);
                }
                table.to_string()
            })
        }
        map_names::DELIVERING => {
            let entries: Vec<DeliveryView> =
                pinned.delivering()?.iter().map(delivery_view).collect();
            emit(out, output, &entries, || delivery_table(&entries))
        }
        _ => Err(InspectError::NotDumpable { map }),
    }
}

/// A connection being delivered with its client's address as source, decoded.
#[derive(Serialize)]
pub(super) struct DeliveryView {
    client: SocketAddr,
    application: SocketAddr,
}

pub(super) fn delivery_view(key: &DeliveryKey) -> DeliveryView {
    DeliveryView {
        client: SocketAddr::new(inbound_key_ip(&key.remote), key.remote_port),
        application: SocketAddr::new(inbound_key_ip(&key.local), key.local_port),
    }
}

pub(super) fn delivery_table(entries: &[DeliveryView]) -> String {
    let mut table = Table::new(&["CLIENT", "APPLICATION"]);
    for e in entries {
        table.row(vec![e.client.to_string(), e.application.to_string()]);
    }
    table.to_string()
}

pub(super) fn orig_table(entries: &[OrigView]) -> String {
    let mut table = Table::new(&["POD", "SRC PORT#", "ORIGINAL DST"]);
    for e in entries {
        table.row(vec![
            e.pod.clone(),
            e.src_port.to_string(),
            e.original_dst.to_string(),
        ]);
    }
    if table.is_empty() {
        return "no entries\n".to_owned();
    }
    table.to_string()
}

// ---------------------------------------------------------------------------------------------
// conns

/// Live captured connections (outbound: what enrolled pods connected to), optionally of one pod.
pub fn conns(
    dir: &Path,
    pod: Option<&str>,
    output: Output,
    out: &mut impl Write,
) -> Result<(), InspectError> {
    let pinned = Pinned::open(dir)?;
    let pods = pinned.enrolled()?;
    let mut views: Vec<OrigView> = pinned
        .sock_orig()?
        .iter()
        .map(|(_, orig)| orig_view(orig, &pods))
        .filter(|view| pod.is_none_or(|wanted| trace::pod_matches(&view.pod, wanted)))
        .collect();
    views.sort_by(|a, b| {
        (&a.pod, a.original_dst, a.src_port).cmp(&(&b.pod, b.original_dst, b.src_port))
    });
    emit(out, output, &views, || {
        if views.is_empty() {
            return "no live captured connections\n".to_owned();
        }
        orig_table(&views)
    })
}
