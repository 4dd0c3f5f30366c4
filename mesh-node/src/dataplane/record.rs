//! The pinned-map records that describe enrolled pods, written on enrollment and read back by
//! `mesh-node bpf`. Text is stored as length-prefixed UTF-8, cut at a character boundary when
//! it does not fit (and flagged).
use std::net::{IpAddr, Ipv6Addr};

use mesh_common::EnrolledPod;

/// What an enrolled pod's record holds, decoded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PodRecord {
    pub pod_id: u32,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// The `EnrolledPod::LISTENER_*` and `ORIGINAL_SOURCE*` bits.
    pub listeners: u32,
    /// A name was longer than the record holds and was cut.
    pub truncated: bool,
}

impl PodRecord {
    /// The record as the kernel map stores it. At most two addresses are kept.
    pub fn encode(&self) -> EnrolledPod {
        let mut pod = EnrolledPod::empty(self.pod_id);
        pod.flags = self.listeners & !EnrolledPod::TRUNCATED;
        for (slot, ip) in pod.ips.iter_mut().zip(&self.ips) {
            *slot = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
        }
        pod.ip_count = self.ips.len().min(pod.ips.len()) as u8;
        let mut cut = false;
        pod.namespace_len = put(&mut pod.namespace, &self.namespace, &mut cut);
        pod.name_len = put(&mut pod.name, &self.name, &mut cut);
        pod.service_account_len = put(&mut pod.service_account, &self.service_account, &mut cut);
        if cut || self.ips.len() > pod.ips.len() {
            pod.flags |= EnrolledPod::TRUNCATED;
        }
        pod
    }

    /// Reads a record back. Lengths beyond a field's capacity (a corrupt or foreign entry) are
    /// clamped; invalid UTF-8 is replaced, never trusted.
    pub fn decode(pod: &EnrolledPod) -> Self {
        let count = usize::from(pod.ip_count).min(pod.ips.len());
        Self {
            pod_id: pod.pod_id,
            namespace: get(&pod.namespace, pod.namespace_len),
            name: get(&pod.name, pod.name_len),
            service_account: get(&pod.service_account, pod.service_account_len),
            ips: pod.ips[..count]
                .iter()
                .map(|octets| IpAddr::V6(Ipv6Addr::from(*octets)).to_canonical())
                .collect(),
            listeners: pod.flags & !EnrolledPod::TRUNCATED,
            truncated: pod.flags & EnrolledPod::TRUNCATED != 0,
        }
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn put(field: &mut [u8], text: &str, cut: &mut bool) -> u8 {
    let capacity = field.len().min(usize::from(u8::MAX));
    let mut len = text.len().min(capacity);
    while !text.is_char_boundary(len) {
        len -= 1;
    }
    *cut |= len < text.len();
    field[..len].copy_from_slice(&text.as_bytes()[..len]);
    len as u8
}

fn get(field: &[u8], len: u8) -> String {
    let len = usize::from(len).min(field.len());
    String::from_utf8_lossy(&field[..len]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, ips: &[&str]) -> PodRecord {
        PodRecord {
            pod_id: 7,
            namespace: "shop".into(),
            name: name.into(),
            service_account: "cart".into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            listeners: EnrolledPod::LISTENER_OUTBOUND4 | EnrolledPod::LISTENER_HBONE,
            truncated: false,
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let written = record("cart-7d9f", &["10.244.1.5", "fd00::5"]);
        assert_eq!(PodRecord::decode(&written.encode()), written);
    }

    #[test]
    fn long_names_are_cut_at_a_character_boundary_and_flagged() {
        // 127 ASCII bytes then a 2-byte character: the cut must fall before it, not inside.
        let name = format!("{}é-tail", "a".repeat(127));
        let decoded = PodRecord::decode(&record(&name, &["10.0.0.1"]).encode());
        assert_eq!(decoded.name, "a".repeat(127));
        assert!(decoded.truncated);
        assert_eq!(
            decoded.listeners,
            EnrolledPod::LISTENER_OUTBOUND4 | EnrolledPod::LISTENER_HBONE
        );
    }

    #[test]
    fn corrupt_lengths_and_counts_are_clamped() {
        let mut raw = record("x", &["10.0.0.1"]).encode();
        raw.name_len = 250;
        raw.ip_count = 9;
        raw.name[1] = 0xff;
        let decoded = PodRecord::decode(&raw);
        assert_eq!(decoded.name.chars().count(), 128);
        assert!(decoded.name.contains('\u{fffd}'));
        assert_eq!(decoded.ips.len(), 2);
    }
}
