//! Registries of network services (NS) and endpoints (NSE).
//!
//! Every registry — the in-memory store, a remote registry reached over
//! gRPC, the nsmgr's relay that rewrites URLs — implements [`NsRegistry`] /
//! [`NseRegistry`], so they stack as decorators and the same tonic adapters
//! ([`NsRegistryServer`], [`NseRegistryServer`]) serve any of them.
//!
//! Find is "by example" (see [`memory`]); a non-watch Find returns the
//! current matches and ends, a watch Find keeps streaming updates with
//! `deleted = true` for removals.

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use nsm_api::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_api::registry::network_service_endpoint_registry_server::{
    NetworkServiceEndpointRegistry, NetworkServiceEndpointRegistryServer,
};
use nsm_api::registry::network_service_registry_client::NetworkServiceRegistryClient;
use nsm_api::registry::network_service_registry_server::{NetworkServiceRegistry, NetworkServiceRegistryServer};
use nsm_api::registry::{
    NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery, NetworkServiceEndpointResponse,
    NetworkServiceQuery, NetworkServiceResponse,
};
use tonic::{Request, Response, Status};
use url::Url;

use crate::networkservice::chain::{Context, Peer};
use crate::networkservice::connect::DEFAULT_CALL_TIMEOUT;
use crate::networkservice::server::context_of;
use crate::tools::grpc::ChannelPool;
use crate::tools::token::{self, SharedTokenGenerator};
use authorize::PathSlot;
use tonic::transport::Channel;

pub mod authorize;
pub mod client;
pub mod expire;
pub mod interdomain;
pub mod memory;

/// Stream of NS Find results.
pub type NsStream = Pin<Box<dyn Stream<Item = Result<NetworkServiceResponse, Status>> + Send>>;
/// Stream of NSE Find results.
pub type NseStream = Pin<Box<dyn Stream<Item = Result<NetworkServiceEndpointResponse, Status>> + Send>>;

/// A NetworkService registry.
#[async_trait]
pub trait NsRegistry: Send + Sync + 'static {
    /// Creates or updates; returns the stored object.
    async fn register(&self, ctx: &Context, ns: NetworkService) -> Result<NetworkService, Status>;
    /// Finds by example; `watch` keeps the stream open.
    async fn find(&self, ctx: &Context, q: NetworkServiceQuery) -> Result<NsStream, Status>;
    /// Removes (no error if absent).
    async fn unregister(&self, ctx: &Context, ns: NetworkService) -> Result<(), Status>;
}

/// A NetworkServiceEndpoint registry.
#[async_trait]
pub trait NseRegistry: Send + Sync + 'static {
    /// Creates or updates; returns the stored object (name, expiration and
    /// URL may differ from the input).
    async fn register(&self, ctx: &Context, nse: NetworkServiceEndpoint) -> Result<NetworkServiceEndpoint, Status>;
    /// Finds by example; `watch` keeps the stream open.
    async fn find(&self, ctx: &Context, q: NetworkServiceEndpointQuery) -> Result<NseStream, Status>;
    /// Removes (no error if absent).
    async fn unregister(&self, ctx: &Context, nse: NetworkServiceEndpoint) -> Result<(), Status>;
}

/// Collects a non-watch NS Find.
pub async fn find_ns(reg: &dyn NsRegistry, ctx: &Context, ns: NetworkService) -> Result<Vec<NetworkService>, Status> {
    let mut s = reg.find(ctx, NetworkServiceQuery { network_service: Some(ns), watch: false }).await?;
    let mut out = vec![];
    while let Some(r) = s.next().await {
        if let Some(ns) = r?.network_service {
            out.push(ns);
        }
    }
    Ok(out)
}

/// Collects a non-watch NSE Find.
pub async fn find_nses(
    reg: &dyn NseRegistry,
    ctx: &Context,
    nse: NetworkServiceEndpoint,
) -> Result<Vec<NetworkServiceEndpoint>, Status> {
    let mut s =
        reg.find(ctx, NetworkServiceEndpointQuery { network_service_endpoint: Some(nse), watch: false }).await?;
    let mut out = vec![];
    while let Some(r) = s.next().await {
        if let Some(nse) = r?.network_service_endpoint {
            out.push(nse);
        }
    }
    Ok(out)
}

