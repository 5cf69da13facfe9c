//! `nsm-lab bench`: throughput and setup latency, measured in one run on
//! this machine, reported as ratios to baselines measured in the same run.
//!
//! Throughput (iperf3, one TCP stream, 10 s by default):
//! - (a) a plain veth pair between two fresh namespaces: the ceiling;
//! - the lab underlay between two node namespaces (veth + bridge), which
//!   every tunnel below rides on;
//! - (b) our VXLAN wire, client pod on node 1 to endpoint pod on node 2;
//! - (c) our userspace WireGuard wire, same pods;
//! - (d) wireguard-go (Debian package) between the two node namespaces,
//!   configured with `wg`: the userspace yardstick.
//!
//! CPU per Gbit is the utime+stime of the processes doing the tunnel work
//! (both forwarders for (c), both wireguard-go processes for (d)) over the
//! run, from `/proc/<pid>/stat`. Kernel VXLAN and veth work happens in
//! softirq context and is not charged to a process: shown as "kernel".
//!
//! Setup latency: a bench client in a pod namespace sends N Requests
//! through the real nsmgr (sequentially, then all at once) and reports the
//! round-trip time of each; the interface exists with its addresses when a
//! Request returns.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nsm_sdk::networkservice::authorize::AuthorizeClient;
use nsm_sdk::networkservice::connect::GrpcClient;
use nsm_sdk::networkservice::updatepath::UpdatePath;
use nsm_sdk::networkservice::{Chain, Context};
use nsm_sdk::security::tls::Tls;
use nsm_sdk::tools::daemon::Security;
use nsm_sdk::tools::grpc::parse_url;
use nsm_sdk::tools::nsurl::NsUrl;
use nsm_sdk::tools::token::JwtTokens;
use serde::{Deserialize, Serialize};

use crate::cluster;
use crate::env::{Lab, output_with_timeout};
use crate::mesh::{self, NodeOpts};

/// Options of the bench.
#[derive(Clone, Debug)]
pub struct BenchOpts {
    /// iperf3 duration per throughput row.
    pub seconds: u32,
    /// Connections per setup-latency row.
    pub connections: usize,
    /// Write the report (Markdown) here as well.
    pub output: Option<std::path::PathBuf>,
    /// Plaintext mesh (no mTLS, tokens or policies).
    pub insecure: bool,
}

/// What the bench client reports.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClientReport {
    pub latencies_ms: Vec<f64>,
    pub wall_ms: f64,
    pub errors: Vec<String>,
}

/// The bench client: `count` Requests for `service` with up to
/// `concurrency` in flight, then Close of all of them. Runs inside the pod
/// namespace (`nsm-lab bench-client`), with mTLS, tokens and client
/// policies like `nsc` when `SPIFFE_ENDPOINT_SOCKET` is set.
pub async fn client(connect_to: &str, service: &str, count: usize, concurrency: usize) -> anyhow::Result<ClientReport> {
    let url = parse_url(connect_to)?;
    let life = Duration::from_secs(600);
    let sec = match std::env::var("SPIFFE_ENDPOINT_SOCKET") {
        Ok(sock) => {
            let tls = Tls::from_workload_api(&sock, Duration::from_secs(10)).await?;
            Security { tokens: JwtTokens::new(tls.clone(), life), tls: Some(tls), ..Security::insecure(life) }
        }
        Err(_) => Security::insecure(life),
    };
    let chain = Chain::new(vec![
        UpdatePath::new("bench"),
        Arc::new(nsm_sdk::networkservice::kernel::KernelClient),
        AuthorizeClient::new(sec.client.clone()),
        GrpcClient::new(sec.pool(Duration::from_secs(5)), sec.tokens.clone()),
    ]);
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let t0 = Instant::now();
    let mut tasks = vec![];
    for i in 0..count {
        let (chain, url, sem) = (chain.clone(), url.clone(), sem.clone());
        let nsurl: NsUrl = format!("kernel://{service}/b{i}").parse()?;
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let req = nsurl.to_request(&format!("bench-{i}"));
            let mut ctx = Context::with_timeout(Duration::from_secs(60));
            ctx.client_url = Some(url);
            let t = Instant::now();
            let r = chain.request(&mut ctx, req).await;
            (t.elapsed(), r)
        }));
    }
    let mut rep = ClientReport { latencies_ms: vec![], wall_ms: 0.0, errors: vec![] };
    let mut conns = vec![];
    for t in tasks {
        match t.await? {
            (d, Ok(c)) => {
                rep.latencies_ms.push(d.as_secs_f64() * 1000.0);
                conns.push(c);
            }
            (_, Err(e)) => rep.errors.push(e.message().to_string()),
        }
    }
    rep.wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    // Close everything (bounded concurrency), so the next row starts clean.
    let mut closes = vec![];
    for c in conns {
        let (chain, url, sem) = (chain.clone(), url.clone(), sem.clone());
        closes.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let mut ctx = Context::with_timeout(Duration::from_secs(30));
            ctx.client_url = Some(url);
            chain.close(&mut ctx, c).await
        }));
    }
    for c in closes {
        if let Err(e) = c.await? {
            rep.errors.push(format!("close: {}", e.message()));
        }
    }
    Ok(rep)
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let i = ((p / 100.0) * (s.len() as f64 - 1.0)).round() as usize;
    s[i.min(s.len() - 1)]
}

