//! A development SPIFFE Workload API server: stands in for the SPIRE agent in
//! the lab and in tests (in Kubernetes, SPIRE does this job and nothing else
//! changes).
//!
//! - Serves the standard `SpiffeWorkloadAPI` (see `proto/workload.proto`) on
//!   unix sockets (`SPIFFE_DEV_LISTEN_ON`, default
//!   `unix:///run/spire/sockets/agent.sock`); clients must send the metadata
//!   `workload.spiffe.io: true`.
//! - One self-signed EC P-256 CA per trust domain of the config file,
//!   generated at start, or loaded from / saved to `SPIFFE_DEV_CA_DIR` so
//!   restarts (and several servers sharing the directory) keep trust.
//! - Attests callers by unix peer credentials (pid, uid → executable and
//!   netns) against the rules of the config file (`SPIFFE_DEV_CONFIG`, see
//!   [`policy`]); first match wins; no match is PermissionDenied.
//! - Issues short-lived EC P-256 X.509-SVIDs (`SPIFFE_DEV_SVID_TTL`, default
//!   1h) and pushes a new one at half its lifetime and whenever a bundle
//!   changes.
//! - Federation: each SVID response carries the bundles of every other
//!   trust domain as federated bundles, unless a domain says `federate: false`.
//! - JWT-SVID calls return Unimplemented.
//!
//! [`mint_svid`] / [`Ca::mint`] issue SVIDs outside the server (expired ones,
//! ones from a CA nobody trusts) for tests.

pub mod attest;
pub mod authority;
pub mod ca;
pub mod policy;
pub mod server;

/// Generated from `proto/workload.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("_");
}

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nsm_sdk::tools::daemon::{self, parse_duration};
use nsm_sdk::tools::grpc::{Listeners, UrlList, parse_url_list, unix_path};
use url::Url;

pub use authority::{Authority, AuthorityOptions};
pub use ca::{Ca, CaError, MintedSvid, mint_svid};
pub use policy::{Caller, FileConfig, Match, Policy, Rule, TrustDomainConfig};
pub use server::WorkloadApi;

/// Configuration (flags or `SPIFFE_DEV_*` environment variables).
#[derive(Parser, Debug, Clone)]
#[command(name = "nsm-spiffe-dev", version, about = "Development SPIFFE Workload API server (for SPIRE's agent)")]
pub struct Config {
    /// Unix socket(s) to serve on, comma-separated `unix:///path` (parent
    /// directories are created).
    #[arg(long, env = "SPIFFE_DEV_LISTEN_ON", default_value = "unix:///run/spire/sockets/agent.sock", value_parser = parse_listen_on)]
    pub listen_on: UrlList,
    /// Config file (YAML or JSON): trust domains and attestation rules.
    #[arg(long, env = "SPIFFE_DEV_CONFIG")]
    pub config: PathBuf,
    /// Lifetime of each X.509-SVID; a new one is sent at half of it.
    #[arg(long, env = "SPIFFE_DEV_SVID_TTL", default_value = "1h", value_parser = parse_duration)]
    pub svid_ttl: Duration,
    /// Lifetime of a generated CA; it is rotated at half of it.
    #[arg(long, env = "SPIFFE_DEV_CA_TTL", default_value = "720h", value_parser = parse_duration)]
    pub ca_ttl: Duration,
    /// Keep the CAs here (`<td>.pem`, `<td>.key`): loaded at start if present,
    /// saved when generated. Servers sharing the directory share the CAs.
    #[arg(long, env = "SPIFFE_DEV_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Where named network namespaces live (for the `netns` match keys).
    #[arg(long, env = "SPIFFE_DEV_NETNS_DIR", default_value = attest::NETNS_DIR)]
    pub netns_dir: PathBuf,
    /// Log level: TRACE, DEBUG, INFO, WARN or ERROR (`RUST_LOG` overrides).
    #[arg(long, env = "NSM_LOG_LEVEL", default_value = "INFO")]
    pub log_level: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "NSM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// `SPIFFE_DEV_LISTEN_ON`: unix URLs only (attestation needs peer credentials).
pub fn parse_listen_on(s: &str) -> Result<UrlList, String> {
    let l = parse_url_list(s).map_err(|e| e.to_string())?;
    if let Some(u) = l.0.iter().find(|u| u.scheme() != "unix") {
        return Err(format!(
            "{u}: the Workload API is served on unix sockets only (callers are attested by their peer credentials)"
        ));
    }
    Ok(l)
}

impl Config {
    /// The issuing options this configuration describes (reads the config
    /// file).
    pub fn authority_options(&self) -> anyhow::Result<AuthorityOptions> {
        if self.svid_ttl < Duration::from_secs(1) {
            anyhow::bail!(
                "--svid-ttl {:?} is too short (X.509 times have whole seconds; use at least 1s)",
                self.svid_ttl
            );
        }
        if self.ca_ttl < 2 * self.svid_ttl {
            anyhow::bail!("--ca-ttl ({:?}) must be at least twice --svid-ttl ({:?})", self.ca_ttl, self.svid_ttl);
        }
        Ok(AuthorityOptions {
            policy: Policy::load(&self.config)?,
            svid_ttl: self.svid_ttl,
            ca_ttl: self.ca_ttl,
            ca_dir: self.ca_dir.clone(),
            netns_dir: self.netns_dir.clone(),
        })
    }
}

/// Reads the config file, sets up the CAs and serves the Workload API on
/// `listeners` until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let auth = Authority::new(cfg.authority_options()?)?;
    serve(auth, listeners, shutdown).await
}

