//! The scenario `nsm-lab run` shows: two emulated clusters of two nodes
//! each, joined by a router; endpoints on the client's node, on another
//! node, and in the other cluster; one client pod that requests all of
//! them and pings each endpoint over its own interface.
//!
//! | interface | service | where the endpoint is | wire |
//! |---|---|---|---|
//! | nsm-1 | `icmp-local` | same node | veth pair |
//! | nsm-2 | `icmp-xnode` (ETHERNET) | other node, same cluster | VXLAN |
//! | nsm-3 | `secure-ip@my.cluster2` (IP) | other cluster | WireGuard |
//! | nsm-4 | `l2-eth@my.cluster2` (ETHERNET) | other cluster | VXLAN |

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::cluster::{self, Topology};
use crate::env::Lab;
use crate::mesh::{self, NodeOpts, NscSummary};

/// Options of the demo.
#[derive(Clone, Debug)]
pub struct DemoOpts {
    /// Leave everything running afterwards (a client sidecar keeps the
    /// connections refreshed).
    pub keep: bool,
    /// Log level of the daemons.
    pub log_level: String,
    /// Who issues the SVIDs: `nsm-spiffe-dev` (default) or real SPIRE.
    pub identity: crate::identity::Provider,
}

fn step(n: usize, total: usize, what: &str) {
    crate::say_part!("[{n}/{total}] {what} ... ");
}

/// Who issued the SVIDs, as the demo reports it.
fn issuer(p: crate::identity::Provider) -> String {
    match p {
        crate::identity::Provider::Dev => "nsm-spiffe-dev".to_string(),
        crate::identity::Provider::Spire => match crate::identity::spire::version() {
            Ok(v) => format!("SPIRE {v} (a server per trust domain, an agent per node)"),
            Err(_) => "SPIRE".to_string(),
        },
    }
}

/// One endpoint of the demo.
struct Svc {
    service: &'static str,
    nse: &'static str,
    cluster: usize,
    node: usize,
    payload: &'static str,
    cidr: &'static str,
    nsurl: &'static str,
    iface: &'static str,
}

const SERVICES: &[Svc] = &[
    Svc {
        service: "icmp-local",
        nse: "nse-local",
        cluster: 1,
        node: 1,
        payload: "ETHERNET",
        cidr: "172.16.1.0/31",
        nsurl: "kernel://icmp-local/nsm-1",
        iface: "nsm-1",
    },
    Svc {
        service: "icmp-xnode",
        nse: "nse-xnode",
        cluster: 1,
        node: 2,
        payload: "ETHERNET",
        cidr: "172.16.2.0/31",
        nsurl: "kernel://icmp-xnode/nsm-2",
        iface: "nsm-2",
    },
    Svc {
        service: "secure-ip",
        nse: "nse-secure",
        cluster: 2,
        node: 2,
        payload: "IP",
        cidr: "172.16.3.0/31",
        nsurl: "kernel://secure-ip@my.cluster2/nsm-3",
        iface: "nsm-3",
    },
    Svc {
        service: "l2-eth",
        nse: "nse-l2",
        cluster: 2,
        node: 1,
        payload: "ETHERNET",
        cidr: "172.16.4.0/31",
        nsurl: "kernel://l2-eth@my.cluster2/nsm-4",
        iface: "nsm-4",
    },
];

/// What the pod's interface is, read from the kernel (`ip -d link`).
fn wire_of(lab: &Lab, netns: &str, iface: &str) -> String {
    let out = lab.exec(netns, &["ip", "-d", "-o", "link", "show", iface], Duration::from_secs(5));
    let s = out.map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
    let mtu = s.split_whitespace().skip_while(|w| *w != "mtu").nth(1).unwrap_or("?").to_string();
    let words: Vec<&str> = s.split_whitespace().collect();
    let after = |k: &str| words.iter().position(|w| *w == k).and_then(|i| words.get(i + 1)).copied().unwrap_or("?");
    let kind = if s.contains(" vxlan id ") {
        format!("VXLAN vni {} {} -> {}", after("id"), after("local"), after("remote"))
    } else if s.contains(" tun ") {
        "WireGuard (userspace, TUN)".to_string()
    } else if s.contains(" wireguard ") {
        "WireGuard (kernel)".to_string()
    } else if s.contains(" veth ") {
        "veth pair".to_string()
    } else {
        "?".to_string()
    };
    format!("{kind}, mtu {mtu}")
}

