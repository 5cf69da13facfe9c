//! `xconnect`: chooses how this forwarder joins the incoming side of a
//! connection to the outgoing side, and builds the wire.
//!
//! | incoming (from the nsmgr) | next hop (set by roundrobin) | wire |
//! |---|---|---|
//! | KERNEL (a client on this node) | `unix://` (an endpoint on this node) | veth pair ([`crate::local`]) |
//! | KERNEL | `tcp://` (another node's nsmgr) | client end of a VXLAN/WireGuard tunnel ([`crate::remote`](mod@crate::remote)) |
//! | REMOTE (another node's forwarder) | `unix://` | endpoint end of the tunnel |
//! | REMOTE | `tcp://` | refused: this forwarder does not relay between nodes |
//!
//! # Guarantees
//! - Close dispatches on what this process built for the connection; for a
//!   connection it has no record of (it restarted), it removes the client's
//!   interface by alias (KERNEL incoming) or searches every namespace for
//!   interfaces carrying the connection's alias (REMOTE incoming), then
//!   passes the Close on.
//!
//! # Chain placement
//! In the forwarder chain after `discover`/`roundrobin`, before `connect`.

use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::connection::Connection;
use nsm_api::mechanisms::{cls, kernel};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_sdk::networkservice::chain::conn_mut;
use nsm_sdk::networkservice::{ConnResult, Context, Element, Next};
use tonic::Status;

use crate::local::{self, LocalKernel, kernel_incoming, netns_key, resolve_netns};
use crate::remote::{ClientEnd, Remote};

/// The `xconnect` element.
pub struct XConnect {
    fwd: String,
    local: Arc<LocalKernel>,
    remote: Option<Arc<Remote>>,
}

impl XConnect {
    /// Forwarder `fwd` with local wires and, if configured, remote ones.
    pub fn new(fwd: &str, remote: Option<Arc<Remote>>) -> Arc<XConnect> {
        Arc::new(XConnect { fwd: fwd.to_string(), local: LocalKernel::new(fwd), remote })
    }

    fn remote(&self) -> Result<&Arc<Remote>, Status> {
        self.remote.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this forwarder has no tunnel IP (NSM_TUNNEL_IP), so it cannot build wires to other nodes",
            )
        })
    }
}

fn incoming_is_remote(req: &NetworkServiceRequest) -> bool {
    match req.connection.as_ref().and_then(|c| c.mechanism.as_ref()) {
        Some(m) => m.cls == cls::REMOTE,
        None => {
            !req.mechanism_preferences.iter().any(|m| m.r#type == kernel::MECHANISM)
                && req.mechanism_preferences.iter().any(|m| m.cls == cls::REMOTE)
        }
    }
}

#[async_trait]
impl Element for XConnect {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let to_remote = ctx.client_url.as_ref().is_some_and(|u| u.scheme() == "tcp");
        let from_remote = incoming_is_remote(&req);
        // A refresh whose endpoint moved between this node and another
        // switches the kind of wire: the old one goes first (the gRPC tail
        // closes the old next hop when its URL changes).
        if let Some(meta) = ctx.meta.clone() {
            if to_remote || from_remote {
                LocalKernel::drop_wire(&meta).await;
            } else if let Some(r) = &self.remote {
                r.drop_tunnel(&meta).await;
            }
        }
        match (from_remote, to_remote) {
            (false, false) => self.local.request(ctx, req, next).await,
            (false, true) => {
                let remote = self.remote()?.clone();
                let meta = ctx.meta.clone().ok_or_else(|| Status::internal("xconnect needs metadata"))?;
                let prev_name = req
                    .connection
                    .as_ref()
                    .and_then(|c| c.mechanism.as_ref())
                    .and_then(|m| m.parameters.get(kernel::NAME).cloned());
                let incoming = kernel_incoming(&req, prev_name)?;
                let pod_if = incoming.parameters.get(kernel::NAME).cloned().unwrap_or_default();
                let key = netns_key(&incoming);
                let conn_id = conn_mut(&mut req).id.clone();
                // The client's netns: positively matched before the far side
                // is asked (reused on refresh while the client is unchanged).
                let pod_ns = match Remote::client_pod(&meta) {
                    Some((k, ns)) if k == key => ns,
                    _ => resolve_netns(&incoming, "client").await?,
                };
                let alias = local::alias(&self.fwd, &conn_id);
                let end = ClientEnd { incoming, pod_ns, pod_if, alias, key };
                remote.client_request(ctx, req, next, &meta, end).await
            }
            (true, false) => {
                let remote = self.remote()?.clone();
                let meta = ctx.meta.clone().ok_or_else(|| Status::internal("xconnect needs metadata"))?;
                let conn_id = conn_mut(&mut req).id.clone();
                let alias = local::alias(&self.fwd, &conn_id);
                remote.server_request(ctx, req, next, &meta, alias).await
            }
            (true, true) => Err(Status::unimplemented(
                "a REMOTE mechanism towards another node: this forwarder does not relay between nodes",
            )),
        }
    }

    async fn close(&self, ctx: &mut Context, mut conn: Connection, next: Next) -> Result<(), Status> {
        let meta = ctx.meta.clone();
        if let Some(m) = meta.as_deref() {
            if LocalKernel::has_wire(m) {
                return self.local.close(ctx, conn, next).await;
            }
            if Remote::has_tunnel(m)
                && let Some(r) = &self.remote
            {
                conn.mechanism = r.close(Some(m)).await;
                return next.close(ctx, conn).await;
            }
        }
        // No record (the forwarder restarted since): clean up by alias.
        let is_remote = conn.mechanism.as_ref().is_some_and(|m| m.cls == cls::REMOTE);
        if !is_remote {
            return self.local.close(ctx, conn, next).await;
        }
        let alias = local::alias(&self.fwd, &conn.id);
        let removed = crate::sweep::remove_by_alias(&alias).await;
        tracing::info!(conn_id = %conn.id, removed, "close of an unknown remote connection: removed interfaces by alias");
        conn.mechanism = None;
        next.close(ctx, conn).await
    }
}
