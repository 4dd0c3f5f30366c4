//! The Prometheus registry: Istio's standard TCP metrics, plus mesh-node's own xDS, certificate
//! and eBPF counters. Served as text on :15020 (`/stats/prometheus`, `/metrics`).
use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError},
};

use mesh_common::Counter as KernelCounter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use super::{Peer, Reporter};
use crate::dataplane::Dataplane;

/// The labels of Istio's `istio_tcp_*` metrics, named and filled as Istio's proxies fill them
/// ("unknown" where a value is not known).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: Arc<str>,
    pub source_canonical_service: Arc<str>,
    pub source_canonical_revision: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub source_cluster: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_canonical_service: Arc<str>,
    pub destination_canonical_revision: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    pub destination_cluster: Arc<str>,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// How Istio labels what is not known (one shared copy).
static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| "unknown".into());

/// The value, or "unknown".
fn known(value: &Arc<str>) -> Arc<str> {
    if value.is_empty() {
        UNKNOWN.clone()
    } else {
        value.clone()
    }
}

impl TcpLabels {
    pub fn new(
        reporter: Reporter,
        source: &Peer,
        destination: &Peer,
        destination_service: Option<&str>,
        mutual_tls: bool,
    ) -> Self {
        Self {
            reporter: match reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
            source_workload: known(&source.workload),
            source_canonical_service: known(&source.canonical_service),
            source_canonical_revision: known(&source.canonical_revision),
            source_workload_namespace: known(&source.namespace),
            source_principal: known(&source.principal),
            source_cluster: known(&source.cluster),
            destination_service: match destination_service {
                Some(service) if !service.is_empty() => service.into(),
                _ => UNKNOWN.clone(),
            },
            destination_workload: known(&destination.workload),
            destination_canonical_service: known(&destination.canonical_service),
            destination_canonical_revision: known(&destination.canonical_revision),
            destination_workload_namespace: known(&destination.namespace),
            destination_principal: known(&destination.principal),
            destination_cluster: known(&destination.cluster),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if mutual_tls { "mutual_tls" } else { "unknown" },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeOnly {
    type_url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabel {
    type_url: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    type_url: String,
    result: &'static str,
}

/// Every metric mesh-node exports.
pub struct Metrics {
    registry: Registry,
    dataplane: Arc<OnceLock<Arc<Dataplane>>>,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    xds_updates: Family<TypeLabel, Counter>,
    xds_rejections: Family<TypeOnly, Counter>,
    xds_rejected: Family<ResourceLabel, Gauge>,
    rejected_shown: Mutex<HashSet<ResourceLabel>>,
    xds_connected: Gauge,
    certs: Family<ResultLabel, Gauge>,
    hbone_refused: Family<ReasonLabel, Counter>,
    inner_handshakes: Family<KindLabel, Counter>,
    dns_requests: Family<ResultLabel, Counter>,
    open_connections: Gauge,
    drain_cut: Counter,
    dns_upstream: Histogram,
    authz_recheck: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The registry. The kernel's counters appear once [`Metrics::attach_dataplane`] is called
    /// and are read at each scrape.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let tcp = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<TcpLabels, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let opened = tcp(
            &mut registry,
            "istio_tcp_connections_opened",
            "Connections opened",
        );
        let closed = tcp(
            &mut registry,
            "istio_tcp_connections_closed",
            "Connections closed",
        );
        let received = tcp(
            &mut registry,
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction)",
        );
        let sent = tcp(
            &mut registry,
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (response direction)",
        );
        let xds_updates = Family::<TypeLabel, Counter>::default();
        registry.register(
            "mesh_xds_updates",
            "xDS responses by type and whether they were applied (ack) or refused (nack)",
            xds_updates.clone(),
        );
        let xds_rejections = Family::<TypeOnly, Counter>::default();
        registry.register(
            "mesh_xds_rejected_resources",
            "xDS resources refused (each is named in the NACK and in mesh_xds_rejected_resource)",
            xds_rejections.clone(),
        );
        let xds_rejected = Family::<ResourceLabel, Gauge>::default();
        registry.register(
            "mesh_xds_rejected_resource",
            "1 for each resource whose latest version was refused; its last good version stays in force",
            xds_rejected.clone(),
        );
        let xds_connected = Gauge::default();
        registry.register(
            "mesh_xds_connected",
            "1 while the control-plane stream is up",
            xds_connected.clone(),
        );
        let certs = Family::<ResultLabel, Gauge>::default();
        registry.register(
            "mesh_workload_certificates",
            "Workload certificates by state (valid, missing: not issued or expired)",
            certs.clone(),
        );
        let hbone_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "mesh_hbone_handshakes_refused",
            "Connections to a pod's 15008 refused before HBONE was established, by reason (tls, identity, http2, timeout, no_certificate); every one is counted, the log only samples them",
            hbone_refused.clone(),
        );
        let inner_handshakes = Family::<KindLabel, Counter>::default();
        registry.register(
            "mesh_hbone_inner_handshakes",
            "TLS handshakes of double HBONE's inner connections (through an east-west gateway), by kind: full, or resumed from an earlier session",
            inner_handshakes.clone(),
        );
        let dns_requests = Family::<ResultLabel, Counter>::default();
        registry.register(
            "mesh_dns_requests",
            "DNS queries of enrolled pods seen by their DNS proxy, by result: answered (a mesh name), forwarded (to the pod's resolver, answered), servfail (the resolver failed or timed out), formerr (malformed), dropped (not even a header, or too many in flight)",
            dns_requests.clone(),
        );
        let dns_upstream = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register(
            "mesh_dns_upstream_duration_seconds",
            "Time the pods' resolvers took to answer forwarded queries",
            dns_upstream.clone(),
        );
        let authz_recheck =
            Histogram::new([0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]);
        registry.register(
            "mesh_authz_recheck_duration_seconds",
            "Time taken to authorize every open connection again after a change of policy (under the state's write lock)",
            authz_recheck.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "mesh_connections_open",
            "Connections mesh-node relays right now, one per side it reports (a connection between two pods of this node counts twice)",
            open_connections.clone(),
        );
        let drain_cut = Counter::default();
        registry.register(
            "mesh_drain_cut_connections",
            "Connections still open when a drain's deadline came, and cut",
            drain_cut.clone(),
        );
        let dataplane = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(KernelCounters(dataplane.clone())));
        Self {
            registry,
            dataplane,
            opened,
            closed,
            received,
            sent,
            xds_updates,
            xds_rejections,
            xds_rejected,
            rejected_shown: Mutex::default(),
            xds_connected,
            certs,
            hbone_refused,
            inner_handshakes,
            dns_requests,
            dns_upstream,
            authz_recheck,
            open_connections,
            drain_cut,
        }
    }

    /// Connections open now (reports opened and not yet closed).
    pub fn open_connections(&self) -> i64 {
        self.open_connections.get()
    }

    /// `count` connections were cut at a drain's deadline.
    pub fn drain_cut(&self, count: u64) {
        self.drain_cut.inc_by(count);
    }

    /// A DNS query ended with `result` (`answered`, `forwarded`, `servfail`, `formerr`,
    /// `dropped`).
    pub fn dns_request(&self, result: &'static str) {
        self.dns_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Open connections were authorized again after a policy change, in `seconds`.
    pub fn authz_recheck(&self, seconds: f64) {
        self.authz_recheck.observe(seconds);
    }

    /// A pod's resolver answered a forwarded query after `seconds`.
    pub fn dns_upstream(&self, seconds: f64) {
        self.dns_upstream.observe(seconds);
    }

    /// Exports the programs' decision counters from now on.
    pub fn attach_dataplane(&self, dataplane: Arc<Dataplane>) {
        let _ = self.dataplane.set(dataplane);
    }

    pub fn opened(&self, labels: &TcpLabels) {
        self.opened.get_or_create(labels).inc();
        self.open_connections.inc();
    }

    pub fn closed(&self, labels: &TcpLabels, request: u64, response: u64) {
        self.closed.get_or_create(labels).inc();
        self.open_connections.dec();
        self.received.get_or_create(labels).inc_by(request);
        self.sent.get_or_create(labels).inc_by(response);
    }

    /// An xDS response of `type_url` was applied (`ack`) or refused (`nack`).
    pub fn xds_update(&self, type_url: &str, applied: bool) {
        let type_url = type_url.rsplit('/').next().unwrap_or(type_url).to_owned();
        let result = if applied { "ack" } else { "nack" };
        self.xds_updates
            .get_or_create(&TypeLabel { type_url, result })
            .inc();
    }

    /// `newly` resources of `type_name` were refused by the last response; `now` names every
    /// resource of that type refused at present.
    pub fn xds_rejected<'a>(
        &self,
        type_name: &str,
        newly: usize,
        now: impl Iterator<Item = &'a str>,
    ) {
        self.xds_rejections
            .get_or_create(&TypeOnly {
                type_url: type_name.to_owned(),
            })
            .inc_by(newly as u64);
        let now: HashSet<ResourceLabel> = now
            .map(|name| ResourceLabel {
                type_url: type_name.to_owned(),
                name: name.to_owned(),
            })
            .collect();
        // A Family cannot be listed: remember which labels are set, to take back the ones
        // that were mended or removed.
        let mut shown = self
            .rejected_shown
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shown.retain(|label| {
            let stays = label.type_url != type_name || now.contains(label);
            if !stays {
                self.xds_rejected.remove(label);
            }
            stays
        });
        for label in now {
            self.xds_rejected.get_or_create(&label).set(1);
            shown.insert(label);
        }
    }

    /// A connection to 15008 was refused before HBONE was up.
    pub fn hbone_refused(&self, reason: &'static str) {
        self.hbone_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// An inner TLS handshake of double HBONE completed, `resumed` or full.
    pub fn inner_handshake(&self, resumed: bool) {
        let kind = if resumed { "resumed" } else { "full" };
        self.inner_handshakes
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    pub fn xds_connected(&self, up: bool) {
        self.xds_connected.set(i64::from(up));
    }

    /// Sets the certificate gauges (read from the certificate manager at scrape time).
    pub fn certificates(&self, valid: usize, missing: usize) {
        self.certs
            .get_or_create(&ResultLabel { result: "valid" })
            .set(valid as i64);
        self.certs
            .get_or_create(&ResultLabel { result: "missing" })
            .set(missing as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// The programs' decision counters, summed over CPUs at scrape time.
struct KernelCounters(Arc<OnceLock<Arc<Dataplane>>>);

impl fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KernelCounters")
    }
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(dataplane) = self.0.get() else {
            return Ok(());
        };
        for counter in KernelCounter::ALL {
            let value = ConstCounter::new(dataplane.counter(counter));
            let name = format!("mesh_ebpf_{}", counter.name());
            let metric = encoder.encode_descriptor(
                &name,
                kernel_help(counter),
                None,
                value.metric_type(),
            )?;
            value.encode(metric)?;
        }
        Ok(())
    }
}

fn kernel_help(counter: KernelCounter) -> &'static str {
    match counter {
        KernelCounter::Captured => "Outbound connections redirected to mesh-node",
        KernelCounter::PassedNotServing => {
            "Connections let through because mesh-node was not serving the pod (fail-open)"
        }
        KernelCounter::RefusedNotServing => {
            "Connections refused because mesh-node was not serving the pod (fail-closed)"
        }
        KernelCounter::PassedMapFull => {
            "Connections let through uncaptured because the original-destination map was full"
        }
        KernelCounter::PeerRestored => {
            "getpeername() answers rewritten to the original destination"
        }
        KernelCounter::InboundCaptured => "Inbound connections steered to mesh-node",
        KernelCounter::InboundNotServing => {
            "Inbound connections let through because no mesh-node listener was registered"
        }
        KernelCounter::TraceDropped => "Trace events dropped because the ring buffer was full",
        KernelCounter::SockJoined => {
            "Sockets joined to the kernel path for same-node connections (--kernel-same-node)"
        }
        KernelCounter::MsgRedirected => {
            "Application writes the kernel sent straight out of mesh-node's socket (--kernel-same-node)"
        }
        KernelCounter::MsgRedirectFailed => {
            "Writes of a paired socket whose target was gone, sent the ordinary way"
        }
    }
}

