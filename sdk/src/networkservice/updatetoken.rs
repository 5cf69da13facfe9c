//! `updatetoken` (server): records the caller's token in the previous path
//! segment and mints this hop's token into its own segment.
//!
//! # Guarantees
//! - `path_segments[index-1]` gets the token and expiry the caller sent as
//!   per-RPC metadata (if it sent them); the expiry is never later than the
//!   token's own `exp` claim (the header is only the caller's say-so, and
//!   `timeout` closes the connection at that expiry).
//! - `path_segments[index]` gets a fresh token for the caller as peer; a
//!   refresh re-mints it.
//!
//! # Chain placement
//! In the endpoint prefix ([`super::chains`], which states the order), before
//! `authorize` and `timeout`: both read what it writes.

use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::connection::Connection;
use nsm_api::networkservice::NetworkServiceRequest;
use tonic::Status;

use super::chain::{ConnResult, Context, Element, Next, conn_mut};
use crate::tools::token::{self, SharedTokenGenerator};

/// The `updatetoken` element.
pub struct UpdateToken {
    tokens: SharedTokenGenerator,
}

impl UpdateToken {
    /// `updatetoken` minting with `tokens`.
    pub fn new(tokens: SharedTokenGenerator) -> Arc<UpdateToken> {
        Arc::new(UpdateToken { tokens })
    }

    fn apply(&self, ctx: &Context, conn: &mut Connection) -> Result<(), Status> {
        let Some(path) = conn.path.as_mut() else { return Ok(()) };
        let idx = path.index as usize;
        if idx > 0
            && let Some(t) = token::get(&ctx.incoming)
            && let Some(prev) = path.path_segments.get_mut(idx - 1)
        {
            let exp = match crate::security::jwt::decode(&t.token) {
                Ok((_, c)) if c.exp > 0 => t.expires.min(c.expires()),
                _ => t.expires,
            };
            prev.token = t.token;
            prev.expires = Some(token::to_timestamp(exp));
        }
        let mine = self.tokens.generate(&ctx.peer)?;
        if let Some(cur) = path.path_segments.get_mut(idx) {
            cur.token = mine.token;
            cur.expires = Some(token::to_timestamp(mine.expires));
        }
        Ok(())
    }
}

#[async_trait]
impl Element for UpdateToken {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        self.apply(ctx, conn_mut(&mut req))?;
        next.request(ctx, req).await
    }

    async fn close(&self, ctx: &mut Context, mut conn: Connection, next: Next) -> Result<(), Status> {
        self.apply(ctx, &mut conn)?;
        next.close(ctx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use nsm_api::connection::{Path, PathSegment};

    use super::*;
    use crate::networkservice::chain::Chain;
    use crate::tools::token::{ExpiryOnly, Token};

    #[tokio::test]
    async fn copies_caller_expiry_and_mints_own() {
        let chain = Chain::new(vec![UpdateToken::new(ExpiryOnly::new(Duration::from_secs(60)))]);
        let mut ctx = Context::default();
        let exp = SystemTime::now() + Duration::from_secs(30);
        token::put(&mut ctx.incoming, &Token { token: "caller".into(), expires: exp });
        let req = NetworkServiceRequest {
            connection: Some(Connection {
                path: Some(Path {
                    index: 1,
                    path_segments: vec![
                        PathSegment { name: "nsc".into(), ..Default::default() },
                        PathSegment { name: "nsmgr".into(), ..Default::default() },
                    ],
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let conn = chain.request(&mut ctx, req).await.unwrap();
        let segs = conn.path.unwrap().path_segments;
        assert_eq!(segs[0].token, "caller");
        let prev = token::from_timestamp(segs[0].expires.as_ref().unwrap()).unwrap();
        assert!(prev.duration_since(exp).unwrap_or_else(|e| e.duration()) < Duration::from_millis(1));
        let mine = token::from_timestamp(segs[1].expires.as_ref().unwrap()).unwrap();
        assert!(mine > SystemTime::now() + Duration::from_secs(50));
    }

    #[tokio::test]
    async fn a_claimed_expiry_past_the_tokens_own_is_cut_to_it() {
        let pki = crate::security::jwt::testpki::TestPki::new();
        let nsc = pki.svid("spiffe://test.local/nsc");
        let now = crate::security::jwt::testpki::now();
        let jwt = crate::security::policy::tests::token(&nsc, "spiffe://test.local/nsmgr", now + 60);
        let chain = Chain::new(vec![UpdateToken::new(ExpiryOnly::new(Duration::from_secs(60)))]);
        let mut ctx = Context::default();
        token::put(&mut ctx.incoming, &Token { token: jwt, expires: SystemTime::now() + Duration::from_secs(86400) });
        let req = NetworkServiceRequest {
            connection: Some(Connection {
                path: Some(Path { index: 1, path_segments: vec![PathSegment::default(), PathSegment::default()] }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let conn = chain.request(&mut ctx, req).await.unwrap();
        let prev = token::from_timestamp(conn.path.unwrap().path_segments[0].expires.as_ref().unwrap()).unwrap();
        let exp = std::time::UNIX_EPOCH + Duration::from_secs((now + 60) as u64);
        assert_eq!(prev, exp, "the segment expires with the token, not with the header's claim");
    }
}
