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

#[derive(Clone)]
struct Event<T> {
    obj: T,
    deleted: bool,
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

/// Turns a snapshot plus a subscription into a Find stream.
fn watch_stream<T, R>(
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
        Ok(watch_stream(
            "network services",
            snapshot,
            rx,
            move |ns| ns_matches(&query, ns),
            |ns, deleted| NetworkServiceResponse { network_service: Some(ns), deleted },
        ))
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
        Ok(watch_stream(
            "network service endpoints",
            snapshot,
            rx,
            move |nse| nse_matches(&query, nse),
            |nse, deleted| NetworkServiceEndpointResponse { network_service_endpoint: Some(nse), deleted },
        ))
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
mod tests {
    use std::collections::HashMap;

    use futures::{Stream, StreamExt};
    use nsm_api::registry::{Destination, Match, NetworkServiceLabels};

    use super::*;
    use crate::registry::{find_ns, find_nses};

    fn ctx() -> Context {
        Context::default()
    }

    fn labels(svc: &str, pairs: &[(&str, &str)]) -> HashMap<String, NetworkServiceLabels> {
        HashMap::from([(
            svc.to_string(),
            NetworkServiceLabels { labels: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() },
        )])
    }

    fn nse(name: &str, services: &[&str], url: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: services.iter().map(|s| s.to_string()).collect(),
            url: url.into(),
            ..Default::default()
        }
    }

    fn in_secs(s: u64) -> prost_types::Timestamp {
        token::to_timestamp(SystemTime::now() + Duration::from_secs(s))
    }

    async fn next_nse<S>(s: &mut S) -> (String, bool)
    where
        S: Stream<Item = Result<NetworkServiceEndpointResponse, Status>> + Unpin,
    {
        let r = tokio::time::timeout(Duration::from_secs(5), s.next()).await.unwrap().unwrap().unwrap();
        (r.network_service_endpoint.unwrap().name, r.deleted)
    }

    async fn nse_names(reg: &MemoryRegistry, q: NetworkServiceEndpoint) -> Vec<String> {
        let mut v: Vec<String> = find_nses(reg, &ctx(), q).await.unwrap().into_iter().map(|n| n.name).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn ns_register_defaults_payload_and_find_by_example() {
        let reg = MemoryRegistry::new();
        let a = NsRegistry::register(&reg, &ctx(), NetworkService { name: "a".into(), ..Default::default() })
            .await
            .unwrap();
        assert_eq!(a.payload, "IP");
        let m = vec![Match {
            routes: vec![Destination { destination_selector: HashMap::from([("x".into(), "1".into())]), weight: 0 }],
            ..Default::default()
        }];
        let b =
            NetworkService { name: "b".into(), payload: "ETHERNET".into(), matches: m.clone(), ..Default::default() };
        NsRegistry::register(&reg, &ctx(), b).await.unwrap();
        let names = |v: Vec<NetworkService>| {
            let mut n: Vec<String> = v.into_iter().map(|n| n.name).collect();
            n.sort();
            n
        };
        let q = |name: &str, payload: &str, matches: Vec<Match>| NetworkService {
            name: name.into(),
            payload: payload.into(),
            matches,
            ..Default::default()
        };
        let cases: Vec<(NetworkService, Vec<&str>)> = vec![
            (q("", "", vec![]), vec!["a", "b"]),
            (q("a", "", vec![]), vec!["a"]),
            (q("c", "", vec![]), vec![]),
            (q("", "IP", vec![]), vec!["a"]),
            (q("", "ETHERNET", vec![]), vec!["b"]),
            (q("a", "ETHERNET", vec![]), vec![]),
            (q("", "", m.clone()), vec!["b"]),
            (q("", "", vec![Match::default()]), vec![]),
        ];
        for (query, want) in cases {
            assert_eq!(names(find_ns(&reg, &ctx(), query.clone()).await.unwrap()), want, "{query:?}");
        }
        // Missing query object matches everything.
        let s =
            NsRegistry::find(&reg, &ctx(), NetworkServiceQuery { network_service: None, watch: false }).await.unwrap();
        assert_eq!(s.collect::<Vec<_>>().await.len(), 2);
        assert_eq!(
            NsRegistry::register(&reg, &ctx(), NetworkService::default()).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        NsRegistry::unregister(&reg, &ctx(), q("a", "", vec![])).await.unwrap();
        NsRegistry::unregister(&reg, &ctx(), q("unknown", "", vec![])).await.unwrap();
        assert_eq!(reg.ns_len(), 1);
    }

    #[tokio::test]
    async fn nse_find_semantics() {
        let reg = MemoryRegistry::new();
        let mut a = nse("a", &["s1", "s2"], "tcp://10.0.0.1:5001");
        a.network_service_labels = labels("s1", &[("app", "x"), ("nodeName", "n1")]);
        let exp = in_secs(3600);
        a.expiration_time = Some(exp);
        let b = nse("b", &["s1"], "unix:///var/lib/nse.sock");
        NseRegistry::register(&reg, &ctx(), a).await.unwrap();
        NseRegistry::register(&reg, &ctx(), b).await.unwrap();

        let q = NetworkServiceEndpoint::default;
        let cases: Vec<(NetworkServiceEndpoint, Vec<&str>)> = vec![
            (q(), vec!["a", "b"]),
            (NetworkServiceEndpoint { name: "a".into(), ..q() }, vec!["a"]),
            (NetworkServiceEndpoint { name: "zz".into(), ..q() }, vec![]),
            (NetworkServiceEndpoint { network_service_names: vec!["s1".into()], ..q() }, vec!["a", "b"]),
            (NetworkServiceEndpoint { network_service_names: vec!["s1".into(), "s2".into()], ..q() }, vec!["a"]),
            (NetworkServiceEndpoint { network_service_names: vec!["s3".into()], ..q() }, vec![]),
            (NetworkServiceEndpoint { network_service_labels: labels("s1", &[("app", "x")]), ..q() }, vec!["a"]),
            (NetworkServiceEndpoint { network_service_labels: labels("s1", &[]), ..q() }, vec!["a"]),
            (NetworkServiceEndpoint { network_service_labels: labels("s2", &[]), ..q() }, vec![]),
            (NetworkServiceEndpoint { network_service_labels: labels("s1", &[("app", "y")]), ..q() }, vec![]),
            (NetworkServiceEndpoint { url: "10.0.0.1".into(), ..q() }, vec!["a"]),
            (NetworkServiceEndpoint { url: "unix://".into(), ..q() }, vec!["b"]),
            (NetworkServiceEndpoint { url: "://".into(), ..q() }, vec!["a", "b"]),
            (
                NetworkServiceEndpoint {
                    expiration_time: Some(prost_types::Timestamp { seconds: exp.seconds, nanos: 0 }),
                    ..q()
                },
                vec!["a"],
            ),
            (NetworkServiceEndpoint { expiration_time: Some(in_secs(7200)), ..q() }, vec![]),
            // An NSE without expiration has "0 seconds", as in Go.
            (NetworkServiceEndpoint { expiration_time: Some(Default::default()), ..q() }, vec!["b"]),
        ];
        for (query, want) in cases {
            assert_eq!(nse_names(&reg, query.clone()).await, want, "{query:?}");
        }
        let s = NseRegistry::find(
            &reg,
            &ctx(),
            NetworkServiceEndpointQuery { network_service_endpoint: None, watch: false },
        )
        .await
        .unwrap();
        assert_eq!(s.collect::<Vec<_>>().await.len(), 2);
    }

    #[tokio::test]
    async fn nse_names_are_generated_and_unregister_unknown_is_ok() {
        let reg = MemoryRegistry::new();
        let a = NseRegistry::register(&reg, &ctx(), nse("", &["s"], "tcp://x:1")).await.unwrap();
        let b = NseRegistry::register(&reg, &ctx(), nse("", &["s"], "tcp://x:2")).await.unwrap();
        assert!(a.name.starts_with("nse-") && a.name.len() > 10, "{}", a.name);
        assert_ne!(a.name, b.name);
        assert!(a.initial_registration_time.is_some());
        assert_eq!(reg.nse_len(), 2);
        NseRegistry::unregister(&reg, &ctx(), nse("nope", &[], "")).await.unwrap();
        NseRegistry::unregister(&reg, &ctx(), a).await.unwrap();
        assert_eq!(reg.nse_len(), 1);
        // Extreme timestamps neither panic nor misbehave.
        let far = NetworkServiceEndpoint {
            name: "far".into(),
            expiration_time: Some(prost_types::Timestamp { seconds: i64::MAX, nanos: 999_999_999 }),
            ..Default::default()
        };
        match NseRegistry::register(&reg, &ctx(), far).await {
            Ok(_) => assert_eq!(
                nse_names(&reg, NetworkServiceEndpoint { name: "far".into(), ..Default::default() }).await,
                ["far"]
            ),
            Err(e) => assert!(e.code() == tonic::Code::InvalidArgument && e.message().contains("endpoint far"), "{e}"),
        }
        let past = NetworkServiceEndpoint {
            name: "past".into(),
            expiration_time: Some(prost_types::Timestamp { seconds: i64::MIN, nanos: 0 }),
            ..Default::default()
        };
        match NseRegistry::register(&reg, &ctx(), past).await {
            Ok(_) => assert!(
                nse_names(&reg, NetworkServiceEndpoint { name: "past".into(), ..Default::default() }).await.is_empty()
            ),
            Err(e) => assert!(e.code() == tonic::Code::InvalidArgument && e.message().contains("endpoint past"), "{e}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn watch_sees_register_unregister_and_expiry() {
        let reg = MemoryRegistry::new();
        NseRegistry::register(&reg, &ctx(), nse("old", &["s"], "u")).await.unwrap();
        NseRegistry::register(&reg, &ctx(), nse("other-service", &["t"], "u")).await.unwrap();
        let q = NetworkServiceEndpointQuery {
            network_service_endpoint: Some(NetworkServiceEndpoint {
                network_service_names: vec!["s".into()],
                ..Default::default()
            }),
            watch: true,
        };
        let mut w = NseRegistry::find(&reg, &ctx(), q).await.unwrap();
        assert_eq!(next_nse(&mut w).await, ("old".into(), false), "snapshot first");
        assert_eq!(reg.watcher_count(), 1);

        NseRegistry::register(&reg, &ctx(), nse("t-only", &["t"], "u")).await.unwrap(); // filtered out
        NseRegistry::register(&reg, &ctx(), nse("new", &["s"], "u")).await.unwrap();
        assert_eq!(next_nse(&mut w).await, ("new".into(), false));
        NseRegistry::unregister(&reg, &ctx(), nse("new", &[], "")).await.unwrap();
        assert_eq!(next_nse(&mut w).await, ("new".into(), true));

        let mut e = nse("exp", &["s"], "u");
        e.expiration_time = Some(in_secs(10));
        NseRegistry::register(&reg, &ctx(), e).await.unwrap();
        assert_eq!(next_nse(&mut w).await, ("exp".into(), false));
        assert_eq!(reg.timer_count(), 1);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(next_nse(&mut w).await, ("exp".into(), true));
        assert_eq!(reg.nse_len(), 3, "old, other-service, t-only");
        assert_eq!(reg.timer_count(), 0);

        // Non-watch find ends after the snapshot.
        let s = NseRegistry::find(&reg, &ctx(), NetworkServiceEndpointQuery::default()).await.unwrap();
        assert_eq!(s.collect::<Vec<_>>().await.len(), 3);

        drop(w);
        assert_eq!(reg.watcher_count(), 0, "dropping the stream frees the subscription");
    }

    #[tokio::test]
    async fn ns_watch() {
        let reg = MemoryRegistry::new();
        let mut w =
            NsRegistry::find(&reg, &ctx(), NetworkServiceQuery { network_service: None, watch: true }).await.unwrap();
        NsRegistry::register(&reg, &ctx(), NetworkService { name: "a".into(), ..Default::default() }).await.unwrap();
        NsRegistry::unregister(&reg, &ctx(), NetworkService { name: "a".into(), ..Default::default() }).await.unwrap();
        let r = w.next().await.unwrap().unwrap();
        assert_eq!((r.network_service.unwrap().payload, r.deleted), ("IP".to_string(), false));
        let r = w.next().await.unwrap().unwrap();
        assert!(r.deleted);
    }

    #[tokio::test(start_paused = true)]
    async fn reregister_keeps_initial_time_and_rearms_expiry() {
        let reg = MemoryRegistry::new();
        let mut e = nse("e", &["s"], "u");
        e.expiration_time = Some(in_secs(10));
        let first = NseRegistry::register(&reg, &ctx(), e.clone()).await.unwrap();
        let t0 = first.initial_registration_time.unwrap();

        tokio::time::sleep(Duration::from_secs(5)).await;
        // SystemTime does not move with the paused tokio clock: ask for 20 s
        // from "now" so the new deadline is 15 s after the old one.
        e.expiration_time = Some(in_secs(20));
        e.initial_registration_time = Some(in_secs(999));
        let second = NseRegistry::register(&reg, &ctx(), e.clone()).await.unwrap();
        assert_eq!(second.initial_registration_time.unwrap(), t0);
        assert_eq!(reg.timer_count(), 1, "old timer replaced, not added");

        tokio::time::sleep(Duration::from_secs(10)).await; // past the first deadline
        assert_eq!(nse_names(&reg, Default::default()).await, ["e"]);
        tokio::time::sleep(Duration::from_secs(11)).await; // past the second
        assert!(nse_names(&reg, Default::default()).await.is_empty());
        assert_eq!(reg.nse_len(), 0);

        // Re-registering without expiration disarms; unregister disarms.
        e.expiration_time = Some(in_secs(10));
        NseRegistry::register(&reg, &ctx(), e.clone()).await.unwrap();
        e.expiration_time = None;
        let third = NseRegistry::register(&reg, &ctx(), e.clone()).await.unwrap();
        assert_ne!(third.initial_registration_time.unwrap(), in_secs(999));
        assert_eq!(reg.timer_count(), 0);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(reg.nse_len(), 1);

        // A registration that is already expired is not stored.
        e.expiration_time = Some(token::to_timestamp(SystemTime::now() - Duration::from_secs(1)));
        NseRegistry::register(&reg, &ctx(), e).await.unwrap();
        assert_eq!(reg.nse_len(), 0);
    }

    #[tokio::test]
    async fn expired_entries_are_never_found_even_before_removal() {
        let reg = MemoryRegistry::new();
        {
            let mut st = reg.inner.lock();
            st.nses.insert(
                "stale".into(),
                NseEntry { nse: nse("stale", &["s"], "u"), deadline: Some(Instant::now()), generation: 1, timer: None },
            );
        }
        assert!(nse_names(&reg, Default::default()).await.is_empty());
        assert_eq!(reg.nse_len(), 1);
    }

    #[tokio::test]
    async fn lagging_watcher_gets_resource_exhausted_then_ends() {
        let reg = MemoryRegistry::with_watch_buffer(4);
        let mut w = NseRegistry::find(
            &reg,
            &ctx(),
            NetworkServiceEndpointQuery { network_service_endpoint: None, watch: true },
        )
        .await
        .unwrap();
        for i in 0..10 {
            NseRegistry::register(&reg, &ctx(), nse(&format!("n{i}"), &["s"], "u")).await.unwrap();
        }
        let e = w.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(w.next().await.is_none());
        drop(w);
        assert_eq!(reg.watcher_count(), 0);
    }

    #[tokio::test]
    async fn snapshot_and_stream_neither_miss_nor_duplicate() {
        let reg = MemoryRegistry::new();
        let writer = {
            let reg = reg.clone();
            tokio::spawn(async move {
                for i in 0..500 {
                    NseRegistry::register(&reg, &ctx(), nse(&format!("n{i}"), &["s"], "u")).await.unwrap();
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        tokio::task::yield_now().await;
        let mut w = NseRegistry::find(
            &reg,
            &ctx(),
            NetworkServiceEndpointQuery { network_service_endpoint: None, watch: true },
        )
        .await
        .unwrap();
        writer.await.unwrap();
        let mut seen = std::collections::HashSet::new();
        while seen.len() < 500 {
            let (name, deleted) = next_nse(&mut w).await;
            assert!(!deleted);
            assert!(seen.insert(name.clone()), "duplicate {name}");
        }
        assert!(tokio::time::timeout(Duration::from_millis(50), w.next()).await.is_err(), "nothing extra");
    }

    #[tokio::test(start_paused = true)]
    async fn no_leaks_after_1000_cycles() {
        let reg = MemoryRegistry::new();
        let metrics = tokio::runtime::Handle::current().metrics();
        let baseline = metrics.num_alive_tasks();
        for i in 0..1000 {
            let mut e = nse(&format!("n{}", i % 7), &["s"], "u");
            e.expiration_time = Some(in_secs(60));
            let e = NseRegistry::register(&reg, &ctx(), e).await.unwrap();
            if i % 3 == 0 {
                // re-register: replaces the timer
                NseRegistry::register(&reg, &ctx(), e.clone()).await.unwrap();
            }
            NseRegistry::unregister(&reg, &ctx(), e).await.unwrap();
        }
        assert_eq!(reg.nse_len(), 0);
        assert_eq!(reg.timer_count(), 0);
        settle(&metrics, baseline).await;
        assert_eq!(metrics.num_alive_tasks(), baseline, "aborted timer tasks are gone");

        // Dropping the registry ends its timers too.
        let mut e = nse("x", &["s"], "u");
        e.expiration_time = Some(in_secs(60));
        NseRegistry::register(&reg, &ctx(), e).await.unwrap();
        assert_eq!(metrics.num_alive_tasks(), baseline + 1);
        drop(reg);
        settle(&metrics, baseline).await;
        assert_eq!(metrics.num_alive_tasks(), baseline);
    }

    /// Lets the scheduler reap aborted tasks (it handles a bounded number
    /// per tick).
    async fn settle(metrics: &tokio::runtime::RuntimeMetrics, baseline: usize) {
        for _ in 0..1000 {
            if metrics.num_alive_tasks() == baseline {
                return;
            }
            tokio::task::yield_now().await;
        }
    }
}
