//! The data path: captured outbound connections, HBONE tunnels arriving for local pods, and
//! plaintext connections captured on their way into local pods.
pub mod authorize;
mod double_hbone;
pub mod failure;
pub mod inbound;
pub mod inbound_plain;
pub mod kernel_path;
pub mod outbound;
pub mod route;
#[cfg(test)]
mod tests;
mod tunnel;
mod upstream;

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::RawFd,
    sync::Arc,
    time::Duration,
};

use mesh_common::SockKey;

pub use upstream::{Announced, connect, connect_as_client, connect_from_pod};

use self::authorize::Live;

pub use crate::config::{NodeInfo, Settings};
use crate::{
    certs::CertManager, dataplane::Dataplane, hbone::pool::Pool, pod::LocalPods, state::State,
    telemetry::Metrics, throttle::Throttle,
};

/// How a workload describes itself in `baggage` (on the CONNECTs of its connections, and in
/// the answer to tunnels into it).
pub fn workload_baggage(w: &crate::state::Workload) -> crate::hbone::Baggage {
    crate::hbone::Baggage {
        cluster: w.cluster_id.to_string(),
        namespace: w.namespace.to_string(),
        workload_name: if w.workload_name.is_empty() {
            w.name.to_string()
        } else {
            w.workload_name.to_string()
        },
        workload_kind: w.workload_type.as_str().to_owned(),
        service: w.canonical_name.to_string(),
        version: w.canonical_revision.to_string(),
        region: w.locality.region.to_string(),
        zone: w.locality.zone.to_string(),
    }
}

/// Where a captured connection was going, as the kernel recorded it: the one thing the data
/// path asks of the eBPF side. A trait, so that a [`ProxyContext`] can be built (and routing,
/// delivery and reports tested) without loading programs.
pub trait OriginalDestinations: Send + Sync {
    /// Takes (and forgets) the original destination of the connection from `src_port` in the
    /// network namespace `netns_cookie`.
    fn take(&self, netns_cookie: u64, src_port: u16) -> Option<SocketAddr>;
    /// The resolver the pod in `netns_cookie` addressed last (DNS capture); `None` without one.
    fn dns_upstream(&self, _netns_cookie: u64) -> Option<SocketAddr> {
        None
    }
    /// Lets mesh-node's connect from `client` (an address not the pod's) to the application at
    /// `app` reach the application rather than the capture; `false` when it cannot (then
    /// mesh-node connects from the pod's own address).
    fn begin_delivery(&self, _client: SocketAddr, _app: SocketAddr) -> bool {
        false
    }
    /// The connect from `client` to `app` is over.
    fn end_delivery(&self, _client: SocketAddr, _app: SocketAddr) {}
    /// Whether same-node connections are handed to the kernel once set up
    /// (`--kernel-same-node`; see [`kernel_path`]).
    fn kernel_same_node(&self) -> bool {
        false
    }
    /// Adds mesh-node's socket `fd` (whose own 4-tuple is `key`) to the kernel's socket map,
    /// as a target paired writes can go out of; `false` when it cannot.
    fn join(&self, _key: SockKey, _fd: RawFd) -> bool {
        false
    }
    /// What the application socket `sender` writes goes out of mesh-node's socket `target`
    /// (for a client with `handover`, once mesh-node has written on all it sent before).
    fn pair(&self, _sender: SockKey, _target: SockKey, _handover: bool) -> bool {
        false
    }
    /// mesh-node has written on `bytes` of what the client `sender` sent through it.
    fn relayed(&self, _sender: SockKey, _bytes: u64) {}
    /// Takes an application's socket off the kernel's socket map (it joined at connect, and
    /// its connection turned out not to be paired).
    fn leave(&self, _key: SockKey) {}
    /// Ends `sender`'s pairing; the bytes the kernel carried for it.
    fn unpair(&self, _sender: SockKey) -> u64 {
        0
    }
}

