//! NSM forwarder: receives requests from the local nsmgr, selects the
//! endpoint and builds the wire between client and endpoint.
//!
//! # Layout
//! - [`Config`]: flags / upstream `NSM_*` environment variables.
//! - [`run`]: registers with the nsmgr as an endpoint of the `forwarder`
//!   service and serves the forwarder chain until shutdown.
//! - [`xconnect`]: picks the wire for a connection: [`local`] (veth pair on
//!   one node) or [`remote`](mod@remote) (VXLAN/WireGuard tunnel to another node).
//! - [`wireguard`]: WireGuard backends (kernel, embedded userspace).
//! - [`kernel`]: netlink operations on interfaces in other network
//!   namespaces.
//! - [`alloc`]: WireGuard ports and VXLAN VNIs of this node.
//! - [`sweep`]: removal of interfaces a killed previous run left behind.
//!
//! - [`ipcontext`]: addresses and routes on one end of any wire.
//! - [`error`]: the one mapping of the forwarder's errors to gRPC statuses.
//!
//! # The Request chain
//! The endpoint `prefix` ([`nsm_sdk::networkservice::chains`]; its begin
//! passes Closes of unknown connections on, so a restarted forwarder still
//! removes their wires), then `discover` → `roundrobin` → `xconnect` →
//! `connect`.
//!
//! `connect` runs the passthrough client chain
//! ([`nsm_sdk::networkservice::chains::passthrough_client`]) towards the
//! endpoint (unix socket) or the endpoint node's nsmgr (TCP).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nsm_sdk::networkservice::begin::Begin;
use nsm_sdk::networkservice::chains::{Endpoint, Options, passthrough_client};
use nsm_sdk::networkservice::connect::Connect;
use nsm_sdk::networkservice::discover::{Discover, RoundRobin};
use nsm_sdk::registry::RemoteRegistry;
use nsm_sdk::registry::client::FirstRegistration::Retry;
use nsm_sdk::registry::client::{Registration, endpoint_record};
use nsm_sdk::tools::daemon::{self, CommonArgs, NsmgrArgs, Security, parse_duration};
use nsm_sdk::tools::grpc::{Listeners, parse_url};
use nsm_sdk::tools::labels::parse_labels;
use url::Url;

pub use remote::MechanismKind;

pub mod alloc;
pub mod error;
pub mod ipcontext;
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
    /// Labels of this forwarder (`key:value,...`); services select
    /// forwarders by them.
    #[arg(long, env = "NSM_LABELS", default_value = "p2p:true", value_parser = parse_labels)]
    pub labels: HashMap<String, String>,
    /// Labels `nodeName`/`podName`/`clusterName` from the downward API,
    /// added to this component's registration (its `NSM_LABELS` win).
    #[command(flatten)]
    pub pod: nsm_sdk::tools::daemon::PodInfoArgs,
    /// Network service under which this forwarder registers.
    #[arg(long, env = "NSM_NSNAME", default_value = "forwarder")]
    pub service_name: String,
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
    #[arg(long, env = "NSM_WIREGUARD_BACKEND", value_enum, default_value = "auto")]
    pub wireguard_backend: WireguardBackend,
    /// WireGuard persistent keepalive.
    #[arg(long, env = "NSM_WIREGUARD_KEEPALIVE", default_value = "10s", value_parser = parse_duration)]
    pub wireguard_keepalive: Duration,
    /// After a restart, interfaces from the previous run whose connection is
    /// not refreshed within this time are removed. Default: the token
    /// lifetime plus 30 s (a live client refreshes within its token's
    /// lifetime, or the nsmgr closes its connection).
    #[arg(long, env = "NSM_ORPHAN_GRACE", value_parser = parse_duration)]
    pub orphan_grace: Option<Duration>,
    #[command(flatten)]
    pub nsmgr: NsmgrArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl daemon::DaemonConfig for Config {
    const PROG: &'static str = "forwarder";
    fn serving(&self) -> (&daemon::CommonArgs, Duration, Vec<Url>) {
        (&self.common, self.max_token_lifetime, vec![self.listen_on.clone()])
    }
}

/// `NSM_WIREGUARD_BACKEND`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireguardBackend {
    /// The kernel module if the kernel can create a WireGuard link, else
    /// the embedded userspace implementation.
    Auto,
    Kernel,
    Userspace,
    /// No WireGuard: VXLAN only.
    None,
}

/// Remote mechanism types in preference order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Priority(pub Vec<MechanismKind>);

