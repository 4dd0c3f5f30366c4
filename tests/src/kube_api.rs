//! A small Kubernetes API server for tests, speaking the real protocol for pods and namespaces
//! over HTTPS (HTTP/1.1, a serving certificate for its address from the test mesh root) inside a
//! node's network namespace: list (with `resourceVersion`), streaming
//! watch (`ADDED`/`MODIFIED`/`DELETED`, `BOOKMARK` when asked, an `ERROR` with 410 Gone for a
//! version older than the last compaction), get, and JSON merge / strategic merge patches
//! (recorded). Bearer-token authentication as a service account's token is checked.
//!
//! Tests change objects while it runs (every watch sees the change), compact the history (open
//! watches end; resuming from an old version gets 410 and must re-list), and stop and start it
//! on the same address (an API server outage).
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

/// The token clients must present.
pub const TOKEN: &str = "mesh-node-test-token";
/// How often a watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Namespace,
    Pod,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
        }
    }
}

/// A patch a client sent.
#[derive(Clone, Debug)]
pub struct PatchRecord {
    pub namespace: String,
    pub name: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Changes are kept from here on; older versions are gone (410).
    compacted: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    log: Vec<(u64, Kind, &'static str, Value)>,
    patches: Vec<PatchRecord>,
    lists: usize,
    watches: usize,
}

impl Store {
    fn put(&mut self, kind: Kind, mut object: Value) -> Value {
        self.rv += 1;
        let meta = &mut object["metadata"];
        let namespace = meta["namespace"].as_str().unwrap_or("").to_owned();
        let name = meta["name"].as_str().unwrap_or("").to_owned();
        meta["resourceVersion"] = Value::from(self.rv.to_string());
        if meta.get("uid").is_none() {
            meta["uid"] = Value::from(format!("uid-{}-{name}", self.rv));
        }
        object["kind"] = Value::from(kind.name());
        object["apiVersion"] = Value::from("v1");
        let key = (kind, namespace, name);
        let event = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key, object.clone());
        self.log.push((self.rv, kind, event, object.clone()));
        object
    }

    fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> bool {
        let Some(mut object) = self
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        self.rv += 1;
        object["metadata"]["resourceVersion"] = Value::from(self.rv.to_string());
        self.log.push((self.rv, kind, "DELETED", object));
        true
    }
}

struct Shared {
    store: Mutex<Store>,
    /// The latest resource version, for watches to wake on.
    changed: watch::Sender<u64>,
    /// Bumped to end every open watch (compaction).
    generation: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The API server; stopped when dropped.
pub struct KubeApi {
    shared: Arc<Shared>,
    netns: PathBuf,
    addr: SocketAddr,
    /// The root that signed the serving certificate, for the kubeconfig.
    root_cert: PathBuf,
    tls: Arc<rustls::ServerConfig>,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl KubeApi {
    /// Starts serving on `addr` inside `netns` (port 0: any free port), with a certificate
    /// for `addr`'s IP signed by the CA in `ca_dir` (`root-cert.pem`, `root-key.pem`).
    pub fn start(netns: &Path, addr: SocketAddr, ca_dir: &Path) -> Result<Self> {
        let mut api = Self {
            root_cert: ca_dir.join("root-cert.pem"),
            tls: serving_config(ca_dir, addr.ip())?,
            shared: Arc::new(Shared {
                store: Mutex::new(Store::default()),
                changed: watch::channel(0).0,
                generation: watch::channel(0).0,
            }),
            netns: netns.to_owned(),
            addr,
            running: None,
        };
        api.resume()?;
        Ok(api)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig for this server, written to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<PathBuf> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://{}\n    certificate-authority: {}\n\
             users:\n- name: mesh-node\n  user:\n    token: {TOKEN}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: mesh-node\n\
             current-context: test\n",
            self.addr,
            self.root_cert.display()
        );
        std::fs::write(path, text)?;
        Ok(path.to_owned())
    }

    /// Creates or replaces a namespace with these labels.
    pub fn put_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        let object = json!({"metadata": {"name": name, "labels": labels}});
        self.put(Kind::Namespace, object);
    }