// === gRPC server adapters ===

/// Serves any [`NsRegistry`] as `registry.NetworkServiceRegistry`.
#[derive(Clone)]
pub struct NsRegistryServer(pub Arc<dyn NsRegistry>);

/// Serves any [`NseRegistry`] as `registry.NetworkServiceEndpointRegistry`.
#[derive(Clone)]
pub struct NseRegistryServer(pub Arc<dyn NseRegistry>);

impl NsRegistryServer {
    /// The tonic service.
    pub fn into_service(self) -> NetworkServiceRegistryServer<NsRegistryServer> {
        NetworkServiceRegistryServer::new(self)
    }
}

impl NseRegistryServer {
    /// The tonic service.
    pub fn into_service(self) -> NetworkServiceEndpointRegistryServer<NseRegistryServer> {
        NetworkServiceEndpointRegistryServer::new(self)
    }
}

#[async_trait]
impl NetworkServiceRegistry for NsRegistryServer {
    type FindStream = NsStream;

    async fn register(&self, r: Request<NetworkService>) -> Result<Response<NetworkService>, Status> {
        let (ctx, slot) = with_path_slot(&r);
        let ns = r.into_inner();
        let name = ns.name.clone();
        let res = self.0.register(&ctx, ns).await;
        match &res {
            Ok(_) => tracing::debug!(ns = %name, "network service registered"),
            Err(e) => tracing::warn!(ns = %name, error = %e.message(), "network service registration failed"),
        }
        res.map(|v| respond(v, &slot))
    }

    async fn find(&self, r: Request<NetworkServiceQuery>) -> Result<Response<NsStream>, Status> {
        let ctx = context_of(&r);
        self.0.find(&ctx, r.into_inner()).await.map(Response::new)
    }

    async fn unregister(&self, r: Request<NetworkService>) -> Result<Response<()>, Status> {
        let (ctx, slot) = with_path_slot(&r);
        self.0.unregister(&ctx, r.into_inner()).await.map(|v| respond(v, &slot))
    }
}

#[async_trait]
impl NetworkServiceEndpointRegistry for NseRegistryServer {
    type FindStream = NseStream;

    async fn register(&self, r: Request<NetworkServiceEndpoint>) -> Result<Response<NetworkServiceEndpoint>, Status> {
        let (ctx, slot) = with_path_slot(&r);
        let nse = r.into_inner();
        let name = nse.name.clone();
        let res = self.0.register(&ctx, nse).await;
        match &res {
            Ok(n) => tracing::debug!(nse = %n.name, url = %n.url, by = ?ctx.peer.spiffe_id, "endpoint registered"),
            Err(e) => {
                tracing::warn!(nse = %name, by = ?ctx.peer.spiffe_id, error = %e.message(), "endpoint registration failed")
            }
        }
        res.map(|v| respond(v, &slot))
    }

    async fn find(&self, r: Request<NetworkServiceEndpointQuery>) -> Result<Response<NseStream>, Status> {
        let ctx = context_of(&r);
        self.0.find(&ctx, r.into_inner()).await.map(Response::new)
    }

    async fn unregister(&self, r: Request<NetworkServiceEndpoint>) -> Result<Response<()>, Status> {
        let (ctx, slot) = with_path_slot(&r);
        let nse = r.into_inner();
        tracing::debug!(nse = %nse.name, by = ?ctx.peer.spiffe_id, "endpoint unregistered");
        self.0.unregister(&ctx, nse).await.map(|v| respond(v, &slot))
    }
}

/// The call's context, with a [`PathSlot`] for the updated registry path.
fn with_path_slot<T>(r: &Request<T>) -> (Context, PathSlot) {
    let mut ctx = context_of(r);
    let slot = PathSlot::default();
    ctx.ext.insert(slot.clone());
    (ctx, slot)
}

/// The response, with the updated registry path (if the chain left one) in
/// the `path` header, as upstream's `grpcmetadata` sends it.
fn respond<T>(v: T, slot: &PathSlot) -> Response<T> {
    let mut resp = Response::new(v);
    if let Some(p) = slot.take() {
        p.to_metadata(resp.metadata_mut());
    }
    resp
}