fn parse_priority(s: &str) -> Result<Priority, String> {
    let mut v = vec![];
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let k = MechanismKind::parse(t)
            .ok_or_else(|| format!("unknown remote mechanism {t:?} (supported: VXLAN, WIREGUARD)"))?;
        if !v.contains(&k) {
            v.push(k);
        }
    }
    if v.is_empty() {
        return Err("no mechanism given".into());
    }
    Ok(Priority(v))
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
    let wg: Option<Arc<dyn wireguard::WgBackend>> = match cfg.wireguard_backend {
        WireguardBackend::None => None,
        WireguardBackend::Userspace => Some(Arc::new(wireguard::Userspace)),
        WireguardBackend::Kernel => Some(wireguard::kernel_backend().ok_or_else(|| {
            anyhow::anyhow!(
                "NSM_WIREGUARD_BACKEND=kernel but the kernel cannot create WireGuard devices (module missing?)"
            )
        })?),
        WireguardBackend::Auto => Some(wireguard::probe()),
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
        wireguard = %wg.as_ref().map(|w| w.kind().to_string()).unwrap_or_else(|| "off".into()),
        priority = %rc.priority.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(","),
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

/// Builds the forwarder chain (see the module docs); `owner` is
/// [`owner_id`].
pub fn chain(cfg: &Config, sec: &Security, remote: Option<Arc<remote::Remote>>, owner: &str) -> Endpoint {
    let pool = sec.pool(cfg.nsmgr.dial_timeout);
    // Registry lookups go through the nsmgr.
    let registry = RemoteRegistry::new(cfg.nsmgr.connect_to.clone(), pool.clone()).with_tokens(sec.tokens.clone());
    let opts = Options { begin: Some(Begin::passing_unknown_closes()) };
    Endpoint::with(
        &cfg.name,
        sec,
        cfg.max_token_lifetime,
        opts,
        vec![
            // Candidate endpoints from the registry.
            Discover::new(Arc::new(registry.clone()), Arc::new(registry)),
            // Try them in turn.
            RoundRobin::new(),
            // Build the wire (veth, or a tunnel end) once the far side answered.
            xconnect::XConnect::new(owner, remote),
            Connect::new(passthrough_client(&cfg.name, sec, pool)),
        ],
    )
}

/// Serves the forwarder on `listeners`, registered with the nsmgr, until
/// `shutdown`; then unregisters.
pub async fn run(cfg: Config, sec: Security, listeners: Listeners, shutdown: daemon::Shutdown) -> anyhow::Result<()> {
    let remote = remote(&cfg).await?;
    let owner = owner_id(&cfg)?;
    let ep = chain(&cfg, &sec, remote, &owner);
    let node = nsm_sdk::tools::netns::NetnsHandle::current()?;
    let grace = cfg.orphan_grace.unwrap_or(cfg.max_token_lifetime + Duration::from_secs(30));
    let watched = sweep::start(&owner, &node, ep.metadata.clone(), grace).await;
    if watched > 0 {
        tracing::info!(watched, "interfaces from a previous run are waiting to be adopted or removed");
    }
    let url = listeners.urls().first().cloned().ok_or_else(|| anyhow::anyhow!("nothing to listen on"))?;
    let router = daemon::endpoint_router(&ep, &[]).await;
    let registry = RemoteRegistry::new(cfg.nsmgr.connect_to.clone(), sec.pool(cfg.nsmgr.dial_timeout))
        .with_tokens(sec.tokens.clone());
    let services = std::slice::from_ref(&cfg.service_name);
    let mut labels = cfg.labels.clone();
    cfg.pod.add_to(&mut labels);
    let me = endpoint_record(&cfg.name, services, &labels, &url);
    // Keep trying to register: the nsmgr may start after us.
    tracing::info!(nsmgr = %cfg.nsmgr.connect_to, "registering with the nsmgr");
    let reg =
        Registration { registry: Arc::new(registry), endpoint: me, refresh: cfg.nsmgr.registry_refresh, first: Retry };
    daemon::serve_registered(router, listeners, &sec, shutdown, reg, "forwarder").await
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use nsm_sdk::networkservice::chains::documented_chain;

    use super::*;

    #[test]
    fn priority_and_backend_parse() {
        let c = Config::try_parse_from(["forwarder", "--mechanism-priority", "vxlan, WIREGUARD,vxlan"]).unwrap();
        assert_eq!(c.mechanism_priority.0, [MechanismKind::Vxlan, MechanismKind::Wireguard]);
        assert_eq!(c.wireguard_backend, WireguardBackend::Auto);
        let e = Config::try_parse_from(["forwarder", "--mechanism-priority", "IPSEC"]).unwrap_err().to_string();
        assert!(e.contains("IPSEC") && e.contains("supported: VXLAN, WIREGUARD"), "{e}");
        let e = Config::try_parse_from(["forwarder", "--wireguard-backend", "vpp"]).unwrap_err().to_string();
        assert!(e.contains("vpp"), "{e}");
    }

    #[test]
    fn the_chain_is_what_the_module_docs_say() {
        let cfg = Config::try_parse_from(["forwarder"]).unwrap();
        let ep = chain(&cfg, &Security::insecure(Duration::from_secs(60)), None, "f@1");
        assert_eq!(ep.chain.names(), documented_chain(include_str!("lib.rs")));
    }
}
