//! Registry tokens and authorization: the `path` gRPC metadata
//! (`sdk:pkg/registry/common/grpcmetadata`), the registry `updatepath` /
//! `updatetoken` ([`UpdatePath`]) and `authorize` ([`Authorize`]).
//!
//! # The registry path (nsm-spec §1.9.3)
//! Register/Unregister carry gRPC metadata `path` = JSON
//! `{"Index":n,"PathSegments":[{"token":"<jwt>"},...]}` (Go field names), in
//! the request and — updated — in the response header. Find does not use it.
//! [`RegistryPath`] reads and writes it; decorators pass the updated path to
//! the ones after them in the `path` entry of the context's incoming
//! metadata, and [`forward_path`] copies it into the request to a remote
//! registry.
//!
//! # [`UpdatePath`] guarantees (server side)
//! - The caller's per-RPC token (`nsm-client-token`) goes into the caller's
//!   segment `PathSegments[Index]`; the index advances; this hop's token for
//!   the caller (minted with the caller as peer) goes into the new
//!   `PathSegments[Index]` (appended, or overwriting a stale one).
//! - A caller that sent no `path` but a token gets segment 0 = its token and
//!   segment 1 = ours (as if it had sent `{"Index":0,"PathSegments":[{}]}`),
//!   so its registrations are attributed to it. Neither path nor token
//!   (plaintext): one segment with our token, index 0 (upstream).
//! - The object's `path_ids[index-1]` / `path_ids[index]` become the SPIFFE
//!   IDs (`sub`) of the caller's and our token (the caller's TLS SPIFFE ID
//!   if its token is not a JWT); earlier ids are kept as sent.
//! - A malformed `path` is `InvalidArgument`.
//! - If the server put a [`PathSlot`] into `ctx.ext`, it receives the
//!   updated path with `Index` restored to the caller's index, for the
//!   response header ([`RegistryPath::to_metadata`]).
//!
//! # [`Authorize`] guarantees (server side)
//! - With a TLS peer, Register and Unregister are evaluated with the
//!   registry policy set (default [`PolicySet::registry`]: the common token
//!   policies, `prev_token_signed`, `client_allowed`) on the left side of
//!   the path; refused ⇒ `PermissionDenied "no sufficient privileges: policy
//!   <name> denied ..."`, evaluation error ⇒ `Internal`; the store behind is
//!   not called. Without a TLS peer (plaintext) calls pass unchecked and
//!   nothing is recorded.
//! - Input (upstream's registry shape): `index`, `path_segments`
//!   (`[{token}]`), `auth_info.certificate`, `resource_id` (= `sub` of
//!   `PathSegments[0].token`, the original registrant), `resource_name`,
//!   `resource_path_ids_map`. **Deviation:** the map holds only the entry of
//!   `resource_name` (if any), not every name this registry knows, so the
//!   cost of a call does not grow with the registry; `client_allowed` only
//!   looks at that entry.
//! - The first successful Register of a name records its `path_ids`
//!   (element 0 = registrant): only that SPIFFE ID may re-register or
//!   unregister the name. The record is released on a successful
//!   Unregister and when the registration's `expiration_time` passes
//!   (checked on access, and swept in amortised O(1) per call), so the
//!   table is bounded by the live registrations.
//!
//! # Chain placement
//! `UpdatePath` first (after the gRPC adapter), then `Authorize`, then the
//! rest (`begin`, `expire`, store or remote) — nsm-spec §2.6.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nsm_api::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery, NetworkServiceQuery};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

use super::{NsRegistry, NsStream, NseRegistry, NseStream};
use crate::networkservice::chain::Context;
use crate::networkservice::connect::DEFAULT_CALL_TIMEOUT;
use crate::security::jwt;
use crate::security::policy::PolicySet;
use crate::tools::token::{self, SharedTokenGenerator};

/// gRPC metadata key of the registry path.
pub const PATH_KEY: &str = "path";

/// One segment of a registry path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryPathSegment {
    /// The JWT of this hop.
    #[serde(default)]
    pub token: String,
}

