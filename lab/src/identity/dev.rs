//! `nsm-spiffe-dev` as the lab's identity provider: one server per
//! emulated cluster, standing in for that cluster's SPIRE.
//!
//! - Cluster `i`'s Workload API is `<lab dir>/spire/c<i>/agent.sock`, shared
//!   by all its nodes.
//! - Rules match what a process is: the mesh daemons
//!   ([`super::MESH_DAEMONS`]; in a lab namespace, but `nsm-registry-k8s`,
//!   which runs in the lab's own) are `ns/nsm-system/sa/<name>`, any other process in
//!   a lab namespace `ns/default/sa/<executable>`, and any other root
//!   process (the lab itself, test binaries) `ns/nsm-lab/sa/<executable>`.
//! - The servers share a CA directory, so each knows every trust domain's
//!   CA and hands out the others' bundles as federated bundles: the
//!   clusters trust each other as federated SPIRE servers would.

use std::time::Duration;

use anyhow::Context as _;
use url::Url;

use super::trust_domain;
use crate::env::Lab;

/// The config file of cluster `i`'s server.
pub fn config(prefix: &str, i: u8, domains: u8) -> String {
    let td = trust_domain(i);
    let tds: Vec<String> = (1..=domains.max(2)).map(trust_domain).collect();
    let mut y = format!("trust_domains: [{}]\nrules:\n", tds.join(", "));
    for (exe, sa) in super::MESH_DAEMONS {
        // nsm-registry-k8s runs in the lab's own netns (its API server is on
        // the host's loopback), so it is matched by executable alone.
        let netns = if *exe == "nsm-registry-k8s" { String::new() } else { format!("netns_prefix: \"{prefix}-\", ") };
        y.push_str(&format!(
            "  - match: {{ {netns}exe: {exe} }}\n    spiffe_id: \"spiffe://{td}/ns/nsm-system/sa/{sa}\"\n"
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

/// Starts the servers of `clusters` (SVIDs live `svid_ttl`), each knowing
/// trust domains `1..=domains`; returns their sockets.
pub(super) async fn start(
    lab: &mut Lab,
    clusters: impl Iterator<Item = u8>,
    domains: u8,
    svid_ttl: &str,
) -> anyhow::Result<Vec<(u8, Url)>> {
    let ca_dir = lab.dir().join("spire/ca");
    std::fs::create_dir_all(&ca_dir).with_context(|| format!("creating {}", ca_dir.display()))?;
    let netns = format!("{}-spire", lab.prefix());
    if lab.identities.is_none() {
        lab.add_netns("spire")?;
    }
    let mut started = vec![];
    for i in clusters {
        let sock = socket(lab, i)?;
        let conf = lab.dir().join(format!("spire/c{i}.yaml"));
        std::fs::write(&conf, config(lab.prefix(), i, domains))
            .with_context(|| format!("writing {}", conf.display()))?;
        let name = format!("spiffe-dev-c{i}");
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
        lab.wait_for_file(&name, std::path::Path::new(sock.path()), Duration::from_secs(10)).await?;
        started.push((i, sock));
    }
    Ok(started)
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_parses_and_orders_rules() {
        let y = super::config("nsmlab", 2, 2);
        let p = nsm_spiffe_dev::Policy::parse(&y, std::path::Path::new("c2.yaml")).unwrap();
        assert_eq!(p.trust_domains.len(), 2);
        assert_eq!(p.rules.len(), 6);
        assert_eq!(p.rules[0].spiffe_id, "spiffe://nsm.cluster2/ns/nsm-system/sa/nsmgr");
        assert_eq!(p.rules[3].spiffe_id, "spiffe://nsm.cluster2/ns/nsm-system/sa/registry");
        assert_eq!(p.rules[3].matcher.netns_prefix, None);
        assert_eq!(p.rules[5].matcher.uid, Some(0));
    }
}
