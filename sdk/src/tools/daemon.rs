//! What every daemon's `main` does ([`serve_main`]): parse the
//! configuration, set up logging and identity, bind the listeners, serve a
//! tonic router with grpc health until SIGTERM/SIGINT; and the flags every
//! daemon shares ([`CommonArgs`]).

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::Router;

use super::grpc::{ChannelPool, Listeners};
use super::token::{ExpiryOnly, JwtTokens, SharedTokenGenerator};
use crate::networkservice::authorize::AuthorizeMonitor;
use crate::networkservice::monitor::MonitorServer;
use crate::security::policy::PolicySet;
use crate::security::tls::Tls;

/// What a serving daemon's configuration tells [`serve_main`].
pub trait DaemonConfig: clap::Parser + Send + 'static {
    /// The program name in one-line errors (`<prog>: <reason>`).
    const PROG: &'static str;
    /// Its shared flags, the lifetime of the tokens it mints, and where it
    /// serves.
    fn serving(&self) -> (&CommonArgs, Duration, Vec<url::Url>);
}

/// When a daemon stops: SIGTERM/SIGINT in production ([`shutdown_signal`]),
/// anything in tests.
pub type Shutdown = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The whole `main` of a serving daemon (nsmgr, forwarder, endpoints,
/// registry): parses `C` (`--help` exits 0, bad configuration exits 64 with
/// clap's explanation), initialises logging and identity (exit 64 / 1, see
/// [`CommonArgs::security_or_exit`]), binds the listeners (exit 1 naming the
/// URL), and runs `run` until SIGTERM or SIGINT; a failure exits 1 with a
/// one-line reason.
pub async fn serve_main<C, F, Fut>(run: F)
where
    C: DaemonConfig,
    F: FnOnce(C, Security, Listeners, Shutdown) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let cfg: C = parse_or_exit();
    let (common, token_lifetime, urls) = cfg.serving();
    common.init_or_exit(C::PROG);
    let sec = common.security_or_exit(C::PROG, token_lifetime).await;
    let listeners = Listeners::bind(&urls).await.unwrap_or_else(|e| exit_with(C::PROG, e));
    if let Err(e) = run(cfg, sec, listeners, Box::pin(shutdown_signal())).await {
        exit_with(C::PROG, format!("{e:#}"));
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM received, shutting down"),
                _ = i.recv() => tracing::info!("SIGINT received, shutting down"),
            }
        }
        _ => {
            // No signal handling possible: never resolve (the process can still be killed).
            std::future::pending::<()>().await
        }
    }
}

/// grpc.health.v1 reporting SERVING for `services` (full gRPC names) and for
/// the empty name (whole server).
pub async fn health_service(
    services: &[&str],
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, svc) = tonic_health::server::health_reporter();
    for s in services {
        reporter.set_service_status(*s, tonic_health::ServingStatus::Serving).await;
    }
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    svc
}

/// Serves `router` on `listeners` until `shutdown` resolves, then stops
/// accepting, lets in-flight calls finish (bounded by `drain`), and removes
/// unix socket files.
pub async fn serve(
    router: Router,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> Result<(), tonic::transport::Error> {
    serve_with(router, listeners, None, shutdown, drain).await
}

/// [`serve`] with mutual TLS on every connection when `tls` is given.
pub async fn serve_with(
    router: Router,
    listeners: Listeners,
    tls: Option<std::sync::Arc<crate::security::tls::Tls>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> Result<(), tonic::transport::Error> {
    let (incoming, guard) = listeners.into_incoming_with(tls);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        shutdown.await;
        let _ = tx.send(());
    });
    tokio::pin!(server);
    let res = tokio::select! {
        r = &mut server => r,
        _ = rx => {
            // Shutdown started: give in-flight calls `drain` to finish.
            match tokio::time::timeout(drain, &mut server).await {
                Ok(r) => r,
                Err(_) => { tracing::warn!(?drain, "in-flight calls did not finish in time; exiting anyway"); Ok(()) }
            }
        }
    };
    drop(guard);
    res
}

