//! What `/healthz/ready` waits for, and what it reports besides.
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::watch;

use crate::{certs::CertManager, xds::session::XdsStatus};

/// What readiness waits for. Shared by the start-up sequence (which sets the flags) and the
/// readiness endpoint.
pub struct Readiness {
    draining: AtomicBool,
    programs: AtomicBool,
    enrolled: AtomicBool,
    pub(super) xds: watch::Receiver<XdsStatus>,
    certs: Option<Arc<CertManager>>,
}

impl Readiness {
    /// `xds` is synced with the control plane's first answer of every type (from the start
    /// without a control plane), and names the resources it refused.
    pub fn new(xds: watch::Receiver<XdsStatus>, certs: Option<Arc<CertManager>>) -> Self {
        Self {
            draining: AtomicBool::new(false),
            programs: AtomicBool::new(false),
            enrolled: AtomicBool::new(false),
            xds,
            certs,
        }
    }

    pub fn programs_attached(&self) {
        self.programs.store(true, Ordering::Release);
    }

    /// From now on not ready: the process is draining.
    pub fn draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn startup_enrollment_done(&self) {
        self.enrolled.store(true, Ordering::Release);
    }

    /// Resources the control plane sent that were refused: they do not hold readiness back
    /// (one bad ServiceEntry must not keep every pod of the node out), but are named.
    pub fn rejected(&self) -> Vec<String> {
        self.xds
            .borrow()
            .rejected
            .iter()
            .map(|r| {
                format!(
                    "{} {} (version {}): {}",
                    r.type_name, r.name, r.version, r.error
                )
            })
            .collect()
    }

    /// What is still missing; empty when ready.
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if self.draining.load(Ordering::Acquire) {
            missing.push("draining: no new connections are taken".to_owned());
        }
        if !self.programs.load(Ordering::Acquire) {
            missing.push("eBPF programs not attached yet".to_owned());
        }
        if !self.enrolled.load(Ordering::Acquire) {
            missing.push("pods not enrolled yet".to_owned());
        }
        if !self.xds.borrow().synced {
            missing.push("no answer from the control plane yet".to_owned());
        }
        if let Some(certs) = &self.certs {
            for status in certs.snapshot().iter().filter(|s| s.tracked && !s.valid) {
                let why = status.error.as_deref().unwrap_or("not issued yet");
                missing.push(format!("no certificate for {}: {why}", status.identity));
            }
        }
        missing
    }
}
