//! `begin`: per-connection serialisation and idempotent re-Request.
//!
//! # Guarantees
//! - Requests and Closes for the same `connection.id` (as this hop names it)
//!   run one at a time, in arrival order; different connections run in
//!   parallel.
//! - A Request for an established id is a refresh: the rest of the chain sees
//!   it again and elements must treat it as idempotent.
//! - A Request with `state = RESELECT_REQUESTED` for an established
//!   connection first Closes the old downstream connection, then Requests
//!   anew.
//! - On success the returned connection's `state` is `UP` and is remembered;
//!   a failed *first* Request forgets the connection entirely.
//! - Close of an unknown id is a no-op that succeeds (or, with
//!   [`Begin::passing_unknown_closes`], runs the rest of the chain with the
//!   caller's copy so kernel state from before a restart is removed). Close of a known id runs
//!   the rest of the chain with the last connection this hop returned (a
//!   caller may send a stale or partial copy) and then forgets the id —
//!   unless the Close was refused at this hop (its owner check or
//!   `authorize`, marked [`RefusedHere`]; nothing was torn down): then the
//!   connection stays, for its owner or its timeout.
//! - A connection belongs to the SPIFFE ID that originated it: the
//!   client's, i.e. the TLS caller's where the caller is the path's first
//!   segment, else the `sub` of the first segment's token (which the first
//!   hop verified, and rewrites with each caller's own token). A refresh,
//!   reselect or Close naming it on behalf of another origin is
//!   `PermissionDenied`, before the rest of the chain runs: knowing a
//!   connection id (monitors show them) is not enough to close or re-point
//!   someone else's connection, at the first hop or behind it. Restarted
//!   infrastructure (a new nsmgr or forwarder identity) does not change the
//!   origin. Upstream has no such check. Events scheduled by the chain
//!   itself, and plaintext meshes (no identities, no JWTs), are not checked.
//! - [`EventFactory`] lets later elements schedule a Close or a refresh of the
//!   connection (timeouts, monitors); those events are serialised with
//!   caller-initiated ones and are dropped if the connection has been closed
//!   or re-established in the meantime.
//!
//! # Chain placement
//! In the endpoint prefix ([`super::chains`], which states the order), right
//! after `updatepath`: it keys on the id `updatepath` assigns.
//!
//! # Failure behavior
//! An empty connection id is `InvalidArgument`. Errors from the rest of the
//! chain are returned unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use nsm_api::connection::{Connection, State};
use nsm_api::networkservice::NetworkServiceRequest;
use tonic::Status;

use super::chain::{ConnResult, Context, Element, Next, conn_mut};

/// Time budget of calls that `begin` starts on its own (timeouts, events).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

/// The `begin` element.
#[derive(Default)]
pub struct Begin {
    state: Arc<BeginState>,
    pass_unknown_close: bool,
}

#[derive(Default)]
struct BeginState {
    conns: Mutex<HashMap<String, Arc<Entry>>>,
}

struct Entry {
    /// Serialises every event of this connection.
    lock: tokio::sync::Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    /// Last connection returned to the caller, once established.
    conn: Option<Connection>,
    /// Last request that succeeded (replayed by refresh events).
    request: Option<NetworkServiceRequest>,
    /// Set when the entry was removed from the map; a waiter that then gets
    /// the lock must start over with a fresh entry.
    dead: bool,
    /// Bumped on every successful Request, so stale events can tell.
    generation: u64,
    /// SPIFFE ID that originated the connection ([`origin`]).
    owner: Option<String>,
}

/// The SPIFFE ID a call acts for: the TLS caller if it is the path's first
/// segment, else the `sub` of the first segment's token. `None` for events
/// of the chain itself (no TLS caller) and plaintext meshes.
fn origin(ctx: &Context, conn: &Connection) -> Option<String> {
    let caller = ctx.peer.spiffe_id.clone()?;
    let Some(path) = conn.path.as_ref() else { return Some(caller) };
    if path.index <= 1 {
        return Some(caller);
    }
    let first = path.path_segments.first()?;
    crate::security::jwt::decode(&first.token).ok().map(|(_, c)| c.sub).filter(|s| !s.is_empty())
}