/// The registry path as it travels in the `path` metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryPath {
    /// Index of the segment of the hop that holds the path.
    #[serde(rename = "Index", default)]
    pub index: u32,
    /// One segment per hop.
    #[serde(rename = "PathSegments", default)]
    pub path_segments: Vec<RegistryPathSegment>,
}

impl RegistryPath {
    /// Reads `path` from metadata (`None` if absent). Malformed JSON or an
    /// index past the segments is `InvalidArgument`.
    pub fn from_metadata(md: &MetadataMap) -> Result<Option<RegistryPath>, Status> {
        let Some(v) = md.get(PATH_KEY) else { return Ok(None) };
        let s = v.to_str().map_err(|_| Status::invalid_argument("registry path metadata is not ASCII"))?;
        let p: RegistryPath = serde_json::from_str(s)
            .map_err(|e| Status::invalid_argument(format!("registry path metadata is not a path: {e}")))?;
        if !p.path_segments.is_empty() && p.index as usize >= p.path_segments.len() {
            return Err(Status::invalid_argument(format!(
                "registry path index {} is out of range: the path has {} segments",
                p.index,
                p.path_segments.len()
            )));
        }
        Ok(Some(p))
    }

    /// Writes the path as `path` metadata (request or response header).
    pub fn to_metadata(&self, md: &mut MetadataMap) {
        if let Ok(s) = serde_json::to_string(self)
            && let Ok(v) = MetadataValue::try_from(s.as_str())
        {
            md.insert(PATH_KEY, v);
        }
    }

    /// `sub` of segment `i`'s token (not verified), if it is a JWT.
    pub fn subject(&self, i: usize) -> Option<String> {
        subject_of(&self.path_segments.get(i)?.token)
    }
}

fn subject_of(token: &str) -> Option<String> {
    jwt::decode(token).ok().map(|(_, c)| c.sub).filter(|s| !s.is_empty())
}

/// Where [`UpdatePath`] leaves the updated path for the response header: a
/// gRPC server adapter that wants to send it inserts a `PathSlot` into
/// `ctx.ext` and copies [`PathSlot::take`] into the response metadata.
#[derive(Clone, Debug, Default)]
pub struct PathSlot(Arc<Mutex<Option<RegistryPath>>>);

impl PathSlot {
    /// The path left by the registry chain, if any.
    pub fn take(&self) -> Option<RegistryPath> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn set(&self, p: RegistryPath) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }
}

/// Copies the (updated) `path` of `ctx.incoming` into the metadata of an
/// outgoing registry call, so the next registry continues the path.
pub fn forward_path(ctx: &Context, out: &mut MetadataMap) {
    if let Some(v) = ctx.incoming.get(PATH_KEY) {
        out.insert(PATH_KEY, v.clone());
    }
}

/// Registry `updatepath` + `updatetoken`.
pub struct UpdatePath<R: ?Sized> {
    inner: Arc<R>,
    tokens: SharedTokenGenerator,
}

impl UpdatePath<dyn NseRegistry> {
    /// For endpoint registrations.
    pub fn nse(inner: Arc<dyn NseRegistry>, tokens: SharedTokenGenerator) -> Arc<Self> {
        Arc::new(UpdatePath { inner, tokens })
    }
}

impl UpdatePath<dyn NsRegistry> {
    /// For network service registrations.
    pub fn ns(inner: Arc<dyn NsRegistry>, tokens: SharedTokenGenerator) -> Arc<Self> {
        Arc::new(UpdatePath { inner, tokens })
    }
}

fn set_id(ids: &mut Vec<String>, i: usize, id: String) {
    if ids.len() <= i {
        ids.resize(i + 1, String::new());
    }
    ids[i] = id;
}

