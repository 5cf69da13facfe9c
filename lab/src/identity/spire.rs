//! Real SPIRE as the lab's identity provider (`nsm-lab run --spire`),
//! `spire-server` and `spire-agent` built by `scripts/peers.sh spire`
//! (`NSM_SPIRE_BIN_DIR` names their directory when set).
//!
//! - **Servers**: one per trust domain (`nsm.cluster<i>`), all in the lab
//!   namespace `<prefix>-spire`: agents on `127.0.0.1:<8080+i>`, the SPIFFE
//!   bundle endpoint (`https_spiffe` profile) on `127.0.0.1:<8440+i>`,
//!   admin API on `<lab dir>/spire/server-c<i>/api.sock`, SQLite datastore,
//!   in-memory keys. Each federates with every other trust domain; the
//!   first bundle is handed over with `bundle set` (what an operator does
//!   once), later ones the servers fetch from each other's endpoints.
//! - **Agents**: one per node, attested with a join token that also names
//!   the node (`spiffe://<td>/nsm-lab/node/<node>`), its Workload API on
//!   `<lab dir>/spire/agent-<node>/agent.sock`. Agents run in the SPIRE
//!   namespace too (a node's processes reach their agent by the socket
//!   path, as pods reach a hostPath socket), and one more agent, `lab`,
//!   serves the lab process itself.
//! - **Registration entries**: created before the node's agent starts (and
//!   the agents sync every 500 ms instead of 5 s, so a process started
//!   right after gets its SVID within a second; the Workload API clients
//!   retry until then), parented
//!   to the node, one per program the node runs, selected by
//!   `unix:path:<executable>` (the unix workload attestor with
//!   `discover_workload_path`): every process in the lab runs as root, so
//!   the path is what tells them apart. Each entry federates with the other
//!   trust domains, so SVID responses carry their bundles.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use url::Url;

use super::trust_domain;
use crate::env::Lab;

/// The name of the agent that serves the lab process itself.
pub const LAB_AGENT: &str = "lab";

/// The path of SPIRE binary `name` (`spire-server`, `spire-agent`).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    nsm_sdk::testing::peers::bin("spire", "NSM_SPIRE_BIN_DIR", name)
}

/// The SPIRE release `spire-server --version` reports.
pub fn version() -> anyhow::Result<String> {
    let out = Command::new(bin("spire-server")?).arg("--version").output().context("running spire-server")?;
    // It prints the version on stderr.
    let text =
        String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout }).trim().to_string();
    Ok(text)
}

fn spire_dir(lab: &Lab) -> PathBuf {
    lab.dir().join("spire")
}

fn server_dir(lab: &Lab, i: u8) -> PathBuf {
    spire_dir(lab).join(format!("server-c{i}"))
}

fn agent_dir(lab: &Lab, node: &str) -> PathBuf {
    spire_dir(lab).join(format!("agent-{node}"))
}

/// The Workload API socket of `node`'s agent.
pub fn agent_socket(lab: &Lab, node: &str) -> PathBuf {
    agent_dir(lab, node).join("agent.sock")
}

fn api_socket(lab: &Lab, i: u8) -> PathBuf {
    server_dir(lab, i).join("api.sock")
}

fn server_port(i: u8) -> u16 {
    8080 + u16::from(i)
}

fn bundle_port(i: u8) -> u16 {
    8440 + u16::from(i)
}

