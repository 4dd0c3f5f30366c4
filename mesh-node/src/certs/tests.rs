//! The manager against a scripted source: prefetch on track, failures and recovery, the old
//! certificate kept when a renewal fails, and the bound on concurrent fetches.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use super::{CertManager, CertSettings};
use crate::{
    identity::{CertError, CertFuture, CertSource, Identity, file_ca::FileCa},
    tls::Tls,
};

/// Issues real certificates from an in-memory CA, after failing the calls `failing` says.
struct Scripted {
    ca: FileCa,
    ttl: Duration,
    delay: Duration,
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Call numbers (0-based) that fail.
    failing: Mutex<Vec<usize>>,
}

impl Scripted {
    fn new(ttl: Duration, delay: Duration, failing: Vec<usize>) -> Arc<Self> {
        Arc::new(Self {
            ca: FileCa::generate("cluster.local", ttl).unwrap(),
            ttl,
            delay,
            calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            failing: Mutex::new(failing),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl CertSource for Scripted {
    fn fetch<'a>(&'a self, identity: &'a Identity) -> CertFuture<'a> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if self.failing.lock().unwrap().contains(&call) {
                return Err(CertError::Issue {
                    identity: identity.to_string(),
                    reason: format!("scripted failure of call {call}"),
                });
            }
            self.ca.issue(identity, self.ttl)
        })
    }
}

fn manager(source: &Arc<Scripted>, settings: CertSettings) -> CertManager {
    CertManager::new(
        source.clone(),
        Arc::new(Tls::new("cluster.local")),
        tokio::runtime::Handle::current(),
        settings,
    )
}

fn fast() -> CertSettings {
    CertSettings {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(40),
        ..CertSettings::default()
    }
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "ns", sa)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_fetches_before_anyone_asks_and_untracking_releases() {
    let source = Scripted::new(Duration::from_secs(3600), Duration::ZERO, vec![]);
    let certs = manager(&source, fast());
    certs.track(&id("a"));
    eventually("the prefetch", || source.calls() == 1).await;
    let cert = certs.get(&id("a")).await.unwrap();
    assert_eq!(cert.identity, id("a"));
    assert_eq!(source.calls(), 1, "get used the prefetched certificate");
    certs.track(&id("a"));
    certs.untrack(&id("a"));
    assert_eq!(certs.tracked(), 1, "one pod still uses it");
    certs.untrack(&id("a"));
    assert_eq!(certs.tracked(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_fetch_is_reported_then_retried_until_it_succeeds() {
    let source = Scripted::new(Duration::from_secs(3600), Duration::ZERO, vec![0, 1]);
    let certs = manager(&source, fast());
    let error = certs.get(&id("a")).await.unwrap_err().to_string();
    assert!(error.contains("scripted failure"), "{error}");
    // The third call succeeds; until its certificate is in, `get` reports the last failure
    // (`calls()` counts a call when it starts, so it cannot tell when the certificate lands).
    let mut last_error = String::new();
    for _ in 0..500 {
        match certs.get(&id("a")).await {
            Ok(cert) => {
                assert_eq!(cert.identity, id("a"));
                assert_eq!(source.calls(), 3, "two failures, then one success");
                return;
            }
            Err(error) => last_error = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no certificate after retries; last error: {last_error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_keeps_the_current_certificate() {
    // 2 s certificates are renewed after about 1 s; every renewal fails.
    let source = Scripted::new(Duration::from_secs(2), Duration::ZERO, (1..1000).collect());
    let certs = manager(&source, fast());
    let first = certs.get(&id("a")).await.unwrap();
    eventually("failed renewals", || source.calls() >= 3).await;
    let still = certs.get(&id("a")).await.unwrap();
    assert!(Arc::ptr_eq(&first, &still));
    // Once it expires, connections get the error instead.
    eventually("expiry", || {
        std::time::SystemTime::now() > first.not_after + Duration::from_millis(100)
    })
    .await;
    let error = certs.get(&id("a")).await.unwrap_err().to_string();
    assert!(error.contains("scripted failure"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_are_bounded() {
    let source = Scripted::new(Duration::from_secs(3600), Duration::from_millis(50), vec![]);
    let certs = manager(
        &source,
        CertSettings {
            max_concurrent_fetches: 3,
            ..fast()
        },
    );
    for n in 0..12 {
        certs.track(&id(&format!("sa{n}")));
    }
    for n in 0..12 {
        certs.get(&id(&format!("sa{n}"))).await.unwrap();
    }
    assert_eq!(source.calls(), 12);
    assert_eq!(source.max_in_flight.load(Ordering::SeqCst), 3);
}
