//! `mesh-node bpf pods`: the enrolled pods, from the pinned map alone.
use std::{io::Write, net::IpAddr, path::Path};

use mesh_common::EnrolledPod;
use serde::Serialize;

use super::{InspectError, Output, emit, pinned::Pinned, table::Table};

#[derive(Serialize)]
struct PodView {
    pod: String,
    pod_id: u32,
    service_account: String,
    ips: Vec<IpAddr>,
    netns_cookie: u64,
    /// mesh-node's listeners opened in the pod's namespace.
    listeners: Vec<&'static str>,
    /// Inbound capture: the sk_lookup link is pinned and every address has a live listener.
    inbound_capture: &'static str,
    /// The families whose clients the pod's applications see by their own address (`ipv4`,
    /// `ipv6`); empty: they see connections from the pod's own address.
    original_source: Vec<&'static str>,
    truncated: bool,
}

const LISTENERS: [(u32, &str); 7] = [
    (EnrolledPod::LISTENER_OUTBOUND4, "127.0.0.1:15001"),
    (EnrolledPod::LISTENER_OUTBOUND6, "[::1]:15001"),
    (EnrolledPod::LISTENER_INBOUND4, "127.0.0.1:15006"),
    (EnrolledPod::LISTENER_INBOUND6, "[::1]:15006"),
    (EnrolledPod::LISTENER_HBONE, "<pod IP>:15008"),
    (EnrolledPod::LISTENER_DNS4, "127.0.0.1:15053 (DNS)"),
    (EnrolledPod::LISTENER_DNS6, "[::1]:15053 (DNS)"),
];

pub fn pods(dir: &Path, output: Output, out: &mut impl Write) -> Result<(), InspectError> {
    let pinned = Pinned::open(dir)?;
    let registered = pinned.inbound()?;
    let netns_links = pinned.links().netns;
    let views: Vec<PodView> = pinned
        .enrolled()?
        .into_iter()
        .map(|(cookie, pod)| {
            let linked = netns_links.iter().any(|(c, _)| *c == cookie);
            let serving = pod.ips.iter().all(|ip| registered.contains(ip));
            PodView {
                pod: pod.key(),
                pod_id: pod.pod_id,
                service_account: pod.service_account.clone(),
                ips: pod.ips.clone(),
                netns_cookie: cookie,
                listeners: LISTENERS
                    .iter()
                    .filter(|(bit, _)| pod.listeners & bit != 0)
                    .map(|(_, name)| *name)
                    .collect(),
                inbound_capture: match (linked, serving) {
                    (true, true) => "on",
                    (true, false) => "not serving",
                    (false, _) => "no link",
                },
                original_source: [
                    (EnrolledPod::ORIGINAL_SOURCE4, "ipv4"),
                    (EnrolledPod::ORIGINAL_SOURCE6, "ipv6"),
                ]
                .into_iter()
                .filter(|(bit, _)| pod.listeners & bit != 0)
                .map(|(_, family)| family)
                .collect(),
                truncated: pod.truncated,
            }
        })
        .collect();
    emit(out, output, &views, || {
        // Original source is in the JSON only: the table stays within 80 columns.
        let mut table = Table::new(&["POD", "IPS", "SERVICE ACCOUNT", "LISTENERS", "INBOUND"]);
        for view in &views {
            let ports: Vec<&str> = view
                .listeners
                .iter()
                .map(|l| l.rsplit(':').next().unwrap_or(l))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            table.row(vec![
                view.pod.clone(),
                join(&view.ips),
                view.service_account.clone(),
                ports.join(","),
                view.inbound_capture.into(),
            ]);
        }
        if table.is_empty() {
            return "no enrolled pods\n".to_owned();
        }
        table.to_string()
    })
}

pub(super) fn join(items: &[impl ToString]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
