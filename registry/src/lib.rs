//! The NSM registry service with in-memory storage (upstream's
//! `cmd-registry-memory`): `registry.NetworkServiceRegistry` and
//! `registry.NetworkServiceEndpointRegistry` on `NSM_LISTEN_ON`
//! (default `tcp://:5002`), endpoint registrations capped at
//! `NSM_EXPIRE_PERIOD` (default 1m).
//!
//! Interdomain (multi-cluster): calls about names `x@<domain>` for another
//! domain are forwarded to that domain's registry, taken from the static
//! map `NSM_DOMAIN_REGISTRIES` (`my.cluster2=tcp://10.2.0.1:5002,...`),
//! with the domain stripped on the way there and appended again on the way
//! back; `x@<NSM_DOMAIN>` and unqualified names are served from the local
//! store (see `nsm_sdk::registry::interdomain`). Only local endpoint
//! registrations are capped by `NSM_EXPIRE_PERIOD`; a forwarded one is
//! capped by the remote registry.
//!
//! State lives only in memory: after a restart, endpoints and forwarders
//! re-register on their next refresh (at most 2/3 of the expire period), and
//! endpoints re-register their network services on the same cadence.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nsm_api::service_names;
use nsm_sdk::registry::authorize::{Authorize, UpdatePath};
use nsm_sdk::registry::expire::Expire;
use nsm_sdk::registry::interdomain::{Interdomain, Remotes, StaticDomains, check_domain};
use nsm_sdk::registry::memory::MemoryRegistry;
use nsm_sdk::registry::{NsRegistry, NsRegistryServer, NseRegistry, NseRegistryServer};
use nsm_sdk::tools::daemon::{self, Security, parse_duration};
use nsm_sdk::tools::grpc::{Listeners, UrlList, parse_url_list};
use url::Url;

/// Configuration (flags or the upstream `NSM_*` environment variables).
#[derive(Parser, Debug, Clone)]
#[command(name = "nsm-registry", version, about = "NSM registry (in-memory store)")]
pub struct Config {
    #[command(flatten)]
    pub registry: RegistryArgs,
}

impl daemon::DaemonConfig for Config {
    const PROG: &'static str = "nsm-registry";
    fn serving(&self) -> (&daemon::CommonArgs, Duration, Vec<Url>) {
        self.registry.serving()
    }
}

/// What every registry daemon takes, whatever stores its records
/// (this crate's memory, or the Kubernetes API in `nsm-registry-k8s`).
#[derive(clap::Args, Debug, Clone)]
pub struct RegistryArgs {
    /// Where to serve, comma-separated `tcp://host:port` / `unix:///path`.
    #[arg(long, env = "NSM_LISTEN_ON", default_value = "tcp://:5002", value_parser = parse_url_list)]
    pub listen_on: UrlList,
    /// Endpoint registrations expire this long after their last refresh.
    #[arg(long, env = "NSM_EXPIRE_PERIOD", default_value = "1m", value_parser = parse_duration)]
    pub expire_period: Duration,
    /// This cluster's domain (e.g. `my.cluster1`): names `x@<it>` are served
    /// from the local store like plain `x`. Empty: no own domain, every
    /// `x@<domain>` is forwarded.
    #[arg(long, env = "NSM_DOMAIN", default_value = "", value_parser = parse_own_domain)]
    pub domain: String,
    /// Registries of other domains, comma-separated `<domain>=<registry URL>`
    /// (e.g. `my.cluster2=tcp://10.2.0.1:5002,my.cluster3=tcp://10.3.0.1:5002`).
    /// Calls about `x@<domain>` go to that registry; an unlisted domain is
    /// NotFound. An entry for the own domain is ignored, so every cluster
    /// may share one list.
    #[arg(long, env = "NSM_DOMAIN_REGISTRIES", default_value = "", value_parser = parse_domain_registries)]
    pub domain_registries: StaticDomains,
    /// Timeout for dialing another domain's registry.
    #[arg(long, env = "NSM_DIAL_TIMEOUT", default_value = "750ms", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// Lifetime of the tokens this registry mints into registry paths.
    #[arg(long, env = "NSM_MAX_TOKEN_LIFETIME", default_value = "10m", value_parser = parse_duration)]
    pub max_token_lifetime: Duration,
    #[command(flatten)]
    pub common: daemon::CommonArgs,
}

impl RegistryArgs {
    /// What `serve_main` needs.
    pub fn serving(&self) -> (&daemon::CommonArgs, Duration, Vec<Url>) {
        (&self.common, self.max_token_lifetime, self.listen_on.0.clone())
    }
}

/// Where a registry daemon keeps its records.
pub struct Stores {
    pub ns: Arc<dyn NsRegistry>,
    pub nse: Arc<dyn NseRegistry>,
    /// A name for logs (`in-memory`, `Kubernetes namespace nsm-system`).
    pub what: String,
}

/// `NSM_DOMAIN`: empty, or a valid domain name.
pub fn parse_own_domain(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(String::new());
    }
    check_domain(s).map_err(|e| format!("invalid NSM_DOMAIN {s:?}: {e}"))?;
    Ok(s.to_string())
}

