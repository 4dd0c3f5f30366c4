//! The static enrollment file: pods listed in YAML, for running without a Kubernetes API server.
//!
//! ```yaml
//! pods:
//!   - name: client
//!     namespace: default
//!     serviceAccount: sleep        # optional, default "default"
//!     netns: /run/netns/client     # the pod's network namespace file
//!     ips: [10.0.1.2]
//!     dnsCapture: false            # optional, default true: DNS queries go to mesh-node
//! ```
use std::{
    collections::HashSet,
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, de};

use super::PodSpec;

#[derive(Debug, thiserror::Error)]
pub enum StaticFileError {
    #[error("read pods file {path}: {io_error}")]
    Read { path: PathBuf, io_error: io::Error },
    /// serde_yaml's message names the field path and the line and column.
    #[error("pods file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("pods file {path}: pods[{index}]: duplicate pod {namespace}/{name}")]
    DuplicatePod {
        path: PathBuf,
        index: usize,
        namespace: String,
        name: String,
    },
    #[error("pods file {path}: pods[{index}].ips: {ip} is already used by pod {other}")]
    DuplicateIp {
        path: PathBuf,
        index: usize,
        ip: IpAddr,
        other: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    pods: Vec<PodEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodEntry {
    #[serde(deserialize_with = "non_empty_name")]
    name: String,
    #[serde(deserialize_with = "non_empty_namespace")]
    namespace: String,
    #[serde(
        default = "default_service_account",
        deserialize_with = "non_empty_service_account"
    )]
    service_account: String,
    netns: PathBuf,
    #[serde(deserialize_with = "non_empty_ips")]
    ips: Vec<IpAddr>,
    #[serde(default = "default_true")]
    dns_capture: bool,
}

fn default_true() -> bool {
    true
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// serde_yaml attributes errors from these validators to the enclosing pod entry (with its line),
/// so each message names its own field.
macro_rules! non_empty_field {
    ($fn_name:ident, $field:literal) => {
        fn $fn_name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
            let value = String::deserialize(deserializer)?;
            if value.trim().is_empty() {
                return Err(de::Error::custom(concat!(
                    "field `",
                    $field,
                    "` must not be empty"
                )));
            }
            Ok(value)
        }
    };
}
non_empty_field!(non_empty_name, "name");
non_empty_field!(non_empty_namespace, "namespace");
non_empty_field!(non_empty_service_account, "serviceAccount");

fn non_empty_ips<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpAddr>, D::Error> {
    let ips = Vec::<IpAddr>::deserialize(deserializer)?;
    if ips.is_empty() {
        return Err(de::Error::custom(
            "field `ips` must list at least one pod IP",
        ));
    }
    Ok(ips)
}

/// Reads and validates a pods file.
pub fn load(path: &Path) -> Result<Vec<PodSpec>, StaticFileError> {
    let text = fs::read_to_string(path).map_err(|io_error| StaticFileError::Read {
        path: path.to_owned(),
        io_error,
    })?;
    parse(path, &text)
}

/// Parses pods-file text; `path` is used only in error messages.
pub fn parse(path: &Path, text: &str) -> Result<Vec<PodSpec>, StaticFileError> {
    let file: File = serde_yaml::from_str(text).map_err(|error| StaticFileError::Parse {
        path: path.to_owned(),
        message: error.to_string(),
    })?;
    let mut names = HashSet::new();
    let mut ips: Vec<(IpAddr, String)> = Vec::new();
    let mut pods = Vec::with_capacity(file.pods.len());
    for (index, entry) in file.pods.into_iter().enumerate() {
        let PodEntry {
            name,
            namespace,
            service_account,
            netns,
            ips: pod_ips,
            dns_capture,
        } = entry;
        if !names.insert((namespace.clone(), name.clone())) {
            return Err(StaticFileError::DuplicatePod {
                path: path.to_owned(),
                index,
                namespace,
                name,
            });
        }
        for ip in &pod_ips {
            if let Some((_, other)) = ips.iter().find(|(seen, _)| seen == ip) {
                return Err(StaticFileError::DuplicateIp {
                    path: path.to_owned(),
                    index,
                    ip: *ip,
                    other: other.clone(),
                });
            }
            ips.push((*ip, format!("{namespace}/{name}")));
        }
        pods.push(PodSpec {
            name,
            namespace,
            service_account,
            netns,
            ips: pod_ips,
            dns_capture,
        });
    }
    Ok(pods)
}

#[cfg(test)]
mod tests;
