//! What mesh-node tells operators about the traffic it carries: Prometheus metrics under Istio's
//! standard TCP names and labels (so existing Istio dashboards work), and one access-log line
//! per connection.
//!
//! A connection is reported once by each mesh-node it passes: the source side (`reporter=
//! "source"`, the outbound handler) and the destination side (`reporter="destination"`, every
//! delivery into a local pod). A [`Report`] is opened when the connection is accepted and
//! closed with its outcome; closing counts the bytes and writes the access-log line.
mod metrics;

use std::{net::SocketAddr, sync::Arc, time::Instant};

pub use metrics::{Metrics, TcpLabels};

use crate::{
    hbone::Baggage,
    identity::{Identity, San},
    pod::Pod,
    splice::How,
    state::Workload,
};

/// Which side of the connection reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

/// One end of a connection as the labels and the access log name it. The strings are the
/// state's own (interned) where it has them, so describing a connection copies none of them.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    pub principal: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
    pub cluster: Arc<str>,
}

impl Peer {
    /// A local pod (enrolled here), completed from its workload when the control plane knows it.
    pub fn of_pod(pod: &Pod, workload: Option<&Workload>) -> Self {
        match workload {
            Some(workload) => Self::of_workload(workload),
            None => {
                let name: Arc<str> = pod.spec.name.as_str().into();
                Self {
                    workload: name.clone(),
                    namespace: pod.spec.namespace.as_str().into(),
                    principal: pod.identity.to_string().into(),
                    canonical_service: name,
                    ..Self::default()
                }
            }
        }
    }

    pub fn of_workload(workload: &Workload) -> Self {
        let name = if workload.workload_name.is_empty() {
            Arc::from(&*workload.name)
        } else {
            workload.workload_name.clone()
        };
        Self {
            workload: name,
            namespace: workload.namespace.clone(),
            principal: workload.identity().to_string().into(),
            canonical_service: workload.canonical_name.clone(),
            canonical_revision: workload.canonical_revision.clone(),
            cluster: workload.cluster_id.clone(),
        }
    }

    /// Only the address is known (a plaintext client, a destination outside the mesh).
    pub fn unknown() -> Self {
        Self::default()
    }

    /// A workload on another network, known here only by the workload istiod sends in its
    /// place (namespace, cluster, perhaps a name) and the identity it must prove.
    pub fn of_remote(workload: &Workload, expected: Option<&San>) -> Self {
        let mut peer = Self::of_workload(workload);
        peer.principal = expected.map_or_else(Arc::default, |san| san.to_string().into());
        peer
    }

    /// What the far end said of itself in `baggage` replaces what we guessed (the principal
    /// stays: that one is proven).
    pub fn described_as(self, baggage: &Baggage) -> Self {
        self.with_baggage(baggage, true)
    }

    /// Fills what the identity leaves open from what the peer said of itself in `baggage`.
    pub fn described_by(self, baggage: &Baggage) -> Self {
        self.with_baggage(baggage, false)
    }

    fn with_baggage(mut self, baggage: &Baggage, replace: bool) -> Self {
        let fields = [
            (&mut self.workload, &baggage.workload_name),
            (&mut self.namespace, &baggage.namespace),
            (&mut self.canonical_service, &baggage.service),
            (&mut self.canonical_revision, &baggage.version),
            (&mut self.cluster, &baggage.cluster),
        ];
        for (field, value) in fields {
            if !value.is_empty() && (replace || field.is_empty()) {
                *field = value.as_str().into();
            }
        }
        self
    }

    /// Only the identity is known (an HBONE peer the state does not describe).
    pub fn of_identity(identity: &Identity) -> Self {
        Self {
            principal: identity.to_string().into(),
            namespace: identity.namespace.as_str().into(),
            ..Self::default()
        }
    }
}

/// `response_flags` of a connection refused by an authorization policy (as ztunnel reports it).
pub const DENIED: &str = "DENY";
/// `response_flags` of a connection that could not reach its destination.
pub const CONNECT_FAILED: &str = "CONNECT";

/// How a connection ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Both directions finished.
    Closed,
    /// Torn down by an error on either side.
    Reset(String),
    /// A policy change denied it while open.
    Revoked(String),
    /// Never carried: `flags` is [`DENIED`] (policy) or [`CONNECT_FAILED`] (no endpoint,
    /// upstream unreachable, tunnel refused).
    Failed { flags: &'static str, reason: String },
}

