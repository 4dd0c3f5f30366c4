//! Enrollment from the Kubernetes API: kube-rs watchers (with reflector stores) on this node's
//! pods and on namespaces; after every change the wanted set — Istio ambient's selectors,
//! [`select`] — is reconciled with what is enrolled: pods found in the host's `/proc`
//! ([`proc_netns`]) are enrolled and annotated `ambient.istio.io/redirection: enabled`, pods that
//! left the set are released and the annotation removed.
//!
//! The stores keep the last state while the API server is away (the watcher retries with
//! backoff and re-lists after 410 Gone), so an outage changes nothing that is enrolled.
//! Enrollment captures new connections only: the hooks act at `connect()` and on new SYNs, so
//! connections a pod had before are left as they are.
pub mod proc_netns;
pub mod select;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tokio_stream::StreamExt;

use self::select::{REDIRECTION_ANNOTATION, REDIRECTION_ENABLED, Selector, Wanted, is_annotated};
use super::{Enroller, PodSpec};
use crate::{config::KubeSettings, netns::NetNs};

/// How often pods still waiting (no network namespace yet, a failed enrollment or patch) are
/// tried again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("--kubernetes needs --node-name (NODE_NAME): only this node's pods are enrolled")]
    NoNodeName,
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    Infer(String),
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// Builds the client from the kubeconfig or the pod's service account. Must run inside a
/// runtime (the client's request buffer is a task).
pub async fn connect(settings: &KubeSettings) -> Result<Client, KubeError> {
    if settings.node_name.is_empty() {
        return Err(KubeError::NoNodeName);
    }
    let config = match &settings.kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|e| KubeError::Kubeconfig {
                path: path.clone(),
                message: crate::error_chain(&e),
            })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Kubeconfig {
                    path: path.clone(),
                    message: crate::error_chain(&e),
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Infer(crate::error_chain(&e)))?,
    };
    Client::try_from(config).map_err(|e| KubeError::Client(crate::error_chain(&e)))
}

/// What this source enrolled, by `namespace/name`.
struct Entry {
    uid: String,
    ips: Vec<IpAddr>,
    dns_capture: bool,
}

/// The enrollment controller of one node.
pub struct Controller {
    client: Client,
    settings: KubeSettings,
    selector: Selector,
    enroller: Arc<Enroller>,
    enrolled: HashMap<String, Entry>,
    /// The last complaint logged per pod, so that a retry that fails the same way is quiet.
    complaints: HashMap<String, String>,
}

/// Which watch a stream item came from.
#[derive(Clone, Copy)]
enum Watched {
    Pods,
    Namespaces,
}

impl Controller {
    pub fn new(client: Client, settings: KubeSettings, enroller: Arc<Enroller>) -> Self {
        Self {
            client,
            selector: Selector::new(&settings),
            settings,
            enroller,
            enrolled: HashMap::new(),
            complaints: HashMap::new(),
        }
    }

