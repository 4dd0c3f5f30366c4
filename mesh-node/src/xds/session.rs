//! The delta-ADS protocol state, without I/O: which resource versions we hold per type, what to
//! send when a stream opens, and what to answer (ACK or NACK) to each response. The async
//! client in [`super::client`] only moves messages between this and the network.
use std::collections::HashMap;

use prost::Message;

use super::proto::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE,
    discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status},
    security, workload,
};
use crate::state::{
    Policy, State,
    convert::{self, Address},
};

/// gRPC's INVALID_ARGUMENT, the code a NACK's `error_detail` carries.
const INVALID_ARGUMENT: i32 = 3;

/// Changes one response makes to the mesh state.
#[derive(Debug, Default)]
pub struct Update {
    pub addresses: Vec<Address>,
    pub policies: Vec<Policy>,
    /// Workload uids or service keys.
    pub removed_addresses: Vec<String>,
    /// Policy "namespace/name"s.
    pub removed_policies: Vec<String>,
}

impl Update {
    pub fn apply(self, state: &mut State) {
        let Self {
            addresses,
            policies,
            removed_addresses,
            removed_policies,
        } = self;
        for name in &removed_addresses {
            state.remove_address(name);
        }
        for name in &removed_policies {
            state.remove_policy(name);
        }
        for address in addresses {
            match address {
                Address::Workload(w) => state.upsert_workload(*w),
                Address::Service(s) => state.upsert_service(s),
            }
        }
        for policy in policies {
            state.upsert_policy(policy);
        }
    }
}

/// What to do with one response.
#[derive(Debug)]
pub struct Handled {
    /// The changes to apply; `None` when the response was rejected.
    pub update: Option<Update>,
    /// The ACK or NACK to send back.
    pub reply: DeltaDiscoveryRequest,
    /// Why the response was rejected, if it was.
    pub rejected: Option<String>,
}

#[derive(Debug)]
struct TypeState {
    type_url: &'static str,
    /// Resource name → version, of what we hold.
    versions: HashMap<String, String>,
    /// Whether a response of this type has been accepted since start: only then do we hold
    /// the control plane's view of it.
    answered: bool,
}

/// One xDS session; it outlives the streams it runs over so that a reconnect resumes it.
#[derive(Debug)]
pub struct Session {
    node: Node,
    default_trust_domain: String,
    types: [TypeState; 2],
}

impl Session {
    pub fn new(node: Node, default_trust_domain: &str) -> Self {
        let empty = |type_url| TypeState {
            type_url,
            versions: HashMap::new(),
            answered: false,
        };
        Self {
            node,
            default_trust_domain: default_trust_domain.to_owned(),
            types: [empty(ADDRESS_TYPE), empty(AUTHORIZATION_TYPE)],
        }
    }

    /// The first request of each type on a new stream: a wildcard subscription carrying the
    /// versions we already hold, so the server sends only what changed.
    pub fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        self.types
            .iter()
            .map(|t| DeltaDiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: t.type_url.to_owned(),
                initial_resource_versions: t.versions.clone(),
                ..Default::default()
            })
            .collect()
    }

    /// True once a response of every type has been accepted.
    pub fn synced(&self) -> bool {
        self.types.iter().all(|t| t.answered)
    }

    /// Resources held per type, for logs.
    pub fn counts(&self) -> (usize, usize) {
        (self.types[0].versions.len(), self.types[1].versions.len())
    }

    /// Decodes and checks every resource of `response`. All or nothing: one bad resource
    /// rejects the response, and what we held before stays in force.
    pub fn handle(&mut self, response: DeltaDiscoveryResponse) -> Handled {
        let nonce = response.nonce.clone();
        let Some(index) = self
            .types
            .iter()
            .position(|t| t.type_url == response.type_url)
        else {
            let message = format!("type {:?} is not supported", response.type_url);
            return reject(&response.type_url, nonce, message);
        };
        let type_url = self.types[index].type_url;
        match decode(&response, &self.default_trust_domain) {
            Ok(update) => {
                self.types[index].answered = true;
                let versions = &mut self.types[index].versions;
                for name in &response.removed_resources {
                    versions.remove(name);
                }
                for resource in &response.resources {
                    versions.insert(resource.name.clone(), resource.version.clone());
                }
                Handled {
                    update: Some(update),
                    reply: DeltaDiscoveryRequest {
                        type_url: type_url.to_owned(),
                        response_nonce: nonce,
                        ..Default::default()
                    },
                    rejected: None,
                }
            }
            Err(message) => reject(type_url, nonce, message),
        }
    }
}

fn reject(type_url: &str, nonce: String, message: String) -> Handled {
    Handled {
        update: None,
        reply: DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            response_nonce: nonce,
            error_detail: Some(Status {
                code: INVALID_ARGUMENT,
                message: message.clone(),
                details: Vec::new(),
            }),
            ..Default::default()
        },
        rejected: Some(message),
    }
}

fn decode(response: &DeltaDiscoveryResponse, trust_domain: &str) -> Result<Update, String> {
    let mut update = Update::default();
    let mut errors = Vec::new();
    for resource in &response.resources {
        let Some(any) = &resource.resource else {
            errors.push(format!("resource {:?}: no body", resource.name));
            continue;
        };
        if any.type_url != response.type_url {
            errors.push(format!(
                "resource {:?}: body is {:?}, not {:?}",
                resource.name, any.type_url, response.type_url
            ));
            continue;
        }
        let bytes = any.value.as_slice();
        let decoded = if response.type_url == ADDRESS_TYPE {
            workload::Address::decode(bytes)
                .map_err(|e| format!("decode: {e}"))
                .and_then(|a| convert::address(a, trust_domain).map_err(|e| e.to_string()))
                .map(|a| update.addresses.push(a))
        } else {
            security::Authorization::decode(bytes)
                .map_err(|e| format!("decode: {e}"))
                .and_then(|p| convert::authorization(p).map_err(|e| e.to_string()))
                .map(|p| update.policies.push(p))
        };
        if let Err(error) = decoded {
            errors.push(format!("resource {:?}: {error}", resource.name));
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    if response.type_url == ADDRESS_TYPE {
        update.removed_addresses = response.removed_resources.clone();
    } else {
        update.removed_policies = response.removed_resources.clone();
    }
    Ok(update)
}

#[cfg(test)]
mod tests;
