//! The HBONE server side of one accepted TCP connection: mutual TLS, h2, then one tunnel per
//! CONNECT stream, each handed to a [`TunnelHandler`] with a [`Responder`] that answers it.
//! Protocol only: where a tunnel goes, what it is spliced to and how it is reported are the
//! handler's.
use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use super::{
    Authority, Baggage, CONNECTION_WINDOW, H2Stream, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE,
    MAX_SEND_BUFFER, SERVER_MAX_STREAMS, STREAM_WINDOW, keepalive,
};
use crate::{
    identity::{Identity, san},
    tls,
};

/// Streams a peer may reset before we have accepted them before it is cut off (rapid reset).
const MAX_PENDING_RESETS: usize = 50;

/// One CONNECT, as the handler sees it.
#[derive(Debug, Clone)]
pub struct TunnelRequest {
    /// The client's verified workload identity.
    pub peer_identity: Identity,
    /// The TCP peer of the HBONE connection (the source node or pod).
    pub peer: SocketAddr,
    /// Where the tunnel wants to go: the `:authority`.
    pub authority: Authority,
    /// The application client's address from the `forwarded` header.
    pub forwarded_for: Option<SocketAddr>,
    /// The source's network, from `x-forwarded-network` (double HBONE's inner CONNECT).
    pub forwarded_network: Option<String>,
    /// What the source says of itself in `baggage`.
    pub baggage: Baggage,
}

/// Why a CONNECT is refused: the HTTP status it is answered with and a reason for the log.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

/// Answers one CONNECT: refused with a status, or accepted as a stream.
pub struct Responder {
    respond: h2::server::SendResponse<Bytes>,
    body: h2::RecvStream,
    peer: SocketAddr,
    peer_identity: Identity,
}

impl Responder {
    /// Answers with the refusal's status, and logs it.
    pub fn refuse(mut self, refusal: Refusal) {
        tracing::info!(
            peer = %self.peer,
            peer_identity = %self.peer_identity,
            status = refusal.status.as_u16(),
            reason = %refusal.reason,
            "HBONE tunnel refused"
        );
        let response = Response::builder()
            .status(refusal.status)
            .body(())
            .unwrap_or_default();
        let _ = self.respond.send_response(response, true);
    }

    /// Answers 200: the tunnel is open. Fails when the client has gone meanwhile.
    pub fn accept(self) -> Result<H2Stream, h2::Error> {
        self.accept_described(None)
    }

    /// As [`Self::accept`], describing the workload that answers in the response's `baggage`
    /// (as ztunnel does): through a gateway, the client learns who served it only this way.
    pub fn accept_described(mut self, baggage: Option<&Baggage>) -> Result<H2Stream, h2::Error> {
        let mut response = Response::new(());
        if let Some(value) = baggage
            .filter(|b| !b.is_empty())
            .and_then(|b| http::HeaderValue::from_str(&b.to_header()).ok())
        {
            response.headers_mut().insert(super::BAGGAGE, value);
        }
        let send = self.respond.send_response(response, false)?;
        Ok(H2Stream::new(send, self.body))
    }
}

pub type HandleFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What becomes of accepted tunnels.
pub trait TunnelHandler: Send + Sync + 'static {
    /// Takes one well-formed CONNECT: answers it through `responder` (200 only once the tunnel
    /// can be carried) and carries it to its end.
    fn handle(&self, request: TunnelRequest, responder: Responder) -> HandleFuture;
}

/// Why a connection never became an HBONE connection. Anyone who can reach a pod's 15008 can
/// cause one, so the caller logs them sparingly and counts them all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    pub kind: RefusedKind,
    /// What happened, for the log.
    pub reason: String,
}

/// The kind of a [`Refused`], for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusedKind {
    /// The TLS handshake failed (not TLS, a certificate refused, no certificate).
    Tls,
    /// The client certificate carries no usable workload identity.
    Identity,
    /// TLS succeeded but HTTP/2 did not.
    Http2,
    /// No handshake within the time allowed.
    Timeout,
}

