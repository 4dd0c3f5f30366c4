//! `GET /config_dump`: what a user needs to debug routing and policy — the node, enrolled pods,
//! every workload and service field kept, policies as structured rules, the resources the
//! control plane sent that were refused, and certificates (never keys).
use std::time::SystemTime;

use serde_json::{Value, json};

use super::Admin;
use crate::logging;

/// The whole dump.
pub(super) fn of(admin: &Admin) -> Value {
    let Some(ctx) = admin.ctx.get() else {
        return json!({ "error": "the data plane is not up yet" });
    };
    let state = ctx.state();
    let mut workloads: Vec<Value> = state
        .workloads()
        .map(|w| {
            let mut value = json!(**w);
            value["identity"] = json!(w.identity());
            value
        })
        .collect();
    workloads.sort_by_key(|w| w["uid"].as_str().unwrap_or_default().to_owned());
    let mut services: Vec<Value> = state
        .services()
        .map(|s| {
            let mut value = json!(**s);
            let mut endpoints: Vec<String> = state
                .endpoints(s.key())
                .map(|w| w.uid.to_string())
                .collect();
            endpoints.sort();
            value["endpoints"] = json!(endpoints);
            value
        })
        .collect();
    services.sort_by_key(|s| {
        format!(
            "{}/{}",
            s["namespace"].as_str().unwrap_or_default(),
            s["hostname"].as_str().unwrap_or_default()
        )
    });
    let mut policies: Vec<Value> = state.policies().map(|p| json!(**p)).collect();
    policies.sort_by_key(|p| {
        format!(
            "{}/{}",
            p["namespace"].as_str().unwrap_or_default(),
            p["name"].as_str().unwrap_or_default()
        )
    });
    drop(state);
    let rejected = json!(admin.readiness.xds.borrow().rejected);
    let pods: Vec<Value> = admin
        .enroller
        .get()
        .map(|enroller| {
            enroller
                .pods()
                .iter()
                .map(|pod| {
                    json!({
                        "pod": pod.spec.to_string(),
                        "identity": pod.identity.to_string(),
                        "addresses": pod.spec.ips,
                        "netns": pod.netns.path(),
                        "netns_cookie": pod.netns_cookie,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let now = SystemTime::now();
    let certificates: Vec<Value> = ctx
        .certs
        .as_ref()
        .map(|certs| {
            certs
                .snapshot()
                .into_iter()
                .map(|status| {
                    json!({
                        "identity": status.identity.to_string(),
                        "enrolled_pod": status.tracked,
                        "valid": status.valid,
                        "not_after": status.not_after.map(rfc3339),
                        "expires_in_seconds": status.not_after.map(|t| t.duration_since(now).map_or(0, |d| d.as_secs())),
                        "last_error": status.error,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "node": {
            "name": ctx.node.node_name,
            "cluster_id": ctx.node.cluster_id,
            "network": ctx.node.network,
        },
        "enrolled_pods": pods,
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "rejected_resources": rejected,
        "certificates": certificates,
        "log_filter": logging::current_filter(),
    })
}

fn rfc3339(time: SystemTime) -> String {
    time::OffsetDateTime::from(time)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
