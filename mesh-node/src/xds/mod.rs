//! Where the mesh's state comes from: istiod over delta ADS, or a local YAML file of the same
//! resources. Both fill the same [`crate::state`] index.
mod ads;
pub mod client;
pub mod local_file;
/// The generated protos, at their own top-level module (`crate::proto`) so that `state` and
/// `identity` need not import `xds`.
pub use crate::proto;
pub mod session;
