//! L4 authorization: Istio's `istio.security.Authorization` policies, evaluated for each
//! connection into a local pod. Pure: no I/O, no clock.
//!
//! Semantics, as Istio's:
//! - the policies that apply to a workload are the GLOBAL ones, the NAMESPACE ones of its
//!   namespace, and the WORKLOAD_SELECTOR ones its `authorization_policies` name;
//! - any matching DENY refuses; otherwise, if any ALLOW applies, one of them must match;
//!   otherwise the connection is allowed;
//! - `dry_run` policies never decide; they are evaluated on their own, and what they would
//!   have done is reported for the log.
//!
//! A policy matches when any of its rules matches; a rule when all of its clauses match; a
//! clause when any of its matches matches; a match when every field it sets matches (any value
//! of a positive field, no value of a `not_` field). A policy without rules matches nothing; a
//! rule without clauses, and a clause without matches, match everything; a match without any
//! field set matches nothing.
//!
//! Principals are compared without the `spiffe://` prefix (`cluster.local/ns/a/sa/b`), as
//! istiod writes them. A service account (`namespace/name`, as istiod sends a policy's
//! `serviceAccounts`) matches an identity with that namespace and service account; its trust
//! domain is not compared, as in ztunnel: which trust domains may connect at all is decided
//! when the client's certificate is verified (only the mesh's own), so every identity that
//! reaches a policy is in the mesh's trust domain.
//!
//! A connection without a verified identity (captured plaintext) has no principal and no
//! service account: positive principal and service-account fields never match it, and their
//! `not_` forms always do. Its namespace is the empty string, as in ztunnel: `namespaces`
//! matches it only through a match that accepts "" (such as prefix ""), never through an exact
//! name or `presence`.
#[cfg(test)]
mod tests;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use crate::identity::Identity;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Scope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// A policy, checked and ready to evaluate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// Rules (OR) of clauses (AND) of matches (OR).
    pub rules: Vec<Vec<Vec<Match>>>,
    pub dry_run: bool,
}

impl Policy {
    /// The xDS resource name: "namespace/name".
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn matches_as(&self, conn: &Connection<'_>, subject: &Subject<'_>) -> bool {
        self.rules.iter().any(|rule| {
            rule.iter()
                .all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(conn, subject)))
        })
    }
}

/// One match: the fields that are set must all match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccount>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccount>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn matches(&self, conn: &Connection<'_>, subject: &Subject<'_>) -> bool {
        let Subject {
            principal,
            namespace: ns,
        } = subject;
        let principal = principal.as_deref();
        if self.is_empty() {
            return false;
        }
        let (src, dst) = (conn.source_ip.to_canonical(), conn.destination.ip());
        field(&self.namespaces, &self.not_namespaces, |m| m.matches(ns))
            && field(&self.service_accounts, &self.not_service_accounts, |sa| {
                conn.source.is_some_and(|id| sa.matches(id))
            })
            && field(&self.principals, &self.not_principals, |m| {
                principal.is_some_and(|p| m.matches(p))
            })
            && field(&self.source_ips, &self.not_source_ips, |c| c.contains(src))
            && field(&self.destination_ips, &self.not_destination_ips, |c| {
                c.contains(dst)
            })
            && field(&self.destination_ports, &self.not_destination_ports, |p| {
                *p == conn.destination.port()
            })
    }
}

/// A positive list (empty, or any value matches) and its `not_` list (no value matches).
fn field<T>(positive: &[T], negative: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&matches)) && !negative.iter().any(matches)
}

/// A Kubernetes service account: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// Whether `identity` is this service account (in whichever trust domain it was verified).
    pub fn matches(&self, identity: &Identity) -> bool {
        identity.namespace == self.namespace && identity.service_account == self.name
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => value == exact,
            Self::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Self::Suffix(suffix) => value.ends_with(suffix.as_str()),
            Self::Presence => !value.is_empty(),
        }
    }
}

/// An address block. IPv4-mapped IPv6 addresses are compared as IPv4. Only [`Cidr::new`]
/// makes one, so the prefix always fits the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `None` when `prefix` is longer than the address. An IPv4-mapped block (`::ffff:a.b.c.d`
    /// with a prefix of 96 or more) becomes the IPv4 block it stands for.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return None;
        }
        match (addr, addr.to_canonical()) {
            (IpAddr::V6(_), IpAddr::V4(v4)) if prefix >= 96 => Some(Self {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            }),
            _ => Some(Self { addr, prefix }),
        }
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// A block of exactly one address.
    pub fn is_host(&self) -> bool {
        self.prefix == if self.addr.is_ipv4() { 32 } else { 128 }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What is known about a connection into a local pod.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The client's verified identity; `None` for captured plaintext.
    pub source: Option<&'a Identity>,
    pub source_ip: IpAddr,
    /// The pod address and port the client asked for.
    pub destination: SocketAddr,
}