impl Slot {
    /// Refuses a call on behalf of another origin than the connection's.
    fn check_owner(&self, id: &str, ctx: &mut Context, conn: &Connection, what: &str) -> Result<(), Status> {
        let Some(owner) = &self.owner else { return Ok(()) };
        if ctx.peer.spiffe_id.is_none() {
            return Ok(());
        }
        let by = origin(ctx, conn).unwrap_or_else(|| "an unidentified origin".to_string());
        if *owner == by {
            return Ok(());
        }
        let peer = ctx.peer.spiffe_id.clone().unwrap_or_default();
        tracing::warn!(conn_id = %id, owner = %owner, origin = %by, peer = %peer, "{what} for another identity refused");
        ctx.ext.insert(RefusedHere);
        Err(Status::permission_denied(format!(
            "connection {id} was established by {owner}; a {what} on behalf of {by} (via {peer}) is refused"
        )))
    }
}

/// Marks a call that an element of this hop refused before anything was
/// torn down (`begin`'s owner check, `authorize`): `begin` then keeps the
/// connection. A refusal from further down the chain does not carry it: by
/// then this hop's elements have released their part.
#[derive(Clone, Copy, Debug)]
pub struct RefusedHere;

impl Begin {
    /// A new `begin` element.
    pub fn new() -> Arc<Begin> {
        Arc::new(Begin::default())
    }

    /// A `begin` that passes a Close of an *unknown* connection down the
    /// chain instead of ignoring it, for components that keep kernel state
    /// which outlives the process (the forwarder after a restart can then
    /// still remove the interfaces it made before).
    pub fn passing_unknown_closes() -> Arc<Begin> {
        Arc::new(Begin { pass_unknown_close: true, ..Begin::default() })
    }

    /// Number of connections currently tracked (for leak tests and metrics).
    pub fn len(&self) -> usize {
        self.state.conns.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when no connection is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl BeginState {
    fn entry(&self, id: &str) -> Arc<Entry> {
        let mut m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(id.to_string())
            .or_insert_with(|| Arc::new(Entry { lock: tokio::sync::Mutex::new(Slot::default()) }))
            .clone()
    }

    fn existing(&self, id: &str) -> Option<Arc<Entry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    fn remove(&self, id: &str, entry: &Arc<Entry>) {
        let mut m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            m.remove(id);
        }
    }
}

#[async_trait]
impl Element for Begin {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let id = conn_mut(&mut req).id.clone();
        if id.is_empty() {
            return Err(Status::invalid_argument("request has an empty connection id"));
        }
        loop {
            let entry = self.state.entry(&id);
            let mut slot = entry.lock.lock().await;
            if slot.dead {
                continue; // closed while we waited: start over with a fresh entry
            }
            slot.check_owner(&id, ctx, conn_mut(&mut req), "refresh")?;
            let reselect = conn_mut(&mut req).state == State::ReselectRequested as i32;
            if reselect && let Some(old) = slot.conn.take() {
                tracing::info!(conn_id = %id, "reselect requested: closing the previous downstream connection");
                let mut cctx = ctx.detached(EVENT_TIMEOUT);
                cctx.events = Some(self.factory(&id, &next, slot.generation));
                if let Err(e) = next.clone().close(&mut cctx, old).await {
                    tracing::warn!(conn_id = %id, error = %e.message(), "closing before reselect failed; continuing");
                }
                slot.request = None;
            }
            // Events armed during this Request belong to the generation it
            // will establish; older ones are stale once it succeeds.
            ctx.events = Some(self.factory(&id, &next, slot.generation + 1));
            let first = slot.conn.is_none();
            let by = origin(ctx, conn_mut(&mut req));
            match next.request(ctx, req.clone()).await {
                Ok(mut conn) => {
                    conn.state = State::Up as i32;
                    slot.conn = Some(conn.clone());
                    slot.request = Some(req);
                    slot.generation += 1;
                    if first {
                        slot.owner = by;
                    }
                    return Ok(conn);
                }
                Err(e) => {
                    if first {
                        slot.dead = true;
                        self.state.remove(&id, &entry);
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        let id = conn.id.clone();
        let Some(entry) = self.state.existing(&id) else {
            if self.pass_unknown_close {
                tracing::info!(conn_id = %id, "close of a connection this process does not know: cleaning up by name");
                return next.close(ctx, conn).await;
            }
            tracing::debug!(conn_id = %id, "close of an unknown connection: nothing to do");
            return Ok(());
        };
        let mut slot = entry.lock.lock().await;
        if slot.dead {
            return Ok(());
        }
        slot.check_owner(&id, ctx, &conn, "close")?;
        let Some(last) = slot.conn.clone() else {
            slot.dead = true;
            self.state.remove(&id, &entry);
            return Ok(());
        };
        ctx.events = Some(self.factory(&id, &next, slot.generation));
        let res = next.close(ctx, last).await;
        if res.is_err() && ctx.ext.get::<RefusedHere>().is_some() {
            // Refused by policy at this hop, before anything was torn down:
            // the connection stays, for its owner to close (or its timeout).
            return res;
        }
        slot.dead = true;
        slot.conn = None;
        self.state.remove(&id, &entry);
        res
    }
}

impl Begin {
    fn factory(&self, id: &str, next: &Next, generation: u64) -> EventFactory {
        EventFactory { id: id.to_string(), state: Arc::downgrade(&self.state), next: next.clone(), generation }
    }
}

/// Schedules follow-up events (Close, refresh) of one connection through the
/// rest of the chain after `begin`, serialised with caller events.
#[derive(Clone)]
pub struct EventFactory {
    id: String,
    /// The generation of the connection this factory was handed out for.
    generation: u64,
    state: Weak<BeginState>,
    next: Next,
}

impl std::fmt::Debug for EventFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFactory").field("id", &self.id).finish()
    }
}

impl EventFactory {
    /// The connection id this factory acts on.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Closes the connection in the background (e.g. on timeout). Does nothing
    /// if it has already been closed.
    pub fn close(&self, reason: &'static str) {
        let this = self.clone();
        tokio::spawn(async move {
            let Some(state) = this.state.upgrade() else { return };
            let Some(entry) = state.existing(&this.id) else { return };
            let mut slot = entry.lock.lock().await;
            if slot.dead {
                return;
            }
            if slot.generation != this.generation {
                tracing::debug!(conn_id = %this.id, reason, "dropping a stale close: the connection was refreshed since");
                return;
            }
            slot.dead = true;
            state.remove(&this.id, &entry);
            let Some(conn) = slot.conn.take() else { return };
            tracing::info!(conn_id = %this.id, reason, "closing connection");
            let mut ctx = Context::with_timeout(EVENT_TIMEOUT);
            ctx.events = Some(this.clone());
            if let Err(e) = this.next.clone().close(&mut ctx, conn).await {
                tracing::warn!(conn_id = %this.id, error = %e.message(), "close after {reason} failed");
            }
        });
    }

