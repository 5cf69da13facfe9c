//! In-memory registry of network services and endpoints (upstream
//! `sdk:pkg/registry/common/memory` plus `setpayload` and
//! `setregistrationtime`).
//!
//! # Guarantees
//! - **Register.** NS: `payload` defaults to `IP`; stored by name (an empty
//!   name is `InvalidArgument`). NSE: an empty name becomes `nse-<uuid>`;
//!   `initial_registration_time` is set to now on the first registration of
//!   a name and kept on every re-registration; if `expiration_time` is set,
//!   the entry is removed at that time and watchers get it with
//!   `deleted = true`. A re-registration re-arms the expiry (or disarms it
//!   if the new registration has none); Unregister disarms it. A
//!   registration whose expiration is already past removes any previous
//!   entry of that name and is not stored. Register returns the stored
//!   object.
//! - **Timers.** One timer task per expiring entry, aborted when the entry
//!   is replaced or removed, holding only a weak reference to the registry:
//!   no task outlives its entry or the registry.
//! - **Find** is by example ([`ns_matches`], [`nse_matches`]); a missing
//!   query object matches everything. An expired endpoint is never returned,
//!   even in the instant between its expiry and its removal.
//! - **Watch.** `watch = false`: the current matches, then the stream ends.
//!   `watch = true`: the current matches, then every later change that
//!   matches the query — Register ⇒ the object, Unregister/expiry ⇒ the
//!   object with `deleted = true` — in the order they happened. The snapshot
//!   is taken and the subscription made under the same lock that every
//!   change is published under, so nothing is missed or duplicated in
//!   between. A watcher that falls more than the watch buffer behind gets
//!   one `ResourceExhausted` error and its stream ends (re-run Find to
//!   resynchronise). Dropping the stream frees everything it held; no task
//!   is spawned per watcher.
//! - **Unregister** of an unknown name is `Ok`.
//!
//! Cheap to clone (an `Arc` inside); clones share the same store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use nsm_api::mechanisms::payload;
use nsm_api::registry::{
    NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery, NetworkServiceEndpointResponse,
    NetworkServiceQuery, NetworkServiceResponse,
};
use tokio::sync::broadcast;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tonic::Status;

use super::{NsRegistry, NsStream, NseRegistry, NseStream};
use crate::networkservice::chain::Context;
use crate::tools::token;

/// Events a watcher may lag behind before its stream is ended.
pub const DEFAULT_WATCH_BUFFER: usize = 1024;

/// NS "by example": (query.name empty or equal) ∧ (query.payload empty or
/// equal) ∧ (query.matches empty or deep-equal).
pub fn ns_matches(query: &NetworkService, ns: &NetworkService) -> bool {
    (query.name.is_empty() || query.name == ns.name)
        && (query.payload.is_empty() || query.payload == ns.payload)
        && (query.matches.is_empty() || query.matches == ns.matches)
}

/// NSE "by example": (query.name empty or equal) ∧ (for every service in
/// query labels, the NSE has labels for it that contain the query's,
/// literally) ∧ (query.expiration_time unset or same seconds) ∧
/// (query.network_service_names ⊆ nse names) ∧ (query.url empty or a
/// substring of nse.url).
pub fn nse_matches(query: &NetworkServiceEndpoint, nse: &NetworkServiceEndpoint) -> bool {
    (query.name.is_empty() || query.name == nse.name)
        && query.network_service_labels.iter().all(|(svc, want)| {
            nse.network_service_labels
                .get(svc)
                .is_some_and(|have| want.labels.iter().all(|(k, v)| have.labels.get(k) == Some(v)))
        })
        && query
            .expiration_time
            .as_ref()
            .is_none_or(|q| q.seconds == nse.expiration_time.as_ref().map(|t| t.seconds).unwrap_or(0))
        && query.network_service_names.iter().all(|n| nse.network_service_names.contains(n))
        && (query.url.is_empty() || nse.url.contains(&query.url))
}

/// A change of a stored object, as watchers get it.
#[derive(Clone, Debug)]
pub struct Event<T> {
    pub obj: T,
    /// The object was removed (unregistered or expired).
    pub deleted: bool,
}

struct NseEntry {
    nse: NetworkServiceEndpoint,
    /// When the entry stops being valid (tokio clock).
    deadline: Option<Instant>,
    /// Distinguishes registrations of the same name, so a timer that lost
    /// the race with a re-registration does nothing.
    generation: u64,
    timer: Option<AbortHandle>,
}

impl NseEntry {
    fn live(&self, now: Instant) -> bool {
        self.deadline.is_none_or(|d| d > now)
    }
}

