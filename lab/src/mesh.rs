//! Mesh building blocks on top of [`Lab`]: a node (registry, nsmgr and
//! forwarder in the node's namespace), endpoints and clients in their own
//! pod namespaces, and queries against the running components — the same
//! binaries and the same `NSM_*` configuration as in Kubernetes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use nsm_api::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_api::connection::{Connection, MonitorScopeSelector};
use nsm_api::registry::NetworkServiceEndpoint;
use nsm_sdk::networkservice::Context;
use nsm_sdk::registry::find_nses;
use nsm_sdk::tools::grpc::parse_url;
use url::Url;

use crate::env::Lab;
use crate::identity::{self, Provider};

/// A node: its namespace and the sockets of its nsmgr and forwarder.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub nsmgr_url: Url,
    pub forwarder_url: Url,
    pub nsmgr_name: String,
    pub forwarder_name: String,
    pub registry_url: Url,
    /// Underlay address (the tunnel IP), if the node has an underlay.
    pub ip: Option<std::net::IpAddr>,
    /// Cluster domain (`my.cluster1`), if any.
    pub domain: String,
    /// Index of the node's cluster (1 for single-cluster labs): which
    /// Workload API gives its processes their identities.
    pub cluster: u8,
}

/// Where a node's nsmgr finds its registry.
#[derive(Clone, Debug)]
pub enum RegistryAt {
    /// Start a registry in this node, listening on this URL, knowing the
    /// other domains' registries (`NSM_DOMAIN_REGISTRIES`).
    Here { listen: Url, domains: String },
    /// Use the registry at this URL.
    There(Url),
    /// Start `nsm-registry-k8s` for this node, keeping the records in the
    /// Kubernetes API server of `kubeconfig` (namespace `namespace`). It
    /// runs in the lab's own network namespace (the API server is on its
    /// loopback) and serves the node on a unix socket.
    Kubernetes { kubeconfig: PathBuf, namespace: String },
}

/// How to start one node's daemons.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub ip: Option<std::net::IpAddr>,
    pub registry: RegistryAt,
    pub domain: String,
    pub cluster: String,
}

/// Options of [`start_node`].
#[derive(Clone, Debug)]
pub struct NodeOpts {
    /// Registration expiry at the registry and nsmgr.
    pub expire_period: String,
    /// Token lifetime of the components (connections of clients that stop
    /// refreshing are closed after it).
    pub max_token_lifetime: String,
    pub log_level: String,
    /// Extra environment of every forwarder (`NSM_ORPHAN_GRACE`, ...).
    pub forwarder_env: Vec<(String, String)>,
    /// Extra environment of every nsmgr (`NSM_POLICY_FILES`, ...).
    pub nsmgr_env: Vec<(String, String)>,
    /// Plaintext gRPC, no identities (`NSM_INSECURE=true` everywhere).
    /// Default: mutual TLS with SVIDs from the lab's dev Workload API.
    pub insecure: bool,
    /// Who issues the SVIDs (when not `insecure`): `nsm-spiffe-dev` by
    /// default, or real SPIRE.
    pub identity: Provider,
    /// Lifetime of the SVIDs the lab's Workload API issues (rotated at
    /// half of it).
    pub svid_ttl: String,
    /// Where [`start_node`]'s nsmgr finds its registry. Default: a
    /// memory registry of its own ([`RegistryAt::Here`] on
    /// `tcp://127.0.0.1:5002` in the node).
    pub registry: Option<RegistryAt>,
}

impl Default for NodeOpts {
    fn default() -> Self {
        NodeOpts {
            expire_period: "1m".into(),
            max_token_lifetime: "10m".into(),
            log_level: "INFO".into(),
            forwarder_env: vec![],
            nsmgr_env: vec![],
            insecure: false,
            identity: Provider::Dev,
            svid_ttl: "1h".into(),
            registry: None,
        }
    }
}

