//! Endpoint library and the icmp-responder sample endpoint.
//!
//! An endpoint is the last hop of a connection: it allocates addresses
//! (point-to-point IPAM from `NSM_CIDR_PREFIX`), tells the forwarder which
//! network namespace its end of the wire goes into, and answers. The kernel
//! answers the pings once the forwarder has put the interface in place.
//!
//! # Layout
//! - [`Config`]: flags / upstream `NSM_*` environment variables of
//!   `cmd-nse-icmp-responder`.
//! - [`chain`], [`run`]: the endpoint chain and the daemon.
//!
//! # The Request chain
//! The endpoint `prefix` ([`nsm_sdk::networkservice::chains`]), then
//! `point2pointipam` → `mechanisms` (KERNEL:
//! [`nsm_sdk::networkservice::kernel::KernelServer`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ipnetwork::IpNetwork;
use nsm_api::mechanisms::{kernel, payload};
use nsm_api::registry::NetworkService;
use nsm_sdk::ipam::point2point::Point2PointIpam;
use nsm_sdk::networkservice::chains::Endpoint;
use nsm_sdk::networkservice::connect::DEFAULT_CALL_TIMEOUT;
use nsm_sdk::networkservice::kernel::KernelServer;
use nsm_sdk::networkservice::mechanisms::Mechanisms;
use nsm_sdk::networkservice::timeout::AbortOnDrop;
use nsm_sdk::networkservice::{Context, Element};
use nsm_sdk::registry::client::FirstRegistration::Fail;
use nsm_sdk::registry::client::{Registration, endpoint_record};
use nsm_sdk::registry::{NsRegistry, RemoteRegistry};
use nsm_sdk::tools::daemon::{self, CommonArgs, NsmgrArgs, Security, parse_duration};
use nsm_sdk::tools::grpc::{Listeners, parse_url};
use nsm_sdk::tools::labels::parse_labels;
use url::Url;

