//! `localkernel`: the KERNEL ↔ KERNEL wire on one node — a veth pair with
//! one end in the client's netns (named as the client asked, e.g. `nsm-1`)
//! and the other in the endpoint's netns, both created in place.
//!
//! # Guarantees
//! - The client's netns is resolved (and positively matched) *before* the
//!   endpoint is asked, so a bad request costs the endpoint nothing.
//! - The endpoint is asked with the forwarder's own KERNEL preference (the
//!   incoming mechanism is not forwarded); the endpoint answers with its
//!   netns and interface name. The caller gets its own mechanism back.
//! - Client side gets `src_ip_addrs`, endpoint side `dst_ip_addrs`; link
//!   routes to the peer and the context's routes (gateway = the peer's
//!   address) on each side; IPv6 without DAD; MTU from the context if set;
//!   `ping_group_range` opened in the client netns.
//! - Refresh repeats every step idempotently on the same interfaces (same
//!   ifindex); address sets are diffed.
//! - A first Request that fails after the endpoint answered removes the veth
//!   pair and closes the endpoint side: nothing is left behind.
//! - Close removes the pair (deleting one end removes both), then closes the
//!   endpoint side with the mechanism it chose.
//! - Interfaces carry the alias `nsm:<forwarder>@<node netns inode>:<connection id>` ([`alias`]):
//!   a name that exists with another alias is never touched
//!   (`AlreadyExists`).
//!
//! # Chain placement
//! Not in the chain itself: [`crate::xconnect`] hands it the connections
//! whose wire is a veth pair.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::connection::{Connection, Mechanism};
use nsm_api::mechanisms::{cls, kernel};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_sdk::networkservice::chain::conn_mut;
use nsm_sdk::networkservice::{ConnResult, Context, Element, Next};
use nsm_sdk::security::tls::ServerPeer;
use nsm_sdk::tools::grpcfd;
use nsm_sdk::tools::netns::{self, NetnsHandle};
use rand::Rng;
use tonic::Status;

use crate::ipcontext::{self, End};
use crate::kernel::{self as k, VethEnd};

/// What this forwarder built for one connection.
#[derive(Clone)]
struct Wire {
    client_ns: NetnsHandle,
    client_if: String,
    nse_ns: NetnsHandle,
    nse_if: String,
    alias: String,
    /// The mechanism the endpoint chose (sent back on refresh and Close).
    outgoing: Mechanism,
    /// The netns parameters the client sent, to notice a change on refresh.
    client_key: NetnsKey,
}

/// The `localkernel` element.
pub struct LocalKernel {
    fwd: String,
}

impl LocalKernel {
    /// The element of forwarder `fwd` (its name goes into interface aliases).
    pub fn new(fwd: &str) -> Arc<LocalKernel> {
        Arc::new(LocalKernel { fwd: fwd.to_string() })
    }

    /// Tears down and forgets the veth wire recorded in `meta` (the
    /// connection's endpoint moved to another node).
    pub async fn drop_wire(meta: &nsm_sdk::networkservice::metadata::ConnMetadata) {
        if let Some(w) = meta.server_remove::<Wire>() {
            teardown(&w).await;
        }
    }

    /// True if `meta` holds a veth wire built by this element.
    pub fn has_wire(meta: &nsm_sdk::networkservice::metadata::ConnMetadata) -> bool {
        meta.server_get::<Wire>().is_some()
    }
}

/// The alias marking an interface as built by forwarder `fwd` (its
/// [`crate::owner_id`]) for its connection `conn_id`: `nsm:<fwd>:<conn_id>`. A name carrying another
/// alias is never touched; after a restart the forwarder finds its own
/// interfaces (adoption, orphan sweep) by it.
pub fn alias(fwd: &str, conn_id: &str) -> String {
    format!("nsm:{fwd}:{conn_id}")
}

