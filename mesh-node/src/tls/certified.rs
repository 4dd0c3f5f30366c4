//! A workload certificate loaded into rustls.
use std::{sync::Arc, time::SystemTime};

use rustls::{RootCertStore, ServerConfig, sign::CertifiedKey};

use crate::identity::{Identity, WorkloadCert};

/// A workload certificate made ready for rustls: the signing key, the roots, and the HBONE
/// server configuration that presents it.
#[derive(Debug)]
pub struct Certified {
    pub identity: Identity,
    pub key: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    pub server_config: Arc<ServerConfig>,
    pub not_after: SystemTime,
    /// When the manager fetches its successor: half of the lifetime left at arrival.
    pub(crate) refresh_at: SystemTime,
}

impl Certified {
    pub(crate) fn new(
        cert: &WorkloadCert,
        key: Arc<CertifiedKey>,
        roots: Arc<RootCertStore>,
        server_config: Arc<ServerConfig>,
    ) -> Self {
        // Half of the lifetime that is left from now: CAs back-date `not_before` for clock
        // skew, which would otherwise put a short-lived certificate's half-life in the past.
        let start = cert.not_before.max(SystemTime::now());
        let left = cert.not_after.duration_since(start).unwrap_or_default();
        Self {
            identity: cert.identity.clone(),
            key,
            roots,
            server_config,
            not_after: cert.not_after,
            refresh_at: start + left / 2,
        }
    }

    pub(crate) fn is_valid(&self) -> bool {
        SystemTime::now() < self.not_after
    }
}