impl<R: ?Sized> UpdatePath<R> {
    /// Updates the path and `path_ids`; returns the context for the inner
    /// registry, the updated path and the caller's index.
    fn update(&self, ctx: &Context, path_ids: &mut Vec<String>) -> Result<(Context, RegistryPath, u32), Status> {
        let mut path = RegistryPath::from_metadata(&ctx.incoming)?.unwrap_or_default();
        let peer_token = token::get(&ctx.incoming).map(|t| t.token).filter(|t| !t.is_empty());
        if path.path_segments.is_empty() {
            path.index = 0;
            path.path_segments.push(RegistryPathSegment::default());
        }
        let caller = path.index;
        let mine = match peer_token {
            Some(t) => {
                let ci = caller as usize;
                path.path_segments[ci].token = t;
                let id = path.subject(ci).or_else(|| ctx.peer.spiffe_id.clone()).unwrap_or_default();
                set_id(path_ids, ci, id);
                path.index = caller + 1;
                if path.path_segments.len() <= ci + 1 {
                    path.path_segments.push(RegistryPathSegment::default());
                }
                ci + 1
            }
            // No caller token (plaintext, or a caller without tokens): we
            // hold the current segment ourselves.
            None => caller as usize,
        };
        let own = self.tokens.generate(&ctx.peer)?;
        path.path_segments[mine].token = own.token;
        if let Some(id) = path.subject(mine) {
            set_id(path_ids, mine, id);
        }
        // The same call with the updated path in its incoming metadata (a
        // call without deadline gets DEFAULT_CALL_TIMEOUT).
        let mut inner = ctx.detached(ctx.remaining().unwrap_or(DEFAULT_CALL_TIMEOUT));
        inner.client_url = ctx.client_url.clone();
        inner.events = ctx.events.clone();
        inner.meta = ctx.meta.clone();
        inner.ext = ctx.ext.clone();
        path.to_metadata(&mut inner.incoming);
        Ok((inner, path, caller))
    }

    fn leave(ctx: &Context, mut path: RegistryPath, caller: u32) {
        if let Some(slot) = ctx.ext.get::<PathSlot>() {
            path.index = caller;
            slot.set(path);
        }
    }
}

#[async_trait]
impl NseRegistry for UpdatePath<dyn NseRegistry> {
    async fn register(&self, ctx: &Context, mut nse: NetworkServiceEndpoint) -> Result<NetworkServiceEndpoint, Status> {
        let (inner, path, caller) = self.update(ctx, &mut nse.path_ids)?;
        let res = self.inner.register(&inner, nse).await;
        Self::leave(ctx, path, caller);
        res
    }
    async fn find(&self, ctx: &Context, q: NetworkServiceEndpointQuery) -> Result<NseStream, Status> {
        self.inner.find(ctx, q).await
    }
    async fn unregister(&self, ctx: &Context, mut nse: NetworkServiceEndpoint) -> Result<(), Status> {
        let (inner, path, caller) = self.update(ctx, &mut nse.path_ids)?;
        let res = self.inner.unregister(&inner, nse).await;
        Self::leave(ctx, path, caller);
        res
    }
}

#[async_trait]
impl NsRegistry for UpdatePath<dyn NsRegistry> {
    async fn register(&self, ctx: &Context, mut ns: NetworkService) -> Result<NetworkService, Status> {
        let (inner, path, caller) = self.update(ctx, &mut ns.path_ids)?;
        let res = self.inner.register(&inner, ns).await;
        Self::leave(ctx, path, caller);
        res
    }
    async fn find(&self, ctx: &Context, q: NetworkServiceQuery) -> Result<NsStream, Status> {
        self.inner.find(ctx, q).await
    }
    async fn unregister(&self, ctx: &Context, mut ns: NetworkService) -> Result<(), Status> {
        let (inner, path, caller) = self.update(ctx, &mut ns.path_ids)?;
        let res = self.inner.unregister(&inner, ns).await;
        Self::leave(ctx, path, caller);
        res
    }
}

/// What is known about a registered name.
struct Owned {
    /// `path_ids` of the first registration; `[0]` is the registrant.
    path_ids: Vec<String>,
    /// When the registration lapses (`None`: until unregistered).
    expires: Option<SystemTime>,
    /// A first registration that passed the policies and is on its way to
    /// the store: the name is reserved for its registrant meanwhile, so a
    /// concurrent registration by someone else is refused. The id tells
    /// reservations apart, so only the call that made one releases or
    /// fulfils it.
    pending: Option<u64>,
}

/// How long a reservation can outlive a registration call that never
/// finished (it is released as soon as the call fails).
const RESERVATION: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Owners {
    names: HashMap<String, Owned>,
    calls_since_sweep: usize,
    reservations: u64,
}