#[cfg(test)]
impl Metrics {
    /// The exposition's sample lines of `metric` (any labels), for tests across the crate.
    pub(crate) fn sample_lines(&self, metric: &str) -> Vec<String> {
        self.encode()
            .lines()
            .filter(|line| {
                line.strip_prefix(metric)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Peer;

    #[test]
    fn tcp_metrics_have_istio_names_labels_and_amounts() {
        let metrics = Metrics::new();
        let source = Peer {
            workload: "client".into(),
            namespace: "shop".into(),
            principal: "spiffe://cluster.local/ns/shop/sa/client".into(),
            ..Peer::default()
        };
        let labels = TcpLabels::new(
            Reporter::Source,
            &source,
            &Peer::unknown(),
            Some("cart.shop.svc.cluster.local"),
            true,
        );
        metrics.opened(&labels);
        metrics.opened(&labels);
        metrics.closed(&labels, 1000, 20);
        metrics.closed(&labels, 24, 0);
        let text = metrics.encode();
        let line = |name: &str| {
            let name = name.trim_end_matches('{');
            metrics
                .sample_lines(name)
                .pop()
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        };
        assert!(
            line("istio_tcp_connections_opened_total{").ends_with(" 2"),
            "{text}"
        );
        assert!(line("istio_tcp_connections_closed_total{").ends_with(" 2"));
        assert!(line("istio_tcp_received_bytes_total{").ends_with(" 1024"));
        assert!(line("istio_tcp_sent_bytes_total{").ends_with(" 20"));
        let opened = line("istio_tcp_connections_opened_total{");
        for label in [
            "reporter=\"source\"",
            "source_workload=\"client\"",
            "source_workload_namespace=\"shop\"",
            "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"",
            "destination_service=\"cart.shop.svc.cluster.local\"",
            "destination_workload=\"unknown\"",
            "connection_security_policy=\"mutual_tls\"",
            "response_flags=\"-\"",
            "request_protocol=\"tcp\"",
        ] {
            assert!(opened.contains(label), "{label} not in {opened}");
        }
    }

    #[test]
    fn xds_and_certificate_counters_are_labelled() {
        let metrics = Metrics::new();
        metrics.xds_update("type.googleapis.com/istio.workload.Address", true);
        metrics.xds_update("type.googleapis.com/istio.workload.Address", false);
        metrics.certificates(2, 1);
        metrics.xds_connected(true);
        let text = metrics.encode();
        assert!(
            text.contains(
                "mesh_xds_updates_total{type_url=\"istio.workload.Address\",result=\"ack\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "mesh_xds_updates_total{type_url=\"istio.workload.Address\",result=\"nack\"} 1"
        ));
        assert!(
            text.contains("mesh_workload_certificates{result=\"valid\"} 2"),
            "{text}"
        );
        assert!(text.contains("mesh_workload_certificates{result=\"missing\"} 1"));
        assert!(text.contains("mesh_xds_connected 1"));
    }
}
