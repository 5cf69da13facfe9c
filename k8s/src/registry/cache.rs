//! One kind's objects as this process knows them: listed once, then kept
//! current by a watch that resumes from the last resourceVersion it saw and
//! re-lists when the API server says that version is gone (410).
//!
//! # Guarantees
//! - **Find sees one consistent history.** A snapshot and a subscription
//!   are taken under the lock every change is published under, so a
//!   watching Find misses and repeats nothing between the two.
//! - **Read your writes.** The registry applies the object the API server
//!   returned for its own create/update/delete at once; the same change
//!   arriving later on the watch is not published again (same
//!   resourceVersion).
//! - **Re-list is diffed.** After a re-list (start, 410, a watch that
//!   cannot be resumed) objects that vanished meanwhile are published as
//!   deleted and changed ones as updated; unchanged ones are not repeated.
//! - **Not ready, no answer.** Until the first list succeeded, [`Cache::ready`]
//!   waits (a Find after a restart is never answered from an empty cache).
//! - The watch loop ends when the last [`Cache`] clone is dropped.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::{Resource, ResourceExt};
use nsm_sdk::registry::memory::Event;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};

/// A kind of record kept in Kubernetes, and its registry message.
pub trait Kind:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    /// The registry message (`NetworkService`, `NetworkServiceEndpoint`).
    type Record: Clone + Debug + Send + Sync + 'static;
    /// For logs: `network services`, `network service endpoints`.
    const WHAT: &'static str;
    /// The record; its name is the object's when the spec has none (as
    /// upstream reads objects written by others).
    fn record(&self) -> Self::Record;
}

/// `(namespace, name)` of an object.
pub type Key = (String, String);

/// A subscription to every change of one kind's records.
pub type Changes<R> = broadcast::Receiver<Event<R>>;

struct Entry<R> {
    resource_version: String,
    record: R,
}

struct State<R> {
    objects: BTreeMap<Key, Entry<R>>,
}

/// The cache of one kind (cheap to clone).
pub struct Cache<K: Kind> {
    inner: Arc<Inner<K>>,
}

impl<K: Kind> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Cache { inner: self.inner.clone() }
    }
}

struct Inner<K: Kind> {
    state: Mutex<State<K::Record>>,
    tx: broadcast::Sender<Event<K::Record>>,
    ready: watch::Sender<bool>,
    /// Successful lists so far (1 after the start; more after 410s).
    lists: AtomicU64,
}

/// How the watch loop talks to the API server.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// The server ends each watch after this long; it is then resumed from
    /// the last resourceVersion (a stuck connection is noticed by then).
    pub timeout: Duration,
    /// Pause after a failed list or watch request.
    pub retry: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions { timeout: Duration::from_secs(300), retry: Duration::from_secs(1) }
    }
}

fn key_of<K: Kind>(o: &K) -> Key {
    (o.namespace().unwrap_or_default(), o.name_any())
}

impl<K: Kind> Cache<K> {
    /// A cache of every object of `K` that `api` (all namespaces) shows,
    /// kept current by a task on the current runtime.
    pub fn start(api: Api<K>, opts: WatchOptions) -> Cache<K> {
        let cache = Cache::idle();
        tokio::spawn(run(Arc::downgrade(&cache.inner), api, opts));
        cache
    }

    /// A cache nothing fills but [`Cache::apply`] and [`Cache::remove`].
    fn idle() -> Cache<K> {
        let (tx, _) = broadcast::channel(nsm_sdk::registry::memory::DEFAULT_WATCH_BUFFER);
        let (ready, _) = watch::channel(false);
        let state = Mutex::new(State { objects: BTreeMap::new() });
        Cache { inner: Arc::new(Inner { state, tx, ready, lists: AtomicU64::new(0) }) }
    }

    /// How many lists succeeded: 1 after the start, one more after each
    /// 410 Gone or watch that could not be resumed.
    pub fn lists(&self) -> u64 {
        self.inner.lists.load(Ordering::Relaxed)
    }

