//! NSM forwarder: receives requests from the local nsmgr, selects the
//! endpoint and builds the wire between client and endpoint.
//!
//! # Layout
//! - [`kernel`]: netlink operations on interfaces in other network
//!   namespaces (veth pairs created in place, addresses, routes, MTU).

pub mod kernel;
