//! Generated protobuf types and gRPC stubs (see `proto/` and build.rs).
#![expect(clippy::all, clippy::pedantic, reason = "generated code")]
#![expect(missing_docs, reason = "generated code")]

/// Envoy's delta discovery messages and the ADS service.
pub mod discovery {
    tonic::include_proto!("envoy.service.discovery.v3");
}

/// Istio's workload API: `Address` = `Workload` | `Service`.
pub mod workload {
    tonic::include_proto!("istio.workload");
}

/// Istio's L4 authorization policy.
pub mod security {
    tonic::include_proto!("istio.security");
}

/// Istio's certificate service.
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

/// `google.protobuf.Any` with its value as [`bytes::Bytes`]: decoded from the buffer an xDS
/// response arrived in (`xds::ads`), a resource's body is a slice of that buffer rather than a
/// copy in an allocation of its own (100,000 of them in istiod's first response at that many
/// workloads); the buffer goes once the response is applied.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Any {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: bytes::Bytes,
}

/// Type URL of workload and service resources.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of authorization policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