/// The router every NetworkService server starts from: grpc health
/// (SERVING for NetworkService, MonitorConnection and `more`), the chain of
/// `ep` and its MonitorConnections.
pub async fn endpoint_router(ep: &crate::networkservice::chains::Endpoint, more: &[&str]) -> Router {
    use nsm_api::service_names;
    let mut names = vec![service_names::NETWORK_SERVICE, service_names::MONITOR_CONNECTION];
    names.extend_from_slice(more);
    let health = health_service(&names).await;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(crate::networkservice::server::ChainServer::new(ep.chain.clone()).into_service())
        .add_service(nsm_api::connection::monitor_connection_server::MonitorConnectionServer::new(ep.monitor.clone()))
}

/// What a daemon that serves an endpoint (a forwarder, an NSE) does after
/// building its router: serves it on `listeners` (mutual TLS with `sec`)
/// until `shutdown`, keeps `reg.endpoint` registered meanwhile
/// ([`register_served`](crate::registry::client::register_served); whether
/// a failed first registration is retried is `reg.first`), logs "`<what>`
/// registered and serving" with its name, services, URL and SPIFFE ID once
/// it is, and unregisters when the server has stopped.
pub async fn serve_registered(
    router: Router,
    listeners: Listeners,
    sec: &Security,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    reg: crate::registry::client::Registration,
    what: &str,
) -> anyhow::Result<()> {
    let server = tokio::spawn(serve_with(router, listeners, sec.tls.clone(), shutdown, Duration::from_secs(5)));
    let name = reg.endpoint.name.clone();
    let registering =
        crate::registry::client::register_served(reg.registry, reg.endpoint, reg.refresh, reg.first, &server);
    let (nse, guard) = match registering.await {
        Ok(r) => r,
        Err(e) => {
            server.abort();
            anyhow::bail!("registering endpoint {name:?}: {}", e.message());
        }
    };
    tracing::info!(
        name = %nse.name,
        services = ?nse.network_service_names,
        url = %nse.url,
        spiffe_id = sec.spiffe_id().as_deref().unwrap_or("(insecure)"),
        "{what} registered and serving"
    );
    let res = server.await;
    guard.stop().await;
    res??;
    Ok(())
}

/// Parses a Go-style duration (`750ms`, `15s`, `1m`, `1h30m`) for clap.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e} (examples: 750ms, 15s, 1m)"))
}

/// Flags every daemon shares.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Log level: TRACE, DEBUG, INFO, WARN or ERROR (`RUST_LOG` overrides).
    #[arg(long, env = "NSM_LOG_LEVEL", default_value = "INFO")]
    pub log_level: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "NSM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Plaintext gRPC: no TLS, no SPIFFE identities, unsigned tokens, no
    /// policy checks. For debugging only (a warning is logged); every
    /// component of a mesh must agree on it.
    #[arg(long, env = "NSM_INSECURE", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure: bool,
    /// The SPIFFE Workload API (the SPIRE agent's socket; `nsm-spiffe-dev`
    /// in the lab) this component gets its X.509-SVID from.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", default_value = "unix:///run/spire/sockets/agent.sock")]
    pub spiffe_endpoint_socket: String,
    /// How long to wait at start for the first SVID: the agent may still be
    /// starting, or not have synced this process's registration entry yet
    /// (SPIRE refuses until then). The reason is logged at once and is the
    /// error when the time is up.
    #[arg(long, env = "NSM_SVID_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub svid_timeout: Duration,
    /// Extra Rego policy files (comma-separated paths, `package nsm`,
    /// defining `valid`), evaluated after the default policies on every
    /// NetworkService Request and Close this component serves.
    #[arg(long, env = "NSM_POLICY_FILES", value_delimiter = ',')]
    pub policy_files: Vec<std::path::PathBuf>,
    /// Who sees which connections on MonitorConnections (nsmgr, forwarder,
    /// endpoints): `all` (upstream's default: every authenticated peer sees
    /// every connection) or `own` (a peer sees only the connections it
    /// requested itself).
    #[arg(long, env = "NSM_MONITOR_SCOPE", value_enum, default_value = "all")]
    pub monitor_scope: MonitorScope,
}

