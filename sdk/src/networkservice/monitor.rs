//! `monitor`: the MonitorConnection service of a component and the chain
//! element that feeds it.
//!
//! # Guarantees
//! - A new subscriber first receives one `INITIAL_STATE_TRANSFER` event with
//!   every connection that matches its [`MonitorScopeSelector`] (possibly
//!   none), then `UPDATE`/`DELETE` events restricted to matching connections;
//!   no event is lost or duplicated between the snapshot and the stream.
//! - Successful Request ⇒ `UPDATE` with the connection as this hop returns
//!   it. Close ⇒ `DELETE`. A failed *refresh* of an established connection ⇒
//!   `UPDATE` with `state = DOWN`.
//! - A subscriber that falls more than [`BACKLOG`] events behind is ended
//!   with `ResourceExhausted` (it should resubscribe) rather than silently
//!   missing events.
//! - Streams end when the subscriber goes away: no task or memory is kept per
//!   dead subscriber (upstream leaked here, Meridio#545).
//!
//! # Chain placement
//! In the endpoint prefix ([`super::chains`], which states the order), before
//! the daemon's own elements that build the connection.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::Stream;
use nsm_api::connection::monitor_connection_server::MonitorConnection;
use nsm_api::connection::{Connection, ConnectionEvent, ConnectionEventType, MonitorScopeSelector, State};
use nsm_api::networkservice::NetworkServiceRequest;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use super::authorize::AuthorizeMonitor;
use super::chain::{ConnResult, Context, Element, Next, conn_mut};
use crate::tools::grpc::ConnInfo;

/// Events a subscriber may lag behind before it is cut off.
pub const BACKLOG: usize = 4096;

/// The connection table and event fan-out of one component.
#[derive(Clone)]
pub struct MonitorServer {
    inner: Arc<Inner>,
}

struct Inner {
    conns: Mutex<HashMap<String, Connection>>,
    tx: broadcast::Sender<ConnectionEvent>,
    /// Which connections a subscriber may see.
    authz: AuthorizeMonitor,
}

impl Default for MonitorServer {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(BACKLOG);
        MonitorServer {
            inner: Arc::new(Inner { conns: Mutex::new(HashMap::new()), tx, authz: AuthorizeMonitor::allow_all() }),
        }
    }
}

impl MonitorServer {
    /// A new, empty monitor.
    pub fn new() -> MonitorServer {
        MonitorServer::default()
    }

    /// A monitor whose subscribers see only what `authz` allows them
    /// (e.g. [`super::authorize::AuthorizeMonitor::own`]: their own
    /// connections).
    pub fn with_authorize(authz: AuthorizeMonitor) -> MonitorServer {
        let (tx, _) = broadcast::channel(BACKLOG);
        MonitorServer { inner: Arc::new(Inner { conns: Mutex::new(HashMap::new()), tx, authz }) }
    }

    /// The chain element that records connections into this monitor.
    pub fn element(&self) -> Arc<MonitorElement> {
        Arc::new(MonitorElement { server: self.clone() })
    }