/// `NSM_DOMAIN_REGISTRIES`: see [`StaticDomains`].
pub fn parse_domain_registries(s: &str) -> Result<StaticDomains, String> {
    s.parse().map_err(|e: nsm_sdk::registry::interdomain::DomainsError| e.to_string())
}

/// Serves the in-memory registry on `listeners` until `shutdown` resolves.
pub async fn run(cfg: Config, sec: Security, listeners: Listeners, shutdown: daemon::Shutdown) -> anyhow::Result<()> {
    let store = MemoryRegistry::new();
    let stores = Stores { ns: Arc::new(store.clone()), nse: Arc::new(store), what: "in-memory".into() };
    serve(cfg.registry, stores, sec, listeners, shutdown).await
}

/// Serves `stores` as a registry on `listeners` until `shutdown`: endpoint
/// registrations capped at `NSM_EXPIRE_PERIOD`, calls about other domains
/// forwarded (see the crate docs), registry path, tokens and policies on
/// every call.
pub async fn serve(
    args: RegistryArgs,
    stores: Stores,
    sec: Security,
    listeners: Listeners,
    shutdown: daemon::Shutdown,
) -> anyhow::Result<()> {
    let local_nse = Expire::new(stores.nse, args.expire_period);
    let own_domain = (!args.domain.is_empty()).then(|| args.domain.clone());
    tracing::info!(
        own_domain = own_domain.as_deref().unwrap_or("(none)"),
        domain_registries = %args.domain_registries,
        "interdomain routing"
    );
    let remotes = Remotes {
        resolver: Arc::new(args.domain_registries),
        pool: sec.pool(args.dial_timeout),
        tokens: Some(sec.tokens.clone()),
    };
    let registry = Interdomain::new(stores.ns, local_nse, own_domain, remotes);
    // Registry path and tokens, then first-registrant ownership and the
    // policies (nsm-spec §2.6), then routing and storage.
    let ns: Arc<dyn NsRegistry> =
        UpdatePath::ns(Authorize::ns(registry.clone(), sec.registry.clone()), sec.tokens.clone());
    let nse: Arc<dyn NseRegistry> = UpdatePath::nse(Authorize::nse(registry, sec.registry.clone()), sec.tokens.clone());
    let health = daemon::health_service(&[
        service_names::NETWORK_SERVICE_REGISTRY,
        service_names::NETWORK_SERVICE_ENDPOINT_REGISTRY,
    ])
    .await;
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(NsRegistryServer(ns).into_service())
        .add_service(NseRegistryServer(nse).into_service());
    tracing::info!(
        listen_on = ?listeners.urls().iter().map(Url::as_str).collect::<Vec<_>>(),
        store = %stores.what,
        spiffe_id = sec.spiffe_id().as_deref().unwrap_or("(insecure)"),
        "registry serving"
    );
    daemon::serve_with(router, listeners, sec.tls.clone(), shutdown, Duration::from_secs(2)).await?;
    Ok(())
}

#[cfg(test)]
mod config_tests {
    use clap::Parser;

    use super::Config;

    #[test]
    fn domain_options_parse_and_reject_with_clear_errors() {
        let c = Config::try_parse_from(["nsm-registry"]).unwrap().registry;
        assert!(c.domain.is_empty() && c.domain_registries.is_empty(), "defaults: no interdomain");
        let c = Config::try_parse_from([
            "nsm-registry",
            "--domain",
            "my.cluster1",
            "--domain-registries",
            "my.cluster2=tcp://10.2.0.1:5002,my.cluster3=10.3.0.1:5002",
        ])
        .unwrap()
        .registry;
        assert_eq!(c.domain, "my.cluster1");
        assert_eq!(c.domain_registries.get("my.cluster3").unwrap().as_str(), "tcp://10.3.0.1:5002");

        let e = Config::try_parse_from(["nsm-registry", "--domain", "my cluster"]).unwrap_err().to_string();
        assert!(e.contains("invalid NSM_DOMAIN \"my cluster\"") && e.contains("' '"), "{e}");
        let e = Config::try_parse_from(["nsm-registry", "--domain-registries", "my.cluster2"]).unwrap_err().to_string();
        assert!(
            e.contains("NSM_DOMAIN_REGISTRIES entry \"my.cluster2\"") && e.contains("<domain>=<registry URL>"),
            "{e}"
        );
        let e =
            Config::try_parse_from(["nsm-registry", "--domain-registries", "c2=ftp://x:1"]).unwrap_err().to_string();
        assert!(e.contains("c2=ftp://x:1") && e.contains("unsupported scheme"), "{e}");
    }
}

/// Two registry daemons standing in for two clusters, each knowing the other.
#[cfg(test)]
mod interdomain_tests {
    use std::time::{Duration, SystemTime};

    use clap::Parser;
    use nsm_api::registry::{NetworkService, NetworkServiceEndpoint};
    use nsm_sdk::networkservice::chain::Context;
    use nsm_sdk::registry::{NsRegistry, NseRegistry, RemoteRegistry, find_ns, find_nses};
    use nsm_sdk::tools::grpc::{ChannelPool, Listeners, parse_url};
    use url::Url;

