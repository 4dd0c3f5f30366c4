//! The HBONE client: one mutual-TLS h2 connection to a peer's 15008, many CONNECT tunnels on it.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tracing::Instrument;

use super::{
    Baggage, CONNECTION_WINDOW, H2Stream, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, MAX_SEND_BUFFER,
    STREAM_WINDOW, keepalive,
};
use crate::{
    identity::{Identity, san},
    tls::{self, ALPN_H2},
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TLS handshake with {peer}: {reason}")]
    Tls { peer: SocketAddr, reason: String },
    #[error("{peer} did not negotiate ALPN h2")]
    NoH2 { peer: SocketAddr },
    #[error("HTTP/2 handshake with {peer}: {source}")]
    Handshake { peer: SocketAddr, source: h2::Error },
    #[error("open CONNECT stream to {peer}: {source}")]
    Stream { peer: SocketAddr, source: h2::Error },
    #[error("invalid CONNECT authority {authority:?}")]
    Authority { authority: String },
    #[error("{peer} answered CONNECT {authority} with {status}")]
    Status {
        peer: SocketAddr,
        authority: String,
        status: StatusCode,
    },
}

impl ClientError {
    /// The peer never processed the stream: it arrived after the peer's GOAWAY (a draining
    /// or upgrading node) or was refused with REFUSED_STREAM. Nothing reached the
    /// destination, so the CONNECT may be sent again on another connection (RFC 9113 §8.7).
    pub fn unprocessed(&self) -> bool {
        match self {
            Self::Stream { source, .. } => {
                source.is_go_away()
                    || (source.is_reset() && source.reason() == Some(h2::Reason::REFUSED_STREAM))
            }
            _ => false,
        }
    }
}

/// Headers sent with every CONNECT besides `:authority`.
#[derive(Clone, Debug, Default)]
pub struct ConnectHeaders {
    /// The application's address, for the `forwarded` header.
    pub client: Option<SocketAddr>,
    pub baggage: Option<String>,
    pub traceparent: Option<String>,
    /// The source's network: set on the inner CONNECT of double HBONE only.
    pub forwarded_network: Option<String>,
}

/// A live HBONE connection.
#[derive(Debug)]
pub struct Connection {
    peer: SocketAddr,
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// Its TLS handshake resumed an earlier session.
    resumed: bool,
    /// The identity the server's certificate proved.
    peer_identity: Option<Identity>,
}

impl Connection {
    /// TLS (verified by `config`) and h2 over an already-connected TCP stream to `peer`.
    pub async fn establish(
        tcp: TcpStream,
        peer: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> Result<Self, ClientError> {
        let _ = tcp.set_nodelay(true);
        let tcp = super::linger::Lingering::new(tcp);
        Self::establish_over(tcp, peer, ServerName::IpAddress(peer.ip().into()), config).await
    }

    /// TLS and h2 over any byte stream: the inner connection of double HBONE runs over the
    /// outer tunnel's [`H2Stream`]. `peer` names it in errors; `server_name` keys TLS session
    /// resumption (the certificate is checked against `config`'s identities, not the name).
    pub async fn establish_over<T>(
        io: T,
        peer: SocketAddr,
        server_name: ServerName<'static>,
        config: Arc<ClientConfig>,
    ) -> Result<Self, ClientError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tls = TlsConnector::from(config)
            .connect(server_name, io)
            .await
            .map_err(|error| ClientError::Tls {
                peer,
                reason: tls::describe_io(&error),
            })?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Err(ClientError::NoH2 { peer });
        }
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let peer_identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| san::identity_of(leaf).ok());
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| ClientError::Handshake { peer, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let ping_pong = connection.ping_pong();
        let driver_closed = closed.clone();
        tokio::spawn(
            async move {
                let outcome = match ping_pong {
                    Some(ping_pong) => tokio::select! {
                        result = &mut connection => result.err().map(|e| e.to_string()),
                        error = keepalive(ping_pong) => Some(error.to_string()),
                    },
                    None => connection.await.err().map(|e| e.to_string()),
                };
                driver_closed.store(true, Ordering::Release);
                match outcome {
                    None => tracing::debug!("HBONE connection closed"),
                    Some(error) => tracing::info!(%error, "HBONE connection ended"),
                }
            }
            .instrument(tracing::info_span!("hbone_client", %peer)),
        );
        Ok(Self {
            peer,
            send,
            closed,
            resumed,
            peer_identity,
        })
    }

    /// The identity the server proved in the TLS handshake (a resumed session keeps the one
    /// of its full handshake).
    pub fn peer_identity(&self) -> Option<&Identity> {
        self.peer_identity.as_ref()
    }

    /// Whether the TLS handshake resumed an earlier session rather than a full one.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The connection has ended (peer went away, keep-alive failed) or takes no new streams
    /// (GOAWAY).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Opens a tunnel to `authority` (`ip:port` of the destination workload).
    pub async fn connect(
        &self,
        authority: &str,
        headers: &ConnectHeaders,
    ) -> Result<H2Stream, ClientError> {
        self.connect_described(authority, headers)
            .await
            .map(|(stream, _)| stream)
    }

    /// As [`Self::connect`], with what the answering proxy said of its workload in the
    /// response's `baggage` (empty when it said nothing).
    pub async fn connect_described(
        &self,
        authority: &str,
        headers: &ConnectHeaders,
    ) -> Result<(H2Stream, Baggage), ClientError> {
        let peer = self.peer;
        let request = connect_request(authority, headers)?;
        // After a GOAWAY the connection takes no new streams: the pool stops offering it (its
        // open tunnels go on to their end).
        let failed = |source: h2::Error| {
            if source.is_go_away() {
                self.closed.store(true, Ordering::Release);
            }
            ClientError::Stream { peer, source }
        };
        let mut send = self.send.clone().ready().await.map_err(failed)?;
        let (response, stream) = send.send_request(request, false).map_err(failed)?;
        let response = response.await.map_err(failed)?;
        if response.status() != StatusCode::OK {
            return Err(ClientError::Status {
                peer,
                authority: authority.to_owned(),
                status: response.status(),
            });
        }
        let baggage = response
            .headers()
            .get(super::BAGGAGE)
            .and_then(|value| value.to_str().ok())
            .map(Baggage::parse)
            .unwrap_or_default();
        Ok((H2Stream::new(stream, response.into_body()), baggage))
    }
}

