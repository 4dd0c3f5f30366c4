//! The delta-ADS protocol state, without I/O: which resource versions we hold per type, what to
//! send when a stream opens, and what to answer (ACK or NACK) to each response. The async
//! client in [`super::client`] only moves messages between this and the network.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use prost::Message;

use super::proto::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE,
    discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource, Status},
    security, workload,
};
use crate::state::{
    Policy, State,
    convert::{self, Address},
    intern,
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
    /// Workloads and services the steps after this one add: room is made for them with this
    /// one, so that the indexes grow once, while the lock is taken for the first step,
    /// rather than rehashing 100,000 entries under a later step.
    pub ahead: (usize, usize),
}

/// Changes applied under one hold of the state's write lock: a push of 100,000 workloads
/// holds it for about a millisecond at a time instead of for the whole push, so connections
/// being routed meanwhile wait for one step, not for all of it.
pub const STEP: usize = 1000;

impl Update {
    /// The same changes in the same order, in updates of at most `size` changes each (one,
    /// empty, when there are none).
    pub fn into_steps(self, size: usize) -> Vec<Update> {
        fn slot<'a>(steps: &'a mut Vec<Update>, count: &mut usize, size: usize) -> &'a mut Update {
            if (*count).is_multiple_of(size) {
                steps.push(Update::default());
            }
            *count += 1;
            let last = steps.len() - 1;
            &mut steps[last]
        }
        let size = size.max(1);
        let (mut steps, mut count) = (Vec::new(), 0);
        // The order `apply` uses, so that applying the steps one after another is the same
        // (`ahead` is recomputed below).
        for name in self.removed_addresses {
            slot(&mut steps, &mut count, size)
                .removed_addresses
                .push(name);
        }
        for name in self.removed_policies {
            slot(&mut steps, &mut count, size)
                .removed_policies
                .push(name);
        }
        for address in self.addresses {
            slot(&mut steps, &mut count, size).addresses.push(address);
        }
        for policy in self.policies {
            slot(&mut steps, &mut count, size).policies.push(policy);
        }
        if steps.is_empty() {
            steps.push(Update::default());
        }
        steps[0].ahead = steps[1..].iter().fold((0, 0), |(w, s), step| {
            let (sw, ss) = step.counts();
            (w + sw, s + ss)
        });
        steps
    }

    /// Workloads and services among `addresses`.
    fn counts(&self) -> (usize, usize) {
        let workloads = self
            .addresses
            .iter()
            .filter(|a| matches!(a, Address::Workload(_)))
            .count();
        (workloads, self.addresses.len() - workloads)
    }

    pub fn apply(self, state: &mut State) {
        let (workloads, services) = self.counts();
        state.reserve(workloads + self.ahead.0, services + self.ahead.1);
        let Self {
            addresses,
            policies,
            removed_addresses,
            removed_policies,
            ahead: _,
        } = self;
        for name in &removed_addresses {
            state.remove_address(name);
        }
        for name in &removed_policies {
            state.remove_policy(name);
        }
        for address in addresses {
            match address {
                Address::Workload(w) => state.upsert_workload(w),
                Address::Service(s) => state.upsert_service(s),
            }
        }
        for policy in policies {
            state.upsert_policy(policy);
        }
    }
}

/// A resource the control plane sent that could not be used. Its last good version (or none)
/// stays in force until a good one arrives or it is removed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    /// The short type name: `istio.workload.Address` or `istio.security.Authorization`.
    pub type_name: &'static str,
    pub name: String,
    /// The version that was refused.
    pub version: String,
    /// What is wrong, naming the field.
    pub error: String,
}

/// What the session knows of the control plane, for readiness, metrics and the config dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XdsStatus {
    /// A response of every type has been applied (in whole or in part).
    pub synced: bool,
    /// Every resource whose latest version was refused, by type then name.
    pub rejected: Vec<Rejected>,
}

/// What to do with one response.
#[derive(Debug)]
pub struct Handled {
    /// The changes to apply: every valid resource and every removal (empty when the whole
    /// response was refused).
    pub update: Update,
    /// The ACK, or the NACK naming each refused resource.
    pub reply: DeltaDiscoveryRequest,
    /// The resources this response carried that were refused.
    pub rejected: Vec<Rejected>,
    /// Why the response as a whole was refused (an unknown type), if it was.
    pub refused: Option<String>,
    /// Resources applied and names removed.
    pub applied: usize,
    pub removed: usize,
}

