//! The gRPC face of a chain: `networkservice.NetworkService` served by
//! running every call through a [`Chain`].
//!
//! Each call gets a [`Context`] with the caller's deadline (`grpc-timeout`,
//! default [`DEFAULT_CALL_TIMEOUT`]), its unix credentials or address, and
//! its metadata; one `info` log line per call says what happened and how
//! long it took, with the connection id and service as span fields.
//!
//! # Cancellation
//! tonic drops a handler's future when the caller cancels or its deadline
//! passes. A chain dropped half way would skip every element's cleanup
//! (which runs on the error path), leaving interfaces, leases and state
//! behind. So each call runs in its own task that always finishes (bounded
//! by the deadline the downstream calls carry), and a Request that succeeds
//! after its caller has gone is closed again at once.

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

/// The SPIFFE IDs that signed the path's tokens (`sub`), in path order;
/// empty in plaintext mode (no JWTs).
fn identities(c: &Connection) -> String {
    let ids: Vec<String> = c
        .path
        .iter()
        .flat_map(|p| p.path_segments.iter())
        .filter_map(|s| crate::security::jwt::decode(&s.token).ok().map(|(_, c)| c.sub))
        .collect();
    ids.join(" -> ")
}

fn peer_of(ctx: &Context) -> String {
    ctx.peer.spiffe_id.clone().unwrap_or_else(|| "-".to_string())
}

/// Runs a chain call in its own task, so a caller that hangs up (or whose
/// deadline passes) does not cancel it half way and leave state behind;
/// returns its result, or hands it to `abandoned` when nobody waits for it
/// any more.
async fn run_to_completion<T, A, AF>(
    what: &'static str,
    span: tracing::Span,
    call: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
    abandoned: A,
) -> Result<T, Status>
where
    T: Send + 'static,
    A: FnOnce(Result<T, Status>) -> AF + Send + 'static,
    AF: std::future::Future<Output = ()> + Send,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(
        async move {
            if let Err(res) = tx.send(call.await) {
                abandoned(res).await;
            }
        }
        .instrument(span),
    );
    rx.await.unwrap_or_else(|_| Err(Status::internal(format!("{what} task ended without an answer"))))
}

#[async_trait]
impl NetworkService for ChainServer {
    async fn request(&self, r: Request<NetworkServiceRequest>) -> Result<Response<Connection>, Status> {
        let mut ctx = context_of(&r);
        let req = r.into_inner();
        let (id, svc) = req.connection.as_ref().map(|c| (c.id.clone(), c.network_service.clone())).unwrap_or_default();
        let span = tracing::info_span!("request", conn_id = %id, service = %svc, peer = %peer_of(&ctx));
        let chain = self.chain.clone();
        let abandoned = chain.clone();
        let call = async move {
            let t0 = Instant::now();
            let res = chain.request(&mut ctx, req).await;
            match &res {
                Ok(c) => tracing::info!(
                    took = ?t0.elapsed(),
                    nse = %c.network_service_endpoint_name,
                    path = %summary(c),
                    ids = %identities(c),
                    "request ok"
                ),
                Err(e) => {
                    tracing::warn!(took = ?t0.elapsed(), code = ?e.code(), error = %e.message(), "request failed")
                }
            }
            res
        };
        let on_abandoned = |res: Result<Connection, Status>| async move {
            if let Ok(conn) = res {
                tracing::warn!("the caller went away before the answer; closing the connection it would have got");
                let mut cctx = Context::with_timeout(DEFAULT_CALL_TIMEOUT);
                if let Err(e) = abandoned.close(&mut cctx, conn).await {
                    tracing::warn!(error = %e.message(), "closing the abandoned connection failed");
                }
            }
        };
        run_to_completion("request", span, call, on_abandoned).await.map(Response::new)
    }

    async fn close(&self, r: Request<Connection>) -> Result<Response<()>, Status> {
        let mut ctx = context_of(&r);
        let conn = r.into_inner();
        let span =
            tracing::info_span!("close", conn_id = %conn.id, service = %conn.network_service, peer = %peer_of(&ctx));
        let chain = self.chain.clone();
        let call = async move {
            let t0 = Instant::now();
            let res = chain.close(&mut ctx, conn).await;
            match &res {
                Ok(()) => tracing::info!(took = ?t0.elapsed(), "close ok"),
                Err(e) => tracing::warn!(took = ?t0.elapsed(), code = ?e.code(), error = %e.message(), "close failed"),
            }
            res
        };
        run_to_completion("close", span, call, |_| async {}).await.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use nsm_api::networkservice::network_service_client::NetworkServiceClient;

    use super::*;
    use crate::networkservice::chain::{ConnResult, Element, Next};
    use crate::testing::{Record, request_with_id};
    use crate::tools::grpc::{Listeners, dial, parse_url};

    struct Sleep(Duration);

    #[async_trait]
    impl Element for Sleep {
        async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
            tokio::time::sleep(self.0).await;
            next.request(ctx, req).await
        }
    }

    /// A caller that gives up mid-request must not leave the chain half
    /// done: the chain finishes, and what it built is closed again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_request_is_finished_and_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let url = parse_url(&format!("unix://{}/s.sock", dir.path().display())).unwrap();
        let log = Record::log();
        let chain = Chain::new(vec![Record::new("r", &log), Arc::new(Sleep(Duration::from_millis(300)))]);
        let listeners = Listeners::bind(std::slice::from_ref(&url)).await.unwrap();
        let router = tonic::transport::Server::builder().add_service(ChainServer::new(chain).into_service());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::tools::daemon::serve(
            router,
            listeners,
            async move {
                let _ = stop_rx.await;
            },
            Duration::from_secs(1),
        ));
        let ch = dial(&url, Duration::from_secs(1)).await.unwrap();
        let mut r = tonic::Request::new(request_with_id("c1"));
        r.set_timeout(Duration::from_millis(50));
        let e = NetworkServiceClient::new(ch).request(r).await.unwrap_err();
        assert!(matches!(e.code(), tonic::Code::Cancelled | tonic::Code::DeadlineExceeded), "{e:?}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(*log.lock().unwrap(), ["r>", "<r", "close r"], "finished, then rolled back");
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }
}
