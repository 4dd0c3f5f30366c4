//! The delta-ADS client: one gRPC stream to istiod (`DeltaAggregatedResources`) over TLS, with
//! the bearer token and cluster id istiod expects, reconnecting with jittered backoff. The
//! protocol decisions live in [`Session`]; this file only moves messages.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use prost_types::{Struct, Value, value::Kind};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, ClientTlsConfig, Endpoint},
};

use crate::error_chain;

use super::{
    proto::discovery::{
        Node, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    session::{Session, Update},
};

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

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("read xDS root certificate {path}: {io_error}")]
    RootCert {
        path: PathBuf,
        io_error: std::io::Error,
    },
    #[error("xDS root certificate {path}: {message}")]
    RootCertInvalid { path: PathBuf, message: String },
    #[error("xDS address {address:?}: {message}")]
    Address { address: String, message: String },
}

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
        let pem = std::fs::read(&self.root_cert).map_err(|io_error| XdsError::RootCert {
            path: self.root_cert.clone(),
            io_error,
        })?;
        check_pem(&pem).map_err(|message| XdsError::RootCertInvalid {
            path: self.root_cert.clone(),
            message,
        })?;
        let bad = |message: String| XdsError::Address {
            address: self.address.clone(),
            message,
        };
        let host = match self.address.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host.trim_matches(['[', ']']),
            _ => return Err(bad("expected host:port".into())),
        };
        let name = self.server_name.clone().unwrap_or_else(|| host.to_owned());
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(name);
        Endpoint::from_shared(format!("https://{}", self.address))
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| bad(e.to_string()))
            .map(|e| {
                e.connect_timeout(Duration::from_secs(5))
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10))
            })
    }
}

/// Runs the session until the process ends: connect, stream, and on any failure back off and
/// resume. `apply` receives every accepted update; `ready` turns true once every type has had
/// its first answer.
pub async fn run(
    config: XdsConfig,
    endpoint: Endpoint,
    apply: impl Fn(Update),
    ready: watch::Sender<bool>,
) {
    let mut session = Session::new(config.node(), &config.trust_domain);
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let mut answered = false;
        let result = stream(
            &config,
            &endpoint,
            &mut session,
            &apply,
            &ready,
            &mut answered,
        )
        .await;
        if answered {
            backoff = INITIAL_BACKOFF;
        }
        match result {
            Ok(()) => {
                tracing::warn!(address = %config.address, "xDS stream closed by the control plane; reconnecting")
            }
            Err(error) => {
                tracing::warn!(address = %config.address, %error, "xDS stream failed; reconnecting")
            }
        }
        // Full jitter between half and all of the current backoff, so a fleet of nodes does
        // not reconnect in step after a control-plane restart.
        let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn stream(
    config: &XdsConfig,
    endpoint: &Endpoint,
    session: &mut Session,
    apply: &impl Fn(Update),
    ready: &watch::Sender<bool>,
    answered: &mut bool,
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
    let mut request = Request::new(ReceiverStream::new(outgoing));
    let metadata = request.metadata_mut();
    if let Some(path) = &config.token_file {
        let token = read_token(path)?;
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| format!("token file {}: not a valid header value", path.display()))?;
        metadata.insert("authorization", value);
    }
    let cluster = MetadataValue::try_from(config.cluster_id.as_str()).map_err(|_| {
        format!(
            "cluster id {:?}: not a valid header value",
            config.cluster_id
        )
    })?;
    metadata.insert("clusterid", cluster);

    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let mut responses = client
        .delta_aggregated_resources(request)
        .await
        .map_err(|status| format!("open stream: {}", status.message()))?
        .into_inner();
    tracing::info!(address = %config.address, "xDS stream open");
    loop {
        let response = match responses.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return Ok(()),
            Err(status) => return Err(format!("{:?}: {}", status.code(), status.message())),
        };
        *answered = true;
        let type_url = response.type_url.clone();
        let (changed, removed) = (response.resources.len(), response.removed_resources.len());
        let handled = session.handle(response);
        match (handled.update, handled.rejected) {
            (Some(update), _) => {
                apply(update);
                tracing::info!(type_url, changed, removed, "xDS update applied");
            }
            (None, Some(reason)) => {
                tracing::warn!(type_url, %reason, "xDS response rejected (NACK); the previous state stays in force");
            }
            (None, None) => {}
        }
        requests
            .send(handled.reply)
            .await
            .map_err(|_| "request channel closed")?;
        if session.synced() && !*ready.borrow() {
            let (addresses, policies) = session.counts();
            tracing::info!(
                addresses,
                policies,
                "xDS synced: first answer for every type"
            );
            ready.send_replace(true);
        }
    }
}

fn read_token(path: &Path) -> Result<String, String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("read token file {}: {e}", path.display()))?;
    Ok(token.trim().to_owned())
}

/// Refuses a root file that holds no certificate or a broken one, at start rather than at
/// every connect attempt.
fn check_pem(pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| format!("not a PEM certificate: {e}"))?;
        count += 1;
    }
    if count == 0 {
        return Err("no PEM certificate in it".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_file_without_a_certificate_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("xds-root-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root-cert.pem");
        std::fs::write(&root, "hello\n").unwrap();
        let config = XdsConfig {
            address: "istiod.istio-system.svc:15012".into(),
            root_cert: root.clone(),
            server_name: None,
            token_file: None,
            cluster_id: "c".into(),
            pod_name: "p".into(),
            pod_namespace: "n".into(),
            node_name: String::new(),
            instance_ips: vec![],
            trust_domain: "cluster.local".into(),
        };
        let error = config.endpoint().unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "xDS root certificate {}: no PEM certificate in it",
                root.display()
            )
        );
        std::fs::write(
            &root,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(
            config
                .endpoint()
                .unwrap_err()
                .to_string()
                .contains("not a PEM certificate")
        );
        let missing = XdsConfig {
            root_cert: dir.join("absent.pem"),
            ..config
        };
        assert!(
            missing
                .endpoint()
                .unwrap_err()
                .to_string()
                .starts_with("read xDS root certificate")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
