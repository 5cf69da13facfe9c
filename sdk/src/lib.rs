//! What every Network Service Mesh component shares.
//!
//! # Layout
//! - [`networkservice`]: the Request/Close chain ([`networkservice::chain`])
//!   and its elements (`updatepath`, `begin`, `metadata`, `updatetoken`,
//!   `timeout`, `monitor`, `trimpath`, `mechanisms`, `connect`, ...), plus
//!   the gRPC server adapter; [`networkservice::chains`] builds the prefix
//!   every server shares.
//! - [`ipam`]: address allocation for endpoints (point-to-point pairs).
//! - [`tools`]: gRPC URLs/listeners/dialing, netns handles, NSURLs, label
//!   matching, per-hop tokens and what every daemon's `main` shares.
//! - [`registry`]: the registry traits, the in-memory store, the remote
//!   client, interdomain routing, registry authorize.
//! - [`security`]: SVIDs and TLS, ES256 tokens, Rego policies.
//! - `testing` (feature `testing`, and in this crate's tests): chain
//!   fixtures and throwaway network namespaces for tests.

pub mod ipam;
pub mod networkservice;
pub mod registry;
pub mod security;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tools;
