//! `nsm-registry-k8s`: the registry daemon on the Kubernetes API (upstream
//! `cmd-registry-k8s`, same env names where they exist). The gRPC side is
//! `nsm-registry`'s (registry path, tokens, policies, expire, interdomain
//! forwarding); the records live in [`crate::registry::K8sRegistry`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nsm_registry::{RegistryArgs, Stores};
use nsm_sdk::tools::daemon::{self, Security, parse_duration};
use nsm_sdk::tools::grpc::Listeners;
use url::Url;

use crate::registry::K8sRegistry;
use crate::registry::cache::WatchOptions;

/// Configuration (flags, or upstream's `NSM_*` environment variables).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "nsm-registry-k8s",
    version,
    about = "NSM registry on the Kubernetes API: NetworkService and NetworkServiceEndpoint custom resources"
)]
pub struct Config {
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Namespace the registry writes its objects into (it reads every
    /// namespace, so NetworkServices applied anywhere are served). In a
    /// pod, set it from the downward API (`metadata.namespace`).
    #[arg(long, env = "NSM_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Kubeconfig to use. Default: `KUBECONFIG` or `~/.kube/config` if
    /// present, else the pod's service account.
    #[arg(long, env = "NSM_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Each watch of the API server lasts this long, then resumes from the
    /// last resourceVersion it saw.
    #[arg(long, env = "NSM_WATCH_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub watch_timeout: Duration,
    /// Print the CustomResourceDefinitions this registry needs (YAML, for
    /// `kubectl apply -f -`) and exit.
    #[arg(long)]
    pub print_crds: bool,
}

impl daemon::DaemonConfig for Config {
    const PROG: &'static str = "nsm-registry-k8s";
    fn serving(&self) -> (&daemon::CommonArgs, Duration, Vec<Url>) {
        self.registry.serving()
    }
}

/// The CRD manifests as one YAML stream.
pub fn crds_yaml() -> String {
    crate::crd::crds().into_iter().map(|(_, y)| y).collect::<Vec<_>>().join("---\n")
}

/// Serves the registry until `shutdown`.
pub async fn run(cfg: Config, sec: Security, listeners: Listeners, shutdown: daemon::Shutdown) -> anyhow::Result<()> {
    let client = crate::client::connect(cfg.kubeconfig.as_deref()).await?;
    let opts = WatchOptions { timeout: cfg.watch_timeout, ..WatchOptions::default() };
    let store = K8sRegistry::start(client, &cfg.namespace, opts);
    let what = format!("Kubernetes (writes into namespace {})", cfg.namespace);
    let stores = Stores { ns: Arc::new(store.clone()), nse: Arc::new(store), what };
    nsm_registry::serve(cfg.registry, stores, sec, listeners, shutdown).await
}
