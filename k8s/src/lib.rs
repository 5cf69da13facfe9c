//! NSM on Kubernetes.
//!
//! # Layout
//! - [`crd`]: the `networkservicemesh.io/v1` custom resources and their
//!   generated CRD manifests.
//! - [`client`]: connecting to the API server; its errors as gRPC statuses.
//! - [`registry`]: the registry's records as those custom resources.
//! - [`registryd`]: the `nsm-registry-k8s` daemon.
//! - [`webhook`]: the `nsm-admission-webhook` daemon.
//! - `testing` (feature `testing`): a real etcd and kube-apiserver on
//!   loopback for tests.

pub mod client;
pub mod crd;
pub mod registry;
pub mod registryd;
#[cfg(any(test, feature = "testing"))]
#[allow(clippy::unwrap_used)] // a test fixture: panics are its errors
pub mod testing;
pub mod webhook;
