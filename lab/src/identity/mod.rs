//! The lab's SPIFFE identities, from one of two providers ([`Provider`]):
//!
//! - [`dev`]: one `nsm-spiffe-dev` per emulated cluster (the default; it
//!   starts in milliseconds and can issue SVIDs that live seconds).
//! - [`spire`]: real SPIRE, as a cluster runs it: a `spire-server` per
//!   trust domain, federated with the others through bundle endpoints, and
//!   a `spire-agent` per node (join-token node attestation, unix workload
//!   attestation by executable path).
//!
//! Either way cluster `i` has trust domain `nsm.cluster<i>`, the clusters'
//! trust domains are federated, every process of the lab gets
//! `SPIFFE_ENDPOINT_SOCKET` naming its Workload API ([`env`]), and the IDs
//! have the shape of the SPIRE `ClusterSPIFFEID` template NSM's deployments
//! use (`spiffe://<td>/ns/<namespace>/sa/<service account>`): `nsmgr`,
//! `forwarder` and the registries are `ns/nsm-system/sa/<name>`
//! ([`MESH_DAEMONS`]), endpoints
//! and clients `ns/default/sa/<executable>`, and the lab itself (or the
//! test binary driving it) `ns/nsm-lab/sa/<executable>`.
//!
//! All clusters' trust domains (at least two) are set up with the first
//! cluster, so a cluster started later is federated with the same set.

pub mod dev;
pub mod spire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use nsm_sdk::security::tls::Tls;
use url::Url;

use crate::env::Lab;
use crate::mesh::Node;

/// The mesh's own daemons and their service accounts in `ns/nsm-system`
/// (both providers). The other programs are `ns/default/sa/<executable>`.
pub const MESH_DAEMONS: &[(&str, &str)] =
    &[("nsmgr", "nsmgr"), ("forwarder", "forwarder"), ("nsm-registry", "registry"), ("nsm-registry-k8s", "registry")];

/// Who issues the lab's SVIDs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Provider {
    /// `nsm-spiffe-dev`, one Workload API per cluster.
    #[default]
    Dev,
    /// SPIRE (`spire-server`, `spire-agent`, built by `scripts/peers.sh
    /// spire`): a Workload API per node.
    Spire,
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::Dev => "nsm-spiffe-dev",
            Provider::Spire => "SPIRE",
        })
    }
}

/// The running identity provider and the lab's own SVID source.
pub struct Identities {
    pub provider: Provider,
    /// Workload API per cluster (1-based): the dev servers.
    clusters: BTreeMap<u8, Url>,
    /// Workload API per node name: the SPIRE agents.
    nodes: BTreeMap<String, Url>,
    /// The lab's own identity (`ns/nsm-lab/sa/<exe>` in cluster 1).
    pub tls: Arc<Tls>,
    /// Trust domains set up (`nsm.cluster1` ..).
    pub domains: u8,
}

/// Trust domain of cluster `i`.
pub fn trust_domain(i: u8) -> String {
    format!("nsm.cluster{i}")
}

/// Sets up `provider`'s identities for clusters `1..=clusters` unless they
/// are there (SVIDs live `svid_ttl`, e.g. `1h`), and the lab's own SVID
/// source. A lab has one provider.
pub async fn ensure(lab: &mut Lab, clusters: u8, provider: Provider, svid_ttl: &str) -> anyhow::Result<()> {
    let domains = lab.identities.as_ref().map(|s| s.domains).unwrap_or(clusters.max(2));
    if clusters > domains {
        bail!("this lab's identities were set up for {domains} clusters, not {clusters}");
    }
    if let Some(have) = lab.identities.as_ref().map(|s| s.provider)
        && have != provider
    {
        bail!("this lab's identities come from {have}, not {provider}");
    }
    match provider {
        Provider::Dev => {
            let have: Vec<u8> =
                lab.identities.as_ref().map(|s| s.clusters.keys().copied().collect()).unwrap_or_default();
            let started = dev::start(lab, (1..=clusters).filter(|i| !have.contains(i)), domains, svid_ttl).await?;
            if lab.identities.is_none() {
                let Some((_, first)) = started.first() else { bail!("no Workload API server to start") };
                let tls = own_svid(first).await?;
                lab.identities =
                    Some(Identities { provider, clusters: BTreeMap::new(), nodes: BTreeMap::new(), tls, domains });
            }
            if let Some(s) = lab.identities.as_mut() {
                s.clusters.extend(started);
            }
        }
        Provider::Spire if lab.identities.is_none() => {
            let own = spire::start(lab, domains, svid_ttl).await?;
            let tls = own_svid(&own).await?;
            lab.identities = Some(Identities {
                provider,
                clusters: BTreeMap::new(),
                nodes: BTreeMap::from([(spire::LAB_AGENT.to_string(), own)]),
                tls,
                domains,
            });
        }
        Provider::Spire => {}
    }
    Ok(())
}

/// Gives `node` its Workload API where the provider has one per node (a
/// SPIRE agent); call after [`ensure`], before starting its processes.
pub async fn ensure_node(lab: &mut Lab, node: &Node) -> anyhow::Result<()> {
    let Some(ids) = lab.identities.as_ref() else { return Ok(()) };
    if ids.provider != Provider::Spire || ids.nodes.contains_key(&node.name) {
        return Ok(());
    }
    let domains = ids.domains;
    let url = spire::start_agent(lab, node.cluster, &node.name, domains).await?;
    if let Some(s) = lab.identities.as_mut() {
        s.nodes.insert(node.name.clone(), url);
    }
    Ok(())
}

/// The environment that gives a process of `node` its identity, or
/// plaintext when the lab has none.
pub fn env(lab: &Lab, node: &Node) -> Vec<(&'static str, String)> {
    let Some(ids) = lab.identities.as_ref() else { return vec![("NSM_INSECURE", "true".to_string())] };
    let url = match ids.provider {
        Provider::Dev => ids.clusters.get(&node.cluster),
        Provider::Spire => ids.nodes.get(&node.name),
    };
    match url {
        Some(u) => vec![("SPIFFE_ENDPOINT_SOCKET", u.to_string())],
        // Not reached through `start_node_in`, which starts the agent
        // first; a process started otherwise waits for the agent socket the
        // node would have and then fails naming it.
        None => vec![("SPIFFE_ENDPOINT_SOCKET", format!("unix://{}", spire::agent_socket(lab, &node.name).display()))],
    }
}

/// The lab's provider, if it has identities.
pub fn provider(lab: &Lab) -> Option<Provider> {
    lab.identities.as_ref().map(|s| s.provider)
}

async fn own_svid(socket: &Url) -> anyhow::Result<Arc<Tls>> {
    use anyhow::Context as _;
    Tls::from_workload_api(socket.as_str(), Duration::from_secs(10))
        .await
        .with_context(|| format!("the lab's own SVID from {socket}"))
}
