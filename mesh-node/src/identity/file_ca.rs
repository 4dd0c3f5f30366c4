//! A certificate authority kept in two files: `mesh-node ca init` writes the mesh root, and each
//! mesh-node signs short-lived certificates for the workloads it hosts with it.
//!
//! Every node reads the same root key, so this suits tests, demos and single-operator meshes;
//! istiod's CA (a later [`CertSource`]) keeps keys off the nodes.
use std::{
    fs, io,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};

use super::{CertError, CertFuture, CertSource, Identity, WorkloadCert};

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Lifetime of workload certificates: short, as Istio's (24 h), renewed at half-life.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Back-dating tolerates clocks a little behind ours on other nodes.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum FileCaError {
    #[error("{path} already exists; remove it first to replace the mesh root")]
    Exists { path: PathBuf },
    #[error("write {path}: {io_error}")]
    Write { path: PathBuf, io_error: io::Error },
    #[error("read {path}: {io_error}")]
    Read { path: PathBuf, io_error: io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("generate the mesh root: {0}")]
    Generate(rcgen::Error),
    #[error("trust domain {0:?} may hold only a-z, 0-9, '.', '-' and '_'")]
    TrustDomain(String),
}

/// The mesh root and its signing key.
pub struct FileCa {
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
    root_pem: String,
    workload_ttl: Duration,
}

impl std::fmt::Debug for FileCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCa")
            .field("workload_ttl", &self.workload_ttl)
            .finish_non_exhaustive()
    }
}

impl FileCa {
    /// Writes a new ECDSA P-256 mesh root to `dir` (created if absent); refuses to overwrite one.
    /// Returns the path of the root certificate.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<PathBuf, FileCaError> {
        if !super::is_valid_trust_domain(trust_domain) {
            return Err(FileCaError::TrustDomain(trust_domain.to_owned()));
        }
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(FileCaError::Exists { path: path.clone() });
            }
        }
        fs::create_dir_all(dir).map_err(|io_error| FileCaError::Write {
            path: dir.to_owned(),
            io_error,
        })?;
        let ca = Self::generate(trust_domain, DEFAULT_WORKLOAD_TTL)?;
        write_file(&key_path, ca.issuer.key().serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, ca.root_pem().as_bytes(), 0o644)?;
        Ok(cert_path)
    }

    /// A new mesh root held in memory only.
    pub fn generate(trust_domain: &str, workload_ttl: Duration) -> Result<Self, FileCaError> {
        let key = KeyPair::generate().map_err(FileCaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, trust_domain);
        name.push(DnType::CommonName, "mesh-node root CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ROOT_TTL).into();
        let cert = params.self_signed(&key).map_err(FileCaError::Generate)?;
        Ok(Self {
            root_der: cert.der().clone(),
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            workload_ttl,
        })
    }

    /// The root certificate in PEM.
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// Loads the root written by [`FileCa::init`].
    pub fn load(dir: &Path, workload_ttl: Duration) -> Result<Self, FileCaError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let cert_pem = read_file(&cert_path)?;
        let key_pem = read_file(&key_path)?;
        let invalid = |path: &Path, reason: String| FileCaError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|error| invalid(&key_path, format!("not a PEM private key: {error}")))?;
        let root_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|error| invalid(&cert_path, format!("not a PEM certificate: {error}")))?;
        let issuer = Issuer::from_ca_cert_der(&root_der, key).map_err(|error| {
            invalid(&cert_path, format!("not a usable CA certificate: {error}"))
        })?;
        if issuer.key().subject_public_key_info() != spki_of(&root_der).unwrap_or_default() {
            return Err(invalid(
                &key_path,
                format!("does not hold the key of {}", cert_path.display()),
            ));
        }
        Ok(Self {
            issuer,
            root_der,
            root_pem: cert_pem,
            workload_ttl,
        })
    }

    /// The root certificate peers chain to.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// Signs a fresh ECDSA P-256 certificate whose one URI SAN is `identity`.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, CertError> {
        let fail = |reason: String| CertError::Issue {
            identity: identity.to_string(),
            reason,
        };
        let key = KeyPair::generate().map_err(|error| fail(error.to_string()))?;
        let (cert, not_before, not_after) = self.sign(identity, &key, ttl).map_err(fail)?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots: vec![self.root_der.clone()],
            not_before,
            not_after,
        })
    }

    /// Signs a PEM certificate signing request whose one URI SAN must be `identity`, as a CA
    /// server does; returns the chain in PEM, leaf first, ending with the root. Only the
    /// request's key and SAN are used: usages and lifetime are the CA's.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, String> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|error| format!("CSR: {error}"))?;
        let want = identity.to_string();
        match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] if uri.as_str() == want => {}
            other => {
                return Err(format!(
                    "CSR must carry exactly one URI SAN {want}, it has {other:?}"
                ));
            }
        }
        let (cert, _, _) = self.sign(identity, &csr.public_key, ttl)?;
        Ok(vec![cert.pem(), self.root_pem.clone()])
    }

    fn sign(
        &self,
        identity: &Identity,
        public_key: &impl PublicKeyData,
        ttl: Duration,
    ) -> Result<(rcgen::Certificate, SystemTime, SystemTime), String> {
        let mut params = CertificateParams::default();
        // Istio's workload certificates carry an empty subject; the identity is the URI SAN.
        params.distinguished_name = DistinguishedName::new();
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|error: rcgen::Error| error.to_string())?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_before = now - CLOCK_SKEW;
        let not_after = now + ttl;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|error| error.to_string())?;
        Ok((cert, not_before, not_after))
    }
}