impl From<&How> for Outcome {
    fn from(how: &How) -> Self {
        match how {
            How::Closed => Self::Closed,
            How::Reset(error) => Self::Reset(error.to_string()),
            How::Revoked(reason) => Self::Revoked(reason.clone()),
        }
    }
}

/// The addresses of a connection, as the access log shows them.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    /// The client application's address.
    pub src: SocketAddr,
    /// What the application connected to (a service address, say).
    pub original_dst: SocketAddr,
    /// Where the connection was delivered (a chosen endpoint, the pod's own address); `None`
    /// when it never got that far.
    pub dst: Option<SocketAddr>,
}

/// An open connection's report; [`Report::close`] (or [`Report::finish`]) finishes it. A report
/// dropped unfinished (a path that forgot it, a panic) closes itself as a reset, so opened and
/// closed counts always agree and every connection has its access line.
pub struct Report {
    finished: bool,
    metrics: Arc<Metrics>,
    reporter: Reporter,
    labels: TcpLabels,
    addrs: Addresses,
    /// Where it went, for the source side (`local`, `hbone`, `gateway`, `passthrough`,
    /// `refused`).
    route: &'static str,
    /// The identity of the east-west gateway it went through.
    gateway: Option<String>,
    started: Instant,
}

/// A report not opened yet: what the source side knows before the connection is carried,
/// to be completed by what carrying it reveals (the far end's own description, for a tunnel
/// through a gateway) and then opened.
pub struct Draft {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    pub destination_service: Option<String>,
    pub mutual_tls: bool,
    pub addrs: Addresses,
    pub route: &'static str,
    /// When the connection was accepted: its duration counts from here, however late the
    /// report is opened.
    pub started: Instant,
}

impl Draft {
    /// Counts the connection as opened.
    pub fn open(self, metrics: &Arc<Metrics>) -> Report {
        let mut report = Report::open(
            metrics,
            self.reporter,
            &self.source,
            &self.destination,
            self.destination_service.as_deref(),
            self.mutual_tls,
            self.addrs,
            self.route,
        );
        report.started = self.started;
        report
    }
}

impl Report {
    /// Counts the connection as opened.
    #[expect(
        clippy::too_many_arguments,
        reason = "each is one label group or address"
    )]
    pub fn open(
        metrics: &Arc<Metrics>,
        reporter: Reporter,
        source: &Peer,
        destination: &Peer,
        destination_service: Option<&str>,
        mutual_tls: bool,
        addrs: Addresses,
        route: &'static str,
    ) -> Self {
        let labels = TcpLabels::new(
            reporter,
            source,
            destination,
            destination_service,
            mutual_tls,
        );
        metrics.opened(&labels);
        Self {
            finished: false,
            metrics: metrics.clone(),
            reporter,
            labels,
            addrs,
            route,
            gateway: None,
            started: Instant::now(),
        }
    }

    /// The connection goes through the east-west gateway with this identity (its address is
    /// the `dst`).
    pub fn through_gateway(&mut self, identity: String) {
        self.gateway = Some(identity);
    }

    /// Where the connection was delivered, once known.
    pub fn delivered_to(&mut self, dst: SocketAddr) {
        self.addrs.dst = Some(dst);
    }

    /// Counts the connection as closed with `request` bytes (client to server) and `response`
    /// bytes (server to client), and writes its access-log line, `message` being what the line
    /// says happened.
    pub fn close(mut self, outcome: Outcome, request: u64, response: u64, message: &str) {
        self.write(outcome, request, response, message);
    }

    /// Closes the report of a relayed connection by how it ended: `what` names the connection
    /// ("outbound connection"), and the line says `closed`, `reset` or `closed by policy`.
    pub fn finish(self, how: &How, request: u64, response: u64, what: &str) {
        let message = match how {
            How::Closed => format!("{what} closed"),
            How::Reset(_) => format!("{what} reset"),
            How::Revoked(_) => format!("{what} closed by policy"),
        };
        self.close(Outcome::from(how), request, response, &message);
    }

    fn write(&mut self, outcome: Outcome, request: u64, response: u64, message: &str) {
        self.finished = true;
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let (result, reason) = match &outcome {
            Outcome::Closed => ("closed", String::new()),
            Outcome::Reset(error) => ("reset", error.clone()),
            Outcome::Revoked(reason) => ("revoked", reason.clone()),
            Outcome::Failed { reason, .. } => ("failed", reason.clone()),
        };
        if let Outcome::Failed { flags, .. } = outcome {
            self.labels.response_flags = flags;
        }
        self.metrics.closed(&self.labels, request, response);
        let l = &self.labels;
        // Fields from the reporting pod's point of view: the source sent the request bytes, the
        // destination received them.
        let (sent, received) = match self.reporter {
            Reporter::Source => (request, response),
            Reporter::Destination => (response, request),
        };
        tracing::info!(
            target: "access",
            reporter = %l.reporter,
            src = %self.addrs.src,
            src_workload = %or_dash(&l.source_workload),
            src_namespace = %or_dash(&l.source_workload_namespace),
            src_identity = %or_dash(&l.source_principal),
            original_dst = %self.addrs.original_dst,
            dst = %self.addrs.dst.map_or_else(|| "-".to_owned(), |dst| dst.to_string()),
            dst_workload = %or_dash(&l.destination_workload),
            dst_namespace = %or_dash(&l.destination_workload_namespace),
            dst_identity = %or_dash(&l.destination_principal),
            dst_service = %or_dash(&l.destination_service),
            route = %self.route,
            gateway_identity = %self.gateway.as_deref().unwrap_or("-"),
            bytes_sent = sent,
            bytes_received = received,
            duration_ms,
            result = %result,
            reason = %or_dash(&reason),
            "{message}"
        );
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if !self.finished {
            self.write(
                Outcome::Reset("dropped before it was reported (mesh-node bug)".into()),
                0,
                0,
                "connection report dropped unfinished",
            );
        }
    }
}

