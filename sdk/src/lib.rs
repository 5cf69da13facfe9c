//! What every Network Service Mesh component shares.
//!
//! # Layout
//! - [`networkservice`]: the Request/Close chain ([`networkservice::chain`])
//!   and its elements (`updatepath`, `begin`, `metadata`, `updatetoken`,
//!   `timeout`, `monitor`, `trimpath`, `mechanisms`, `connect`, ...), plus
//!   the gRPC server adapter.
//! - [`ipam`]: address allocation for endpoints (point-to-point pairs).
//! - [`tools`]: gRPC URLs/listeners/dialing and per-hop tokens.
//! - [`testing`]: chain fixtures for tests.

pub mod ipam;
pub mod networkservice;
pub mod registry;
pub mod security;
pub mod testing;
pub mod tools;
