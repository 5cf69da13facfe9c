//! NSM forwarder: receives requests from the local nsmgr, selects the
//! endpoint and builds the wire between client and endpoint.
//!
//! # Layout
//! - [`Config`]: flags / upstream `NSM_*` environment variables.
//! - [`run`]: registers with the nsmgr as an endpoint of the `forwarder`
//!   service and serves the forwarder chain until shutdown.
//! - [`xconnect`]: picks the wire for a connection: [`local`] (veth pair on
//!   one node) or [`remote`] (VXLAN/WireGuard tunnel to another node).
//! - [`wireguard`]: WireGuard backends (kernel, embedded userspace).
//! - [`kernel`]: netlink operations on interfaces in other network
//!   namespaces.
//! - [`alloc`]: WireGuard ports and VXLAN VNIs of this node.
//! - [`sweep`]: removal of interfaces a killed previous run left behind.
//!
//! # The Request chain
//! `updatepath` → `begin` → `metadata` → `updatetoken` → `timeout` →
//! `monitor` → `trimpath` → `discover` → `roundrobin` → `xconnect` →
//! `connect` ⇒ client chain `updatepath` → `trimpath` client → gRPC call to
//! the endpoint (unix) or to the endpoint node's nsmgr (TCP).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nsm_api::connection::monitor_connection_server::MonitorConnectionServer;
use nsm_api::registry::{NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_api::service_names;
use nsm_sdk::networkservice::authorize::{AuthorizeClient, AuthorizeServer};
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
use nsm_sdk::tools::daemon::{self, CommonArgs, Security, parse_duration};
use nsm_sdk::tools::grpc::{Listeners, parse_url};
use nsm_sdk::tools::labels::parse_labels;
use url::Url;

pub mod alloc;
pub mod kernel;
pub mod local;
pub mod remote;
pub mod sweep;
pub mod wireguard;
pub mod xconnect;

/// Configuration: flags, or the environment variables upstream's forwarder
/// reads (same names and defaults where they exist).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "forwarder",
    version,
    about = "NSM forwarder: builds the wire between client and endpoint pods (veth on one node; VXLAN or WireGuard across nodes)"
)]
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
    /// This node's tunnel endpoint for VXLAN and WireGuard (the node IP).
    /// Default: the first non-loopback IPv4 address; without one, only
    /// same-node wires are built.
    #[arg(long, env = "NSM_TUNNEL_IP")]
    pub tunnel_ip: Option<std::net::IpAddr>,
    /// UDP port of VXLAN (0 = 4789); must be the same on every node.
    #[arg(long, env = "NSM_VXLAN_PORT", default_value_t = 0)]
    pub vxlan_port: u16,
    /// UDP ports for WireGuard devices (one per connection), `lo-hi`.
    #[arg(long, env = "NSM_WIREGUARD_PORTS", default_value = "51820-52819", value_parser = alloc::PortPool::parse)]
    pub wireguard_ports: (u16, u16),
    /// Remote mechanisms in preference order (comma-separated). WireGuard
    /// carries IP payload only; VXLAN carries both.
    #[arg(long, env = "NSM_MECHANISM_PRIORITY", default_value = "WIREGUARD,VXLAN", value_parser = parse_priority)]
    pub mechanism_priority: Priority,
    /// WireGuard implementation: `auto` (kernel module if present, else
    /// embedded userspace), `kernel`, `userspace`, or `none`.
    #[arg(long, env = "NSM_WIREGUARD_BACKEND", default_value = "auto", value_parser = ["auto", "kernel", "userspace", "none"])]
    pub wireguard_backend: String,
    /// WireGuard persistent keepalive.
    #[arg(long, env = "NSM_WIREGUARD_KEEPALIVE", default_value = "10s", value_parser = parse_duration)]
    pub wireguard_keepalive: Duration,
    /// After a restart, interfaces from the previous run whose connection is
    /// not refreshed within this time are removed. Default: the token
    /// lifetime plus 30 s (a live client refreshes within its token's
    /// lifetime, or the nsmgr closes its connection).
    #[arg(long, env = "NSM_ORPHAN_GRACE", value_parser = parse_duration)]
    pub orphan_grace: Option<Duration>,
    /// How often to refresh the registration when the registry sets no
    /// expiration.
    #[arg(long, env = "NSM_REGISTRY_REFRESH", default_value = "40s", value_parser = parse_duration)]
    pub registry_refresh: Duration,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Mechanism types in preference order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Priority(pub Vec<String>);