impl RefusedKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Identity => "identity",
            Self::Http2 => "http2",
            Self::Timeout => "timeout",
        }
    }
}

/// Serves one HBONE connection until the peer closes it or keep-alive fails; `Err` when it
/// never got past the handshake. Once `drain` turns true the connection is told GOAWAY: no new
/// tunnels, the open ones finish.
pub async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    handshake_timeout: Duration,
    handler: Arc<dyn TunnelHandler>,
    mut drain: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Refused> {
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        let refused = |kind, reason| Refused { kind, reason };
        let tls = TlsAcceptor::from(config)
            .accept(super::linger::Lingering::new(tcp))
            .await
            .map_err(|error| {
                refused(
                    RefusedKind::Tls,
                    format!("TLS handshake: {}", tls::describe_io(&error)),
                )
            })?;
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or_else(|| {
                refused(
                    RefusedKind::Tls,
                    "TLS handshake: no client certificate".to_owned(),
                )
            })
            .and_then(|leaf| {
                san::identity_of(leaf).map_err(|error| {
                    refused(
                        RefusedKind::Identity,
                        format!("client certificate: {error}"),
                    )
                })
            })?;
        let connection = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_concurrent_streams(SERVER_MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|error| refused(RefusedKind::Http2, format!("HTTP/2 handshake: {error}")))?;
        Ok::<_, Refused>((identity, connection))
    };
    let (identity, mut connection) = match tokio::time::timeout(handshake_timeout, handshake).await
    {
        Ok(Ok(established)) => established,
        Ok(Err(refused)) => return Err(refused),
        Err(_) => {
            return Err(Refused {
                kind: RefusedKind::Timeout,
                reason: format!(
                    "handshake timed out after {} ms",
                    handshake_timeout.as_millis()
                ),
            });
        }
    };
    tracing::info!(%peer, peer_identity = %identity, "HBONE connection accepted");
    // h2 hands out the PingPong once; a connection without one simply never pings.
    let keepalive: Pin<Box<dyn Future<Output = super::KeepaliveError> + Send>> =
        match connection.ping_pong() {
            Some(ping_pong) => Box::pin(keepalive(ping_pong)),
            None => Box::pin(std::future::pending()),
        };
    tokio::pin!(keepalive);
    // A drain signal whose sender is gone never drains (it must not read as "start").
    let draining = async move {
        if drain.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(draining);
    let mut goaway_sent = false;
    loop {
        tokio::select! {
            () = &mut draining, if !goaway_sent => {
                goaway_sent = true;
                connection.graceful_shutdown();
                tracing::info!(%peer, "HBONE connection draining: GOAWAY sent");
            }
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    // At debug only: a span enabled per tunnel keeps a slot of the
                    // subscriber's slab for every tunnel open at the peak, never given back.
                    let span = tracing::debug_span!("inbound", %peer, peer_identity = %identity);
                    tokio::spawn(
                        handle_stream(request, respond, identity.clone(), peer, handler.clone())
                            .instrument(span),
                    );
                }
                Some(Err(error)) => {
                    tracing::info!(%peer, %error, "HBONE connection ended");
                    return Ok(());
                }
                None => {
                    tracing::debug!(%peer, "HBONE connection closed by peer");
                    return Ok(());
                }
            },
            error = &mut keepalive => {
                tracing::info!(%peer, %error, "HBONE connection dropped");
                return Ok(());
            }
        }
    }
}

async fn handle_stream(
    request: Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    peer_identity: Identity,
    peer: SocketAddr,
    handler: Arc<dyn TunnelHandler>,
) {
    let tunnel = parse_request(&request, peer_identity.clone(), peer);
    let responder = Responder {
        respond,
        body: request.into_body(),
        peer,
        peer_identity,
    };
    match tunnel {
        Ok(tunnel) => handler.handle(tunnel, responder).await,
        Err(refusal) => responder.refuse(refusal),
    }
}

