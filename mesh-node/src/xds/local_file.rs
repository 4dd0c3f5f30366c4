//! The local file source: the control plane's resources (workloads, services, authorization
//! policies) in YAML, for running without istiod. Entries are turned into the same protobuf
//! messages istiod sends and go through the same [`crate::state::convert`] checks.
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
//!     clusterId: cluster1                 # optional
//!     locality: {region: r1, zone: z1}    # optional
//!     status: HEALTHY                     # or UNHEALTHY
//!     capacity: 1                         # optional relative weight
//!     services:                           # services it is an endpoint of
//!       default/echo.default.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]
//! services:
//!   - name: echo
//!     namespace: default
//!     hostname: echo.default.svc.cluster.local
//!     addresses: [10.96.0.10]
//!     ports: [{servicePort: 80, targetPort: 8080}]
//!     loadBalancing: {routingPreference: [NODE, ZONE], mode: FAILOVER}
//! policies:
//!   - name: deny-legacy
//!     namespace: default
//!     scope: NAMESPACE                    # GLOBAL, NAMESPACE or WORKLOAD_SELECTOR
//!     action: DENY                        # ALLOW or DENY
//!     rules: [{clauses: [{matches: [{namespaces: [{exact: legacy}]}]}]}]
//! ```
mod entries;

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::state::{
    Policy, Service, State, Workload,
    convert::{self, ConvertError},
};

#[derive(Debug, thiserror::Error)]
pub enum LocalFileError {
    #[error("read local state file {path}: {io_error}")]
    Read { path: PathBuf, io_error: io::Error },
    /// serde_yaml's message names the field path with line and column.
    #[error("local state file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("local state file {path}: {list}[{index}]: {message}")]
    Invalid {
        path: PathBuf,
        list: &'static str,
        index: usize,
        message: String,
    },
}

/// Everything a local file describes.
#[derive(Debug, Default)]
pub struct LocalState {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
}

impl LocalState {
    /// Puts everything the file describes into `state`.
    pub fn apply(self, state: &mut State) {
        let Self {
            workloads,
            services,
            policies,
        } = self;
        workloads.into_iter().for_each(|w| state.upsert_workload(w));
        services.into_iter().for_each(|s| state.upsert_service(s));
        policies.into_iter().for_each(|p| state.upsert_policy(p));
    }
}

/// Reads and validates a local state file; `trust_domain` fills in workloads that omit theirs.
pub fn load(path: &Path, trust_domain: &str) -> Result<LocalState, LocalFileError> {
    let text = fs::read_to_string(path).map_err(|io_error| LocalFileError::Read {
        path: path.to_owned(),
        io_error,
    })?;
    parse(path, &text, trust_domain)
}

/// Parses local-state text; `path` is used only in messages.
pub fn parse(path: &Path, text: &str, trust_domain: &str) -> Result<LocalState, LocalFileError> {
    let file: entries::File =
        serde_yaml::from_str(text).map_err(|error| LocalFileError::Parse {
            path: path.to_owned(),
            message: error.to_string(),
        })?;
    let invalid = |list: &'static str, index: usize, message: String| LocalFileError::Invalid {
        path: path.to_owned(),
        list,
        index,
        message,
    };
    let converted = |list, index| {
        move |error: ConvertError| {
            invalid(list, index, format!("{}: {}", error.field, error.message))
        }
    };

    let mut state = LocalState::default();
    let mut uids = HashSet::new();
    // (network, address) → owner: the same IP may be reused on another network.
    let mut owners: HashMap<(String, IpAddr), String> = HashMap::new();
    for (index, entry) in file.workloads.into_iter().enumerate() {
        let proto = entry
            .into_proto()
            .map_err(|message| invalid("workloads", index, message))?;
        let workload =
            convert::workload(proto, trust_domain).map_err(converted("workloads", index))?;
        if !uids.insert(workload.uid.clone()) {
            return Err(invalid(
                "workloads",
                index,
                format!("duplicate uid {}", workload.uid),
            ));
        }
        // One address, one workload: otherwise which identity a tunnel expects would depend on
        // the order of the file.
        for ip in &workload.addresses {
            let key = (workload.network.to_string(), *ip);
            if let Some(other) = owners.insert(key, workload.uid.to_string()) {
                return Err(invalid(
                    "workloads",
                    index,
                    format!("addresses: {ip} is already the address of workload {other}"),
                ));
            }
        }
        state.workloads.push(workload);
    }
    let mut keys = HashSet::new();
    for (index, entry) in file.services.into_iter().enumerate() {
        let proto = entry
            .into_proto()
            .map_err(|message| invalid("services", index, message))?;
        let service = convert::service(proto).map_err(converted("services", index))?;
        if !keys.insert(service.key().to_owned()) {
            return Err(invalid(
                "services",
                index,
                format!("duplicate service {}", service.key()),
            ));
        }
        for vip in service.vips.iter().filter(|v| v.is_host()) {
            let key = (vip.network.to_string(), vip.cidr.addr());
            if let Some(other) = owners.insert(key, service.key().to_owned()) {
                return Err(invalid(
                    "services",
                    index,
                    format!(
                        "addresses: {} is already the address of {other}",
                        vip.cidr.addr()
                    ),
                ));
            }
        }
        state.services.push(service);
    }
    let mut names = HashSet::new();
    for (index, entry) in file.policies.into_iter().enumerate() {
        let policy =
            convert::authorization(entry.into_proto()).map_err(converted("policies", index))?;
        let name = format!("{}/{}", policy.namespace, policy.name);
        if !names.insert(name.clone()) {
            return Err(invalid(
                "policies",
                index,
                format!("duplicate policy {name}"),
            ));
        }
        state.policies.push(policy);
    }
    Ok(state)
}

#[cfg(test)]
mod tests;