impl NodeOpts {
    /// The defaults plus `NAME=value` in every forwarder's environment.
    pub fn with_forwarder_env(name: &str, value: &str) -> NodeOpts {
        NodeOpts { forwarder_env: vec![(name.into(), value.into())], ..Default::default() }
    }

    /// The defaults plus `NAME=value` in every nsmgr's environment.
    pub fn with_nsmgr_env(name: &str, value: &str) -> NodeOpts {
        NodeOpts { nsmgr_env: vec![(name.into(), value.into())], ..Default::default() }
    }
}

/// An endpoint pod.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub name: String,
    pub netns: String,
    pub url: Url,
    pub service: String,
}

/// One connection as `nsc --output json` reports it.
pub use nsc::Summary as NscSummary;

/// Result of a one-shot `nsc init`.
#[derive(Debug)]
pub struct NscRun {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub summaries: Vec<NscSummary>,
    pub took: Duration,
}

fn sock(lab: &Lab, rel: &str) -> anyhow::Result<Url> {
    let p: PathBuf = lab.dir().join(rel);
    Ok(parse_url(&format!("unix://{}", p.display()))?)
}

/// Starts registry, nsmgr and forwarder in a new node namespace (loopback
/// only) and waits until the forwarder is registered.
pub async fn start_node(lab: &mut Lab, name: &str, opts: &NodeOpts) -> anyhow::Result<Node> {
    if !opts.insecure {
        identity::ensure(lab, 1, opts.identity, &opts.svid_ttl).await?;
    }
    let netns = lab.add_netns(name)?;
    let registry = match &opts.registry {
        Some(r) => r.clone(),
        None => RegistryAt::Here { listen: parse_url("tcp://127.0.0.1:5002")?, domains: String::new() },
    };
    let spec = NodeSpec { name: name.to_string(), ip: None, registry, domain: String::new(), cluster: String::new() };
    start_node_in(lab, &netns, &spec, opts).await
}

/// Starts the daemons of node `spec` in the existing namespace `netns`.
pub async fn start_node_in(lab: &mut Lab, netns: &str, spec: &NodeSpec, opts: &NodeOpts) -> anyhow::Result<Node> {
    let name = &spec.name;
    let nsmgr_url = sock(lab, &format!("{name}/nsm.io.sock"))?;
    let forwarder_url = sock(lab, &format!("{name}/forwarder.sock"))?;
    let registry_url = match &spec.registry {
        RegistryAt::Here { listen, .. } => listen.clone(),
        RegistryAt::There(u) => u.clone(),
        RegistryAt::Kubernetes { .. } => sock(lab, &format!("{name}/registry.sock"))?,
    };
    let node = Node {
        name: name.to_string(),
        netns: netns.to_string(),
        nsmgr_url: nsmgr_url.clone(),
        forwarder_url: forwarder_url.clone(),
        nsmgr_name: format!("nsmgr-{name}"),
        forwarder_name: format!("forwarder-{name}"),
        registry_url: registry_url.clone(),
        ip: spec.ip,
        domain: spec.domain.clone(),
        cluster: spec.cluster.trim_start_matches("cluster").parse().unwrap_or(1),
    };
    if !opts.insecure {
        identity::ensure(lab, node.cluster, opts.identity, &opts.svid_ttl).await?;
        identity::ensure_node(lab, &node).await?;
    }
    let id_env = identity::env(lab, &node);
    let ll = opts.log_level.clone();
    if let RegistryAt::Here { listen, domains } = &spec.registry {
        let mut env = vec![
            ("NSM_LISTEN_ON", listen.to_string()),
            ("NSM_EXPIRE_PERIOD", opts.expire_period.clone()),
            ("NSM_DOMAIN", spec.domain.clone()),
            ("NSM_DOMAIN_REGISTRIES", domains.clone()),
            ("NSM_LOG_LEVEL", ll.clone()),
        ];
        env.extend(id_env.iter().cloned());
        lab.spawn(&format!("registry-{name}"), netns, "nsm-registry", &env)?;
    }
    if let RegistryAt::Kubernetes { kubeconfig, namespace } = &spec.registry {
        start_k8s_registry(lab, &node, kubeconfig, namespace, opts).await?;
    }
    let tcp = match spec.ip {
        Some(ip) => format!("tcp://{ip}:5001"),
        None => "tcp://127.0.0.1:5001".to_string(),
    };
    let mut env = vec![
        ("NSM_NAME", node.nsmgr_name.clone()),
        ("NSM_LISTEN_ON", format!("{nsmgr_url},{tcp}")),
        ("NSM_REGISTRY_URL", registry_url.to_string()),
        ("NSM_EXPIRE_PERIOD", opts.expire_period.clone()),
        ("NSM_MAX_TOKEN_LIFETIME", opts.max_token_lifetime.clone()),
        ("NSM_DOMAIN", spec.domain.clone()),
        ("NODE_NAME", name.to_string()),
        ("CLUSTER_NAME", spec.cluster.clone()),
        ("NSM_LOG_LEVEL", ll.clone()),
    ];
    env.extend(id_env.iter().cloned());
    env.extend(opts.nsmgr_env.iter().map(|(k, v)| (k.as_str(), v.clone())));
    lab.spawn(&node.nsmgr_name, netns, "nsmgr", &env)?;
    start_forwarder(lab, &node, opts).await?;
    Ok(node)
}

