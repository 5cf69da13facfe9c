//! Helpers without chain semantics.

pub mod grpc;
pub mod token;
