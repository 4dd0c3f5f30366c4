//! Certificates of the identities this node serves: fetched when a pod is enrolled (so its
//! first connection does not wait), renewed at half-life, retried with capped backoff while the
//! old certificate stays in use until it expires, with a bound on concurrent fetches.
//!
//! Each tracked identity has one worker task on the control runtime that owns its fetches;
//! connections read the latest result from a watch channel and never call the CA themselves.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use tokio::{
    runtime::Handle,
    sync::{Semaphore, watch},
    task::JoinHandle,
};

use crate::{
    identity::{CertError, CertSource, Identity},
    istiod::Backoff,
    tls::{Certified, Tls},
};

/// Limits of the certificate manager.
/// One identity's certificate as the admin endpoints show it (never the key).
#[derive(Clone, Debug)]
pub struct CertStatus {
    pub identity: Identity,
    /// An enrolled pod needs it (not only fetched for one connection).
    pub tracked: bool,
    pub not_after: Option<SystemTime>,
    pub valid: bool,
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug)]
pub struct CertSettings {
    /// Fetches in flight at once, over all identities.
    pub max_concurrent_fetches: usize,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long a connection waits for an identity's first fetch to finish.
    pub first_fetch_wait: Duration,
}

impl Default for CertSettings {
    fn default() -> Self {
        Self {
            max_concurrent_fetches: 8,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            first_fetch_wait: Duration::from_secs(15),
        }
    }
}

/// What an identity's worker has to say.
#[derive(Clone, Debug, Default)]
struct Slot {
    cert: Option<Arc<Certified>>,
    /// The last attempt's error, if it failed.
    error: Option<String>,
    attempts: u64,
}

struct Entry {
    /// Enrolled pods with this identity; the worker stops when the last one leaves.
    users: usize,
    slot: watch::Receiver<Slot>,
    worker: JoinHandle<()>,
}

