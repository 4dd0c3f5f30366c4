use crate::proto::Any;
use prost::Message;

use super::*;
use crate::xds::proto::discovery::Resource;

fn workload_resource(uid: &str, version: &str, address: Vec<u8>) -> Resource {
    let body = workload::Address {
        r#type: Some(workload::address::Type::Workload(workload::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "default".into(),
            addresses: vec![address],
            ..Default::default()
        })),
    };
    Resource {
        name: uid.into(),
        version: version.into(),
        resource: Some(Any {
            type_url: ADDRESS_TYPE.into(),
            value: body.encode_to_vec().into(),
        }),
        ..Default::default()
    }
}

fn response(nonce: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    }
}

fn session() -> Session {
    Session::new(
        Node {
            id: "ztunnel~10.0.0.1~mesh-node-x.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        },
        "cluster.local",
    )
}

#[test]
fn acks_applies_and_resumes_with_the_versions_it_holds() {
    let mut session = session();
    let first = session.initial_requests();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|r| r.initial_resource_versions.is_empty()));
    assert!(first[0].node.as_ref().unwrap().id.starts_with("ztunnel~"));
    assert!(!session.synced());

    let handled = session.handle(response(
        "n1",
        vec![
            workload_resource("a", "v1", vec![10, 0, 0, 1]),
            workload_resource("b", "v1", vec![10, 0, 0, 2]),
        ],
        &[],
    ));
    assert_eq!(handled.reply.response_nonce, "n1");
    assert!(handled.reply.error_detail.is_none());
    let mut state = State::new();
    handled.update.apply(&mut state);
    assert_eq!(state.workload_count(), 2);
    assert!(!session.synced(), "policies have not answered yet");

    let handled = session.handle(DeltaDiscoveryResponse {
        type_url: AUTHORIZATION_TYPE.into(),
        nonce: "n2".into(),
        ..Default::default()
    });
    assert!(handled.rejected.is_empty());
    assert!(session.synced());

    let handled = session.handle(response("n3", vec![], &["a"]));
    handled.update.apply(&mut state);
    assert_eq!(state.workload_count(), 1);

    let resumed = session.initial_requests();
    assert_eq!(
        resumed[0].initial_resource_versions,
        HashMap::from([("b".to_owned(), "v1".to_owned())])
    );
}

#[test]
fn a_bad_resource_is_nacked_by_name_and_the_rest_of_the_response_applies() {
    let mut session = session();
    let mut state = State::new();
    session
        .handle(response(
            "n0",
            vec![
                workload_resource("old", "v1", vec![10, 0, 0, 9]),
                workload_resource("bad", "v1", vec![10, 0, 0, 8]),
            ],
            &[],
        ))
        .update
        .apply(&mut state);
    // One response: a good add, a bad update of a held resource, a removal.
    let handled = session.handle(response(
        "n1",
        vec![
            workload_resource("good", "v2", vec![10, 0, 0, 1]),
            workload_resource("bad", "v2", vec![1, 2, 3]),
        ],
        &["old"],
    ));
    assert_eq!((handled.applied, handled.removed), (1, 1));
    let detail = handled.reply.error_detail.clone().unwrap();
    assert_eq!(detail.code, INVALID_ARGUMENT);
    assert_eq!(
        detail.message,
        "resource \"bad\": workload \"bad\": addresses[0]: 3 bytes is not an IPv4 (4) or IPv6 (16) address"
    );
    assert_eq!(handled.reply.response_nonce, "n1");
    assert_eq!(handled.rejected.len(), 1);
    handled.update.apply(&mut state);
    assert!(
        state.workload("good").is_some(),
        "the good resource applies"
    );
    assert!(state.workload("old").is_none(), "the removal applies");
    assert_eq!(
        &*state.workload("bad").unwrap().addresses,
        ["10.0.0.8".parse::<std::net::IpAddr>().unwrap()],
        "the last good version of the refused resource stays"
    );
    // The refused resource keeps the version we hold, so a reconnect asks for it again.
    assert_eq!(
        session.initial_requests()[0].initial_resource_versions,
        HashMap::from([
            ("good".to_owned(), "v2".to_owned()),
            ("bad".to_owned(), "v1".to_owned())
        ])
    );
    let status = session.status();
    assert_eq!(status.rejected.len(), 1);
    assert_eq!(
        (
            status.rejected[0].name.as_str(),
            status.rejected[0].version.as_str()
        ),
        ("bad", "v2")
    );

    // A good version mends it; the NACK's record goes.
    let handled = session.handle(response(
        "n2",
        vec![workload_resource("bad", "v3", vec![10, 0, 0, 3])],
        &[],
    ));
    assert!(handled.reply.error_detail.is_none());
    assert!(session.status().rejected.is_empty());

    let mut garbage = workload_resource("junk", "v1", vec![]);
    garbage.resource.as_mut().unwrap().value = vec![0xff, 0xff, 0xff].into();
    let handled = session.handle(response("n3", vec![garbage], &[]));
    assert!(handled.rejected[0].error.starts_with("decode:"));
    // A refused resource that was never good is not held, and its removal clears the record.
    assert!(
        !session.initial_requests()[0]
            .initial_resource_versions
            .contains_key("junk")
    );
    session.handle(response("n4", vec![], &["junk"]));
    assert!(session.status().rejected.is_empty());

    let handled = session.handle(DeltaDiscoveryResponse {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        nonce: "n5".into(),
        ..Default::default()
    });
    assert!(handled.refused.unwrap().contains("is not supported"));
    assert!(handled.reply.error_detail.is_some());
}