/// The configuration of the server of trust domain `i` of `domains`
/// (state in `dir`, SVIDs living `svid_ttl`, a Go duration like `1h`).
pub fn server_config(dir: &Path, i: u8, domains: u8, svid_ttl: &str) -> String {
    let d = dir.display();
    let mut federates = String::new();
    for o in (1..=domains).filter(|o| *o != i) {
        federates.push_str(&format!(
            r#"
    federates_with "{td}" {{
      bundle_endpoint_url = "https://127.0.0.1:{port}"
      bundle_endpoint_profile "https_spiffe" {{
        endpoint_spiffe_id = "spiffe://{td}/spire/server"
      }}
    }}"#,
            td = trust_domain(o),
            port = bundle_port(o)
        ));
    }
    format!(
        r#"server {{
  bind_address = "127.0.0.1"
  bind_port = "{port}"
  socket_path = "{d}/api.sock"
  trust_domain = "{td}"
  data_dir = "{d}/data"
  log_level = "INFO"
  ca_key_type = "ec-p256"
  default_x509_svid_ttl = "{svid_ttl}"
  experimental {{
    # How soon agents see a new entry (default 5 s).
    cache_reload_interval = "500ms"
  }}
  federation {{
    bundle_endpoint {{
      address = "127.0.0.1"
      port = {bport}
    }}{federates}
  }}
}}

plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{d}/data/datastore.sqlite3"
    }}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
}}
"#,
        port = server_port(i),
        td = trust_domain(i),
        bport = bundle_port(i),
    )
}

/// The configuration of an agent of trust domain `i` (state in `dir`).
pub fn agent_config(dir: &Path, i: u8) -> String {
    let d = dir.display();
    format!(
        r#"agent {{
  data_dir = "{d}/data"
  log_level = "INFO"
  server_address = "127.0.0.1"
  server_port = "{port}"
  socket_path = "{d}/agent.sock"
  trust_domain = "{td}"
  trust_bundle_path = "{d}/bundle.pem"
  experimental {{
    # New entries reach the agent within this (default 5 s): the lab
    # starts a node's processes right after creating their entries.
    sync_interval = "500ms"
  }}
}}

plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{
      discover_workload_path = true
      # Entries select by path only: never hash the (large, debug) binary.
      workload_size_limit = -1
    }}
  }}
}}
"#,
        port = server_port(i),
        td = trust_domain(i),
    )
}