impl Owners {
    /// The live record of `name` (an expired one is dropped).
    fn get(&mut self, name: &str, now: SystemTime) -> Option<&Owned> {
        if self.names.get(name).is_some_and(|o| o.expires.is_some_and(|e| e <= now)) {
            self.names.remove(name);
        }
        self.names.get(name)
    }

    /// Drops expired records once per `max(64, len)` calls.
    fn tick(&mut self, now: SystemTime) {
        self.calls_since_sweep += 1;
        if self.calls_since_sweep >= self.names.len().max(64) {
            self.calls_since_sweep = 0;
            self.names.retain(|_, o| o.expires.is_none_or(|e| e > now));
        }
    }
}

/// Registry `authorize`.
pub struct Authorize<R: ?Sized> {
    inner: Arc<R>,
    policies: PolicySet,
    owners: Mutex<Owners>,
}

impl Authorize<dyn NseRegistry> {
    /// For endpoint registrations, with `policies` (usually
    /// [`PolicySet::registry`]).
    pub fn nse(inner: Arc<dyn NseRegistry>, policies: PolicySet) -> Arc<Self> {
        Arc::new(Authorize { inner, policies, owners: Mutex::default() })
    }
}

impl Authorize<dyn NsRegistry> {
    /// For network service registrations.
    pub fn ns(inner: Arc<dyn NsRegistry>, policies: PolicySet) -> Arc<Self> {
        Arc::new(Authorize { inner, policies, owners: Mutex::default() })
    }
}

/// The resource a call is about, once authorized.
struct Checked {
    /// SPIFFE ID of the original registrant.
    resource_id: String,
    /// The name was free and is now reserved for `resource_id` (this id).
    reserved: Option<u64>,
}