/// Configuration of the icmp-responder (upstream env names and defaults).
#[derive(Parser, Debug, Clone)]
#[command(name = "nse-icmp-responder", version, about = "NSM endpoint that answers pings over the wire it gets")]
pub struct Config {
    /// Endpoint name (registry entry, path segment).
    #[arg(long, env = "NSM_NAME", default_value = "icmp-server")]
    pub name: String,
    /// Unix socket this endpoint serves on; it must be reachable by the
    /// node's forwarder (in Kubernetes: under the hostPath
    /// /var/lib/networkservicemesh). Default:
    /// unix:///var/lib/networkservicemesh/nse-<NSM_NAME>.sock
    #[arg(long, env = "NSM_LISTEN_ON", value_parser = parse_url)]
    pub listen_on: Option<Url>,
    /// Network services this endpoint provides (comma-separated).
    #[arg(long, env = "NSM_SERVICE_NAMES", default_value = "icmp-responder", value_delimiter = ',')]
    pub service_names: Vec<String>,
    /// Labels of this endpoint (`key:value,...`), matched by services'
    /// destination selectors.
    #[arg(long, env = "NSM_LABELS", default_value = "", value_parser = parse_labels)]
    pub labels: HashMap<String, String>,
    /// Labels `nodeName`/`podName`/`clusterName` from the downward API,
    /// added to this component's registration (its `NSM_LABELS` win).
    #[command(flatten)]
    pub pod: nsm_sdk::tools::daemon::PodInfoArgs,
    /// Address pools for point-to-point IPAM (comma-separated CIDRs).
    #[arg(long, env = "NSM_CIDR_PREFIX", default_value = "169.254.0.0/16", value_delimiter = ',')]
    pub cidr_prefix: Vec<IpNetwork>,
    /// Payload of the services this endpoint registers: ETHERNET or IP.
    #[arg(long, env = "NSM_PAYLOAD", default_value = "ETHERNET", value_parser = [payload::ETHERNET, payload::IP])]
    pub payload: String,
    /// Also register the network services (not only the endpoint).
    #[arg(long, env = "NSM_REGISTER_SERVICE", default_value_t = true, action = clap::ArgAction::Set)]
    pub register_service: bool,
    /// Lifetime of the tokens this endpoint mints.
    #[arg(long, env = "NSM_MAX_TOKEN_LIFETIME", default_value = "10m", value_parser = parse_duration)]
    pub max_token_lifetime: Duration,
    #[command(flatten)]
    pub nsmgr: NsmgrArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl daemon::DaemonConfig for Config {
    const PROG: &'static str = "nse-icmp-responder";
    fn serving(&self) -> (&daemon::CommonArgs, Duration, Vec<Url>) {
        (&self.common, self.max_token_lifetime, vec![self.listen_url()])
    }
}

impl Config {
    /// The listen URL, defaulted from the name.
    pub fn listen_url(&self) -> Url {
        self.listen_on.clone().unwrap_or_else(|| {
            let n: String = self
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
                .collect();
            Url::parse(&format!("unix:///var/lib/networkservicemesh/nse-{n}.sock")).expect("static URL shape is valid")
        })
    }
}

/// The endpoint chain (see the module docs) and its IPAM.
pub fn chain(cfg: &Config, sec: &Security) -> anyhow::Result<(Endpoint, Arc<Point2PointIpam>)> {
    let ipam = Point2PointIpam::new(&cfg.cidr_prefix)?;
    let ep = Endpoint::new(
        &cfg.name,
        sec,
        cfg.max_token_lifetime,
        vec![ipam.clone(), Mechanisms::new(vec![(kernel::MECHANISM, Arc::new(KernelServer) as Arc<dyn Element>)])],
    );
    Ok((ep, ipam))
}

/// Serves the endpoint on `listeners` and keeps it registered through the
/// nsmgr until `shutdown`; then unregisters.
pub async fn run(cfg: Config, sec: Security, listeners: Listeners, shutdown: daemon::Shutdown) -> anyhow::Result<()> {
    let (ep, _ipam) = chain(&cfg, &sec)?;
    let url = listeners.urls().first().cloned().ok_or_else(|| anyhow::anyhow!("nothing to listen on"))?;
    let router = daemon::endpoint_router(&ep, &[]).await;
    let registry = RemoteRegistry::new(cfg.nsmgr.connect_to.clone(), sec.pool(cfg.nsmgr.dial_timeout))
        .with_tokens(sec.tokens.clone());
    let _ns_refresh = if cfg.register_service { Some(register_services(&registry, &cfg).await?) } else { None };
    let mut labels = cfg.labels.clone();
    cfg.pod.add_to(&mut labels);
    let me = endpoint_record(&cfg.name, &cfg.service_names, &labels, &url);
    tracing::info!(cidr = ?cfg.cidr_prefix.iter().map(|c| c.to_string()).collect::<Vec<_>>(), "point-to-point IPAM");
    let reg =
        Registration { registry: Arc::new(registry), endpoint: me, refresh: cfg.nsmgr.registry_refresh, first: Fail };
    daemon::serve_registered(router, listeners, &sec, shutdown, reg, "endpoint").await
}

/// Registers the network services this endpoint provides and keeps them
/// registered: service records have no expiry, but a restarted in-memory
/// registry forgets them, so they are re-registered every `every`.
async fn register_services(reg: &RemoteRegistry, cfg: &Config) -> anyhow::Result<AbortOnDrop> {
    let services: Vec<NetworkService> = cfg
        .service_names
        .iter()
        .map(|s| NetworkService { name: s.clone(), payload: cfg.payload.clone(), ..Default::default() })
        .collect();
    for ns in &services {
        let ctx = Context::with_timeout(DEFAULT_CALL_TIMEOUT);
        NsRegistry::register(reg, &ctx, ns.clone())
            .await
            .map_err(|e| anyhow::anyhow!("registering network service {:?}: {}", ns.name, e.message()))?;
    }
    let (reg, every) = (reg.clone(), cfg.nsmgr.registry_refresh);
    Ok(AbortOnDrop::new(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            for ns in &services {
                let ctx = Context::with_timeout(DEFAULT_CALL_TIMEOUT);
                if let Err(e) = NsRegistry::register(&reg, &ctx, ns.clone()).await {
                    tracing::warn!(service = %ns.name, error = %e.message(), "re-registering the network service failed");
                }
            }
        }
    })))
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use nsm_sdk::networkservice::chains::documented_chain;

    use super::*;

    #[test]
    fn the_chain_is_what_the_module_docs_say() {
        let cfg = Config::try_parse_from(["nse"]).unwrap();
        let (ep, _) = chain(&cfg, &Security::insecure(Duration::from_secs(60))).unwrap();
        assert_eq!(ep.chain.names(), documented_chain(include_str!("lib.rs")));
    }
}
