//! `istio.security.Authorization` into a policy the engine evaluates.
use super::{ConvertError, ip, port, unknown};
use crate::{authz, proto::security};

/// An authorization policy, checked (enums, CIDRs, ports, string matches) and made ready for
/// the policy engine.
pub fn authorization(policy: security::Authorization) -> Result<authz::Policy, ConvertError> {
    let fail = |field: String, message: String| ConvertError {
        kind: "authorization",
        name: format!("{}/{}", policy.namespace, policy.name),
        field,
        message,
    };
    if policy.name.trim().is_empty() {
        return Err(fail("name".into(), "must not be empty".into()));
    }
    if policy.namespace.trim().is_empty() {
        return Err(fail("namespace".into(), "must not be empty".into()));
    }
    let scope = match security::Scope::try_from(policy.scope) {
        Ok(security::Scope::Global) => authz::Scope::Global,
        Ok(security::Scope::Namespace) => authz::Scope::Namespace,
        Ok(security::Scope::WorkloadSelector) => authz::Scope::WorkloadSelector,
        Err(_) => return Err(fail("scope".into(), unknown(policy.scope))),
    };
    let action = match security::Action::try_from(policy.action) {
        Ok(security::Action::Allow) => authz::Action::Allow,
        Ok(security::Action::Deny) => authz::Action::Deny,
        Err(_) => return Err(fail("action".into(), unknown(policy.action))),
    };
    let mut rules = Vec::with_capacity(policy.rules.len());
    for (r, rule) in policy.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (m, matched) in clause.matches.iter().enumerate() {
                let at = format!("rules[{r}].clauses[{c}].matches[{m}]");
                matches.push(
                    authz_match(matched)
                        .map_err(|(field, message)| fail(format!("{at}.{field}"), message))?,
                );
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    Ok(authz::Policy {
        name: policy.name.clone(),
        namespace: policy.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: policy.dry_run,
    })
}

/// One match's fields; an error names the field and index within the match.
fn authz_match(m: &security::Match) -> Result<authz::Match, (String, String)> {
    let cidrs = |field: &str, list: &[security::Address]| {
        list.iter()
            .enumerate()
            .map(|(i, cidr)| {
                let at = || format!("{field}[{i}]");
                let addr = ip(&cidr.address).map_err(|m| (at(), m))?;
                u8::try_from(cidr.length)
                    .ok()
                    .and_then(|len| authz::Cidr::new(addr, len))
                    .ok_or_else(|| {
                        let max = if addr.is_ipv4() { 32 } else { 128 };
                        (at(), format!("prefix length {} exceeds {max}", cidr.length))
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |field: &str, list: &[u32]| {
        list.iter()
            .enumerate()
            .map(|(i, p)| port(*p).map_err(|m| (format!("{field}[{i}]"), m)))
            .collect::<Result<Vec<_>, _>>()
    };
    let strings = |field: &str, list: &[security::StringMatch]| {
        use security::string_match::MatchType;
        list.iter()
            .enumerate()
            .map(|(i, s)| match &s.match_type {
                Some(MatchType::Exact(v)) => Ok(authz::StringMatch::Exact(v.clone())),
                Some(MatchType::Prefix(v)) => Ok(authz::StringMatch::Prefix(v.clone())),
                Some(MatchType::Suffix(v)) => Ok(authz::StringMatch::Suffix(v.clone())),
                Some(MatchType::Presence(())) => Ok(authz::StringMatch::Presence),
                None => Err((
                    format!("{field}[{i}]"),
                    "no match type (exact, prefix, suffix or presence) is set".to_owned(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let accounts = |field: &str, list: &[security::ServiceAccountMatch]| {
        list.iter()
            .enumerate()
            .map(|(i, sa)| {
                let bad = |what: &str| {
                    (
                        format!("{field}[{i}].{what}"),
                        "must be a non-empty name without '/'".to_owned(),
                    )
                };
                if sa.namespace.trim().is_empty() || sa.namespace.contains('/') {
                    return Err(bad("namespace"));
                }
                if sa.service_account.trim().is_empty() || sa.service_account.contains('/') {
                    return Err(bad("serviceAccount"));
                }
                Ok(authz::ServiceAccount {
                    namespace: sa.namespace.clone(),
                    name: sa.service_account.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(authz::Match {
        namespaces: strings("namespaces", &m.namespaces)?,
        not_namespaces: strings("not_namespaces", &m.not_namespaces)?,
        service_accounts: accounts("service_accounts", &m.service_accounts)?,
        not_service_accounts: accounts("not_service_accounts", &m.not_service_accounts)?,
        principals: strings("principals", &m.principals)?,
        not_principals: strings("not_principals", &m.not_principals)?,
        source_ips: cidrs("source_ips", &m.source_ips)?,
        not_source_ips: cidrs("not_source_ips", &m.not_source_ips)?,
        destination_ips: cidrs("destination_ips", &m.destination_ips)?,
        not_destination_ips: cidrs("not_destination_ips", &m.not_destination_ips)?,
        destination_ports: ports("destination_ports", &m.destination_ports)?,
        not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
    })
}
