//! The gRPC face of a chain: `networkservice.NetworkService` served by
//! running every call through a [`Chain`].
//!
//! Each call gets a [`Context`] with the caller's deadline (`grpc-timeout`,
//! default [`DEFAULT_CALL_TIMEOUT`]), its unix credentials or address, and
//! its metadata; one `info` log line per call says what happened and how
//! long it took, with the connection id and service as span fields.

use std::time::Instant;

use async_trait::async_trait;
use nsm_api::connection::Connection;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_server::NetworkService;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::chain::{Chain, Context};
use super::connect::DEFAULT_CALL_TIMEOUT;
use crate::tools::grpc::{ConnInfo, parse_grpc_timeout};

/// Serves a chain as `networkservice.NetworkService`.
#[derive(Clone, Debug)]
pub struct ChainServer {
    chain: Chain,
}

impl ChainServer {
    /// Wraps `chain`.
    pub fn new(chain: Chain) -> ChainServer {
        ChainServer { chain }
    }

    /// The tonic service, ready for `Server::add_service`.
    pub fn into_service(self) -> nsm_api::networkservice::network_service_server::NetworkServiceServer<ChainServer> {
        nsm_api::networkservice::network_service_server::NetworkServiceServer::new(self)
    }
}

/// Builds the chain context of an incoming call.
pub fn context_of<T>(r: &Request<T>) -> Context {
    let timeout = r
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(DEFAULT_CALL_TIMEOUT);
    let mut ctx = Context::with_timeout(timeout);
    if let Some(ci) = r.extensions().get::<ConnInfo>() {
        ctx.peer = ci.peer.clone();
    }
    ctx.incoming = r.metadata().clone();
    ctx
}

fn summary(c: &Connection) -> String {
    let segs: Vec<_> = c.path.iter().flat_map(|p| p.path_segments.iter()).map(|s| s.name.as_str()).collect();
    segs.join(" -> ")
}

#[async_trait]
impl NetworkService for ChainServer {
    async fn request(&self, r: Request<NetworkServiceRequest>) -> Result<Response<Connection>, Status> {
        let mut ctx = context_of(&r);
        let req = r.into_inner();
        let (id, svc) = req.connection.as_ref().map(|c| (c.id.clone(), c.network_service.clone())).unwrap_or_default();
        let span = tracing::info_span!("request", conn_id = %id, service = %svc);
        let t0 = Instant::now();
        let res = self.chain.request(&mut ctx, req).instrument(span.clone()).await;
        let _g = span.enter();
        match &res {
            Ok(c) => tracing::info!(
                took = ?t0.elapsed(),
                nse = %c.network_service_endpoint_name,
                path = %summary(c),
                "request ok"
            ),
            Err(e) => tracing::warn!(took = ?t0.elapsed(), code = ?e.code(), error = %e.message(), "request failed"),
        }
        res.map(Response::new)
    }

    async fn close(&self, r: Request<Connection>) -> Result<Response<()>, Status> {
        let mut ctx = context_of(&r);
        let conn = r.into_inner();
        let span = tracing::info_span!("close", conn_id = %conn.id, service = %conn.network_service);
        let t0 = Instant::now();
        let res = self.chain.close(&mut ctx, conn).instrument(span.clone()).await;
        let _g = span.enter();
        match &res {
            Ok(()) => tracing::info!(took = ?t0.elapsed(), "close ok"),
            Err(e) => tracing::warn!(took = ?t0.elapsed(), code = ?e.code(), error = %e.message(), "close failed"),
        }
        res.map(Response::new)
    }
}