impl Drop for NseEntry {
    fn drop(&mut self) {
        if let Some(t) = self.timer.take() {
            t.abort();
        }
    }
}

#[derive(Default)]
struct State {
    nss: HashMap<String, NetworkService>,
    nses: HashMap<String, NseEntry>,
    generation: u64,
}

struct Inner {
    state: Mutex<State>,
    ns_tx: broadcast::Sender<Event<NetworkService>>,
    nse_tx: broadcast::Sender<Event<NetworkServiceEndpoint>>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes `name` if it is still the registration `generation`.
    fn expire(&self, name: &str, generation: u64) {
        let mut st = self.lock();
        if st.nses.get(name).is_some_and(|e| e.generation == generation)
            && let Some(mut e) = st.nses.remove(name)
        {
            e.timer.take(); // this very task: finishing, nothing to abort
            tracing::debug!(nse = %name, "endpoint registration expired");
            let _ = self.nse_tx.send(Event { obj: e.nse.clone(), deleted: true });
        }
    }
}

/// The in-memory registry; implements [`NsRegistry`] and [`NseRegistry`].
#[derive(Clone)]
pub struct MemoryRegistry {
    inner: Arc<Inner>,
}

impl Default for MemoryRegistry {
    fn default() -> MemoryRegistry {
        MemoryRegistry::with_watch_buffer(DEFAULT_WATCH_BUFFER)
    }
}

impl std::fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegistry").field("ns", &self.ns_len()).field("nse", &self.nse_len()).finish()
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> MemoryRegistry {
        MemoryRegistry::default()
    }

    /// An empty registry whose watchers may lag `buffer` events behind
    /// (at least 1).
    pub fn with_watch_buffer(buffer: usize) -> MemoryRegistry {
        let buffer = buffer.max(1);
        MemoryRegistry {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                ns_tx: broadcast::channel(buffer).0,
                nse_tx: broadcast::channel(buffer).0,
            }),
        }
    }

    /// Number of stored network services.
    pub fn ns_len(&self) -> usize {
        self.inner.lock().nss.len()
    }

    /// Number of stored endpoints (including any expired one whose timer
    /// has not run yet).
    pub fn nse_len(&self) -> usize {
        self.inner.lock().nses.len()
    }

    /// Number of armed expiry timers (one per expiring endpoint).
    pub fn timer_count(&self) -> usize {
        self.inner.lock().nses.values().filter(|e| e.timer.is_some()).count()
    }

    /// Number of open watch streams (NS + NSE).
    pub fn watcher_count(&self) -> usize {
        self.inner.ns_tx.receiver_count() + self.inner.nse_tx.receiver_count()
    }

    fn arm(&self, name: String, generation: u64, deadline: Instant) -> AbortHandle {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(inner) = weak.upgrade() {
                inner.expire(&name, generation);
            }
        })
        .abort_handle()
    }
}