/// Starts (or restarts) the `nsm-registry-k8s` of `node` (see
/// [`RegistryAt::Kubernetes`]) and waits until it serves.
pub async fn start_k8s_registry(
    lab: &mut Lab,
    node: &Node,
    kubeconfig: &std::path::Path,
    namespace: &str,
    opts: &NodeOpts,
) -> anyhow::Result<()> {
    let name = format!("registry-{}", node.name);
    let _ = std::fs::remove_file(node.registry_url.path());
    std::fs::create_dir_all(lab.dir().join(&node.name))?;
    let mut env = vec![
        ("NSM_LISTEN_ON", node.registry_url.to_string()),
        ("NSM_KUBECONFIG", kubeconfig.display().to_string()),
        ("NSM_NAMESPACE", namespace.to_string()),
        ("NSM_EXPIRE_PERIOD", opts.expire_period.clone()),
        ("NSM_LOG_LEVEL", opts.log_level.clone()),
    ];
    env.extend(identity::env(lab, node));
    lab.spawn(&name, crate::env::HOST_NETNS, "nsm-registry-k8s", &env)?;
    lab.wait_for_file(&name, std::path::Path::new(node.registry_url.path()), Duration::from_secs(20)).await
}

/// Starts (or restarts) the node's forwarder and waits until it is
/// registered.
pub async fn start_forwarder(lab: &mut Lab, node: &Node, opts: &NodeOpts) -> anyhow::Result<()> {
    let mut env = vec![
        ("NSM_NAME", node.forwarder_name.clone()),
        ("NSM_LISTEN_ON", node.forwarder_url.to_string()),
        ("NSM_CONNECT_TO", node.nsmgr_url.to_string()),
        ("NSM_MAX_TOKEN_LIFETIME", opts.max_token_lifetime.clone()),
        ("NSM_LOG_LEVEL", opts.log_level.clone()),
        // The downward API of the forwarder's pod.
        ("NODE_NAME", node.name.clone()),
        ("POD_NAME", node.forwarder_name.clone()),
    ];
    if let Some(ip) = node.ip {
        env.push(("NSM_TUNNEL_IP", ip.to_string()));
    }
    env.extend(identity::env(lab, node));
    let extra: Vec<(&str, String)> = opts.forwarder_env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    env.extend(extra);
    // A restarted forwarder's name may still be registered by its
    // predecessor, so registration alone proves nothing: wait until this
    // process answers on its socket (its server starts after its start-up
    // sweep; a dead predecessor's socket file refuses connections).
    lab.spawn(&node.forwarder_name, &node.netns, "forwarder", &env)?;
    let t0 = Instant::now();
    while connections(lab, &node.forwarder_url).await.is_err() {
        if !lab.running(&node.forwarder_name) {
            bail!("{} exited during start-up:\n{}", node.forwarder_name, lab.log_tail(&node.forwarder_name, 15));
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("{} did not start within 20 s:\n{}", node.forwarder_name, lab.log_tail(&node.forwarder_name, 15));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_registered(lab, node, &node.forwarder_name, Duration::from_secs(20)).await
}

/// Starts an icmp-responder endpoint in its own pod namespace on `node`,
/// serving `service` from `cidr`; waits until it is registered.
pub async fn start_nse(
    lab: &mut Lab,
    node: &Node,
    name: &str,
    service: &str,
    cidr: &str,
    extra: &[(&str, String)],
) -> anyhow::Result<Endpoint> {
    let netns = lab.add_netns(name)?;
    let url = sock(lab, &format!("{name}.sock"))?;
    let mut env = vec![
        ("NSM_NAME", name.to_string()),
        ("NSM_CONNECT_TO", node.nsmgr_url.to_string()),
        ("NSM_LISTEN_ON", url.to_string()),
        ("NSM_SERVICE_NAMES", service.to_string()),
        ("NSM_CIDR_PREFIX", cidr.to_string()),
        ("NSM_LOG_LEVEL", "INFO".to_string()),
    ];
    env.extend(identity::env(lab, node));
    env.extend(extra.iter().cloned());
    lab.spawn(name, &netns, "nse-icmp-responder", &env)?;
    wait_registered(lab, node, name, Duration::from_secs(20)).await?;
    Ok(Endpoint { name: name.to_string(), netns, url, service: service.to_string() })
}

/// Waits until endpoint `name` can be found through `node`'s nsmgr. Fails
/// early (with the process log) if its process died.
pub async fn wait_registered(lab: &mut Lab, node: &Node, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let reg = lab.registry(&node.nsmgr_url, Duration::from_millis(500));
    let t0 = Instant::now();
    loop {
        let ctx = Context::with_timeout(Duration::from_secs(2));
        let q = NetworkServiceEndpoint { name: name.to_string(), ..Default::default() };
        if let Ok(v) = find_nses(&reg, &ctx, q).await
            && v.iter().any(|n| n.name == name)
        {
            return Ok(());
        }
        for d in lab.daemons() {
            if !lab.running(&d) {
                bail!("{d} exited during start-up; its log ends with:\n{}", lab.log_tail(&d, 15));
            }
        }
        if t0.elapsed() > timeout {
            bail!("{name} did not register within {timeout:?}; its log ends with:\n{}", lab.log_tail(name, 15));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `nsc init` in `netns` against `node` for `nsurls`.
pub fn nsc_init(lab: &Lab, node: &Node, netns: &str, nsurls: &str, extra: &[(&str, String)]) -> anyhow::Result<NscRun> {
    let mut env = nsc_env(lab, node, nsurls);
    env.push(("NSM_OUTPUT", "json".to_string()));
    env.extend(extra.iter().cloned());
    let t0 = Instant::now();
    let out = lab.run_once(netns, "nsc", &["init"], &env, Duration::from_secs(60))?;
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let summaries = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    Ok(NscRun {
        ok: out.status.success(),
        code: out.status.code(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        summaries,
        took,
    })
}

/// Connections a component currently reports on MonitorConnections.
pub async fn connections(lab: &Lab, url: &Url) -> anyhow::Result<Vec<Connection>> {
    let ch = lab.dial(url).await?;
    let mut s = MonitorConnectionClient::new(ch)
        .monitor_connections(MonitorScopeSelector::default())
        .await
        .with_context(|| format!("MonitorConnections on {url}"))?
        .into_inner();
    let ev = tokio::time::timeout(Duration::from_secs(3), s.next())
        .await
        .with_context(|| format!("no initial state from {url}"))?
        .with_context(|| format!("{url} ended the monitor stream"))??;
    Ok(ev.connections.into_values().collect())
}

/// Nothing of any connection is left: no interfaces in `pods`, no tunnel
/// devices in the node namespaces (only their `eth0` underlay), and no
/// connection at any node's nsmgr or forwarder (each waited for up to 5 s).
pub async fn assert_clean(lab: &Lab, pods: &[&str], nodes: &[&Node]) {
    for p in pods {
        // A namespace that cannot be listed is not clean.
        let left = || links(lab, p).unwrap_or_else(|e| vec![format!("(ip link failed: {e:#})")]);
        wait_until(Duration::from_secs(5), || left().is_empty(), || format!("{p} still has {:?}", left())).await;
    }
    for n in nodes {
        let extra: Vec<String> = links(lab, &n.netns)
            .unwrap_or_else(|e| panic!("listing {}: {e:#}", n.netns))
            .into_iter()
            .filter(|l| l != "eth0")
            .collect();
        assert!(extra.is_empty(), "tunnel devices left in {}: {extra:?}", n.netns);
        for u in [&n.nsmgr_url, &n.forwarder_url] {
            let what = format!("{u} reports no connection");
            eventually(&what, Duration::from_secs(5), || async { Ok(connections(lab, u).await?.is_empty()) }).await;
        }
    }
}

/// Interface names in `netns` (besides `lo`).
pub fn links(lab: &Lab, netns: &str) -> anyhow::Result<Vec<String>> {
    let out = lab.exec(netns, &["ip", "-o", "link", "show"], Duration::from_secs(5))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n != "lo")
        .collect())
}

/// Pings `dst` from `netns` out of `ifname`; returns ping's output.
pub fn ping(lab: &Lab, netns: &str, ifname: &str, dst: &str, count: u32) -> anyhow::Result<(bool, String)> {
    let c = count.to_string();
    let out =
        lab.exec(netns, &["ping", "-c", &c, "-i", "0.2", "-W", "2", "-I", ifname, dst], Duration::from_secs(30))?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).to_string()))
}

/// Starts `nsc run` in `netns` as daemon `daemon` (a client sidecar that
/// adopts connections of the same `name` and keeps them refreshed).
pub fn spawn_nsc_sidecar(
    lab: &mut Lab,
    daemon: &str,
    node: &Node,
    netns: &str,
    nsurls: &str,
    extra: &[(&str, String)],
) -> anyhow::Result<()> {
    let mut env = nsc_env(lab, node, nsurls);
    env.extend(extra.iter().cloned());
    lab.spawn_args(daemon, netns, "nsc", &["run"], &env)
}

/// The environment of an nsc of `node` asking for `nsurls`: its name `nsc`
/// (an entry `NSM_NAME` later in the list overrides it), the node's nsmgr,
/// and the node's Workload API.
pub fn nsc_env(lab: &Lab, node: &Node, nsurls: &str) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("NSM_NAME", "nsc".to_string()),
        ("NSM_CONNECT_TO", node.nsmgr_url.to_string()),
        ("NSM_NETWORK_SERVICES", nsurls.to_string()),
    ];
    env.extend(identity::env(lab, node));
    env
}

