//! istiod's CA as a [`CertSource`]: `istio.v1.auth.IstioCertificateService/CreateCertificate`
//! over TLS, with a fresh ECDSA P-256 key and a CSR whose one URI SAN is the workload's
//! identity. mesh-node asks on behalf of the workloads it hosts (`ImpersonatedIdentity`),
//! authenticated as itself by its service-account token, as ztunnel does.
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use prost_types::{Struct, Value, value::Kind};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use tonic::{Request, transport::Channel};

use super::{CertError, CertFuture, CertSource, Identity, WorkloadCert, san};
use crate::{
    error_chain,
    istiod::{self, EndpointError},
    proto::ca::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    },
};

/// One CreateCertificate call may take this long before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach istiod's CA and what to ask it for.
#[derive(Clone, Debug)]
pub struct IstioCaConfig {
    pub target: istiod::Target,
    /// mesh-node's own service-account token (audience `istio-ca`), re-read on every call.
    pub token_file: Option<PathBuf>,
    pub cluster_id: String,
    /// Requested certificate lifetime; istiod may grant less.
    pub ttl: Duration,
}

/// The CA client. Cheap to clone: the channel is shared.
#[derive(Clone)]
pub struct IstioCa {
    address: String,
    client: IstioCertificateServiceClient<Channel>,
    roots: Vec<CertificateDer<'static>>,
    token_file: Option<PathBuf>,
    cluster_id: String,
    ttl: Duration,
}

impl std::fmt::Debug for IstioCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCa")
            .field("cluster_id", &self.cluster_id)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl IstioCa {
    /// Checks the root file and address; connects lazily, so an unreachable CA is not an error
    /// here. Must run inside the tokio runtime that will make the calls.
    pub fn new(config: IstioCaConfig) -> Result<Self, EndpointError> {
        let endpoint = config.target.endpoint("CA")?;
        let roots = read_roots(&config.target.root_cert)?;
        Ok(Self {
            address: config.target.address,
            client: IstioCertificateServiceClient::new(endpoint.connect_lazy()),
            roots,
            token_file: config.token_file,
            cluster_id: config.cluster_id,
            ttl: config.ttl,
        })
    }

    async fn create(&self, identity: &Identity) -> Result<WorkloadCert, String> {
        let key = KeyPair::generate().map_err(|e| format!("generate key: {e}"))?;
        let csr = csr(identity, &key)?;
        let mut request = Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(Struct {
                fields: [(
                    "ImpersonatedIdentity".to_owned(),
                    Value {
                        kind: Some(Kind::StringValue(identity.to_string())),
                    },
                )]
                .into(),
            }),
        });
        request.set_timeout(CALL_TIMEOUT);
        istiod::authenticate(
            request.metadata_mut(),
            self.token_file.as_deref(),
            &self.cluster_id,
        )?;
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|status| describe_status(&status))?
            .into_inner();
        let chain = parse_chain(&response.cert_chain)?;
        let leaf = chain.first().ok_or("the CA answered with an empty chain")?;
        let got = san::identity_of(leaf).map_err(|e| format!("issued certificate: {e}"))?;
        if &got != identity {
            return Err(format!("the CA issued a certificate for {got}"));
        }
        let (not_before, not_after) =
            validity(leaf).ok_or("issued certificate: unreadable validity")?;
        // The chain as presented: leaf and intermediates, without the roots peers already have.
        let chain: Vec<_> = chain
            .into_iter()
            .filter(|cert| !self.roots.contains(cert))
            .collect();
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots: self.roots.clone(),
            not_before,
            not_after,
        })
    }
}

impl CertSource for IstioCa {
    fn fetch<'a>(&'a self, identity: &'a Identity) -> CertFuture<'a> {
        Box::pin(async move {
            self.create(identity)
                .await
                .map_err(|reason| CertError::Issue {
                    identity: identity.to_string(),
                    reason: format!("istiod CA at {}: {reason}", self.address),
                })
        })
    }
}

/// A PEM CSR with an empty subject and one URI SAN, as istiod requires.
fn csr(identity: &Identity, key: &KeyPair) -> Result<String, String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| format!("identity as a URI SAN: {e}"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("build CSR: {e}"))
}

/// `cert_chain` entries are PEM; one entry may hold several certificates.
fn parse_chain(entries: &[String]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut chain = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let before = chain.len();
        for cert in CertificateDer::pem_slice_iter(entry.as_bytes()) {
            chain.push(cert.map_err(|e| format!("cert_chain[{i}]: not PEM: {e}"))?);
        }
        if chain.len() == before {
            return Err(format!("cert_chain[{i}]: no PEM certificate in it"));
        }
    }
    Ok(chain)
}

fn validity(cert: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    };
    Some((
        at(parsed.validity().not_before)?,
        at(parsed.validity().not_after)?,
    ))
}

fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, EndpointError> {
    let invalid = |message: String| EndpointError::RootCertInvalid {
        what: "CA",
        path: path.to_owned(),
        message,
    };
    let pem = std::fs::read(path).map_err(|io_error| EndpointError::RootCert {
        what: "CA",
        path: path.to_owned(),
        io_error,
    })?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not a PEM certificate: {e}")))
}

/// A gRPC failure in one line: the code, the message, and a transport cause if any.
fn describe_status(status: &tonic::Status) -> String {
    let (code, message) = (status.code(), status.message());
    match std::error::Error::source(status).map(error_chain) {
        Some(cause) if cause.contains(message) => format!("{code:?}: {cause}"),
        Some(cause) => format!("{code:?}: {message}: {cause}"),
        None => format!("{code:?}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csr_carries_exactly_the_identity_and_the_chain_parser_names_bad_entries() {
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let key = KeyPair::generate().unwrap();
        let pem = csr(&id, &key).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        match parsed.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => assert_eq!(uri.as_str(), "spiffe://cluster.local/ns/ns1/sa/sa1"),
            other => panic!("SANs {other:?}"),
        }
        assert!(parsed.params.distinguished_name.iter().next().is_none());

        // A CA signs it; the chain parser reads the leaf and the root out of two entries.
        let ca = super::super::file_ca::FileCa::generate("cluster.local", Duration::from_secs(60))
            .unwrap();
        let signed = ca.sign_csr(&pem, &id, Duration::from_secs(60)).unwrap();
        let chain = parse_chain(&signed).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(san::identity_of(&chain[0]).unwrap(), id);
        let (not_before, not_after) = validity(&chain[0]).unwrap();
        assert!(not_after > not_before);

        let error = parse_chain(&[signed[0].clone(), "garbage".into()]).unwrap_err();
        assert_eq!(error, "cert_chain[1]: no PEM certificate in it");
        // The CA refuses a CSR for another identity.
        let other = Identity::new("cluster.local", "ns1", "intruder");
        assert!(ca.sign_csr(&pem, &other, Duration::from_secs(60)).is_err());
    }
}
