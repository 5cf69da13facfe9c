//! NSM forwarder: receives requests from the local nsmgr, selects the
//! endpoint and builds the wire between client and endpoint.
//!
//! # Layout
//! - [`Config`]: flags / upstream `NSM_*` environment variables.
//! - [`run`]: registers with the nsmgr as an endpoint of the `forwarder`
//!   service and serves the forwarder chain until shutdown.
//! - [`local`]: the KERNEL ↔ KERNEL veth wire on one node.
//! - [`kernel`]: netlink operations on interfaces in other network
//!   namespaces.
//!
//! # The Request chain
//! `updatepath` → `begin` → `metadata` → `updatetoken` → `timeout` →
//! `monitor` → `trimpath` → `discover` → `roundrobin` → `localkernel` →
//! `connect` ⇒ client chain `updatepath` → `trimpath` client → gRPC call to
//! the endpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nsm_api::connection::monitor_connection_server::MonitorConnectionServer;
use nsm_api::registry::{NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_api::service_names;
use nsm_sdk::networkservice::begin::Begin;
use nsm_sdk::networkservice::connect::{Connect, GrpcClient};
use nsm_sdk::networkservice::discover::{Discover, RoundRobin};
use nsm_sdk::networkservice::metadata::Metadata;
use nsm_sdk::networkservice::monitor::MonitorServer;
use nsm_sdk::networkservice::server::ChainServer;
use nsm_sdk::networkservice::timeout::Timeout;
use nsm_sdk::networkservice::trimpath::TrimPath;
use nsm_sdk::networkservice::updatepath::UpdatePath;
use nsm_sdk::networkservice::updatetoken::UpdateToken;
use nsm_sdk::networkservice::{Chain, Element};
use nsm_sdk::registry::RemoteRegistry;
use nsm_sdk::registry::client::register_nse_with_refresh;
use nsm_sdk::tools::daemon::{self, CommonArgs, parse_duration};
use nsm_sdk::tools::grpc::{ChannelPool, Listeners, parse_url};
use nsm_sdk::tools::labels::parse_labels;
use nsm_sdk::tools::token::ExpiryOnly;
use url::Url;

pub mod kernel;
pub mod wireguard;
pub mod local;

/// Configuration: flags, or the environment variables upstream's forwarder
/// reads (same names and defaults where they exist).
#[derive(Parser, Debug, Clone)]
#[command(name = "forwarder", version, about = "NSM forwarder: builds veth wires between pods")]
pub struct Config {
    /// Name of this forwarder (its registry entry and path segment).
    #[arg(long, env = "NSM_NAME", default_value = "forwarder")]
    pub name: String,
    /// Unix socket the nsmgr dials.
    #[arg(long, env = "NSM_LISTEN_ON", default_value = "unix:///listen.on.sock", value_parser = parse_url)]
    pub listen_on: Url,
    /// The local nsmgr (registration and endpoint discovery go through it).
    #[arg(long, env = "NSM_CONNECT_TO", default_value = "unix:///var/lib/networkservicemesh/nsm.io.sock", value_parser = parse_url)]
    pub connect_to: Url,
    /// Labels of this forwarder (`key:value,...`); services select
    /// forwarders by them.
    #[arg(long, env = "NSM_LABELS", default_value = "p2p:true", value_parser = parse_labels)]
    pub labels: HashMap<String, String>,
    /// Network service under which this forwarder registers.
    #[arg(long, env = "NSM_NSNAME", default_value = "forwarder")]
    pub service_name: String,
    /// Timeout for dialing endpoints and the nsmgr.
    #[arg(long, env = "NSM_DIAL_TIMEOUT", default_value = "750ms", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// Lifetime of the tokens this forwarder mints.
    #[arg(long, env = "NSM_MAX_TOKEN_LIFETIME", default_value = "10m", value_parser = parse_duration)]
    pub max_token_lifetime: Duration,
    /// How often to refresh the registration when the registry sets no
    /// expiration.
    #[arg(long, env = "NSM_REGISTRY_REFRESH", default_value = "40s", value_parser = parse_duration)]
    pub registry_refresh: Duration,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// State handles of a running forwarder, for tests and diagnostics.
#[derive(Clone)]
pub struct Handles {
    pub monitor: MonitorServer,
    pub begin: Arc<Begin>,
    pub metadata: Arc<Metadata>,
}

/// Builds the forwarder chain.
pub fn chain(cfg: &Config) -> (Chain, Handles) {
    let pool = ChannelPool::new(cfg.dial_timeout);
    let registry = RemoteRegistry::new(cfg.connect_to.clone(), pool.clone());
    let tokens = ExpiryOnly::new(cfg.max_token_lifetime);
    let monitor = MonitorServer::new();
    // Closes of connections from before a restart still reach localkernel,
    // which removes the interfaces by their alias.
    let begin = Begin::passing_unknown_closes();
    let metadata = Metadata::new();
    let client = Chain::new(vec![
        UpdatePath::new(&cfg.name),
        TrimPath::client(),
        // Calls the endpoint chosen by roundrobin.
        GrpcClient::new(pool, tokens.clone()),
    ]);
    let elems: Vec<Arc<dyn Element>> = vec![
        UpdatePath::new(&cfg.name),
        begin.clone(),
        metadata.clone(),
        UpdateToken::new(tokens),
        Timeout::new(cfg.max_token_lifetime),
        monitor.element(),
        TrimPath::server(),
        // Candidate endpoints from the registry (through the nsmgr).
        Discover::new(Arc::new(registry.clone()), Arc::new(registry)),
        // Try them in turn.
        RoundRobin::new(),
        // Build the veth pair once the endpoint has answered.
        local::LocalKernel::new(),
        Connect::new(client),
    ];
    (Chain::new(elems), Handles { monitor, begin, metadata })
}

/// Serves the forwarder on `listeners`, registered with the nsmgr, until
/// `shutdown`; then unregisters.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (chain, h) = chain(&cfg);
    let url = listeners.urls().first().cloned().ok_or_else(|| anyhow::anyhow!("nothing to listen on"))?;
    let health = daemon::health_service(&[service_names::NETWORK_SERVICE, service_names::MONITOR_CONNECTION]).await;
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(ChainServer::new(chain).into_service())
        .add_service(MonitorConnectionServer::new(h.monitor.clone()));
    let server = tokio::spawn(daemon::serve(router, listeners, shutdown, Duration::from_secs(5)));

    let registry = RemoteRegistry::new(cfg.connect_to.clone(), ChannelPool::new(cfg.dial_timeout));
    let me = NetworkServiceEndpoint {
        name: cfg.name.clone(),
        network_service_names: vec![cfg.service_name.clone()],
        network_service_labels: HashMap::from([(
            cfg.service_name.clone(),
            NetworkServiceLabels { labels: cfg.labels.clone() },
        )]),
        url: url.to_string(),
        ..Default::default()
    };
    // Keep trying: the nsmgr may start after us.
    let mut attempts = 0u32;
    let guard = loop {
        match register_nse_with_refresh(Arc::new(registry.clone()), me.clone(), cfg.registry_refresh).await {
            Ok((_, g)) => break g,
            Err(e) if server.is_finished() => {
                return Err(anyhow::anyhow!("server stopped before registering: {}", e.message()));
            }
            Err(e) => {
                if attempts.is_multiple_of(50) {
                    tracing::warn!(nsmgr = %cfg.connect_to, error = %e.message(), "cannot register with the nsmgr yet; retrying");
                }
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    tracing::info!(name = %cfg.name, listen_on = %url, nsmgr = %cfg.connect_to, "forwarder registered and serving");
    let res = server.await;
    guard.stop().await;
    res??;
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
