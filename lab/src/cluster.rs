//! Multi-node, multi-cluster topologies: a router namespace, one underlay
//! switch (a Linux bridge in its own namespace) per cluster, and node
//! namespaces plugged into it with `eth0` (MTU 1500).
//!
//! Cluster `i` (1-based) uses `10.<i>.0.0/24`: node `j` is `10.<i>.0.<j>`,
//! the router is `10.<i>.0.254`, and every node routes the other clusters
//! through it. Node 1 of each cluster runs the cluster's registry
//! (`tcp://10.<i>.0.1:5002`, domain `my.cluster<i>`), which knows the
//! other clusters' registries. Every node runs an nsmgr on
//! `tcp://10.<i>.0.<j>:5001` and a forwarder with `NSM_TUNNEL_IP` set to the
//! node address: the same configuration as in Kubernetes.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::env::Lab;
use crate::mesh::{self, Node, NodeOpts, NodeSpec, RegistryAt};

/// A running cluster.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub index: u8,
    pub name: String,
    pub domain: String,
    pub nodes: Vec<Node>,
}

/// A running topology.
#[derive(Clone, Debug)]
pub struct Topology {
    pub router: String,
    pub clusters: Vec<Cluster>,
}

impl Topology {
    /// Node `j` (1-based) of cluster `i` (1-based).
    pub fn node(&self, i: usize, j: usize) -> &Node {
        &self.clusters[i - 1].nodes[j - 1]
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The underlay address of node `j` in cluster `i`.
pub fn node_ip(i: u8, j: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, i, 0, j)
}

/// The domain of cluster `i`.
pub fn domain(i: u8) -> String {
    format!("my.cluster{i}")
}

/// Builds `clusters` clusters of `nodes` nodes each and starts every daemon.
pub async fn build(lab: &mut Lab, clusters: u8, nodes: u8, opts: &NodeOpts) -> anyhow::Result<Topology> {
    if clusters == 0 || nodes == 0 || clusters > 9 || nodes > 9 {
        bail!("a lab topology has 1-9 clusters of 1-9 nodes");
    }
    if !opts.insecure {
        crate::identity::ensure(lab, clusters, opts.identity, &opts.svid_ttl).await?;
    }
    let router = lab.add_netns("router")?;
    lab.exec(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"], Duration::from_secs(5))?;
    // Plumbing first, so every nsmgr can reach every registry at start.
    for i in 1..=clusters {
        let sw = lab.add_netns(&format!("c{i}-sw"))?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        let r_if = format!("r-c{i}");
        ip(&["link", "add", &r_if, "netns", &router, "type", "veth", "peer", "name", "uplink", "netns", &sw])?;
        ip(&["-n", &sw, "link", "set", "uplink", "master", "br0", "up"])?;
        ip(&["-n", &router, "addr", "add", &format!("10.{i}.0.254/24"), "dev", &r_if])?;
        ip(&["-n", &router, "link", "set", &r_if, "up"])?;
        for j in 1..=nodes {
            let ns = lab.add_netns(&format!("c{i}n{j}"))?;
            let port = format!("n{j}");
            ip(&["link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &sw])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", node_ip(i, j)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", &format!("10.{i}.0.254")])?;
        }
    }
    let mut out = Topology { router, clusters: vec![] };
    for i in 1..=clusters {
        let registry = mesh_url(&format!("tcp://{}:5002", node_ip(i, 1)))?;
        let others: Vec<String> =
            (1..=clusters).filter(|o| *o != i).map(|o| format!("{}=tcp://{}:5002", domain(o), node_ip(o, 1))).collect();
        let mut c = Cluster { index: i, name: format!("cluster{i}"), domain: domain(i), nodes: vec![] };
        for j in 1..=nodes {
            let spec = NodeSpec {
                name: format!("c{i}n{j}"),
                ip: Some(IpAddr::V4(node_ip(i, j))),
                registry: if j == 1 {
                    RegistryAt::Here { listen: registry.clone(), domains: others.join(",") }
                } else {
                    RegistryAt::There(registry.clone())
                },
                domain: domain(i),
                cluster: c.name.clone(),
            };
            let ns = format!("{}-c{i}n{j}", lab.prefix());
            c.nodes.push(mesh::start_node_in(lab, &ns, &spec, opts).await?);
        }
        out.clusters.push(c);
    }
    Ok(out)
}

/// The bed of cross-node tests: [`crate::mesh::test_lab`] and one cluster
/// of two nodes started with `opts`. Panics (a test fixture) on failure.
#[allow(clippy::expect_used)]
pub async fn two_nodes(test: &str, opts: &NodeOpts) -> (Lab, Node, Node) {
    let mut lab = mesh::test_lab(test);
    let topo = build(&mut lab, 1, 2, opts).await.expect("two nodes");
    let (n1, n2) = (topo.node(1, 1).clone(), topo.node(1, 2).clone());
    (lab, n1, n2)
}

fn mesh_url(s: &str) -> anyhow::Result<url::Url> {
    Ok(nsm_sdk::tools::grpc::parse_url(s)?)
}
