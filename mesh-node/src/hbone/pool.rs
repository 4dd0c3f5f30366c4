//! HBONE connection pool: connections are shared per (source workload, expected destination
//! identities, destination address); another connection is opened once each carries
//! [`STREAMS_PER_CONNECTION`] tunnels; idle connections are dropped after a while.
//!
//! One connection is one TLS session and one h2 connection task: it encrypts on one thread at
//! a time. So that concurrent tunnels between the same two pods can use more than one core,
//! a key may have up to `spread` connections (the data path's worker count) before tunnels
//! start sharing: a new tunnel opens another connection while every connection of its key
//! carries one already, and otherwise goes to the least busy connection with room.
use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{STREAMS_PER_CONNECTION, client::Connection};
use crate::identity::{Identity, San};

/// What makes two tunnels able to share a connection. The source IP is part of it because a
/// connection's socket lives in (and leaves with the address of) one source pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source_ip: IpAddr,
    pub source: Identity,
    /// Sorted, so the same set always makes the same key.
    pub expected: Vec<San>,
    pub peer: SocketAddr,
}

impl PoolKey {
    pub fn new(
        source_ip: IpAddr,
        source: Identity,
        mut expected: Vec<San>,
        peer: SocketAddr,
    ) -> Self {
        expected.sort();
        expected.dedup();
        Self {
            source_ip,
            source,
            expected,
            peer,
        }
    }
}

struct Pooled {
    id: u64,
    connection: Connection,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

#[derive(Default)]
struct Entry {
    connections: Vec<Arc<Pooled>>,
    /// Held while a new connection is being made, so a burst of tunnels waits for it instead of
    /// opening one connection each.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// The last failed attempt: callers that waited for it fail with it instead of each trying
    /// (and timing out) in turn.
    last_failure: Option<(Instant, String)>,
}

/// A tunnel slot on a pooled connection; releases the slot when dropped.
pub struct Lease {
    pooled: Arc<Pooled>,
    /// The connection was made for this lease rather than found in the pool.
    pub fresh: bool,
}

impl Lease {
    pub fn connection(&self) -> &Connection {
        &self.pooled.connection
    }

    /// Pool-unique number of the connection, for logs.
    pub fn connection_id(&self) -> u64 {
        self.pooled.id
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.pooled.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .pooled
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        }
    }
}

pub struct Pool {
    entries: Mutex<HashMap<PoolKey, Entry>>,
    next_id: AtomicU64,
    /// Connections per key that concurrent tunnels open before they share.
    spread: usize,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

impl Pool {
    /// A pool whose tunnels share one connection per key (up to its stream limit).
    pub fn new() -> Self {
        Self::spread_over(1)
    }

    /// A pool that opens up to `spread` connections per key for concurrent tunnels.
    pub fn spread_over(spread: usize) -> Self {
        Self {
            entries: Mutex::default(),
            next_id: AtomicU64::new(0),
            spread: spread.max(1),
        }
    }

    /// A tunnel slot on a connection for `key`, making the connection with `connect` when none
    /// has room. If another caller's attempt fails while this one waits for it, this one fails
    /// with the same reason.
    pub async fn checkout<F, Fut>(&self, key: &PoolKey, connect: F) -> Result<Lease, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connection, String>>,
    {
        let waiting_since = Instant::now();
        let connecting = {
            let mut entries = self.lock();
            let entry = entries.entry(key.clone()).or_default();
            if let Some(lease) = pick(entry, self.spread) {
                return Ok(lease);
            }
            entry.connecting.clone()
        };
        let _connecting = connecting.lock().await;
        if let Some(entry) = self.lock().get_mut(key) {
            if let Some(lease) = pick(entry, self.spread) {
                return Ok(lease);
            }
            if let Some((at, reason)) = &entry.last_failure
                && *at >= waiting_since
            {
                return Err(reason.clone());
            }
        }
        let connection = match connect().await {
            Ok(connection) => connection,
            Err(reason) => {
                self.lock().entry(key.clone()).or_default().last_failure =
                    Some((Instant::now(), reason.clone()));
                return Err(reason);
            }
        };
        let pooled = Arc::new(Pooled {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            connection,
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
        });
        let mut entries = self.lock();
        let entry = entries.entry(key.clone()).or_default();
        entry.connections.push(pooled.clone());
        entry.last_failure = None;
        Ok(Lease {
            pooled,
            fresh: true,
        })
    }

