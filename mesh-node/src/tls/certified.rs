//! A workload certificate loaded into rustls.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use rustls::{ClientConfig, RootCertStore, ServerConfig, sign::CertifiedKey};

use crate::identity::{Identity, San, WorkloadCert};

/// Client configurations kept per certificate for session resumption; past this many distinct
/// peer identity sets the cache starts over.
const RESUMING_CLIENTS: usize = 64;

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
    /// Client configurations by the identities they accept, kept so that their TLS session
    /// caches live on (see [`Certified::resuming_client`]); gone with the certificate.
    resuming: Mutex<HashMap<Vec<San>, Arc<ClientConfig>>>,
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
            resuming: Mutex::default(),
        }
    }

    /// The client configuration accepting `expected`, the same one each time (made with
    /// `make` the first time), so that a new connection to a peer it reached before resumes
    /// that TLS session instead of a full handshake. For connections that are never pooled
    /// (double HBONE's inner layer), where each would otherwise pay a full handshake.
    pub fn resuming_client<E>(
        &self,
        mut expected: Vec<San>,
        make: impl FnOnce(Vec<San>) -> Result<Arc<ClientConfig>, E>,
    ) -> Result<Arc<ClientConfig>, E> {
        expected.sort();
        expected.dedup();
        let mut cache = self.resuming.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(config) = cache.get(&expected) {
            return Ok(config.clone());
        }
        if cache.len() >= RESUMING_CLIENTS {
            cache.clear();
        }
        let config = make(expected.clone())?;
        cache.insert(expected, config.clone());
        Ok(config)
    }

    pub(crate) fn is_valid(&self) -> bool {
        SystemTime::now() < self.not_after
    }
}
