//! Certificate verifiers that check SPIFFE identities instead of DNS names.
use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use crate::identity::{Identity, San, san};

/// The peer presented a valid certificate for the wrong workload.
#[derive(Debug, thiserror::Error)]
#[error("peer identity {presented} is not one of the expected identities [{}]", expected_list(.expected))]
pub struct IdentityMismatch {
    pub presented: String,
    pub expected: Vec<San>,
}

fn expected_list(expected: &[San]) -> String {
    expected
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn other(error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// Client side: the server's chain must reach the mesh roots and its certificate must carry
/// one of the names the destination is expected to have: its one URI SAN one of the expected
/// workload identities, or any of its URI or DNS SANs equal to an expected non-SPIFFE name (a
/// ServiceEntry's `subjectAltNames`). The server name is not consulted (HBONE dials IP
/// addresses and sends no SNI).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: Vec<San>,
}

impl SpiffeServerVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        expected: Vec<San>,
    ) -> Self {
        Self {
            roots,
            provider,
            expected,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let identity = san::identity_of(end_entity);
        if let Ok(identity) = &identity
            && self.expected.contains(&San::Identity(identity.clone()))
        {
            return Ok(ServerCertVerified::assertion());
        }
        let names = san::names(end_entity).map_err(other)?;
        let named = self.expected.iter().any(|expected| match expected {
            San::Other(want) => names.iter().any(|(_, name)| name == want),
            San::Identity(_) => false,
        });
        if named {
            return Ok(ServerCertVerified::assertion());
        }
        let presented = match identity {
            Ok(identity) => identity.to_string(),
            Err(_) if !names.is_empty() => names
                .into_iter()
                .map(|(_, name)| name)
                .collect::<Vec<_>>()
                .join(", "),
            Err(error) => return Err(other(error)),
        };
        Err(other(IdentityMismatch {
            presented,
            expected: self.expected.clone(),
        }))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The configurations allow TLS 1.3 only; rustls never gets here.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side: a client certificate is required, must reach the mesh roots, and must name a
/// workload of our trust domain. Which workloads may connect is policy's business, later.
#[derive(Debug)]
pub struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

/// The client's workload is in another trust domain.
#[derive(Debug, thiserror::Error)]
#[error("client identity {presented} is outside trust domain {trust_domain}")]
pub struct ForeignTrustDomain {
    pub presented: Identity,
    pub trust_domain: String,
}

impl TrustDomainClientVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        trust_domain: &str,
    ) -> Result<Self, Error> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|error| Error::General(format!("client verifier: {error}")))?;
        Ok(Self {
            inner,
            trust_domain: trust_domain.to_owned(),
        })
    }
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would only grow every CertificateRequest; clients have one certificate.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = san::identity_of(end_entity).map_err(other)?;
        if presented.trust_domain != self.trust_domain {
            return Err(other(ForeignTrustDomain {
                presented,
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