#[derive(Debug)]
struct TypeState {
    type_url: &'static str,
    /// Resource name → version, of what we hold. A refused resource keeps the version of its
    /// last good one (or has none), so that after a reconnect the control plane sends it again.
    /// A workload's or service's name is the allocation its state entry keys by; versions are
    /// interned (a push gives many resources the same one, and istiod's are often empty).
    versions: HashMap<Arc<str>, Arc<str>>,
    /// Resources whose latest version was refused.
    rejected: BTreeMap<String, Rejected>,
    /// Whether a response of this type has been applied since start: only then do we hold
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
            rejected: BTreeMap::new(),
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
                initial_resource_versions: t
                    .versions
                    .iter()
                    .map(|(name, version)| (name.to_string(), version.to_string()))
                    .collect(),
                ..Default::default()
            })
            .collect()
    }

    /// True once a response of every type has been applied.
    pub fn synced(&self) -> bool {
        self.types.iter().all(|t| t.answered)
    }

    /// Resources held per type, for logs.
    pub fn counts(&self) -> (usize, usize) {
        (self.types[0].versions.len(), self.types[1].versions.len())
    }

    pub fn status(&self) -> XdsStatus {
        XdsStatus {
            synced: self.synced(),
            rejected: self
                .types
                .iter()
                .flat_map(|t| t.rejected.values().cloned())
                .collect(),
        }
    }

    /// Decodes and checks each resource of `response` on its own: the valid ones and the
    /// removals apply, each invalid one is named in the NACK and keeps its last good version
    /// in force (as ztunnel does; istiod sends only changes afterwards, so refusing a whole
    /// response would lose its good resources for good).
    pub fn handle(&mut self, response: DeltaDiscoveryResponse) -> Handled {
        let nonce = response.nonce.clone();
        let Some(index) = self
            .types
            .iter()
            .position(|t| t.type_url == response.type_url)
        else {
            let message = format!("type {:?} is not supported", response.type_url);
            return Handled {
                update: Update::default(),
                reply: nack(&response.type_url, nonce, message.clone()),
                rejected: Vec::new(),
                refused: Some(message),
                applied: 0,
                removed: 0,
            };
        };
        let trust_domain = self.default_trust_domain.clone();
        let state = &mut self.types[index];
        let type_name = short_name(state.type_url);
        let mut update = Update::default();
        let mut rejected = Vec::new();
        for resource in &response.resources {
            let name = match decode(resource, state.type_url, &trust_domain) {
                Ok(Decoded::Address(address)) => {
                    let shared = match &address {
                        Address::Workload(w) => w.uid.clone(),
                        Address::Service(s) => s.shared_key().clone(),
                    };
                    update.addresses.push(address);
                    shared
                }
                Ok(Decoded::Policy(policy)) => {
                    update.policies.push(*policy);
                    Arc::from(resource.name.as_str())
                }
                Err(error) => {
                    let refusal = Rejected {
                        type_name,
                        name: resource.name.clone(),
                        version: resource.version.clone(),
                        error,
                    };
                    state
                        .rejected
                        .insert(resource.name.clone(), refusal.clone());
                    rejected.push(refusal);
                    continue;
                }
            };
            state.rejected.remove(&resource.name);
            // Keyed by the resource's name: the decoded one when it is the same string.
            let name = if *name == *resource.name {
                name
            } else {
                Arc::from(resource.name.as_str())
            };
            state
                .versions
                .insert(name, intern::intern(&resource.version));
        }
        for name in &response.removed_resources {
            state.versions.remove(name.as_str());
            state.rejected.remove(name);
        }
        if state.type_url == ADDRESS_TYPE {
            update.removed_addresses = response.removed_resources.clone();
        } else {
            update.removed_policies = response.removed_resources.clone();
        }
        state.answered = true;
        let reply = if rejected.is_empty() {
            DeltaDiscoveryRequest {
                type_url: state.type_url.to_owned(),
                response_nonce: nonce,
                ..Default::default()
            }
        } else {
            let message = rejected
                .iter()
                .map(|r| format!("resource {:?}: {}", r.name, r.error))
                .collect::<Vec<_>>()
                .join("; ");
            nack(state.type_url, nonce, message)
        };
        Handled {
            applied: response.resources.len() - rejected.len(),
            removed: response.removed_resources.len(),
            update,
            reply,
            rejected,
            refused: None,
        }
    }
}

/// `istio.workload.Address` for its type URL.
pub fn short_name(type_url: &'static str) -> &'static str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

fn nack(type_url: &str, nonce: String, message: String) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.to_owned(),
        response_nonce: nonce,
        error_detail: Some(Status {
            code: INVALID_ARGUMENT,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    }
}

enum Decoded {
    Address(Address),
    Policy(Box<Policy>),
}

fn decode(resource: &Resource, type_url: &str, trust_domain: &str) -> Result<Decoded, String> {
    let any = resource.resource.as_ref().ok_or("no body")?;
    if any.type_url != type_url {
        return Err(format!("body is {:?}, not {type_url:?}", any.type_url));
    }
    let bytes = &any.value[..];
    if type_url == ADDRESS_TYPE {
        let address = workload::Address::decode(bytes).map_err(|e| format!("decode: {e}"))?;
        convert::address(address, trust_domain)
            .map(Decoded::Address)
            .map_err(|e| e.to_string())
    } else {
        let policy = security::Authorization::decode(bytes).map_err(|e| format!("decode: {e}"))?;
        convert::authorization(policy)
            .map(|p| Decoded::Policy(Box::new(p)))
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests;
