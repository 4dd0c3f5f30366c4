//! Why mesh-node could not carry a connection: one error type for every path (outbound,
//! same node, HBONE into a pod, captured plaintext). The access line's reason, the metrics'
//! `response_flags` and, for a tunnel, the HTTP status it is answered with all derive from it.
use std::{io, net::SocketAddr};

use http::StatusCode;

use crate::{
    authz::Verdict,
    hbone::server::Refusal,
    telemetry::{CONNECT_FAILED, DENIED, Outcome},
};

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Routing found nowhere to send it (a service without a usable endpoint, a waypoint that
    /// cannot be reached).
    #[error("{0}")]
    NoRoute(String),
    /// An authorization policy refused it.
    #[error("{0}")]
    Denied(Verdict),
    /// A tunnel asked for a destination this pod does not serve.
    #[error("{0}")]
    BadDestination(String),
    /// A TCP connection could not be made.
    #[error("connect to {addr}{}: {source}", in_pod(.pod))]
    Connect {
        addr: SocketAddr,
        /// The pod it was made in, when it was a connection into a pod.
        pod: Option<String>,
        source: io::Error,
    },
    /// No HBONE tunnel to the destination (no certificate, TLS or h2 failed, the peer refused).
    #[error("{0}")]
    Tunnel(String),
}

fn in_pod(pod: &Option<String>) -> String {
    pod.as_ref()
        .map_or_else(String::new, |pod| format!(" in pod {pod}"))
}

impl Failure {
    /// `response_flags` in metrics, as ztunnel sets them.
    pub fn flags(&self) -> &'static str {
        match self {
            Self::Denied(_) => DENIED,
            _ => CONNECT_FAILED,
        }
    }

    /// The status a tunnel that fails this way is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Denied(_) => StatusCode::UNAUTHORIZED,
            Self::BadDestination(_) => StatusCode::BAD_REQUEST,
            Self::NoRoute(_) | Self::Connect { .. } | Self::Tunnel(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// What the report records.
    pub fn outcome(&self) -> Outcome {
        Outcome::Failed {
            flags: self.flags(),
            reason: self.to_string(),
        }
    }

    /// The refusal a tunnel that fails this way is answered with.
    pub fn refusal(&self) -> Refusal {
        Refusal {
            status: self.status(),
            reason: self.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_status_and_reason_derive_from_the_failure() {
        let denied = Failure::Denied(Verdict::NotAllowed);
        assert_eq!(
            (denied.flags(), denied.status()),
            (DENIED, StatusCode::UNAUTHORIZED)
        );
        assert_eq!(denied.to_string(), "denied: no ALLOW policy matched");
        let connect = Failure::Connect {
            addr: "10.0.0.5:8080".parse().unwrap(),
            pod: Some("default/server".into()),
            source: io::ErrorKind::ConnectionRefused.into(),
        };
        assert_eq!(
            (connect.flags(), connect.status()),
            (CONNECT_FAILED, StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(
            connect.to_string(),
            "connect to 10.0.0.5:8080 in pod default/server: connection refused"
        );
        let bad = Failure::BadDestination("authority 10.0.0.9:80 is not local".into());
        assert_eq!(bad.refusal().status, StatusCode::BAD_REQUEST);
    }
}