    use super::{Config, run};

    struct Daemon {
        url: Url,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    async fn start(url: &Url, args: &[&str]) -> Daemon {
        let mut argv = vec!["nsm-registry", "--listen-on", url.as_str()];
        argv.extend_from_slice(args);
        let cfg = Config::try_parse_from(argv).unwrap();
        let listeners = Listeners::bind(std::slice::from_ref(url)).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sec = nsm_sdk::tools::daemon::Security::insecure(Duration::from_secs(600));
        tokio::spawn(run(
            cfg,
            sec,
            listeners,
            Box::pin(async move {
                let _ = stopped.await;
            }),
        ));
        Daemon { url: url.clone(), _stop: stop }
    }

    fn ctx() -> Context {
        Context::with_timeout(Duration::from_secs(5))
    }

    fn client(d: &Daemon) -> RemoteRegistry {
        RemoteRegistry::new(d.url.clone(), ChannelPool::new(Duration::from_secs(1)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clusters_forward_other_domains_and_keep_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let u1 = parse_url(&format!("unix://{}/c1.sock", dir.path().display())).unwrap();
        let u2 = parse_url(&format!("unix://{}/c2.sock", dir.path().display())).unwrap();
        // One shared map (own entries ignored); c2 caps registrations at 1h, c1 at 1m.
        let map = format!("my.cluster1={u1},my.cluster2={u2}");
        let c1 = start(&u1, &["--domain", "my.cluster1", "--domain-registries", &map, "--expire-period", "1m"]).await;
        let c2 = start(&u2, &["--domain", "my.cluster2", "--domain-registries", &map, "--expire-period", "1h"]).await;
        let (r1, r2) = (client(&c1), client(&c2));

        // An endpoint registers in cluster 2 without any domain.
        let nse = nsm_sdk::testing::nse("nse1", &["svc"], "tcp://10.2.0.5:5001");
        NseRegistry::register(&r2, &ctx(), nse).await.unwrap();
        NsRegistry::register(&r2, &ctx(), NetworkService { name: "svc".into(), ..Default::default() }).await.unwrap();

        // Cluster 1 finds it by the qualified name.
        let q = NetworkServiceEndpoint { network_service_names: vec!["svc@my.cluster2".into()], ..Default::default() };
        let found = find_nses(&r1, &ctx(), q).await.unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].name, "nse1@my.cluster2");
        assert_eq!(found[0].network_service_names, ["svc@my.cluster2"]);
        assert_eq!(found[0].url, "tcp://10.2.0.5:5001");
        let q = NetworkService { name: "svc@my.cluster2".into(), ..Default::default() };
        assert_eq!(find_ns(&r1, &ctx(), q).await.unwrap()[0].name, "svc@my.cluster2");
        // Not visible unqualified in cluster 1.
        let q = NetworkServiceEndpoint { network_service_names: vec!["svc".into()], ..Default::default() };
        assert!(find_nses(&r1, &ctx(), q).await.unwrap().is_empty());

        // Floating registration through cluster 1: stored in cluster 2, capped by cluster 2's expire only.
        let floating = nsm_sdk::testing::nse("nse-f@my.cluster2", &["svc@my.cluster2"], "tcp://10.1.0.9:5001");
        let out = NseRegistry::register(&r1, &ctx(), floating).await.unwrap();
        assert_eq!(out.name, "nse-f@my.cluster2");
        let exp = nsm_sdk::tools::token::from_timestamp(out.expiration_time.as_ref().unwrap()).unwrap();
        assert!(exp > SystemTime::now() + Duration::from_secs(600), "cluster 1's 1m cap not applied: {exp:?}");
        let q = NetworkServiceEndpoint { name: "nse-f".into(), ..Default::default() };
        assert_eq!(find_nses(&r2, &ctx(), q).await.unwrap()[0].network_service_names, ["svc"]);

        // Own-domain names stay local; local registrations get the local cap.
        let own = nsm_sdk::testing::nse("nse-l@my.cluster1", &["svc-l"], "tcp://10.1.0.2:5001");
        let out = NseRegistry::register(&r1, &ctx(), own).await.unwrap();
        assert_eq!(out.name, "nse-l@my.cluster1");
        let exp = nsm_sdk::tools::token::from_timestamp(out.expiration_time.as_ref().unwrap()).unwrap();
        assert!(exp <= SystemTime::now() + Duration::from_secs(61), "cluster 1's cap applied: {exp:?}");
        let q = NetworkServiceEndpoint { name: "nse-l".into(), ..Default::default() };
        assert_eq!(find_nses(&r1, &ctx(), q.clone()).await.unwrap().len(), 1);
        assert!(find_nses(&r2, &ctx(), q).await.unwrap().is_empty());

        // Unknown domain.
        let q = NetworkService { name: "svc@my.cluster9".into(), ..Default::default() };
        let e = find_ns(&r1, &ctx(), q).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert!(e.message().contains("no registry known for domain my.cluster9"), "{e:?}");
    }
}
