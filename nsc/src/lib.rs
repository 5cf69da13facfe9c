//! The NSM client: asks the local nsmgr for network services and waits
//! until their interfaces are up in its own network namespace.
//!
//! Two modes, like upstream's `cmd-nsc-init` and `cmd-nsc`:
//! - `init` (default): request every service, wait for each interface with
//!   its addresses, print one summary line per connection, exit 0. Any
//!   failure closes what was already established and exits non-zero with
//!   one line saying why.
//! - `run`: the same, then keep the connections refreshed (at 20 % of the
//!   token lifetime, as upstream) and close them on SIGTERM/SIGINT. At start
//!   it adopts connections an init container with the same `NSM_NAME`
//!   established (found through MonitorConnections), instead of creating new
//!   ones.
//!
//! # Layout
//! - [`Config`]: flags / upstream `NSM_*` environment variables.
//! - [`Client`]: request/refresh/close of the configured services.
//! - [`iface`]: waiting for an interface in the own netns.

use std::time::{Duration, Instant, SystemTime};

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use nsm_api::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_api::connection::{Connection, MonitorScopeSelector, PathSegment};
use nsm_api::mechanisms::kernel;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_sdk::networkservice::authorize::AuthorizeClient;
use nsm_sdk::networkservice::connect::GrpcClient;
use nsm_sdk::networkservice::kernel::KernelClient;
use nsm_sdk::networkservice::updatepath::UpdatePath;
use nsm_sdk::networkservice::{Chain, ConnResult, Context};
use nsm_sdk::security::jwt;
use nsm_sdk::tools::daemon::{CommonArgs, Security, parse_duration};
use nsm_sdk::tools::grpc::{ChannelPool, parse_url};
use nsm_sdk::tools::nsurl::{NsUrl, parse_list};
use nsm_sdk::tools::token;
use tonic::Status;
use url::Url;

pub mod iface;

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Request, wait for the interfaces, print a summary, exit.
    Init,
    /// Request, then keep refreshing until SIGTERM; close on exit.
    Run,
}

/// Output format of the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Configuration: flags, or upstream's `cmd-nsc` / `cmd-nsc-init`
/// environment variables.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "nsc",
    version,
    about = "NSM client: request network services, wait for their interfaces",
    after_help = "Example: NSM_NETWORK_SERVICES=kernel://icmp-responder/nsm-1 nsc init\n\
                  Exit codes: 0 all connections up; 1 a request or the interface wait failed; 64 bad configuration."
)]
pub struct Config {
    /// `init`: connect and exit; `run`: connect and keep refreshing.
    #[arg(value_enum, default_value = "init")]
    pub mode: Mode,
    /// Network services to connect to, comma-separated NSURLs:
    /// `kernel://<service>[@<domain>]/<ifname>[?label=value&...]`.
    #[arg(long, env = "NSM_NETWORK_SERVICES", value_parser = parse_nsurls)]
    pub network_services: NsUrls,
    /// Client name; connection ids are `<name>-<index>`.
    #[arg(long, env = "NSM_NAME", default_value = "nsc")]
    pub name: String,
    /// The local nsmgr.
    #[arg(long, env = "NSM_CONNECT_TO", default_value = "unix:///var/lib/networkservicemesh/nsm.io.sock", value_parser = parse_url)]
    pub connect_to: Url,
    /// Time allowed for each service's Request (transient failures such as an
    /// nsmgr that is not up yet are retried within it) and interface wait.
    #[arg(long, env = "NSM_REQUEST_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Timeout for dialing the nsmgr.
    #[arg(long, env = "NSM_DIAL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// Lifetime of the tokens this client sends; the path refreshes well
    /// before it ends.
    #[arg(long, env = "NSM_MAX_TOKEN_LIFETIME", default_value = "10m", value_parser = parse_duration)]
    pub max_token_lifetime: Duration,
    /// Summary format on stdout.
    #[arg(long, env = "NSM_OUTPUT", value_enum, default_value = "text")]
    pub output: Output,
    /// Labels `nodeName`/`podName`/`clusterName` (downward API), added to
    /// connections and to the endpoints registered through this component.
    #[command(flatten)]
    pub pod: nsm_sdk::tools::daemon::PodInfoArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Parsed `NSM_NETWORK_SERVICES`.
#[derive(Clone, Debug)]
pub struct NsUrls(pub Vec<NsUrl>);

fn parse_nsurls(s: &str) -> Result<NsUrls, String> {
    let v = parse_list(s).map_err(|e| e.to_string())?;
    if v.is_empty() {
        return Err("no network service given".into());
    }
    Ok(NsUrls(v))
}

/// One established connection and how long it took (what `nsc --output
/// json` prints, one object per line; tests read it back).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub id: String,
    pub network_service: String,
    pub interface: String,
    pub src_ips: Vec<String>,
    pub dst_ips: Vec<String>,
    pub nse: String,
    pub path: Vec<String>,
    /// The SPIFFE ID that signed each path segment's token (`sub`), empty
    /// where the token is not a JWT (plaintext mode).
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
    pub setup_ms: f64,
    #[serde(default)]
    pub adopted: bool,
}

