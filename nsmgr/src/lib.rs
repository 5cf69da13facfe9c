//! The Network Service Manager: one per node. It serves the NetworkService,
//! MonitorConnection and both registry APIs to the pods of its node (unix
//! socket) and to other nodes (TCP), picks the forwarder that builds each
//! connection's wire, and relays endpoint registrations to the registry.
//!
//! # Layout
//! - [`Config`]: flags / upstream `NSM_*` environment variables.
//! - [`run`]: builds the chains and serves until shutdown.
//! - [`registry`]: the endpoint-registry relay (clientinfo, expire,
//!   localbypass).
//! - [`discoverforwarder`], [`netnsowner`]: nsmgr-specific chain elements.
//!
//! # The Request chain
//! The endpoint `prefix` ([`nsm_sdk::networkservice::chains`]), then
//! `interdomain` → `netnsowner` → `clientinfo` → `discoverforwarder` →
//! `connect`.
//!
//! `connect` runs the passthrough client chain
//! ([`nsm_sdk::networkservice::chains::passthrough_client`]) towards the
//! forwarder `discoverforwarder` picked; its `updatepath` has the nsmgr's
//! name, so the nsmgr keeps one path segment.
//!
//! Registry calls: `updatepath`/`updatetoken` → `authorize` (registry
//! policies, first-registrant ownership) → relay or store.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nsm_api::service_names;
use nsm_sdk::networkservice::chains::{Endpoint, passthrough_client};
use nsm_sdk::networkservice::connect::Connect;
use nsm_sdk::registry::authorize::{Authorize as RegAuthorize, UpdatePath as RegUpdatePath};
use nsm_sdk::registry::memory::MemoryRegistry;
use nsm_sdk::registry::{NsRegistry, NsRegistryServer, NseRegistry, NseRegistryServer, RemoteRegistry};
use nsm_sdk::tools::daemon::{self, CommonArgs, Security, parse_duration};
use nsm_sdk::tools::grpc::{Listeners, OptionalUrl, UrlList, parse_optional_url, parse_url, parse_url_list};
use url::Url;

pub mod discoverforwarder;
pub mod interdomain;
pub mod netnsowner;
pub mod registry;

/// Configuration: flags, or the environment variables upstream's
/// `cmd-nsmgr` reads (same names and defaults).
#[derive(Parser, Debug, Clone)]
#[command(name = "nsmgr", version, about = "NSM per-node Network Service Manager")]
pub struct Config {
    /// Name of this nsmgr in connection paths and logs.
    #[arg(long, env = "NSM_NAME", default_value = "nsmgr")]
    pub name: String,
    /// Where to serve, comma-separated: the unix socket for pods of this node
    /// and the TCP address other nodes use. The first TCP URL is the public
    /// URL written into the registry (an unspecified host is replaced by this
    /// node's first non-loopback IPv4 address).
    #[arg(
        long,
        env = "NSM_LISTEN_ON",
        default_value = "unix:///var/lib/networkservicemesh/nsm.io.sock,tcp://:5001",
        value_parser = parse_url_list
    )]
    pub listen_on: UrlList,
    /// Registry to relay registrations to (`tcp://host:port` or
    /// `host:port`). Unset: keep an in-memory registry in this nsmgr
    /// (single-node setups).
    #[arg(long, env = "NSM_REGISTRY_URL", default_value = "", value_parser = parse_optional_url)]
    pub registry_url: OptionalUrl,
    /// Timeout for dialing forwarders and the registry.
    #[arg(long, env = "NSM_DIAL_TIMEOUT", default_value = "750ms", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// Lifetime of the tokens this nsmgr mints; connections whose client
    /// stops refreshing are closed when their token expires.
    #[arg(long, env = "NSM_MAX_TOKEN_LIFETIME", default_value = "10m", value_parser = parse_duration)]
    pub max_token_lifetime: Duration,
    /// Network service under which forwarders register.
    #[arg(long, env = "NSM_FORWARDER_NETWORK_SERVICE_NAME", default_value = "forwarder")]
    pub forwarder_service: String,
    /// Endpoint registrations relayed by this nsmgr expire this long after
    /// their last refresh.
    #[arg(long, env = "NSM_EXPIRE_PERIOD", default_value = "1m", value_parser = parse_duration)]
    pub expire_period: Duration,
    /// Labels `nodeName`/`podName`/`clusterName` (downward API), added to
    /// connections and to the endpoints registered through this component.
    #[command(flatten)]
    pub pod: nsm_sdk::tools::daemon::PodInfoArgs,
    /// This cluster's domain (e.g. `my.cluster2`): requests from other
    /// clusters name services `svc@<domain>`; the nsmgr serves them as `svc`.
    #[arg(long, env = "NSM_DOMAIN", default_value = "")]
    pub domain: String,
    /// How to treat a local client whose pid the nsmgr cannot see (so its
    /// netns claim cannot be verified): `strict` refuses, `lenient` trusts
    /// the claim. Run the nsmgr with hostPID to verify every client.
    #[arg(long, env = "NSM_CLIENT_NETNS_CHECK", value_enum, default_value = "strict")]
    pub client_netns_check: netnsowner::Verify,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl daemon::DaemonConfig for Config {
    const PROG: &'static str = "nsmgr";
    fn serving(&self) -> (&daemon::CommonArgs, Duration, Vec<Url>) {
        (&self.common, self.max_token_lifetime, self.listen_on.0.clone())
    }
}

