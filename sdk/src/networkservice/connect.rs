//! `connect`: hands the request to a client chain and the client chain's
//! gRPC tail ([`GrpcClient`]) that calls the next hop.
//!
//! # Guarantees
//! - [`Connect`] (server): runs the client chain, then the rest of the server
//!   chain with the connection the next hop returned; if the rest fails it
//!   closes the next hop again, so a failed Request leaves nothing behind
//!   downstream. Close runs the client chain's Close, then the rest.
//! - [`GrpcClient`] (client tail): dials `ctx.client_url` (or, when it is
//!   unset, the URL this connection used before — so Close and refresh reach
//!   the same hop even if discovery can no longer find it), remembers it per
//!   connection, and forwards the call with the remaining deadline and this
//!   hop's token. If the URL changed since the last Request, the old
//!   downstream connection is closed first (best effort).
//! - On a unix connection, the files an element asked to pass
//!   ([`PassFiles`](crate::tools::grpcfd::PassFiles) in `ctx.ext`) go with
//!   the call as fds (grpcfd); a file that cannot be opened is not passed.
//! - Downstream errors keep their gRPC code; the message is prefixed with
//!   the URL that failed.
//!
//! # Chain placement
//! [`Connect`] last in a passthrough's server chain; [`GrpcClient`] last in
//! a client chain.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nsm_api::connection::Connection;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_client::NetworkServiceClient;
use tonic::Status;
use url::Url;

use super::chain::{Chain, ConnResult, Context, Element, Next};
use crate::security::tls::ServerPeer;
use crate::tools::grpc::ChannelPool;
use crate::tools::grpcfd::PassFiles;
use crate::tools::token::{self, SharedTokenGenerator};

/// Default budget for a downstream call when the caller set no deadline.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Server-side `connect` around a client chain.
pub struct Connect {
    client: Chain,
}

impl Connect {
    /// `connect` running `client` (which must end in a tail such as [`GrpcClient`]).
    pub fn new(client: Chain) -> Arc<Connect> {
        Arc::new(Connect { client })
    }
}

#[async_trait]
impl Element for Connect {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let downstream = self.client.request(ctx, req.clone()).await?;
        req.connection = Some(downstream.clone());
        match next.request(ctx, req).await {
            Ok(c) => Ok(c),
            Err(e) => {
                self.client.start().undo(ctx, downstream).await;
                Err(e)
            }
        }
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        let r = self.client.close(ctx, conn.clone()).await;
        let r2 = next.close(ctx, conn).await;
        r.and(r2)
    }
}

/// The URL a connection was last sent to (client-side metadata).
#[derive(Clone, Debug)]
pub struct DialedUrl(pub Url);

/// Client-chain tail: the actual gRPC call to the next hop.
pub struct GrpcClient {
    pool: ChannelPool,
    tokens: SharedTokenGenerator,
}

impl GrpcClient {
    /// A tail dialing through `pool` and sending tokens from `tokens`.
    pub fn new(pool: ChannelPool, tokens: SharedTokenGenerator) -> Arc<GrpcClient> {
        Arc::new(GrpcClient { pool, tokens })
    }

    /// The outgoing call: the caller's remaining deadline, and this hop's
    /// token for `server` (the peer of this call: the token's audience).
    fn tonic_request<T>(&self, server: &ServerPeer, ctx: &Context, msg: T) -> Result<tonic::Request<T>, Status> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(ctx.remaining().unwrap_or(DEFAULT_CALL_TIMEOUT));
        let peer = crate::networkservice::chain::Peer {
            spiffe_id: server.spiffe_id.clone(),
            cert_der: server.cert_der.clone(),
            local_svid: server.local.clone(),
            ..Default::default()
        };
        let t = self.tokens.generate(&peer)?;
        token::put(r.metadata_mut(), &t);
        Ok(r)
    }

    async fn call_close(&self, ctx: &Context, url: &Url, conn: Connection) -> Result<(), Status> {
        let (ch, server) = self.pool.get_with_peer(url).await?;
        let r = self.tonic_request(&server, ctx, conn)?;
        NetworkServiceClient::new(ch).close(r).await.map(|_| ()).map_err(|e| self.downstream_error(url, e))
    }

    fn downstream_error(&self, url: &Url, e: Status) -> Status {
        if e.code() == tonic::Code::Unavailable {
            self.pool.evict(url);
        }
        // A plaintext client talking to a TLS server gets a transport-level
        // error (which one depends on timing).
        const TRANSPORT: [&str; 5] =
            ["h2 protocol error", "operation was canceled", "connection reset", "broken pipe", "transport error"];
        let hint = if self.pool.tls().is_none() && TRANSPORT.iter().any(|t| e.message().contains(t)) {
            self.pool.evict(url);
            " (this client runs with NSM_INSECURE=true: does the server require mutual TLS?)"
        } else {
            ""
        };
        Status::new(e.code(), format!("{url}: {}{hint}", e.message()))
    }
}

#[async_trait]
impl Element for GrpcClient {
    fn name(&self) -> &'static str {
        "grpc-client"
    }

    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, _next: Next) -> ConnResult {
        let previous = ctx.meta.as_ref().and_then(|m| m.client_get::<DialedUrl>()).map(|d| d.0);
        let url = match (&ctx.client_url, &previous) {
            (Some(u), _) => u.clone(),
            (None, Some(u)) => u.clone(),
            (None, None) => return Err(Status::internal("no next hop: client URL is not set")),
        };
        if let (Some(old), Some(conn)) = (&previous, &req.connection)
            && *old != url
        {
            tracing::info!(old = %old, new = %url, "next hop changed: closing the connection at the old one");
            if let Err(e) = self.call_close(ctx, old, conn.clone()).await {
                tracing::warn!(error = %e.message(), "closing at the old next hop failed");
            }
        }
        let (ch, server) = self.pool.get_with_peer(&url).await?;
        let r = self.tonic_request(&server, ctx, req)?;
        // Queued only once the request is built, so they go out with it.
        if let (Some(fds), Some(files)) = (&server.fds, ctx.ext.get::<PassFiles>()) {
            for f in &files.0 {
                if let Err(e) = fds.send_path(f) {
                    tracing::debug!(error = %e, "not passing a file with the request");
                }
            }
        }
        let conn =
            NetworkServiceClient::new(ch).request(r).await.map_err(|e| self.downstream_error(&url, e))?.into_inner();
        // The server this call reached: the client-side policy checks the
        // tokens it returned against its certificate (mTLS), and the
        // forwarder opens the netns an endpoint passed with its answer
        // (unix, also in plaintext).
        if server.spiffe_id.is_some() || server.fds.is_some() {
            ctx.ext.insert(server);
        }
        if let Some(m) = &ctx.meta {
            m.client_insert(DialedUrl(url));
        }
        Ok(conn)
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, _next: Next) -> Result<(), Status> {
        let previous = ctx.meta.as_ref().and_then(|m| m.client_remove::<DialedUrl>()).map(|d| d.0);
        let Some(url) = previous.or_else(|| ctx.client_url.clone()) else {
            tracing::debug!(conn_id = %conn.id, "close: this connection was never sent downstream");
            return Ok(());
        };
        self.call_close(ctx, &url, conn).await
    }
}
