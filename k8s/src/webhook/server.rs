//! HTTPS for the API server: `POST /mutate` (AdmissionReview v1 in, the
//! review with its response out), `GET /ready` (200 once registered).
//! HTTP/1.1 over TLS ([`super::tls`]); each connection in its own task,
//! the TLS handshake bounded by [`HANDSHAKE_TIMEOUT`], bodies by
//! [`MAX_BODY`] (the API server's own request limit).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use nsm_sdk::tools::grpc::Listeners;
use tokio_rustls::TlsAcceptor;

/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest AdmissionReview accepted.
pub const MAX_BODY: usize = 6 * 1024 * 1024;

/// Answers one AdmissionReview body with the review to send back.
#[async_trait::async_trait]
pub trait Review: Send + Sync + 'static {
    async fn review(&self, body: &[u8]) -> Result<Vec<u8>, String>;
}

/// Serves `listeners` with `acceptor` until `shutdown`; `ready` says
/// whether `/ready` answers 200.
pub async fn serve(
    listeners: Listeners,
    acceptor: TlsAcceptor,
    handler: Arc<dyn Review>,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (mut incoming, _guard) = listeners.into_incoming();
    tokio::pin!(shutdown);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let conn = tokio::select! {
            _ = &mut shutdown => break,
            c = incoming.next() => c,
        };
        let Some(conn) = conn else { break };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                continue;
            }
        };
        let (acceptor, handler, ready) = (acceptor.clone(), handler.clone(), ready.clone());
        conns.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "TLS handshake failed (does the caBundle of the webhook configuration match?)");
                    return;
                }
                Err(_) => {
                    tracing::info!("TLS handshake timed out");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let (handler, ready) = (handler.clone(), ready.clone());
                async move { Ok::<_, Infallible>(route(req, handler.as_ref(), &ready).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
        while conns.try_join_next().is_some() {}
    }
    // In-flight reviews get a moment to finish.
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while conns.join_next().await.is_some() {} }).await;
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn route(req: Request<Incoming>, handler: &dyn Review, ready: &AtomicBool) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => {
            if ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ok\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not registered yet\n")
            }
        }
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return text(StatusCode::PAYLOAD_TOO_LARGE, format!("reading the request body: {e}\n")),
            };
            match handler.review(&body).await {
                Ok(json) => {
                    let mut r = text(StatusCode::OK, json);
                    r.headers_mut()
                        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                    r
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (_, "/mutate" | "/ready") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST /mutate or GET /ready\n"),
        _ => text(StatusCode::NOT_FOUND, "this is an NSM admission webhook: POST /mutate, GET /ready\n"),
    }
}