/// A lab for test `test`, with a prefix unique to this process and test so
/// tests run in parallel (namespaces are `<prefix>-<name>`).
pub fn test_lab(test: &str) -> Lab {
    let prefix = format!("t{}{}", std::process::id() % 100000, &test[..test.len().min(6)]);
    #[allow(clippy::expect_used)]
    Lab::new(&prefix, crate::default_bin_dir().expect("workspace binaries")).expect("lab")
}

/// The NSURL of the interface most tests ask for: `nsm-1` to the
/// icmp-responder service of [`single_node`].
pub const ICMP: &str = "kernel://icmp-responder/nsm-1";

/// A registration of endpoint `name` for `service` at `url` (tests that
/// talk to a registry directly).
pub fn nse_record(name: &str, service: &str, url: &str) -> nsm_api::registry::NetworkServiceEndpoint {
    #[allow(clippy::expect_used)]
    let url = parse_url(url).expect("a valid NSM URL");
    nsm_sdk::registry::client::endpoint_record(name, &[service.to_string()], &Default::default(), &url)
}

/// The bed most single-node tests start from: [`test_lab`], one node
/// `node1` started with `opts`, and an icmp-responder endpoint `nse1` with
/// addresses from `cidr`. Panics (a test fixture) when a step fails.
#[allow(clippy::expect_used)]
pub async fn single_node(test: &str, opts: &NodeOpts, cidr: &str) -> (Lab, Node, Endpoint) {
    let mut lab = test_lab(test);
    let node = start_node(&mut lab, "node1", opts).await.expect("node1");
    let nse = start_nse(&mut lab, &node, "nse1", "icmp-responder", cidr, &[]).await.expect("nse1");
    (lab, node, nse)
}