impl Summary {
    fn of(conn: &Connection, iface: &str, took: Duration, adopted: bool) -> Summary {
        let ip = conn.context.as_ref().and_then(|c| c.ip_context.clone()).unwrap_or_default();
        Summary {
            id: conn.id.clone(),
            network_service: conn.network_service.clone(),
            interface: iface.to_string(),
            src_ips: ip.src_ip_addrs,
            dst_ips: ip.dst_ip_addrs,
            nse: conn.network_service_endpoint_name.clone(),
            path: conn.path.iter().flat_map(|p| p.path_segments.iter()).map(|s| s.name.clone()).collect(),
            spiffe_ids: conn
                .path
                .iter()
                .flat_map(|p| p.path_segments.iter())
                .map(|s| jwt::decode(&s.token).map(|(_, c)| c.sub).unwrap_or_default())
                .collect(),
            setup_ms: took.as_secs_f64() * 1000.0,
            adopted,
        }
    }

    /// The one-line text form.
    pub fn line(&self) -> String {
        format!(
            "{}: connected to {} (endpoint {}), {} -> {}, connection {}, path {}, {:.1} ms{}",
            self.interface,
            self.network_service,
            self.nse,
            self.src_ips.join(","),
            self.dst_ips.join(","),
            self.id,
            self.path.join(" > "),
            self.setup_ms,
            if self.adopted { " (adopted)" } else { "" }
        )
    }
}

/// The configured connections.
pub struct Client {
    cfg: Config,
    chain: Chain,
    pool: ChannelPool,
    /// `(nsurl, request template, last connection)` per service.
    conns: Vec<(NsUrl, NetworkServiceRequest, Option<Connection>)>,
}

fn transient(e: &Status) -> bool {
    matches!(e.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted | tonic::Code::Aborted)
}

impl Client {
    /// A client for `cfg` (nothing is requested yet).
    pub fn new(cfg: Config, sec: &Security) -> Client {
        let pool = sec.pool(cfg.dial_timeout);
        let chain = Chain::new(vec![
            UpdatePath::new(&cfg.name),
            cfg.pod.client_info(),
            std::sync::Arc::new(KernelClient),
            // The tokens the nsmgr returned: valid, unexpired, chained, and
            // the nsmgr's signed by its certificate.
            AuthorizeClient::new(sec.client.clone()),
            GrpcClient::new(pool.clone(), sec.tokens.clone()),
        ]);
        let conns = cfg
            .network_services
            .0
            .iter()
            .enumerate()
            .map(|(i, u)| (u.clone(), u.to_request(&format!("{}-{i}", cfg.name)), None))
            .collect();
        Client { cfg, chain, pool, conns }
    }