impl<R: ?Sized> Authorize<R> {
    /// Names with an ownership record (for leak tests and metrics).
    pub fn len(&self) -> usize {
        self.owners.lock().map(|o| o.names.len()).unwrap_or(0)
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evaluates the policies; `None` when unchecked (plaintext).
    fn check(&self, ctx: &Context, name: &str, what: &str) -> Result<Option<Checked>, Status> {
        let Some(cert) = &ctx.peer.cert_der else { return Ok(None) };
        let path = RegistryPath::from_metadata(&ctx.incoming)?.unwrap_or_default();
        let end = (path.index as usize + 1).min(path.path_segments.len());
        let left = &path.path_segments[..end];
        let resource_id = left.first().and_then(|s| subject_of(&s.token)).unwrap_or_default();
        let now = SystemTime::now();
        // Held through the evaluation: the lookup, the verdict and the
        // reservation of a new name are one step.
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners.tick(now);
        let entry = owners.get(name, now).map(|e| e.path_ids.clone());
        let mut map = serde_json::Map::new();
        // An unnamed registration gets its name from the store: nothing to
        // reserve.
        let reserve = entry.is_none() && what == "registration" && !name.is_empty();
        if let Some(ids) = entry {
            map.insert(name.to_string(), json!(ids));
        }
        let input = json!({
            "index": path.index,
            "path_segments": left,
            "auth_info": {"certificate": jwt::cert_to_pem(cert)},
            "resource_id": resource_id,
            "resource_name": name,
            "resource_path_ids_map": map,
        });
        self.policies.evaluate(&input).map_err(|r| {
            let peer = ctx.peer.spiffe_id.as_deref().unwrap_or("an unidentified TLS peer");
            tracing::warn!(name, peer, resource_id = %resource_id, policy = r.policy(), error = %r, "registry {what} refused");
            r.to_status(&format!("the {what} of {name:?} by {resource_id:?} (via {peer})"))
        })?;
        let reserved = reserve.then(|| {
            owners.reservations += 1;
            let id = owners.reservations;
            let o = Owned { path_ids: vec![resource_id.clone()], expires: Some(now + RESERVATION), pending: Some(id) };
            owners.names.insert(name.to_string(), o);
            id
        });
        Ok(Some(Checked { resource_id, reserved }))
    }

    /// Releases the reservation of a registration that failed.
    fn failed(&self, name: &str, checked: Option<Checked>) {
        if let Some(id) = checked.and_then(|c| c.reserved) {
            let mut o = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            if o.names.get(name).is_some_and(|e| e.pending == Some(id)) {
                o.names.remove(name);
            }
        }
    }

    fn registered(&self, name: &str, checked: Option<Checked>, path_ids: &[String], expires: Option<SystemTime>) {
        let Some(c) = checked else { return };
        let now = SystemTime::now();
        let mut o = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        match o.get(name, now).map(|e| (e.pending, e.path_ids.first() == Some(&c.resource_id))) {
            // Free, or reserved for this registrant: the first registration.
            None | Some((Some(_), true)) => {}
            // Someone else's reservation: theirs to fulfil.
            Some((Some(_), false)) => return,
            Some((None, _)) => {
                if let Some(e) = o.names.get_mut(name) {
                    e.expires = expires;
                }
                return;
            }
        }
        let path_ids =
            if path_ids.first().is_some_and(|f| !f.is_empty()) { path_ids.to_vec() } else { vec![c.resource_id] };
        o.names.insert(name.to_string(), Owned { path_ids, expires, pending: None });
    }

    fn unregistered(&self, name: &str, checked: Option<Checked>) {
        if checked.is_some() {
            self.owners.lock().unwrap_or_else(|e| e.into_inner()).names.remove(name);
        }
    }
}

#[async_trait]
impl NseRegistry for Authorize<dyn NseRegistry> {
    async fn register(&self, ctx: &Context, nse: NetworkServiceEndpoint) -> Result<NetworkServiceEndpoint, Status> {
        let checked = self.check(ctx, &nse.name, "registration")?;
        let (name, path_ids) = (nse.name.clone(), nse.path_ids.clone());
        let out = match self.inner.register(ctx, nse).await {
            Ok(out) => out,
            Err(e) => {
                self.failed(&name, checked);
                return Err(e);
            }
        };
        let expires = out.expiration_time.as_ref().and_then(token::from_timestamp);
        self.registered(&out.name, checked, &path_ids, expires);
        Ok(out)
    }
    async fn find(&self, ctx: &Context, q: NetworkServiceEndpointQuery) -> Result<NseStream, Status> {
        self.inner.find(ctx, q).await
    }
    async fn unregister(&self, ctx: &Context, nse: NetworkServiceEndpoint) -> Result<(), Status> {
        let checked = self.check(ctx, &nse.name, "unregistration")?;
        let name = nse.name.clone();
        self.inner.unregister(ctx, nse).await?;
        self.unregistered(&name, checked);
        Ok(())
    }
}

#[async_trait]
impl NsRegistry for Authorize<dyn NsRegistry> {
    async fn register(&self, ctx: &Context, ns: NetworkService) -> Result<NetworkService, Status> {
        let checked = self.check(ctx, &ns.name, "registration")?;
        let (name, path_ids) = (ns.name.clone(), ns.path_ids.clone());
        let out = match self.inner.register(ctx, ns).await {
            Ok(out) => out,
            Err(e) => {
                self.failed(&name, checked);
                return Err(e);
            }
        };
        self.registered(&out.name, checked, &path_ids, None);
        Ok(out)
    }
    async fn find(&self, ctx: &Context, q: NetworkServiceQuery) -> Result<NsStream, Status> {
        self.inner.find(ctx, q).await
    }
    async fn unregister(&self, ctx: &Context, ns: NetworkService) -> Result<(), Status> {
        let checked = self.check(ctx, &ns.name, "unregistration")?;
        let name = ns.name.clone();
        self.inner.unregister(ctx, ns).await?;
        self.unregistered(&name, checked);
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::networkservice::chain::Peer;
    use crate::registry::find_nses;
    use crate::registry::memory::MemoryRegistry;
    use crate::security::jwt::testpki::{TestPki, now, peer_of};
    use crate::security::policy::tests::token;
    use crate::security::{StaticSvid, Svid};
    use crate::tools::token::{JwtTokens, Token};

    fn tokgen(s: &Svid) -> SharedTokenGenerator {
        JwtTokens::new(Arc::new(StaticSvid(Arc::new(s.clone()))), Duration::from_secs(600))
    }

    /// A call from `caller` to `server` with `caller`'s per-RPC token and
    /// (optionally) a path.
    fn call(caller: &Svid, server: &Svid, path: Option<&RegistryPath>) -> Context {
        let mut ctx = Context::with_timeout(Duration::from_secs(5));
        ctx.peer = peer_of(caller);
        let t = token(caller, &server.spiffe_id, now() + 600);
        token::put(&mut ctx.incoming, &Token { token: t, expires: SystemTime::now() + Duration::from_secs(600) });
        if let Some(p) = path {
            p.to_metadata(&mut ctx.incoming);
        }
        ctx.ext.insert(PathSlot::default());
        ctx
    }

    fn nse(name: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec!["svc".into()],
            url: "tcp://1.2.3.4:5".into(),
            ..Default::default()
        }
    }

