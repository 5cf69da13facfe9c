//! The NSM registry service with in-memory storage (upstream's
//! `cmd-registry-memory`): `registry.NetworkServiceRegistry` and
//! `registry.NetworkServiceEndpointRegistry` on `NSM_LISTEN_ON`
//! (default `tcp://:5002`), endpoint registrations capped at
//! `NSM_EXPIRE_PERIOD` (default 1m).
//!
//! State lives only in memory: after a restart, endpoints and forwarders
//! re-register on their next refresh (at most 2/3 of the expire period), and
//! endpoints re-register their network services on the same cadence.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nsm_api::service_names;
use nsm_sdk::registry::expire::Expire;
use nsm_sdk::registry::memory::MemoryRegistry;
use nsm_sdk::registry::{NsRegistryServer, NseRegistryServer};
use nsm_sdk::tools::daemon::{self, parse_duration};
use nsm_sdk::tools::grpc::{Listeners, UrlList, parse_url_list};
use url::Url;

/// Configuration (flags or the upstream `NSM_*` environment variables).
#[derive(Parser, Debug, Clone)]
#[command(name = "nsm-registry", version, about = "NSM registry (in-memory store)")]
pub struct Config {
    /// Where to serve, comma-separated `tcp://host:port` / `unix:///path`.
    #[arg(long, env = "NSM_LISTEN_ON", default_value = "tcp://:5002", value_parser = parse_url_list)]
    pub listen_on: UrlList,
    /// Endpoint registrations expire this long after their last refresh.
    #[arg(long, env = "NSM_EXPIRE_PERIOD", default_value = "1m", value_parser = parse_duration)]
    pub expire_period: Duration,
    #[command(flatten)]
    pub common: daemon::CommonArgs,
}

/// Serves the registry on `listeners` until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = MemoryRegistry::new();
    let nse = Expire::new(Arc::new(store.clone()), cfg.expire_period);
    let health = daemon::health_service(&[
        service_names::NETWORK_SERVICE_REGISTRY,
        service_names::NETWORK_SERVICE_ENDPOINT_REGISTRY,
    ])
    .await;
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(NsRegistryServer(Arc::new(store)).into_service())
        .add_service(NseRegistryServer(nse).into_service());
    tracing::info!(listen_on = ?listeners.urls().iter().map(Url::as_str).collect::<Vec<_>>(), "registry serving");
    daemon::serve(router, listeners, shutdown, Duration::from_secs(2)).await?;
    Ok(())
}

#[cfg(test)]
mod cli_tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Config::command().debug_assert();
    }
}
