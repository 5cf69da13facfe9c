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
    /// One segment per hop. Go clients send `null` for a path not begun
    /// yet (a nil slice), which reads as empty.
    #[serde(rename = "PathSegments", default, deserialize_with = "null_as_empty")]
    pub path_segments: Vec<RegistryPathSegment>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<RegistryPathSegment>, D::Error> {
    Ok(Option::<Vec<RegistryPathSegment>>::deserialize(d)?.unwrap_or_default())
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

/// `UpdatePath` for one of the two registry traits (they have the same
/// three calls; written once for both).
macro_rules! update_path_for {
    ($reg:ident, $rec:ty, $query:ty, $stream:ty) => {
        #[async_trait]
        impl $reg for UpdatePath<dyn $reg> {
            async fn register(&self, ctx: &Context, mut rec: $rec) -> Result<$rec, Status> {
                let (inner, path, caller) = self.update(ctx, &mut rec.path_ids)?;
                let res = self.inner.register(&inner, rec).await;
                Self::leave(ctx, path, caller);
                res
            }
            async fn find(&self, ctx: &Context, q: $query) -> Result<$stream, Status> {
                self.inner.find(ctx, q).await
            }
            async fn unregister(&self, ctx: &Context, mut rec: $rec) -> Result<(), Status> {
                let (inner, path, caller) = self.update(ctx, &mut rec.path_ids)?;
                let res = self.inner.unregister(&inner, rec).await;
                Self::leave(ctx, path, caller);
                res
            }
        }
    };
}

update_path_for!(NsRegistry, NetworkService, NetworkServiceQuery, NsStream);
update_path_for!(NseRegistry, NetworkServiceEndpoint, NetworkServiceEndpointQuery, NseStream);

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

/// `Authorize` for one of the two registry traits; `$expires` reads when a
/// stored record lapses (endpoints expire, services do not).
macro_rules! authorize_for {
    ($reg:ident, $rec:ty, $query:ty, $stream:ty, $expires:expr) => {
        #[async_trait]
        impl $reg for Authorize<dyn $reg> {
            async fn register(&self, ctx: &Context, rec: $rec) -> Result<$rec, Status> {
                let checked = self.check(ctx, &rec.name, "registration")?;
                let (name, path_ids) = (rec.name.clone(), rec.path_ids.clone());
                let out = match self.inner.register(ctx, rec).await {
                    Ok(out) => out,
                    Err(e) => {
                        self.failed(&name, checked);
                        return Err(e);
                    }
                };
                let expires: fn(&$rec) -> Option<SystemTime> = $expires;
                self.registered(&out.name, checked, &path_ids, expires(&out));
                Ok(out)
            }
            async fn find(&self, ctx: &Context, q: $query) -> Result<$stream, Status> {
                self.inner.find(ctx, q).await
            }
            async fn unregister(&self, ctx: &Context, rec: $rec) -> Result<(), Status> {
                let checked = self.check(ctx, &rec.name, "unregistration")?;
                let name = rec.name.clone();
                self.inner.unregister(ctx, rec).await?;
                self.unregistered(&name, checked);
                Ok(())
            }
        }
    };
}

authorize_for!(NsRegistry, NetworkService, NetworkServiceQuery, NsStream, |_| None);
authorize_for!(NseRegistry, NetworkServiceEndpoint, NetworkServiceEndpointQuery, NseStream, |out| out
    .expiration_time
    .as_ref()
    .and_then(token::from_timestamp));

#[cfg(test)]
mod tests;