/// Where this component runs, from the downward API (upstream's
/// `clientinfo`): the labels `nodeName`, `podName` and `clusterName` of the
/// connections it requests and of the endpoints it registers (empty values
/// are left out).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PodInfoArgs {
    /// Node name (label `nodeName`; `spec.nodeName` in a pod).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// Pod name (label `podName`; `metadata.name`).
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,
    /// Cluster name (label `clusterName`).
    #[arg(long, env = "CLUSTER_NAME", default_value = "")]
    pub cluster_name: String,
}

impl PodInfoArgs {
    /// The labels (see the type docs).
    pub fn labels(&self) -> std::collections::BTreeMap<String, String> {
        crate::networkservice::clientinfo::info_labels(&self.node_name, &self.pod_name, &self.cluster_name)
    }

    /// The `clientinfo` chain element adding them to requests.
    pub fn client_info(&self) -> std::sync::Arc<crate::networkservice::clientinfo::ClientInfo> {
        crate::networkservice::clientinfo::ClientInfo::new(&self.node_name, &self.pod_name, &self.cluster_name)
    }

    /// `labels` with these added where they are not set already.
    pub fn add_to(&self, labels: &mut std::collections::HashMap<String, String>) {
        for (k, v) in self.labels() {
            labels.entry(k).or_insert(v);
        }
    }
}

/// How a forwarder or an endpoint reaches the nsmgr of its node, which it
/// registers through (upstream's env names and defaults).
#[derive(clap::Args, Debug, Clone)]
pub struct NsmgrArgs {
    /// The local nsmgr: registration (and a forwarder's endpoint discovery)
    /// go through it.
    #[arg(
        long,
        env = "NSM_CONNECT_TO",
        default_value = "unix:///var/lib/networkservicemesh/nsm.io.sock",
        value_parser = super::grpc::parse_url
    )]
    pub connect_to: url::Url,
    /// Timeout for dialing the nsmgr (and a forwarder's next hops).
    #[arg(long, env = "NSM_DIAL_TIMEOUT", default_value = "750ms", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// How often to refresh the registration when the registry sets no
    /// expiration.
    #[arg(long, env = "NSM_REGISTRY_REFRESH", default_value = "40s", value_parser = parse_duration)]
    pub registry_refresh: Duration,
}

/// See [`CommonArgs::monitor_scope`].
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MonitorScope {
    #[default]
    All,
    Own,
}

impl CommonArgs {
    /// Initialises logging; on error prints `<prog>: <reason>` and exits 64
    /// (usage error), as `main` would.
    pub fn init_or_exit(&self, prog: &str) {
        if let Err(e) = super::log::init(&self.log_level, self.log_format == "json") {
            eprintln!("{prog}: {e}");
            std::process::exit(64);
        }
    }

    /// Sets up identity, tokens and policies ([`Security`]): with TLS unless
    /// `NSM_INSECURE`. Errors name what is wrong (the Workload API socket,
    /// a policy file).
    pub async fn security(&self, max_token_lifetime: Duration) -> Result<Security, SecurityError> {
        // Loaded (and compiled) even in insecure mode: a broken file is a
        // configuration error either way.
        let server =
            PolicySet::server().with_files(&self.policy_files).map_err(|e| SecurityError::Policy(e.to_string()))?;
        if self.insecure {
            tracing::warn!(
                "NSM_INSECURE=true: plaintext gRPC, no SPIFFE identities, unsigned tokens, no policy checks on this component's hops"
            );
            if !self.policy_files.is_empty() {
                tracing::warn!(files = ?self.policy_files, "NSM_POLICY_FILES are not evaluated in insecure mode (no peer identities)");
            }
            return Ok(Security { monitor_scope: self.monitor_scope, ..Security::insecure(max_token_lifetime) });
        }
        let tls = Tls::from_workload_api(&self.spiffe_endpoint_socket, self.svid_timeout)
            .await
            .map_err(|e| SecurityError::Tls(e.to_string()))?;
        let tokens: SharedTokenGenerator = JwtTokens::new(tls.clone(), max_token_lifetime);
        tracing::info!(
            spiffe_id = %tls.spiffe_id().unwrap_or_default(),
            policies = ?server.names(),
            "mutual TLS with SPIFFE identities; ES256 tokens; policies"
        );
        Ok(Security {
            tls: Some(tls),
            tokens,
            server,
            client: PolicySet::client(),
            registry: PolicySet::registry(),
            monitor_scope: self.monitor_scope,
        })
    }

