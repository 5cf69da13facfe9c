//! `timeout` (server): closes a connection whose caller stopped refreshing.
//!
//! # Guarantees
//! - After each successful Request a timer is (re)armed for the expiry of the
//!   caller's token (`path_segments[index-1].expires`); when it fires the
//!   connection is closed through `begin`'s event factory, i.e. through the
//!   rest of the chain, exactly as if the caller had sent Close.
//! - A refresh re-arms the timer; Close disarms it.
//! - A caller that sent no expiry (a plain gRPC client without NSM metadata)
//!   gets `default_lifetime` from now, instead of upstream's error.
//!
//! # Chain placement
//! In the endpoint prefix ([`super::chains`], which states the order), after
//! `begin` (its events), `updatetoken` (the expiry it reads) and `metadata`
//! (its timer is stored there).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nsm_api::connection::Connection;
use nsm_api::networkservice::NetworkServiceRequest;
use tonic::Status;

use super::chain::{ConnResult, Context, Element, Next};
use crate::tools::token;

/// The `timeout` element.
pub struct Timeout {
    default_lifetime: Duration,
}

/// Aborts a task when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct AbortOnDrop(Arc<tokio::task::AbortHandle>);

impl AbortOnDrop {
    /// Wraps a spawned task.
    pub fn new<T>(h: tokio::task::JoinHandle<T>) -> AbortOnDrop {
        AbortOnDrop(Arc::new(h.abort_handle()))
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if Arc::strong_count(&self.0) == 1 {
            self.0.abort();
        }
    }
}

#[derive(Clone)]
struct Timer(#[allow(dead_code)] AbortOnDrop);

impl Timeout {
    /// `timeout` with the lifetime used when the caller sent no expiry.
    pub fn new(default_lifetime: Duration) -> Arc<Timeout> {
        Arc::new(Timeout { default_lifetime })
    }
}

fn caller_expiry(conn: &Connection) -> Option<SystemTime> {
    conn.prev_path_segment()?.expires.as_ref().and_then(token::from_timestamp)
}

#[async_trait]
impl Element for Timeout {
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
        let (Some(events), Some(meta)) = (ctx.events.clone(), ctx.meta.clone()) else {
            return Err(Status::internal("chain misconfigured: timeout must come after begin and metadata"));
        };
        let conn = next.request(ctx, req).await?;
        let expires = caller_expiry(&conn).unwrap_or_else(|| {
            tracing::debug!(conn_id = %conn.id, "caller sent no token expiry; using the default lifetime");
            SystemTime::now() + self.default_lifetime
        });
        let wait = expires.duration_since(SystemTime::now()).unwrap_or_default();
        let task = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            events.close("the caller's token expired without a refresh");
        });
        meta.server_insert(Timer(AbortOnDrop::new(task)));
        Ok(conn)
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        if let Some(meta) = &ctx.meta {
            meta.server_remove::<Timer>();
        }
        next.close(ctx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use nsm_api::connection::{Path, PathSegment};

    use super::*;
    use crate::networkservice::begin::Begin;
    use crate::networkservice::chain::Chain;
    use crate::networkservice::metadata::Metadata;
    use crate::testing::Record;

    fn req(expires_in: Option<Duration>) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: "b".into(),
                path: Some(Path {
                    index: 1,
                    path_segments: vec![
                        PathSegment {
                            name: "a".into(),
                            id: "a".into(),
                            expires: expires_in.map(|d| token::to_timestamp(SystemTime::now() + d)),
                            ..Default::default()
                        },
                        PathSegment { name: "b".into(), id: "b".into(), ..Default::default() },
                    ],
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn closes_after_expiry_unless_refreshed() {
        let log = Record::log();
        let begin = Begin::new();
        let chain = Chain::new(vec![
            begin.clone(),
            Metadata::new(),
            Timeout::new(Duration::from_secs(600)),
            Record::new("r", &log),
        ]);
        chain.request(&mut Context::default(), req(Some(Duration::from_millis(150)))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Refresh with a later expiry: the first timer must not fire.
        chain.request(&mut Context::default(), req(Some(Duration::from_millis(250)))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(!log.lock().unwrap().contains(&"close r".to_string()), "stale timer fired");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(log.lock().unwrap().contains(&"close r".to_string()), "expired connection not closed");
        assert_eq!(begin.len(), 0);
    }

    #[tokio::test]
    async fn close_disarms() {
        let log = Record::log();
        let chain = Chain::new(vec![
            Begin::new(),
            Metadata::new(),
            Timeout::new(Duration::from_secs(600)),
            Record::new("r", &log),
        ]);
        let conn = chain.request(&mut Context::default(), req(Some(Duration::from_millis(80)))).await.unwrap();
        chain.close(&mut Context::default(), conn).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(log.lock().unwrap().iter().filter(|s| *s == "close r").count(), 1);
    }

    #[tokio::test]
    async fn missing_expiry_uses_default() {
        let log = Record::log();
        let chain = Chain::new(vec![
            Begin::new(),
            Metadata::new(),
            Timeout::new(Duration::from_millis(60)),
            Record::new("r", &log),
        ]);
        chain.request(&mut Context::default(), req(None)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(log.lock().unwrap().contains(&"close r".to_string()));
    }

    #[tokio::test]
    async fn misplaced_is_an_error() {
        let chain = Chain::new(vec![Timeout::new(Duration::from_secs(1))]);
        let e = chain.request(&mut Context::default(), req(None)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
    }
}
