//! Which pods of this node are in the mesh: Istio ambient's selectors, decided from the pod and
//! its namespace alone (pure; the watcher feeds it).
//!
//! As istio-cni's enablement check: a pod is enrolled when its namespace carries
//! `istio.io/dataplane-mode=ambient` or the pod itself does, unless the pod says
//! `istio.io/dataplane-mode=none`; never a host-network pod, a pod with a sidecar, mesh-node's
//! own pod, or a pod that is not running.
use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::config::KubeSettings;

/// The annotation istiod reads to treat a workload as captured (HBONE-capable).
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
pub const REDIRECTION_ENABLED: &str = "enabled";
/// `"false"` on a pod keeps its DNS queries away from mesh-node's DNS proxy.
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";
/// Set by the sidecar injector on pods that carry an Istio sidecar.
const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
const SIDECAR_CONTAINER: &str = "istio-proxy";

/// The label and values that enable and disable a pod or namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub label: String,
    pub enabled: String,
    pub disabled: String,
    /// mesh-node's own pod (`namespace`, `name`), never enrolled.
    pub own_pod: Option<(String, String)>,
}

impl Default for Selector {
    fn default() -> Self {
        Self {
            label: "istio.io/dataplane-mode".to_owned(),
            enabled: "ambient".to_owned(),
            disabled: "none".to_owned(),
            own_pod: None,
        }
    }
}

/// A pod the selectors put in the mesh, with what enrolling it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub dns_capture: bool,
}

impl Wanted {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why a pod stays out of the mesh (shown at debug level and in tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    Incomplete,
    NotSelected,
    OptedOut,
    HostNetwork,
    Sidecar,
    OwnPod,
    NotRunning,
    NoAddress,
}

impl Selector {
    pub fn new(settings: &KubeSettings) -> Self {
        Self {
            label: settings.label.clone(),
            enabled: settings.enabled_value.clone(),
            disabled: settings.disabled_value.clone(),
            own_pod: settings.own_pod.clone(),
        }
    }

    /// Whether `pod` (in `namespace`, when the namespace is known) is enrolled.
    pub fn decide(&self, pod: &Pod, namespace: Option<&Namespace>) -> Result<Wanted, Skip> {
        let meta = &pod.metadata;
        let (Some(ns), Some(name), Some(uid)) = (&meta.namespace, &meta.name, &meta.uid) else {
            return Err(Skip::Incomplete);
        };
        let pod_mode = label(meta.labels.as_ref(), &self.label);
        if pod_mode == Some(self.disabled.as_str()) {
            return Err(Skip::OptedOut);
        }
        let ns_mode = namespace.and_then(|n| label(n.metadata.labels.as_ref(), &self.label));
        if pod_mode != Some(self.enabled.as_str()) && ns_mode != Some(self.enabled.as_str()) {
            return Err(Skip::NotSelected);
        }
        let spec = pod.spec.as_ref();
        if spec.and_then(|s| s.host_network) == Some(true) {
            return Err(Skip::HostNetwork);
        }
        let sidecar_annotated = meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION));
        let sidecar_container = spec.is_some_and(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == SIDECAR_CONTAINER)
        });
        if sidecar_annotated || sidecar_container {
            return Err(Skip::Sidecar);
        }
        if self
            .own_pod
            .as_ref()
            .is_some_and(|(own_ns, own_name)| own_ns == ns && own_name == name)
        {
            return Err(Skip::OwnPod);
        }
        let status = pod.status.as_ref();
        if status.and_then(|s| s.phase.as_deref()) != Some("Running") {
            return Err(Skip::NotRunning);
        }
        let ips = pod_ips(pod);
        if ips.is_empty() {
            return Err(Skip::NoAddress);
        }
        let service_account = spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let dns_capture = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(DNS_CAPTURE_ANNOTATION))
            .is_none_or(|value| value != "false");
        Ok(Wanted {
            namespace: ns.clone(),
            name: name.clone(),
            uid: uid.clone(),
            service_account,
            ips,
            dns_capture,
        })
    }
}

fn label<'a>(labels: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.and_then(|l| l.get(key)).map(String::as_str)
}

/// `status.podIPs` (every family, primary first), else `status.podIP`; unparsable entries are
/// skipped (the API server validates them, so there are none in practice).
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let listed: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if !listed.is_empty() {
        return listed;
    }
    status
        .pod_ip
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

