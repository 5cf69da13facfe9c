//! The registry's records as Kubernetes objects (upstream's registry-k8s,
//! `sdk-k8s:pkg/registry/etcd`): network services and endpoints are the
//! custom resources of [`crate::crd`], so the state survives registry
//! restarts and is shared by every replica, and NetworkServices created
//! with `kubectl apply` are served exactly like registered ones.
//!
//! # Guarantees
//! - **Register** creates the object in this registry's namespace, or
//!   updates it when it exists (re-reading and retrying on a conflicting
//!   concurrent update, up to 5 times). An empty name becomes `nse-<uuid>`
//!   (`netsvc-<uuid>` for a service) and is returned. A name Kubernetes
//!   cannot hold is `InvalidArgument` naming the rule, before anything is
//!   written. A service's payload defaults to `IP`; an endpoint keeps its
//!   `initial_registration_time` across re-registrations. Register returns
//!   the stored record. One request writes the object, so a failure leaves
//!   nothing half-written.
//! - **Find** answers from the cache of every namespace (see [`cache`]),
//!   by example as the memory registry does; with `watch`, changes follow,
//!   deletions with `deleted = true`. An expired endpoint is never
//!   returned.
//! - **Unregister** deletes the object in this registry's namespace;
//!   unknown is `Ok`.
//! - **Expiry.** Endpoints carry their `expiration_time` (capped by the
//!   registry's `expire` in front); every replica deletes expired endpoints
//!   of any namespace, conditionally on the resourceVersion it saw, so a
//!   re-registration that raced the reaper wins and replicas do not fight.
//! - **Errors**: see [`crate::client::status`]; an API server that cannot
//!   be reached is `Unavailable` naming it.
//!
//! # Differences from upstream
//! - A generated name is returned and stored in the spec (upstream leaves
//!   both empty).
//! - The watch resumes from the last resourceVersion and re-lists after
//!   410 Gone, publishing what changed meanwhile; upstream re-watches
//!   without a version every 60 s and replays every object each time.
//! - Expired endpoints are reaped on a timer by every replica; upstream
//!   reaps lazily when a Find or its watch loop sees them.
//! - Conflicting updates are retried; upstream returns the 409.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use nsm_api::mechanisms::payload;
use nsm_api::registry::{
    NetworkService as NsRecord, NetworkServiceEndpoint as NseRecord, NetworkServiceEndpointQuery, NetworkServiceQuery,
};
use nsm_sdk::networkservice::Context;
use nsm_sdk::registry::memory::{ns_matches, ns_response, nse_matches, nse_response, watch_stream};
use nsm_sdk::registry::{NsRegistry, NsStream, NseRegistry, NseStream};
use nsm_sdk::tools::token;
use tonic::Status;

pub mod cache;

use cache::{Cache, Kind, WatchOptions};

use crate::client::{is_already_exists, is_conflict, is_not_found, status};
use crate::crd::{NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointSpec, NetworkServiceSpec};

impl Kind for NetworkService {
    type Record = NsRecord;
    const WHAT: &'static str = "network services";
    fn record(&self) -> NsRecord {
        let mut r = NsRecord::from(&self.spec);
        if r.name.is_empty() {
            r.name = self.name_any();
        }
        r
    }
}

impl Kind for NetworkServiceEndpoint {
    type Record = NseRecord;
    const WHAT: &'static str = "network service endpoints";
    fn record(&self) -> NseRecord {
        let mut r = NseRecord::from(&self.spec);
        if r.name.is_empty() {
            r.name = self.name_any();
        }
        r
    }
}

/// How long a Find waits for the first list after a (re)start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Attempts of a Register whose update keeps conflicting.
const UPDATE_ATTEMPTS: usize = 5;

/// The registry on the Kubernetes API (cheap to clone).
#[derive(Clone)]
pub struct K8sRegistry {
    client: Client,
    namespace: String,
    ns: Cache<NetworkService>,
    nse: Cache<NetworkServiceEndpoint>,
    _reaper: Arc<nsm_sdk::networkservice::timeout::AbortOnDrop>,
}

impl std::fmt::Debug for K8sRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sRegistry").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