/// The URL other components should use to reach this nsmgr.
pub fn public_url(bound: &[Url]) -> Option<Url> {
    let tcp = bound.iter().find(|u| u.scheme() == "tcp")?;
    let host: Option<IpAddr> = tcp.host_str().and_then(|h| h.trim_matches(['[', ']']).parse().ok());
    match host {
        Some(ip) if ip.is_unspecified() => {
            let ip = daemon::first_global_ipv4().unwrap_or(IpAddr::from([127, 0, 0, 1]));
            parse_url(&format!("tcp://{ip}:{}", tcp.port()?)).ok()
        }
        _ => Some(tcp.clone()),
    }
}

/// Builds the nsmgr and serves it on `listeners` until `shutdown`.
pub async fn run(cfg: Config, sec: Security, listeners: Listeners, shutdown: daemon::Shutdown) -> anyhow::Result<()> {
    let public = public_url(listeners.urls())
        .or_else(|| listeners.urls().first().cloned())
        .ok_or_else(|| anyhow::anyhow!("NSM_LISTEN_ON is empty"))?;
    let router = router(&cfg, &sec, &public).await;
    tracing::info!(
        name = %cfg.name,
        listen_on = ?listeners.urls().iter().map(Url::as_str).collect::<Vec<_>>(),
        public_url = %public,
        registry = %cfg.registry_url.0.as_ref().map(Url::as_str).unwrap_or("in-memory"),
        spiffe_id = sec.spiffe_id().as_deref().unwrap_or("(insecure)"),
        "nsmgr serving"
    );
    daemon::serve_with(router, listeners, sec.tls.clone(), shutdown, Duration::from_secs(5)).await?;
    Ok(())
}

/// The registry the nsmgr uses: `NSM_REGISTRY_URL`, or an in-memory one.
fn registries(cfg: &Config, sec: &Security) -> (Arc<dyn NsRegistry>, Arc<dyn NseRegistry>) {
    match &cfg.registry_url.0 {
        None => {
            let m = MemoryRegistry::new();
            (Arc::new(m.clone()), Arc::new(m))
        }
        Some(u) => {
            let r = RemoteRegistry::new(u.clone(), sec.pool(cfg.dial_timeout)).with_tokens(sec.tokens.clone());
            (Arc::new(r.clone()), Arc::new(r))
        }
    }
}

/// The nsmgr's NetworkService chain (see the module docs) over the
/// registries `ns_reg` and `relay`.
pub fn chain(
    cfg: &Config,
    sec: &Security,
    public: &Url,
    ns_reg: Arc<dyn NsRegistry>,
    relay: Arc<registry::NseRelay>,
) -> Endpoint {
    let pool = sec.pool(cfg.dial_timeout);
    Endpoint::new(
        &cfg.name,
        sec,
        cfg.max_token_lifetime,
        vec![
            // `svc@<our domain>` from another cluster is our `svc`.
            interdomain::Interdomain::new(&cfg.domain),
            // A client may only ask for interfaces in its own netns.
            netnsowner::NetnsOwner::new(cfg.client_netns_check),
            // nodeName/podName/clusterName labels for `matches`.
            cfg.pod.client_info(),
            // Check the service exists; pick a forwarder of this node.
            discoverforwarder::DiscoverForwarder::new(ns_reg, relay, &cfg.forwarder_service, public.as_str()),
            // Hand over to the forwarder.
            Connect::new(passthrough_client(&cfg.name, sec, pool)),
        ],
    )
}

