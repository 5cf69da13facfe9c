//! Orphans: interfaces a previous run of this forwarder built and nobody
//! closed (it was killed mid-connection), found by their alias
//! `nsm:<forwarder>@<node netns inode>:<connection id>` in every network
//! namespace on the node.
//!
//! # Guarantees
//! - At start, tunnel devices of ours still in the node netns (the kernel
//!   WireGuard backend creates there and moves; a kill between the two
//!   leaves one) and WireGuard UAPI sockets nobody serves are removed at
//!   once.
//! - Interfaces in pods are given `grace` (by default the token lifetime:
//!   the longest a live client can go without refreshing): a connection that
//!   is refreshed in that time is adopted; the rest are removed.
//! - Only interfaces carrying *this* forwarder's identity (name and node
//!   netns) in their alias are touched, so several forwarders can share a
//!   node, and lab nodes sharing one kernel never touch each other's.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use nsm_sdk::networkservice::metadata::Metadata;
use nsm_sdk::tools::netns::{self, NetnsHandle};

use crate::kernel as k;

/// The alias prefix of forwarder `fwd`'s interfaces.
pub fn prefix(fwd: &str) -> String {
    format!("nsm:{fwd}:")
}

/// Removes every interface, in any namespace, whose alias is exactly
/// `alias`; returns how many.
pub async fn remove_by_alias(alias: &str) -> usize {
    let mut n = 0;
    for ns in all_namespaces().await {
        if let Ok(links) = k::links_with_alias_prefix(&ns, alias).await {
            for (name, a, _, _) in links {
                if a == alias && k::delete_link(&ns, &name, Some(alias)).await.unwrap_or(false) {
                    n += 1;
                }
            }
        }
    }
    n
}

async fn all_namespaces() -> Vec<NetnsHandle> {
    tokio::task::spawn_blocking(netns::all_netns).await.unwrap_or_default()
}

/// `(netns inode, interface, alias)` of this forwarder's interfaces.
async fn ours(fwd: &str) -> Vec<(NetnsHandle, String, String)> {
    let p = prefix(fwd);
    let mut out = vec![];
    for ns in all_namespaces().await {
        if let Ok(links) = k::links_with_alias_prefix(&ns, &p).await {
            for (name, alias, _, _) in links {
                out.push((ns.clone(), name, alias));
            }
        }
    }
    out
}

/// Runs the start-up sweep: removes node-netns leftovers and stale UAPI
/// sockets now, and pod interfaces not adopted within `grace` later (in a
/// background task). Returns the number of interfaces under watch.
pub async fn start(fwd: &str, node: &NetnsHandle, metadata: Arc<Metadata>, grace: Duration) -> usize {
    let p = prefix(fwd);
    let removed = crate::wireguard::cleanup_stale_sockets("nsmwg-");
    if !removed.is_empty() {
        tracing::info!(sockets = ?removed, "removed stale WireGuard UAPI sockets");
    }
    if let Ok(links) = k::links_with_alias_prefix(node, &p).await {
        for (name, alias, _, _) in links {
            if k::delete_link(node, &name, Some(&alias)).await.unwrap_or(false) {
                tracing::info!(ifname = %name, "removed a tunnel device a previous run left in the node netns");
            }
        }
    }
    let found = ours(fwd).await;
    let aliases: HashSet<String> = found.iter().map(|(_, _, a)| a.clone()).collect();
    drop(found);
    let n = aliases.len();
    if n == 0 {
        return 0;
    }
    tracing::info!(
        count = n,
        ?grace,
        "found interfaces from a previous run; those whose connection is not refreshed in time will be removed"
    );
    let fwd = fwd.to_string();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let p = prefix(&fwd);
        for (ns, name, alias) in ours(&fwd).await {
            let conn_id = alias.strip_prefix(&p).unwrap_or_default();
            if aliases.contains(&alias) && !metadata.contains(conn_id) {
                match k::delete_link(&ns, &name, Some(&alias)).await {
                    Ok(true) => {
                        tracing::info!(ifname = %name, netns = %ns.describe(), conn_id, "removed an orphaned interface")
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(ifname = %name, error = %e, "removing an orphaned interface failed"),
                }
            }
        }
    });
    n
}