    /// Drops connections that are closed or idle: of a key's idle connections, the one used
    /// last stays until it has been idle for `idle` (so the next tunnel finds it warm); the
    /// others, which a peak left behind, go once idle for `surplus_idle` (each holds TLS and
    /// h2 state on both nodes). Returns how many went.
    pub fn evict(&self, idle: Duration, surplus_idle: Duration) -> usize {
        let mut evicted = 0;
        let mut entries = self.lock();
        for entry in entries.values_mut() {
            let before = entry.connections.len();
            entry
                .connections
                .retain(|pooled| !pooled.connection.is_closed());
            let idle_since = |pooled: &Pooled| {
                (pooled.active.load(Ordering::Acquire) == 0).then(|| {
                    *pooled
                        .idle_since
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                })
            };
            // The idle connection used last is the warm one.
            let warm = entry
                .connections
                .iter()
                .filter_map(|pooled| idle_since(pooled).map(|since| (since, pooled.id)))
                .max()
                .map(|(_, id)| id);
            let now = Instant::now();
            entry.connections.retain(|pooled| match idle_since(pooled) {
                None => true,
                Some(since) if Some(pooled.id) == warm => now.duration_since(since) < idle,
                Some(since) => now.duration_since(since) < surplus_idle,
            });
            evicted += before - entry.connections.len();
        }
        entries.retain(|_, entry| {
            !entry.connections.is_empty() || Arc::strong_count(&entry.connecting) > 1
        });
        evicted
    }

    /// Open connections, all keys together.
    pub fn connections(&self) -> usize {
        self.lock().values().map(|e| e.connections.len()).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reserves a slot on the least busy open connection with room; none (so that another is
/// opened) while the key has fewer than `spread` connections and each carries a tunnel.
fn pick(entry: &mut Entry, spread: usize) -> Option<Lease> {
    entry
        .connections
        .retain(|pooled| !pooled.connection.is_closed());
    let active = |pooled: &Arc<Pooled>| pooled.active.load(Ordering::Acquire);
    if entry.connections.len() < spread && entry.connections.iter().all(|p| active(p) > 0) {
        return None;
    }
    // Slots are taken under the pool's lock but given back without it: the count read may be
    // stale by then, so the reservation re-checks it.
    let mut candidates: Vec<&Arc<Pooled>> = entry.connections.iter().collect();
    candidates.sort_by_key(|pooled| active(pooled));
    candidates.into_iter().find_map(|pooled| {
        pooled
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |active| {
                (active < STREAMS_PER_CONNECTION).then_some(active + 1)
            })
            .ok()
            .map(|_| Lease {
                pooled: pooled.clone(),
                fresh: false,
            })
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn key() -> PoolKey {
        PoolKey::new(
            "10.0.0.1".parse().unwrap(),
            Identity::new("cluster.local", "default", "client"),
            vec![
                Identity::new("cluster.local", "default", "b").into(),
                Identity::new("cluster.local", "default", "a").into(),
            ],
            "10.0.0.2:15008".parse().unwrap(),
        )
    }

    #[test]
    fn keys_ignore_the_order_of_expected_identities() {
        let mut other = key();
        other.expected.reverse();
        assert_eq!(
            PoolKey::new(
                other.source_ip,
                other.source.clone(),
                other.expected,
                other.peer
            ),
            key()
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn callers_waiting_on_a_failed_attempt_share_its_failure() {
        let pool = Arc::new(Pool::new());
        let attempts = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (pool, attempts) = (pool.clone(), attempts.clone());
                tokio::spawn(async move {
                    pool.checkout(&key(), || async {
                        attempts.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err("connect 10.0.0.2:15008: timed out".to_owned())
                    })
                    .await
                    .err()
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(
                task.await.unwrap().as_deref(),
                Some("connect 10.0.0.2:15008: timed out")
            );
        }
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            1,
            "one attempt, not one per caller"
        );
        assert_eq!(pool.connections(), 0);
    }

    /// A TLS + h2 server on loopback that accepts connections and keeps them; and a way to
    /// connect to it as a client.
    async fn loopback()
    -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<Connection, String>>>> {
        use crate::{identity::file_ca::FileCa, tls::Tls};
        let ttl = Duration::from_secs(3600);
        let ca = FileCa::generate("cluster.local", ttl).unwrap();
        let tls = Tls::new("cluster.local");
        let server_id = Identity::new("cluster.local", "default", "server");
        let server = tls.certified(&ca.issue(&server_id, ttl).unwrap()).unwrap();
        let client = tls
            .certified(
                &ca.issue(&Identity::new("cluster.local", "default", "client"), ttl)
                    .unwrap(),
            )
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut h2) = h2::server::handshake(tls).await else {
                        return;
                    };
                    while h2.accept().await.is_some() {}
                });
            }
        });
        let config = tls.client_config(&client, vec![server_id.into()]).unwrap();
        move || {
            let config = config.clone();
            Box::pin(async move {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                Connection::establish(tcp, addr, config)
                    .await
                    .map_err(|e| e.to_string())
            })
        }
    }

