//! A gRPC server over TLS inside a node's network namespace, on a thread of its own, that can
//! be stopped (every connection cut at once, as a crashed server would) and started again on
//! the same address. The test control plane and the test CA run on it.
use std::{
    future::Future,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    thread::JoinHandle,
};

use anyhow::{Context, Result};
use tokio::sync::oneshot;
use tonic::transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming};

/// The name the serving certificate carries, as istiod's does.
pub const SERVER_NAME: &str = "istiod.istio-system.svc";

/// Serves one service on the configured server and the accepted connections; the future runs
/// until the server is stopped.
pub type Serve =
    Arc<dyn Fn(Server, TcpIncoming) -> Pin<Box<dyn Future<Output = ()>>> + Send + Sync>;

pub struct NetnsServer {
    addr: SocketAddr,
    netns: PathBuf,
    tls: (String, String),
    serve: Serve,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl NetnsServer {
    /// Starts serving on `addr` inside `netns` (port 0: any free port; [`Self::addr`] tells
    /// which), with a certificate for [`SERVER_NAME`] signed by the mesh CA in `ca_dir`.
    pub fn start(netns: &Path, addr: SocketAddr, ca_dir: &Path, serve: Serve) -> Result<Self> {
        let mut server = Self::stopped(netns, addr, ca_dir, serve)?;
        server.resume()?;
        Ok(server)
    }

    /// Like [`Self::start`] but not serving yet: clients find nothing listening until
    /// [`Self::resume`]. `addr` needs a port.
    pub fn stopped(netns: &Path, addr: SocketAddr, ca_dir: &Path, serve: Serve) -> Result<Self> {
        Ok(Self {
            addr,
            netns: netns.to_owned(),
            tls: serving_certificate(ca_dir)?,
            serve,
            running: None,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Stops serving: the listener closes and every connection is cut.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }

    /// Serves (again) on the same address.
    pub fn resume(&mut self) -> Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let netns = std::fs::File::open(&self.netns)
            .with_context(|| format!("open {}", self.netns.display()))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (addr, serve) = (self.addr, self.serve.clone());
        let (cert, key) = self.tls.clone();
        let thread = std::thread::spawn(move || {
            let setup = || -> Result<_> {
                // SAFETY: setns on this thread only; `netns` is open.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                let listener = bind(addr)?;
                let bound = listener.local_addr()?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let listener = {
                    let _context = runtime.enter();
                    tokio::net::TcpListener::from_std(listener)?
                };
                let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
                let server = Server::builder().tls_config(tls)?;
                Ok((runtime, listener, server, bound))
            };
            let (runtime, listener, server, bound) = match setup() {
                Ok(parts) => parts,
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(bound));
            runtime.block_on(async move {
                let incoming = TcpIncoming::from(listener);
                // Dropping the server future closes the listener and every connection at once.
                tokio::select! {
                    () = serve(server, incoming) => {}
                    _ = stop_rx => {}
                }
            });
        });
        self.addr = ready_rx
            .recv()
            .context("server thread ended before serving")??;
        self.running = Some((stop_tx, thread));
        Ok(())
    }
}

impl Drop for NetnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    // A restarted server binds again while old connections linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// A serving certificate for [`SERVER_NAME`], signed by the CA in `ca_dir`.
fn serving_certificate(ca_dir: &Path) -> Result<(String, String)> {
    let root_pem = std::fs::read_to_string(ca_dir.join("root-cert.pem"))?;
    let root_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("root-key.pem"))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, root_key)?;
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}
