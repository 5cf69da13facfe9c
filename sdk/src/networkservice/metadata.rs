//! `metadata`: typed per-connection storage for the elements after it.
//!
//! # Guarantees
//! - `ctx.meta` holds the same [`ConnMetadata`] for every Request/Close of a
//!   connection id (as this hop names it), with separate `server` and
//!   `client` maps so a passthrough's server and client elements cannot step
//!   on each other's values.
//! - The storage is dropped on Close, and when the *first* Request of an id
//!   fails. Values stored there (timers, handles) must release their
//!   resources on drop.
//!
//! # Chain placement
//! In the endpoint prefix ([`super::chains`], which states the order), after
//! `begin` (which serialises access per id) and after `authorize` (a refused
//! call never reaches per-connection state).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nsm_api::connection::Connection;
use nsm_api::networkservice::NetworkServiceRequest;
use tonic::Status;

use super::chain::{ConnResult, Context, Element, Next, conn_mut};

/// Per-connection storage: `http::Extensions` maps keyed by type.
#[derive(Debug, Default)]
pub struct ConnMetadata {
    /// Values owned by server-side elements.
    pub server: Mutex<http::Extensions>,
    /// Values owned by client-side elements.
    pub client: Mutex<http::Extensions>,
}

impl ConnMetadata {
    /// Reads a server-side value.
    pub fn server_get<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.server.lock().unwrap_or_else(|e| e.into_inner()).get::<T>().cloned()
    }
    /// Stores a server-side value, returning the previous one.
    pub fn server_insert<T: Clone + Send + Sync + 'static>(&self, v: T) -> Option<T> {
        self.server.lock().unwrap_or_else(|e| e.into_inner()).insert(v)
    }
    /// Removes a server-side value.
    pub fn server_remove<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.server.lock().unwrap_or_else(|e| e.into_inner()).remove::<T>()
    }
    /// Reads a client-side value.
    pub fn client_get<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.client.lock().unwrap_or_else(|e| e.into_inner()).get::<T>().cloned()
    }
    /// Stores a client-side value, returning the previous one.
    pub fn client_insert<T: Clone + Send + Sync + 'static>(&self, v: T) -> Option<T> {
        self.client.lock().unwrap_or_else(|e| e.into_inner()).insert(v)
    }
    /// Removes a client-side value.
    pub fn client_remove<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.client.lock().unwrap_or_else(|e| e.into_inner()).remove::<T>()
    }
}

/// The `metadata` element.
#[derive(Default)]
pub struct Metadata {
    map: Mutex<HashMap<String, Arc<ConnMetadata>>>,
}

impl Metadata {
    /// A new `metadata` element.
    pub fn new() -> Arc<Metadata> {
        Arc::new(Metadata::default())
    }

    /// Number of connections with storage (for leak tests).
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when no connection has storage.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True if connection `id` (as this hop names it) has storage, i.e. is
    /// known to this process.
    pub fn contains(&self, id: &str) -> bool {
        self.map.lock().map(|m| m.contains_key(id)).unwrap_or(false)
    }
}

#[async_trait]
impl Element for Metadata {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let id = conn_mut(&mut req).id.clone();
        let (meta, created) = {
            let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&id) {
                Some(v) => (v.clone(), false),
                None => {
                    let v = Arc::new(ConnMetadata::default());
                    m.insert(id.clone(), v.clone());
                    (v, true)
                }
            }
        };
        ctx.meta = Some(meta);
        let res = next.request(ctx, req).await;
        if res.is_err() && created {
            self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        }
        res
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        let id = conn.id.clone();
        let meta = self.map.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
        ctx.meta = Some(meta.unwrap_or_default());
        let res = next.close(ctx, conn).await;
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networkservice::chain::Chain;
    use crate::testing::{Inject, request_with_id};

    #[derive(Clone)]
    struct Marker(u32);

    #[tokio::test]
    async fn storage_survives_refresh_and_is_dropped_on_close() {
        let md = Metadata::new();
        let chain = Chain::new(vec![md.clone(), Inject::store_marker()]);
        let mut ctx = Context::default();
        let conn = chain.request(&mut ctx, request_with_id("a")).await.unwrap();
        let meta = ctx.meta.clone().unwrap();
        assert_eq!(meta.server_get::<crate::testing::Counter>().unwrap().0, 1);
        let mut ctx2 = Context::default();
        chain.request(&mut ctx2, request_with_id("a")).await.unwrap();
        assert!(Arc::ptr_eq(&meta, ctx2.meta.as_ref().unwrap()));
        assert_eq!(meta.server_get::<crate::testing::Counter>().unwrap().0, 2);
        meta.client_insert(Marker(7));
        assert_eq!(meta.client_get::<Marker>().unwrap().0, 7);
        assert!(meta.server_get::<Marker>().is_none(), "client and server maps are separate");
        chain.close(&mut Context::default(), conn).await.unwrap();
        assert_eq!(md.len(), 0);
    }

    #[tokio::test]
    async fn failed_first_request_drops_storage() {
        let md = Metadata::new();
        let chain = Chain::new(vec![md.clone(), Inject::error(tonic::Code::Internal, "no")]);
        assert!(chain.request(&mut Context::default(), request_with_id("a")).await.is_err());
        assert_eq!(md.len(), 0);
    }
}