/// Who the client is, as principal and namespace rules see it; built once per decision.
struct Subject<'a> {
    /// The principal as Istio writes it: the SPIFFE ID without `spiffe://`.
    principal: Option<String>,
    /// "" without an identity.
    namespace: &'a str,
}

impl<'a> Subject<'a> {
    fn of(conn: &Connection<'a>) -> Self {
        Self {
            principal: conn.source.map(|id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain, id.namespace, id.service_account
                )
            }),
            namespace: conn.source.map_or("", |id| id.namespace.as_str()),
        }
    }
}

/// The workload a connection is for, as far as policy selection cares.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub namespace: &'a str,
    /// "namespace/name" of the policies the workload's `authorization_policies` names: those
    /// that select it, and istiod's implicit ones (such as the waypoint's ALLOW). They apply
    /// whatever their scope, as in ztunnel.
    pub selected_by: &'a [std::sync::Arc<str>],
}

impl Target<'_> {
    pub fn is_subject_of(&self, policy: &Policy) -> bool {
        let named = || self.selected_by.iter().any(|key| is_key_of(key, policy));
        match policy.scope {
            Scope::Global => true,
            Scope::Namespace => policy.namespace == self.namespace || named(),
            Scope::WorkloadSelector => named(),
        }
    }
}

fn is_key_of(key: &str, policy: &Policy) -> bool {
    key.split_once('/')
        .is_some_and(|(ns, name)| ns == policy.namespace && name == policy.name)
}

/// Why a connection is allowed or refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No policy applies to the workload.
    AllowedNoPolicy,
    /// The named ALLOW policy matched.
    Allowed(String),
    /// The named DENY policy matched.
    Denied(String),
    /// ALLOW policies apply and none matched.
    NotAllowed,
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::AllowedNoPolicy | Self::Allowed(_))
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AllowedNoPolicy => write!(f, "allowed: no policy applies"),
            Self::Allowed(key) => write!(f, "allowed by policy {key}"),
            Self::Denied(key) => write!(f, "denied by policy {key}"),
            Self::NotAllowed => write!(f, "denied: no ALLOW policy matched"),
        }
    }
}

/// The enforced verdict, and what the dry-run policies would have decided on their own (`None`
/// when no dry-run policy applies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub dry_run: Option<Verdict>,
}

/// Decides `conn` against the `policies` that may apply to `target`.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    target: &Target<'_>,
    conn: &Connection<'_>,
) -> Decision {
    let mut enforced = Tally::default();
    let mut shadow = Tally::default();
    // Built on the first policy that applies: most connections meet none.
    let mut subject = None;
    for policy in policies {
        if !target.is_subject_of(policy) {
            continue;
        }
        let tally = if policy.dry_run {
            &mut shadow
        } else {
            &mut enforced
        };
        tally.add(
            policy,
            conn,
            subject.get_or_insert_with(|| Subject::of(conn)),
        );
    }
    Decision {
        verdict: enforced.verdict(),
        dry_run: shadow.applies.then(|| shadow.verdict()),
    }
}

#[derive(Default)]
struct Tally {
    applies: bool,
    any_allow: bool,
    allowed_by: Option<String>,
    denied_by: Option<String>,
}

impl Tally {
    fn add(&mut self, policy: &Policy, conn: &Connection<'_>, subject: &Subject<'_>) {
        self.applies = true;
        match policy.action {
            Action::Deny => {
                if self.denied_by.is_none() && policy.matches_as(conn, subject) {
                    self.denied_by = Some(policy.key());
                }
            }
            Action::Allow => {
                self.any_allow = true;
                if self.allowed_by.is_none() && policy.matches_as(conn, subject) {
                    self.allowed_by = Some(policy.key());
                }
            }
        }
    }

    fn verdict(self) -> Verdict {
        match (self.denied_by, self.allowed_by) {
            (Some(deny), _) => Verdict::Denied(deny),
            (None, Some(allow)) => Verdict::Allowed(allow),
            (None, None) if self.any_allow => Verdict::NotAllowed,
            (None, None) => Verdict::AllowedNoPolicy,
        }
    }
}