/// Serves the Workload API for `auth` on `listeners` (unix sockets, made
/// connectable by every local user like SPIRE's) until `shutdown` resolves;
/// keeps the CAs fresh meanwhile. Open streams end at shutdown.
pub async fn serve(
    auth: Authority,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    for u in listeners.urls() {
        let Some(p) = unix_path(u) else {
            anyhow::bail!("{u}: the Workload API is served on unix sockets only");
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| anyhow::anyhow!("chmod {}: {e}", p.display()))?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let maintain = tokio::spawn(auth.clone().maintain(stop_rx.clone()));
    let health = daemon::health_service(&["SpiffeWorkloadAPI"]).await;
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(WorkloadApi::new(auth.clone(), stop_rx).into_service());
    let domains: Vec<String> = auth.policy().trust_domains.iter().map(|t| t.name.clone()).collect();
    tracing::info!(
        listen_on = ?listeners.urls().iter().map(Url::as_str).collect::<Vec<_>>(),
        trust_domains = ?domains,
        config = %auth.policy().source.display(),
        svid_ttl = ?auth.options().svid_ttl,
        "SPIFFE Workload API serving"
    );
    let stop = stop_tx.clone();
    let res = daemon::serve(
        router,
        listeners,
        async move {
            shutdown.await;
            let _ = stop.send(true);
        },
        Duration::from_secs(2),
    )
    .await;
    let _ = stop_tx.send(true);
    let _ = maintain.await;
    res?;
    Ok(())
}

#[cfg(test)]
mod config_tests {
    use clap::Parser;

    use super::Config;

    #[test]
    fn options_parse_and_reject_with_clear_errors() {
        let c = Config::try_parse_from(["x", "--config", "/c.yaml"]).unwrap();
        assert_eq!(c.listen_on.0[0].as_str(), "unix:///run/spire/sockets/agent.sock");
        assert_eq!(c.svid_ttl, std::time::Duration::from_secs(3600));
        let e = Config::try_parse_from(["x", "--config", "/c", "--listen-on", "tcp://:1"]).unwrap_err().to_string();
        assert!(e.contains("unix sockets only"), "{e}");
        let c = Config::try_parse_from(["x", "--config", "/c", "--svid-ttl", "500ms"]).unwrap();
        assert!(c.authority_options().unwrap_err().to_string().contains("too short"));
        let c = Config::try_parse_from(["x", "--config", "/c", "--svid-ttl", "1h", "--ca-ttl", "1h"]).unwrap();
        assert!(c.authority_options().unwrap_err().to_string().contains("twice"));
        let c = Config::try_parse_from(["x", "--config", "/nonexistent/c.yaml"]).unwrap();
        assert!(c.authority_options().unwrap_err().to_string().contains("/nonexistent/c.yaml"));
    }
}