    /// Watches and reconciles until the process ends. `synced` is told (with the number of
    /// pods enrolled) once both watches have listed and the first reconciliation is done.
    pub async fn run(mut self, synced: tokio::sync::oneshot::Sender<usize>) {
        let (pods, pod_writer) = reflector::store::<Pod>();
        let (namespaces, ns_writer) = reflector::store::<Namespace>();
        let pod_config = watcher::Config::default()
            .fields(&format!("spec.nodeName={}", self.settings.node_name));
        let pod_events = watcher(Api::<Pod>::all(self.client.clone()), pod_config)
            .modify(slim)
            .default_backoff()
            .reflect(pod_writer)
            .map(|item| (Watched::Pods, item.map(|event| is_init_done(&event))));
        let ns_events = watcher(
            Api::<Namespace>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .modify(|ns: &mut Namespace| ns.metadata.managed_fields = None)
        .default_backoff()
        .reflect(ns_writer)
        .map(|item| (Watched::Namespaces, item.map(|event| is_init_done(&event))));
        let mut events = std::pin::pin!(pod_events.merge(ns_events));
        let mut synced = Some(synced);
        let (mut pods_listed, mut namespaces_listed) = (false, false);
        let mut pending = false;
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(node = %self.settings.node_name, label = %self.settings.label, "watching this node's pods and the namespaces");
        loop {
            tokio::select! {
                item = events.next() => match item {
                    None => return,
                    Some((watched, Ok(init_done))) => {
                        if init_done {
                            match watched {
                                Watched::Pods => pods_listed = true,
                                Watched::Namespaces => namespaces_listed = true,
                            }
                        }
                    }
                    Some((watched, Err(error))) => {
                        let what = match watched {
                            Watched::Pods => "pods",
                            Watched::Namespaces => "namespaces",
                        };
                        // Backoff paces these; the stores keep what they had.
                        tracing::warn!(watch = what, error = %crate::error_chain(&error), "Kubernetes watch failed; retrying, enrolled pods unchanged");
                        continue;
                    }
                },
                _ = retry.tick(), if pending => {}
            }
            if !(pods_listed && namespaces_listed) {
                continue;
            }
            if self.enroller.is_draining() {
                // The pods and their annotations are the successor's (or the next start's).
                tracing::info!(
                    "draining: the Kubernetes watch stops; enrollment is left to whoever serves next"
                );
                return;
            }
            pending = self.reconcile(&pods, &namespaces).await;
            if let Some(tx) = synced.take() {
                let _ = tx.send(self.enrolled.len());
            }
        }
    }

    /// Brings enrollment and annotations in line with the stores. Returns whether something
    /// is left to retry.
    async fn reconcile(&mut self, pods: &Store<Pod>, namespaces: &Store<Namespace>) -> bool {
        let mut pending = false;
        let mut wanted: HashMap<String, (Wanted, Arc<Pod>)> = HashMap::new();
        let mut others: Vec<Arc<Pod>> = Vec::new();
        for pod in pods.state() {
            let namespace = pod
                .metadata
                .namespace
                .as_deref()
                .and_then(|ns| namespaces.get(&ObjectRef::new(ns)));
            match self.selector.decide(&pod, namespace.as_deref()) {
                Ok(want) => {
                    wanted.insert(want.key(), (want, pod));
                }
                Err(skip) => {
                    tracing::trace!(pod = ?pod.metadata.name, ?skip, "not enrolled");
                    others.push(pod);
                }
            }
        }

        // Leaving first: a pod re-created under the same name (new UID) is released, then
        // enrolled again below.
        let leaving: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(key, entry)| {
                wanted.get(*key).is_none_or(|(w, _)| {
                    w.uid != entry.uid || w.ips != entry.ips || w.dns_capture != entry.dns_capture
                })
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in leaving {
            self.enrolled.remove(&key);
            self.complaints.remove(&key);
            if let Err(error) = self.enroller.unenroll(&key) {
                tracing::error!(pod = %key, %error, "releasing the pod left kernel state behind");
            }
        }

        let joining: HashSet<String> = wanted
            .iter()
            .filter(|(key, _)| !self.enrolled.contains_key(*key))
            .map(|(_, (w, _))| w.uid.clone())
            .collect();
        let mut found = if joining.is_empty() {
            HashMap::new()
        } else {
            match proc_netns::find(&self.settings.host_proc, &joining) {
                Ok(found) => found,
                Err(error) => {
                    self.complain(
                        "",
                        format!("cannot list {}: {error}", self.settings.host_proc.display()),
                    );
                    HashMap::new()
                }
            }
        };
        for (key, (want, _)) in &wanted {
            if self.enrolled.contains_key(key) {
                continue;
            }
            let Some(netns) = found.remove(&want.uid) else {
                pending = true;
                tracing::debug!(pod = %key, uid = %want.uid, "waiting for a process of the pod in the host's /proc");
                continue;
            };
            let spec = PodSpec {
                name: want.name.clone(),
                namespace: want.namespace.clone(),
                service_account: want.service_account.clone(),
                netns: netns.path.clone(),
                ips: want.ips.clone(),
                dns_capture: want.dns_capture,
            };
            let result = NetNs::from_file(netns.file, &netns.path)
                .map_err(|error| error.to_string())
                .and_then(|ns| {
                    self.enroller
                        .enroll_in(spec, ns)
                        .map_err(|error| error.to_string())
                });
            match result {
                Ok(_) => {
                    self.complaints.remove(key);
                    self.enrolled.insert(
                        key.clone(),
                        Entry {
                            uid: want.uid.clone(),
                            ips: want.ips.clone(),
                            dns_capture: want.dns_capture,
                        },
                    );
                }
                Err(message) => {
                    pending = true;
                    self.complain(key, message);
                }
            }
        }

        // Annotations follow enrollment: istiod treats annotated pods as HBONE-capable.
        let mut patches: Vec<(String, String, bool)> = Vec::new();
        for (key, (_, pod)) in &wanted {
            let enrolled = self.enrolled.contains_key(key);
            if enrolled != is_annotated(pod) {
                patches.extend(name_of(pod).map(|(ns, name)| (ns, name, enrolled)));
            }
        }
        for pod in others.iter().filter(|pod| is_annotated(pod)) {
            patches.extend(name_of(pod).map(|(ns, name)| (ns, name, false)));
        }
        for (namespace, name, enabled) in patches {
            pending |= !self.annotate(&namespace, &name, enabled).await;
        }
        pending
    }

    /// Sets (or removes) the redirection annotation; a pod that is gone is not a failure.
    async fn annotate(&mut self, namespace: &str, name: &str, enabled: bool) -> bool {
        let value = if enabled {
            serde_json::Value::from(REDIRECTION_ENABLED)
        } else {
            serde_json::Value::Null
        };
        let patch = serde_json::json!({
            "metadata": { "annotations": { REDIRECTION_ANNOTATION: value } }
        });
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let key = format!("{namespace}/{name}");
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::debug!(pod = %key, enabled, "redirection annotation patched");
                true
            }
            Err(kube::Error::Api(status)) if status.code == 404 => true,
            Err(error) => {
                self.complain(
                    &key,
                    format!(
                        "patch annotation {REDIRECTION_ANNOTATION}: {}",
                        crate::error_chain(&error)
                    ),
                );
                false
            }
        }
    }

    /// Logs `message` for `pod` unless it is what was logged for it last time.
    fn complain(&mut self, pod: &str, message: String) {
        if self.complaints.get(pod) != Some(&message) {
            tracing::error!(pod, error = %message, "pod not enrolled (retrying)");
            self.complaints.insert(pod.to_owned(), message);
        }
    }
}

fn name_of(pod: &Pod) -> Option<(String, String)> {
    Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
}

fn is_init_done<K>(event: &watcher::Event<K>) -> bool {
    matches!(event, watcher::Event::InitDone)
}

/// Keeps of a pod only what enrollment reads, so that the store of a node's pods stays small.
fn slim(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.owner_references = None;
    if let Some(annotations) = &mut pod.metadata.annotations {
        annotations
            .retain(|key, _| key == REDIRECTION_ANNOTATION || key.starts_with("sidecar.istio.io/"));
    }
    if let Some(spec) = &mut pod.spec {
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
        for container in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            let name = std::mem::take(&mut container.name);
            *container = k8s_openapi::api::core::v1::Container {
                name,
                ..Default::default()
            };
        }
    }
    if let Some(status) = &mut pod.status {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
    }
}