fn parse_priority(s: &str) -> Result<Priority, String> {
    let mut v = vec![];
    for t in s.split(',').map(|t| t.trim().to_ascii_uppercase()).filter(|t| !t.is_empty()) {
        if t != nsm_api::mechanisms::types::VXLAN && t != nsm_api::mechanisms::types::WIREGUARD {
            return Err(format!("unknown remote mechanism {t:?} (supported: VXLAN, WIREGUARD)"));
        }
        if !v.contains(&t) {
            v.push(t);
        }
    }
    if v.is_empty() {
        return Err("no mechanism given".into());
    }
    Ok(Priority(v))
}

/// State handles of a running forwarder, for tests and diagnostics.
#[derive(Clone)]
pub struct Handles {
    pub monitor: MonitorServer,
    pub begin: Arc<Begin>,
    pub metadata: Arc<Metadata>,
    pub remote: Option<Arc<remote::Remote>>,
}

/// The remote-mechanism machinery for `cfg`, or `None` without a tunnel IP.
pub async fn remote(cfg: &Config) -> anyhow::Result<Option<Arc<remote::Remote>>> {
    let Some(tunnel_ip) = cfg.tunnel_ip.or_else(daemon::first_global_ipv4) else {
        tracing::warn!("no NSM_TUNNEL_IP and no non-loopback address: only same-node wires will be built");
        return Ok(None);
    };
    let node = nsm_sdk::tools::netns::NetnsHandle::current()?;
    let underlay_mtu = match kernel::underlay_mtu(&node, tunnel_ip).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(%tunnel_ip, error = %e, "cannot find the underlay interface of the tunnel IP; assuming MTU 1500");
            1500
        }
    };
    let wg: Option<Arc<dyn wireguard::WgBackend>> = match cfg.wireguard_backend.as_str() {
        "none" => None,
        "userspace" => Some(Arc::new(wireguard::Userspace)),
        "kernel" => Some(wireguard::kernel_backend().ok_or_else(|| {
            anyhow::anyhow!(
                "NSM_WIREGUARD_BACKEND=kernel but the kernel cannot create WireGuard devices (module missing?)"
            )
        })?),
        _ => Some(wireguard::probe()),
    };
    let (lo, hi) = cfg.wireguard_ports;
    let rc = remote::RemoteConfig {
        tunnel_ip,
        vxlan_port: if cfg.vxlan_port == 0 { nsm_api::mechanisms::vxlan::DEFAULT_PORT } else { cfg.vxlan_port },
        priority: cfg.mechanism_priority.0.clone(),
        keepalive: u16::try_from(cfg.wireguard_keepalive.as_secs()).unwrap_or(u16::MAX),
        underlay_mtu,
    };
    tracing::info!(
        %tunnel_ip,
        underlay_mtu,
        vxlan_port = rc.vxlan_port,
        wireguard = wg.as_ref().map(|w| w.kind()).unwrap_or("off"),
        priority = %rc.priority.join(","),
        "remote mechanisms ready"
    );
    Ok(Some(remote::Remote::new(rc, node, wg, alloc::PortPool::new(lo, hi))))
}

