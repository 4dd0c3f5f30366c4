//! The pod registry: enrolling a pod opens mesh-node's listeners inside its network namespace and
//! tells the kernel programs to capture it; un-enrolling undoes both.
//!
//! Sources (the static file today, the Kubernetes watcher later) only call [`Enroller::enroll`]
//! and [`Enroller::unenroll`].
pub mod static_file;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use mesh_common::{OUTBOUND_PORT, PROXY_MARK};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    dataplane::{Dataplane, DataplaneError},
    netns::{self, NetNs, NetNsError},
    proxy,
};

/// A pod to enroll, whatever the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod's network namespace file (`/run/netns/…`, `/proc/<pid>/ns/net`, …).
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
}

impl PodSpec {
    /// `namespace/name`, unique per cluster.
    pub fn key(&self) -> String {
        self.to_string()
    }
}

/// An enrolled pod as the proxy sees it.
#[derive(Debug)]
pub struct Pod {
    pub spec: PodSpec,
    pub netns: NetNs,
    pub netns_cookie: u64,
    pub id: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enroll pod {pod}: {source}")]
    NetNs { pod: String, source: NetNsError },
    #[error("enroll pod {pod}: bind {addr} in netns {netns}: {io_error}")]
    Bind {
        pod: String,
        addr: SocketAddr,
        netns: PathBuf,
        io_error: io::Error,
    },
    #[error("enroll pod {pod}: read netns cookie: {io_error}")]
    Cookie { pod: String, io_error: io::Error },
    #[error("enroll pod {pod}: register listener with the runtime: {io_error}")]
    Register { pod: String, io_error: io::Error },
    #[error("enroll pod {pod}: pod is already enrolled")]
    AlreadyEnrolled { pod: String },
    #[error("enroll pod {pod}: {source}")]
    Dataplane { pod: String, source: DataplaneError },
}

struct Enrolled {
    pod: Arc<Pod>,
    tasks: Vec<JoinHandle<()>>,
}

/// Owns every enrolled pod's listeners and accept loops.
pub struct Enroller {
    dataplane: Arc<Dataplane>,
    pods: Mutex<HashMap<String, Enrolled>>,
    next_id: AtomicU32,
}

impl Enroller {
    pub fn new(dataplane: Arc<Dataplane>) -> Self {
        Self {
            dataplane,
            pods: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
        }
    }

    /// Opens the pod's listeners in its namespace, starts serving them, then starts capture.
    /// Must be called inside the data-path runtime.
    pub fn enroll(&self, spec: PodSpec) -> Result<Arc<Pod>, EnrollError> {
        let key = spec.key();
        if self.lock().contains_key(&key) {
            return Err(EnrollError::AlreadyEnrolled { pod: key });
        }
        let netns = NetNs::open(&spec.netns).map_err(|source| EnrollError::NetNs {
            pod: key.clone(),
            source,
        })?;
        let listeners = open_outbound_listeners(&key, &netns)?;
        let netns_cookie =
            netns::socket_netns_cookie(&listeners[0]).map_err(|io_error| EnrollError::Cookie {
                pod: key.clone(),
                io_error,
            })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pod = Arc::new(Pod {
            spec,
            netns,
            netns_cookie,
            id,
        });

        let mut tasks = Vec::with_capacity(listeners.len());
        for listener in listeners {
            let listener = TcpListener::from_std(listener.into()).map_err(|io_error| {
                EnrollError::Register {
                    pod: key.clone(),
                    io_error,
                }
            })?;
            tasks.push(tokio::spawn(proxy::outbound::serve(
                listener,
                pod.clone(),
                self.dataplane.clone(),
            )));
        }
        // Capture starts only once something is accepting.
        if let Err(source) = self.dataplane.enroll(netns_cookie, id) {
            tasks.iter().for_each(JoinHandle::abort);
            return Err(EnrollError::Dataplane { pod: key, source });
        }
        tracing::info!(pod = %key, netns = %pod.netns.path().display(), netns_cookie, "pod enrolled");
        self.lock().insert(
            key,
            Enrolled {
                pod: pod.clone(),
                tasks,
            },
        );
        Ok(pod)
    }

    /// Stops capture for the pod, then closes its listeners. Unknown pods are ignored.
    pub fn unenroll(&self, key: &str) -> Result<(), DataplaneError> {
        let Some(enrolled) = self.lock().remove(key) else {
            return Ok(());
        };
        self.dataplane.unenroll(enrolled.pod.netns_cookie)?;
        enrolled.tasks.iter().for_each(JoinHandle::abort);
        tracing::info!(pod = %key, "pod un-enrolled");
        Ok(())
    }

    /// Network-namespace cookies of every enrolled pod.
    pub fn netns_cookies(&self) -> Vec<u64> {
        self.lock()
            .values()
            .map(|enrolled| enrolled.pod.netns_cookie)
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Enrolled>> {
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Binds 127.0.0.1:15001 (required) and [::1]:15001 (when the pod has IPv6) inside the pod's
/// namespace. The first listener returned is the IPv4 one.
fn open_outbound_listeners(pod: &str, netns: &NetNs) -> Result<Vec<Socket>, EnrollError> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT));
    let (v4_result, v6_result) =
        netns
            .run(|| (listen(v4), listen(v6)))
            .map_err(|source| EnrollError::NetNs {
                pod: pod.to_owned(),
                source,
            })?;
    let v4_listener = v4_result.map_err(|io_error| EnrollError::Bind {
        pod: pod.to_owned(),
        addr: v4,
        netns: netns.path().to_owned(),
        io_error,
    })?;
    let mut listeners = vec![v4_listener];
    match v6_result {
        Ok(listener) => listeners.push(listener),
        // No IPv6 in the pod: the connect6 hook's liveness check finds no listener and lets
        // IPv6 connections through (there are none to make).
        Err(error) => tracing::debug!(pod, %error, "no IPv6 outbound listener"),
    }
    Ok(listeners)
}

fn listen(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}