/// A plain (not extended) CONNECT: `:method` and `:authority` only, plus the HBONE headers.
pub fn connect_request(
    authority: &str,
    headers: &ConnectHeaders,
) -> Result<Request<()>, ClientError> {
    let bad = || ClientError::Authority {
        authority: authority.to_owned(),
    };
    let uri = http::Uri::builder()
        .authority(authority)
        .build()
        .map_err(|_| bad())?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .body(())
        .map_err(|_| bad())?;
    let map = request.headers_mut();
    if let Some(client) = headers.client
        && let Ok(value) = HeaderValue::from_str(&format!("for=\"{client}\""))
    {
        map.insert(super::FORWARDED, value);
    }
    for (name, value) in [
        (super::BAGGAGE, &headers.baggage),
        (super::TRACEPARENT, &headers.traceparent),
        (super::FORWARDED_NETWORK, &headers.forwarded_network),
    ] {
        if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            map.insert(name, value);
        }
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{identity::file_ca::FileCa, tls::Tls};

    /// What the loopback server does with the first CONNECT of each connection.
    #[derive(Clone, Copy)]
    enum Answer {
        /// Accepts one tunnel and keeps it open, then stops taking streams (GOAWAY), as a
        /// draining node does.
        GoAway,
        /// Resets the stream with this reason.
        Reset(h2::Reason),
    }

    /// A client connection to a TLS + h2 server on loopback that answers as `answer` says.
    async fn connected(answer: Answer) -> Connection {
        let ttl = Duration::from_secs(3600);
        let ca = FileCa::generate("cluster.local", ttl).unwrap();
        let tls = Tls::new("cluster.local");
        let server_id = Identity::new("cluster.local", "default", "server");
        let client_id = Identity::new("cluster.local", "default", "client");
        let server = tls.certified(&ca.issue(&server_id, ttl).unwrap()).unwrap();
        let client = tls.certified(&ca.issue(&client_id, ttl).unwrap()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config.clone());
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let mut h2 = h2::server::handshake(tls).await.unwrap();
            match answer {
                Answer::GoAway => {
                    let Some(Ok((_, mut respond))) = h2.accept().await else {
                        return;
                    };
                    let ok = http::Response::new(());
                    let _open = respond.send_response(ok, false).unwrap();
                    h2.graceful_shutdown();
                    while h2.accept().await.is_some() {}
                }
                Answer::Reset(reason) => {
                    while let Some(Ok((_, mut respond))) = h2.accept().await {
                        respond.send_reset(reason);
                    }
                }
            }
        });
        let config = tls.client_config(&client, vec![server_id.into()]).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        Connection::establish(tcp, addr, config).await.unwrap()
    }

    async fn refusal(connection: &Connection) -> ClientError {
        match connection
            .connect("10.0.0.1:80", &ConnectHeaders::default())
            .await
        {
            Ok(_) => panic!("the server never accepts a tunnel"),
            Err(error) => error,
        }
    }

    #[tokio::test]
    async fn a_stream_sent_into_a_goaway_is_unprocessed_and_the_connection_is_closed() {
        let connection = connected(Answer::GoAway).await;
        let open = connection
            .connect("10.0.0.1:80", &ConnectHeaders::default())
            .await
            .unwrap();
        // The GOAWAY arrives; the connection lives on for the open tunnel.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!connection.is_closed());
        let error = refusal(&connection).await;
        assert!(error.unprocessed(), "{error}");
        assert!(
            connection.is_closed(),
            "a GOAWAY'd connection is not offered again"
        );
        drop(open);
    }

    #[tokio::test]
    async fn a_refused_stream_is_unprocessed_and_the_connection_stays() {
        let connection = connected(Answer::Reset(h2::Reason::REFUSED_STREAM)).await;
        let error = refusal(&connection).await;
        assert!(error.unprocessed(), "{error}");
        assert!(!connection.is_closed());
    }

    #[tokio::test]
    async fn a_stream_reset_for_another_reason_is_not_sent_again() {
        // The peer processed it (its destination refused, say): sending it again could
        // connect twice.
        let connection = connected(Answer::Reset(h2::Reason::CONNECT_ERROR)).await;
        let error = refusal(&connection).await;
        assert!(!error.unprocessed(), "{error}");
        assert!(!connection.is_closed());
    }
}
