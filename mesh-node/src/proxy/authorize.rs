//! Authorization of connections into local pods, at open and for as long as they live.
//!
//! Every connection [`super::inbound::deliver`] lets through is registered here with what its
//! verdict depends on. When the mesh state changes in a way that may change verdicts
//! ([`State::authz_version`]), [`Live::recheck`] decides every registered connection again and
//! closes those that are now denied.
use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::oneshot;

use super::NodeInfo;
use crate::{
    authz::{self, Decision},
    identity::Identity,
    pod::Pod,
    state::State,
};

/// A connection into a local pod, as policy sees it.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub pod: Arc<Pod>,
    /// The client's verified identity; `None` for captured plaintext.
    pub source: Option<Identity>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
}

impl Inbound {
    /// Decides this connection against the policies of the workload at its destination. A pod
    /// the control plane has not described (yet) is judged by its namespace alone.
    pub fn decide(&self, state: &State, node: &NodeInfo) -> Decision {
        let workload = state.workload_by_ip(&node.network, self.destination.ip());
        let (namespace, selected_by) = match &workload {
            Some(w) => (&*w.namespace, &*w.authorization_policies),
            None => (self.pod.spec.namespace.as_str(), &[][..]),
        };
        authz::evaluate(
            state.policies_for(namespace, selected_by),
            &authz::Target {
                namespace,
                selected_by,
            },
            &authz::Connection {
                source: self.source.as_ref(),
                source_ip: self.source_ip,
                destination: self.destination,
            },
        )
    }

    /// Logs what dry-run policies would have done differently.
    pub fn log_dry_run(&self, decision: &Decision) {
        if let Some(shadow) = &decision.dry_run
            && shadow.is_allowed() != decision.verdict.is_allowed()
        {
            tracing::info!(
                connection = %self,
                dry_run = %shadow,
                "dry-run policy would change the verdict; not enforced"
            );
        }
    }
}

/// `<identity or "plaintext"> at <source ip> → <pod> <destination>`, for logs.
impl fmt::Display for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(identity) => write!(f, "{identity}")?,
            None => f.write_str("plaintext")?,
        }
        write!(
            f,
            " at {} → {} {}",
            self.source_ip, self.pod.spec, self.destination
        )
    }
}

/// Connections into local pods that are open, with a way to close each.
#[derive(Default)]
pub struct Live {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Registered>>,
    /// The state's authz version the last recheck saw.
    checked: AtomicU64,
}

struct Registered {
    conn: Inbound,
    revoke: oneshot::Sender<String>,
}

/// Held by an open connection; resolves when policy revokes it, and unregisters on drop.
pub struct Revocation {
    id: u64,
    live: Arc<Live>,
    revoked: oneshot::Receiver<String>,
}

impl Revocation {
    /// Resolves with the reason once a policy change denies the connection; never otherwise.
    /// The connection stays registered until this future is dropped.
    pub async fn wait(mut self) -> String {
        match (&mut self.revoked).await {
            Ok(reason) => reason,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Revocation {
    fn drop(&mut self) {
        self.live.lock().remove(&self.id);
    }
}

impl Live {
    pub fn register(self: &Arc<Self>, conn: Inbound) -> Revocation {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (revoke, revoked) = oneshot::channel();
        self.lock().insert(id, Registered { conn, revoke });
        Revocation {
            id,
            live: self.clone(),
            revoked,
        }
    }

    /// Decides every open connection again if `state` changed anything authorization depends
    /// on since the last time, and closes those now denied. Returns how many were decided
    /// again, and how many of them were closed; `None` if nothing needed a re-check.
    pub fn recheck(&self, state: &State, node: &NodeInfo) -> Option<(usize, usize)> {
        let version = state.authz_version();
        if self.checked.swap(version, Ordering::Relaxed) == version {
            return None;
        }
        let mut conns = self.lock();
        let checked = conns.len();
        let denied: Vec<(u64, String)> = conns
            .iter()
            .filter_map(|(id, registered)| {
                let decision = registered.conn.decide(state, node);
                (!decision.verdict.is_allowed()).then(|| (*id, decision.verdict.to_string()))
            })
            .collect();
        for (id, reason) in &denied {
            if let Some(registered) = conns.remove(id) {
                tracing::info!(
                    connection = %registered.conn,
                    %reason,
                    "open connection closed: policy changed"
                );
                let _ = registered.revoke.send(reason.clone());
            }
        }
        Some((checked, denied.len()))
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Registered>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