/// The incoming KERNEL mechanism of a local client (`connection.mechanism`
/// on refresh, else the first KERNEL preference), validated, with its
/// interface name filled in (`prev_name` on refresh, else generated).
pub fn kernel_incoming(req: &NetworkServiceRequest, prev_name: Option<String>) -> Result<Mechanism, Status> {
    let incoming = match req.connection.as_ref().and_then(|c| c.mechanism.clone()) {
        Some(m) => m,
        None => req.mechanism_preferences.iter().find(|m| m.r#type == kernel::MECHANISM).cloned().ok_or_else(|| {
            let offered: Vec<_> = req.mechanism_preferences.iter().map(|m| m.r#type.as_str()).collect();
            Status::invalid_argument(format!(
                "this forwarder connects local clients by KERNEL only; the request offers [{}]",
                offered.join(", ")
            ))
        })?,
    };
    if incoming.r#type != kernel::MECHANISM {
        return Err(Status::invalid_argument(format!(
            "mechanism {} is not supported for local clients (supported: KERNEL)",
            incoming.r#type
        )));
    }
    if !incoming.cls.is_empty() && incoming.cls != cls::LOCAL {
        return Err(Status::invalid_argument(format!(
            "KERNEL is a LOCAL mechanism; the request says cls={}",
            incoming.cls
        )));
    }
    let mut incoming = incoming;
    let svc = req.connection.as_ref().map(|c| c.network_service.clone()).unwrap_or_default();
    let name = match incoming.parameters.get(kernel::NAME).filter(|n| !n.is_empty()) {
        Some(n) => n.clone(),
        None => prev_name.unwrap_or_else(|| generate_ifname(&svc)),
    };
    k::validate_ifname(&name)?;
    incoming.parameters.insert(kernel::NAME.to_string(), name);
    Ok(incoming)
}

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn ifname_prefix(prefix: &str) -> String {
    let clean: String =
        prefix.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(10).collect();
    if clean.is_empty() { "nsm".to_string() } else { clean }
}

/// A random interface name `<prefix[:10]>-<4 random>`, as upstream
/// generates them (15 bytes at most).
pub fn generate_ifname(prefix: &str) -> String {
    let mut rng = rand::rng();
    let suffix: String = (0..4).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    format!("{}-{suffix}", ifname_prefix(prefix))
}

/// The endpoint-side interface name of a connection: `<prefix[:10]>-<4>`,
/// the suffix derived from the connection id (FNV-1a), so a forwarder that
/// restarted proposes the same name on the next refresh and adopts the
/// existing pair instead of rebuilding it.
pub fn stable_ifname(prefix: &str, conn_id: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in conn_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let suffix: String = (0..4).map(|i| ALPHABET[((h >> (i * 11)) % ALPHABET.len() as u64) as usize] as char).collect();
    format!("{}-{suffix}", ifname_prefix(prefix))
}

/// The request this forwarder sends its local endpoint: the caller's
/// request with its own KERNEL preference for interface `nse_if` instead of
/// the incoming mechanism (upstream's mechanismtranslation), and on refresh
/// `prev`, the mechanism the endpoint chose before.
pub fn endpoint_request(req: &NetworkServiceRequest, prev: Option<Mechanism>, nse_if: &str) -> NetworkServiceRequest {
    let mut out = req.clone();
    conn_mut(&mut out).mechanism = prev;
    out.mechanism_preferences = vec![Mechanism {
        cls: cls::LOCAL.to_string(),
        r#type: kernel::MECHANISM.to_string(),
        parameters: HashMap::from([(kernel::NAME.to_string(), nse_if.to_string())]),
    }];
    out
}