impl K8sRegistry {
    /// A registry writing into `namespace`, reading every namespace, with
    /// its watches and reaper running on the current runtime.
    pub fn start(client: Client, namespace: &str, opts: WatchOptions) -> K8sRegistry {
        let ns = Cache::start(Api::<NetworkService>::all(client.clone()), opts.clone());
        let nse = Cache::start(Api::<NetworkServiceEndpoint>::all(client.clone()), opts);
        let reaper = tokio::spawn(reap(client.clone(), nse.clone()));
        K8sRegistry {
            client,
            namespace: namespace.to_string(),
            ns,
            nse,
            _reaper: Arc::new(nsm_sdk::networkservice::timeout::AbortOnDrop::new(reaper)),
        }
    }

    /// The namespace this registry writes into.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Successful lists of (network services, endpoints) so far: 1 each
    /// after the start, more after 410 Gone.
    pub fn lists(&self) -> (u64, u64) {
        (self.ns.lists(), self.nse.lists())
    }

    /// Open watch subscriptions (NS + NSE; leak checks).
    pub fn watchers(&self) -> usize {
        self.ns.watchers() + self.nse.watchers()
    }

    fn api<K: Kind>(&self) -> Api<K> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn wait_ready<K: Kind>(&self, cache: &Cache<K>, ctx: &Context) -> Result<(), Status> {
        let budget = ctx.remaining().unwrap_or(READY_TIMEOUT).min(READY_TIMEOUT);
        if cache.ready(budget).await {
            return Ok(());
        }
        Err(Status::unavailable(format!(
            "the {} of the Kubernetes API are not listed yet: the API server cannot be reached or refuses the list \
             (see this registry's log)",
            K::WHAT
        )))
    }

    /// Creates `obj`, or updates the existing object of its name.
    async fn put<K: Kind>(&self, what: &str, obj: K, merge: impl Fn(&K, &mut K)) -> Result<K, Status> {
        let api = self.api::<K>();
        let name = obj.name_any();
        match api.create(&PostParams::default(), &obj).await {
            Ok(o) => return Ok(o),
            Err(e) if is_already_exists(&e) => {}
            Err(e) => return Err(status(&format!("registering {what} {name:?}"), &e)),
        }
        let mut last = None;
        for _ in 0..UPDATE_ATTEMPTS {
            let current = api.get(&name).await.map_err(|e| status(&format!("reading {what} {name:?}"), &e))?;
            let mut next = obj.clone();
            next.meta_mut().resource_version = current.resource_version();
            merge(&current, &mut next);
            match api.replace(&name, &PostParams::default(), &next).await {
                Ok(o) => return Ok(o),
                Err(e) if is_conflict(&e) => last = Some(e),
                Err(e) => return Err(status(&format!("updating {what} {name:?}"), &e)),
            }
        }
        let e = last.map(|e| e.to_string()).unwrap_or_default();
        Err(Status::aborted(format!(
            "updating {what} {name:?}: it kept changing under {UPDATE_ATTEMPTS} attempts ({e}); retry"
        )))
    }

    async fn delete<K: Kind>(&self, what: &str, name: &str) -> Result<(), Status> {
        if name.is_empty() {
            return Ok(());
        }
        match self.api::<K>().delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(status(&format!("unregistering {what} {name:?}"), &e)),
        }
    }
}

