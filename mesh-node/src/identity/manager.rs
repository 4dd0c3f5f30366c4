//! Per-identity certificate cache with renewal at half-life.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use rustls::{RootCertStore, ServerConfig, sign::CertifiedKey};

use super::{CertError, CertSource, Identity, WorkloadCert};
use crate::tls::Tls;

/// A workload certificate made ready for rustls: the signing key, the roots, and the HBONE
/// server configuration that presents it.
#[derive(Debug)]
pub struct Certified {
    pub identity: Identity,
    pub key: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    pub server_config: Arc<ServerConfig>,
    pub not_after: SystemTime,
    refresh_at: SystemTime,
}

impl Certified {
    pub(crate) fn new(
        cert: &WorkloadCert,
        key: Arc<CertifiedKey>,
        roots: Arc<RootCertStore>,
        server_config: Arc<ServerConfig>,
    ) -> Self {
        let lifetime = cert
            .not_after
            .duration_since(cert.not_before)
            .unwrap_or_default();
        Self {
            identity: cert.identity.clone(),
            key,
            roots,
            server_config,
            not_after: cert.not_after,
            refresh_at: cert.not_before + lifetime / 2,
        }
    }
}

/// Hands out the certificate of each identity this node serves, fetching and renewing on demand.
pub struct CertManager {
    source: Arc<dyn CertSource>,
    tls: Arc<Tls>,
    cache: Mutex<HashMap<Identity, Arc<Certified>>>,
    /// One fetch at a time: concurrent first connections of a pod share one certificate.
    fetching: tokio::sync::Mutex<()>,
}

impl CertManager {
    pub fn new(source: Arc<dyn CertSource>, tls: Arc<Tls>) -> Self {
        Self {
            source,
            tls,
            cache: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    pub fn tls(&self) -> &Arc<Tls> {
        &self.tls
    }

    /// The current certificate for `identity`. Past half-life a new one is fetched; if that
    /// fails, the old one is used until it expires.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<Certified>, CertError> {
        if let Some(fresh) = self.fresh(identity) {
            return Ok(fresh);
        }
        let _fetching = self.fetching.lock().await;
        if let Some(fresh) = self.fresh(identity) {
            return Ok(fresh);
        }
        let fetched = match self.source.fetch(identity).await {
            Ok(cert) => self.tls.certified(&cert),
            Err(error) => Err(error),
        };
        match fetched {
            Ok(certified) => {
                let certified = Arc::new(certified);
                tracing::info!(
                    identity = %identity,
                    expires_in_s = certified
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .as_secs(),
                    "workload certificate issued"
                );
                self.lock().insert(identity.clone(), certified.clone());
                Ok(certified)
            }
            Err(error) => match self.lock().get(identity).cloned() {
                Some(old) if SystemTime::now() < old.not_after => {
                    tracing::warn!(identity = %identity, %error, "certificate renewal failed; keeping the current one until it expires");
                    Ok(old)
                }
                _ => Err(error),
            },
        }
    }

    fn fresh(&self, identity: &Identity) -> Option<Arc<Certified>> {
        self.lock()
            .get(identity)
            .filter(|certified| SystemTime::now() < certified.refresh_at)
            .cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Arc<Certified>>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
