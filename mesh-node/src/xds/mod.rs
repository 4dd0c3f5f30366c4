//! Where the mesh's state comes from. Today: a local YAML file. The delta-ADS client for istiod
//! arrives later and fills the same [`crate::state`] index.
pub mod local_file;