#[test]
fn a_response_with_only_bad_resources_still_counts_as_an_answer() {
    let mut session = session();
    session.handle(response(
        "n1",
        vec![workload_resource("bad", "v1", vec![1])],
        &[],
    ));
    session.handle(DeltaDiscoveryResponse {
        type_url: AUTHORIZATION_TYPE.into(),
        nonce: "n2".into(),
        ..Default::default()
    });
    assert!(
        session.synced(),
        "readiness must not wait for a good version of every resource"
    );
    assert!(session.status().synced);
}

#[test]
fn a_large_update_applies_in_steps_to_the_same_state() {
    let mut session = session();
    let first: Vec<Resource> = (0..7u8)
        .map(|i| workload_resource(&format!("w{i}"), "1", vec![10, 0, 1, i]))
        .collect();
    let mut whole = State::new();
    let mut stepped = State::new();
    session
        .handle(response("1", first.clone(), &[]))
        .update
        .apply(&mut whole);
    session
        .handle(response("1", first, &[]))
        .update
        .apply(&mut stepped);

    // Two removals, then five workloads (two of them replacing earlier ones at new addresses).
    let second: Vec<Resource> = (3..8u8)
        .map(|i| workload_resource(&format!("w{i}"), "2", vec![10, 0, 2, i]))
        .collect();
    let update = session
        .handle(response("2", second.clone(), &["w0", "w1"]))
        .update;
    let steps = update.into_steps(3);
    let sizes: Vec<(usize, usize)> = steps
        .iter()
        .map(|s| (s.removed_addresses.len(), s.addresses.len()))
        .collect();
    assert_eq!(sizes, [(2, 1), (0, 3), (0, 1)], "in order, three at a time");
    for step in steps {
        step.apply(&mut stepped);
    }
    session
        .handle(response("2", second, &["w0", "w1"]))
        .update
        .apply(&mut whole);

    let uids = |state: &State| {
        let mut found: Vec<(String, Vec<std::net::IpAddr>)> = state
            .workloads()
            .map(|w| (w.uid.to_string(), w.addresses.to_vec()))
            .collect();
        found.sort();
        found
    };
    assert_eq!(uids(&stepped), uids(&whole));
    assert_eq!(stepped.workload_count(), 6, "w2 to w7");
    assert!(stepped.workload("w0").is_none());
    assert!(
        stepped
            .workload_by_ip("", "10.0.1.4".parse().unwrap())
            .is_none(),
        "w4's old address is let go"
    );
    assert_eq!(Update::default().into_steps(STEP).len(), 1);
}