    /// Current connections (for tests, leak checks and the lab summary).
    pub fn connections(&self) -> Vec<Connection> {
        self.inner.conns.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Records `conn` and broadcasts an event about it.
    pub fn publish(&self, kind: ConnectionEventType, conn: Connection) {
        let mut conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        match kind {
            ConnectionEventType::Delete => {
                conns.remove(&conn.id);
            }
            _ => {
                conns.insert(conn.id.clone(), conn.clone());
            }
        }
        let ev = ConnectionEvent { r#type: kind as i32, connections: HashMap::from([(conn.id.clone(), conn)]) };
        // No receivers is fine; send under the lock so snapshots stay consistent.
        let _ = self.inner.tx.send(ev);
    }

    /// Subscribes: the initial snapshot plus a receiver for later events.
    pub fn subscribe(&self, sel: &MonitorScopeSelector) -> (ConnectionEvent, broadcast::Receiver<ConnectionEvent>) {
        let conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.inner.tx.subscribe();
        let snapshot =
            conns.iter().filter(|(_, c)| c.matches_selector(sel)).map(|(k, c)| (k.clone(), c.clone())).collect();
        (ConnectionEvent { r#type: ConnectionEventType::InitialStateTransfer as i32, connections: snapshot }, rx)
    }
}

/// Stream type of `MonitorConnections`.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<ConnectionEvent, Status>> + Send>>;

#[async_trait]
impl MonitorConnection for MonitorServer {
    type MonitorConnectionsStream = EventStream;

    async fn monitor_connections(
        &self,
        request: Request<MonitorScopeSelector>,
    ) -> Result<Response<Self::MonitorConnectionsStream>, Status> {
        let peer = request.extensions().get::<ConnInfo>().map(|c| c.peer.clone()).unwrap_or_default();
        let sel = request.into_inner();
        let (mut initial, rx) = self.subscribe(&sel);
        let authz = self.inner.authz.clone();
        initial.connections.retain(|_, c| authz.allows(&peer, c));
        Ok(Response::new(event_stream(initial, rx, sel, move |c| authz.allows(&peer, c))))
    }
}

/// The snapshot, then matching events until the monitor goes away or the
/// subscriber lags (reported once as `ResourceExhausted`, then the end).
fn event_stream(
    initial: ConnectionEvent,
    rx: broadcast::Receiver<ConnectionEvent>,
    sel: MonitorScopeSelector,
    allowed: impl Fn(&Connection) -> bool + Send + Sync + 'static,
) -> EventStream {
    // Connections this subscriber has been shown: their deletion reaches it
    // even when the ownership that allowed them is already gone.
    let shown: std::collections::HashSet<String> = initial.connections.keys().cloned().collect();
    let first = futures::stream::once(futures::future::ready(Ok(initial)));
    let allowed = Arc::new(allowed);
    let rest = futures::stream::unfold(Some((rx, sel, allowed, shown)), |st| async move {
        let (mut rx, sel, allowed, mut shown) = st?;
        loop {
            match rx.recv().await {
                Ok(mut ev) => {
                    let delete = ev.r#type == ConnectionEventType::Delete as i32;
                    ev.connections.retain(|id, c| {
                        if !c.matches_selector(&sel) {
                            false
                        } else if allowed(c) {
                            if delete {
                                shown.remove(id);
                            } else {
                                shown.insert(id.clone());
                            }
                            true
                        } else {
                            delete && shown.remove(id)
                        }
                    });
                    if !ev.connections.is_empty() {
                        return Some((Ok(ev), Some((rx, sel, allowed, shown))));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let e =
                        Status::resource_exhausted(format!("monitor subscriber fell {n} events behind; resubscribe"));
                    return Some((Err(e), None));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Box::pin(first.chain(rest))
}

use futures::StreamExt;

/// The chain element feeding a [`MonitorServer`].
pub struct MonitorElement {
    server: MonitorServer,
}

#[async_trait]
impl Element for MonitorElement {
    fn name(&self) -> &'static str {
        "monitor"
    }

    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let id = conn_mut(&mut req).id.clone();
        let established = self.server.inner.conns.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
        match next.request(ctx, req).await {
            Ok(conn) => {
                self.server.publish(ConnectionEventType::Update, conn.clone());
                Ok(conn)
            }
            Err(e) => {
                if let Some(mut old) = established {
                    old.state = State::Down as i32;
                    self.server.publish(ConnectionEventType::Update, old);
                }
                Err(e)
            }
        }
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        let res = next.close(ctx, conn.clone()).await;
        self.server.publish(ConnectionEventType::Delete, conn);
        res
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nsm_api::connection::{Path, PathSegment};

    use super::*;
    use crate::networkservice::chain::Chain;
    use crate::testing::Inject;

    fn req(id: &str, svc: &str) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                network_service: svc.into(),
                path: Some(Path {
                    index: 0,
                    path_segments: vec![PathSegment { name: "n".into(), id: id.into(), ..Default::default() }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn next_event(s: &mut EventStream) -> ConnectionEvent {
        tokio::time::timeout(Duration::from_secs(2), s.next())
            .await
            .expect("event in time")
            .expect("stream open")
            .unwrap()
    }

    #[tokio::test]
    async fn initial_transfer_then_filtered_updates_and_deletes() {
        let mon = MonitorServer::new();
        let chain = Chain::new(vec![mon.element()]);
        chain.request(&mut Context::default(), req("a", "svc1")).await.unwrap();
        let sel = MonitorScopeSelector { network_services: vec!["svc1".into()], ..Default::default() };
        let mut s = mon.monitor_connections(Request::new(sel)).await.unwrap().into_inner();
        let ev = next_event(&mut s).await;
        assert_eq!(ev.r#type, ConnectionEventType::InitialStateTransfer as i32);
        assert!(ev.connections.contains_key("a"));
        chain.request(&mut Context::default(), req("b", "svc2")).await.unwrap(); // filtered out
        let c = chain.request(&mut Context::default(), req("c", "svc1")).await.unwrap();
        let ev = next_event(&mut s).await;
        assert_eq!(ev.r#type, ConnectionEventType::Update as i32);
        assert_eq!(ev.connections.keys().collect::<Vec<_>>(), ["c"]);
        chain.close(&mut Context::default(), c).await.unwrap();
        let ev = next_event(&mut s).await;
        assert_eq!(ev.r#type, ConnectionEventType::Delete as i32);
        assert_eq!(mon.connections().len(), 2);
    }

    #[tokio::test]
    async fn empty_initial_transfer_is_sent() {
        let mon = MonitorServer::new();
        let mut s = mon.monitor_connections(Request::new(Default::default())).await.unwrap().into_inner();
        let ev = next_event(&mut s).await;
        assert_eq!(ev.r#type, ConnectionEventType::InitialStateTransfer as i32);
        assert!(ev.connections.is_empty());
    }

    #[tokio::test]
    async fn failed_refresh_reports_down() {
        let mon = MonitorServer::new();
        Chain::new(vec![mon.element()]).request(&mut Context::default(), req("a", "s")).await.unwrap();
        let mut s = mon.monitor_connections(Request::new(Default::default())).await.unwrap().into_inner();
        next_event(&mut s).await;
        let failing = Chain::new(vec![mon.element(), Inject::error(tonic::Code::Unavailable, "gone")]);
        assert!(failing.request(&mut Context::default(), req("a", "s")).await.is_err());
        let ev = next_event(&mut s).await;
        assert_eq!(ev.connections["a"].state, State::Down as i32);
        // A failed first request of an unknown id reports nothing.
        assert!(failing.request(&mut Context::default(), req("z", "s")).await.is_err());
        assert!(tokio::time::timeout(Duration::from_millis(100), s.next()).await.is_err());
    }

    #[tokio::test]
    async fn lagging_subscriber_is_told() {
        let mon = MonitorServer::new();
        let mut s = mon.monitor_connections(Request::new(Default::default())).await.unwrap().into_inner();
        next_event(&mut s).await;
        let chain = Chain::new(vec![mon.element()]);
        for i in 0..BACKLOG + 10 {
            chain.request(&mut Context::default(), req(&format!("c{i}"), "s")).await.unwrap();
        }
        let got = tokio::time::timeout(Duration::from_secs(2), s.next()).await.unwrap().unwrap();
        assert_eq!(got.unwrap_err().code(), tonic::Code::ResourceExhausted);
        assert!(s.next().await.is_none(), "stream ends after the lag error");
    }
}
