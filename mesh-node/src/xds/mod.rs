//! Where the mesh's state comes from: istiod over delta ADS, or a local YAML file of the same
//! resources. Both fill the same [`crate::state`] index.
pub mod client;
pub mod local_file;
pub mod proto;
pub mod session;