    fn registry_chain(me: &Svid, store: MemoryRegistry) -> (Arc<dyn NseRegistry>, Arc<Authorize<dyn NseRegistry>>) {
        let auth = Authorize::nse(Arc::new(store), PolicySet::registry());
        (UpdatePath::nse(auth.clone(), tokgen(me)), auth)
    }

    #[test]
    fn path_metadata_round_trip_and_go_field_names() {
        let p = RegistryPath {
            index: 1,
            path_segments: vec![RegistryPathSegment { token: "a".into() }, Default::default()],
        };
        let mut md = MetadataMap::new();
        p.to_metadata(&mut md);
        assert_eq!(
            md.get(PATH_KEY).unwrap().to_str().unwrap(),
            r#"{"Index":1,"PathSegments":[{"token":"a"},{"token":""}]}"#
        );
        assert_eq!(RegistryPath::from_metadata(&md).unwrap().unwrap(), p);
        md.insert(PATH_KEY, MetadataValue::from_static("{nope"));
        assert_eq!(RegistryPath::from_metadata(&md).unwrap_err().code(), tonic::Code::InvalidArgument);
        md.insert(PATH_KEY, MetadataValue::from_static(r#"{"Index":3,"PathSegments":[{"token":""}]}"#));
        assert_eq!(RegistryPath::from_metadata(&md).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(RegistryPath::from_metadata(&MetadataMap::new()).unwrap().is_none());
        let mut out = MetadataMap::new();
        let mut ctx = Context::default();
        p.to_metadata(&mut ctx.incoming);
        forward_path(&ctx, &mut out);
        assert_eq!(RegistryPath::from_metadata(&out).unwrap().unwrap(), p);
    }

    #[tokio::test]
    async fn two_hop_path_is_built_and_authorized() {
        let pki = TestPki::new();
        let nse_id = pki.svid("spiffe://test.local/nse");
        let nsmgr = pki.svid("spiffe://test.local/nsmgr");
        let registry = pki.svid("spiffe://test.local/registry");
        let store = MemoryRegistry::default();
        let (reg, auth) = registry_chain(&registry, store.clone());

        // nse → nsmgr: the nse sends no path, only its token.
        let (nsmgr_chain, _) = registry_chain(&nsmgr, MemoryRegistry::default());
        let ctx = call(&nse_id, &nsmgr, None);
        let out = nsmgr_chain.register(&ctx, nse("nse-1")).await.unwrap();
        assert_eq!(out.path_ids, ["spiffe://test.local/nse", "spiffe://test.local/nsmgr"]);
        let p = ctx.ext.get::<PathSlot>().unwrap().take().unwrap();
        assert_eq!(p.index, 0, "the response path has the caller's index");
        assert_eq!(p.path_segments.len(), 2);
        assert_eq!(p.subject(1).as_deref(), Some("spiffe://test.local/nsmgr"));

        // nsmgr → registry, forwarding the path at the nsmgr's index.
        let fwd = RegistryPath { index: 1, ..p };
        let ctx = call(&nsmgr, &registry, Some(&fwd));
        let out = reg.register(&ctx, NetworkServiceEndpoint { path_ids: out.path_ids, ..nse("nse-1") }).await.unwrap();
        assert_eq!(
            out.path_ids,
            ["spiffe://test.local/nse", "spiffe://test.local/nsmgr", "spiffe://test.local/registry"]
        );
        assert_eq!(auth.len(), 1);
        let p = ctx.ext.get::<PathSlot>().unwrap().take().unwrap();
        assert_eq!((p.index, p.path_segments.len()), (1, 3));
        assert_eq!(find_nses(&*reg, &Context::default(), nse("nse-1")).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn only_the_first_registrant_may_reregister_or_unregister() {
        let pki = TestPki::new();
        let alice = pki.svid("spiffe://test.local/alice");
        let bob = pki.svid("spiffe://test.local/bob");
        let registry = pki.svid("spiffe://test.local/registry");
        let (reg, auth) = registry_chain(&registry, MemoryRegistry::default());

        reg.register(&call(&alice, &registry, None), nse("nse-1")).await.unwrap();
        reg.register(&call(&alice, &registry, None), nse("nse-1")).await.unwrap();
        for e in [
            reg.register(&call(&bob, &registry, None), nse("nse-1")).await.unwrap_err(),
            reg.unregister(&call(&bob, &registry, None), nse("nse-1")).await.unwrap_err(),
        ] {
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains("policy client_allowed denied"), "{}", e.message());
        }
        reg.register(&call(&bob, &registry, None), nse("nse-2")).await.unwrap();
        assert_eq!(auth.len(), 2);
        reg.unregister(&call(&alice, &registry, None), nse("nse-1")).await.unwrap();
        assert_eq!(auth.len(), 1, "released on unregister");
        // Now the name is free again.
        reg.register(&call(&bob, &registry, None), nse("nse-1")).await.unwrap();
    }

    /// A store whose registrations wait for a permit, then fail or pass.
    struct Gate {
        store: MemoryRegistry,
        permits: tokio::sync::Semaphore,
        fail: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl NseRegistry for Gate {
        async fn register(&self, ctx: &Context, nse: NetworkServiceEndpoint) -> Result<NetworkServiceEndpoint, Status> {
            self.permits.acquire().await.unwrap().forget();
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Status::unavailable("store down"));
            }
            NseRegistry::register(&self.store, ctx, nse).await
        }
        async fn find(&self, ctx: &Context, q: NetworkServiceEndpointQuery) -> Result<NseStream, Status> {
            NseRegistry::find(&self.store, ctx, q).await
        }
        async fn unregister(&self, ctx: &Context, nse: NetworkServiceEndpoint) -> Result<(), Status> {
            NseRegistry::unregister(&self.store, ctx, nse).await
        }
    }

    #[tokio::test]
    async fn a_name_is_reserved_while_its_first_registration_is_on_its_way() {
        let pki = TestPki::new();
        let alice = pki.svid("spiffe://test.local/alice");
        let bob = pki.svid("spiffe://test.local/bob");
        let registry = pki.svid("spiffe://test.local/registry");
        let gate = Arc::new(Gate {
            store: MemoryRegistry::default(),
            permits: tokio::sync::Semaphore::new(0),
            fail: Default::default(),
        });
        let auth = Authorize::nse(gate.clone(), PolicySet::registry());
        let reg: Arc<dyn NseRegistry> = UpdatePath::nse(auth.clone(), tokgen(&registry));

        // Alice's first registration is stuck in the store; Bob's for the
        // same name meanwhile is refused, not raced.
        let first = tokio::spawn({
            let (reg, ctx) = (reg.clone(), call(&alice, &registry, None));
            async move { reg.register(&ctx, nse("nse-1")).await }
        });
        let t0 = std::time::Instant::now();
        while auth.is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(5), "the first registration reserved nothing");
            tokio::task::yield_now().await;
        }
        let e = reg.register(&call(&bob, &registry, None), nse("nse-1")).await.unwrap_err();
        assert!(e.message().contains("policy client_allowed denied"), "{}", e.message());
        gate.permits.add_permits(1);
        first.await.unwrap().unwrap();
        assert_eq!(auth.len(), 1);

        // A first registration the store refuses releases its reservation.
        gate.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        gate.permits.add_permits(1);
        assert!(reg.register(&call(&alice, &registry, None), nse("nse-2")).await.is_err());
        assert_eq!(auth.len(), 1, "nse-2 is free again");
        gate.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        gate.permits.add_permits(1);
        reg.register(&call(&bob, &registry, None), nse("nse-2")).await.unwrap();

        // Unnamed registrations (the store names them) reserve nothing.
        gate.permits.add_permits(2);
        let a = reg.register(&call(&alice, &registry, None), nse("")).await.unwrap();
        let b = reg.register(&call(&bob, &registry, None), nse("")).await.unwrap();
        assert!(!a.name.is_empty() && a.name != b.name, "{} {}", a.name, b.name);
    }

    #[tokio::test]
    async fn bad_tokens_are_refused_by_the_right_policy() {
        let pki = TestPki::new();
        let alice = pki.svid("spiffe://test.local/alice");
        let registry = pki.svid("spiffe://test.local/registry");
        let (reg, auth) = registry_chain(&registry, MemoryRegistry::default());
        let with_token = |t: String| {
            let mut ctx = call(&alice, &registry, None);
            token::put(&mut ctx.incoming, &Token { token: t, expires: SystemTime::now() + Duration::from_secs(60) });
            ctx
        };
        let cases = [
            ("tokens_valid", "x.y.z".to_string()),
            ("tokens_expired", token(&alice, &registry.spiffe_id, now() - 1)),
            ("tokens_chained", token(&alice, "spiffe://test.local/other", now() + 60)),
            ("prev_token_signed", token(&pki.svid("spiffe://test.local/alice"), &registry.spiffe_id, now() + 60)),
        ];
        for (policy, t) in cases {
            let e = reg.register(&with_token(t), nse("n")).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains(&format!("policy {policy} denied")), "{policy}: {}", e.message());
        }
        assert_eq!(auth.len(), 0);
    }

