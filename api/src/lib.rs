//! Protobuf and gRPC types of Network Service Mesh.
//!
//! The `.proto` files under `proto/` are written for this project from the
//! published field tables of `networkservicemesh/api` v1; package names,
//! service names, method paths and field numbers match upstream, so Go NSM
//! components and this implementation can talk to each other.
//!
//! # Layout
//! - [`networkservice`], [`connection`], [`connectioncontext`]: the
//!   NetworkService and MonitorConnection APIs (three proto packages that Go
//!   compiles into one package).
//! - [`registry`]: NetworkService / NetworkServiceEndpoint registries.
//! - [`ipam`]: prefix management (vL3).
//! - [`mechanisms`]: mechanism classes, types and parameter keys.
//! - [`ext`]: helper semantics that upstream keeps next to the types.
//!
//! This crate does no I/O.

#![allow(clippy::all, missing_docs)]

/// `connectioncontext` proto package: IP, DNS, Ethernet context and MTU.
pub mod connectioncontext {
    include!(concat!(env!("OUT_DIR"), "/connectioncontext.rs"));
}

/// `connection` proto package: Connection, Path, Mechanism, monitor events.
pub mod connection {
    include!(concat!(env!("OUT_DIR"), "/connection.rs"));
}

/// `networkservice` proto package: the NetworkService service.
pub mod networkservice {
    include!(concat!(env!("OUT_DIR"), "/networkservice.rs"));
}

/// `registry` proto package.
pub mod registry {
    include!(concat!(env!("OUT_DIR"), "/registry.rs"));
}

/// `ipam` proto package.
pub mod ipam {
    include!(concat!(env!("OUT_DIR"), "/ipam.rs"));
}

pub mod ext;
pub mod mechanisms;

/// Encoded `FileDescriptorSet` of every proto in this crate (bare file names,
/// as upstream).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nsm_descriptor.bin"));

/// Full gRPC service names served by NSM components (used for grpc health).
pub mod service_names {
    pub const NETWORK_SERVICE: &str = "networkservice.NetworkService";
    pub const MONITOR_CONNECTION: &str = "connection.MonitorConnection";
    pub const NETWORK_SERVICE_REGISTRY: &str = "registry.NetworkServiceRegistry";
    pub const NETWORK_SERVICE_ENDPOINT_REGISTRY: &str = "registry.NetworkServiceEndpointRegistry";
    pub const IPAM: &str = "ipam.IPAM";
}
