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
//! - [`KernelEndpoint`]: the KERNEL mechanism handler of an endpoint.
//! - [`chain`], [`run`]: the endpoint chain and the daemon.
//!
//! # The Request chain
//! The endpoint `prefix` ([`nsm_sdk::networkservice::chains`]), then
//! `point2pointipam` → `mechanisms` (KERNEL: [`KernelEndpoint`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use ipnetwork::IpNetwork;
use nsm_api::connection::{Connection, Mechanism};
use nsm_api::mechanisms::{kernel, payload};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_sdk::ipam::point2point::Point2PointIpam;
use nsm_sdk::networkservice::chain::conn_mut;
use nsm_sdk::networkservice::chains::Endpoint;
use nsm_sdk::networkservice::connect::DEFAULT_CALL_TIMEOUT;
use nsm_sdk::networkservice::mechanisms::Mechanisms;
use nsm_sdk::networkservice::timeout::AbortOnDrop;
use nsm_sdk::networkservice::{Context, Element, Next};
use nsm_sdk::registry::client::FirstRegistration;
use nsm_sdk::registry::{NsRegistry, RemoteRegistry};
use nsm_sdk::tools::daemon::{self, CommonArgs, Security, parse_duration};
use nsm_sdk::tools::grpc::{Listeners, parse_url};
use nsm_sdk::tools::labels::parse_labels;
use nsm_sdk::tools::netns;
use tonic::Status;
use url::Url;

/// Configuration of the icmp-responder (upstream env names and defaults).
#[derive(Parser, Debug, Clone)]
#[command(name = "nse-icmp-responder", version, about = "NSM endpoint that answers pings over the wire it gets")]
pub struct Config {
    /// Endpoint name (registry entry, path segment).
    #[arg(long, env = "NSM_NAME", default_value = "icmp-server")]
    pub name: String,
    /// The local nsmgr.
    #[arg(long, env = "NSM_CONNECT_TO", default_value = "unix:///var/lib/networkservicemesh/nsm.io.sock", value_parser = parse_url)]
    pub connect_to: Url,
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
    /// Timeout for dialing the nsmgr.
    #[arg(long, env = "NSM_DIAL_TIMEOUT", default_value = "750ms", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// Registration refresh period when the registry sets no expiration.
    #[arg(long, env = "NSM_REGISTRY_REFRESH", default_value = "40s", value_parser = parse_duration)]
    pub registry_refresh: Duration,
    #[command(flatten)]
    pub common: CommonArgs,
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

/// KERNEL mechanism handler of an endpoint: answers with this process's
/// network namespace (`netnsInode` and a `/proc/<pid>/ns/net` URL) so the
/// forwarder can put the endpoint's end of the wire here, and keeps the
/// interface name the forwarder proposed.
pub struct KernelEndpoint;

#[async_trait]
impl Element for KernelEndpoint {
    fn name(&self) -> &'static str {
        "kernel-endpoint"
    }

    async fn request(
        &self,
        ctx: &mut Context,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection, Status> {
        let (url, inode) = netns::own_netns_params()
            .map_err(|e| Status::internal(format!("endpoint cannot name its own network namespace: {e}")))?;
        let conn = conn_mut(&mut req);
        let m = conn.mechanism.get_or_insert_with(Mechanism::default);
        m.parameters.insert(kernel::INODE_URL.to_string(), url);
        m.parameters.insert(kernel::NETNS_INODE.to_string(), inode);
        if m.parameters.get(kernel::NAME).is_none_or(|n| n.is_empty()) {
            return Err(Status::invalid_argument("KERNEL mechanism without an interface name"));
        }
        next.request(ctx, req).await
    }
}

/// The endpoint chain (see the module docs) and its IPAM.
pub fn chain(cfg: &Config, sec: &Security) -> anyhow::Result<(Endpoint, Arc<Point2PointIpam>)> {
    let ipam = Point2PointIpam::new(&cfg.cidr_prefix)?;
    let ep = Endpoint::new(
        &cfg.name,
        sec,
        cfg.max_token_lifetime,
        vec![ipam.clone(), Mechanisms::new(vec![(kernel::MECHANISM, Arc::new(KernelEndpoint) as Arc<dyn Element>)])],
    );
    Ok((ep, ipam))
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
    let (reg, every) = (reg.clone(), cfg.registry_refresh);
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

/// Serves the endpoint on `listeners` and keeps it registered through the
/// nsmgr until `shutdown`; then unregisters.
pub async fn run(
    cfg: Config,
    sec: Security,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (ep, _ipam) = chain(&cfg, &sec)?;
    let url = listeners.urls().first().cloned().ok_or_else(|| anyhow::anyhow!("nothing to listen on"))?;
    let router = daemon::endpoint_router(&ep, &[]).await;
    let registry =
        RemoteRegistry::new(cfg.connect_to.clone(), sec.pool(cfg.dial_timeout)).with_tokens(sec.tokens.clone());
    let _ns_refresh = if cfg.register_service { Some(register_services(&registry, &cfg).await?) } else { None };
    let me = NetworkServiceEndpoint {
        name: cfg.name.clone(),
        network_service_names: cfg.service_names.clone(),
        network_service_labels: cfg
            .service_names
            .iter()
            .map(|s| (s.clone(), NetworkServiceLabels { labels: cfg.labels.clone() }))
            .collect(),
        url: url.to_string(),
        ..Default::default()
    };
    let registered = |_: &NetworkServiceEndpoint| {
        tracing::info!(
            name = %cfg.name,
            services = ?cfg.service_names,
            cidr = ?cfg.cidr_prefix.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            listen_on = %url,
            spiffe_id = sec.spiffe_id().as_deref().unwrap_or("(insecure)"),
            "endpoint registered and serving"
        )
    };
    daemon::serve_registered(
        router,
        listeners,
        &sec,
        shutdown,
        Arc::new(registry.clone()),
        me,
        cfg.registry_refresh,
        FirstRegistration::Fail,
        registered,
    )
    .await
}

#[cfg(test)]
mod cli_tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Config::command().debug_assert();
    }
}

#[cfg(test)]
mod chain_tests {
    use std::time::Duration;

    use clap::Parser;
    use nsm_sdk::networkservice::chains::documented_chain;
    use nsm_sdk::tools::daemon::Security;

    #[test]
    fn the_chain_is_what_the_module_docs_say() {
        let cfg = super::Config::try_parse_from(["nse"]).unwrap();
        let (ep, _) = super::chain(&cfg, &Security::insecure(Duration::from_secs(60))).unwrap();
        assert_eq!(ep.chain.names(), documented_chain(include_str!("lib.rs")));
    }
}