    /// After a peak, a key's surplus idle connections go soon; the one used last stays warm
    /// for the long idle time.
    #[tokio::test(flavor = "current_thread")]
    async fn surplus_idle_connections_go_first_and_the_warm_one_stays() {
        let connect = loopback().await;
        let pool = Pool::new();
        let mut leases = Vec::new();
        for _ in 0..3 * STREAMS_PER_CONNECTION {
            leases.push(pool.checkout(&key(), &connect).await.unwrap());
        }
        assert_eq!(pool.connections(), 3);
        assert_eq!(pool.evict(Duration::ZERO, Duration::ZERO), 0, "all busy");
        // The last connection's tunnels end last: it is the warm one.
        let last = leases.last().unwrap().connection_id();
        drop(leases);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            pool.evict(Duration::from_secs(3600), Duration::from_millis(10)),
            2
        );
        assert_eq!(pool.connections(), 1);
        let again = pool.checkout(&key(), &connect).await.unwrap();
        assert!(!again.fresh, "the warm connection is reused");
        assert_eq!(again.connection_id(), last);
        drop(again);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.evict(Duration::from_millis(10), Duration::ZERO), 1);
        assert_eq!(pool.connections(), 0);
    }

    /// Concurrent tunnels of one key open up to `spread` connections, then share the least
    /// busy; one tunnel after another reuses the idle connection.
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_tunnels_spread_over_connections_then_share() {
        let connect = loopback().await;
        let pool = Pool::spread_over(2);
        let first = pool.checkout(&key(), &connect).await.unwrap();
        let second = pool.checkout(&key(), &connect).await.unwrap();
        assert!(
            first.fresh && second.fresh,
            "two busy tunnels, two connections"
        );
        assert_ne!(first.connection_id(), second.connection_id());
        let third = pool.checkout(&key(), &connect).await.unwrap();
        assert!(!third.fresh, "the spread reached: tunnels share");
        assert_eq!(pool.connections(), 2);
        // Least busy first: the connection of `second` carries one tunnel, `first`'s two.
        let on_first = third.connection_id() == first.connection_id();
        let busier = if on_first {
            first.connection_id()
        } else {
            second.connection_id()
        };
        let fourth = pool.checkout(&key(), &connect).await.unwrap();
        assert_ne!(
            fourth.connection_id(),
            busier,
            "went to the least busy connection"
        );
        drop((first, second, third, fourth));

        let sequential = Pool::spread_over(2);
        for round in 0..3 {
            let lease = sequential.checkout(&key(), &connect).await.unwrap();
            assert_eq!(
                lease.fresh,
                round == 0,
                "one tunnel at a time reuses the idle one"
            );
        }
        assert_eq!(sequential.connections(), 1);
    }
}