/// Assembles the chains and services.
pub async fn router(cfg: &Config, sec: &Security, public: &Url) -> tonic::transport::server::Router {
    let (ns_reg, nse_store) = registries(cfg, sec);
    let labels: BTreeMap<String, String> = cfg.pod.labels();
    let relay = registry::NseRelay::new(nse_store, public.as_str(), labels, cfg.expire_period);
    let ep = chain(cfg, sec, public, ns_reg.clone(), relay.clone());
    tracing::debug!(chain = ?ep.chain, "nsmgr chain");
    // Registry calls: path and tokens, then policies and first-registrant
    // ownership, then the relay (nsm-spec §2.6).
    let tokens = sec.tokens.clone();
    let ns_server = NsRegistryServer(RegUpdatePath::ns(RegAuthorize::ns(ns_reg, sec.registry.clone()), tokens.clone()));
    let nse_server = NseRegistryServer(RegUpdatePath::nse(RegAuthorize::nse(relay, sec.registry.clone()), tokens));
    daemon::endpoint_router(
        &ep,
        &[service_names::NETWORK_SERVICE_REGISTRY, service_names::NETWORK_SERVICE_ENDPOINT_REGISTRY],
    )
    .await
    .add_service(ns_server.into_service())
    .add_service(nse_server.into_service())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use nsm_sdk::networkservice::chains::documented_chain;

    use super::*;

    #[test]
    fn upstream_defaults() {
        let c = Config::try_parse_from(["nsmgr"]).unwrap();
        assert_eq!(c.listen_on.0[0].as_str(), "unix:///var/lib/networkservicemesh/nsm.io.sock");
        assert_eq!(c.listen_on.0[1].as_str(), "tcp://0.0.0.0:5001");
        assert_eq!(c.dial_timeout, Duration::from_millis(750));
        assert_eq!(c.max_token_lifetime, Duration::from_secs(600));
        assert_eq!(c.forwarder_service, "forwarder");
        assert!(!c.common.insecure, "mutual TLS by default");
        assert_eq!(c.common.spiffe_endpoint_socket, "unix:///run/spire/sockets/agent.sock");
        let e = Config::try_parse_from(["nsmgr", "--listen-on", "http://x"]).unwrap_err().to_string();
        assert!(e.contains("http://x"), "{e}");
    }

    #[test]
    fn public_url_replaces_unspecified_host() {
        let bound = vec![parse_url("unix:///a.sock").unwrap(), parse_url("tcp://0.0.0.0:5001").unwrap()];
        let u = public_url(&bound).unwrap();
        assert_eq!(u.port(), Some(5001));
        assert_ne!(u.host_str(), Some("0.0.0.0"));
        let bound = vec![parse_url("tcp://10.1.2.3:5001").unwrap()];
        assert_eq!(public_url(&bound).unwrap().as_str(), "tcp://10.1.2.3:5001");
        assert!(public_url(&[parse_url("unix:///a.sock").unwrap()]).is_none());
    }

    #[test]
    fn the_chain_is_what_the_module_docs_say() {
        let cfg = Config::try_parse_from(["nsmgr"]).unwrap();
        let sec = Security::insecure(Duration::from_secs(60));
        let public = parse_url("tcp://127.0.0.1:5001").unwrap();
        let (ns, nse) = registries(&cfg, &sec);
        let relay = registry::NseRelay::new(nse, public.as_str(), BTreeMap::new(), cfg.expire_period);
        let ep = chain(&cfg, &sec, &public, ns, relay);
        assert_eq!(ep.chain.names(), documented_chain(include_str!("lib.rs")));
    }

    #[test]
    fn a_bad_registry_url_is_a_usage_error() {
        let e = Config::try_parse_from(["nsmgr", "--registry-url", "http://registry:5002"]).unwrap_err();
        assert!(e.use_stderr());
        assert!(e.to_string().contains("http://registry:5002"), "{e}");
        let c = Config::try_parse_from(["nsmgr", "--registry-url", "registry:5002"]).unwrap();
        assert_eq!(c.registry_url.0.unwrap().as_str(), "tcp://registry:5002");
        let c = Config::try_parse_from(["nsmgr", "--registry-url", ""]).unwrap();
        assert_eq!(c.registry_url.0, None, "empty: the in-memory registry");
    }
}
