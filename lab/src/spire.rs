//! The lab's SPIFFE identities: one `nsm-spiffe-dev` per emulated cluster,
//! standing in for that cluster's SPIRE agent.
//!
//! - Cluster `i` has trust domain `nsm.cluster<i>` and its Workload API at
//!   `<lab dir>/spire/c<i>/agent.sock`; every daemon and client of the
//!   cluster gets `SPIFFE_ENDPOINT_SOCKET` pointing there.
//! - IDs have the shape of the SPIRE `ClusterSPIFFEID` template NSM's
//!   deployments use (`spiffe://<td>/ns/<namespace>/sa/<service account>`):
//!   `nsmgr`, `forwarder` and `nsm-registry` processes in lab namespaces are
//!   `ns/nsm-system/sa/<name>`, any other process in a lab namespace (NSEs,
//!   clients) is `ns/default/sa/<executable>`, and root processes outside
//!   (the lab itself, test binaries) are `ns/nsm-lab/sa/<executable>`.
//! - The servers share a CA directory, so each knows every trust domain's
//!   CA and hands out the others' bundles as federated bundles: the
//!   clusters trust each other as federated SPIRE servers would.
//! - All clusters' trust domains are listed from the start (at least two),
//!   so a server started later trusts the same set.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nsm_sdk::security::tls::Tls;
use url::Url;

use crate::env::Lab;

/// The running servers and the lab's own SVID source.
pub struct Spire {
    /// Workload API socket per cluster (1-based).
    pub sockets: BTreeMap<u8, Url>,
    /// The lab's identity (`ns/nsm-lab/sa/<exe>` in cluster 1).
    pub tls: Arc<Tls>,
    /// Trust domains every server knows.
    pub domains: u8,
}

/// Trust domain of cluster `i`.
pub fn trust_domain(i: u8) -> String {
    format!("nsm.cluster{i}")
}

/// The config file of cluster `i`'s server.
pub fn config(prefix: &str, i: u8, domains: u8) -> String {
    let td = trust_domain(i);
    let tds: Vec<String> = (1..=domains.max(2)).map(trust_domain).collect();
    let mut y = format!("trust_domains: [{}]\nrules:\n", tds.join(", "));
    for (exe, sa) in [("nsmgr", "nsmgr"), ("forwarder", "forwarder"), ("nsm-registry", "registry")] {
        y.push_str(&format!(
            "  - match: {{ netns_prefix: \"{prefix}-\", exe: {exe} }}\n    spiffe_id: \"spiffe://{td}/ns/nsm-system/sa/{sa}\"\n"
        ));
    }
    y.push_str(&format!(
        "  - match: {{ netns_prefix: \"{prefix}-\" }}\n    spiffe_id: \"spiffe://{td}/ns/default/sa/{{exe}}\"\n"
    ));
    y.push_str(&format!("  - match: {{ uid: 0 }}\n    spiffe_id: \"spiffe://{td}/ns/nsm-lab/sa/{{exe}}\"\n"));
    y
}

/// The Workload API socket of cluster `i`.
pub fn socket(lab: &Lab, i: u8) -> anyhow::Result<Url> {
    Ok(nsm_sdk::tools::grpc::parse_url(&format!("unix://{}/spire/c{i}/agent.sock", lab.dir().display()))?)
}

/// Starts the servers of clusters `1..=clusters` that are not running yet
/// (SVIDs live `svid_ttl`, e.g. `1h`), and the lab's own SVID source.
pub async fn ensure(lab: &mut Lab, clusters: u8, svid_ttl: &str) -> anyhow::Result<()> {
    let domains = lab.spire.as_ref().map(|s| s.domains).unwrap_or(clusters.max(2));
    if clusters > domains {
        bail!("this lab's identities were set up for {domains} clusters, not {clusters}");
    }
    let ca_dir = lab.dir().join("spire/ca");
    std::fs::create_dir_all(&ca_dir).with_context(|| format!("creating {}", ca_dir.display()))?;
    let netns = format!("{}-spire", lab.prefix());
    if lab.spire.is_none() {
        lab.add_netns("spire")?;
    }
    let mut started = vec![];
    for i in 1..=clusters {
        if lab.spire.as_ref().is_some_and(|s| s.sockets.contains_key(&i)) {
            continue;
        }
        let sock = socket(lab, i)?;
        let conf = lab.dir().join(format!("spire/c{i}.yaml"));
        std::fs::write(&conf, config(lab.prefix(), i, domains))
            .with_context(|| format!("writing {}", conf.display()))?;
        let name = format!("spire-c{i}");
        lab.spawn(
            &name,
            &netns,
            "nsm-spiffe-dev",
            &[
                ("SPIFFE_DEV_LISTEN_ON", sock.to_string()),
                ("SPIFFE_DEV_CONFIG", conf.display().to_string()),
                ("SPIFFE_DEV_CA_DIR", ca_dir.display().to_string()),
                ("SPIFFE_DEV_SVID_TTL", svid_ttl.to_string()),
            ],
        )?;
        // The first server writes the CAs the next ones load: wait for it.
        wait_socket(lab, &name, &sock).await?;
        started.push((i, sock));
    }
    if lab.spire.is_none() {
        let Some((_, first)) = started.first() else { bail!("no Workload API server to start") };
        let tls = Tls::from_workload_api(first.as_str(), Duration::from_secs(10))
            .await
            .with_context(|| "the lab's own SVID".to_string())?;
        lab.spire = Some(Spire { sockets: BTreeMap::new(), tls, domains });
    }
    if let Some(s) = lab.spire.as_mut() {
        s.sockets.extend(started);
    }
    Ok(())
}

async fn wait_socket(lab: &mut Lab, name: &str, sock: &Url) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !std::path::Path::new(sock.path()).exists() {
        if !lab.running(name) {
            bail!("{name} exited during start-up:\n{}", lab.log_tail(name, 15));
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("{name} did not open {sock} within 10 s:\n{}", lab.log_tail(name, 15));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The environment that gives a process of cluster `i` its identity, or
/// plaintext when the lab has none.
pub fn env(lab: &Lab, i: u8) -> Vec<(&'static str, String)> {
    match lab.spire.as_ref().and_then(|s| s.sockets.get(&i)) {
        Some(u) => vec![("SPIFFE_ENDPOINT_SOCKET", u.to_string())],
        None => vec![("NSM_INSECURE", "true".to_string())],
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_parses_and_orders_rules() {
        let y = super::config("nsmlab", 2, 2);
        let p = nsm_spiffe_dev::Policy::parse(&y, std::path::Path::new("c2.yaml")).unwrap();
        assert_eq!(p.trust_domains.len(), 2);
        assert_eq!(p.rules.len(), 5);
        assert_eq!(p.rules[0].spiffe_id, "spiffe://nsm.cluster2/ns/nsm-system/sa/nsmgr");
        assert_eq!(p.rules[4].matcher.uid, Some(0));
    }
}
