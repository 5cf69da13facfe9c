//! The local lab: network namespaces stand in for nodes and pods, the real
//! binaries run inside them with the same `NSM_*` configuration as in
//! Kubernetes. It is the demo (`nsm-lab`), the integration test bed
//! (`lab/tests/`) and, later, the benchmark rig.
//!
//! # Layout
//! - [`env`]: namespaces, processes, state directory, teardown.
//! - [`mesh`]: nodes, endpoints, clients and queries built on [`env`].
//! - [`demo`]: the scenario `nsm-lab run` shows.

pub mod demo;
pub mod env;
pub mod mesh;

pub use env::{Lab, default_bin_dir, down};