/// utime+stime of `pids` in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // Clock ticks per second: 100 on every Linux this runs on; read it
    // rather than assume.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // Fields 14 and 15 of stat (1-based) are utime and stime; `rest`
            // starts at field 3.
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / hz
}

struct Iperf {
    bps: f64,
    retransmits: u64,
}

fn iperf(lab: &Lab, server_ns: &str, client_ns: &str, dst: &str, seconds: u32) -> anyhow::Result<Iperf> {
    let mut srv = Command::new("ip")
        .args(["netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5299"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (install iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let t = seconds.to_string();
    let out = lab.exec(
        client_ns,
        &["iperf3", "-c", dst, "-p", "5299", "-t", &t, "-J"],
        Duration::from_secs(u64::from(seconds) + 30),
    );
    let _ = srv.kill();
    let _ = srv.wait();
    let out = out?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 to {dst}: {e}");
    }
    let end = &v["end"];
    Ok(Iperf {
        bps: end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0),
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// One throughput row.
struct Row {
    name: String,
    gbps: f64,
    retransmits: u64,
    cpu_per_gbit: Option<f64>,
}

fn throughput(
    lab: &Lab,
    name: &str,
    server_ns: &str,
    client_ns: &str,
    dst: &str,
    secs: u32,
    pids: &[u32],
) -> anyhow::Result<Row> {
    crate::say_part!("  {name} ... ");
    let c0 = cpu_seconds(pids);
    let r = iperf(lab, server_ns, client_ns, dst, secs)?;
    let cpu = cpu_seconds(pids) - c0;
    let gbit = r.bps * f64::from(secs) / 1e9;
    let row = Row {
        name: name.to_string(),
        gbps: r.bps / 1e9,
        retransmits: r.retransmits,
        cpu_per_gbit: (!pids.is_empty() && gbit > 0.0).then(|| cpu / gbit),
    };
    crate::say!("{:.2} Gbit/s", row.gbps);
    Ok(row)
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// wireguard-go between two namespaces (10.99.0.1 <-> 10.99.0.2), MTU as
/// ours; returns the two processes.
fn wireguard_go(lab: &Lab, a: (&str, &str), b: (&str, &str), mtu: u32) -> anyhow::Result<Vec<Child>> {
    let dir = lab.dir().join("wggo");
    std::fs::create_dir_all(&dir)?;
    let mut keys = vec![];
    for n in ["a", "b"] {
        let k = Command::new("wg").arg("genkey").output().context("wg genkey (install wireguard-tools)")?;
        let p = dir.join(format!("{n}.key"));
        std::fs::write(&p, &k.stdout)?;
        let mut pubk = Command::new("wg").arg("pubkey").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        use std::io::Write as _;
        pubk.stdin.take().context("stdin")?.write_all(&k.stdout)?;
        let pubk = String::from_utf8(pubk.wait_with_output()?.stdout)?.trim().to_string();
        keys.push((p, pubk));
    }
    let mut procs = vec![];
    for (i, ((ns, underlay), peer_underlay)) in [(a, b.1), (b, a.1)].into_iter().enumerate() {
        let ifn = format!("wgb{i}");
        let sock = format!("/var/run/wireguard/{ifn}.sock");
        // A socket file left by an earlier run would look ready at once.
        let _ = std::fs::remove_file(&sock);
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", &ifn])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting wireguard-go (install wireguard-go)")?;
        procs.push(child);
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if t0.elapsed() > Duration::from_secs(5) {
                bail!("wireguard-go {ifn} did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (mine, peer) = (&keys[i], &keys[1 - i]);
        let _ = underlay;
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "wg",
            "set",
            &ifn,
            "private-key",
            &mine.0.to_string_lossy(),
            "listen-port",
            "51900",
            "peer",
            &peer.1,
            "endpoint",
            &format!("{peer_underlay}:51900"),
            "allowed-ips",
            &format!("10.99.0.{}/32", 2 - i),
        ])?;
        sh(&["ip", "-n", ns, "addr", "add", &format!("10.99.0.{}/32", i + 1), "dev", &ifn])?;
        sh(&["ip", "-n", ns, "link", "set", &ifn, "mtu", &mtu.to_string(), "up"])?;
        sh(&["ip", "-n", ns, "route", "add", &format!("10.99.0.{}/32", 2 - i), "dev", &ifn])?;
    }
    Ok(procs)
}

struct Setup {
    name: String,
    mode: &'static str,
    rep: ClientReport,
}

fn setup_row(
    lab: &Lab,
    pod: &str,
    node: &mesh::Node,
    service: &str,
    n: usize,
    concurrency: usize,
    name: &str,
) -> anyhow::Result<Setup> {
    crate::say_part!("  {name}, {} ... ", if concurrency > 1 { "concurrent" } else { "sequential" });
    let mut cmd = Command::new("ip");
    cmd.envs(crate::identity::env(lab, node))
        .args(["netns", "exec", pod])
        .arg(lab.bin("nsm-lab"))
        .args(["bench-client", "--connect-to", node.nsmgr_url.as_str(), "--service", service])
        .args(["--count", &n.to_string(), "--concurrency", &concurrency.to_string()]);
    let out = output_with_timeout(cmd, Duration::from_secs(600))?;
    if !out.status.success() {
        bail!("bench client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rep: ClientReport = serde_json::from_slice(&out.stdout).context("bench client output")?;
    crate::say!(
        "p50 {:.1} ms, p99 {:.1} ms{}",
        pct(&rep.latencies_ms, 50.0),
        pct(&rep.latencies_ms, 99.0),
        if rep.errors.is_empty() { String::new() } else { format!(", {} errors: {}", rep.errors.len(), rep.errors[0]) }
    );
    Ok(Setup { name: name.to_string(), mode: if concurrency > 1 { "concurrent" } else { "sequential" }, rep })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0) / 1024 / 1024)
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    format!("{cpu}, {cores} cores, {mem} GiB, Linux {kernel}")
}

/// Runs the bench in `lab` and prints (and optionally writes) the report.
pub async fn run(lab: &mut Lab, opts: &BenchOpts) -> anyhow::Result<()> {
    for (tool, pkg) in [("iperf3", "iperf3"), ("wireguard-go", "wireguard-go"), ("wg", "wireguard-tools")] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("`{tool}` is not installed (Debian package {pkg})");
        }
    }
    let profile = if lab.bin("nsm-lab").to_string_lossy().contains("/release/") { "release" } else { "debug" };
    crate::say!("nsm-lab bench ({profile} build) on {}", machine());
    let node_opts = NodeOpts { log_level: "WARN".into(), insecure: opts.insecure, ..Default::default() };
    let topo = cluster::build(lab, 1, 2, &node_opts).await?;
    let (n1, n2) = (topo.node(1, 1).clone(), topo.node(1, 2).clone());
    let mut nses = vec![];
    for (node, name, service, cidr, payload) in [
        (&n1, "nse-local", "bench-local", "10.200.0.0/21", "ETHERNET"),
        (&n2, "nse-eth", "bench-eth", "10.201.0.0/21", "ETHERNET"),
        (&n2, "nse-ip", "bench-ip", "10.202.0.0/21", "IP"),
    ] {
        let env = [("NSM_PAYLOAD", payload.to_string()), ("NSM_LOG_LEVEL", "WARN".into())];
        nses.push(mesh::start_nse(lab, node, name, service, cidr, &env).await?);
    }
    let (eth, ipn) = (nses[1].clone(), nses[2].clone());

    // Throughput (skipped with --seconds 0).
    let mut rows = vec![];
    if opts.seconds > 0 {
        crate::say!("throughput (iperf3, 1 TCP stream, {} s each):", opts.seconds);
        let (va, vb) = (lab.add_netns("veth-a")?, lab.add_netns("veth-b")?);
        sh(&["ip", "link", "add", "v0", "netns", &va, "type", "veth", "peer", "name", "v1", "netns", &vb])?;
        sh(&["ip", "-n", &va, "addr", "add", "10.98.0.1/24", "dev", "v0"])?;
        sh(&["ip", "-n", &vb, "addr", "add", "10.98.0.2/24", "dev", "v1"])?;
        sh(&["ip", "-n", &va, "link", "set", "v0", "up"])?;
        sh(&["ip", "-n", &vb, "link", "set", "v1", "up"])?;
        let pod = lab.add_netns("pod")?;
        let r = mesh::nsc_init(lab, &n1, &pod, "kernel://bench-eth/nsm-1,kernel://bench-ip/nsm-2", &[])?;
        if !r.ok {
            bail!("nsc init failed: {}", r.stderr);
        }
        let dst = |i: usize| r.summaries[i].dst_ips[0].split('/').next().unwrap_or_default().to_string();
        let fwd_pids: Vec<u32> = [&n1.forwarder_name, &n2.forwarder_name].iter().filter_map(|n| lab.pid(n)).collect();
        let mtu = mesh::link_kind(lab, &pod, "nsm-2")?.1;
        rows.push(throughput(lab, "(a) veth pair between two namespaces", &vb, &va, "10.98.0.2", opts.seconds, &[])?);
        rows.push(throughput(
            lab,
            "lab underlay, node to node (veth + bridge)",
            &n2.netns,
            &n1.netns,
            "10.1.0.2",
            opts.seconds,
            &[],
        )?);
        rows.push(throughput(
            lab,
            "(b) nsm VXLAN wire, pod to pod across nodes",
            &eth.netns,
            &pod,
            &dst(0),
            opts.seconds,
            &[],
        )?);
        rows.push(throughput(
            lab,
            "(c) nsm userspace WireGuard wire, pod to pod",
            &ipn.netns,
            &pod,
            &dst(1),
            opts.seconds,
            &fwd_pids,
        )?);
        let mut wg = wireguard_go(lab, (&n1.netns, "10.1.0.1"), (&n2.netns, "10.1.0.2"), mtu)?;
        let wg_pids: Vec<u32> = wg.iter().map(|c| c.id()).collect();
        let res = throughput(
            lab,
            "(d) wireguard-go, node to node",
            &n2.netns,
            &n1.netns,
            "10.99.0.2",
            opts.seconds,
            &wg_pids,
        );
        for c in &mut wg {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 0..2 {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/wgb{i}.sock"));
        }
        rows.push(res?);
    }

    // Setup latency.
    crate::say!(
        "connection setup ({} connections per row, Request round trip as the client sees it):",
        opts.connections
    );
    let bench_pod = lab.add_netns("benchpod")?;
    let n = opts.connections;
    let mut setups = vec![];
    for (svc, name) in
        [("bench-local", "local (veth)"), ("bench-eth", "cross-node (VXLAN)"), ("bench-ip", "cross-node (WireGuard)")]
    {
        setups.push(setup_row(lab, &bench_pod, &n1, svc, n, 1, name)?);
        setups.push(setup_row(lab, &bench_pod, &n1, svc, n, n, name)?);
    }

    let report = render(&rows, &setups, profile, opts);
    crate::say!();
    crate::say!("{report}");
    if let Some(p) = &opts.output {
        std::fs::write(p, &report).with_context(|| format!("writing {}", p.display()))?;
        crate::say!("report written to {}", p.display());
    }
    Ok(())
}

fn render(rows: &[Row], setups: &[Setup], profile: &str, opts: &BenchOpts) -> String {
    let veth = rows.first().map(|r| r.gbps).unwrap_or(f64::NAN);
    let wggo = rows.iter().find(|r| r.name.starts_with("(d)")).map(|r| r.gbps).unwrap_or(f64::NAN);
    let mut s = String::new();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    s.push_str(&format!("Measured {date} on {} ({profile} build), one run of `nsm-lab bench`.\n\n", machine()));
    s.push_str(&format!("Throughput: iperf3, one TCP stream, {} s per row.\n\n", opts.seconds));
    s.push_str("| path | Gbit/s | × veth (a) | × wireguard-go (d) | retransmits | tunnel CPU s/Gbit (both ends) |\n|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.2} | {:.3} | {:.2} | {} | {} |\n",
            r.name,
            r.gbps,
            r.gbps / veth,
            r.gbps / wggo,
            r.retransmits,
            r.cpu_per_gbit.map(|c| format!("{c:.2}")).unwrap_or_else(|| "kernel".into())
        ));
    }
    s.push_str(&format!(
        "\nConnection setup: {} Requests per row through nsmgr, forwarder(s) and endpoint, from a client pod on node 1; latency is the Request round trip (the interface is up with its addresses when it returns); {}. Targets: p50 ≤ 20 ms local, ≤ 50 ms cross-node.\n\n",
        opts.connections,
        if opts.insecure {
            "plaintext mesh (--insecure: no mTLS, tokens or policies)"
        } else {
            "mutual TLS, ES256 tokens and the default policies on every hop"
        }
    ));
    s.push_str("| wire | mode | p50 ms | p99 ms | max ms | wall s | errors |\n|---|---|---|---|---|---|---|\n");
    for x in setups {
        let v = &x.rep.latencies_ms;
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {} |\n",
            x.name,
            x.mode,
            pct(v, 50.0),
            pct(v, 99.0),
            v.iter().cloned().fold(0.0, f64::max),
            x.rep.wall_ms / 1000.0,
            x.rep.errors.len()
        ));
    }
    s
}