impl OriginalDestinations for Dataplane {
    fn take(&self, netns_cookie: u64, src_port: u16) -> Option<SocketAddr> {
        self.take_original_dst(netns_cookie, src_port)
    }
    fn dns_upstream(&self, netns_cookie: u64) -> Option<SocketAddr> {
        Dataplane::dns_upstream(self, netns_cookie)
    }
    fn begin_delivery(&self, client: SocketAddr, app: SocketAddr) -> bool {
        match Dataplane::begin_delivery(self, client, app) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%client, %app, %error, "cannot connect from the client's address; connecting from the pod's");
                false
            }
        }
    }
    fn end_delivery(&self, client: SocketAddr, app: SocketAddr) {
        Dataplane::end_delivery(self, client, app);
    }
    fn kernel_same_node(&self) -> bool {
        Dataplane::kernel_same_node(self)
    }
    fn join(&self, key: SockKey, fd: RawFd) -> bool {
        Dataplane::join(self, key, &fd)
            .inspect_err(|error| tracing::debug!(%error, "socket not joined; the connection stays on the relay"))
            .is_ok()
    }
    fn pair(&self, sender: SockKey, target: SockKey, handover: bool) -> bool {
        Dataplane::pair(self, sender, target, handover)
            .inspect_err(
                |error| tracing::debug!(%error, "not paired; the connection stays on the relay"),
            )
            .is_ok()
    }
    fn relayed(&self, sender: SockKey, bytes: u64) {
        // A failed update only keeps the connection on the relay.
        let _ = Dataplane::relayed(self, sender, bytes);
    }
    fn leave(&self, key: SockKey) {
        Dataplane::leave(self, key);
    }
    fn unpair(&self, sender: SockKey) -> u64 {
        Dataplane::unpair(self, sender)
    }
}

/// Everything a connection handler may consult, shared by all of them.
pub struct ProxyContext {
    pub original_dsts: Arc<dyn OriginalDestinations>,
    /// The mesh as the control plane (or the local file) last described it: read with
    /// [`Self::state`], changed only through [`Self::update_state`], which rechecks open
    /// connections against the change.
    /// parking_lot's: a large push hands the lock to waiting readers between its steps
    /// ([`Self::update_state_in_steps`]); std's lets the writer take it straight back.
    state: parking_lot::RwLock<State>,
    pub node: NodeInfo,
    pub local_pods: LocalPods,
    /// `None`: no certificate source configured; HBONE is off.
    pub certs: Option<Arc<CertManager>>,
    pub pool: Pool,
    pub settings: Settings,
    /// Open connections into local pods, re-authorized when policies change.
    pub live: Arc<Live>,
    pub metrics: Arc<Metrics>,
    /// Which refused handshakes (by source address and reason) were logged lately.
    pub refusals: Throttle<(IpAddr, String)>,
    /// Started on SIGTERM or `POST /drain`.
    pub drain: crate::drain::Drain,
}

/// A source refused for one reason is logged at most once per window.
pub const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);
/// Sources (per reason) remembered at once; a flood from more shares one line.
const REFUSAL_LOG_KEYS: usize = 1024;

impl ProxyContext {
    pub fn new(
        original_dsts: Arc<dyn OriginalDestinations>,
        node: NodeInfo,
        certs: Option<Arc<CertManager>>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics,
            original_dsts,
            state: parking_lot::RwLock::new(State::new()),
            node,
            local_pods: LocalPods::default(),
            certs,
            pool: Pool::spread_over(settings.connections_per_peer),
            settings,
            live: Arc::new(Live::default()),
            refusals: Throttle::new(REFUSAL_LOG_WINDOW, REFUSAL_LOG_KEYS),
            drain: crate::drain::Drain::new(),
        }
    }

    /// Reads the mesh state.
    pub fn state(&self) -> parking_lot::RwLockReadGuard<'_, State> {
        self.state.read()
    }

    /// As [`Self::update_state`] for a change made in steps (a large push): the write lock is
    /// held for each step on its own, so that connections routed meanwhile wait for one step
    /// at most; open connections are authorized again once, after the last (with the
    /// connections decided between steps among them).
    pub fn update_state_in_steps<S: FnOnce(&mut State)>(&self, steps: impl IntoIterator<Item = S>) {
        let mut steps = steps.into_iter().peekable();
        while let Some(step) = steps.next() {
            if steps.peek().is_none() {
                return self.update_state(step);
            }
            let mut state = self.state.write();
            step(&mut state);
            // Straight to the connections waiting to read it, before the next step takes it.
            parking_lot::RwLockWriteGuard::unlock_fair(state);
        }
    }

    /// Changes the mesh state. Open connections keep their routes; those into local pods are
    /// authorized again if the change touched what their verdict depends on, and closed if now
    /// denied. The recheck runs under the write lock, so a connection being authorized
    /// concurrently is either decided on the new state or rechecked here.
    pub fn update_state<T>(&self, change: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.write();
        let result = change(&mut state);
        let started = std::time::Instant::now();
        if let Some((checked, closed)) = self.live.recheck(&state, &self.node) {
            let seconds = started.elapsed().as_secs_f64();
            self.metrics.authz_recheck(seconds);
            tracing::debug!(
                checked,
                closed,
                micros = (seconds * 1e6) as u64,
                "open connections authorized again after a policy change"
            );
        }
        result
    }
}
