//! The delta-ADS client: one gRPC stream to istiod (`DeltaAggregatedResources`) over TLS, with
//! the bearer token and cluster id istiod expects, reconnecting with jittered backoff. The
//! protocol decisions live in [`Session`]; this file only moves messages.
use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use prost_types::{Struct, Value, value::Kind};
use tokio::sync::{mpsc, watch};
use tonic::transport::Endpoint;

use crate::{
    error_chain,
    istiod::{self, Backoff},
    telemetry::Metrics,
};

use super::{
    ads,
    proto::discovery::Node,
    session::{Session, Update, XdsStatus},
};

/// The largest response taken (istiod sends the whole mesh in its first).
const MAX_RESPONSE: usize = 256 * 1024 * 1024;
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// How to reach the control plane and who we are to it.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// `host:port` of istiod's xDS port (15012).
    pub address: String,
    /// PEM file of the CA that signed the control plane's serving certificate.
    pub root_cert: PathBuf,
    /// Name the control plane's certificate must carry; default: the host part of `address`.
    pub server_name: Option<String>,
    /// File holding the bearer token (a Kubernetes service-account token); re-read on each
    /// connect because it rotates.
    pub token_file: Option<PathBuf>,
    pub cluster_id: String,
    /// mesh-node's own pod.
    pub pod_name: String,
    pub pod_namespace: String,
    pub node_name: String,
    pub instance_ips: Vec<IpAddr>,
    pub trust_domain: String,
}

pub use crate::istiod::EndpointError as XdsError;

impl XdsConfig {
    /// The node identity istiod uses to recognise a node proxy (and send it ambient resources).
    pub fn node(&self) -> Node {
        let ip = self
            .instance_ips
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        let ns = &self.pod_namespace;
        let text = |s: String| Value {
            kind: Some(Kind::StringValue(s)),
        };
        let ips = self
            .instance_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        Node {
            id: format!("ztunnel~{ip}~{}.{ns}~{ns}.svc.cluster.local", self.pod_name),
            cluster: self.cluster_id.clone(),
            metadata: Some(Struct {
                fields: [
                    ("NAME", self.pod_name.clone()),
                    ("NAMESPACE", ns.clone()),
                    ("INSTANCE_IPS", ips),
                    ("NODE_NAME", self.node_name.clone()),
                    ("CLUSTER_ID", self.cluster_id.clone()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), text(v)))
                .collect(),
            }),
            user_agent_name: "mesh-node".into(),
            ..Default::default()
        }
    }

    /// Checks what can be checked before the first connect, and builds the endpoint.
    pub fn endpoint(&self) -> Result<Endpoint, XdsError> {
        istiod::Target {
            address: self.address.clone(),
            root_cert: self.root_cert.clone(),
            server_name: self.server_name.clone(),
        }
        .endpoint("xDS")
    }
}

/// Runs the session until the process ends: connect, stream, and on any failure back off and
/// resume. `apply` receives every update (the valid part of each response); `status` follows
/// the session: synced once every type has had its first answer, and the resources refused.
pub async fn run(
    config: XdsConfig,
    endpoint: Endpoint,
    apply: impl Fn(Update),
    ready: watch::Sender<XdsStatus>,
    metrics: Arc<Metrics>,
) {
    let mut session = Session::new(config.node(), &config.trust_domain);
    let mut backoff = Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF);
    loop {
        let mut answered = false;
        let result = stream(
            &config,
            &endpoint,
            &mut session,
            &apply,
            &ready,
            &mut answered,
            &metrics,
        )
        .await;
        metrics.xds_connected(false);
        if answered {
            backoff.reset();
        }
        match result {
            Ok(()) => {
                tracing::warn!(address = %config.address, "xDS stream closed by the control plane; reconnecting")
            }
            Err(error) => {
                tracing::warn!(address = %config.address, %error, "xDS stream failed; reconnecting")
            }
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

async fn stream(
    config: &XdsConfig,
    endpoint: &Endpoint,
    session: &mut Session,
    apply: &impl Fn(Update),
    ready: &watch::Sender<XdsStatus>,
    answered: &mut bool,
    metrics: &Metrics,
) -> Result<(), String> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {}", error_chain(&e)))?;
    let (requests, outgoing) = mpsc::channel(8);
    for request in session.initial_requests() {
        requests
            .send(request)
            .await
            .map_err(|_| "request channel closed")?;
    }
    let mut metadata = tonic::metadata::MetadataMap::new();
    istiod::authenticate(
        &mut metadata,
        config.token_file.as_deref(),
        &config.cluster_id,
    )?;
    let mut channel = channel;
    let mut responses = ads::open(&mut channel, metadata, outgoing, MAX_RESPONSE)
        .await
        .map_err(|status| format!("open stream: {}", status.message()))?;
    tracing::info!(address = %config.address, "xDS stream open");
    metrics.xds_connected(true);
    loop {
        let response = match responses.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return Ok(()),
            Err(status) => return Err(format!("{:?}: {}", status.code(), status.message())),
        };
        *answered = true;
        let type_url = response.type_url.clone();
        let was_synced = session.synced();
        let handled = session.handle(response);
        let (applied, removed) = (handled.applied, handled.removed);
        if let Some(reason) = &handled.refused {
            metrics.xds_update(&type_url, false);
            tracing::warn!(type_url, %reason, "xDS response rejected (NACK); the previous state stays in force");
        } else {
            apply(handled.update);
            metrics.xds_update(&type_url, handled.rejected.is_empty());
            if handled.rejected.is_empty() {
                tracing::info!(type_url, changed = applied, removed, "xDS update applied");
            } else {
                tracing::info!(
                    type_url,
                    changed = applied,
                    removed,
                    rejected = handled.rejected.len(),
                    "xDS update applied"
                );
            }
            for rejected in &handled.rejected {
                tracing::warn!(
                    type_url,
                    resource = %rejected.name,
                    version = %rejected.version,
                    error = %rejected.error,
                    "xDS resource rejected (NACK); its last good version stays in force"
                );
            }
        }
        requests
            .send(handled.reply)
            .await
            .map_err(|_| "request channel closed")?;
        let status = session.status();
        let type_name = type_url.rsplit('/').next().unwrap_or(&type_url);
        metrics.xds_rejected(
            type_name,
            handled.rejected.len(),
            status
                .rejected
                .iter()
                .filter(|r| r.type_name == type_name)
                .map(|r| r.name.as_str()),
        );
        if status.synced && !was_synced {
            let (addresses, policies) = session.counts();
            tracing::info!(
                addresses,
                policies,
                rejected = status.rejected.len(),
                "xDS synced: first answer for every type"
            );
        }
        ready.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}
