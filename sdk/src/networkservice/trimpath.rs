//! `trimpath`: an endpoint returns the path only up to itself.
//!
//! The server element truncates `path_segments` to `[0..=index]` in the
//! response unless a client-side `trimpath` ran during this call (then this
//! hop is a passthrough and the downstream segments are real).
//!
//! # Chain placement
//! The server element is last in the endpoint prefix ([`super::chains`]);
//! the client element is in the passthrough client chain there.

use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::networkservice::NetworkServiceRequest;

use super::chain::{ConnResult, Context, Element, Next};

#[derive(Clone, Copy)]
struct Passthrough;

/// Server `trimpath`.
pub struct TrimPath;

/// Client `trimpath`: marks the call as passing through.
pub struct TrimPathClient;

impl TrimPath {
    /// Server side.
    pub fn server() -> Arc<TrimPath> {
        Arc::new(TrimPath)
    }
    /// Client side.
    pub fn client() -> Arc<TrimPathClient> {
        Arc::new(TrimPathClient)
    }
}

#[async_trait]
impl Element for TrimPath {
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
        let mut conn = next.request(ctx, req).await?;
        if ctx.ext.get::<Passthrough>().is_none()
            && let Some(p) = conn.path.as_mut()
        {
            p.path_segments.truncate(p.index as usize + 1);
        }
        Ok(conn)
    }
}

#[async_trait]
impl Element for TrimPathClient {
    fn name(&self) -> &'static str {
        "trimpath-client"
    }
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
        ctx.ext.insert(Passthrough);
        next.request(ctx, req).await
    }
}

#[cfg(test)]
mod tests {
    use nsm_api::connection::{Connection, Path, PathSegment};

    use super::*;
    use crate::networkservice::chain::Chain;

    fn req() -> NetworkServiceRequest {
        let segs = (0..4).map(|i| PathSegment { name: format!("s{i}"), ..Default::default() }).collect();
        NetworkServiceRequest {
            connection: Some(Connection { path: Some(Path { index: 1, path_segments: segs }), ..Default::default() }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn endpoint_trims_passthrough_keeps() {
        let c = Chain::new(vec![TrimPath::server()]).request(&mut Context::default(), req()).await.unwrap();
        assert_eq!(c.path.unwrap().path_segments.len(), 2);
        let c = Chain::new(vec![TrimPath::server(), TrimPath::client()])
            .request(&mut Context::default(), req())
            .await
            .unwrap();
        assert_eq!(c.path.unwrap().path_segments.len(), 4);
    }
}
