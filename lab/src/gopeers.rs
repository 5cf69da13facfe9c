//! Peers built on the upstream NSM Go sdk (`peers/gosdk`, built by
//! `scripts/peers.sh gosdk`): `nsm-go-nsc`, a client with the sdk's client
//! chain, and `nsm-go-nse`, an ICMP responder with the sdk's endpoint chain
//! and registry clients, run in lab namespaces beside our daemons.
//!
//! Both print one line per event on stdout (`listening <url>`,
//! `registered <json>`, `connected <id> <json>`, `closed <id>`,
//! `unregistered <name>`), which lands in the daemon's lab log; the helpers
//! here wait for those lines.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::env::Lab;
use crate::identity;
use crate::mesh::{Endpoint, Node, wait_registered};

/// The path of Go peer `name` (`nsm-go-nsc`, `nsm-go-nse`) in
/// `NSM_GOSDK_BIN_DIR` when set (`scripts/test.sh` sets it), else where
/// `scripts/peers.sh gosdk` puts it (it builds them on first use).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    nsm_sdk::testing::peers::bin("gosdk", "NSM_GOSDK_BIN_DIR", name)
}

/// Where a Go endpoint's socket lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketAt {
    /// A temporary directory every lab process can see.
    Shared,
    /// A tmpfs in the endpoint's own mount namespace: no other process can
    /// open the socket by path, only through the fd it passes.
    Private,
}

/// Starts `nsm-go-nse` in a new pod namespace on `node`, serving `service`
/// from `cidr` (plus `extra` environment, e.g. `NSM_PAYLOAD=IP`), and waits
/// until it is registered.
pub async fn start_go_nse(
    lab: &mut Lab,
    node: &Node,
    name: &str,
    service: &str,
    cidr: &str,
    socket: SocketAt,
    extra: &[(&str, String)],
) -> anyhow::Result<Endpoint> {
    let netns = lab.add_netns(name)?;
    let tmp = lab.dir().join(format!("{name}-tmp"));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut env = vec![
        ("NSM_NAME", name.to_string()),
        ("NSM_CONNECT_TO", node.nsmgr_url.to_string()),
        ("NSM_SERVICE_NAMES", service.to_string()),
        ("NSM_CIDR_PREFIX", cidr.to_string()),
        ("TMPDIR", tmp.display().to_string()),
    ];
    env.extend(identity::env(lab, node));
    env.extend(extra.iter().cloned());
    let nse = bin("nsm-go-nse")?;
    if let Some(d) = nse.parent() {
        lab.add_peer_dir(d)?;
    }
    match socket {
        SocketAt::Shared => lab.spawn(name, &netns, &nse.display().to_string(), &env)?,
        SocketAt::Private => {
            // A mount namespace of its own with a tmpfs over TMPDIR: the
            // socket file exists only in there.
            let script = format!("mount -t tmpfs nsm-private {} && exec {}", tmp.display(), nse.display());
            lab.spawn_args(
                name,
                &netns,
                "/usr/bin/unshare",
                &["--mount", "--propagation", "private", "sh", "-c", &script],
                &env,
            )?
        }
    }
    let url = wait_line(lab, name, "listening ", Duration::from_secs(20)).await?;
    wait_line(lab, name, "registered ", Duration::from_secs(20)).await?;
    wait_registered(lab, node, name, Duration::from_secs(20)).await?;
    Ok(Endpoint {
        name: name.to_string(),
        netns,
        url: nsm_sdk::tools::grpc::parse_url(url.trim())?,
        service: service.to_string(),
    })
}

/// Starts `nsm-go-nsc` in `netns` as daemon `daemon`, asking `node` for
/// `nsurls` under the client name `name`; returns once every connection is
/// up, with the connections as the sdk printed them (protobuf JSON).
pub async fn start_go_nsc(
    lab: &mut Lab,
    daemon: &str,
    node: &Node,
    netns: &str,
    name: &str,
    nsurls: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut env = vec![
        ("NSM_NAME", name.to_string()),
        ("NSM_CONNECT_TO", node.nsmgr_url.to_string()),
        ("NSM_NETWORK_SERVICES", nsurls.to_string()),
    ];
    env.extend(identity::env(lab, node));
    let nsc = bin("nsm-go-nsc")?;
    if let Some(d) = nsc.parent() {
        lab.add_peer_dir(d)?;
    }
    lab.spawn(daemon, netns, &nsc.display().to_string(), &env)?;
    let mut out = vec![];
    for i in 0..nsurls.split(',').count() {
        let line = wait_line(lab, daemon, &format!("connected {name}-{i} "), Duration::from_secs(30)).await?;
        out.push(serde_json::from_str(&line).with_context(|| format!("{daemon} printed {line:?}"))?);
    }
    Ok(out)
}

/// Waits for a log line of daemon `daemon` starting with `prefix` and
/// returns the rest of it. Fails early, with the log, if the daemon exits.
pub async fn wait_line(lab: &mut Lab, daemon: &str, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
    let log = lab.dir().join(format!("{daemon}.log"));
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(rest) = text.lines().find_map(|l| l.strip_prefix(prefix)) {
            return Ok(rest.to_string());
        }
        if !lab.running(daemon) {
            bail!("{daemon} exited before printing {prefix:?}; its log ends with:\n{}", lab.log_tail(daemon, 20));
        }
        if t0.elapsed() > timeout {
            bail!(
                "{daemon} did not print {prefix:?} within {timeout:?}; its log ends with:\n{}",
                lab.log_tail(daemon, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