    /// Creates or replaces a pod (`metadata.namespace` and `metadata.name` required); keeps the
    /// annotations clients patched onto the previous version unless `pod` sets its own.
    pub fn put_pod(&self, mut pod: Value) {
        let key = (
            Kind::Pod,
            pod["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            pod["metadata"]["name"].as_str().unwrap_or("").to_owned(),
        );
        if let Some(old) = self.shared.lock().objects.get(&key)
            && pod["metadata"].get("annotations").is_none()
            && let Some(annotations) = old["metadata"].get("annotations")
        {
            pod["metadata"]["annotations"] = annotations.clone();
        }
        self.put(Kind::Pod, pod);
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        let deleted = self.shared.lock().delete(Kind::Pod, namespace, name);
        self.notify();
        deleted
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&(Kind::Pod, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The pod's `metadata.annotations[key]`.
    pub fn pod_annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        self.pod(namespace, name)?["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_owned)
    }

    pub fn patches(&self) -> Vec<PatchRecord> {
        self.shared.lock().patches.clone()
    }

    /// (lists, watches) served so far.
    pub fn requests(&self) -> (usize, usize) {
        let store = self.shared.lock();
        (store.lists, store.watches)
    }

    /// Forgets the history up to now, as etcd's compaction does, and ends every open watch:
    /// a client resuming from any version it has seen gets 410 Gone and must list again.
    pub fn compact(&self) {
        {
            let mut store = self.shared.lock();
            store.rv += 1; // another resource's change, which no watch here shows
            store.compacted = store.rv;
            let compacted = store.compacted;
            store.log.retain(|(rv, ..)| *rv >= compacted);
        }
        self.shared.generation.send_modify(|g| *g += 1);
    }

    fn put(&self, kind: Kind, object: Value) {
        self.shared.lock().put(kind, object);
        self.notify();
    }

    fn notify(&self) {
        let rv = self.shared.lock().rv;
        self.shared.changed.send_replace(rv);
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Stops serving: the listener closes and every connection is cut. Objects are kept.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }

    /// Serves (again) on the same address.
    pub fn resume(&mut self) -> Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let netns = std::fs::File::open(&self.netns)
            .with_context(|| format!("open {}", self.netns.display()))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (addr, shared) = (self.addr, self.shared.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let thread = std::thread::spawn(move || {
            let setup = || -> Result<_> {
                // SAFETY: setns on this thread only; `netns` is open.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )?;
                socket.set_reuse_address(true)?;
                socket.set_nonblocking(true)?;
                socket
                    .bind(&addr.into())
                    .with_context(|| format!("bind {addr}"))?;
                socket.listen(128)?;
                let listener: std::net::TcpListener = socket.into();
                let bound = listener.local_addr()?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let listener = {
                    let _context = runtime.enter();
                    tokio::net::TcpListener::from_std(listener)?
                };
                Ok((runtime, listener, bound))
            };
            let (runtime, listener, bound) = match setup() {
                Ok(parts) => parts,
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(bound));
            runtime.block_on(async move {
                let accept = async {
                    let mut connections = tokio::task::JoinSet::new();
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let (shared, acceptor) = (shared.clone(), acceptor.clone());
                        connections.spawn(async move {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let service = hyper::service::service_fn(move |request| {
                                let shared = shared.clone();
                                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                };
                // Dropping the accept future drops the JoinSet: every connection is cut.
                tokio::select! {
                    () = accept => {}
                    _ = stop_rx => {}
                }
            });
        });
        self.addr = ready_rx
            .recv()
            .context("API server thread ended before serving")??;
        self.running = Some((stop_tx, thread));
        Ok(())
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// TLS 1.2/1.3 with a certificate for `ip`, signed by the CA in `ca_dir`; HTTP/1.1 by ALPN.
fn serving_config(ca_dir: &Path, ip: std::net::IpAddr) -> Result<Arc<rustls::ServerConfig>> {
    let root_pem = std::fs::read_to_string(ca_dir.join("root-cert.pem"))?;
    let root_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("root-key.pem"))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, root_key)?;
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec![ip.to_string()])?;
    let cert = params.signed_by(&key, &issuer)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
        }),
    )
}

/// `?a=b&c=d`, percent-decoded.
fn query(request: &Request<Incoming>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A field selector of `key=value` terms joined by commas; only the fields used here.
fn field_filter(selector: Option<&String>) -> Result<Vec<(String, String)>, String> {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return Ok(Vec::new());
    };
    selector
        .split(',')
        .map(|term| {
            let (k, v) = term
                .split_once('=')
                .ok_or_else(|| format!("invalid field selector term {term:?}"))?;
            match k {
                "spec.nodeName" | "metadata.name" | "metadata.namespace" => {
                    Ok((k.to_owned(), v.trim_start_matches('=').to_owned()))
                }
                _ => Err(format!("field label not supported: {k}")),
            }
        })
        .collect()
}

fn matches(object: &Value, fields: &[(String, String)]) -> bool {
    fields.iter().all(|(k, v)| {
        let path: Vec<&str> = k.split('.').collect();
        let mut at = object;
        for part in path {
            at = &at[part];
        }
        at.as_str().unwrap_or("") == v
    })
}

async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let authorized = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if !authorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let path: Vec<String> = request
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
    let (kind, namespace, name) = match parts.as_slice() {
        ["api", "v1", "pods"] => (Kind::Pod, None, None),
        ["api", "v1", "namespaces"] => (Kind::Namespace, None, None),
        ["api", "v1", "namespaces", ns] => (Kind::Namespace, None, Some(*ns)),
        ["api", "v1", "namespaces", ns, "pods"] => (Kind::Pod, Some(*ns), None),
        ["api", "v1", "namespaces", ns, "pods", name] => (Kind::Pod, Some(*ns), Some(*name)),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
    };
    let method = request.method().clone();
    match (method, name) {
        (Method::GET, None) => collection(shared, &request, kind, namespace),
        (Method::GET, Some(name)) => {
            let key = (kind, namespace.unwrap_or("").to_owned(), name.to_owned());
            match shared.lock().objects.get(&key) {
                Some(object) => json_response(StatusCode::OK, object),
                None => not_found(kind, name),
            }
        }
        (Method::PATCH, Some(name)) if kind == Kind::Pod => {
            let namespace = namespace.unwrap_or("").to_owned();
            patch(shared, request, namespace, name.to_owned()).await
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        ),
    }
}

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    let plural = match kind {
        Kind::Pod => "pods",
        Kind::Namespace => "namespaces",
    };
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{plural} \"{name}\" not found"),
    )
}