    /// Waits until the first list has succeeded, at most `timeout`.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.ready.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r)).await.is_ok_and(|r| r.is_ok())
    }

    /// The records passing `keep`, and (with `watch`) a subscription to
    /// every later change, taken together.
    pub fn snapshot(
        &self,
        keep: impl Fn(&K::Record) -> bool,
        watch: bool,
    ) -> (Vec<K::Record>, Option<Changes<K::Record>>) {
        let st = self.inner.lock();
        let snap = st.objects.values().filter(|e| keep(&e.record)).map(|e| e.record.clone()).collect();
        (snap, watch.then(|| self.inner.tx.subscribe()))
    }

    /// Every `(key, resourceVersion, record)` (the expiry reaper).
    pub fn entries(&self) -> Vec<(Key, String, K::Record)> {
        let st = self.inner.lock();
        st.objects.iter().map(|(k, e)| (k.clone(), e.resource_version.clone(), e.record.clone())).collect()
    }

    /// The record stored under `key`, if any.
    pub fn get(&self, key: &Key) -> Option<K::Record> {
        self.inner.lock().objects.get(key).map(|e| e.record.clone())
    }

    /// Applies an object the API server returned (our write, or the watch).
    pub fn apply(&self, o: &K) {
        self.inner.apply(o);
    }

    /// Forgets `key` (deleted by us, or the watch says so).
    pub fn remove(&self, key: &Key) {
        self.inner.remove(key);
    }

    /// Open subscriptions (leak checks).
    pub fn watchers(&self) -> usize {
        self.inner.tx.receiver_count()
    }
}

impl<K: Kind> Inner<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<K::Record>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, o: &K) {
        let rv = o.resource_version().unwrap_or_default();
        let mut st = self.lock();
        let key = key_of(o);
        if st.objects.get(&key).is_some_and(|e| e.resource_version == rv) {
            return;
        }
        let record = o.record();
        st.objects.insert(key, Entry { resource_version: rv, record: record.clone() });
        let _ = self.tx.send(Event { obj: record, deleted: false });
    }

    fn remove(&self, key: &Key) {
        let mut st = self.lock();
        if let Some(e) = st.objects.remove(key) {
            let _ = self.tx.send(Event { obj: e.record, deleted: true });
        }
    }

    /// Replaces everything with a fresh list, publishing the difference.
    fn replace_all(&self, items: &[K]) {
        let mut st = self.lock();
        let listed: HashSet<Key> = items.iter().map(key_of).collect();
        let gone: Vec<Key> = st.objects.keys().filter(|k| !listed.contains(*k)).cloned().collect();
        for k in gone {
            if let Some(e) = st.objects.remove(&k) {
                let _ = self.tx.send(Event { obj: e.record, deleted: true });
            }
        }
        drop(st);
        for o in items {
            self.apply(o);
        }
    }
}

