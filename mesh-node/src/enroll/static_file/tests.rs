use std::path::Path;

use super::*;

fn parse_str(text: &str) -> Result<Vec<PodSpec>, StaticFileError> {
    parse(Path::new("pods.yaml"), text)
}

#[test]
fn parses_a_complete_file() {
    let pods = parse_str(
        "pods:\n\
         - name: client\n  namespace: default\n  serviceAccount: sleep\n  netns: /run/netns/a\n  ips: [10.0.1.2, 'fd00::2']\n\
         - name: server\n  namespace: prod\n  netns: /run/netns/b\n  ips: [10.0.1.3]\n",
    )
    .unwrap();
    assert_eq!(pods.len(), 2);
    assert_eq!(pods[0].service_account, "sleep");
    assert_eq!(
        pods[0].ips,
        vec![
            "10.0.1.2".parse::<IpAddr>().unwrap(),
            "fd00::2".parse().unwrap()
        ]
    );
    assert_eq!(pods[1].service_account, "default");
    assert_eq!(pods[1].to_string(), "prod/server");
}

#[test]
fn empty_file_and_empty_list_mean_no_pods() {
    assert!(parse_str("pods: []\n").unwrap().is_empty());
    assert!(parse_str("{}\n").unwrap().is_empty());
}

#[test]
fn bad_ip_names_file_line_and_field() {
    let err = parse_str("pods:\n- name: a\n  namespace: n\n  netns: /x\n  ips: [10.0.1.300]\n")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("pods file pods.yaml: "), "{err}");
    assert!(err.contains("pods[0].ips[0]"), "{err}");
    assert!(err.contains("line 5"), "{err}");
}

#[test]
fn missing_field_is_named() {
    let err = parse_str("pods:\n- name: a\n  namespace: n\n  ips: [10.0.0.1]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing field `netns`"), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn unknown_field_is_refused_with_its_name() {
    let err =
        parse_str("pods:\n- name: a\n  namespace: n\n  netns: /x\n  ips: [10.0.0.1]\n  ipz: []\n")
            .unwrap_err()
            .to_string();
    assert!(err.contains("unknown field `ipz`"), "{err}");
    assert!(err.contains("line 6"), "{err}");
}

#[test]
fn empty_name_and_empty_ips_are_refused() {
    let err = parse_str("pods:\n- name: ''\n  namespace: n\n  netns: /x\n  ips: [10.0.0.1]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pods[0]: field `name` must not be empty at line 2"),
        "{err}"
    );
    let err = parse_str("pods:\n- name: a\n  namespace: n\n  netns: /x\n  ips: []\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pods[0]: field `ips` must list at least one pod IP"),
        "{err}"
    );
}

#[test]
fn duplicates_are_refused() {
    let pod = |name: &str, ip: &str| {
        format!("- name: {name}\n  namespace: n\n  netns: /x\n  ips: [{ip}]\n")
    };
    let err = parse_str(&format!(
        "pods:\n{}{}",
        pod("a", "10.0.0.1"),
        pod("a", "10.0.0.2")
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("pods[1]: duplicate pod n/a"), "{err}");
    let err = parse_str(&format!(
        "pods:\n{}{}",
        pod("a", "10.0.0.1"),
        pod("b", "10.0.0.1")
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("pods[1].ips: 10.0.0.1 is already used by pod n/a"),
        "{err}"
    );
}

#[test]
fn not_yaml_is_a_clear_error_not_a_panic() {
    let err = parse_str("pods: [\n  - {").unwrap_err().to_string();
    assert!(err.starts_with("pods file pods.yaml: "), "{err}");
    let err = parse_str("pods: 7\n").unwrap_err().to_string();
    assert!(err.contains("invalid type"), "{err}");
}
