//! `nsm-lab`: the local NSM lab. See `nsm-lab --help`.

use clap::{Parser, Subcommand};
use nsm_lab::bench::BenchOpts;
use nsm_lab::demo::{self, DemoOpts};
use nsm_lab::identity::Provider;
use nsm_lab::{Lab, default_bin_dir, down};
use nsm_sdk::tools::daemon::shutdown_signal;

#[derive(Parser, Debug)]
#[command(
    name = "nsm-lab",
    version,
    about = "Local Network Service Mesh lab: network namespaces stand in for nodes and pods",
    long_about = "Builds two emulated clusters of two nodes each (network namespaces on a bridged \
                  underlay, a router between the clusters), each node running nsmgr and forwarder and \
                  node 1 of each cluster a registry; starts four endpoints (same node, other node, two \
                  in the other cluster) and a client pod that connects to all of them with `nsc init` \
                  over a veth pair, VXLAN and WireGuard; proves every wire with ping, prints the \
                  connections, and tears everything down. Needs root, iproute2, iputils-ping and \
                  wireguard-tools, and the workspace binaries next to this one."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Prefix of every namespace and of the state directory /run/nsm-lab/<prefix>.
    #[arg(long, global = true, default_value = "nsmlab")]
    prefix: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the demo and tear down (the default).
    Run {
        /// Keep the lab running afterwards; remove it with `nsm-lab down`.
        #[arg(long)]
        keep: bool,
        /// Log level of the daemons (logs go to /run/nsm-lab/<prefix>/*.log).
        #[arg(long, default_value = "INFO")]
        log_level: String,
        /// Take the SVIDs from real SPIRE (a spire-server per trust domain,
        /// federated; a spire-agent per node, join-token attested) instead
        /// of nsm-spiffe-dev. Needs spire-server and spire-agent: in
        /// $NSM_SPIRE_BIN_DIR, else built by scripts/peers.sh spire (Go; a
        /// cold build takes about 12 minutes, then it is cached).
        #[arg(long)]
        spire: bool,
    },
    /// Remove a kept (or crashed) lab: its processes, namespaces and state.
    Down,
    /// Measure throughput (iperf3) and connection setup latency, with
    /// baselines from the same run; prints a table (use a release build:
    /// scripts/bench.sh).
    Bench {
        /// iperf3 duration per throughput row, seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Connections per setup-latency row.
        #[arg(long, default_value_t = 200)]
        connections: usize,
        /// Also write the report (Markdown) to this file.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
        /// Run the mesh in plaintext (NSM_INSECURE=true): the setup rows
        /// without mutual TLS, tokens and policies, for comparison.
        #[arg(long)]
        insecure: bool,
    },
    /// (internal) The bench's client, run inside a pod namespace.
    #[command(hide = true)]
    BenchClient {
        #[arg(long)]
        connect_to: String,
        #[arg(long)]
        service: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        concurrency: usize,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli: Cli = nsm_sdk::tools::daemon::parse_or_exit();
    let cmd = cli.cmd.unwrap_or(Cmd::Run { keep: false, log_level: "INFO".into(), spire: false });
    match cmd {
        Cmd::Down => match down(&cli.prefix) {
            Ok(r) => {
                nsm_lab::say!(
                    "removed lab {:?}: {} processes stopped, {} namespaces deleted, {} stale WireGuard sockets removed",
                    cli.prefix,
                    r.killed.len(),
                    r.netns.len(),
                    r.sockets.len()
                );
            }
            Err(e) => {
                eprintln!("nsm-lab: {e:#}");
                std::process::exit(1);
            }
        },
        Cmd::Run { keep, log_level, spire } => {
            let identity = if spire { Provider::Spire } else { Provider::Dev };
            let code = run(&cli.prefix, DemoOpts { keep, log_level, identity }).await;
            std::process::exit(code);
        }
        Cmd::Bench { seconds, connections, output, insecure } => {
            let code = bench(&cli.prefix, BenchOpts { seconds, connections, output, insecure }).await;
            std::process::exit(code);
        }
        Cmd::BenchClient { connect_to, service, count, concurrency } => {
            match nsm_lab::bench::client(&connect_to, &service, count, concurrency).await {
                Ok(rep) => nsm_lab::say!("{}", serde_json::to_string(&rep).unwrap_or_default()),
                Err(e) => {
                    eprintln!("nsm-lab bench-client: {e:#}");
                    std::process::exit(1);
                }
            }
        }
    }
}

/// A new lab under `prefix`, or the exit code and a printed one-line reason
/// (64: the binaries are missing; 1: the lab cannot be set up).
fn open_lab(prefix: &str) -> Result<Lab, i32> {
    let bin_dir = default_bin_dir().map_err(|e| {
        eprintln!("nsm-lab: {e:#}");
        64
    })?;
    Lab::new(prefix, bin_dir).map_err(|e| {
        eprintln!("nsm-lab: {e:#}");
        1
    })
}

async fn run(prefix: &str, opts: DemoOpts) -> i32 {
    let mut lab = match open_lab(prefix) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if opts.keep {
        lab.detach_daemons();
    }
    nsm_lab::say!("nsm-lab: namespaces {prefix}-*, state and logs in {}", lab.dir().display());
    let t0 = std::time::Instant::now();
    let res = tokio::select! {
        r = demo::run(&mut lab, &opts) => r,
        _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    let code = match &res {
        Ok(()) => 0,
        Err(e) => {
            nsm_lab::say!();
            eprintln!("nsm-lab: {e:#}");
            1
        }
    };
    if opts.keep && res.is_ok() {
        lab.keep();
        return 0;
    }
    nsm_lab::say_part!("tearing down ... ");
    let td = std::time::Instant::now();
    lab.shutdown().await;
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default();
    if left.is_empty() {
        nsm_lab::say!(
            "done in {} ms, no namespaces or processes left ({:.1} s in all)",
            td.elapsed().as_millis(),
            t0.elapsed().as_secs_f64()
        );
    } else {
        nsm_lab::say!("namespaces left behind: {left:?} (run nsm-lab down)");
        return 1;
    }
    code
}

async fn bench(prefix: &str, opts: BenchOpts) -> i32 {
    let mut lab = match open_lab(prefix) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let res = tokio::select! {
        r = nsm_lab::bench::run(&mut lab, &opts) => r,
        _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    lab.shutdown().await;
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("nsm-lab: {e:#}");
            1
        }
    }
}