/// The ids of the connections of network service `service` on the
/// forwarders of `nodes` (each forwarder names its own).
pub async fn forwarder_conn_ids(lab: &Lab, nodes: &[&Node], service: &str) -> anyhow::Result<Vec<String>> {
    let mut out = vec![];
    for n in nodes {
        out.extend(
            connections(lab, &n.forwarder_url)
                .await?
                .into_iter()
                .filter(|c| c.network_service == service)
                .map(|c| c.id),
        );
    }
    Ok(out)
}

/// What kind of interface `iface` in `netns` is: `veth`, `vxlan`, `tun`,
/// `wireguard`, ... (from `ip -d link`), with its MTU.
pub fn link_kind(lab: &Lab, netns: &str, iface: &str) -> anyhow::Result<(String, u32)> {
    let out = lab.exec(netns, &["ip", "-d", "-o", "link", "show", iface], Duration::from_secs(5))?;
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("no interface {iface} in {netns}");
    }
    let words: Vec<&str> = s.split_whitespace().collect();
    let mtu =
        words.iter().position(|w| *w == "mtu").and_then(|i| words.get(i + 1)).and_then(|m| m.parse().ok()).unwrap_or(0);
    let kind = ["vxlan", "veth", "tun", "wireguard", "bridge"]
        .into_iter()
        .find(|k| words.contains(k))
        .unwrap_or("other")
        .to_string();
    Ok((kind, mtu))
}