/// Checks that `name` can name a Kubernetes object (a DNS-1123
/// subdomain), naming the rule it breaks.
pub fn check_object_name(what: &str, name: &str) -> Result<(), Status> {
    let bad = |rule: &str| {
        Status::invalid_argument(format!(
            "{what} name {name:?} cannot be stored in Kubernetes: {rule} (object names are DNS-1123 subdomains)"
        ))
    };
    if name.len() > 253 {
        return Err(bad("it is longer than 253 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.') {
        return Err(bad("only lower-case letters, digits, '-' and '.' are allowed"));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Err(bad("it must start and end with a letter or digit"));
    }
    Ok(())
}

fn object<K: Kind>(name: &str, namespace: &str, spec: impl FnOnce() -> K) -> K {
    let mut o = spec();
    o.meta_mut().name = Some(name.to_string());
    o.meta_mut().namespace = Some(namespace.to_string());
    o
}

fn live(nse: &NseRecord, now: SystemTime) -> bool {
    nse.expiration_time.as_ref().and_then(token::from_timestamp).is_none_or(|t| t > now)
}

#[async_trait]
impl NsRegistry for K8sRegistry {
    async fn register(&self, _ctx: &Context, mut rec: NsRecord) -> Result<NsRecord, Status> {
        if rec.name.is_empty() {
            rec.name = format!("netsvc-{}", uuid::Uuid::new_v4());
        }
        check_object_name("network service", &rec.name)?;
        if rec.payload.is_empty() {
            rec.payload = payload::IP.to_string();
        }
        let obj = object(&rec.name, &self.namespace, || NetworkService::new(&rec.name, NetworkServiceSpec::from(&rec)));
        let stored = self.put("network service", obj, |_, _| {}).await?;
        self.ns.apply(&stored);
        Ok(stored.record())
    }

    async fn find(&self, ctx: &Context, q: NetworkServiceQuery) -> Result<NsStream, Status> {
        self.wait_ready(&self.ns, ctx).await?;
        let query = q.network_service.unwrap_or_default();
        let keep = query.clone();
        let (snap, rx) = self.ns.snapshot(|r| ns_matches(&keep, r), q.watch);
        Ok(watch_stream("network services", snap, rx, move |r| ns_matches(&query, r), ns_response))
    }

    async fn unregister(&self, _ctx: &Context, rec: NsRecord) -> Result<(), Status> {
        self.delete::<NetworkService>("network service", &rec.name).await?;
        self.ns.remove(&(self.namespace.clone(), rec.name));
        Ok(())
    }
}

#[async_trait]
impl NseRegistry for K8sRegistry {
    async fn register(&self, _ctx: &Context, mut rec: NseRecord) -> Result<NseRecord, Status> {
        if rec.name.is_empty() {
            rec.name = format!("nse-{}", uuid::Uuid::new_v4());
        }
        check_object_name("endpoint", &rec.name)?;
        let now = SystemTime::now();
        if rec.initial_registration_time.is_none() {
            rec.initial_registration_time = Some(token::to_timestamp(now));
        }
        let spec = NetworkServiceEndpointSpec::from(&rec);
        let obj = object(&rec.name, &self.namespace, || NetworkServiceEndpoint::new(&rec.name, spec));
        // A live earlier registration keeps its initial registration time.
        let keep_initial = |current: &NetworkServiceEndpoint, next: &mut NetworkServiceEndpoint| {
            if live(&current.record(), SystemTime::now())
                && let Some(t) = current.spec.initial_registration_time
            {
                next.spec.initial_registration_time = Some(t);
            }
        };
        let stored = self.put("endpoint", obj, keep_initial).await?;
        self.nse.apply(&stored);
        Ok(stored.record())
    }

    async fn find(&self, ctx: &Context, q: NetworkServiceEndpointQuery) -> Result<NseStream, Status> {
        self.wait_ready(&self.nse, ctx).await?;
        let query = q.network_service_endpoint.unwrap_or_default();
        let keep = query.clone();
        let now = SystemTime::now();
        let (snap, rx) = self.nse.snapshot(|r| live(r, now) && nse_matches(&keep, r), q.watch);
        let filter = move |r: &NseRecord| nse_matches(&query, r);
        Ok(watch_stream("network service endpoints", snap, rx, filter, nse_response))
    }

    async fn unregister(&self, _ctx: &Context, rec: NseRecord) -> Result<(), Status> {
        self.delete::<NetworkServiceEndpoint>("endpoint", &rec.name).await?;
        self.nse.remove(&(self.namespace.clone(), rec.name));
        Ok(())
    }
}

/// How often the reaper looks for expired endpoints.
const REAP_EVERY: Duration = Duration::from_millis(500);

/// Deletes expired endpoints of every namespace, each only if it is still
/// the version that expired.
async fn reap(client: Client, cache: Cache<NetworkServiceEndpoint>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        let now = SystemTime::now();
        for ((ns, name), rv, rec) in cache.entries() {
            if live(&rec, now) {
                continue;
            }
            let api: Api<NetworkServiceEndpoint> = Api::namespaced(client.clone(), &ns);
            let dp = DeleteParams {
                preconditions: Some(Preconditions { resource_version: Some(rv), uid: None }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &dp).await {
                Ok(_) => {
                    tracing::info!(nse = %name, namespace = %ns, "endpoint registration expired: deleted");
                    cache.remove(&(ns, name));
                }
                // Re-registered meanwhile (409) or already gone (404): the
                // watch brings the current state.
                Err(e) if is_conflict(&e) || is_not_found(&e) => {}
                Err(e) => {
                    tracing::warn!(nse = %name, namespace = %ns, error = %e, "deleting an expired endpoint failed")
                }
            }
        }
    }
}
