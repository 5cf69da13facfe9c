//! Helpers without chain semantics.

pub mod daemon;
pub mod grpc;
pub mod grpcfd;
pub mod labels;
pub mod log;
pub mod matchutils;
pub mod netns;
pub mod nsurl;
pub mod token;
pub mod unixsock;