/// The KERNEL mechanism the local endpoint answered with and the interface
/// name in it (the one proposed, `proposed`, unless it chose another),
/// checked.
pub fn endpoint_answer(res: &Connection, proposed: &str) -> Result<(Mechanism, String), Status> {
    let m = res
        .mechanism
        .clone()
        .filter(|m| m.r#type == kernel::MECHANISM)
        .ok_or_else(|| Status::internal("the endpoint answered without a KERNEL mechanism"))?;
    let name = m.parameters.get(kernel::NAME).filter(|n| !n.is_empty()).cloned().unwrap_or(proposed.to_string());
    k::validate_ifname(&name)?;
    Ok((m, name))
}

/// The netns parameters a mechanism carries (`inodeURL`, `netnsInode`).
pub type NetnsKey = (Option<String>, Option<String>);

/// The netns parameters of a mechanism (`inodeURL`, `netnsInode`).
pub fn netns_key(m: &Mechanism) -> NetnsKey {
    (m.parameters.get(kernel::INODE_URL).cloned(), m.parameters.get(kernel::NETNS_INODE).cloned())
}

/// Resolves the netns a mechanism names. Off the async workers: a lookup by
/// inode may scan every `/proc/<pid>/ns/net` on the node.
pub async fn resolve_netns(m: &Mechanism, who: &'static str) -> Result<NetnsHandle, Status> {
    let (url, ino) = netns_key(m);
    tokio::task::spawn_blocking(move || netns::resolve(url.as_deref(), ino.as_deref()))
        .await
        .map_err(|e| Status::internal(format!("netns lookup task failed: {e}")))?
        .map_err(|e| crate::error::netns(who, e))
}

/// Resolves the netns of the endpoint that answered with `m`: through the
/// fd it passed with its answer when it did (upstream's sendfd server names
/// it `inode://<dev>/<ino>`), so no process needs searching; otherwise as
/// [`resolve_netns`].
pub async fn resolve_endpoint_netns(m: &Mechanism, ctx: &Context) -> Result<NetnsHandle, Status> {
    let passed =
        m.parameters.get(kernel::INODE_URL).and_then(|u| ctx.ext.get::<ServerPeer>()?.fds.as_ref()?.for_url(u));
    let Some(fd) = passed else { return resolve_netns(m, "endpoint").await };
    let mut by_fd = m.clone();
    by_fd.parameters.insert(kernel::INODE_URL.to_string(), format!("file://{}", grpcfd::proc_path(&fd)));
    // `fd` stays open until the namespace is opened through it.
    let h = resolve_netns(&by_fd, "endpoint").await;
    drop(fd);
    h
}

/// Builds (or re-checks) the wire and applies the connection context.
async fn build(w: &Wire, conn: &Connection) -> Result<(), Status> {
    let _permit = k::BUILD_PERMITS.acquire().await.map_err(|_| Status::internal("build permits closed"))?;
    let ctx = conn.context.clone().unwrap_or_default();
    let ip = ctx.ip_context.clone().unwrap_or_default();
    ipcontext::validate(&ip)?;
    let mtu = (ctx.mtu > 0).then_some(ctx.mtu);
    let a = VethEnd { netns: w.client_ns.clone(), name: w.client_if.clone(), alias: w.alias.clone(), mtu };
    let b = VethEnd { netns: w.nse_ns.clone(), name: w.nse_if.clone(), alias: w.alias.clone(), mtu };
    k::ensure_veth_pair(&a, &b).await?;
    ipcontext::apply(&w.client_ns, &w.client_if, &ip, End::Client).await?;
    ipcontext::apply(&w.nse_ns, &w.nse_if, &ip, End::Endpoint).await
}

async fn teardown(w: &Wire) {
    if let Err(e) = k::delete_link(&w.client_ns, &w.client_if, Some(&w.alias)).await {
        tracing::warn!(netns = %w.client_ns.describe(), ifname = %w.client_if, error = %e, "removing the client end failed");
    }
    // Normally gone with its peer; this covers a half-created pair.
    let _ = k::delete_link(&w.nse_ns, &w.nse_if, Some(&w.alias)).await;
}

#[async_trait]
impl Element for LocalKernel {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let meta =
            ctx.meta.clone().ok_or_else(|| Status::internal("chain misconfigured: localkernel needs metadata"))?;
        let prev: Option<Wire> = meta.server_get::<Wire>();
        let incoming = kernel_incoming(&req, prev.as_ref().map(|w| w.client_if.clone()))?;
        let client_if = incoming.parameters.get(kernel::NAME).cloned().unwrap_or_default();
        let conn = conn_mut(&mut req);
        let key = netns_key(&incoming);
        let client_ns = match &prev {
            Some(w) if w.client_key == key => w.client_ns.clone(),
            _ => resolve_netns(&incoming, "client").await?,
        };
        let alias = alias(&self.fwd, &conn.id);
        let nse_if =
            prev.as_ref().map(|w| w.nse_if.clone()).unwrap_or_else(|| stable_ifname(&conn.network_service, &conn.id));

        let out = endpoint_request(&req, prev.as_ref().map(|w| w.outgoing.clone()), &nse_if);
        let mut res = next.clone().request(ctx, out).await?;

        let built = async {
            let (outgoing, nse_if) = endpoint_answer(&res, &nse_if)?;
            let nse_ns = match &prev {
                Some(w) if netns_key(&w.outgoing) == netns_key(&outgoing) => w.nse_ns.clone(),
                _ => resolve_endpoint_netns(&outgoing, ctx).await?,
            };
            let wire = Wire {
                client_ns: client_ns.clone(),
                client_if: client_if.clone(),
                nse_ns,
                nse_if,
                alias: alias.clone(),
                outgoing,
                client_key: key.clone(),
            };
            // A changed netns on either side means a new wire: drop the old one.
            if let Some(p) = &prev
                && (p.client_ns.inode() != wire.client_ns.inode() || p.nse_ns.inode() != wire.nse_ns.inode())
            {
                teardown(p).await;
            }
            Ok::<Wire, Status>(wire)
        }
        .await;
        let wire = match built {
            Ok(w) => w,
            Err(e) => {
                if prev.is_none() {
                    next.undo(ctx, res).await;
                }
                return Err(e);
            }
        };
        if let Err(e) = build(&wire, &res).await {
            tracing::warn!(conn_id = %res.id, error = %e.message(), "building the wire failed");
            if prev.is_none() {
                teardown(&wire).await;
                next.undo(ctx, res).await;
            }
            return Err(e);
        }
        tracing::debug!(
            client = %format!("{} in {}", wire.client_if, wire.client_ns.describe()),
            endpoint = %format!("{} in {}", wire.nse_if, wire.nse_ns.describe()),
            "veth wire ready"
        );
        meta.server_insert(wire);
        res.mechanism = Some(incoming);
        Ok(res)
    }

    async fn close(&self, ctx: &mut Context, mut conn: Connection, next: Next) -> Result<(), Status> {
        let wire = ctx.meta.as_ref().and_then(|m| m.server_remove::<Wire>());
        match &wire {
            Some(w) => {
                teardown(w).await;
                conn.mechanism = Some(w.outgoing.clone());
            }
            None => {
                // Not built by this process (e.g. the forwarder restarted):
                // remove the client end if it is positively ours.
                if let Some(m) = conn.mechanism.clone()
                    && let Some(name) = m.parameters.get(kernel::NAME)
                    && let Ok(ns) = resolve_netns(&m, "client").await
                {
                    let alias = alias(&self.fwd, &conn.id);
                    let _ = k::delete_link(&ns, name, Some(&alias)).await;
                }
                conn.mechanism = None;
            }
        }
        next.close(ctx, conn).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_names_fit() {
        let n = super::generate_ifname("icmp-responder");
        assert_eq!(n.len(), 15);
        assert!(n.starts_with("icmp-respo-"));
        assert!(super::generate_ifname("a/b c").starts_with("abc-"));
        assert!(super::generate_ifname("").starts_with("nsm-"));
        let a = super::stable_ifname("icmp-responder", "0f3c-id");
        assert_eq!(a, super::stable_ifname("icmp-responder", "0f3c-id"), "same id, same name");
        assert_eq!(a.len(), 15);
        assert_ne!(a, super::stable_ifname("icmp-responder", "another-id"));
    }
}
