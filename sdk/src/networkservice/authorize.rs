//! `authorize`: policy checks of the token path (`sdk:pkg/networkservice/
//! common/authorize`), server and client side, and which connections a
//! monitor subscriber may see.
//!
//! # Policy input
//! As upstream: `{"index": n, "path_segments": [{"name","id","token",
//! "expires","metrics"}...], "auth_info": {"certificate": "<PEM of the TLS
//! peer's leaf>"}}`, `expires` as RFC 3339. **Our extension:** the
//! connection's labels under `"labels"` (an object), so operator policies
//! can decide on them (e.g. refuse `labels.color == "red"`); upstream's
//! input has no labels.
//!
//! # Guarantees — [`AuthorizeServer`]
//! - Close is checked without `tokens_expired`: connections are closed
//!   precisely because an earlier hop's token expired (its `timeout`), and
//!   the teardown must still reach every hop. The caller's own token must
//!   still be valid, chained and signed by it.
//! - With a TLS peer (`ctx.peer.cert_der`), Request and Close are checked
//!   against the left side of the path (`segments[0..=index]`) before the
//!   rest of the chain runs. Denied ⇒ `PermissionDenied "no sufficient
//!   privileges: policy <name> denied ..."`; evaluation error ⇒ `Internal`.
//!   Nothing after this element runs in either case.
//! - Without a TLS peer (plaintext / insecure mode, and events `begin`
//!   starts itself, e.g. timeout closes) the call passes unchecked.
//! - It keeps no per-connection state: what upstream records per
//!   connection for its monitor policy (and leaked on failed Requests) is
//!   read here from the tokens in the connection's own path
//!   ([`AuthorizeMonitor`]), so there is nothing to release or leak.
//!
//! # Guarantees — [`AuthorizeClient`]
//! - After the rest of the client chain returns, the full returned path is
//!   checked with `auth_info` = the server's certificate, taken from the
//!   [`ServerPeer`] the TLS transport puts into `ctx.ext`. No `ServerPeer`
//!   or no certificate in it (plaintext) ⇒ unchecked.
//! - Denied on a first Request ⇒ the new connection is closed again (best
//!   effort) and `PermissionDenied` returned. Denied on a refresh of a
//!   connection that was authorized before (known from `ctx.meta`, or from
//!   the request carrying the established path, hops after ours) ⇒
//!   `PermissionDenied` without closing: the established connection stays
//!   until its caller closes it or its tokens expire.
//!
//! # Chain placement
//! Server: in the endpoint prefix ([`super::chains`], which states the
//! order), after `updatetoken` (it checks the tokens `updatetoken` wrote) and
//! before everything that builds state. Client: just before the gRPC tail
//! (the passthrough client chain there, and nsc's chain).

use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::connection::{Connection, State};
use nsm_api::networkservice::NetworkServiceRequest;
use serde_json::{Value, json};
use tonic::Status;

use super::chain::{ConnResult, Context, Element, Next, Peer, conn_mut};
use crate::security::jwt;
use crate::security::policy::PolicySet;
use crate::tools::token;

/// The server a client chain talks to, as the TLS transport saw it: the
/// gRPC client tail puts it into `ctx.ext` after a call over mTLS, and
/// [`AuthorizeClient`] checks the returned path against its certificate.
/// (One type, defined by the transport in `security::tls`, re-exported here
/// so the value the transport inserts is the one this element looks up.)
pub use crate::security::tls::ServerPeer;

/// Builds the policy input for `conn`'s path: segments `[0..=upto]` (all if
/// `None`), `index` = the path's index, `auth_info.certificate` = PEM of
/// `cert_der`, plus the connection's labels (our extension).
pub fn policy_input(conn: &Connection, upto: Option<usize>, cert_der: &[u8]) -> Value {
    let (index, segs) = match &conn.path {
        Some(p) => (p.index, p.path_segments.as_slice()),
        None => (0, &[][..]),
    };
    let end = upto.map_or(segs.len(), |u| (u + 1).min(segs.len()));
    let segments: Vec<Value> = segs[..end]
        .iter()
        .map(|s| {
            let expires = s
                .expires
                .as_ref()
                .and_then(token::from_timestamp)
                .map(|t| humantime::format_rfc3339_nanos(t).to_string());
            json!({"name": s.name, "id": s.id, "token": s.token, "expires": expires, "metrics": s.metrics})
        })
        .collect();
    json!({
        "index": index,
        "path_segments": segments,
        "auth_info": {"certificate": jwt::cert_to_pem(cert_der)},
        "labels": conn.labels,
    })
}

fn peer_name(peer: &Peer) -> String {
    peer.spiffe_id.clone().unwrap_or_else(|| "an unidentified TLS peer".to_string())
}

/// Server-side `authorize`.
pub struct AuthorizeServer {
    policies: PolicySet,
    /// For Close: the same without `tokens_expired`.
    close_policies: PolicySet,
}

impl AuthorizeServer {
    /// `authorize` with `policies` (usually [`PolicySet::server`], plus
    /// operator files).
    pub fn new(policies: PolicySet) -> Arc<AuthorizeServer> {
        let close_policies = policies.without("tokens_expired");
        Arc::new(AuthorizeServer { policies, close_policies })
    }

