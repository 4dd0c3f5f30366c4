//! HBONE: TCP streams carried as HTTP/2 CONNECT streams over mutual TLS, port 15008.
//!
//! The h2 crate is used directly rather than through hyper: [`H2Stream::splice`] moves tunnel
//! bytes between a socket and h2 without copying them, and with no extra task per stream.
pub mod baggage;
pub mod client;
pub mod linger;
pub mod pool;
pub mod server;
mod stream;

use std::{fmt, net::SocketAddr, time::Duration};

pub use baggage::Baggage;
pub use stream::H2Stream;

/// Per-stream receive window (what one slow tunnel may hold in flight).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection receive window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame we accept.
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// PING every so often on idle and busy connections alike…
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// …and give up on the connection if the PONG takes longer than this.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Clients open another connection once this many streams are active on each.
pub const STREAMS_PER_CONNECTION: usize = 100;
/// What a server allows per connection; above [`STREAMS_PER_CONNECTION`] so a client's count
/// and ours never race into REFUSED_STREAM.
pub const SERVER_MAX_STREAMS: u32 = 1000;
/// Request header block limit: an HBONE CONNECT carries a few hundred bytes.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Bytes h2 buffers per stream on the sending side before applying back-pressure.
pub const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Header carrying the client's address, as Istio sets it: `for="<ip:port>"`.
pub const FORWARDED: &str = "forwarded";
pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";
/// On the inner CONNECT of double HBONE: the network the source is on. A destination that
/// sees another network than its own knows the TCP peer is a gateway, not the source.
pub const FORWARDED_NETWORK: &str = "x-forwarded-network";

/// Where a CONNECT asks to go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Authority {
    /// `ip:port`: a workload's address (or a service VIP, for a waypoint).
    Addr(SocketAddr),
    /// `<service hostname>:<port>`: double HBONE, where the gateway routes by the service and
    /// the destination node maps the service port to its pod's port.
    Host { hostname: String, port: u16 },
}

impl Authority {
    /// Reads `ip:port`, `[v6]:port` or `hostname:port`; `None` for anything else.
    pub fn parse(value: &str) -> Option<Self> {
        if let Ok(addr) = value.parse() {
            return Some(Self::Addr(addr));
        }
        let (hostname, port) = value.rsplit_once(':')?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
        let valid = !hostname.is_empty()
            && hostname.len() <= 253
            && hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            && !hostname.starts_with(['.', '-']);
        valid.then(|| Self::Host {
            hostname: hostname.to_ascii_lowercase(),
            port,
        })
    }

    pub fn port(&self) -> u16 {
        match self {
            Self::Addr(addr) => addr.port(),
            Self::Host { port, .. } => *port,
        }
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(addr) => addr.fmt(f),
            Self::Host { hostname, port } => write!(f, "{hostname}:{port}"),
        }
    }
}

/// Why an h2 connection's keep-alive gave up.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    #[error("no PING reply within {}s", KEEPALIVE_TIMEOUT.as_secs())]
    Timeout,
    #[error("PING failed: {0}")]
    Ping(h2::Error),
}

/// PINGs the peer every [`KEEPALIVE_INTERVAL`]; returns when a PING goes unanswered. The
/// connection must be polled concurrently for replies to arrive.
pub(crate) async fn keepalive(mut ping_pong: h2::PingPong) -> KeepaliveError {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(error)) => return KeepaliveError::Ping(error),
            Err(_) => return KeepaliveError::Timeout,
        }
    }
}

/// Parses `for="1.2.3.4:5"` (or `for=…` without quotes) out of a `forwarded` header.
pub fn forwarded_for(value: &str) -> Option<std::net::SocketAddr> {
    value
        .split([';', ','])
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| key.eq_ignore_ascii_case("for"))
        .and_then(|(_, addr)| addr.trim_matches('"').parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_forwarded_for() {
        assert_eq!(
            super::forwarded_for(r#"for="10.0.0.1:4000""#),
            Some("10.0.0.1:4000".parse().unwrap())
        );
        assert_eq!(
            super::forwarded_for(r#"proto=http;for="[fd00::1]:80""#),
            Some("[fd00::1]:80".parse().unwrap())
        );
        assert_eq!(super::forwarded_for("for=unknown"), None);
    }

    #[test]
    fn reads_authorities() {
        use super::Authority;
        assert_eq!(
            Authority::parse("10.0.0.1:80"),
            Some(Authority::Addr("10.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            Authority::parse("[fd00::1]:80"),
            Some(Authority::Addr("[fd00::1]:80".parse().unwrap()))
        );
        assert_eq!(
            Authority::parse("Reviews.shop.svc.cluster.local:9080"),
            Some(Authority::Host {
                hostname: "reviews.shop.svc.cluster.local".into(),
                port: 9080
            })
        );
        for bad in [
            "",
            "host",
            "host:",
            ":80",
            "host:0",
            "host:99999",
            "a b:80",
            "-x:80",
            "x/y:80",
        ] {
            assert_eq!(Authority::parse(bad), None, "{bad:?}");
        }
    }
}
