//! Workload identities (SPIFFE IDs), their certificates, and where certificates come from.
//!
//! The proxy asks a [`CertManager`] for the certificate of an identity it serves; the manager
//! fetches it ahead of the first connection, keeps it, and renews it at half-life from a
//! [`CertSource`]: istiod's CA ([`istio_ca::IstioCa`]) or, standalone, the file-backed CA
//! ([`file_ca::FileCa`]).
pub mod file_ca;
pub mod istio_ca;
pub mod san;

use std::{fmt, future::Future, pin::Pin, str::FromStr, time::SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A workload identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            trust_domain,
            namespace,
            service_account,
        } = self;
        write!(
            f,
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{value:?} is not a workload SPIFFE ID (spiffe://<trust domain>/ns/<ns>/sa/<sa>): {reason}"
)]
pub struct ParseIdentityError {
    pub value: String,
    pub reason: &'static str,
}

impl FromStr for Identity {
    type Err = ParseIdentityError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let fail = |reason| ParseIdentityError {
            value: value.to_owned(),
            reason,
        };
        let rest = value
            .strip_prefix("spiffe://")
            .ok_or_else(|| fail("missing spiffe:// scheme"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service_account] = parts.as_slice() else {
            return Err(fail("path is not /ns/<ns>/sa/<sa>"));
        };
        if [trust_domain, namespace, service_account]
            .iter()
            .any(|part| part.is_empty())
        {
            return Err(fail("empty segment"));
        }
        if !is_valid_trust_domain(trust_domain) {
            return Err(fail(
                "trust domain may hold only a-z, 0-9, '.', '-' and '_'",
            ));
        }
        Ok(Self::new(trust_domain, namespace, service_account))
    }
}

/// A name a peer's certificate may be accepted under: a workload identity, or any other
/// subject-alt-name as a service lists it (istiod copies a ServiceEntry's `subjectAltNames` as
/// written, such as `api.example.com`), matched as written against the certificate's URI and
/// DNS SANs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum San {
    Identity(Identity),
    Other(String),
}

impl San {
    /// A SPIFFE workload ID becomes an identity; anything else stays a name.
    pub fn parse(value: &str) -> Self {
        value
            .parse()
            .map_or_else(|_| Self::Other(value.to_owned()), Self::Identity)
    }
}

impl From<Identity> for San {
    fn from(identity: Identity) -> Self {
        Self::Identity(identity)
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Identity(identity) => identity.fmt(f),
            Self::Other(name) => f.write_str(name),
        }
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl serde::Serialize for San {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// SPIFFE trust domains: lowercase letters, digits, dots, dashes and underscores.
pub fn is_valid_trust_domain(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A certificate chain (leaf first) with its private key and the roots that peers chain to.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("issue certificate for {identity}: {reason}")]
    Issue { identity: String, reason: String },
    /// rustls refused it (as described by `tls::describe`).
    #[error("certificate for {identity}: {reason}")]
    Tls { identity: String, reason: String },
}

/// Boxed so the manager can hold any source behind `dyn`.
pub type CertFuture<'a> =
    Pin<Box<dyn Future<Output = Result<WorkloadCert, CertError>> + Send + 'a>>;

/// Where workload certificates come from.
pub trait CertSource: Send + Sync {
    /// A fresh certificate for `identity`.
    fn fetch<'a>(&'a self, identity: &'a Identity) -> CertFuture<'a>;
}

#[cfg(test)]
mod tests;