/// Runs the demo in `lab`.
pub async fn run(lab: &mut Lab, opts: &DemoOpts) -> anyhow::Result<()> {
    let total = 4 + SERVICES.len();
    let p = lab.prefix().to_string();

    step(1, total, "2 clusters x 2 nodes and a router (underlay 10.1.0.0/24, 10.2.0.0/24): registry, nsmgr, forwarder");
    let t0 = Instant::now();
    let node_opts = NodeOpts { log_level: opts.log_level.clone(), identity: opts.identity, ..Default::default() };
    let topo: Topology = cluster::build(lab, 2, 2, &node_opts).await?;
    crate::say!("up ({} ms)", t0.elapsed().as_millis());

    step(2, total, "endpoints on c1n1, c1n2, c2n1, c2n2");
    let t0 = Instant::now();
    let mut endpoints = vec![];
    for s in SERVICES {
        let node = topo.node(s.cluster, s.node).clone();
        let e =
            mesh::start_nse(lab, &node, s.nse, s.service, s.cidr, &[("NSM_PAYLOAD", s.payload.to_string())]).await?;
        endpoints.push(e);
    }
    crate::say!("registered ({} ms)", t0.elapsed().as_millis());

    let client_node = topo.node(1, 1).clone();
    let nsurls: Vec<&str> = SERVICES.iter().map(|s| s.nsurl).collect();
    step(3, total, &format!("client pod {p}-nsc1 on c1n1: nsc init with {} services", SERVICES.len()));
    let client_ns = lab.add_netns("nsc1")?;
    let run = mesh::nsc_init(lab, &client_node, &client_ns, &nsurls.join(","), &[])?;
    if !run.ok {
        crate::say!("FAILED");
        bail!(
            "nsc init failed: {}\nforwarder c1n1 log:\n{}",
            run.stderr.trim(),
            lab.log_tail(&client_node.forwarder_name, 15)
        );
    }
    crate::say!("{} connections in {} ms", run.summaries.len(), run.took.as_millis());

    let mut rows = vec![];
    for (i, svc) in SERVICES.iter().enumerate() {
        let s: &NscSummary = run
            .summaries
            .iter()
            .find(|s| s.interface == svc.iface)
            .with_context(|| format!("no summary for {}", svc.iface))?;
        let dst = s.dst_ips.first().context("no endpoint address")?.split('/').next().unwrap_or_default().to_string();
        step(4 + i, total, &format!("ping {dst} ({}) over {}", s.network_service, svc.iface));
        let (ok, out) = mesh::ping(lab, &client_ns, svc.iface, &dst, 3)?;
        if !ok {
            crate::say!("FAILED");
            bail!("ping over {} failed:\n{out}", svc.iface);
        }
        crate::say!("{}", ping_line(&out));
        rows.push((s.clone(), wire_of(lab, &client_ns, svc.iface)));
    }

    let (ok, out) = {
        let e = &endpoints[2];
        let nse_if = mesh::links(lab, &e.netns)?.into_iter().next().unwrap_or_default();
        let back = rows[2].0.src_ips.first().cloned().unwrap_or_default();
        let back = back.split('/').next().unwrap_or_default().to_string();
        step(4 + SERVICES.len(), total, &format!("ping {back} back from the endpoint in cluster 2 over {nse_if}"));
        mesh::ping(lab, &e.netns, &nse_if, &back, 3)?
    };
    if !ok {
        crate::say!("FAILED");
        bail!("ping back over WireGuard failed:\n{out}");
    }
    crate::say!("{}", ping_line(&out));

    crate::say!();
    crate::say!("Connections of client pod {client_ns} (node c1n1, cluster my.cluster1)");
    for (s, wire) in &rows {
        crate::say!("  {}  {}", s.interface, s.network_service);
        crate::say!("         endpoint  {}", s.nse);
        crate::say!("         path      {}", s.path.join(" > "));
        crate::say!("         wire      {wire}");
        crate::say!("         address   {} -> {}", s.src_ips.join(", "), s.dst_ips.join(", "));
        crate::say!("         setup     {:.1} ms", s.setup_ms);
    }
    if lab.tls().is_some() {
        // The cross-cluster WireGuard connection: whose token each hop sent.
        let (s, _) = &rows[2];
        crate::say!();
        crate::say!(
            "Identities along {} ({}): mutual TLS on every hop, SVIDs from {}, trust domains {} and {} (federated); each hop's token is ES256-signed with its SVID and checked by the next hop's policies",
            s.interface,
            s.network_service,
            issuer(opts.identity),
            crate::identity::trust_domain(1),
            crate::identity::trust_domain(2)
        );
        for (name, id) in s.path.iter().zip(&s.spiffe_ids) {
            crate::say!("  {name:<16} {id}");
        }
    } else {
        crate::say!();
        crate::say!("Identities: none (plaintext lab, NSM_INSECURE=true)");
    }
    if let Ok(o) = lab.exec(&client_node.netns, &["wg", "show", "all", "endpoints"], Duration::from_secs(5))
        && o.status.success()
    {
        crate::say!();
        crate::say!("WireGuard devices (wg show all endpoints; UAPI sockets in /var/run/wireguard):");
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            crate::say!("  {l}");
        }
    }

    if opts.keep {
        // A sidecar adopts the init container's connections and keeps them
        // refreshed, as in a Kubernetes pod.
        mesh::spawn_nsc_sidecar(
            lab,
            "nsc1-sidecar",
            &client_node,
            &client_ns,
            &nsurls.join(","),
            &[("NSM_LOG_LEVEL", opts.log_level.clone())],
        )?;
        crate::say!();
        crate::say!("The lab stays up (a client sidecar keeps the connections refreshed). Try:");
        crate::say!("  ip netns exec {client_ns} ip -d addr");
        crate::say!("  ip netns exec {client_ns} ping 172.16.3.0");
        crate::say!("  wg show");
        crate::say!("  logs: {}/*.log", lab.dir().display());
        crate::say!(
            "Remove it with: nsm-lab down{}",
            if p == "nsmlab" { String::new() } else { format!(" --prefix {p}") }
        );
    }
    Ok(())
}

fn ping_line(out: &str) -> String {
    let rx = out.lines().find(|l| l.contains("packets transmitted")).unwrap_or("").trim().to_string();
    let rtt = out.lines().find(|l| l.starts_with("rtt")).and_then(|l| l.split('=').nth(1)).unwrap_or("").trim();
    if rtt.is_empty() { rx } else { format!("{rx}; rtt min/avg/max/mdev {rtt}") }
}
