//! Connecting to the Kubernetes API, and what its failures mean to a gRPC
//! caller.
//!
//! # Connecting
//! [`connect`] uses, in this order: the kubeconfig named by `KUBECONFIG`
//! or `--kubeconfig` (`~/.kube/config` when neither is set and it exists),
//! else the pod's service account (in-cluster: `KUBERNETES_SERVICE_HOST`,
//! the mounted token and CA), as upstream's components do (they try
//! in-cluster first; with only one of the two present the result is the
//! same). TLS is rustls on ring, like every other socket of the mesh.
//!
//! # Errors
//! [`status`] maps a kube error to the gRPC code a registry caller can act
//! on and a message that names the API server and what to check:
//! unreachable API server or 5xx ⇒ `Unavailable`; 409 ⇒ `Aborted` (retry);
//! 422 ⇒ `InvalidArgument` (the API server's reason names the field);
//! 403 ⇒ `PermissionDenied` (RBAC); 404 ⇒ `NotFound`.

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tonic::Status;

/// Why the API server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read the kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error(
        "no Kubernetes API server configured: not in a pod (no KUBERNETES_SERVICE_HOST) and no kubeconfig \
         (set KUBECONFIG or --kubeconfig): {reason}"
    )]
    NoConfig { reason: String },
    #[error("cannot build a Kubernetes client for {url}: {reason}")]
    Client { url: String, reason: String },
}

/// A client for the API server configured as the module docs say;
/// `kubeconfig` overrides `KUBECONFIG`.
pub async fn connect(kubeconfig: Option<&std::path::Path>) -> Result<Client, ConnectError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = match kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p)
                .map_err(|e| ConnectError::Kubeconfig { path: p.display().to_string(), reason: e.to_string() })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| ConnectError::Kubeconfig { path: p.display().to_string(), reason: e.to_string() })?
        }
        None => Config::infer().await.map_err(|e| ConnectError::NoConfig { reason: e.to_string() })?,
    };
    let url = cfg.cluster_url.to_string();
    Client::try_from(cfg).map_err(|e| ConnectError::Client { url, reason: e.to_string() })
}

/// `what` failed with `e` (see the module docs for the codes).
pub fn status(what: &str, e: &kube::Error) -> Status {
    match e {
        kube::Error::Api(s) => {
            let m = format!("{what}: the Kubernetes API server answered {} {}: {}", s.code, s.reason, s.message);
            match s.code {
                404 => Status::not_found(m),
                409 => Status::aborted(m),
                400 | 422 => Status::invalid_argument(m),
                401 | 403 => Status::permission_denied(format!(
                    "{m} (check the RBAC of this component's service account for networkservicemesh.io)"
                )),
                429 | 500..=599 => Status::unavailable(m),
                _ => Status::internal(m),
            }
        }
        other => Status::unavailable(format!(
            "{what}: the Kubernetes API server cannot be reached: {other}; check that it is up and that this \
             component's kubeconfig or service account points at it"
        )),
    }
}

/// True if `e` is the API server saying the object exists already.
pub fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists")
}

/// True if `e` is a 409 because the object changed since it was read.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason != "AlreadyExists")
}

/// True if `e` is a 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}
