//! mesh-node's own HTTP endpoints, in its own network namespace:
//! - admin, `127.0.0.1:15000`: `GET /config_dump` (workloads, services, policies, enrolled
//!   pods, certificates with expiry — never keys), `GET|POST /logging[?level=FILTER]`,
//!   `POST /drain` (as SIGTERM: stop taking connections, let open ones finish, exit);
//! - metrics, `:15020`: `GET /stats/prometheus` (also `/metrics`), Prometheus text;
//! - readiness, `:15021`: `GET /healthz/ready`, 200 once programs are attached, start-up
//!   enrollment is done, the control plane's first answer arrived and every enrolled pod has a
//!   certificate; 503 with the reasons before.
mod config_dump;
mod readiness;

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{Arc, Mutex, OnceLock},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{net::TcpListener, sync::watch};

pub use readiness::Readiness;

use crate::{
    enroll::Enroller,
    handover::{Inherited, SocketKind},
    logging,
    proxy::ProxyContext,
    telemetry::Metrics,
};

/// Everything the endpoints read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// Set once the data plane is up.
    pub ctx: OnceLock<Arc<ProxyContext>>,
    pub enroller: OnceLock<Arc<Enroller>>,
    /// True while a successor serves the endpoints (see [`crate::handover`]).
    paused: watch::Sender<bool>,
    /// A duplicate of each endpoint's listener, for a successor.
    sockets: Mutex<Vec<(&'static str, OwnedFd)>>,
}

impl Admin {
    pub fn new(metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> Self {
        Self {
            metrics,
            readiness,
            ctx: OnceLock::new(),
            enroller: OnceLock::new(),
            paused: watch::channel(false).0,
            sockets: Mutex::new(Vec::new()),
        }
    }

    /// Stops or resumes accepting on the endpoints.
    pub fn pause(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    /// A duplicate of every endpoint's listener, for a successor.
    pub fn handover_sockets(&self) -> Vec<(SocketKind, OwnedFd)> {
        let sockets = self
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sockets
            .iter()
            .filter_map(|(what, fd)| {
                let fd = fd.try_clone().ok()?;
                Some((
                    SocketKind::Endpoint {
                        what: (*what).to_owned(),
                    },
                    fd,
                ))
            })
            .collect()
    }
}

pub use crate::config::{Addresses, DEFAULT_ADMIN, DEFAULT_METRICS, DEFAULT_READINESS};

#[derive(Debug, thiserror::Error)]
#[error("listen on {addr} for the {what} endpoint: {source}")]
pub struct BindError {
    pub what: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

type Handler = fn(&Admin, &Request<Incoming>) -> Response<Full<Bytes>>;

/// Binds the three listeners (failing on the first that cannot be bound), or serves those a
/// predecessor handed over, on the current runtime.
pub async fn start(
    admin: Arc<Admin>,
    addrs: Addresses,
    inherited: &mut Inherited,
) -> Result<(), BindError> {
    let endpoints: [(&'static str, SocketAddr, Handler); 3] = [
        ("admin", addrs.admin, admin_routes),
        ("metrics", addrs.metrics, metrics_routes),
        ("readiness", addrs.readiness, readiness_routes),
    ];
    for (what, addr, handler) in endpoints {
        let bind_err = |source| BindError { what, addr, source };
        let listener = match inherited.take_endpoint(what, addr) {
            Some(listener) => {
                listener.set_nonblocking(true).map_err(bind_err)?;
                TcpListener::from_std(listener).map_err(bind_err)?
            }
            None => TcpListener::bind(addr).await.map_err(bind_err)?,
        };
        let dup = socket2::SockRef::from(&listener)
            .try_clone()
            .map_err(bind_err)?;
        admin
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((what, OwnedFd::from(dup)));
        tracing::info!(%addr, "{what} endpoint listening");
        tokio::spawn(serve(listener, admin.clone(), handler));
    }
    Ok(())
}

async fn serve(listener: TcpListener, admin: Arc<Admin>, handler: Handler) {
    let mut paused = admin.paused.subscribe();
    loop {
        let _ = paused.wait_for(|paused| !*paused).await;
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = paused.wait_for(|paused| *paused) => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accept on an admin endpoint failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = handler(&admin, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.into())
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_string_pretty(value).unwrap_or_default();
    body.push('\n');
    respond(status, "application/json", body)
}

fn not_found(request: &Request<Incoming>, known: &str) -> Response<Full<Bytes>> {
    text(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {} {}; this port serves: {known}\n",
            request.method(),
            request.uri().path()
        ),
    )
}

fn readiness_routes(admin: &Admin, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/healthz/ready" => {
            let missing = admin.readiness.missing();
            let rejected = admin.readiness.rejected();
            let mut body = if missing.is_empty() {
                "ready\n".to_owned()
            } else {
                format!("not ready:\n- {}\n", missing.join("\n- "))
            };
            if !rejected.is_empty() {
                body.push_str(&format!(
                    "rejected by this node (last good version in force):\n- {}\n",
                    rejected.join("\n- ")
                ));
            }
            let status = if missing.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, body)
        }
        _ => not_found(request, "GET /healthz/ready"),
    }
}

fn metrics_routes(admin: &Admin, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/stats/prometheus" | "/metrics" => {
            if let Some(certs) = admin.ctx.get().and_then(|ctx| ctx.certs.as_ref()) {
                let snapshot = certs.snapshot();
                let valid = snapshot.iter().filter(|s| s.valid).count();
                admin.metrics.certificates(valid, snapshot.len() - valid);
            }
            respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                admin.metrics.encode(),
            )
        }
        _ => not_found(request, "GET /stats/prometheus, GET /metrics"),
    }
}

fn admin_routes(admin: &Admin, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/config_dump") => json_response(StatusCode::OK, &config_dump::of(admin)),
        (&Method::GET, "/logging") => {
            text(StatusCode::OK, format!("{}\n", logging::current_filter()))
        }
        (&Method::POST, "/logging") => {
            let level = request
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .find_map(|pair| pair.strip_prefix("level="));
            let Some(level) = level else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "POST /logging?level=FILTER (for example level=debug)\n",
                );
            };
            let level = percent_decode(level);
            match logging::set_filter(&level) {
                Ok(now) => {
                    tracing::warn!(filter = %now, "log filter changed through the admin endpoint");
                    text(StatusCode::OK, format!("{now}\n"))
                }
                Err(error) => text(StatusCode::BAD_REQUEST, format!("{error}\n")),
            }
        }
        (&Method::POST, "/drain") => match admin.ctx.get() {
            Some(ctx) => {
                if ctx.drain.start() {
                    tracing::warn!("drain requested through the admin endpoint");
                }
                text(StatusCode::ACCEPTED, "draining\n".to_owned())
            }
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not serving yet: nothing to drain\n".to_owned(),
            ),
        },
        _ => not_found(
            request,
            "GET /config_dump, GET /logging, POST /logging?level=FILTER, POST /drain",
        ),
    }
}

/// `%XX` escapes and `+` decoded; anything malformed is kept as written.
fn percent_decode(value: &str) -> String {
    let hex = |byte: u8| (byte as char).to_digit(16);
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                match (
                    bytes.get(i + 1).and_then(|b| hex(*b)),
                    bytes.get(i + 2).and_then(|b| hex(*b)),
                ) {
                    (Some(high), Some(low)) => {
                        out.push((high * 16 + low) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded_and_bad_escapes_kept() {
        assert_eq!(
            percent_decode("info%2Cmesh_node%3A%3Axds%3Ddebug"),
            "info,mesh_node::xds=debug"
        );
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
