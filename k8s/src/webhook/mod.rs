//! `nsm-admission-webhook`: injects the NSM client into annotated pods
//! (upstream `cmd-admission-webhook-k8s`, its env names where they apply).
//!
//! - [`mutate`]: what is added to which object (the rules).
//! - [`tls`]: the webhook's own CA and serving certificate, rotated.
//! - [`register`]: its `MutatingWebhookConfiguration`.
//! - [`server`]: HTTPS for the API server.
//!
//! # Start-up and shutdown
//! Issue certificates, bind, register the configuration with the CA as
//! `caBundle`, then `/ready` answers 200. On SIGTERM/SIGINT the
//! configuration is deleted if it is still this instance's (see
//! [`register`]), then the process exits 0.
//!
//! # Differences from upstream
//! - Only the self-registering mode with its own certificates
//!   (`NSM_WEBHOOK_MODE=selfregister`, the default here); upstream's
//!   default `spire` mode (serving an SVID) is refused with a reason.
//!   Upstream's `NSM_CERT_FILE_PATH`/`NSM_KEY_FILE_PATH`/
//!   `NSM_CA_BUNDLE_FILE_PATH` are not read.
//! - The certificates are rotated (upstream issues them once per start).
//! - The configuration selects `CREATE` only (upstream also sends
//!   `UPDATE`, which it then admits unchanged) and also Jobs.
//! - Injected containers get `command`/`args` (`nsc init`, `nsc run`,
//!   configurable; empty for images whose entrypoint is the client).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::{Client, ResourceExt};
use nsm_sdk::tools::daemon::parse_duration;
use nsm_sdk::tools::grpc::{Listeners, parse_url};
use nsm_sdk::tools::labels::parse_labels;
use serde_json::json;
use url::Url;

pub mod mutate;
pub mod register;
pub mod server;
pub mod tls;

use mutate::{Decision, Injection, NamespaceInfo};
use register::{Registrar, Registration, Target};