impl CertSource for FileCa {
    fn fetch<'a>(&'a self, identity: &'a Identity) -> CertFuture<'a> {
        Box::pin(async move { self.issue(identity, self.workload_ttl) })
    }
}

fn spki_of(der: &CertificateDer<'_>) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(cert.public_key().raw.to_vec())
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileCaError> {
    use std::io::Write;
    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        file.write_all(contents)?;
        file.sync_all()
    };
    write().map_err(|io_error| FileCaError::Write {
        path: path.to_owned(),
        io_error,
    })
}

fn read_file(path: &Path) -> Result<String, FileCaError> {
    fs::read_to_string(path).map_err(|io_error| FileCaError::Read {
        path: path.to_owned(),
        io_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("mesh-node-ca-{}-{name}", std::process::id()))
    }

    #[test]
    fn init_writes_a_root_that_loads_and_refuses_to_overwrite_it() {
        let dir = temp_dir("init");
        let _ = fs::remove_dir_all(&dir);
        let cert = FileCa::init(&dir, "cluster.local").unwrap();
        let mode = fs::metadata(dir.join(ROOT_KEY_FILE)).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let ca = FileCa::load(&dir, DEFAULT_WORKLOAD_TTL).unwrap();
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let issued = ca.issue(&id, Duration::from_secs(60)).unwrap();
        assert_eq!(
            super::super::san::identity_of(&issued.chain[0]).unwrap(),
            id
        );
        let again = FileCa::init(&dir, "cluster.local").unwrap_err();
        assert!(again.to_string().contains("already exists"), "{again}");
        assert!(cert.ends_with(ROOT_CERT_FILE));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_names_the_bad_file() {
        let dir = temp_dir("bad");
        let _ = fs::remove_dir_all(&dir);
        FileCa::init(&dir, "cluster.local").unwrap();
        fs::write(dir.join(ROOT_KEY_FILE), "not a key").unwrap();
        let error = FileCa::load(&dir, DEFAULT_WORKLOAD_TTL)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(ROOT_KEY_FILE) && error.contains("not a PEM private key"),
            "{error}"
        );
        // A key that is valid but not the root's.
        let other = FileCa::generate("cluster.local", DEFAULT_WORKLOAD_TTL).unwrap();
        fs::write(dir.join(ROOT_KEY_FILE), other.issuer.key().serialize_pem()).unwrap();
        let error = FileCa::load(&dir, DEFAULT_WORKLOAD_TTL)
            .unwrap_err()
            .to_string();
        assert!(error.contains("does not hold the key of"), "{error}");
        fs::remove_dir_all(&dir).unwrap();
        assert!(FileCa::init(&dir, "Bad Domain").is_err());
    }
}
