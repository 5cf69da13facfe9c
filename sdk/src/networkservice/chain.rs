//! The Request/Close chain: a slice of elements walked with a [`Next`] cursor.
//!
//! An element does its work on the way out (before calling `next`) and on the
//! way back (after `next` returns), exactly like a Go NSM
//! `NetworkServiceServer`/`Client`. The same [`Element`] trait serves both
//! server chains and client chains: a client chain is simply the chain that
//! the `connect` element runs before continuing with the rest of the server
//! chain.
//!
//! Why not tower: elements have two verbs, mutate the connection on the return
//! path, and need per-connection ordering (see `begin`). A slice plus a cursor
//! expresses that directly and keeps backtraces readable.
//!
//! [`Next`] owns an `Arc` of the chain plus a position, so it is `'static` and
//! cheap to clone: `begin` keeps one to replay Close/Request later (timeouts,
//! refresh), and `roundrobin` calls it once per candidate.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nsm_api::connection::Connection;
use nsm_api::networkservice::NetworkServiceRequest;
use tokio::time::Instant;
use tonic::Status;
use tracing::Instrument;

use super::begin::EventFactory;
use super::connect::DEFAULT_CALL_TIMEOUT;
use super::metadata::ConnMetadata;

/// What a Request through a chain (or an element) yields: the connection as
/// this hop returns it, or the failure.
pub type ConnResult = Result<Connection, Status>;

/// One step of a Request/Close chain.
#[async_trait]
pub trait Element: Send + Sync + 'static {
    /// Short name for logs, spans and chain listings (`updatepath`,
    /// `begin`, ...). Default: the type's name in lower case
    /// (`UpdatePath` → `updatepath`).
    fn name(&self) -> &'static str {
        type_name_lower(std::any::type_name::<Self>())
    }

    /// Handle a Request; call `next.request` to continue down the chain.
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult;

    /// Handle a Close; call `next.close` to continue down the chain. The
    /// default passes the Close on unchanged (elements that only act on
    /// Requests need not write it).
    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        next.close(ctx, conn).await
    }
}

/// `a::b::UpdatePath<F>` → `updatepath`, computed once per type and kept
/// for the life of the process (a few bytes per element type).
fn type_name_lower(full: &'static str) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{OnceLock, RwLock};
    static NAMES: OnceLock<RwLock<HashMap<&'static str, &'static str>>> = OnceLock::new();
    let names = NAMES.get_or_init(Default::default);
    if let Some(n) = names.read().unwrap_or_else(|e| e.into_inner()).get(full) {
        return n;
    }
    let base = full.split('<').next().unwrap_or(full);
    let short = base.rsplit("::").next().unwrap_or(base).to_ascii_lowercase();
    let leaked: &'static str = Box::leak(short.into_boxed_str());
    names.write().unwrap_or_else(|e| e.into_inner()).insert(full, leaked);
    leaked
}

/// Cursor over the rest of a chain.
#[derive(Clone)]
pub struct Next {
    chain: Arc<[Arc<dyn Element>]>,
    pos: usize,
}

impl Next {
    /// Runs the rest of the chain for a Request. The empty tail returns the
    /// request's connection, like Go's tail server.
    pub async fn request(self, ctx: &mut Context, req: NetworkServiceRequest) -> ConnResult {
        match self.chain.get(self.pos).cloned() {
            Some(e) => {
                let span = tracing::trace_span!("element", name = e.name());
                let next = Next { chain: self.chain, pos: self.pos + 1 };
                e.request(ctx, req, next).instrument(span).await
            }
            None => Ok(req.connection.unwrap_or_default()),
        }
    }

    /// Runs the rest of the chain for a Close.
    pub async fn close(self, ctx: &mut Context, conn: Connection) -> Result<(), Status> {
        match self.chain.get(self.pos).cloned() {
            Some(e) => {
                let span = tracing::trace_span!("element", name = e.name());
                let next = Next { chain: self.chain, pos: self.pos + 1 };
                e.close(ctx, conn, next).instrument(span).await
            }
            None => Ok(()),
        }
    }
}

impl Next {
    /// Closes what the rest of the chain set up for `conn` after this
    /// element failed on the way back (the wire could not be built, say), so
    /// a failed first Request leaves nothing behind downstream. Runs with a
    /// fresh budget ([`DEFAULT_CALL_TIMEOUT`]: the call's own may be spent)
    /// and the connection's metadata; a failure is logged, not returned
    /// (the caller reports its own error).
    pub async fn undo(self, ctx: &Context, conn: Connection) {
        let mut cctx = ctx.detached(DEFAULT_CALL_TIMEOUT);
        cctx.meta = ctx.meta.clone();
        if let Err(e) = self.close(&mut cctx, conn).await {
            tracing::warn!(error = %e.message(), "closing downstream after a failed request also failed");
        }
    }
}

impl std::fmt::Debug for Next {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.chain[self.pos..].iter().map(|e| e.name()).collect();
        f.debug_struct("Next").field("rest", &names).finish()
    }
}

/// A complete chain.
#[derive(Clone)]
pub struct Chain {
    elems: Arc<[Arc<dyn Element>]>,
}

impl Chain {
    /// Builds a chain from elements in call order.
    pub fn new(elems: Vec<Arc<dyn Element>>) -> Chain {
        Chain { elems: elems.into() }
    }

    /// A cursor at the start of the chain.
    pub fn start(&self) -> Next {
        Next { chain: self.elems.clone(), pos: 0 }
    }

