//! Data-path handlers, one module per direction.
pub mod outbound;