fn collection(
    shared: &Arc<Shared>,
    request: &Request<Incoming>,
    kind: Kind,
    namespace: Option<&str>,
) -> Response<Body> {
    let query = query(request);
    let mut fields = match field_filter(query.get("fieldSelector")) {
        Ok(fields) => fields,
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    if let Some(ns) = namespace {
        fields.push(("metadata.namespace".into(), ns.into()));
    }
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch_stream(shared, kind, fields, &query);
    }
    let mut store = shared.lock();
    store.lists += 1;
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((k, ..), object)| *k == kind && matches(object, &fields))
        .map(|(_, object)| {
            // Lists carry kind and apiVersion once, not per item.
            let mut item = object.clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            item
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.name()), "apiVersion": "v1",
            "metadata": {"resourceVersion": store.rv.to_string()},
            "items": items
        }),
    )
}

fn watch_stream(
    shared: &Arc<Shared>,
    kind: Kind,
    fields: Vec<(String, String)>,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let shared = shared.clone();
    let expired = {
        let mut store = shared.lock();
        store.watches += 1;
        from != 0 && from < store.compacted
    };
    tokio::spawn(async move {
        let send = |value: Value| {
            let mut line = value.to_string();
            line.push('\n');
            tx.send(Ok(Frame::data(Bytes::from(line))))
        };
        if expired {
            let compacted = shared.lock().compacted;
            let _ = send(json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from} ({compacted})"),
                "reason": "Expired", "code": 410
            }}))
            .await;
            return;
        }
        let mut changed = shared.changed.subscribe();
        let mut generation = shared.generation.subscribe();
        generation.borrow_and_update();
        let mut seen = from;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(BOOKMARK_EVERY);
        bookmark.tick().await;
        loop {
            changed.borrow_and_update();
            let (events, rv) = {
                let store = shared.lock();
                let events: Vec<Value> = store
                    .log
                    .iter()
                    .filter(|(rv, k, _, object)| {
                        *rv > seen && *k == kind && matches(object, &fields)
                    })
                    .map(|(_, _, event, object)| json!({"type": event, "object": object}))
                    .collect();
                (events, store.rv)
            };
            for event in events {
                if send(event).await.is_err() {
                    return;
                }
            }
            seen = rv;
            tokio::select! {
                _ = changed.changed() => {}
                _ = generation.changed() => return,
                _ = &mut deadline => return,
                _ = bookmark.tick(), if bookmarks => {
                    let event = json!({"type": "BOOKMARK", "object": {
                        "kind": kind.name(), "apiVersion": "v1",
                        "metadata": {"resourceVersion": seen.to_string()}
                    }});
                    if send(event).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

async fn patch(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    namespace: String,
    name: String,
) -> Response<Body> {
    let content_type = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !matches!(
        content_type.as_str(),
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("the body of the request was in an unknown format: {content_type}"),
        );
    }
    let Ok(body) = request.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the patch is not JSON",
        );
    };
    let updated = {
        let mut store = shared.lock();
        let key = (Kind::Pod, namespace.clone(), name.clone());
        let Some(mut object) = store.objects.get(&key).cloned() else {
            return not_found(Kind::Pod, &name);
        };
        store.patches.push(PatchRecord {
            namespace,
            name,
            content_type,
            body: patch.clone(),
        });
        merge_patch(&mut object, &patch);
        store.put(Kind::Pod, object)
    };
    let rv = shared.lock().rv;
    shared.changed.send_replace(rv);
    json_response(StatusCode::OK, &updated)
}

/// RFC 7386 JSON merge patch (for the maps patched here, strategic merge is the same).
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let Some(map) = target.as_object_mut() else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_sets_and_removes() {
        let mut object = json!({"metadata": {"annotations": {"a": "1", "b": "2"}, "name": "x"}});
        merge_patch(
            &mut object,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}}}),
        );
        assert_eq!(
            object,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}, "name": "x"}})
        );
    }

    #[test]
    fn decodes_field_selectors() {
        assert_eq!(decode("spec.nodeName%3Dnode1"), "spec.nodeName=node1");
        assert_eq!(
            field_filter(Some(&"spec.nodeName=n1".to_owned())).unwrap(),
            vec![("spec.nodeName".to_owned(), "n1".to_owned())]
        );
        assert!(field_filter(Some(&"status.phase=Running".to_owned())).is_err());
    }
}
