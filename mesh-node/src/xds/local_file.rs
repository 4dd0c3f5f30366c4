//! The local state file: the mesh's workloads in YAML, for running without a control plane.
//!
//! ```yaml
//! workloads:
//!   - uid: cluster1//Pod/default/server   # optional, default "<namespace>/<name>"
//!     name: server
//!     namespace: default
//!     serviceAccount: server              # optional, default "default"
//!     trustDomain: cluster.local          # optional, default: mesh-node's trust domain
//!     addresses: [10.0.2.7]
//!     node: node-b
//!     tunnelProtocol: HBONE               # HBONE or NONE (default)
//!     network: ""                         # optional
//! ```
use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    identity::is_valid_trust_domain,
    state::{TunnelProtocol, Workload},
};

#[derive(Debug, thiserror::Error)]
pub enum LocalFileError {
    #[error("read local state file {path}: {io_error}")]
    Read { path: PathBuf, io_error: io::Error },
    /// serde_yaml's message names the field path with line and column.
    #[error("local state file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("local state file {path}: workloads[{index}]: {message}")]
    Invalid {
        path: PathBuf,
        index: usize,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    workloads: Vec<WorkloadEntry>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "UPPERCASE")]
enum ProtocolEntry {
    None,
    Hbone,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadEntry {
    #[serde(default)]
    uid: Option<String>,
    name: String,
    namespace: String,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    trust_domain: Option<String>,
    addresses: Vec<IpAddr>,
    #[serde(default)]
    node: String,
    #[serde(default)]
    tunnel_protocol: Option<ProtocolEntry>,
    #[serde(default)]
    network: String,
}

/// Reads and validates a local state file; `trust_domain` fills in workloads that omit theirs.
pub fn load(path: &Path, trust_domain: &str) -> Result<Vec<Workload>, LocalFileError> {
    let text = fs::read_to_string(path).map_err(|io_error| LocalFileError::Read {
        path: path.to_owned(),
        io_error,
    })?;
    parse(path, &text, trust_domain)
}

/// Parses local-state text; `path` is used only in messages.
pub fn parse(path: &Path, text: &str, trust_domain: &str) -> Result<Vec<Workload>, LocalFileError> {
    let file: File = serde_yaml::from_str(text).map_err(|error| LocalFileError::Parse {
        path: path.to_owned(),
        message: error.to_string(),
    })?;
    let mut uids = HashSet::new();
    let mut owners: HashMap<IpAddr, String> = HashMap::new();
    let mut workloads = Vec::with_capacity(file.workloads.len());
    for (index, entry) in file.workloads.into_iter().enumerate() {
        let invalid = |message: String| LocalFileError::Invalid {
            path: path.to_owned(),
            index,
            message,
        };
        let WorkloadEntry {
            uid,
            name,
            namespace,
            service_account,
            trust_domain: workload_trust_domain,
            addresses,
            node,
            tunnel_protocol,
            network,
        } = entry;
        for (field, value) in [("name", &name), ("namespace", &namespace)] {
            if value.trim().is_empty() {
                return Err(invalid(format!("field `{field}` must not be empty")));
            }
        }
        if addresses.is_empty() {
            return Err(invalid(
                "field `addresses` must list at least one IP".to_owned(),
            ));
        }
        let trust_domain = workload_trust_domain.unwrap_or_else(|| trust_domain.to_owned());
        if !is_valid_trust_domain(&trust_domain) {
            return Err(invalid(format!(
                "trustDomain {trust_domain:?} may hold only a-z, 0-9, '.', '-' and '_'"
            )));
        }
        let service_account = service_account.unwrap_or_else(|| "default".to_owned());
        if service_account.trim().is_empty() || service_account.contains('/') {
            return Err(invalid(format!(
                "serviceAccount {service_account:?} is not a name"
            )));
        }
        let uid = uid.unwrap_or_else(|| format!("{namespace}/{name}"));
        if !uids.insert(uid.clone()) {
            return Err(invalid(format!("duplicate uid {uid}")));
        }
        // One address, one workload: otherwise which identity a tunnel expects would depend on
        // the order of the file.
        for ip in &addresses {
            if let Some(other) = owners.insert(ip.to_canonical(), uid.clone()) {
                return Err(invalid(format!(
                    "addresses: {ip} is already the address of workload {other}"
                )));
            }
        }
        workloads.push(Workload {
            uid,
            name,
            namespace,
            service_account,
            trust_domain,
            addresses: addresses.iter().map(IpAddr::to_canonical).collect(),
            network,
            node,
            protocol: match tunnel_protocol {
                Some(ProtocolEntry::Hbone) => TunnelProtocol::Hbone,
                Some(ProtocolEntry::None) | None => TunnelProtocol::None,
            },
        });
    }
    Ok(workloads)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Vec<Workload>, LocalFileError> {
        parse(Path::new("state.yaml"), text, "cluster.local")
    }

    #[test]
    fn reads_workloads_with_defaults() {
        let workloads = parse_str(
            "workloads:\n  - name: server\n    namespace: default\n    addresses: [10.0.0.7]\n    tunnelProtocol: HBONE\n    serviceAccount: srv\n  - name: legacy\n    namespace: default\n    addresses: [10.0.0.8]\n",
        )
        .unwrap();
        assert_eq!(workloads[0].uid, "default/server");
        assert_eq!(workloads[0].protocol, TunnelProtocol::Hbone);
        assert_eq!(
            workloads[0].identity().to_string(),
            "spiffe://cluster.local/ns/default/sa/srv"
        );
        assert_eq!(workloads[1].protocol, TunnelProtocol::None);
        assert_eq!(workloads[1].service_account, "default");
    }

    #[test]
    fn errors_name_the_file_and_the_entry() {
        let error = parse_str("workloads:\n  - name: a\n    namespace: b\n    addresses: []\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "local state file state.yaml: workloads[0]: field `addresses` must list at least one IP"
        );
        let error = parse_str("workloads:\n  - name: a\n    namespace: b\n    addresses: [x]\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("local state file state.yaml: workloads[0].addresses[0]"),
            "{error}"
        );
        let error = parse_str("workloads:\n  - name: a\n    namespace: b\n    addresses: [10.0.0.1]\n    tunnelProtocol: QUIC\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown variant `QUIC`"), "{error}");
        let error = parse_str("workloads:\n  - {name: a, namespace: b, addresses: [10.0.0.1]}\n  - {name: a, namespace: b, addresses: [10.0.0.2]}\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.ends_with("workloads[1]: duplicate uid b/a"),
            "{error}"
        );
    }
}
