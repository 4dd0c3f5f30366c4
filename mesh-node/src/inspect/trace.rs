//! `mesh-node bpf trace`: consume the programs' ring buffer of redirect decisions.
//!
//! The buffer has one consumer position, so two traces at once split the events between them.
//! Events written before the trace started (the buffer fills while nobody reads) are skipped.
use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use mesh_common::{TraceAction, TraceEvent, TraceHook, TraceReason};
use serde::Serialize;

use super::{InspectError, Output, pinned::Pinned, raw::read};
use crate::dataplane::kernel_ip as addr;
use crate::dataplane::record::PodRecord;

/// Which events to show.
#[derive(Clone, Debug, Default)]
pub struct TraceFilter {
    /// `namespace/name`, or just a name.
    pub pod: Option<String>,
    /// Destination or source port.
    pub port: Option<u16>,
}

/// A pod key matches `namespace/name` exactly, or `name` alone.
pub fn pod_matches(key: &str, wanted: &str) -> bool {
    key == wanted || key.split_once('/').is_some_and(|(_, name)| name == wanted)
}

#[derive(Serialize)]
pub(super) struct EventView {
    /// Seconds since the trace started.
    time: f64,
    pod: String,
    /// `outbound` (connect from the pod) or `inbound` (connection to it).
    direction: &'static str,
    action: &'static str,
    reason: Option<&'static str>,
    /// Where the connection was going: for outbound the original destination.
    dst: SocketAddr,
    /// The peer, for inbound connections.
    src: Option<SocketAddr>,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write to; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

struct Pods {
    by_cookie: BTreeMap<u64, PodRecord>,
    refreshed: Instant,
}

impl Pods {
    /// The pod an event is about; re-reads the enrolled map (at most every 100 ms) on a miss,
    /// since pods enroll while the trace runs.
    fn resolve(&mut self, pinned: &Pinned, event: &TraceEvent, dst: IpAddr) -> Option<String> {
        for attempt in 0..2 {
            let found = if event.hook == TraceHook::Inbound as u8 {
                self.by_cookie.values().find(|pod| pod.ips.contains(&dst))
            } else {
                self.by_cookie.get(&event.netns_cookie)
            };
            if let Some(pod) = found {
                return Some(pod.key());
            }
            if attempt == 0 && self.refreshed.elapsed() > Duration::from_millis(100) {
                if let Ok(pods) = pinned.enrolled() {
                    self.by_cookie = pods;
                }
                self.refreshed = Instant::now();
            }
        }
        None
    }
}

pub(super) fn view(event: &TraceEvent, pod: String, start_ns: u64) -> EventView {
    let dst = SocketAddr::new(addr(event.family, event.dst_ip), event.dst_port);
    let inbound = event.hook == TraceHook::Inbound as u8;
    EventView {
        time: event.time_ns.saturating_sub(start_ns) as f64 / 1e9,
        pod,
        direction: if inbound { "inbound" } else { "outbound" },
        action: match event.action {
            a if a == TraceAction::Captured as u8 => "captured",
            a if a == TraceAction::Passed as u8 => "passed",
            a if a == TraceAction::Refused as u8 => "refused",
            _ => "unknown",
        },
        reason: match event.reason {
            r if r == TraceReason::None as u8 => None,
            r if r == TraceReason::NotServing as u8 => Some("mesh-node not serving the pod"),
            r if r == TraceReason::MapFull as u8 => Some("original-destination map full"),
            _ => Some("unknown"),
        },
        dst,
        src: inbound.then(|| SocketAddr::new(addr(event.family, event.src_ip), event.src_port)),
    }
}

pub(super) fn line(view: &EventView) -> String {
    let action = match view.reason {
        Some(reason) => format!("{} ({reason})", view.action),
        None => view.action.to_owned(),
    };
    let direction = if view.direction == "inbound" {
        "in"
    } else {
        "out"
    };
    let peer = view
        .src
        .map(|src| format!(" from {src}"))
        .unwrap_or_default();
    format!(
        "{:>9.3}  {:<28}  {direction:<3}  {:<21}  {action}{peer}\n",
        view.time,
        view.pod,
        view.dst.to_string()
    )
}

pub fn run(
    pinned: &Pinned,
    filter: &TraceFilter,
    limit: Option<u64>,
    duration: Option<Duration>,
    output: Output,
    out: &mut impl Write,
) -> Result<(), InspectError> {
    let mut ring = pinned.events()?;
    let start_ns = monotonic_ns();
    let deadline = duration.map(|d| Instant::now() + d);
    let mut pods = Pods {
        by_cookie: pinned.enrolled()?,
        refreshed: Instant::now(),
    };
    // On stderr, so JSON output stays one event per line; scripts can wait for it.
    eprintln!(
        "tracing redirect decisions from {} (stop with Ctrl-C)",
        pinned.dir().display()
    );
    if output == Output::Table {
        out.write_all(
            format!(
                "{:>9}  {:<28}  {:<3}  {:<21}  ACTION\n",
                "TIME", "POD", "DIR", "DESTINATION"
            )
            .as_bytes(),
        )?;
        out.flush()?;
    }
    let mut shown = 0u64;
    loop {
        while let Some(item) = ring.next() {
            let Some(event) = read::<TraceEvent>(&item) else {
                continue;
            };
            drop(item);
            if event.time_ns < start_ns {
                continue;
            }
            let dst_ip = addr(event.family, event.dst_ip);
            let pod = pods
                .resolve(pinned, &event, dst_ip)
                .unwrap_or_else(|| format!("netns {}", event.netns_cookie));
            if filter
                .pod
                .as_deref()
                .is_some_and(|wanted| !pod_matches(&pod, wanted))
                || filter
                    .port
                    .is_some_and(|port| port != event.dst_port && port != event.src_port)
            {
                continue;
            }
            let view = view(&event, pod, start_ns);
            match output {
                Output::Json => {
                    serde_json::to_writer(&mut *out, &view).map_err(std::io::Error::from)?;
                    out.write_all(b"\n")?;
                }
                Output::Table => out.write_all(line(&view).as_bytes())?,
            }
            out.flush()?;
            shown += 1;
            if limit.is_some_and(|limit| shown >= limit) {
                return Ok(());
            }
        }
        let wait = match deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) => left.min(Duration::from_millis(200)),
                None => return Ok(()),
            },
            None => Duration::from_millis(200),
        };
        let mut poll = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut poll, 1, wait.as_millis() as libc::c_int) };
        if rc < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(InspectError::Trace(error));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::FAMILY_INET;

    #[test]
    fn pods_match_by_full_key_or_name() {
        assert!(pod_matches("shop/cart", "shop/cart"));
        assert!(pod_matches("shop/cart", "cart"));
        assert!(!pod_matches("shop/cart", "shop"));
        assert!(!pod_matches("shop/cart", "car"));
    }

    #[test]
    fn short_records_are_not_events_and_fields_decode() {
        assert!(read::<TraceEvent>(&[0u8; 10]).is_none());
        let event = TraceEvent {
            time_ns: 2_500_000_000,
            netns_cookie: 9,
            dst_ip: [u32::from_ne_bytes([10, 96, 0, 1]), 0, 0, 0],
            dst_port: 8080,
            family: FAMILY_INET,
            hook: TraceHook::Connect as u8,
            action: TraceAction::Refused as u8,
            reason: TraceReason::NotServing as u8,
            ..TraceEvent::default()
        };
        // SAFETY (test): reading the event's own bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<TraceEvent>())
        };
        let parsed = read::<TraceEvent>(bytes).expect("a whole event");
        let view = view(&parsed, "shop/cart".into(), 500_000_000);
        assert_eq!(view.time, 2.0);
        assert_eq!(view.direction, "outbound");
        assert_eq!(view.action, "refused");
        assert_eq!(view.reason, Some("mesh-node not serving the pod"));
        assert_eq!(view.dst, "10.96.0.1:8080".parse().unwrap());
        assert_eq!(view.src, None);
    }
}
