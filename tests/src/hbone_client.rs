//! A hand-driven HBONE client for tests that play a misbehaving or foreign peer: its own
//! certificates from the topology's CA, raw TLS and h2, run on a thread inside a pod's network
//! namespace.
use std::{future::Future, os::fd::AsRawFd, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use mesh_node::{
    hbone::{
        H2Stream,
        client::{ConnectHeaders, Connection},
    },
    identity::{Identity, file_ca::FileCa},
    tls::{ALPN_H2, SpiffeServerVerifier, Tls},
};
use rustls::ClientConfig;

use crate::topology::TRUST_DOMAIN;

/// Runs `make()`'s future to completion on a fresh single-threaded runtime, on a thread that
/// lives in network namespace `netns`: every socket it opens is that pod's.
pub fn run_in<F, Fut, T>(netns: &Path, make: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    let ns = std::fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on this scoped thread only; `ns` is open.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(runtime.block_on(make()))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?
    })
}

/// A client configuration presenting a certificate for `client` (any trust domain), signed by
/// the topology's CA, and accepting only a server that is `server`.
pub fn client_config(ca_dir: &Path, client: &str, server: &str) -> Result<Arc<ClientConfig>> {
    let client: Identity = client.parse()?;
    let server: Identity = server.parse()?;
    let ca = FileCa::load(ca_dir, Duration::from_secs(3600))?;
    let tls = Tls::new(&client.trust_domain);
    let certified = tls.certified(&ca.issue(&client, Duration::from_secs(3600))?)?;
    Ok(tls.client_config(&certified, vec![server.into()])?)
}

/// A client configuration that presents no certificate at all.
pub fn anonymous_config(ca_dir: &Path, server: &str) -> Result<Arc<ClientConfig>> {
    let ca = FileCa::load(ca_dir, Duration::from_secs(3600))?;
    let tls = Tls::new(TRUST_DOMAIN);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root().clone())?;
    let verifier = SpiffeServerVerifier::new(
        Arc::new(roots),
        tls.provider().clone(),
        vec![server.parse::<Identity>()?.into()],
    );
    let mut config = ClientConfig::builder_with_provider(tls.provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The certificate the server at `peer` presents, after a full TLS handshake that `config`
/// verified (chain, validity, identity).
pub async fn server_certificate(
    config: Arc<ClientConfig>,
    peer: std::net::SocketAddr,
) -> Result<rustls::pki_types::CertificateDer<'static>> {
    let tcp = tokio::net::TcpStream::connect(peer).await?;
    let name = rustls::pki_types::ServerName::try_from("mesh.invalid")?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.clone().into_owned())
        .context("the server presented no certificate")
}

/// Opens a new HBONE connection to `peer` with `config` and one CONNECT tunnel to `authority`
/// carrying `headers` (which a test may forge); the error is the failure as text.
pub async fn tunnel(
    config: Arc<ClientConfig>,
    peer: std::net::SocketAddr,
    authority: &str,
    headers: &ConnectHeaders,
) -> Result<H2Stream, String> {
    let tcp = tokio::net::TcpStream::connect(peer)
        .await
        .map_err(|e| e.to_string())?;
    let connection = Connection::establish(tcp, peer, config)
        .await
        .map_err(|e| e.to_string())?;
    connection
        .connect(authority, headers)
        .await
        .map_err(|e| e.to_string())
}