/// The identity this forwarder marks its interfaces with:
/// `<name>@<inode of its netns>`. The name tells forwarders on one node
/// apart; the netns inode tells apart forwarders of the same name on
/// different nodes that share a kernel (the lab), and survives a restart.
pub fn owner_id(cfg: &Config) -> anyhow::Result<String> {
    Ok(format!("{}@{}", cfg.name, nsm_sdk::tools::netns::NetnsHandle::current()?.inode()))
}

/// Builds the forwarder chain; `owner` is [`owner_id`].
pub fn chain(cfg: &Config, sec: &Security, remote: Option<Arc<remote::Remote>>, owner: &str) -> (Chain, Handles) {
    let pool = sec.pool(cfg.dial_timeout);
    let registry = RemoteRegistry::new(cfg.connect_to.clone(), pool.clone()).with_tokens(sec.tokens.clone());
    let tokens = sec.tokens.clone();
    let authorize = AuthorizeServer::new(sec.server.clone());
    let monitor = sec.monitor();
    // Closes of connections from before a restart still reach localkernel,
    // which removes the interfaces by their alias.
    let begin = Begin::passing_unknown_closes();
    let metadata = Metadata::new();
    let client = Chain::new(vec![
        UpdatePath::new(&cfg.name),
        TrimPath::client(),
        // Check the tokens the next hop returned (client policies).
        AuthorizeClient::new(sec.client.clone()),
        // Calls the endpoint chosen by roundrobin.
        GrpcClient::new(pool, tokens.clone()),
    ]);
    let elems: Vec<Arc<dyn Element>> = vec![
        UpdatePath::new(&cfg.name),
        begin.clone(),
        UpdateToken::new(tokens),
        // The caller's tokens: valid, unexpired, chained, signed by it.
        authorize,
        // Per-connection storage (after authorize, as upstream: a refused
        // call never reaches it).
        metadata.clone(),
        Timeout::new(cfg.max_token_lifetime),
        monitor.element(),
        TrimPath::server(),
        // Candidate endpoints from the registry (through the nsmgr).
        Discover::new(Arc::new(registry.clone()), Arc::new(registry)),
        // Try them in turn.
        RoundRobin::new(),
        // Build the wire (veth, or a tunnel end) once the far side answered.
        xconnect::XConnect::new(owner, remote.clone()),
        Connect::new(client),
    ];
    (Chain::new(elems), Handles { monitor, begin, metadata, remote })
}

/// Serves the forwarder on `listeners`, registered with the nsmgr, until
/// `shutdown`; then unregisters.
pub async fn run(
    cfg: Config,
    sec: Security,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let remote = remote(&cfg).await?;
    let owner = owner_id(&cfg)?;
    let (chain, h) = chain(&cfg, &sec, remote, &owner);
    let node = nsm_sdk::tools::netns::NetnsHandle::current()?;
    let grace = cfg.orphan_grace.unwrap_or(cfg.max_token_lifetime + Duration::from_secs(30));
    let watched = sweep::start(&owner, &node, h.metadata.clone(), grace).await;
    if watched > 0 {
        tracing::info!(watched, "interfaces from a previous run are waiting to be adopted or removed");
    }
    let url = listeners.urls().first().cloned().ok_or_else(|| anyhow::anyhow!("nothing to listen on"))?;
    let health = daemon::health_service(&[service_names::NETWORK_SERVICE, service_names::MONITOR_CONNECTION]).await;
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(ChainServer::new(chain).into_service())
        .add_service(MonitorConnectionServer::new(h.monitor.clone()));
    let server = tokio::spawn(daemon::serve_with(router, listeners, sec.tls.clone(), shutdown, Duration::from_secs(5)));

    let registry =
        RemoteRegistry::new(cfg.connect_to.clone(), sec.pool(cfg.dial_timeout)).with_tokens(sec.tokens.clone());
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
    tracing::info!(
        name = %cfg.name,
        listen_on = %url,
        nsmgr = %cfg.connect_to,
        spiffe_id = sec.spiffe_id().as_deref().unwrap_or("(insecure)"),
        "forwarder registered and serving"
    );
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
