//! The W3C `baggage` header as Istio's node proxies fill it on a CONNECT: who the application
//! on the other end is, for metrics and the access log. It is the only description of the
//! source a destination has when the tunnel came through an east-west gateway (the TCP peer is
//! the gateway, the source's address belongs to another network), so it is sent on every
//! CONNECT. Keys as ztunnel reads and writes them; unknown keys are ignored.

/// What a `baggage` header says about a workload; empty fields are absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: String,
    pub namespace: String,
    /// `k8s.<kind>.name`, with `workload_kind` as the kind.
    pub workload_name: String,
    /// "deployment", "pod", "job" or "cronjob".
    pub workload_kind: String,
    /// `service.name`: the canonical service.
    pub service: String,
    /// `service.version`: the canonical revision.
    pub version: String,
    pub region: String,
    pub zone: String,
}

/// The kinds `k8s.<kind>.name` may name.
const KINDS: [&str; 4] = ["deployment", "pod", "job", "cronjob"];

impl Baggage {
    /// The header value: `k8s.cluster.name=c1,k8s.namespace.name=ns,…`. Values are written as
    /// they are when they are plain tokens, and left out otherwise (a header must not be
    /// malformed by a name the control plane sent).
    pub fn to_header(&self) -> String {
        let kind = if KINDS.contains(&self.workload_kind.as_str()) {
            self.workload_kind.as_str()
        } else {
            "pod"
        };
        let workload_key = format!("k8s.{kind}.name");
        let pairs = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (workload_key.as_str(), &self.workload_name),
            ("service.name", &self.service),
            ("service.version", &self.version),
            ("cloud.region", &self.region),
            ("cloud.availability_zone", &self.zone),
        ];
        let mut value = String::new();
        for (key, field) in pairs {
            if field.is_empty() || !field.bytes().all(is_value_byte) {
                continue;
            }
            if !value.is_empty() {
                value.push(',');
            }
            value.push_str(key);
            value.push('=');
            value.push_str(field);
        }
        value
    }

    /// Reads a header value; what it does not recognise is skipped, never an error (the
    /// header is a description, not a credential).
    pub fn parse(value: &str) -> Self {
        let mut baggage = Self::default();
        for member in value.split(',') {
            // A member may carry `;property` parts after its value.
            let member = member.split(';').next().unwrap_or_default();
            let Some((key, field)) = member.split_once('=') else {
                continue;
            };
            let (key, field) = (key.trim(), field.trim().to_owned());
            match key {
                "k8s.cluster.name" => baggage.cluster = field,
                "k8s.namespace.name" => baggage.namespace = field,
                "service.name" => baggage.service = field,
                "service.version" => baggage.version = field,
                "cloud.region" => baggage.region = field,
                "cloud.availability_zone" => baggage.zone = field,
                _ => {
                    if let Some(kind) = key
                        .strip_prefix("k8s.")
                        .and_then(|rest| rest.strip_suffix(".name"))
                        .filter(|kind| KINDS.contains(kind))
                    {
                        baggage.workload_kind = kind.to_owned();
                        baggage.workload_name = field;
                    }
                }
            }
        }
        baggage
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Takes every field `more` sets (a later `baggage` header wins over an earlier one).
    pub fn merge(&mut self, more: Baggage) {
        let fields = [
            (&mut self.cluster, more.cluster),
            (&mut self.namespace, more.namespace),
            (&mut self.workload_name, more.workload_name),
            (&mut self.workload_kind, more.workload_kind),
            (&mut self.service, more.service),
            (&mut self.version, more.version),
            (&mut self.region, more.region),
            (&mut self.zone, more.zone),
        ];
        for (field, value) in fields {
            if !value.is_empty() {
                *field = value;
            }
        }
    }
}

/// A byte a baggage value may hold unencoded (W3C baggage: no whitespace, quotes, commas,
/// semicolons or backslashes).
fn is_value_byte(byte: u8) -> bool {
    byte.is_ascii_graphic() && !matches!(byte, b'"' | b',' | b';' | b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_what_ztunnel_writes() {
        let header = "k8s.cluster.name=K1,k8s.namespace.name=NS1,k8s.deployment.name=N1,service.name=N2,service.version=V1";
        let baggage = Baggage::parse(header);
        assert_eq!(
            baggage,
            Baggage {
                cluster: "K1".into(),
                namespace: "NS1".into(),
                workload_name: "N1".into(),
                workload_kind: "deployment".into(),
                service: "N2".into(),
                version: "V1".into(),
                ..Baggage::default()
            }
        );
        assert_eq!(baggage.to_header(), header);
    }

    #[test]
    fn skips_what_it_does_not_know_and_what_would_break_the_header() {
        let baggage =
            Baggage::parse("foo=bar, k8s.namespace.name = shop ;p=1,k8s.widget.name=x,broken");
        assert_eq!(baggage.namespace, "shop");
        assert_eq!(baggage.workload_name, "");
        let odd = Baggage {
            namespace: "a,b".into(),
            cluster: "c1".into(),
            ..Baggage::default()
        };
        assert_eq!(odd.to_header(), "k8s.cluster.name=c1");
        assert!(Baggage::parse("").is_empty());
    }
}