fn or_dash(value: &str) -> &str {
    if value.is_empty() || value == "unknown" {
        "-"
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(metrics: &Arc<Metrics>) -> Report {
        let addrs = Addresses {
            src: "10.0.0.1:40000".parse().unwrap(),
            original_dst: "10.0.0.2:80".parse().unwrap(),
            dst: None,
        };
        Report::open(
            metrics,
            Reporter::Destination,
            &Peer::unknown(),
            &Peer::unknown(),
            None,
            true,
            addrs,
            "inbound",
        )
    }

    /// A source through a gateway keeps the namespace its identity proves and takes the rest
    /// from its `baggage`; a destination's answer replaces what the route guessed, but never
    /// the principal.
    #[test]
    fn baggage_fills_or_replaces_labels_but_never_the_principal() {
        let said = Baggage::parse(
            "k8s.cluster.name=c1,k8s.namespace.name=elsewhere,k8s.deployment.name=client",
        );
        let source = Peer::of_identity(&Identity::new("cluster.local", "shop", "client"))
            .described_by(&said);
        assert_eq!(
            (
                source.namespace.as_ref(),
                source.workload.as_ref(),
                source.cluster.as_ref()
            ),
            ("shop", "client", "c1")
        );
        let guessed = Peer {
            workload: "echo".into(),
            namespace: "default".into(),
            principal: "spiffe://cluster.local/ns/default/sa/server2".into(),
            ..Peer::default()
        };
        let answer = Baggage::parse("k8s.deployment.name=server2,k8s.cluster.name=c2");
        let destination = guessed.described_as(&answer);
        assert_eq!(
            (
                destination.workload.as_ref(),
                destination.namespace.as_ref(),
                destination.cluster.as_ref(),
                destination.principal.as_ref()
            ),
            (
                "server2",
                "default",
                "c2",
                "spiffe://cluster.local/ns/default/sa/server2"
            )
        );
    }

    fn closed(metrics: &Metrics) -> String {
        metrics
            .sample_lines("istio_tcp_connections_closed_total")
            .concat()
    }

    /// A report dropped without being closed (a forgotten path, a panic) still counts as
    /// closed, as a reset: opened and closed always agree.
    #[test]
    fn a_report_dropped_unfinished_closes_itself() {
        let metrics = Arc::new(Metrics::new());
        drop(open(&metrics));
        let line = closed(&metrics);
        assert!(line.ends_with(" 1"), "{line}");

        // Finished once, counted once.
        let metrics = Arc::new(Metrics::new());
        open(&metrics).finish(&How::Closed, 10, 20, "test connection");
        let line = closed(&metrics);
        assert!(line.ends_with(" 1"), "{line}");
        assert!(metrics.encode().contains("istio_tcp_received_bytes_total"));
    }
}