/// Lists, then watches from the list's resourceVersion, resuming each
/// watch from the last version seen; re-lists on 410 Gone. Ends when the
/// cache is dropped.
async fn run<K: Kind>(inner: Weak<Inner<K>>, api: Api<K>, opts: WatchOptions) {
    let mut failures = 0u32;
    'list: loop {
        let list = match api.list(&ListParams::default()).await {
            Ok(l) => l,
            Err(e) => {
                if failures.is_multiple_of(30) {
                    tracing::warn!(what = K::WHAT, error = %e, "listing from the Kubernetes API failed; retrying");
                }
                failures += 1;
                tokio::time::sleep(opts.retry).await;
                if inner.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        let Some(me) = inner.upgrade() else { return };
        me.replace_all(&list.items);
        me.lists.fetch_add(1, Ordering::Relaxed);
        me.ready.send_replace(true);
        drop(me);
        if failures > 0 {
            tracing::info!(what = K::WHAT, "listing from the Kubernetes API works again");
            failures = 0;
        }
        let mut rv = list.metadata.resource_version.unwrap_or_default();
        tracing::debug!(what = K::WHAT, objects = list.items.len(), resource_version = %rv, "listed");
        loop {
            let wp = WatchParams::default().timeout(u32::try_from(opts.timeout.as_secs()).unwrap_or(290).max(1));
            let stream = match api.watch(&wp, &rv).await {
                Ok(s) => s,
                Err(kube::Error::Api(s)) if s.code == 410 => {
                    tracing::info!(what = K::WHAT, resource_version = %rv, "resourceVersion gone (410): re-listing");
                    continue 'list;
                }
                Err(e) => {
                    tracing::warn!(what = K::WHAT, error = %e, resource_version = %rv, "watch request failed; retrying");
                    tokio::time::sleep(opts.retry).await;
                    if inner.strong_count() == 0 {
                        return;
                    }
                    continue;
                }
            };
            let mut stream = stream.boxed();
            loop {
                let ev = tokio::select! {
                    ev = stream.try_next() => ev,
                    _ = closed(&inner) => return,
                };
                let Some(me) = inner.upgrade() else { return };
                match ev {
                    Ok(Some(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                        rv = o.resource_version().unwrap_or(rv);
                        me.apply(&o);
                    }
                    Ok(Some(WatchEvent::Deleted(o))) => {
                        rv = o.resource_version().unwrap_or(rv);
                        me.remove(&key_of(&o));
                    }
                    Ok(Some(WatchEvent::Bookmark(b))) => rv = b.metadata.resource_version,
                    Ok(Some(WatchEvent::Error(s))) if s.code == 410 => {
                        tracing::info!(
                            what = K::WHAT,
                            resource_version = %rv,
                            "the API server no longer has this resourceVersion (410 Gone): re-listing"
                        );
                        continue 'list;
                    }
                    Ok(Some(WatchEvent::Error(s))) => {
                        tracing::warn!(what = K::WHAT, code = s.code, reason = %s.reason, message = %s.message, "watch error; resuming");
                        break;
                    }
                    // The server ended the watch (its timeout): resume.
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(what = K::WHAT, error = %e, "watch stream broke; resuming");
                        break;
                    }
                }
            }
        }
    }
}

/// Resolves once every cache handle is gone (checked every second, so an
/// idle watch does not keep the task alive for its whole timeout).
async fn closed<K: Kind>(inner: &Weak<Inner<K>>) {
    while inner.strong_count() > 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{NetworkService, NetworkServiceSpec};

    fn ns(name: &str, rv: &str, payload: &str) -> NetworkService {
        let mut o = NetworkService::new(name, NetworkServiceSpec { payload: payload.into(), ..Default::default() });
        o.metadata.namespace = Some("default".into());
        o.metadata.resource_version = Some(rv.into());
        o
    }

    fn drain(rx: &mut broadcast::Receiver<Event<nsm_api::registry::NetworkService>>) -> Vec<(String, String, bool)> {
        let mut out = vec![];
        while let Ok(e) = rx.try_recv() {
            out.push((e.obj.name, e.obj.payload, e.deleted));
        }
        out
    }

    #[test]
    fn a_relist_publishes_only_what_changed_meanwhile() {
        let c = Cache::<NetworkService>::idle();
        c.apply(&ns("a", "1", "IP"));
        c.apply(&ns("b", "2", "IP"));
        let (snap, rx) = c.snapshot(|_| true, true);
        let mut rx = rx.unwrap();
        assert_eq!(snap.len(), 2);
        // Missed while the watch was gone: b changed, c appeared, a did not.
        c.inner.replace_all(&[ns("a", "1", "IP"), ns("b", "5", "ETHERNET"), ns("c", "6", "IP")]);
        assert_eq!(drain(&mut rx), vec![("b".into(), "ETHERNET".into(), false), ("c".into(), "IP".into(), false)]);
        // a and b deleted meanwhile.
        c.inner.replace_all(&[ns("c", "6", "IP")]);
        assert_eq!(drain(&mut rx), vec![("a".into(), "IP".into(), true), ("b".into(), "ETHERNET".into(), true)]);
        assert_eq!(c.snapshot(|_| true, false).0.len(), 1);
    }

    #[test]
    fn our_own_write_is_not_published_again_when_the_watch_brings_it() {
        let c = Cache::<NetworkService>::idle();
        let (_, rx) = c.snapshot(|_| true, true);
        let mut rx = rx.unwrap();
        c.apply(&ns("a", "7", "IP"));
        c.apply(&ns("a", "7", "IP"));
        assert_eq!(drain(&mut rx).len(), 1);
        c.remove(&("default".into(), "a".into()));
        c.remove(&("default".into(), "a".into()));
        assert_eq!(drain(&mut rx), vec![("a".into(), "IP".into(), true)]);
    }
}