/// Pings `dst` once with DF set and a payload of `size` bytes.
pub fn df_ping(lab: &Lab, netns: &str, iface: &str, dst: &str, size: u32) -> anyhow::Result<bool> {
    let s = size.to_string();
    let out = lab.exec(
        netns,
        &["ping", "-c", "1", "-W", "2", "-M", "do", "-s", &s, "-I", iface, dst],
        Duration::from_secs(10),
    )?;
    Ok(out.status.success())
}

/// The address of an `addr/len` string (as summaries and IP contexts carry
/// them).
pub fn ip_of(cidr: &str) -> String {
    cidr.split('/').next().unwrap_or_default().to_string()
}

/// Polls `cond` every 50 ms until it holds; after `timeout` panics with
/// `why()`, evaluated then, so it can show the state and the daemons' logs
/// at that moment. For tests.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool, why: impl FnOnce() -> String) {
    let t0 = std::time::Instant::now();
    while !cond() {
        if t0.elapsed() > timeout {
            panic!("not within {timeout:?}: {}", why());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`wait_until`] for a condition that is awaited (a gRPC query): an error
/// counts as "not yet" and is shown if time runs out.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let t0 = std::time::Instant::now();
    let mut last = String::new();
    while t0.elapsed() < timeout {
        match f().await {
            Ok(true) => return,
            Ok(false) => last = "condition false".into(),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not true within {timeout:?} ({last})");
}