    /// Re-runs the last successful Request in the background, if the
    /// connection is still established and unchanged since `generation`.
    /// Returns the join handle so callers can wait for the outcome.
    pub fn refresh(&self) -> tokio::task::JoinHandle<Result<Connection, Status>> {
        let this = self.clone();
        tokio::spawn(async move {
            let gone = || Status::not_found(format!("connection {} is closed", this.id));
            let state = this.state.upgrade().ok_or_else(gone)?;
            let entry = state.existing(&this.id).ok_or_else(gone)?;
            let mut slot = entry.lock.lock().await;
            if slot.dead {
                return Err(gone());
            }
            if slot.generation != this.generation {
                return Err(Status::aborted(format!(
                    "connection {} changed since this refresh was scheduled",
                    this.id
                )));
            }
            let mut req = slot.request.clone().ok_or_else(gone)?;
            if let Some(conn) = &slot.conn {
                req.connection = Some(conn.clone());
            }
            let mut ctx = Context::with_timeout(EVENT_TIMEOUT);
            let mut next_factory = this.clone();
            next_factory.generation += 1;
            ctx.events = Some(next_factory);
            let mut conn = this.next.clone().request(&mut ctx, req.clone()).await?;
            conn.state = State::Up as i32;
            slot.conn = Some(conn.clone());
            slot.request = Some(req);
            slot.generation += 1;
            Ok(conn)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn as_peer(id: Option<&str>) -> Context {
        let mut ctx = Context::default();
        ctx.peer.spiffe_id = id.map(String::from);
        ctx
    }

    #[tokio::test]
    async fn only_the_identity_that_established_a_connection_may_refresh_or_close_it() {
        let begin = Begin::new();
        let log = Record::log();
        let grab = crate::testing::GrabEvents::default();
        let chain = Chain::new(vec![begin.clone(), Arc::new(grab.clone()), Record::new("r", &log)]);
        let (owner, other) = (Some("spiffe://td/ns/a/sa/nsc"), Some("spiffe://td/ns/b/sa/nsc"));
        let conn = chain.request(&mut as_peer(owner), request_with_id("a")).await.unwrap();
        let calls = log.lock().unwrap().len();
        for res in [
            chain.request(&mut as_peer(other), request_with_id("a")).await.map(|_| ()),
            chain.close(&mut as_peer(other), conn.clone()).await,
        ] {
            let e = res.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains("established by spiffe://td/ns/a/sa/nsc"), "{}", e.message());
        }
        assert_eq!(log.lock().unwrap().len(), calls, "the rest of the chain did not run");
        assert_eq!(begin.len(), 1);
        // The owner refreshes; the chain's own events carry no identity.
        chain.request(&mut as_peer(owner), request_with_id("a")).await.unwrap();
        grab.get().unwrap().refresh().await.unwrap().unwrap();
        chain.close(&mut as_peer(owner), conn).await.unwrap();
        assert_eq!(begin.len(), 0);
        // Behind the first hop the origin is the first segment's token:
        // a restarted nsmgr (a new identity) may refresh, another client's
        // request routed through the same hop may not.
        let pki = crate::security::jwt::testpki::TestPki::new();
        let tok = |who: &str| {
            crate::security::policy::tests::token(
                &pki.svid(who),
                "spiffe://td/nsmgr",
                crate::security::jwt::testpki::now() + 60,
            )
        };
        let downstream = |first_token: String| {
            let mut r = request_with_id("d");
            r.connection.as_mut().unwrap().path = Some(nsm_api::connection::Path {
                index: 2,
                path_segments: vec![
                    nsm_api::connection::PathSegment { token: first_token, ..Default::default() },
                    Default::default(),
                    Default::default(),
                ],
            });
            r
        };
        let (nsmgr, nsmgr_restarted) = (Some("spiffe://td/nsmgr-pod-1"), Some("spiffe://td/nsmgr-pod-2"));
        let conn = chain.request(&mut as_peer(nsmgr), downstream(tok("spiffe://td/alice"))).await.unwrap();
        chain.request(&mut as_peer(nsmgr_restarted), downstream(tok("spiffe://td/alice"))).await.unwrap();
        let e = chain.request(&mut as_peer(nsmgr), downstream(tok("spiffe://td/mallory"))).await.unwrap_err();
        assert!(e.message().contains("established by spiffe://td/alice"), "{}", e.message());
        let mut forged = conn.clone();
        forged.path = downstream(tok("spiffe://td/mallory")).connection.unwrap().path;
        assert_eq!(chain.close(&mut as_peer(nsmgr), forged).await.unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(begin.len(), 1);
        let mut own = conn;
        own.path = downstream(tok("spiffe://td/alice")).connection.unwrap().path;
        chain.close(&mut as_peer(nsmgr_restarted), own).await.unwrap();
        assert_eq!(begin.len(), 0);

        // Without identities (plaintext) nothing is checked.
        let conn = chain.request(&mut as_peer(None), request_with_id("b")).await.unwrap();
        chain.close(&mut as_peer(other), conn).await.unwrap();
        assert_eq!(begin.len(), 0);
    }

    #[tokio::test]
    async fn stale_events_do_not_touch_a_refreshed_connection() {
        let begin = Begin::new();
        let log = Record::log();
        let grab = crate::testing::GrabEvents::default();
        let chain = Chain::new(vec![begin.clone(), Arc::new(grab.clone()), Record::new("r", &log)]);
        chain.request(&mut Context::default(), request_with_id("a")).await.unwrap();
        let old = grab.get().unwrap();
        // A caller refresh establishes a new generation ...
        chain.request(&mut Context::default(), request_with_id("a")).await.unwrap();
        // ... so a timer armed for the old one must not close it.
        old.close("stale timeout");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(begin.len(), 1, "stale close took effect");
        assert!(!log.lock().unwrap().contains(&"close r".to_string()));
        assert_eq!(old.refresh().await.unwrap().unwrap_err().code(), tonic::Code::Aborted);
        // The current generation's factory works.
        grab.get().unwrap().close("current timeout");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(begin.len(), 0);
    }

    use super::*;
    use crate::networkservice::chain::Chain;
    use crate::testing::{Inject, Record, request_with_id};

    #[tokio::test]
    async fn empty_id_is_rejected() {
        let chain = Chain::new(vec![Begin::new()]);
        let err = chain.request(&mut Context::default(), request_with_id("")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn failed_first_request_is_forgotten_and_close_is_noop() {
        let begin = Begin::new();
        let chain = Chain::new(vec![begin.clone(), Inject::error(tonic::Code::Unavailable, "x")]);
        assert!(chain.request(&mut Context::default(), request_with_id("a")).await.is_err());
        assert_eq!(begin.len(), 0);
        let log = Record::log();
        let chain2 = Chain::new(vec![begin.clone(), Record::new("r", &log)]);
        chain2.close(&mut Context::default(), Connection { id: "a".into(), ..Default::default() }).await.unwrap();
        assert!(log.lock().unwrap().is_empty(), "close of unknown id must not reach the chain");
    }

    #[tokio::test]
    async fn unknown_close_can_pass_through() {
        let log = Record::log();
        let chain = Chain::new(vec![Begin::passing_unknown_closes(), Record::new("r", &log)]);
        chain.close(&mut Context::default(), Connection { id: "gone".into(), ..Default::default() }).await.unwrap();
        assert_eq!(*log.lock().unwrap(), ["close r"]);
    }

    #[tokio::test]
    async fn close_uses_last_returned_connection_and_forgets() {
        let begin = Begin::new();
        let log = Record::log();
        let chain = Chain::new(vec![begin.clone(), Record::new("r", &log), Inject::set_nse_name("nse-1")]);
        let conn = chain.request(&mut Context::default(), request_with_id("a")).await.unwrap();
        assert_eq!(conn.state, State::Up as i32);
        assert_eq!(begin.len(), 1);
        let seen = Arc::new(Mutex::new(String::new()));
        let s2 = seen.clone();
        let check = crate::testing::OnClose::new(move |c: &Connection| {
            *s2.lock().unwrap() = c.network_service_endpoint_name.clone()
        });
        let chain = Chain::new(vec![begin.clone(), check]);
        // The caller sends only the id; begin substitutes what it returned.
        chain.close(&mut Context::default(), Connection { id: "a".into(), ..Default::default() }).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), "nse-1");
        assert_eq!(begin.len(), 0);
    }

    #[tokio::test]
    async fn same_id_is_serialised_different_ids_are_not() {
        let begin = Begin::new();
        let active = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let chain = Chain::new(vec![begin.clone(), crate::testing::Slow::new(active.clone(), max.clone())]);
        let mut tasks = vec![];
        for _ in 0..5 {
            let c = chain.clone();
            tasks.push(tokio::spawn(async move { c.request(&mut Context::default(), request_with_id("same")).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(max.load(Ordering::SeqCst), 1, "same id ran concurrently");
        max.store(0, Ordering::SeqCst);
        let mut tasks = vec![];
        for i in 0..5 {
            let c = chain.clone();
            tasks.push(tokio::spawn(async move {
                c.request(&mut Context::default(), request_with_id(&format!("id{i}"))).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert!(max.load(Ordering::SeqCst) > 1, "different ids must run in parallel");
    }

    #[tokio::test]
    async fn reselect_closes_old_first() {
        let begin = Begin::new();
        let log = Record::log();
        let chain = Chain::new(vec![begin.clone(), Record::new("r", &log)]);
        let conn = chain.request(&mut Context::default(), request_with_id("a")).await.unwrap();
        let mut req = request_with_id("a");
        req.connection = Some(Connection { state: State::ReselectRequested as i32, ..conn });
        chain.request(&mut Context::default(), req).await.unwrap();
        assert_eq!(*log.lock().unwrap(), vec!["r>", "<r", "close r", "r>", "<r"]);
    }

    #[tokio::test]
    async fn event_close_runs_once_and_refresh_after_close_fails() {
        let begin = Begin::new();
        let log = Record::log();
        let grab = crate::testing::GrabEvents::default();
        let chain = Chain::new(vec![begin.clone(), Arc::new(grab.clone()), Record::new("r", &log)]);
        chain.request(&mut Context::default(), request_with_id("a")).await.unwrap();
        let ef = grab.get().unwrap();
        ef.refresh().await.unwrap().unwrap();
        // The refresh handed out a factory for the new generation.
        let ef = grab.get().unwrap();
        ef.close("test");
        ef.close("test again");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(log.lock().unwrap().iter().filter(|s| *s == "close r").count(), 1);
        assert_eq!(begin.len(), 0);
        assert_eq!(ef.refresh().await.unwrap().unwrap_err().code(), tonic::Code::NotFound);
    }
}