    /// Requests with retries of transient failures, within the request
    /// timeout.
    async fn request(&self, req: NetworkServiceRequest) -> ConnResult {
        let deadline = Instant::now() + self.cfg.request_timeout;
        let mut last_logged = None::<String>;
        let mut last_transient = None::<Status>;
        loop {
            let mut ctx = Context::with_timeout(deadline.saturating_duration_since(Instant::now()));
            ctx.client_url = Some(self.cfg.connect_to.clone());
            match self.chain.request(&mut ctx, req.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if transient(&e) && Instant::now() + Duration::from_millis(200) < deadline => {
                    if last_logged.as_deref() != Some(e.message()) {
                        tracing::warn!(error = %e.message(), "request failed, retrying until NSM_REQUEST_TIMEOUT");
                        last_logged = Some(e.message().to_string());
                    }
                    last_transient = Some(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // A retry cut short by our own deadline says less than the
                // failure that made us retry.
                Err(e) if matches!(e.code(), tonic::Code::Cancelled | tonic::Code::DeadlineExceeded) => {
                    return Err(last_transient.unwrap_or(e));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Finds a connection established earlier under `id` (an init container
    /// with the same name), as the nsmgr knows it.
    async fn find_existing(&self, id: &str) -> Option<Connection> {
        let warn = |what: &str, e: &dyn std::fmt::Display| {
            tracing::warn!(nsmgr = %self.cfg.connect_to, error = %e, "{what}: requesting anew instead of adopting");
        };
        let ch = self.pool.get(&self.cfg.connect_to).await.map_err(|e| warn("dialing the nsmgr", &e.message())).ok()?;
        let sel = MonitorScopeSelector {
            path_segments: vec![PathSegment { id: id.to_string(), ..Default::default() }],
            ..Default::default()
        };
        let mut r = tonic::Request::new(sel);
        r.set_timeout(Duration::from_secs(5));
        let mut s = MonitorConnectionClient::new(ch)
            .monitor_connections(r)
            .await
            .map_err(|e| warn("monitoring the nsmgr's connections", &e.message()))
            .ok()?
            .into_inner();
        let ev = match tokio::time::timeout(Duration::from_secs(5), s.next()).await {
            Ok(Some(Ok(ev))) => ev,
            Ok(Some(Err(e))) => {
                warn("the nsmgr's monitor stream", &e.message());
                return None;
            }
            Ok(None) => {
                warn("the nsmgr's monitor stream", &"ended before the initial state");
                return None;
            }
            Err(_) => {
                warn("the nsmgr's monitor stream", &"no initial state within 5 s");
                return None;
            }
        };
        let mut conn = ev
            .connections
            .into_values()
            .find(|c| c.path.as_ref().and_then(|p| p.path_segments.first()).is_some_and(|s| s.id == id))?;
        conn.id = id.to_string();
        if let Some(p) = conn.path.as_mut() {
            p.index = 0;
        }
        Some(conn)
    }

    /// Requests every service (adopting existing connections if `adopt`),
    /// waits for the interfaces, and returns one summary per connection. On
    /// failure, closes the connections made so far.
    pub async fn connect_all(&mut self, adopt: bool) -> Result<Vec<Summary>, anyhow::Error> {
        let mut out = vec![];
        for i in 0..self.conns.len() {
            let (u, mut req, _) = self.conns[i].clone();
            let mut adopted = false;
            if adopt && let Some(existing) = self.find_existing(&conn_id(&req)).await {
                tracing::info!(conn_id = %existing.id, "adopting the connection an earlier client established");
                req.connection = Some(existing);
                adopted = true;
            }
            let t0 = Instant::now();
            let res = async {
                let conn = self
                    .request(req.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {} ({:?})", u.network_service, e.message(), e.code()))?;
                let ifname = conn
                    .mechanism
                    .as_ref()
                    .and_then(|m| m.parameters.get(kernel::NAME).cloned())
                    .or(u.interface.clone())
                    .unwrap_or_default();
                let ip = conn.context.as_ref().and_then(|c| c.ip_context.clone()).unwrap_or_default();
                let left = self.cfg.request_timeout.saturating_sub(t0.elapsed()).max(Duration::from_secs(1));
                if let Err(e) = iface::wait_ready(&ifname, &ip.src_ip_addrs, left).await {
                    let mut ctx = Context::with_timeout(Duration::from_secs(5));
                    ctx.client_url = Some(self.cfg.connect_to.clone());
                    let _ = self.chain.close(&mut ctx, conn).await;
                    anyhow::bail!("{}: {e}", u.network_service);
                }
                Ok((conn, ifname))
            }
            .await;
            match res {
                Ok((conn, ifname)) => {
                    out.push(Summary::of(&conn, &ifname, t0.elapsed(), adopted));
                    self.conns[i].2 = Some(conn);
                }
                Err(e) => {
                    self.close_all().await;
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// When the next refresh is due: 20 % of the shortest remaining token
    /// lifetime along the path (upstream's factor for the first hop).
    pub fn next_refresh(&self) -> Duration {
        let now = SystemTime::now();
        let min_ttl = self
            .conns
            .iter()
            .filter_map(|(_, _, c)| c.as_ref())
            .flat_map(|c| c.path.iter().flat_map(|p| p.path_segments.iter()))
            .filter_map(|s| s.expires.as_ref().and_then(token::from_timestamp))
            .map(|t| t.duration_since(now).unwrap_or_default())
            .min()
            .unwrap_or(self.cfg.max_token_lifetime);
        (min_ttl / 5).max(Duration::from_millis(200))
    }

    /// Re-requests every established connection; returns how many failed.
    pub async fn refresh_all(&mut self) -> usize {
        let mut failed = 0;
        for i in 0..self.conns.len() {
            let (u, mut req, Some(conn)) = self.conns[i].clone() else { continue };
            req.connection = Some(conn);
            match self.request(req).await {
                Ok(c) => self.conns[i].2 = Some(c),
                Err(e) => {
                    failed += 1;
                    tracing::warn!(service = %u.network_service, error = %e.message(), "refresh failed");
                }
            }
        }
        failed
    }

    /// Closes every established connection (best effort).
    pub async fn close_all(&mut self) {
        for i in 0..self.conns.len() {
            if let Some(conn) = self.conns[i].2.take() {
                let mut ctx = Context::with_timeout(Duration::from_secs(5));
                ctx.client_url = Some(self.cfg.connect_to.clone());
                match self.chain.close(&mut ctx, conn).await {
                    Ok(()) => tracing::info!(service = %self.conns[i].0.network_service, "closed"),
                    Err(e) => tracing::warn!(error = %e.message(), "close failed"),
                }
            }
        }
    }
}

fn conn_id(req: &NetworkServiceRequest) -> String {
    req.connection.as_ref().map(|c| c.id.clone()).unwrap_or_default()
}

/// Prints summaries in the configured format.
pub fn print(cfg: &Config, s: &[Summary]) {
    for x in s {
        match cfg.output {
            Output::Text => println!("{}", x.line()),
            Output::Json => println!("{}", serde_json::to_string(x).unwrap_or_default()),
        }
    }
}
