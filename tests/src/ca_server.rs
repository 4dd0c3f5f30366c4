//! A small CA for tests: istiod's `IstioCertificateService/CreateCertificate` over TLS inside a
//! node's namespace, signing with the topology's mesh root. Like istiod, it requires the bearer
//! token and signs the identity named in `ImpersonatedIdentity` only if the CSR asks for exactly
//! it. It records what it was asked, and can start late, stop and resume.
use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Result;
use mesh_node::{
    identity::{Identity, file_ca::FileCa},
    xds::proto::ca::{
        IstioCertificateRequest, IstioCertificateResponse,
        istio_certificate_service_server::{
            IstioCertificateService, IstioCertificateServiceServer,
        },
    },
};
use prost_types::value::Kind;
use tonic::{Request, Response, Status};

use crate::{
    Topology,
    control_plane::{TOKEN, token_file},
    netns_server::{NetnsServer, SERVER_NAME, Serve},
};

/// What clients asked the CA.
#[derive(Clone, Debug, Default)]
pub struct CaSeen {
    /// SPIFFE IDs signed, in order.
    pub issued: Vec<String>,
    /// Refusals, with their reasons.
    pub refused: Vec<String>,
    pub cluster_ids: Vec<String>,
    /// Requested lifetimes, in seconds.
    pub requested_ttls: Vec<i64>,
}

struct Signer {
    ca: FileCa,
    ttl: Duration,
    seen: Mutex<CaSeen>,
}

pub struct TestCa {
    signer: Arc<Signer>,
    server: NetnsServer,
}

impl TestCa {
    /// Serves on `addr` in `netns`, issuing certificates that live `ttl` whatever the client
    /// asks for (as istiod caps lifetimes).
    pub fn start(netns: &Path, addr: SocketAddr, ca_dir: &Path, ttl: Duration) -> Result<Self> {
        let mut ca = Self::stopped(netns, addr, ca_dir, ttl)?;
        ca.resume()?;
        Ok(ca)
    }

    /// Ready to serve on `addr` but not listening: clients find the CA unreachable until
    /// [`Self::resume`].
    pub fn stopped(netns: &Path, addr: SocketAddr, ca_dir: &Path, ttl: Duration) -> Result<Self> {
        let signer = Arc::new(Signer {
            ca: FileCa::load(ca_dir, ttl)?,
            ttl,
            seen: Mutex::new(CaSeen::default()),
        });
        let service = signer.clone();
        let serve: Serve = Arc::new(move |server, incoming| {
            let service = IstioCertificateServiceServer::new(Service(service.clone()));
            Box::pin(async move {
                let _ = server.clone().serve_with_incoming(service, incoming).await;
            })
        });
        Ok(Self {
            signer,
            server: NetnsServer::stopped(netns, addr, ca_dir, serve)?,
        })
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }

    pub fn resume(&mut self) -> Result<()> {
        self.server.resume()
    }

    pub fn seen(&self) -> CaSeen {
        self.signer.seen().clone()
    }

    /// `mesh-node run` arguments that take workload certificates from this CA.
    pub fn client_args(&self, topo: &Topology) -> Vec<String> {
        let token = token_file(topo);
        [
            "--ca-address",
            &self.server.addr().to_string(),
            "--ca-root-cert",
            &topo.ca_dir().join("root-cert.pem").display().to_string(),
            "--ca-server-name",
            SERVER_NAME,
            "--xds-token-file",
            &token.display().to_string(),
            "--cluster-id",
            "cluster1",
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

impl Signer {
    fn seen(&self) -> std::sync::MutexGuard<'_, CaSeen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sign(&self, request: &Request<IstioCertificateRequest>) -> Result<Vec<String>, Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        if header("authorization") != format!("Bearer {TOKEN}") {
            return Err(Status::unauthenticated("missing or wrong bearer token"));
        }
        let body = request.get_ref();
        let impersonated = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| Status::invalid_argument("no ImpersonatedIdentity"))?;
        let identity: Identity = impersonated
            .parse()
            .map_err(|e| Status::invalid_argument(format!("ImpersonatedIdentity: {e}")))?;
        let chain = self
            .ca
            .sign_csr(&body.csr, &identity, self.ttl)
            .map_err(Status::invalid_argument)?;
        let mut seen = self.seen();
        seen.issued.push(impersonated);
        seen.cluster_ids.push(header("clusterid"));
        seen.requested_ttls.push(body.validity_duration);
        Ok(chain)
    }
}

struct Service(Arc<Signer>);

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        match self.0.sign(&request) {
            Ok(cert_chain) => Ok(Response::new(IstioCertificateResponse { cert_chain })),
            Err(status) => {
                self.0.seen().refused.push(status.message().to_owned());
                Err(status)
            }
        }
    }
}