/// The pod carries mesh-node's redirection annotation.
pub fn is_annotated(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REDIRECTION_ANNOTATION))
        .is_some_and(|v| v == REDIRECTION_ENABLED)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(extra: serde_json::Value) -> Pod {
        let mut base = json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1"},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                       "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        });
        merge(&mut base, extra);
        serde_json::from_value(base).unwrap()
    }

    fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
        match (base, patch) {
            (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, p) => *b = p,
        }
    }

    fn namespace(labels: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": "shop", "labels": labels}})).unwrap()
    }

    fn ambient_ns() -> Namespace {
        namespace(json!({"istio.io/dataplane-mode": "ambient"}))
    }

    #[test]
    fn namespace_label_enrolls_with_the_pods_identity_and_every_address() {
        let wanted = Selector::default()
            .decide(&pod(json!({})), Some(&ambient_ns()))
            .unwrap();
        assert_eq!(wanted.key(), "shop/web-1");
        assert_eq!(wanted.uid, "u-1");
        assert_eq!(wanted.service_account, "web");
        assert_eq!(
            wanted.ips,
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn pod_label_enrolls_or_opts_out() {
        let selector = Selector::default();
        let labelled = pod(json!({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}}));
        assert!(
            selector
                .decide(&labelled, Some(&namespace(json!({}))))
                .is_ok()
        );
        assert!(selector.decide(&labelled, None).is_ok());
        let opted_out = pod(json!({"metadata": {"labels": {"istio.io/dataplane-mode": "none"}}}));
        assert_eq!(
            selector.decide(&opted_out, Some(&ambient_ns())),
            Err(Skip::OptedOut)
        );
        assert_eq!(
            selector.decide(&pod(json!({})), Some(&namespace(json!({"other": "x"})))),
            Err(Skip::NotSelected)
        );
        assert_eq!(
            selector.decide(&pod(json!({})), None),
            Err(Skip::NotSelected)
        );
    }

    #[test]
    fn label_key_and_values_are_configurable() {
        let selector = Selector {
            label: "mesh".into(),
            enabled: "on".into(),
            disabled: "off".into(),
            own_pod: None,
        };
        assert!(
            selector
                .decide(&pod(json!({})), Some(&namespace(json!({"mesh": "on"}))))
                .is_ok()
        );
        assert_eq!(
            selector.decide(&pod(json!({})), Some(&ambient_ns())),
            Err(Skip::NotSelected)
        );
        let off = pod(json!({"metadata": {"labels": {"mesh": "off"}}}));
        assert_eq!(
            selector.decide(&off, Some(&namespace(json!({"mesh": "on"})))),
            Err(Skip::OptedOut)
        );
    }

    #[test]
    fn never_enrolled() {
        let selector = Selector {
            own_pod: Some(("shop".into(), "web-1".into())),
            ..Selector::default()
        };
        let ns = ambient_ns();
        assert_eq!(
            selector.decide(&pod(json!({})), Some(&ns)),
            Err(Skip::OwnPod)
        );
        let selector = Selector::default();
        let cases = [
            (json!({"spec": {"hostNetwork": true}}), Skip::HostNetwork),
            (
                json!({"metadata": {"annotations": {"sidecar.istio.io/status": "{}"}}}),
                Skip::Sidecar,
            ),
            (
                json!({"spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]}}),
                Skip::Sidecar,
            ),
            (
                json!({"spec": {"initContainers": [{"name": "istio-proxy"}]}}),
                Skip::Sidecar,
            ),
            (json!({"status": {"phase": "Pending"}}), Skip::NotRunning),
            (json!({"status": {"phase": "Succeeded"}}), Skip::NotRunning),
            (json!({"status": {"phase": "Failed"}}), Skip::NotRunning),
            (
                json!({"status": {"podIP": null, "podIPs": null}}),
                Skip::NoAddress,
            ),
            (json!({"metadata": {"uid": null}}), Skip::Incomplete),
        ];
        for (extra, skip) in cases {
            assert_eq!(
                selector.decide(&pod(extra.clone()), Some(&ns)),
                Err(skip),
                "{extra}"
            );
        }
    }

    #[test]
    fn defaults_the_service_account_and_falls_back_to_pod_ip() {
        let p = pod(json!({"spec": {"serviceAccountName": null}, "status": {"podIPs": null}}));
        let wanted = Selector::default().decide(&p, Some(&ambient_ns())).unwrap();
        assert_eq!(wanted.service_account, "default");
        assert_eq!(wanted.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn dns_capture_is_on_unless_the_pod_says_false() {
        let ns = ambient_ns();
        let selector = Selector::default();
        assert!(
            selector
                .decide(&pod(json!({})), Some(&ns))
                .unwrap()
                .dns_capture
        );
        let off =
            pod(json!({"metadata": {"annotations": {"ambient.istio.io/dns-capture": "false"}}}));
        assert!(!selector.decide(&off, Some(&ns)).unwrap().dns_capture);
    }

    #[test]
    fn annotation_is_recognised() {
        assert!(!is_annotated(&pod(json!({}))));
        let annotated =
            pod(json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}}));
        assert!(is_annotated(&annotated));
    }
}
