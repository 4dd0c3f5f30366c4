//! The policy engine against a table: each case is a set of policies, a connection, and the
//! verdict (and dry-run verdict) Istio's semantics give.
use std::net::{IpAddr, SocketAddr};

use super::{
    Action, Cidr, Connection, Decision, Match, Policy, Scope, ServiceAccount, StringMatch, Target,
    Verdict, evaluate,
};
use crate::identity::Identity;

const DST: &str = "10.0.0.5:8080";
const TARGET_NS: &str = "app";

fn policy(name: &str, action: Action, rules: Vec<Vec<Vec<Match>>>) -> Policy {
    Policy {
        name: name.into(),
        namespace: TARGET_NS.into(),
        scope: Scope::Namespace,
        action,
        rules,
        dry_run: false,
    }
}

fn allow(name: &str, m: Match) -> Policy {
    policy(name, Action::Allow, vec![vec![vec![m]]])
}

fn deny(name: &str, m: Match) -> Policy {
    policy(name, Action::Deny, vec![vec![vec![m]]])
}

fn dry(mut p: Policy) -> Policy {
    p.dry_run = true;
    p
}

fn scoped(mut p: Policy, scope: Scope, namespace: &str) -> Policy {
    p.scope = scope;
    p.namespace = namespace.into();
    p
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn cidr(s: &str) -> Cidr {
    let (ip, len) = s.split_once('/').unwrap();
    Cidr::new(ip.parse().unwrap(), len.parse().unwrap()).unwrap()
}

fn principals(p: &[&str]) -> Match {
    Match {
        principals: p.iter().map(|s| exact(s)).collect(),
        ..Default::default()
    }
}

fn namespaces(n: &[&str]) -> Match {
    Match {
        namespaces: n.iter().map(|s| exact(s)).collect(),
        ..Default::default()
    }
}

fn accounts(list: &[(&str, &str)]) -> Vec<ServiceAccount> {
    list.iter()
        .map(|(namespace, name)| ServiceAccount {
            namespace: (*namespace).into(),
            name: (*name).into(),
        })
        .collect()
}

fn service_accounts(list: &[(&str, &str)]) -> Match {
    Match {
        service_accounts: accounts(list),
        ..Default::default()
    }
}

fn not_service_accounts(list: &[(&str, &str)]) -> Match {
    Match {
        not_service_accounts: accounts(list),
        ..Default::default()
    }
}

fn ports(p: &[u16]) -> Match {
    Match {
        destination_ports: p.to_vec(),
        ..Default::default()
    }
}

/// A client: identity "cluster.local/ns/<ns>/sa/<sa>" (or none) at `ip`.
struct Client {
    identity: Option<Identity>,
    ip: IpAddr,
}

fn client(ns: &str, sa: &str, ip: &str) -> Client {
    Client {
        identity: Some(Identity::new("cluster.local", ns, sa)),
        ip: ip.parse().unwrap(),
    }
}

fn plaintext(ip: &str) -> Client {
    Client {
        identity: None,
        ip: ip.parse().unwrap(),
    }
}

struct Case {
    name: &'static str,
    policies: Vec<Policy>,
    client: Client,
    dst: &'static str,
    selected_by: Vec<std::sync::Arc<str>>,
    want: Verdict,
    want_dry_run: Option<Verdict>,
}

fn case(name: &'static str, policies: Vec<Policy>, client: Client, want: Verdict) -> Case {
    Case {
        name,
        policies,
        client,
        dst: DST,
        selected_by: Vec::new(),
        want,
        want_dry_run: None,
    }
}

fn allowed(key: &str) -> Verdict {
    Verdict::Allowed(format!("{TARGET_NS}/{key}"))
}

fn denied(key: &str) -> Verdict {
    Verdict::Denied(format!("{TARGET_NS}/{key}"))
}

fn alice() -> Client {
    client("frontend", "alice", "10.1.0.7")
}

#[allow(clippy::too_many_lines)]
fn cases() -> Vec<Case> {
    use Verdict::{AllowedNoPolicy, NotAllowed};
    let alice_p = "cluster.local/ns/frontend/sa/alice";
    vec![
        case("no policies", vec![], alice(), AllowedNoPolicy),
        case(
            "ALLOW without rules allows nothing",
            vec![policy("nothing", Action::Allow, vec![])],
            alice(),
            NotAllowed,
        ),
        case(
            "DENY without rules denies nothing",
            vec![policy("nothing", Action::Deny, vec![])],
            alice(),
            AllowedNoPolicy,
        ),
        case(
            "ALLOW with an empty rule allows everything",
            vec![policy("all", Action::Allow, vec![vec![]])],
            alice(),
            allowed("all"),
        ),
        case(
            "DENY with an empty rule denies everything",
            vec![policy("all", Action::Deny, vec![vec![]])],
            plaintext("10.9.9.9"),
            denied("all"),
        ),
        case(
            "a clause without matches matches",
            vec![policy("c", Action::Allow, vec![vec![vec![]]])],
            alice(),
            allowed("c"),
        ),
        case(
            "a match with no field set matches nothing",
            vec![allow("empty-match", Match::default())],
            alice(),
            NotAllowed,
        ),
        case(
            "principal exact match allows",
            vec![allow("p", principals(&[alice_p]))],
            alice(),
            allowed("p"),
        ),
        case(
            "principal of another service account is not allowed",
            vec![allow(
                "p",
                principals(&["cluster.local/ns/frontend/sa/bob"]),
            )],
            alice(),
            NotAllowed,
        ),
        case(
            "principal with the spiffe:// prefix never matches",
            vec![allow(
                "p",
                principals(&["spiffe://cluster.local/ns/frontend/sa/alice"]),
            )],
            alice(),
            NotAllowed,
        ),
        case(
            "principal prefix",
            vec![allow(
                "p",
                Match {
                    principals: vec![StringMatch::Prefix("cluster.local/ns/frontend/".into())],
                    ..Default::default()
                },
            )],
            alice(),
            allowed("p"),
        ),
        case(
            "principal suffix",
            vec![allow(
                "p",
                Match {
                    principals: vec![StringMatch::Suffix("/sa/alice".into())],
                    ..Default::default()
                },
            )],
            alice(),
            allowed("p"),
        ),
        case(
            "principal presence needs an identity",
            vec![allow(
                "p",
                Match {
                    principals: vec![StringMatch::Presence],
                    ..Default::default()
                },
            )],
            plaintext("10.1.0.7"),
            NotAllowed,
        ),
        case(
            "DENY by principal",
            vec![deny("d", principals(&[alice_p]))],
            alice(),
            denied("d"),
        ),
        case(
            "not_principals: the listed principal is excluded",
            vec![allow(
                "p",
                Match {
                    not_principals: vec![exact(alice_p)],
                    ..Default::default()
                },
            )],
            alice(),
            NotAllowed,
        ),
        case(
            "not_principals: another principal passes",
            vec![allow(
                "p",
                Match {
                    not_principals: vec![exact(alice_p)],
                    ..Default::default()
                },
            )],
            client("frontend", "bob", "10.1.0.8"),
            allowed("p"),
        ),
        case(
            "not_principals passes a client without identity",
            vec![deny(
                "d",
                Match {
                    not_principals: vec![exact(alice_p)],
                    ..Default::default()
                },
            )],
            plaintext("10.1.0.7"),
            denied("d"),
        ),
        case(
            "namespace match allows",
            vec![allow("n", namespaces(&["frontend"]))],
            alice(),
            allowed("n"),
        ),
        case(
            "namespace of another namespace is not allowed",
            vec![allow("n", namespaces(&["backend"]))],
            alice(),
            NotAllowed,
        ),
        case(
            "plaintext has no namespace",
            vec![allow("n", namespaces(&["frontend"]))],
            plaintext("10.1.0.7"),
            NotAllowed,
        ),
        case(
            "not_namespaces excludes",
            vec![deny(
                "d",
                Match {
                    not_namespaces: vec![exact("frontend")],
                    ..Default::default()
                },
            )],
            client("other", "x", "10.1.0.9"),
            denied("d"),
        ),
        case(
            "not_namespaces lets the listed namespace through a DENY",
            vec![deny(
                "d",
                Match {
                    not_namespaces: vec![exact("frontend")],
                    ..Default::default()
                },
            )],
            alice(),
            AllowedNoPolicy,
        ),
        case(
            "source CIDR match",
            vec![allow(
                "s",
                Match {
                    source_ips: vec![cidr("10.1.0.0/16")],
                    ..Default::default()
                },
            )],
            plaintext("10.1.200.3"),
            allowed("s"),
        ),
        case(
            "source CIDR miss",
            vec![allow(
                "s",
                Match {
                    source_ips: vec![cidr("10.1.0.0/16")],
                    ..Default::default()
                },
            )],
            plaintext("10.2.0.3"),
            NotAllowed,
        ),
        case(
            "source /32",
            vec![deny(
                "s",
                Match {
                    source_ips: vec![cidr("10.1.0.7/32")],
                    ..Default::default()
                },
            )],
            alice(),
            denied("s"),
        ),
        case(
            "source /0 matches every IPv4 client",
            vec![deny(
                "s",
                Match {
                    source_ips: vec![cidr("0.0.0.0/0")],
                    ..Default::default()
                },
            )],
            plaintext("192.0.2.1"),
            denied("s"),
        ),
        case(
            "IPv4-mapped client against an IPv4 CIDR",
            vec![deny(
                "s",
                Match {
                    source_ips: vec![cidr("10.1.0.0/24")],
                    ..Default::default()
                },
            )],
            plaintext("::ffff:10.1.0.7"),
            denied("s"),
        ),
        case(
            "IPv6 CIDR does not match an IPv4 client",
            vec![deny(
                "s",
                Match {
                    source_ips: vec![cidr("::/0")],
                    ..Default::default()
                },
            )],
            plaintext("10.1.0.7"),
            AllowedNoPolicy,
        ),
        case(
            "IPv6 CIDR match",
            vec![deny(
                "s",
                Match {
                    source_ips: vec![cidr("fd00:1::/64")],
                    ..Default::default()
                },
            )],
            plaintext("fd00:1::42"),
            denied("s"),
        ),
        case(
            "not_source_ips excludes the block",
            vec![allow(
                "s",
                Match {
                    not_source_ips: vec![cidr("10.1.0.0/16")],
                    ..Default::default()
                },
            )],
            alice(),
            NotAllowed,
        ),
        case(
            "destination port allowed",
            vec![allow("port", ports(&[8080]))],
            alice(),
            allowed("port"),
        ),
        case(
            "destination port not listed",
            vec![allow("port", ports(&[9090]))],
            alice(),
            NotAllowed,
        ),
        case(
            "not_destination_ports on a DENY",
            vec![deny(
                "port",
                Match {
                    not_destination_ports: vec![8080],
                    ..Default::default()
                },
            )],
            alice(),
            AllowedNoPolicy,
        ),
        case(
            "destination IP",
            vec![deny(
                "dip",
                Match {
                    destination_ips: vec![cidr("10.0.0.5/32")],
                    ..Default::default()
                },
            )],
            alice(),
            denied("dip"),
        ),
        case(
            "not_destination_ips",
            vec![allow(
                "dip",
                Match {
                    not_destination_ips: vec![cidr("10.0.0.0/24")],
                    ..Default::default()
                },
            )],
            alice(),
            NotAllowed,
        ),
        case(
            "fields of one match are AND-ed",
            vec![allow(
                "and",
                Match {
                    principals: vec![exact(alice_p)],
                    destination_ports: vec![9090],
                    ..Default::default()
                },
            )],
            alice(),
            NotAllowed,
        ),
        case(
            "matches of one clause are OR-ed",
            vec![policy(
                "or",
                Action::Allow,
                vec![vec![vec![ports(&[9090]), principals(&[alice_p])]]],
            )],
            alice(),
            allowed("or"),
        ),
        case(
            "clauses of one rule are AND-ed",
            vec![policy(
                "and",
                Action::Allow,
                vec![vec![vec![principals(&[alice_p])], vec![ports(&[9090])]]],
            )],
            alice(),
            NotAllowed,
        ),
        case(
            "rules are OR-ed",
            vec![policy(
                "or",
                Action::Allow,
                vec![
                    vec![vec![ports(&[9090])]],
                    vec![vec![principals(&[alice_p])]],
                ],
            )],
            alice(),
            allowed("or"),
        ),
        case(
            "DENY wins over a matching ALLOW",
            vec![
                allow("a", principals(&[alice_p])),
                deny("d", ports(&[8080])),
            ],
            alice(),
            denied("d"),
        ),
        case(
            "a non-matching DENY leaves the ALLOW to decide",
            vec![allow("a", principals(&[alice_p])), deny("d", ports(&[22]))],
            alice(),
            allowed("a"),
        ),
        case(
            "one of several ALLOWs suffices",
            vec![
                allow("a", namespaces(&["backend"])),
                allow("b", namespaces(&["frontend"])),
            ],
            alice(),
            allowed("b"),
        ),
        case(
            "policy of another namespace does not apply",
            vec![scoped(
                deny("d", principals(&[alice_p])),
                Scope::Namespace,
                "elsewhere",
            )],
            alice(),
            AllowedNoPolicy,
        ),
        case(
            "GLOBAL applies to every namespace",
            vec![scoped(
                deny("d", principals(&[alice_p])),
                Scope::Global,
                "istio-system",
            )],
            alice(),
            Verdict::Denied("istio-system/d".into()),
        ),
        case(
            "WORKLOAD_SELECTOR not selecting the workload does not apply",
            vec![scoped(
                allow("sel", ports(&[9090])),
                Scope::WorkloadSelector,
                TARGET_NS,
            )],
            alice(),
            AllowedNoPolicy,
        ),
        Case {
            selected_by: vec![format!("{TARGET_NS}/sel").into()],
            ..case(
                "WORKLOAD_SELECTOR selecting the workload applies",
                vec![scoped(
                    allow("sel", ports(&[9090])),
                    Scope::WorkloadSelector,
                    TARGET_NS,
                )],
                alice(),
                NotAllowed,
            )
        },
        Case {
            want_dry_run: Some(denied("d")),
            ..case(
                "dry-run DENY does not enforce",
                vec![dry(deny("d", principals(&[alice_p])))],
                alice(),
                AllowedNoPolicy,
            )
        },
        Case {
            want_dry_run: Some(NotAllowed),
            ..case(
                "dry-run ALLOW does not make other clients fail",
                vec![dry(allow("a", principals(&["cluster.local/ns/x/sa/y"])))],
                alice(),
                AllowedNoPolicy,
            )
        },
        Case {
            want_dry_run: Some(allowed("a")),
            ..case(
                "dry-run reported beside an enforced DENY",
                vec![
                    deny("d", ports(&[8080])),
                    dry(allow("a", principals(&[alice_p]))),
                ],
                alice(),
                denied("d"),
            )
        },
        Case {
            dst: "10.0.0.5:9090",
            ..case(
                "the connection's port is the destination's",
                vec![allow("port", ports(&[9090]))],
                alice(),
                allowed("port"),
            )
        },
        // Service accounts (istiod's `from.source.serviceAccounts`, Match fields 11 and 12).
        case(
            "DENY on a service account refuses that account",
            vec![deny("sa", service_accounts(&[("frontend", "alice")]))],
            alice(),
            denied("sa"),
        ),
        case(
            "DENY on a service account lets other accounts in",
            vec![deny("sa", service_accounts(&[("frontend", "attacker")]))],
            alice(),
            AllowedNoPolicy,
        ),
        case(
            "DENY on a service account: same name in another namespace is another account",
            vec![deny("sa", service_accounts(&[("backend", "alice")]))],
            alice(),
            AllowedNoPolicy,
        ),
        case(
            "ALLOW on a service account lets that account in",
            vec![allow("sa", service_accounts(&[("frontend", "alice")]))],
            alice(),
            allowed("sa"),
        ),
        case(
            "ALLOW on a service account refuses other accounts",
            vec![allow("sa", service_accounts(&[("frontend", "bob")]))],
            alice(),
            NotAllowed,
        ),
        case(
            "ALLOW on a service account never lets a client without identity in",
            vec![allow("sa", service_accounts(&[("frontend", "alice")]))],
            plaintext("10.1.0.7"),
            NotAllowed,
        ),
        case(
            "DENY on a service account and a port does not catch a client without identity",
            vec![deny(
                "sa",
                Match {
                    service_accounts: accounts(&[("frontend", "attacker")]),
                    destination_ports: vec![8080],
                    ..Default::default()
                },
            )],
            plaintext("10.1.0.7"),
            AllowedNoPolicy,
        ),
        case(
            "not_service_accounts: DENY everyone but the account",
            vec![deny("sa", not_service_accounts(&[("frontend", "alice")]))],
            client("frontend", "bob", "10.1.0.8"),
            denied("sa"),
        ),
        case(
            "not_service_accounts: the account itself passes",
            vec![deny("sa", not_service_accounts(&[("frontend", "alice")]))],
            alice(),
            AllowedNoPolicy,
        ),
        case(
            "not_service_accounts: a client without identity is not the account",
            vec![deny("sa", not_service_accounts(&[("frontend", "alice")]))],
            plaintext("10.1.0.7"),
            denied("sa"),
        ),
        case(
            "a service account is matched whatever the trust domain it was verified in (as ztunnel)",
            vec![deny("sa", service_accounts(&[("frontend", "alice")]))],
            Client {
                identity: Some(Identity::new("other.domain", "frontend", "alice")),
                ip: "10.1.0.7".parse().unwrap(),
            },
            denied("sa"),
        ),
        case(
            "principals do compare the trust domain",
            vec![deny("p", principals(&[alice_p]))],
            Client {
                identity: Some(Identity::new("other.domain", "frontend", "alice")),
                ip: "10.1.0.7".parse().unwrap(),
            },
            AllowedNoPolicy,
        ),
        // A client without identity has namespace "" (as ztunnel).
        case(
            "namespace prefix \"\" matches a client without identity",
            vec![deny(
                "ns",
                Match {
                    namespaces: vec![StringMatch::Prefix(String::new())],
                    ..Default::default()
                },
            )],
            plaintext("10.1.0.7"),
            denied("ns"),
        ),
        case(
            "namespace presence does not match a client without identity",
            vec![deny(
                "ns",
                Match {
                    namespaces: vec![StringMatch::Presence],
                    ..Default::default()
                },
            )],
            plaintext("10.1.0.7"),
            AllowedNoPolicy,
        ),
        case(
            "not_namespaces presence matches a client without identity",
            vec![deny(
                "ns",
                Match {
                    not_namespaces: vec![StringMatch::Presence],
                    ..Default::default()
                },
            )],
            plaintext("10.1.0.7"),
            denied("ns"),
        ),
        // What a workload's authorization_policies brings in.
        Case {
            selected_by: vec!["elsewhere/implicit".into()],
            ..case(
                "a policy the workload names applies whatever its scope and namespace",
                vec![scoped(
                    allow("implicit", service_accounts(&[("default", "waypoint")])),
                    Scope::Namespace,
                    "elsewhere",
                )],
                alice(),
                NotAllowed,
            )
        },
        case(
            "a NAMESPACE policy of another namespace the workload does not name stays out",
            vec![scoped(
                allow("implicit", service_accounts(&[("default", "waypoint")])),
                Scope::Namespace,
                "elsewhere",
            )],
            alice(),
            AllowedNoPolicy,
        ),
        Case {
            selected_by: vec![format!("{TARGET_NS}/allow-waypoint").into()],
            ..case(
                "istiod's implicit waypoint ALLOW lets the waypoint in",
                vec![scoped(
                    allow(
                        "allow-waypoint",
                        service_accounts(&[("default", "waypoint")]),
                    ),
                    Scope::WorkloadSelector,
                    TARGET_NS,
                )],
                client("default", "waypoint", "10.2.0.9"),
                allowed("allow-waypoint"),
            )
        },
    ]
}

#[test]
fn policy_table() {
    let cases = cases();
    assert!(cases.len() >= 30, "the table has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let dst: SocketAddr = case.dst.parse().unwrap();
        let conn = Connection {
            source: case.client.identity.as_ref(),
            source_ip: case.client.ip,
            destination: dst,
        };
        let target = Target {
            namespace: TARGET_NS,
            selected_by: &case.selected_by,
        };
        let got = evaluate(&case.policies, &target, &conn);
        let want = Decision {
            verdict: case.want.clone(),
            dry_run: case.want_dry_run.clone(),
        };
        if got != want {
            failures.push(format!("{}: got {got:?}, want {want:?}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cidr_rejects_prefixes_longer_than_the_address() {
    assert!(Cidr::new("10.0.0.0".parse().unwrap(), 33).is_none());
    assert!(Cidr::new("::".parse().unwrap(), 129).is_none());
    let mapped = Cidr::new("::ffff:10.0.0.0".parse().unwrap(), 120).unwrap();
    assert!(mapped.contains("10.0.0.200".parse().unwrap()));
    assert!(!mapped.contains("10.0.1.1".parse().unwrap()));
}

#[test]
fn verdicts_read_well_in_logs() {
    assert_eq!(
        denied("d").to_string(),
        format!("denied by policy {TARGET_NS}/d")
    );
    assert_eq!(
        Verdict::NotAllowed.to_string(),
        "denied: no ALLOW policy matched"
    );
}