/// Turns a snapshot plus a subscription into a Find stream: the snapshot,
/// then (with `rx`) every event that passes `filter`, wrapped by `wrap`.
/// A subscriber that lags behind the channel gets one `ResourceExhausted`
/// and its stream ends. Shared with the other stores (Kubernetes).
pub fn watch_stream<T, R>(
    what: &'static str,
    snapshot: Vec<T>,
    rx: Option<broadcast::Receiver<Event<T>>>,
    filter: impl Fn(&T) -> bool + Send + 'static,
    wrap: fn(T, bool) -> R,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = Result<R, Status>> + Send>>
where
    T: Clone + Send + 'static,
    R: Send + 'static,
{
    let head = futures::stream::iter(snapshot.into_iter().map(move |o| Ok(wrap(o, false))));
    let Some(rx) = rx else { return Box::pin(head) };
    let tail = futures::stream::unfold(Some((rx, filter)), move |st| async move {
        let (mut rx, filter) = st?;
        loop {
            match rx.recv().await {
                Ok(ev) if filter(&ev.obj) => return Some((Ok(wrap(ev.obj, ev.deleted)), Some((rx, filter)))),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(what, missed = n, "registry watcher fell behind; ending its stream");
                    let e = Status::resource_exhausted(format!(
                        "watch of {what} fell {n} events behind the registry (buffer full); re-run Find to resynchronise"
                    ));
                    return Some((Err(e), None));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Box::pin(head.chain(tail))
}

/// A Find item for `ns`.
pub fn ns_response(ns: NetworkService, deleted: bool) -> NetworkServiceResponse {
    NetworkServiceResponse { network_service: Some(ns), deleted }
}

/// A Find item for `nse`.
pub fn nse_response(nse: NetworkServiceEndpoint, deleted: bool) -> NetworkServiceEndpointResponse {
    NetworkServiceEndpointResponse { network_service_endpoint: Some(nse), deleted }
}

#[async_trait]
impl NsRegistry for MemoryRegistry {
    async fn register(&self, _ctx: &Context, mut ns: NetworkService) -> Result<NetworkService, Status> {
        if ns.name.is_empty() {
            return Err(Status::invalid_argument("network service registration has an empty name"));
        }
        if ns.payload.is_empty() {
            ns.payload = payload::IP.to_string();
        }
        let mut st = self.inner.lock();
        st.nss.insert(ns.name.clone(), ns.clone());
        let _ = self.inner.ns_tx.send(Event { obj: ns.clone(), deleted: false });
        Ok(ns)
    }

    async fn find(&self, _ctx: &Context, q: NetworkServiceQuery) -> Result<NsStream, Status> {
        let query = q.network_service.unwrap_or_default();
        let st = self.inner.lock();
        let snapshot: Vec<NetworkService> = st.nss.values().filter(|ns| ns_matches(&query, ns)).cloned().collect();
        let rx = q.watch.then(|| self.inner.ns_tx.subscribe());
        drop(st);
        Ok(watch_stream("network services", snapshot, rx, move |ns| ns_matches(&query, ns), ns_response))
    }

    async fn unregister(&self, _ctx: &Context, ns: NetworkService) -> Result<(), Status> {
        let mut st = self.inner.lock();
        if let Some(old) = st.nss.remove(&ns.name) {
            let _ = self.inner.ns_tx.send(Event { obj: old, deleted: true });
        }
        Ok(())
    }
}

#[async_trait]
impl NseRegistry for MemoryRegistry {
    async fn register(
        &self,
        _ctx: &Context,
        mut nse: NetworkServiceEndpoint,
    ) -> Result<NetworkServiceEndpoint, Status> {
        if nse.name.is_empty() {
            nse.name = format!("nse-{}", uuid::Uuid::new_v4());
        }
        let deadline = match &nse.expiration_time {
            None => None,
            Some(ts) => {
                let exp = token::from_timestamp(ts).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "endpoint {}: expiration_time {}s {}ns is out of range",
                        nse.name, ts.seconds, ts.nanos
                    ))
                })?;
                let left = exp.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
                Some(Instant::now().checked_add(left).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "endpoint {}: expiration_time {}s is too far in the future",
                        nse.name, ts.seconds
                    ))
                })?)
            }
        };
        let mut st = self.inner.lock();
        let now = Instant::now();
        nse.initial_registration_time = match st.nses.get(&nse.name) {
            Some(old) if old.live(now) => old.nse.initial_registration_time,
            _ => Some(token::to_timestamp(SystemTime::now())),
        };
        if deadline.is_some_and(|d| d <= now) {
            tracing::debug!(nse = %nse.name, "registration already expired; not stored");
            if let Some(old) = st.nses.remove(&nse.name) {
                let _ = self.inner.nse_tx.send(Event { obj: old.nse.clone(), deleted: true });
            }
            return Ok(nse);
        }
        st.generation += 1;
        let generation = st.generation;
        let timer = deadline.map(|d| self.arm(nse.name.clone(), generation, d));
        // Replacing the old entry drops it, which aborts its timer.
        st.nses.insert(nse.name.clone(), NseEntry { nse: nse.clone(), deadline, generation, timer });
        let _ = self.inner.nse_tx.send(Event { obj: nse.clone(), deleted: false });
        Ok(nse)
    }

    async fn find(&self, _ctx: &Context, q: NetworkServiceEndpointQuery) -> Result<NseStream, Status> {
        let query = q.network_service_endpoint.unwrap_or_default();
        let st = self.inner.lock();
        let now = Instant::now();
        let snapshot: Vec<NetworkServiceEndpoint> =
            st.nses.values().filter(|e| e.live(now) && nse_matches(&query, &e.nse)).map(|e| e.nse.clone()).collect();
        let rx = q.watch.then(|| self.inner.nse_tx.subscribe());
        drop(st);
        Ok(watch_stream("network service endpoints", snapshot, rx, move |nse| nse_matches(&query, nse), nse_response))
    }

    async fn unregister(&self, _ctx: &Context, nse: NetworkServiceEndpoint) -> Result<(), Status> {
        let mut st = self.inner.lock();
        if let Some(old) = st.nses.remove(&nse.name) {
            let _ = self.inner.nse_tx.send(Event { obj: old.nse.clone(), deleted: true });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