    /// Runs a Request through the whole chain.
    pub async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest) -> ConnResult {
        self.start().request(ctx, req).await
    }

    /// Runs a Close through the whole chain.
    pub async fn close(&self, ctx: &mut Context, conn: Connection) -> Result<(), Status> {
        self.start().close(ctx, conn).await
    }

    /// Element names, in order (for logs and tests).
    pub fn names(&self) -> Vec<&'static str> {
        self.elems.iter().map(|e| e.name()).collect()
    }
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

/// Who is calling us, as far as the transport can tell.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// Credentials of the process on the other end of a unix socket.
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    /// Remote address of a TCP caller.
    pub addr: Option<std::net::SocketAddr>,
    /// SPIFFE ID of the TLS peer (mTLS).
    pub spiffe_id: Option<String>,
    /// DER of the TLS peer's leaf certificate (mTLS): tokens the peer signed
    /// are verified against it.
    pub cert_der: Option<std::sync::Arc<Vec<u8>>>,
    /// The SVID this side presented on the connection (mTLS): tokens for
    /// this peer are signed with it while it is valid.
    pub local_svid: Option<std::sync::Arc<crate::security::Svid>>,
    /// The fds the caller passed on its unix connection (grpcfd), and the
    /// queue of those going back to it.
    pub fds: Option<std::sync::Arc<crate::tools::grpcfd::FdTransfer>>,
}

/// Per-call state handed through a chain: the deadline, the caller, the
/// incoming gRPC metadata, the URL the client chain should dial, and the
/// per-connection metadata and event factory installed by `metadata` and
/// `begin`. Elements needing more attach typed values to [`Context::ext`].
#[derive(Debug, Default)]
pub struct Context {
    deadline: Option<Instant>,
    /// The caller.
    pub peer: Peer,
    /// gRPC metadata of the incoming call (tokens travel here).
    pub incoming: tonic::metadata::MetadataMap,
    /// Where the client chain's `connect` should send the request next.
    pub client_url: Option<url::Url>,
    /// Lets elements schedule a later Close/Request of this connection.
    pub events: Option<EventFactory>,
    /// Per-connection storage (server and client side).
    pub meta: Option<Arc<ConnMetadata>>,
    /// Typed per-call values (flags such as "a trimpath client ran").
    pub ext: http::Extensions,
}

impl Context {
    /// A context whose deadline is `timeout` from now.
    pub fn with_timeout(timeout: Duration) -> Context {
        Context { deadline: Some(Instant::now() + timeout), ..Default::default() }
    }

    /// The deadline of this call, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Sets or tightens the deadline (never extends an existing one).
    pub fn set_deadline(&mut self, d: Instant) {
        self.deadline = Some(match self.deadline {
            Some(old) if old < d => old,
            _ => d,
        });
    }

    /// Time left before the deadline (`None`: no deadline).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// A fresh context for a follow-up call of the same connection (used by
    /// events that outlive the original call): keeps the peer and metadata,
    /// drops per-call values.
    pub fn detached(&self, timeout: Duration) -> Context {
        Context {
            deadline: Some(Instant::now() + timeout),
            peer: self.peer.clone(),
            incoming: self.incoming.clone(),
            ..Default::default()
        }
    }
}

/// Convenience: the connection of a request, created if absent.
pub fn conn_mut(req: &mut NetworkServiceRequest) -> &mut Connection {
    req.connection.get_or_insert_with(Default::default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Inject, Record};

    #[tokio::test]
    async fn runs_in_order_and_tail_returns_connection() {
        let log = Record::log();
        let chain = Chain::new(vec![Record::new("a", &log), Record::new("b", &log)]);
        let mut ctx = Context::default();
        let req = NetworkServiceRequest {
            connection: Some(Connection { id: "x".into(), ..Default::default() }),
            ..Default::default()
        };
        let conn = chain.request(&mut ctx, req).await.unwrap();
        assert_eq!(conn.id, "x");
        assert_eq!(*log.lock().unwrap(), vec!["a>", "b>", "<b", "<a"]);
        chain.close(&mut ctx, conn).await.unwrap();
        assert_eq!(log.lock().unwrap()[4..], ["close a", "close b"]);
    }

    #[tokio::test]
    async fn errors_stop_the_chain() {
        let log = Record::log();
        let chain = Chain::new(vec![
            Record::new("a", &log),
            Inject::error(tonic::Code::NotFound, "boom"),
            Record::new("never", &log),
        ]);
        let err = chain.request(&mut Context::default(), Default::default()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert_eq!(*log.lock().unwrap(), vec!["a>", "<a"], "the error travels back through a");
    }

    #[test]
    fn default_names_are_the_lowercase_type_name() {
        struct UpdatePathLike;
        #[async_trait]
        impl Element for UpdatePathLike {
            async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
                next.request(ctx, req).await
            }
        }
        assert_eq!(UpdatePathLike.name(), "updatepathlike");
        assert_eq!(crate::testing::OnClose::new(|_| {}).name(), "onclose", "generics are left out");
        let chain = Chain::new(vec![Arc::new(UpdatePathLike), Record::new("a", &Record::log())]);
        assert_eq!(chain.names(), ["updatepathlike", "record"]);
    }

    #[test]
    fn deadline_only_tightens() {
        let mut ctx = Context::with_timeout(Duration::from_secs(1));
        let d = ctx.deadline().unwrap();
        ctx.set_deadline(d + Duration::from_secs(10));
        assert_eq!(ctx.deadline(), Some(d));
        ctx.set_deadline(d - Duration::from_millis(500));
        assert!(ctx.deadline().unwrap() < d);
    }
}
