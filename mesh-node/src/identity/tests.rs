use super::*;

#[test]
fn parses_and_prints_workload_ids() {
    let id: Identity = "spiffe://cluster.local/ns/default/sa/sleep"
        .parse()
        .unwrap();
    assert_eq!(id, Identity::new("cluster.local", "default", "sleep"));
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
}

#[test]
fn rejects_other_shapes() {
    for bad in [
        "cluster.local/ns/default/sa/sleep",
        "spiffe://cluster.local/ns/default",
        "spiffe://cluster.local/ns//sa/x",
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://Cluster.Local/ns/a/sa/b",
        "https://cluster.local/ns/a/sa/b",
    ] {
        assert!(bad.parse::<Identity>().is_err(), "{bad} parsed");
    }
}