/// Runs `spire-server <cmd> -socketPath <server i's API> <args>` and returns
/// its stdout, or an error with its output.
fn server_cli(lab: &Lab, i: u8, cmd: &[&str], args: &[&str]) -> anyhow::Result<String> {
    let sock = api_socket(lab, i);
    let out = Command::new(bin("spire-server")?)
        .args(cmd)
        .arg("-socketPath")
        .arg(&sock)
        .args(args)
        .output()
        .context("running spire-server")?;
    if !out.status.success() {
        bail!(
            "spire-server {} (trust domain {}) failed: {} {}",
            cmd.join(" "),
            trust_domain(i),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts the servers of trust domains `1..=domains` and federates them,
/// then the lab's own agent; returns the lab's Workload API.
pub(super) async fn start(lab: &mut Lab, domains: u8, svid_ttl: &str) -> anyhow::Result<Url> {
    let server = bin("spire-server")?;
    if let Some(d) = server.parent() {
        lab.add_peer_dir(d)?;
    }
    let netns = lab.add_netns("spire")?;
    for i in 1..=domains {
        let dir = server_dir(lab, i);
        std::fs::create_dir_all(dir.join("data")).with_context(|| format!("creating {}", dir.display()))?;
        let conf = dir.join("server.conf");
        std::fs::write(&conf, server_config(&dir, i, domains, svid_ttl))
            .with_context(|| format!("writing {}", conf.display()))?;
        let conf = conf.display().to_string();
        lab.spawn_args(
            &format!("spire-server-c{i}"),
            &netns,
            &server.display().to_string(),
            &["run", "-config", &conf],
            &[],
        )?;
    }
    for i in 1..=domains {
        wait_healthy(lab, i).await?;
    }
    // Hand each server the others' first bundles; from then on they keep
    // them current from the bundle endpoints.
    for i in 1..=domains {
        let bundle = server_cli(lab, i, &["bundle", "show"], &["-format", "spiffe"])?;
        let path = server_dir(lab, i).join("bundle.spiffe.json");
        std::fs::write(&path, bundle).with_context(|| format!("writing {}", path.display()))?;
    }
    for i in 1..=domains {
        for o in (1..=domains).filter(|o| *o != i) {
            let path = server_dir(lab, o).join("bundle.spiffe.json");
            let id = format!("spiffe://{}", trust_domain(o));
            server_cli(
                lab,
                i,
                &["bundle", "set"],
                &["-format", "spiffe", "-id", &id, "-path", &path.display().to_string()],
            )?;
        }
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let own = vec![workload(&exe, "nsm-lab", 1)?];
    start_agent_with(lab, 1, LAB_AGENT, domains, own).await
}

/// Waits until server `i` answers its health check.
async fn wait_healthy(lab: &mut Lab, i: u8) -> anyhow::Result<()> {
    let name = format!("spire-server-c{i}");
    let t0 = Instant::now();
    loop {
        if api_socket(lab, i).exists() && server_cli(lab, i, &["healthcheck"], &["-shallow"]).is_ok() {
            return Ok(());
        }
        if !lab.running(&name) {
            bail!("{name} exited during start-up:\n{}", lab.log_tail(&name, 15));
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("{name} was not healthy within 30 s:\n{}", lab.log_tail(&name, 15));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A registration entry to be: the SPIFFE ID of the program at `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub path: PathBuf,
    pub spiffe_id: String,
}

/// The entry of the program at `path` in Kubernetes namespace `ns` of
/// cluster `i` (service account: its file name).
fn workload(path: &Path, ns: &str, i: u8) -> anyhow::Result<Workload> {
    let path = std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let exe = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(Workload { spiffe_id: format!("spiffe://{}/ns/{ns}/sa/{exe}", trust_domain(i)), path })
}

/// The programs a node of cluster `i` runs: the mesh daemons in
/// `ns/nsm-system` as the lab names their service accounts, our clients
/// and endpoints in `ns/default`, and the Go sdk peers when their
/// directory is known (`NSM_GOSDK_BIN_DIR`, as `scripts/test.sh` sets it,
/// or already resolved in this process).
pub fn node_workloads(lab: &Lab, i: u8) -> anyhow::Result<Vec<Workload>> {
    let td = trust_domain(i);
    let mut out = vec![];
    for (bin, sa) in super::MESH_DAEMONS {
        let p = lab.bin(bin);
        if p.is_file() {
            let w = workload(&p, "nsm-system", i)?;
            out.push(Workload { spiffe_id: format!("spiffe://{td}/ns/nsm-system/sa/{sa}"), ..w });
        }
    }
    for bin in ["nsc", "nse-icmp-responder"] {
        out.push(workload(&lab.bin(bin), "default", i)?);
    }
    if let Some(dir) = nsm_sdk::testing::peers::known_dir("gosdk", "NSM_GOSDK_BIN_DIR") {
        for bin in ["nsm-go-nsc", "nsm-go-nse"] {
            let p = dir.join(bin);
            if p.is_file() {
                out.push(workload(&p, "default", i)?);
            }
        }
    }
    Ok(out)
}

/// The entries file (`spire-server entry create -data`) of `workloads`
/// under `parent`, federated with the trust domains `1..=domains` but `i`.
pub fn entries_json(workloads: &[Workload], parent: &str, i: u8, domains: u8) -> serde_json::Value {
    let federates: Vec<String> =
        (1..=domains).filter(|o| *o != i).map(|o| format!("spiffe://{}", trust_domain(o))).collect();
    let entries: Vec<serde_json::Value> = workloads
        .iter()
        .map(|w| {
            serde_json::json!({
                "spiffe_id": w.spiffe_id,
                "parent_id": parent,
                "selectors": [{"type": "unix", "value": format!("path:{}", w.path.display())}],
                "federates_with": federates,
            })
        })
        .collect();
    serde_json::json!({ "entries": entries })
}

/// Starts the agent of `node` (cluster `i`) with the entries of
/// [`node_workloads`]; returns its Workload API.
pub(super) async fn start_agent(lab: &mut Lab, i: u8, node: &str, domains: u8) -> anyhow::Result<Url> {
    let workloads = node_workloads(lab, i)?;
    start_agent_with(lab, i, node, domains, workloads).await
}

async fn start_agent_with(
    lab: &mut Lab,
    i: u8,
    node: &str,
    domains: u8,
    workloads: Vec<Workload>,
) -> anyhow::Result<Url> {
    let dir = agent_dir(lab, node);
    std::fs::create_dir_all(dir.join("data")).with_context(|| format!("creating {}", dir.display()))?;
    let alias = format!("spiffe://{}/nsm-lab/node/{node}", trust_domain(i));
    // The token's extra ID names the node: the entries below are its
    // children, so only this agent hands them out.
    let out = server_cli(lab, i, &["token", "generate"], &["-spiffeID", &alias, "-ttl", "600"])?;
    let token = out
        .split_whitespace()
        .skip_while(|w| *w != "Token:")
        .nth(1)
        .with_context(|| format!("spire-server token generate printed {out:?}"))?
        .to_string();
    let entries = dir.join("entries.json");
    std::fs::write(&entries, entries_json(&workloads, &alias, i, domains).to_string())
        .with_context(|| format!("writing {}", entries.display()))?;
    server_cli(lab, i, &["entry", "create"], &["-data", &entries.display().to_string()])?;
    let bundle = server_cli(lab, i, &["bundle", "show"], &[])?;
    std::fs::write(dir.join("bundle.pem"), bundle).with_context(|| format!("writing {}/bundle.pem", dir.display()))?;
    let conf = dir.join("agent.conf");
    std::fs::write(&conf, agent_config(&dir, i)).with_context(|| format!("writing {}", conf.display()))?;
    let name = format!("spire-agent-{node}");
    let netns = format!("{}-spire", lab.prefix());
    let agent = bin("spire-agent")?.display().to_string();
    let conf = conf.display().to_string();
    lab.spawn_args(&name, &netns, &agent, &["run", "-config", &conf, "-joinToken", &token], &[])?;
    let sock = agent_socket(lab, node);
    lab.wait_for_file(&name, &sock, Duration::from_secs(30)).await?;
    Ok(nsm_sdk::tools::grpc::parse_url(&format!("unix://{}", sock.display()))?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn servers_federate_with_every_other_trust_domain() {
        let c = server_config(Path::new("/run/x/server-c2"), 2, 3, "1h");
        assert!(c.contains(r#"trust_domain = "nsm.cluster2""#), "{c}");
        assert!(c.contains(r#"bind_port = "8082""#) && c.contains("port = 8442"), "{c}");
        assert!(c.contains(r#"federates_with "nsm.cluster1""#) && c.contains(r#"federates_with "nsm.cluster3""#));
        assert!(!c.contains(r#"federates_with "nsm.cluster2""#), "not with itself");
        assert!(c.contains(r#"endpoint_spiffe_id = "spiffe://nsm.cluster3/spire/server""#));
        assert!(c.contains(r#"default_x509_svid_ttl = "1h""#));
    }

    #[test]
    fn entries_select_by_path_under_the_node_and_federate() {
        let w = Workload { path: "/b/nsmgr".into(), spiffe_id: "spiffe://nsm.cluster1/ns/nsm-system/sa/nsmgr".into() };
        let j = entries_json(&[w], "spiffe://nsm.cluster1/nsm-lab/node/n1", 1, 2);
        let e = &j["entries"][0];
        assert_eq!(e["parent_id"], "spiffe://nsm.cluster1/nsm-lab/node/n1");
        assert_eq!(e["selectors"][0]["value"], "path:/b/nsmgr");
        assert_eq!(e["federates_with"], serde_json::json!(["spiffe://nsm.cluster2"]));
    }
}