/// Checks the CONNECT itself: method and authority. Where it may go is the handler's call.
pub fn parse_request<B>(
    request: &Request<B>,
    peer_identity: Identity,
    peer: SocketAddr,
) -> Result<TunnelRequest, Refusal> {
    let bad = |reason: String| Refusal {
        status: StatusCode::BAD_REQUEST,
        reason,
    };
    if request.method() != Method::CONNECT {
        return Err(bad(format!("method {} is not CONNECT", request.method())));
    }
    let authority = request
        .uri()
        .authority()
        .ok_or_else(|| bad("CONNECT without :authority".to_owned()))?;
    let authority = Authority::parse(authority.as_str()).ok_or_else(|| {
        bad(format!(
            "authority {authority} is neither an ip:port nor a hostname:port"
        ))
    })?;
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    let forwarded_for = header(super::FORWARDED).and_then(super::forwarded_for);
    // Present, even empty (the default network is ""), means double HBONE's inner CONNECT.
    let forwarded_network =
        header(super::FORWARDED_NETWORK).map(|network| network.trim().to_owned());
    let baggage = request
        .headers()
        .get_all(super::BAGGAGE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .fold(Baggage::default(), |mut all, value| {
            all.merge(Baggage::parse(value));
            all
        });
    Ok(TunnelRequest {
        peer_identity,
        peer,
        authority,
        forwarded_for,
        forwarded_network,
        baggage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authority: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder()
            .method(Method::CONNECT)
            .uri(http::Uri::builder().authority(authority).build().unwrap());
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn parse(request: &Request<()>) -> Result<TunnelRequest, Refusal> {
        parse_request(
            request,
            Identity::new("cluster.local", "default", "client"),
            "192.0.2.1:40000".parse().unwrap(),
        )
    }

    #[test]
    fn reads_the_inner_connect_of_double_hbone() {
        let inner = request(
            "echo.default.svc.cluster.local:80",
            &[
                ("forwarded", r#"for="10.0.1.2:5000""#),
                ("x-forwarded-network", "net1"),
                ("baggage", "k8s.cluster.name=c1,k8s.namespace.name=default"),
                ("baggage", "k8s.deployment.name=client"),
            ],
        );
        let tunnel = parse(&inner).unwrap();
        assert_eq!(
            tunnel.authority,
            Authority::Host {
                hostname: "echo.default.svc.cluster.local".into(),
                port: 80
            }
        );
        assert_eq!(tunnel.forwarded_network.as_deref(), Some("net1"));
        assert_eq!(tunnel.forwarded_for, Some("10.0.1.2:5000".parse().unwrap()));
        assert_eq!(
            (
                tunnel.baggage.cluster.as_str(),
                tunnel.baggage.namespace.as_str(),
                tunnel.baggage.workload_name.as_str()
            ),
            ("c1", "default", "client")
        );
        // The default network is "": the header is there, empty.
        let from_default = request(
            "echo.default.svc.cluster.local:80",
            &[("x-forwarded-network", "")],
        );
        assert_eq!(
            parse(&from_default).unwrap().forwarded_network.as_deref(),
            Some("")
        );
        // A direct tunnel has neither.
        let direct = parse(&request("10.0.2.5:8080", &[])).unwrap();
        assert_eq!(direct.forwarded_network, None);
        assert!(direct.baggage.is_empty());
    }

    #[test]
    fn refuses_what_is_not_a_connect_to_a_host_or_address() {
        let get = Request::builder()
            .method(Method::GET)
            .uri("http://10.0.2.5:8080/")
            .body(())
            .unwrap();
        assert_eq!(parse(&get).unwrap_err().status, StatusCode::BAD_REQUEST);
        let refusal = parse(&request("no_port_here", &[])).unwrap_err();
        assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
        assert!(
            refusal
                .reason
                .contains("neither an ip:port nor a hostname:port")
        );
    }
}
