//! What the xDS client and the CA client share about talking to istiod: a TLS endpoint checked
//! before the first connect, the bearer token and cluster id every call carries, and jittered
//! exponential backoff between attempts.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tonic::{
    metadata::{MetadataMap, MetadataValue},
    transport::{Certificate, ClientTlsConfig, Endpoint},
};

/// Where a gRPC service of istiod is and how to trust it.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port`.
    pub address: String,
    /// PEM file of the CA that signed the server's certificate.
    pub root_cert: PathBuf,
    /// Name the server's certificate must carry; default: the host part of `address`.
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("read {what} root certificate {path}: {io_error}")]
    RootCert {
        what: &'static str,
        path: PathBuf,
        io_error: std::io::Error,
    },
    #[error("{what} root certificate {path}: {message}")]
    RootCertInvalid {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what} address {address:?}: {message}")]
    Address {
        what: &'static str,
        address: String,
        message: String,
    },
}

impl Target {
    /// Checks what can be checked before the first connect (`what` names the service in
    /// errors: "xDS", "CA"), and builds the endpoint.
    pub fn endpoint(&self, what: &'static str) -> Result<Endpoint, EndpointError> {
        let pem = std::fs::read(&self.root_cert).map_err(|io_error| EndpointError::RootCert {
            what,
            path: self.root_cert.clone(),
            io_error,
        })?;
        check_pem(&pem).map_err(|message| EndpointError::RootCertInvalid {
            what,
            path: self.root_cert.clone(),
            message,
        })?;
        let bad = |message: String| EndpointError::Address {
            what,
            address: self.address.clone(),
            message,
        };
        let host = match self.address.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host.trim_matches(['[', ']']),
            _ => return Err(bad("expected host:port".into())),
        };
        let name = self.server_name.clone().unwrap_or_else(|| host.to_owned());
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(name);
        Endpoint::from_shared(format!("https://{}", self.address))
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| bad(e.to_string()))
            .map(|e| {
                e.connect_timeout(Duration::from_secs(5))
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10))
            })
    }
}

/// Adds istiod's credentials to a call: `authorization: Bearer <token>` (the token file is
/// re-read each time, because it rotates) and `clusterid`.
pub fn authenticate(
    metadata: &mut MetadataMap,
    token_file: Option<&Path>,
    cluster_id: &str,
) -> Result<(), String> {
    if let Some(path) = token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("read token file {}: {e}", path.display()))?;
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| format!("token file {}: not a valid header value", path.display()))?;
        metadata.insert("authorization", value);
    }
    let cluster = MetadataValue::try_from(cluster_id)
        .map_err(|_| format!("cluster id {cluster_id:?}: not a valid header value"))?;
    metadata.insert("clusterid", cluster);
    Ok(())
}

/// Exponential backoff with jitter: each wait is between half and all of the current step, so
/// a fleet of nodes does not retry in step after istiod restarts.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            step: initial,
        }
    }

    /// The next wait; the step doubles up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.step.mul_f64(0.5 + fastrand::f64() / 2.0);
        self.step = (self.step * 2).min(self.max);
        wait
    }

    pub fn reset(&mut self) {
        self.step = self.initial;
    }
}

/// Refuses a root file that holds no certificate or a broken one, at start rather than at
/// every connect attempt.
fn check_pem(pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| format!("not a PEM certificate: {e}"))?;
        count += 1;
    }
    if count == 0 {
        return Err("no PEM certificate in it".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_file_without_a_certificate_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("istiod-root-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root-cert.pem");
        std::fs::write(&root, "hello\n").unwrap();
        let target = Target {
            address: "istiod.istio-system.svc:15012".into(),
            root_cert: root.clone(),
            server_name: None,
        };
        let error = target.endpoint("xDS").unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "xDS root certificate {}: no PEM certificate in it",
                root.display()
            )
        );
        std::fs::write(
            &root,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(
            target
                .endpoint("CA")
                .unwrap_err()
                .to_string()
                .contains("not a PEM certificate")
        );
        let missing = Target {
            root_cert: dir.join("absent.pem"),
            ..target
        };
        assert!(
            missing
                .endpoint("CA")
                .unwrap_err()
                .to_string()
                .starts_with("read CA root certificate")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let waits: Vec<_> = (0..5).map(|_| backoff.next_wait()).collect();
        let steps = [100, 200, 400, 400, 400];
        for (wait, step) in waits.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(*wait >= step / 2 && *wait <= step, "{waits:?}");
        }
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(100));
    }
}