/// Configuration (flags, or upstream's `NSM_*` environment variables).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "nsm-admission-webhook",
    version,
    about = "NSM admission webhook: adds the NSM client (init container and sidecar) to pods annotated with NSURLs",
    after_help = "Example: kubectl annotate pod my-pod networkservicemesh.io=kernel://my-service/nsm-1 (at creation)\n\
                  Exit codes: 0 stopped by a signal; 1 start-up failed (certificates, API server, registration); \
                  64 bad configuration."
)]
pub struct Config {
    /// Name of the MutatingWebhookConfiguration this webhook registers
    /// (its webhook is `<name>.networkservicemesh.io`).
    #[arg(long, env = "NSM_NAME", default_value = "nsm-admission-webhook")]
    pub name: String,
    /// The Service in front of this webhook, which the API server calls.
    #[arg(long, env = "NSM_SERVICE_NAME", default_value = "admission-webhook-svc")]
    pub service_name: String,
    /// Namespace of the webhook and its Service (set it from the downward
    /// API); never sent to the webhook.
    #[arg(long, env = "NSM_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Port of the Service.
    #[arg(long, env = "NSM_SERVICE_PORT", default_value_t = 443)]
    pub service_port: u16,
    /// Instead of the Service, have the API server call this URL
    /// (`https://<host>:<port>/mutate`, e.g. a webhook outside the cluster).
    #[arg(long, env = "NSM_WEBHOOK_URL")]
    pub webhook_url: Option<Url>,
    /// Where to serve HTTPS.
    #[arg(long, env = "NSM_LISTEN_ON", default_value = "tcp://:443", value_parser = parse_url)]
    pub listen_on: Url,
    /// `selfregister`: own certificates and configuration (the only mode).
    #[arg(long, env = "NSM_WEBHOOK_MODE", default_value = "selfregister")]
    pub webhook_mode: String,
    /// Lifetime of the webhook's certificates; renewed at half of it.
    #[arg(long, env = "NSM_CERT_LIFETIME", default_value = "8760h", value_parser = parse_duration)]
    pub cert_lifetime: Duration,
    /// Namespaces never sent to the webhook (comma-separated), besides
    /// its own.
    #[arg(long, env = "NSM_EXCLUDE_NAMESPACES", default_value = "kube-system,spire", value_delimiter = ',')]
    pub exclude_namespaces: Vec<String>,
    /// The annotation listing a pod's NSURLs.
    #[arg(long, env = "NSM_ANNOTATION", default_value = "networkservicemesh.io")]
    pub annotation: String,
    /// Labels added to injected pods (`key:value,...`), e.g.
    /// `spiffe.io/spiffe-id:true` for SPIRE's ClusterSPIFFEID selector.
    #[arg(long, env = "NSM_LABELS", default_value = "", value_parser = parse_labels)]
    pub labels: std::collections::HashMap<String, String>,
    /// Env variable that carries the NSURLs into the client.
    #[arg(long, env = "NSM_NSURL_ENV_NAME", default_value = "NSM_NETWORK_SERVICES")]
    pub nsurl_env_name: String,
    /// Images injected as init containers (comma-separated).
    #[arg(long, env = "NSM_INIT_CONTAINER_IMAGES", value_delimiter = ',')]
    pub init_container_images: Vec<String>,
    /// Images injected as sidecars (comma-separated).
    #[arg(long, env = "NSM_CONTAINER_IMAGES", value_delimiter = ',')]
    pub container_images: Vec<String>,
    /// Command of injected init containers (comma-separated; empty: the
    /// image's entrypoint, as for upstream's cmd-nsc-init).
    #[arg(long, env = "NSM_INIT_CONTAINER_COMMAND", default_value = "nsc", value_delimiter = ',')]
    pub init_container_command: Vec<String>,
    /// Arguments of injected init containers (comma-separated).
    #[arg(long, env = "NSM_INIT_CONTAINER_ARGS", default_value = "init", value_delimiter = ',')]
    pub init_container_args: Vec<String>,
    /// Command of injected sidecars (comma-separated; empty: entrypoint).
    #[arg(long, env = "NSM_CONTAINER_COMMAND", default_value = "nsc", value_delimiter = ',')]
    pub container_command: Vec<String>,
    /// Arguments of injected sidecars (comma-separated).
    #[arg(long, env = "NSM_CONTAINER_ARGS", default_value = "run", value_delimiter = ',')]
    pub container_args: Vec<String>,
    /// Extra env of every injected container (`NAME=value,...`), first.
    #[arg(long, env = "NSM_ENVS", value_delimiter = ',', value_parser = parse_env)]
    pub envs: Vec<(String, String)>,
    /// CPU limit of injected containers.
    #[arg(long, env = "NSM_SIDECAR_LIMITS_CPU", default_value = "200m")]
    pub sidecar_limits_cpu: String,
    /// Memory limit of injected containers.
    #[arg(long, env = "NSM_SIDECAR_LIMITS_MEMORY", default_value = "80Mi")]
    pub sidecar_limits_memory: String,
    /// CPU request of injected containers.
    #[arg(long, env = "NSM_SIDECAR_REQUESTS_CPU", default_value = "100m")]
    pub sidecar_requests_cpu: String,
    /// Memory request of injected containers.
    #[arg(long, env = "NSM_SIDECAR_REQUESTS_MEMORY", default_value = "40Mi")]
    pub sidecar_requests_memory: String,
    /// Kubeconfig to use. Default: `KUBECONFIG` or `~/.kube/config` if
    /// present, else the pod's service account.
    #[arg(long, env = "NSM_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Log level: TRACE, DEBUG, INFO, WARN or ERROR (`RUST_LOG` overrides).
    #[arg(long, env = "NSM_LOG_LEVEL", default_value = "INFO")]
    pub log_level: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "NSM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty name"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn quantity(what: &str, s: &str) -> anyhow::Result<()> {
    let ok = !s.is_empty()
        && s.trim_end_matches(|c: char| c.is_ascii_alphabetic()).parse::<f64>().is_ok()
        && ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"]
            .contains(&s.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.'));
    if !ok {
        bail!("{what} {s:?} is not a Kubernetes quantity (e.g. 200m, 80Mi)");
    }
    Ok(())
}

impl Config {
    /// What to inject, checked; errors name the setting.
    pub fn injection(&self) -> anyhow::Result<Injection> {
        let nonempty = |v: &[String]| v.iter().filter(|s| !s.trim().is_empty()).cloned().collect::<Vec<_>>();
        let (init_images, images) = (nonempty(&self.init_container_images), nonempty(&self.container_images));
        if init_images.is_empty() && images.is_empty() {
            bail!("nothing to inject: set NSM_INIT_CONTAINER_IMAGES and/or NSM_CONTAINER_IMAGES");
        }
        for (what, q) in [
            ("NSM_SIDECAR_LIMITS_CPU", &self.sidecar_limits_cpu),
            ("NSM_SIDECAR_LIMITS_MEMORY", &self.sidecar_limits_memory),
            ("NSM_SIDECAR_REQUESTS_CPU", &self.sidecar_requests_cpu),
            ("NSM_SIDECAR_REQUESTS_MEMORY", &self.sidecar_requests_memory),
        ] {
            quantity(what, q)?;
        }
        let (init_containers, containers) = mutate::container_specs(
            &init_images,
            &nonempty(&self.init_container_command),
            &nonempty(&self.init_container_args),
            &images,
            &nonempty(&self.container_command),
            &nonempty(&self.container_args),
        );
        Ok(Injection {
            annotation: self.annotation.clone(),
            nsurl_env: self.nsurl_env_name.clone(),
            init_containers,
            containers,
            envs: self.envs.clone(),
            labels: self.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>(),
            resources: json!({
                "limits": {"cpu": self.sidecar_limits_cpu, "memory": self.sidecar_limits_memory},
                "requests": {"cpu": self.sidecar_requests_cpu, "memory": self.sidecar_requests_memory},
            }),
        })
    }

    /// Where the API server calls, and the names the certificate needs.
    pub fn target(&self) -> anyhow::Result<(Target, Vec<String>)> {
        if let Some(u) = &self.webhook_url {
            if u.scheme() != "https" {
                bail!("NSM_WEBHOOK_URL {u}: the API server calls webhooks over https only");
            }
            let host = u.host_str().context("NSM_WEBHOOK_URL has no host")?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            return Ok((Target::Url(u.to_string()), vec![host]));
        }
        let (svc, ns) = (&self.service_name, &self.namespace);
        let names = vec![
            format!("{svc}.{ns}.svc"),
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc.cluster.local"),
        ];
        Ok((Target::Service { name: svc.clone(), namespace: ns.clone(), port: self.service_port }, names))
    }
}

/// Answers AdmissionReviews ([`mutate`] plus the namespace lookup).
pub struct Handler {
    pub injection: Injection,
    pub client: Client,
}

impl Handler {
    async fn namespace(&self, name: &str) -> Result<NamespaceInfo, String> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns = api.get(name).await.map_err(|e| {
            format!(
                "the NSM admission webhook cannot read namespace {name:?} (its annotations and Pod Security level \
                 decide the injection): {e}; check the webhook's RBAC (get namespaces)"
            )
        })?;
        let enforce = ns.labels().get("pod-security.kubernetes.io/enforce").cloned().unwrap_or_default();
        Ok(NamespaceInfo { annotations: ns.annotations().clone(), enforce })
    }

    /// The response for one request.
    pub async fn respond(&self, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let resp = AdmissionResponse::from(req);
        let kind = req.kind.kind.as_str();
        if req.operation != Operation::Create || !mutate::handles(kind) {
            return resp;
        }
        let Some(obj) = req.object.as_ref().and_then(|o| serde_json::to_value(o).ok()) else {
            return resp.deny(format!("the {kind} in the AdmissionReview has no object"));
        };
        let namespace = req.namespace.clone().unwrap_or_default();
        let name = req
            .object
            .as_ref()
            .and_then(|o| o.metadata.name.clone().or_else(|| o.metadata.generate_name.clone().map(|g| format!("{g}*"))))
            .unwrap_or_default();
        let ns = match self.namespace(&namespace).await {
            Ok(n) => n,
            Err(m) => {
                tracing::warn!(kind, namespace, name, reason = %m, "denied");
                return resp.deny(m);
            }
        };
        match mutate::decide(&self.injection, kind, &obj, &ns) {
            Decision::Skip(why) => {
                tracing::debug!(kind, namespace, name, why, "admitted unchanged");
                resp
            }
            Decision::Deny(m) => {
                tracing::info!(kind, namespace, name, reason = %m, "denied");
                resp.deny(format!("NSM admission webhook: {kind} {namespace}/{name}: {m}"))
            }
            Decision::Patch(p) => {
                let ops = p.0.len();
                match resp.clone().with_patch(p) {
                    Ok(r) => {
                        tracing::info!(kind, namespace, name, ops, "injected the NSM client");
                        r
                    }
                    Err(e) => resp.deny(format!("NSM admission webhook: cannot encode the patch: {e}")),
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl server::Review for Handler {
    async fn review(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
        let req: AdmissionRequest<DynamicObject> =
            review.try_into().map_err(|e| format!("the AdmissionReview has no request: {e}"))?;
        let resp = self.respond(&req).await;
        serde_json::to_vec(&resp.into_review()).map_err(|e| format!("encoding the response: {e}"))
    }
}

/// The configuration, checked before anything starts.
#[derive(Debug)]
pub struct Checked {
    pub cfg: Config,
    pub injection: Injection,
    pub target: Target,
    /// Names the serving certificate is issued for.
    pub names: Vec<String>,
}

impl Config {
    /// Checks everything that can be checked without the API server;
    /// errors name the setting.
    pub fn check(self) -> anyhow::Result<Checked> {
        if self.webhook_mode != "selfregister" {
            bail!(
                "NSM_WEBHOOK_MODE={}: only `selfregister` (own certificates, self-registered configuration) is supported",
                self.webhook_mode
            );
        }
        if self.cert_lifetime < Duration::from_secs(2) {
            bail!("NSM_CERT_LIFETIME {:?} is too short (at least 2s)", self.cert_lifetime);
        }
        let injection = self.injection()?;
        let (target, names) = self.target()?;
        Ok(Checked { cfg: self, injection, target, names })
    }
}

/// Runs the webhook until `shutdown` (see the module docs).
pub async fn run(checked: Checked, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let Checked { cfg, injection, target, names } = checked;
    let mut current = tls::issue(&names, cfg.cert_lifetime).context("issuing the webhook's certificates")?;
    let resolver = tls::Resolver::new(&current);
    let listeners = Listeners::bind(std::slice::from_ref(&cfg.listen_on)).await?;
    let client = crate::client::connect(cfg.kubeconfig.as_deref()).await?;
    let mut excluded = cfg.exclude_namespaces.iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>();
    if !excluded.contains(&cfg.namespace) {
        excluded.push(cfg.namespace.clone());
    }
    let registration = Registration {
        name: cfg.name.clone(),
        target: target.clone(),
        excluded_namespaces: excluded,
        instance: uuid::Uuid::new_v4().to_string(),
    };
    let registrar = Registrar::new(client.clone(), registration);
    registrar
        .register(&current.ca_pem)
        .await
        .map_err(|e| crate::client::status(&format!("registering MutatingWebhookConfiguration {:?}", cfg.name), &e))
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let ready = Arc::new(AtomicBool::new(true));
    tracing::info!(
        name = %cfg.name,
        target = ?target,
        listen_on = %listeners.urls()[0],
        cert_names = ?names,
        renew_at = %humantime::format_rfc3339_seconds(current.renew_at()),
        annotation = %injection.annotation,
        init_containers = ?injection.init_containers.iter().map(|c| &c.image).collect::<Vec<_>>(),
        containers = ?injection.containers.iter().map(|c| &c.image).collect::<Vec<_>>(),
        "admission webhook registered and serving"
    );
    let handler = Arc::new(Handler { injection, client });
    let serving = server::serve(listeners, tls::acceptor(resolver.clone()), handler, ready.clone(), shutdown);
    tokio::pin!(serving);
    let lifetime = cfg.cert_lifetime;
    loop {
        let wait = current.renew_at().duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            _ = &mut serving => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let next = match tls::issue(&names, lifetime) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "renewing the webhook's certificates failed; retrying in 10 s");
                tokio::time::sleep(Duration::from_secs(10)).await;
                continue;
            }
        };
        let bundle = format!("{}{}", next.ca_pem, current.ca_pem);
        match registrar.update_ca_bundle(&bundle).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                name = %cfg.name,
                "another webhook instance owns the configuration now; serving a renewed certificate it may not trust"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "publishing the renewed caBundle failed; retrying in 5 s");
                tokio::select! {
                    _ = &mut serving => break,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        }
        tokio::select! {
            _ = &mut serving => break,
            _ = tokio::time::sleep(register::switch_delay(lifetime)) => {}
        }
        resolver.set(&next);
        tracing::info!(renew_at = %humantime::format_rfc3339_seconds(next.renew_at()), "webhook certificate renewed");
        current = next;
    }
    ready.store(false, Ordering::Relaxed);
    match registrar.remove().await {
        Ok(true) => tracing::info!(name = %cfg.name, "MutatingWebhookConfiguration deleted"),
        Ok(false) => {
            tracing::info!(name = %cfg.name, "the configuration belongs to another instance now: left in place")
        }
        Err(e) => tracing::warn!(name = %cfg.name, error = %e, "deleting the MutatingWebhookConfiguration failed"),
    }
    Ok(())
}