// === remote registry over gRPC ===

/// A registry reached over gRPC (the registry service, or the nsmgr's
/// registry relay for components on a node). Implements both traits.
#[derive(Clone)]
pub struct RemoteRegistry {
    url: Url,
    pool: ChannelPool,
    tokens: Option<SharedTokenGenerator>,
}

impl RemoteRegistry {
    /// A registry at `url`, dialed through `pool`.
    pub fn new(url: Url, pool: ChannelPool) -> RemoteRegistry {
        RemoteRegistry { url, pool, tokens: None }
    }

    /// Sends this hop's per-RPC token (`nsm-client-token`, audience: the
    /// registry's SPIFFE ID) on every call, as upstream's registry clients
    /// do; registries that authorize need it.
    pub fn with_tokens(mut self, tokens: SharedTokenGenerator) -> RemoteRegistry {
        self.tokens = Some(tokens);
        self
    }

    /// Where this registry lives.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// A channel to the registry and the call on it: deadline, registry
    /// path and token.
    async fn req<T>(&self, ctx: &Context, msg: T, streaming: bool) -> Result<(Channel, Request<T>), Status> {
        let (ch, server) = self.pool.get_with_peer(&self.url).await?;
        let mut r = Request::new(msg);
        if !streaming {
            r.set_timeout(ctx.remaining().unwrap_or(DEFAULT_CALL_TIMEOUT));
            // Continue the registry path (nsm-spec §1.9.3) that this hop's
            // `authorize::UpdatePath` left in the context, if any.
            authorize::forward_path(ctx, r.metadata_mut());
        }
        if let Some(t) = &self.tokens {
            let peer = Peer {
                spiffe_id: server.spiffe_id.clone(),
                cert_der: server.cert_der.clone(),
                local_svid: server.local.clone(),
                ..Default::default()
            };
            token::put(r.metadata_mut(), &t.generate(&peer)?);
        }
        Ok((ch, r))
    }

    fn err(&self, e: Status) -> Status {
        if e.code() == tonic::Code::Unavailable {
            self.pool.evict(&self.url);
        }
        Status::new(e.code(), format!("registry {}: {}", self.url, e.message()))
    }
}

/// Bounds a non-watch Find by the caller's deadline; a watch Find is
/// unbounded by design.
fn bounded<T: Send + 'static>(
    ctx: &Context,
    watch: bool,
    s: impl Stream<Item = Result<T, Status>> + Send + 'static,
) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
    match (watch, ctx.remaining()) {
        (false, Some(left)) => {
            let deadline = tokio::time::Instant::now() + left;
            Box::pin(s.take_until(tokio::time::sleep_until(deadline)))
        }
        _ => Box::pin(s),
    }
}

/// The registry traits over gRPC (`$client` is the generated client of
/// the service); written once for both.
macro_rules! remote_for {
    ($reg:ident, $rec:ty, $query:ty, $stream:ty, $client:ident) => {
        #[async_trait]
        impl $reg for RemoteRegistry {
            async fn register(&self, ctx: &Context, rec: $rec) -> Result<$rec, Status> {
                let (ch, r) = self.req(ctx, rec, false).await?;
                Ok($client::new(ch).register(r).await.map_err(|e| self.err(e))?.into_inner())
            }
            async fn find(&self, ctx: &Context, q: $query) -> Result<$stream, Status> {
                let watch = q.watch;
                let (ch, r) = self.req(ctx, q, true).await?;
                let s = $client::new(ch).find(r).await.map_err(|e| self.err(e))?.into_inner();
                Ok(bounded(ctx, watch, s))
            }
            async fn unregister(&self, ctx: &Context, rec: $rec) -> Result<(), Status> {
                let (ch, r) = self.req(ctx, rec, false).await?;
                $client::new(ch).unregister(r).await.map_err(|e| self.err(e))?;
                Ok(())
            }
        }
    };
}

remote_for!(NsRegistry, NetworkService, NetworkServiceQuery, NsStream, NetworkServiceRegistryClient);
remote_for!(
    NseRegistry,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NseStream,
    NetworkServiceEndpointRegistryClient
);
