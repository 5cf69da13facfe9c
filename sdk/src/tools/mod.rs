//! Helpers without chain semantics.

pub mod grpc;
pub mod netns;
pub mod token;