    fn check(&self, ctx: &mut Context, conn: &Connection, what: &str) -> Result<(), Status> {
        let Some(cert) = &ctx.peer.cert_der else { return Ok(()) };
        let index = conn.path.as_ref().map_or(0, |p| p.index as usize);
        let input = policy_input(conn, Some(index), cert);
        let policies = if what == "close" { &self.close_policies } else { &self.policies };
        let res = policies.evaluate(&input).map_err(|r| {
            let peer = peer_name(&ctx.peer);
            tracing::warn!(conn_id = %conn.id, peer = %peer, policy = r.policy(), error = %r, "{what} refused");
            r.to_status(&format!("the {what} of {peer} for connection {}", conn.id))
        });
        if res.is_err() {
            ctx.ext.insert(super::begin::RefusedHere);
        }
        res
    }
}

#[async_trait]
impl Element for AuthorizeServer {
    fn name(&self) -> &'static str {
        "authorize"
    }

    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        if ctx.peer.cert_der.is_none() {
            return next.request(ctx, req).await;
        }
        self.check(ctx, conn_mut(&mut req), "request")?;
        next.request(ctx, req).await
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        self.check(ctx, &conn, "close")?;
        next.close(ctx, conn).await
    }
}

/// Marker in the client-side connection metadata: this connection passed
/// [`AuthorizeClient`] before.
#[derive(Clone, Copy, Debug)]
struct Authorized;

/// Client-side `authorize`.
pub struct AuthorizeClient {
    policies: PolicySet,
}

impl AuthorizeClient {
    /// `authorize` (client) with `policies` (usually [`PolicySet::client`]).
    pub fn new(policies: PolicySet) -> Arc<AuthorizeClient> {
        Arc::new(AuthorizeClient { policies })
    }
}

#[async_trait]
impl Element for AuthorizeClient {
    fn name(&self) -> &'static str {
        "authorize-client"
    }

    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
        // A request that carries the path of an established connection is a
        // refresh if the next hop answers for that same connection (same id
        // in its segment), also in chains without `metadata` (nsc). A
        // reselect, or a next hop that made a new connection, is not.
        let next_id = |c: &Connection| {
            let p = c.path.as_ref()?;
            p.path_segments.get(p.index as usize + 1).map(|s| s.id.clone()).filter(|i| !i.is_empty())
        };
        let carried = req.connection.as_ref().filter(|c| c.state != State::ReselectRequested as i32).and_then(next_id);
        let conn = next.clone().request(ctx, req).await?;
        let carries_path = carried.is_some() && carried == next_id(&conn);
        let Some(server) = ctx.ext.get::<ServerPeer>().cloned() else { return Ok(conn) };
        let Some(cert) = server.cert_der.clone() else { return Ok(conn) };
        let input = policy_input(&conn, None, &cert);
        let Err(refused) = self.policies.evaluate(&input) else {
            if let Some(m) = &ctx.meta {
                m.client_insert(Authorized);
            }
            return Ok(conn);
        };
        let who = server.spiffe_id.clone().unwrap_or_else(|| "the server".to_string());
        let status = refused.to_status(&format!("the connection {} returned by {who}", conn.id));
        let refresh = carries_path || ctx.meta.as_ref().is_some_and(|m| m.client_get::<Authorized>().is_some());
        tracing::warn!(conn_id = %conn.id, server = %who, policy = refused.policy(), refresh, error = %refused,
            "returned connection refused");
        if !refresh {
            let mut closing = conn;
            closing.state = State::Down as i32;
            if let Err(e) = next.close(ctx, closing).await {
                tracing::warn!(error = %e.message(), "closing the refused connection failed");
            }
        }
        Err(status)
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        if let Some(m) = &ctx.meta {
            m.client_remove::<Authorized>();
        }
        next.close(ctx, conn).await
    }
}

/// Decides which connections a `MonitorConnections` subscriber may see.
///
/// - [`AuthorizeMonitor::allow_all`] (upstream's default: no monitor
///   policies) and a subscriber without a TLS identity (plaintext) see
///   everything.
/// - [`AuthorizeMonitor::own`] shows an identified subscriber the
///   connections it is on: a path segment before this hop carries a token
///   whose `sub` is the subscriber's SPIFFE ID (at the nsmgr: the client;
///   at the forwarder: the client and the nsmgr). Read from the connection
///   itself, so it holds from the first event to the deletion, with no
///   state to keep or release.
#[derive(Clone, Debug, Default)]
pub struct AuthorizeMonitor {
    own_only: bool,
}

impl AuthorizeMonitor {
    /// Every subscriber sees every connection.
    pub fn allow_all() -> AuthorizeMonitor {
        AuthorizeMonitor { own_only: false }
    }

    /// Identified subscribers see only the connections they are on.
    pub fn own() -> AuthorizeMonitor {
        AuthorizeMonitor { own_only: true }
    }

    /// May `subscriber` see `conn`?
    pub fn allows(&self, subscriber: &Peer, conn: &Connection) -> bool {
        let (true, Some(id)) = (self.own_only, &subscriber.spiffe_id) else { return true };
        let Some(p) = conn.path.as_ref() else { return false };
        p.path_segments.iter().take(p.index as usize).any(|s| jwt::decode(&s.token).is_ok_and(|(_, c)| c.sub == *id))
    }
}

#[cfg(test)]
mod tests;
