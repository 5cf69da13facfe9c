//! The scenario `nsm-lab run` shows: one node, an icmp-responder endpoint
//! and a client pod; the client requests `kernel://icmp-responder/nsm-1`,
//! gets a veth wire, and pings the endpoint over it (and back).

use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::env::Lab;
use crate::mesh::{self, NodeOpts};

/// Options of the demo.
#[derive(Clone, Debug)]
pub struct DemoOpts {
    /// Leave everything running afterwards (a client sidecar keeps the
    /// connection refreshed).
    pub keep: bool,
    /// Address pool of the endpoint.
    pub cidr: String,
    /// Log level of the daemons.
    pub log_level: String,
}

fn step(n: usize, total: usize, what: &str) {
    crate::say_part!("[{n}/{total}] {what} ... ");
}

/// Runs the demo in `lab`.
pub async fn run(lab: &mut Lab, opts: &DemoOpts) -> anyhow::Result<()> {
    let total = 5;
    let p = lab.prefix().to_string();

    step(1, total, &format!("node {p}-node1: registry, nsmgr, forwarder"));
    let t0 = Instant::now();
    let node_opts = NodeOpts { log_level: opts.log_level.clone(), ..Default::default() };
    let node = mesh::start_node(lab, "node1", &node_opts).await?;
    crate::say!("up ({} ms)", t0.elapsed().as_millis());

    step(2, total, &format!("endpoint pod {p}-icmp-responder-1: serving icmp-responder from {}", opts.cidr));
    let t0 = Instant::now();
    let nse = mesh::start_nse(lab, &node, "icmp-responder-1", "icmp-responder", &opts.cidr, &[]).await?;
    crate::say!("registered ({} ms)", t0.elapsed().as_millis());

    step(3, total, &format!("client pod {p}-nsc1: nsc init kernel://icmp-responder/nsm-1"));
    let client_ns = lab.add_netns("nsc1")?;
    let run = mesh::nsc_init(lab, &node, &client_ns, "nsc", "kernel://icmp-responder/nsm-1", &[])?;
    if !run.ok {
        crate::say!("FAILED");
        bail!(
            "nsc init failed: {}\nnsmgr log:\n{}\nforwarder log:\n{}",
            run.stderr.trim(),
            lab.log_tail(&node.nsmgr_name, 10),
            lab.log_tail(&node.forwarder_name, 10)
        );
    }
    let s = run.summaries.first().context("nsc printed no summary")?.clone();
    crate::say!("connected ({:.1} ms)", s.setup_ms);

    let nse_ip = s.dst_ips.first().context("no endpoint address")?.split('/').next().unwrap_or_default().to_string();
    let nsc_ip = s.src_ips.first().context("no client address")?.split('/').next().unwrap_or_default().to_string();
    let nse_if = mesh::links(lab, &nse.netns)?.into_iter().next().unwrap_or_else(|| "?".into());

    step(4, total, &format!("ping {nse_ip} from the client over {}", s.interface));
    let (ok, out) = mesh::ping(lab, &client_ns, &s.interface, &nse_ip, 3)?;
    if !ok {
        crate::say!("FAILED");
        bail!("ping over {} failed:\n{out}", s.interface);
    }
    crate::say!("{}", ping_line(&out));

    step(5, total, &format!("ping {nsc_ip} back from the endpoint over {nse_if}"));
    let (ok, out) = mesh::ping(lab, &nse.netns, &nse_if, &nsc_ip, 3)?;
    if !ok {
        crate::say!("FAILED");
        bail!("ping back over {nse_if} failed:\n{out}");
    }
    crate::say!("{}", ping_line(&out));

    crate::say!();
    crate::say!("Connection");
    crate::say!("  id          {}", s.id);
    crate::say!("  service     {} (endpoint {})", s.network_service, s.nse);
    crate::say!("  path        {}", s.path.join(" > "));
    crate::say!("  client      {:<16} in {:<18} {}", s.interface, client_ns, s.src_ips.join(", "));
    crate::say!("  endpoint    {:<16} in {:<18} {}", nse_if, nse.netns, s.dst_ips.join(", "));
    crate::say!("  wire        veth pair created in place in both pod namespaces (no forwarder hop on the data path)");
    crate::say!(
        "  setup time  {:.1} ms (Request through nsmgr, forwarder, endpoint; nsc wall time {} ms)",
        s.setup_ms,
        run.took.as_millis()
    );

    if opts.keep {
        // A sidecar adopts the init container's connection and keeps it
        // refreshed, as in a Kubernetes pod.
        mesh::spawn_nsc_sidecar(
            lab,
            "nsc1-sidecar",
            &node,
            &client_ns,
            "nsc",
            "kernel://icmp-responder/nsm-1",
            &[("NSM_LOG_LEVEL", opts.log_level.clone())],
        )?;
        crate::say!();
        crate::say!("The lab stays up (a client sidecar keeps the connection refreshed). Try:");
        crate::say!("  ip netns exec {client_ns} ping {nse_ip}");
        crate::say!("  ip netns exec {client_ns} ip addr show {}", s.interface);
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