/// Hands out the certificate of each identity this node serves.
pub struct CertManager {
    source: Arc<dyn CertSource>,
    tls: Arc<Tls>,
    runtime: Handle,
    permits: Arc<Semaphore>,
    settings: CertSettings,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl CertManager {
    /// Workers run on `runtime` (the control runtime), so CA work never queues behind the
    /// data path.
    pub fn new(
        source: Arc<dyn CertSource>,
        tls: Arc<Tls>,
        runtime: Handle,
        settings: CertSettings,
    ) -> Self {
        Self {
            source,
            tls,
            runtime,
            permits: Arc::new(Semaphore::new(settings.max_concurrent_fetches.max(1))),
            settings,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn tls(&self) -> &Arc<Tls> {
        &self.tls
    }

    /// A pod with `identity` was enrolled: fetch its certificate now and keep it renewed.
    pub fn track(&self, identity: &Identity) {
        self.entry(identity, 1);
    }

    /// A pod with `identity` left; the last one stops the renewals and drops the certificate.
    pub fn untrack(&self, identity: &Identity) {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(identity) {
            entry.users = entry.users.saturating_sub(1);
            if entry.users == 0 {
                entry.worker.abort();
                entries.remove(identity);
                tracing::info!(identity = %identity, "workload certificate released");
            }
        }
    }

    /// Identities with a worker.
    /// Every identity the manager holds or fetches, with its certificate's expiry and the last
    /// error. `tracked` is false for identities only fetched on demand (not enrolled here).
    pub fn snapshot(&self) -> Vec<CertStatus> {
        let mut statuses: Vec<CertStatus> = self
            .lock()
            .iter()
            .map(|(identity, entry)| {
                let slot = entry.slot.borrow();
                CertStatus {
                    identity: identity.clone(),
                    tracked: entry.users > 0,
                    not_after: slot.cert.as_ref().map(|cert| cert.not_after),
                    valid: slot.cert.as_ref().is_some_and(|cert| cert.is_valid()),
                    error: slot.error.clone(),
                }
            })
            .collect();
        statuses.sort_by(|a, b| a.identity.cmp(&b.identity));
        statuses
    }

    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    /// The current certificate for `identity`. An identity nobody enrolled is tracked from
    /// now on. Waits only for an identity's first fetch; after a failed attempt with no valid
    /// certificate in hand, returns that failure at once (the worker keeps retrying).
    pub async fn get(&self, identity: &Identity) -> Result<Arc<Certified>, CertError> {
        let mut slot = self.entry(identity, 0);
        let settled = |s: &Slot| s.cert.as_ref().is_some_and(|c| c.is_valid()) || s.attempts > 0;
        let waited = tokio::time::timeout(self.settings.first_fetch_wait, slot.wait_for(settled));
        let fail = |reason: String| CertError::Issue {
            identity: identity.to_string(),
            reason,
        };
        let current = match waited.await {
            Ok(Ok(current)) => current.clone(),
            Ok(Err(_)) => return Err(fail("certificate worker stopped".into())),
            Err(_) => {
                return Err(fail(format!(
                    "no answer from the CA within {:?}",
                    self.settings.first_fetch_wait
                )));
            }
        };
        match current {
            Slot {
                cert: Some(cert), ..
            } if cert.is_valid() => Ok(cert),
            Slot {
                error: Some(error), ..
            } => Err(fail(error)),
            _ => Err(fail("certificate expired and not yet renewed".into())),
        }
    }

    /// The entry of `identity`, created (with its worker) if absent; `users` more users.
    fn entry(&self, identity: &Identity, users: usize) -> watch::Receiver<Slot> {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(identity) {
            entry.users += users;
            return entry.slot.clone();
        }
        let (tx, rx) = watch::channel(Slot::default());
        let worker = Worker {
            identity: identity.clone(),
            source: self.source.clone(),
            tls: self.tls.clone(),
            permits: self.permits.clone(),
            backoff: Backoff::new(self.settings.initial_backoff, self.settings.max_backoff),
            slot: tx,
        };
        let worker = self.runtime.spawn(worker.run());
        entries.insert(
            identity.clone(),
            Entry {
                users,
                slot: rx.clone(),
                worker,
            },
        );
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        for entry in self.lock().values() {
            entry.worker.abort();
        }
    }
}

/// Fetches and renews one identity's certificate for as long as it is tracked.
struct Worker {
    identity: Identity,
    source: Arc<dyn CertSource>,
    tls: Arc<Tls>,
    permits: Arc<Semaphore>,
    backoff: Backoff,
    slot: watch::Sender<Slot>,
}

impl Worker {
    async fn run(mut self) {
        loop {
            let fetched = {
                let Ok(_permit) = self.permits.acquire().await else {
                    return;
                };
                match self.source.fetch(&self.identity).await {
                    Ok(cert) => self.tls.certified(&cert),
                    Err(error) => Err(error),
                }
            };
            let wait = match fetched {
                Ok(certified) => {
                    let certified = Arc::new(certified);
                    tracing::info!(
                        identity = %self.identity,
                        expires_in_s = until(certified.not_after).as_secs(),
                        "workload certificate issued"
                    );
                    let wait = until(certified.refresh_at);
                    self.slot.send_modify(|slot| {
                        slot.cert = Some(certified);
                        slot.error = None;
                        slot.attempts += 1;
                    });
                    self.backoff.reset();
                    wait
                }
                Err(error) => {
                    let wait = self.backoff.next_wait();
                    let kept = self
                        .slot
                        .borrow()
                        .cert
                        .as_ref()
                        .filter(|cert| cert.is_valid())
                        .map(|cert| until(cert.not_after));
                    match kept {
                        Some(left) => tracing::warn!(
                            identity = %self.identity, %error, retry_in_ms = wait.as_millis() as u64,
                            expires_in_s = left.as_secs(),
                            "certificate renewal failed; the current certificate stays in use until it expires"
                        ),
                        None => tracing::warn!(
                            identity = %self.identity, %error, retry_in_ms = wait.as_millis() as u64,
                            "certificate fetch failed; connections of this identity fail until it succeeds"
                        ),
                    }
                    self.slot.send_modify(|slot| {
                        slot.error = Some(error.to_string());
                        slot.attempts += 1;
                    });
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

fn until(time: SystemTime) -> Duration {
    time.duration_since(SystemTime::now()).unwrap_or_default()
}

#[cfg(test)]
mod tests;