    #[tokio::test]
    async fn records_lapse_with_the_registration_and_plaintext_is_unchecked() {
        let pki = TestPki::new();
        let alice = pki.svid("spiffe://test.local/alice");
        let bob = pki.svid("spiffe://test.local/bob");
        let registry = pki.svid("spiffe://test.local/registry");
        let (reg, auth) = registry_chain(&registry, MemoryRegistry::default());
        let soon = token::to_timestamp(SystemTime::now() + Duration::from_millis(1100));
        let short = NetworkServiceEndpoint { expiration_time: Some(soon), ..nse("nse-1") };
        reg.register(&call(&alice, &registry, None), short).await.unwrap();
        assert_eq!(auth.len(), 1);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // The registration lapsed: bob may take the name.
        reg.register(&call(&bob, &registry, None), nse("nse-1")).await.unwrap();
        // Many lapsed registrations are swept without being touched again.
        for i in 0..100 {
            let t = token::to_timestamp(SystemTime::now() + Duration::from_millis(1100));
            let n = NetworkServiceEndpoint { expiration_time: Some(t), ..nse(&format!("tmp-{i}")) };
            reg.register(&call(&alice, &registry, None), n).await.unwrap();
        }
        assert_eq!(auth.len(), 101);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for _ in 0..101 {
            reg.register(&call(&bob, &registry, None), nse("nse-1")).await.unwrap();
        }
        assert_eq!(auth.len(), 1);

        // Plaintext: no peer certificate, nothing checked or recorded.
        let mut ctx = call(&alice, &registry, None);
        ctx.peer = Peer::default();
        reg.register(&ctx, nse("nse-1")).await.unwrap();
        assert_eq!(auth.len(), 1);
    }

    #[tokio::test]
    async fn ns_registrations_are_owned_too() {
        let pki = TestPki::new();
        let alice = pki.svid("spiffe://test.local/alice");
        let bob = pki.svid("spiffe://test.local/bob");
        let registry = pki.svid("spiffe://test.local/registry");
        let auth = Authorize::ns(Arc::new(MemoryRegistry::default()), PolicySet::registry());
        let reg = UpdatePath::ns(auth.clone(), tokgen(&registry));
        let ns = NetworkService { name: "svc".into(), ..Default::default() };
        reg.register(&call(&alice, &registry, None), ns.clone()).await.unwrap();
        let e = reg.register(&call(&bob, &registry, None), ns.clone()).await.unwrap_err();
        assert!(e.message().contains("client_allowed"), "{}", e.message());
        reg.unregister(&call(&alice, &registry, None), ns).await.unwrap();
        assert_eq!(auth.len(), 0);
    }
}
