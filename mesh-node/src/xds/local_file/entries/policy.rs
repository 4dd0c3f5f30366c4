//! An authorization policy entry of the local file.
use serde::Deserialize;

use super::{Cidr, ip_bytes};
use crate::proto::security as sec;

#[derive(Debug, Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyScope {
    #[default]
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Debug, Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyEntry {
    name: String,
    namespace: String,
    #[serde(default)]
    scope: PolicyScope,
    #[serde(default)]
    action: Action,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    rules: Vec<RuleEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    #[serde(default)]
    clauses: Vec<ClauseEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClauseEntry {
    #[serde(default)]
    matches: Vec<MatchEntry>,
}

/// `{exact: x}`, `{prefix: x}`, `{suffix: x}` or `presence`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StringMatchEntry {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchEntry {
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    namespaces: Vec<StringMatchEntry>,
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    not_namespaces: Vec<StringMatchEntry>,
    #[serde(default)]
    service_accounts: Vec<ServiceAccountEntry>,
    #[serde(default)]
    not_service_accounts: Vec<ServiceAccountEntry>,
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    principals: Vec<StringMatchEntry>,
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    not_principals: Vec<StringMatchEntry>,
    #[serde(default)]
    source_ips: Vec<Cidr>,
    #[serde(default)]
    not_source_ips: Vec<Cidr>,
    #[serde(default)]
    destination_ips: Vec<Cidr>,
    #[serde(default)]
    not_destination_ips: Vec<Cidr>,
    #[serde(default)]
    destination_ports: Vec<u16>,
    #[serde(default)]
    not_destination_ports: Vec<u16>,
}

/// `{namespace: shop, serviceAccount: cart}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceAccountEntry {
    namespace: String,
    service_account: String,
}

impl PolicyEntry {
    pub fn into_proto(self) -> sec::Authorization {
        let Self {
            name,
            namespace,
            scope,
            action,
            dry_run,
            rules,
        } = self;
        let strings = |list: Vec<StringMatchEntry>| -> Vec<sec::StringMatch> {
            use sec::string_match::MatchType;
            list.into_iter()
                .map(|m| sec::StringMatch {
                    match_type: Some(match m {
                        StringMatchEntry::Exact(v) => MatchType::Exact(v),
                        StringMatchEntry::Prefix(v) => MatchType::Prefix(v),
                        StringMatchEntry::Suffix(v) => MatchType::Suffix(v),
                        StringMatchEntry::Presence => MatchType::Presence(()),
                    }),
                })
                .collect()
        };
        let cidrs = |list: Vec<Cidr>| -> Vec<sec::Address> {
            list.into_iter()
                .map(|c| sec::Address {
                    address: ip_bytes(&c.ip),
                    length: c.length.into(),
                })
                .collect()
        };
        let ports = |list: Vec<u16>| list.into_iter().map(u32::from).collect();
        let accounts = |list: Vec<ServiceAccountEntry>| {
            list.into_iter()
                .map(|sa| sec::ServiceAccountMatch {
                    namespace: sa.namespace,
                    service_account: sa.service_account,
                })
                .collect()
        };
        sec::Authorization {
            name,
            namespace,
            scope: match scope {
                PolicyScope::Global => sec::Scope::Global,
                PolicyScope::Namespace => sec::Scope::Namespace,
                PolicyScope::WorkloadSelector => sec::Scope::WorkloadSelector,
            } as i32,
            action: match action {
                Action::Allow => sec::Action::Allow,
                Action::Deny => sec::Action::Deny,
            } as i32,
            dry_run,
            extensions: Vec::new(),
            rules: rules
                .into_iter()
                .map(|rule| sec::Rule {
                    clauses: rule
                        .clauses
                        .into_iter()
                        .map(|clause| sec::Clause {
                            matches: clause
                                .matches
                                .into_iter()
                                .map(|m| sec::Match {
                                    namespaces: strings(m.namespaces),
                                    not_namespaces: strings(m.not_namespaces),
                                    service_accounts: accounts(m.service_accounts),
                                    not_service_accounts: accounts(m.not_service_accounts),
                                    extensions: Vec::new(),
                                    principals: strings(m.principals),
                                    not_principals: strings(m.not_principals),
                                    source_ips: cidrs(m.source_ips),
                                    not_source_ips: cidrs(m.not_source_ips),
                                    destination_ips: cidrs(m.destination_ips),
                                    not_destination_ips: cidrs(m.not_destination_ips),
                                    destination_ports: ports(m.destination_ports),
                                    not_destination_ports: ports(m.not_destination_ports),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}
