//! Every manifest under deploy/ as kustomize renders it, parsed into the typed Kubernetes
//! objects: a field the API does not have (a typo, a wrong level of indentation) is lost in the
//! round trip through the typed object, and the test names it. Then what the DaemonSet must say
//! for mesh-node to work (the flags and mounts it reads, the rollout that keeps capture up).
use std::{path::Path, process::Command};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// `kubectl kustomize deploy/<dir>`, one JSON value per document.
fn render(dir: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .expect("run kubectl kustomize (kubectl is installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let yaml = serde_yaml::Value::deserialize_from(doc);
            serde_json::to_value(yaml).expect("YAML as JSON")
        })
        .collect()
}

trait DeserializeFrom {
    fn deserialize_from(doc: serde_yaml::Deserializer<'_>) -> Self;
}

impl DeserializeFrom for serde_yaml::Value {
    fn deserialize_from(doc: serde_yaml::Deserializer<'_>) -> Self {
        serde::Deserialize::deserialize(doc).expect("a YAML document")
    }
}

/// Parses `doc` as `T` and back; every field of the document must survive.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let name = format!("{}/{}", doc["kind"], doc["metadata"]["name"]);
    let object: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|error| panic!("{name}: not a valid object: {error}"));
    let back = serde_json::to_value(&object).expect("serialize");
    let mut lost = Vec::new();
    missing(doc, &back, String::new(), &mut lost);
    assert!(
        lost.is_empty(),
        "{name}: fields the API does not know: {lost:?}"
    );
    object
}

/// Paths present in `original` but absent (or different) in `round_trip`.
fn missing(original: &Value, round_trip: &Value, path: String, lost: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => missing(value, other, here, lost),
                    // Empty values the typed object leaves out are not a loss.
                    None if value.is_null() || value == &Value::Object(Default::default()) => {}
                    None => lost.push(here),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                missing(x, y, format!("{path}[{i}]"), lost);
            }
        }
        (a, b) if a == b => {}
        // Kubernetes accepts numbers written as strings in a few places; nothing here does that.
        _ => lost.push(format!("{path} ({original} became {round_trip})")),
    }
}

fn check_all(docs: &[Value]) {
    for doc in docs {
        match doc["kind"].as_str().unwrap_or("") {
            "ServiceAccount" => drop(typed::<ServiceAccount>(doc)),
            "ClusterRole" => drop(typed::<ClusterRole>(doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(doc)),
            "ConfigMap" => drop(typed::<ConfigMap>(doc)),
            "DaemonSet" => drop(typed::<DaemonSet>(doc)),
            "Deployment" => drop(typed::<Deployment>(doc)),
            "Service" => drop(typed::<Service>(doc)),
            other => panic!("deploy/ renders a {other} the test does not check"),
        }
    }
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

/// The check itself: a misspelled field and a field one level too deep are both reported.
#[test]
fn the_round_trip_catches_unknown_fields() {
    let doc = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"spec": {
                "hostNetwrok": true,
                "containers": [{"name": "c", "image": "i", "readinessProbe": {"path": "/ready"}}]
            }}
        }
    });
    let object: DaemonSet = serde_json::from_value(doc.clone()).expect("parses");
    let mut lost = Vec::new();
    missing(
        &doc,
        &serde_json::to_value(&object).expect("serialize"),
        String::new(),
        &mut lost,
    );
    assert_eq!(
        lost,
        [
            ".spec.template.spec.containers[0].readinessProbe.path",
            ".spec.template.spec.hostNetwrok",
        ]
    );
}

#[test]
fn every_rendered_manifest_is_a_valid_typed_object() {
    for dir in ["", "base", "overlays/example", "gateway"] {
        let docs = render(dir);
        assert!(!docs.is_empty(), "deploy/{dir} renders nothing");
        check_all(&docs);
    }
}

#[test]
fn the_daemonset_runs_kubernetes_enrollment_with_what_it_needs() {
    let docs = render("");
    let ds: DaemonSet = typed(find(&docs, "DaemonSet"));
    let spec = ds.spec.expect("spec");
    let rolling = spec
        .update_strategy
        .and_then(|s| s.rolling_update)
        .expect("a rolling update");
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    // Hitless: the new mesh-node starts beside the old one and takes over its sockets.
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    // Declared ports would be host ports, which keep the surge pod off the node.
    assert!(
        pod.containers.iter().all(|c| c.ports.is_none()),
        "no declared ports on a host-network DaemonSet that surges"
    );
    assert!(pod.termination_grace_period_seconds.unwrap_or(0) >= 30);
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap_or_default();
    for flag in ["--kubernetes", "--host-proc=/host/proc"] {
        assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
    }
    let env: Vec<String> = container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect();
    for name in [
        "NODE_NAME",
        "POD_NAME",
        "POD_NAMESPACE",
        "MESH_NODE_XDS_TOKEN_FILE",
    ] {
        assert!(env.contains(&name.to_owned()), "{name} in {env:?}");
    }
    let mounts: Vec<String> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.clone())
        .collect();
    for path in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/host/proc",
        "/var/run/secrets/tokens",
    ] {
        assert!(mounts.contains(&path.to_owned()), "{path} in {mounts:?}");
    }
    let caps = container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    for cap in ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"] {
        assert!(caps.contains(&cap.to_owned()), "{cap} in {caps:?}");
    }
    let probe = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref());
    assert_eq!(
        probe.map(|h| h.path.as_deref()),
        Some(Some("/healthz/ready"))
    );
    let token = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .find_map(|s| s.service_account_token.as_ref())
        .expect("a projected service-account token");
    assert_eq!(token.audience.as_deref(), Some("istio-ca"));

    // Every setting in the ConfigMap is a variable `mesh-node run` reads.
    let config: ConfigMap = typed(find(&docs, "ConfigMap"));
    let help = Command::new(mesh_tests::meshnode::binary())
        .args(["run", "--help"])
        .output()
        .expect("mesh-node run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for key in config.data.unwrap_or_default().keys() {
        if key == "MESH_NODE_LOG" {
            continue; // the log filter, read before the flags
        }
        assert!(
            help.contains(&format!("env: {key}=")),
            "{key} is not a mesh-node setting"
        );
    }
}

#[test]
fn rbac_grants_exactly_what_enrollment_uses() {
    let docs = render("");
    let role: ClusterRole = typed(find(&docs, "ClusterRole"));
    let mut rules: Vec<(String, Vec<String>)> = role
        .rules
        .unwrap_or_default()
        .into_iter()
        .flat_map(|rule| {
            let verbs = rule.verbs.clone();
            rule.resources
                .unwrap_or_default()
                .into_iter()
                .map(move |r| (r, verbs.clone()))
        })
        .collect();
    rules.sort();
    assert_eq!(
        rules,
        vec![
            (
                "namespaces".to_owned(),
                vec!["get".into(), "list".into(), "watch".into()]
            ),
            (
                "pods".to_owned(),
                vec!["get".into(), "list".into(), "watch".into(), "patch".into()]
            ),
        ]
    );
    let binding: ClusterRoleBinding = typed(find(&docs, "ClusterRoleBinding"));
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("mesh-node", Some("istio-system"))
    );
}