    /// [`CommonArgs::security`], or print `<prog>: <reason>` and exit (64
    /// for a bad policy file, 1 when no SVID could be had).
    pub async fn security_or_exit(&self, prog: &str, max_token_lifetime: Duration) -> Security {
        match self.security(max_token_lifetime).await {
            Ok(s) => s,
            Err(e @ SecurityError::Policy(_)) => {
                eprintln!("{prog}: {e}");
                std::process::exit(64)
            }
            Err(e) => exit_with(prog, e),
        }
    }
}

/// Why [`CommonArgs::security`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{0} (or set NSM_INSECURE=true to run without identities)")]
    Tls(String),
    #[error("NSM_POLICY_FILES: {0}")]
    Policy(String),
}

/// A component's identity, token minting and policies.
///
/// - `tls`: the live SVID source and TLS configurations (None: plaintext).
/// - `tokens`: ES256 JWTs signed with the SVID ([`JwtTokens`]), or
///   expiry-only tokens in plaintext mode.
/// - `server` / `client` / `registry`: the policy sets of the authorize
///   elements (upstream's defaults, plus `NSM_POLICY_FILES` on the server
///   side). Without TLS the authorize elements let everything pass.
#[derive(Clone)]
pub struct Security {
    pub tls: Option<Arc<Tls>>,
    pub tokens: SharedTokenGenerator,
    pub server: PolicySet,
    pub client: PolicySet,
    pub registry: PolicySet,
    pub monitor_scope: MonitorScope,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("spiffe_id", &self.spiffe_id())
            .field("server", &self.server.names())
            .finish_non_exhaustive()
    }
}

impl Security {
    /// Plaintext mode.
    pub fn insecure(max_token_lifetime: Duration) -> Security {
        Security {
            tls: None,
            tokens: ExpiryOnly::new(max_token_lifetime),
            server: PolicySet::server(),
            client: PolicySet::client(),
            registry: PolicySet::registry(),
            monitor_scope: MonitorScope::All,
        }
    }

    /// The MonitorConnections server, showing subscribers what
    /// `NSM_MONITOR_SCOPE` allows.
    pub fn monitor(&self) -> MonitorServer {
        match self.monitor_scope {
            MonitorScope::All => MonitorServer::new(),
            MonitorScope::Own => MonitorServer::with_authorize(AuthorizeMonitor::own()),
        }
    }

    /// A channel pool dialing with this identity.
    pub fn pool(&self, dial_timeout: Duration) -> ChannelPool {
        ChannelPool::with_tls(dial_timeout, self.tls.clone())
    }

    /// Our SPIFFE ID (None in plaintext mode).
    pub fn spiffe_id(&self) -> Option<String> {
        self.tls.as_ref().and_then(|t| t.spiffe_id())
    }
}

/// Prints `<prog>: <error>` and exits 1: the one-line failure every binary
/// reports for runtime errors.
pub fn exit_with(prog: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("{prog}: {e}");
    std::process::exit(1)
}

/// Parses the command line (and `NSM_*` environment); `--help`/`--version`
/// print and exit 0, anything invalid prints clap's explanation and exits 64
/// (EX_USAGE), so scripts can tell bad configuration from runtime failure.
pub fn parse_or_exit<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            std::process::exit(code)
        }
    }
}

/// The first IPv4 address of this netns that is neither loopback nor
/// link-local (the default for public URLs and tunnel endpoints).
pub fn first_global_ipv4() -> Option<std::net::IpAddr> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs {
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            let ip = sin.ip();
            if !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified() {
                return Some(std::net::IpAddr::V4(ip));
            }
        }
    }
    None
}
