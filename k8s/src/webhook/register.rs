//! The webhook's own `MutatingWebhookConfiguration` (upstream
//! `selfregister`): created or taken over at start with this instance's
//! `caBundle`, updated when the certificates rotate, deleted on shutdown.
//!
//! # Ownership
//! The object carries the annotation [`INSTANCE_ANNOTATION`] with a value
//! unique to this process. A newer instance (a rolling update) takes the
//! object over by writing its own value; an older instance then neither
//! rotates the bundle nor deletes the object on its way out, so a restart
//! never leaves the cluster without the webhook. Every write is conditional
//! on the resourceVersion that was read.
//!
//! # What it selects
//! `CREATE` of pods, of `apps/v1` deployments, statefulsets, daemonsets and
//! replicasets, and of `batch/v1` jobs, in every namespace except the
//! excluded ones (by `kubernetes.io/metadata.name`) and the webhook's own;
//! `failurePolicy: Fail` (as upstream: a pod that asked for NSM is never
//! started without it), `sideEffects: None`, 10 s timeout.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::client::{is_already_exists, is_conflict, is_not_found};

/// Annotation naming the instance that owns the configuration.
pub const INSTANCE_ANNOTATION: &str = "networkservicemesh.io/webhook-instance";

/// Where the API server sends admission requests.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A Service in front of the webhook (the in-cluster way).
    Service { name: String, namespace: String, port: u16 },
    /// A URL (`https://host:port/mutate`; outside a cluster, tests).
    Url(String),
}

/// The configuration object to register.
#[derive(Clone, Debug)]
pub struct Registration {
    /// Object name; the webhook inside it is `<name>.networkservicemesh.io`.
    pub name: String,
    pub target: Target,
    /// Namespaces never sent to the webhook.
    pub excluded_namespaces: Vec<String>,
    /// This process's [`INSTANCE_ANNOTATION`] value.
    pub instance: String,
}

impl Registration {
    /// The object with `ca_bundle` (PEM, one or more CAs).
    pub fn object(&self, ca_bundle: &str) -> MutatingWebhookConfiguration {
        let client_config = match &self.target {
            Target::Service { name, namespace, port } => json!({
                "service": {"name": name, "namespace": namespace, "path": "/mutate", "port": port},
                "caBundle": B64.encode(ca_bundle),
            }),
            Target::Url(url) => json!({"url": url, "caBundle": B64.encode(ca_bundle)}),
        };
        let rule = |group: &str, resources: &[&str]| json!({"apiGroups": [group], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": resources, "scope": "Namespaced"});
        let v = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {
                "name": self.name,
                "annotations": {INSTANCE_ANNOTATION: self.instance},
                "labels": {"app.kubernetes.io/managed-by": "nsm-admission-webhook"},
            },
            "webhooks": [{
                "name": format!("{}.networkservicemesh.io", self.name),
                "clientConfig": client_config,
                "rules": [
                    rule("", &["pods"]),
                    rule("apps", &["deployments", "statefulsets", "daemonsets", "replicasets"]),
                    rule("batch", &["jobs"]),
                ],
                "namespaceSelector": {"matchExpressions": [{
                    "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": self.excluded_namespaces,
                }]},
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 10,
                "reinvocationPolicy": "Never",
            }],
        });
        serde_json::from_value(v).unwrap_or_default()
    }

    fn ours(&self, o: &MutatingWebhookConfiguration) -> bool {
        o.annotations().get(INSTANCE_ANNOTATION) == Some(&self.instance)
    }
}

/// Writes the configuration through the API.
#[derive(Clone)]
pub struct Registrar {
    api: Api<MutatingWebhookConfiguration>,
    reg: Registration,
}

/// Attempts of a write whose object keeps changing.
const ATTEMPTS: usize = 5;

impl Registrar {
    pub fn new(client: Client, reg: Registration) -> Registrar {
        Registrar { api: Api::all(client), reg }
    }

    /// Creates the configuration, or takes an existing one of that name over,
    /// with `ca_bundle`.
    pub async fn register(&self, ca_bundle: &str) -> Result<(), kube::Error> {
        let want = self.reg.object(ca_bundle);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let retry = attempt < ATTEMPTS;
            let r = match self.api.get_opt(&self.reg.name).await? {
                None => self.api.create(&PostParams::default(), &want).await,
                Some(current) => {
                    let mut next = want.clone();
                    next.metadata.resource_version = current.resource_version();
                    self.api.replace(&self.reg.name, &PostParams::default(), &next).await
                }
            };
            match r {
                Ok(_) => return Ok(()),
                // Created or changed by someone else meanwhile: read again.
                Err(e) if retry && (is_already_exists(&e) || is_conflict(&e)) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Replaces the `caBundle` if the configuration is still this
    /// instance's; `Ok(false)` if another instance took it over.
    pub async fn update_ca_bundle(&self, ca_bundle: &str) -> Result<bool, kube::Error> {
        for _ in 0..ATTEMPTS {
            let Some(current) = self.api.get_opt(&self.reg.name).await? else {
                // Deleted under us (kubectl delete): put it back.
                self.register(ca_bundle).await?;
                return Ok(true);
            };
            if !self.reg.ours(&current) {
                return Ok(false);
            }
            let mut next = self.reg.object(ca_bundle);
            next.metadata.resource_version = current.resource_version();
            match self.api.replace(&self.reg.name, &PostParams::default(), &next).await {
                Ok(_) => return Ok(true),
                Err(e) if is_conflict(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Deletes the configuration if it is still this instance's.
    pub async fn remove(&self) -> Result<bool, kube::Error> {
        let Some(current) = self.api.get_opt(&self.reg.name).await? else { return Ok(false) };
        if !self.reg.ours(&current) {
            return Ok(false);
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions { resource_version: current.resource_version(), uid: None }),
            ..DeleteParams::default()
        };
        match self.api.delete(&self.reg.name, &dp).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) || is_not_found(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Pause between publishing a new `caBundle` and serving the certificate it
/// signs, so the API server has taken the bundle in.
pub fn switch_delay(lifetime: Duration) -> Duration {
    (lifetime / 10).clamp(Duration::from_millis(500), Duration::from_secs(10))
}
