//! `interdomain`: routes registry calls for names in another domain
//! (`target@domain`, see [`split_interdomain`]) to that domain's registry —
//! a simplified, in-process registry-proxy (upstream
//! `sdk:pkg/registry/chains/proxydns` + `pkg/registry/common/dnsresolve`).
//!
//! [`Interdomain`] decorates the local NS and NSE registries. Which registry
//! serves a domain is asked of a [`DomainResolver`] ([`domains`]); today
//! that is the static map [`StaticDomains`] (`NSM_DOMAIN_REGISTRIES`), DNS
//! `SRV` resolution as in upstream's registry-proxy-dns is meant to plug in
//! as another [`DomainResolver`].
//!
//! # Routing
//! - **The domain of a call.** NS ops: the domain of the NS name (for Find,
//!   the query's example name). NSE ops: the domain of the NSE name if it
//!   has an `@`, else of the first `network_service_names` entry that has
//!   one (upstream `resolveNSE`).
//! - **No domain** (no `@` anywhere it is looked for, including a Find with
//!   no query object or an empty example): the call goes to the local
//!   registry unchanged — the resolver and every remote registry are never
//!   consulted.
//! - **Own domain** (`x@<own>`, compared ASCII case-insensitively): the
//!   domain is stripped and the call handled by the local registry; results
//!   get `@<domain>` appended again, exactly as the caller spelled it, so
//!   the caller sees the names it asked for.
//! - **Another domain `d`**: the call is forwarded to the registry the
//!   resolver names for `d` (a [`RemoteRegistry`] dialed through the shared
//!   [`ChannelPool`]) with `@d` stripped — from the NS name, or from the NSE
//!   name, every service name and every key of `network_service_labels`.
//!   Every result (Register's return value, every Find item including
//!   `deleted` ones) gets `@d` appended back to the same fields. A name
//!   that comes back empty or already qualified (`x@other`, from a remote
//!   registry that itself proxies) is left as is. The NSE `url` is kept as
//!   the remote registry returned it.
//! - **Find** on another domain: a non-watch Find is bounded by the
//!   caller's deadline; a watch Find streams every remote update (mapped
//!   the same way) until either side ends it. Dropping the returned stream
//!   cancels the remote call.
//!
//! # Errors
//! - `x@` (empty domain) ⇒ `InvalidArgument` naming the name.
//! - An NSE whose names/service names/label keys name two different
//!   domains ⇒ `InvalidArgument` naming both domains (upstream silently
//!   strips them all; see below).
//! - Unknown domain (the resolver has no registry for it) ⇒ `NotFound`
//!   "no registry known for domain `d` (configure NSM_DOMAIN_REGISTRIES)",
//!   also naming the name and this registry's own domain.
//! - Errors of the remote registry keep their gRPC code and are prefixed
//!   with the domain and the registry URL; `Unavailable` (remote
//!   unreachable) and `DeadlineExceeded` also say what to check.
//!
//! # Placement
//! The registry daemon serves `Interdomain` around its memory store (with
//! `expire` only on the local NSE path: a forwarded registration is capped
//! by the remote registry's own `expire`).
//!
//! # Differences from upstream
//! - Upstream spreads this over registry-k8s (forward `@` names to
//!   nsmgr-proxy) → nsmgr-proxy → registry-proxy-dns (DNS `SRV` of
//!   `registry.nsm-system.<d>`) → remote registry. Here the registry itself
//!   forwards directly, the domain → registry map is static, and there is
//!   no notion of an own domain upstream (DNS of the own domain would lead
//!   back to the own registry, which is what the local path does without
//!   the hop).
//! - Upstream's registry-proxy-dns overwrites every returned NSE `url` with
//!   the remote domain's nsmgr-proxy URL (and nsmgr-proxy then substitutes
//!   its own). Here the URL is kept as returned by the remote registry:
//!   in the lab the clusters' node networks are routed to each other, so
//!   the remote nsmgr URL is directly dialable and there is no nsmgr-proxy.
//! - Every key of `network_service_labels` is renamed (upstream renames the
//!   keys that are service names of the NSE, which in practice are all).
//! - Mixed domains are rejected instead of stripped (upstream has a TODO
//!   for exactly this), and results that are already qualified are not
//!   qualified twice.
//! - The forwarding registry sends its own per-RPC token (the remote
//!   registry's `authorize` checks it under mutual TLS), as any registry
//!   client of this sdk does.

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use nsm_api::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery, NetworkServiceQuery};
use tonic::{Code, Status};
use url::Url;

use super::{NsRegistry, NsStream, NseRegistry, NseStream, RemoteRegistry};
use crate::networkservice::chain::Context;
use crate::tools::grpc::ChannelPool;
use crate::tools::nsurl::split_interdomain;
use crate::tools::token::SharedTokenGenerator;

pub mod domains;

pub use domains::{DomainError, DomainResolver, DomainsError, MAX_DOMAIN_LEN, StaticDomains, check_domain};

// === name rewriting ===

/// The domain of `name` (`None` without `@`); `x@` is `InvalidArgument`.
fn domain_of<'a>(what: &str, name: &'a str) -> Result<Option<&'a str>, Status> {
    match split_interdomain(name) {
        (_, None) => Ok(None),
        (_, Some("")) => Err(Status::invalid_argument(format!(
            "{what} {name:?} has an empty domain after '@' (expected <name>@<domain>, e.g. my-service@my.cluster2)"
        ))),
        (_, Some(d)) => Ok(Some(d)),
    }
}

/// The domain an NSE (registration or query) is about: that of its name,
/// else of its first service name with one. All qualified names, service
/// names and label keys must agree on it.
fn nse_domain(nse: &NetworkServiceEndpoint) -> Result<Option<String>, Status> {
    let mut chosen = domain_of("endpoint name", &nse.name)?;
    if chosen.is_none() {
        for s in &nse.network_service_names {
            if let Some(d) = domain_of("network service name", s)? {
                chosen = Some(d);
                break;
            }
        }
    }
    let Some(domain) = chosen else { return Ok(None) };
    let names = std::iter::once(("endpoint name", &nse.name))
        .chain(nse.network_service_names.iter().map(|s| ("network service name", s)))
        .chain(nse.network_service_labels.keys().map(|k| ("network service label key", k)));
    for (what, n) in names {
        if let Some(other) = domain_of(what, n)?
            && !other.eq_ignore_ascii_case(domain)
        {
            return Err(Status::invalid_argument(format!(
                "endpoint {:?} names two domains, {domain} and {other} (in {what} {n:?}); \
                 an endpoint registration or query must be about one domain",
                nse.name
            )));
        }
    }
    Ok(Some(domain.to_string()))
}

/// `x@d` ⇒ `x`.
fn strip(name: &mut String) {
    if let Some(i) = name.find('@') {
        name.truncate(i);
    }
}

/// `x` ⇒ `x@d`; empty and already qualified names are kept.
fn qualify(name: &mut String, domain: &str) {
    if !name.is_empty() && !name.contains('@') {
        name.push('@');
        name.push_str(domain);
    }
}

/// Applies `f` to the NSE name, every service name and every label key.
fn rename_nse(nse: &mut NetworkServiceEndpoint, f: impl Fn(&mut String)) {
    f(&mut nse.name);
    nse.network_service_names.iter_mut().for_each(&f);
    if !nse.network_service_labels.is_empty() {
        nse.network_service_labels = std::mem::take(&mut nse.network_service_labels)
            .into_iter()
            .map(|(mut k, v)| {
                f(&mut k);
                (k, v)
            })
            .collect();
    }
}

// === the decorator ===

/// Where a call about a qualified name goes.
#[derive(Clone)]
struct Target {
    /// The domain as the caller wrote it (appended back to results).
    domain: String,
    /// `None`: our own domain, handled by the local registry.
    remote: Option<RemoteRegistry>,
}

impl Target {
    /// Remote errors: same code, prefixed with domain and URL, with a hint
    /// when the remote could not be reached in time.
    fn err(&self, e: Status) -> Status {
        let Some(remote) = &self.remote else { return e };
        let (domain, url) = (&self.domain, remote.url());
        let prefix = format!("registry {url}: ");
        let msg = e.message().strip_prefix(prefix.as_str()).unwrap_or(e.message());
        let hint = match e.code() {
            Code::Unavailable | Code::DeadlineExceeded => format!(
                "; check that the registry of domain {domain} is running and reachable from this cluster at {url} \
                 (its entry in NSM_DOMAIN_REGISTRIES)"
            ),
            _ => String::new(),
        };
        Status::new(e.code(), format!("domain {domain} (registry {url}): {msg}{hint}"))
    }

    fn url(&self) -> Option<&Url> {
        self.remote.as_ref().map(RemoteRegistry::url)
    }
}

/// Maps every item of a Find stream with `ok`, and every error with `t.err`.
fn map_stream<T: Send + 'static>(
    s: Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>,
    t: Target,
    ok: impl Fn(&mut T, &str) + Send + 'static,
) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
    Box::pin(s.map(move |r| match r {
        Ok(mut item) => {
            ok(&mut item, &t.domain);
            Ok(item)
        }
        Err(e) => Err(t.err(e)),
    }))
}

/// How [`Interdomain`] reaches the registries of other domains.
pub struct Remotes {
    /// Which registry serves a domain.
    pub resolver: Arc<dyn DomainResolver>,
    /// Dials them (mutual TLS with this registry's SVID).
    pub pool: ChannelPool,
    /// This registry's per-RPC tokens for them (their `authorize` needs the
    /// forwarding hop's token under mutual TLS).
    pub tokens: Option<SharedTokenGenerator>,
}

/// The interdomain decorator over a local NS and NSE registry; see the
/// module docs for the routing rules.
pub struct Interdomain {
    local_ns: Arc<dyn NsRegistry>,
    local_nse: Arc<dyn NseRegistry>,
    own_domain: Option<String>,
    remotes: Remotes,
}

impl std::fmt::Debug for Interdomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interdomain").field("own_domain", &self.own_domain).finish_non_exhaustive()
    }
}

impl Interdomain {
    /// Routes calls between `local_ns`/`local_nse` and the registries of
    /// other domains, reached as `remotes` says. `own_domain` (empty =
    /// none) is handled locally.
    pub fn new(
        local_ns: Arc<dyn NsRegistry>,
        local_nse: Arc<dyn NseRegistry>,
        own_domain: Option<String>,
        remotes: Remotes,
    ) -> Arc<Interdomain> {
        let own_domain = own_domain.filter(|d| !d.is_empty());
        Arc::new(Interdomain { local_ns, local_nse, own_domain, remotes })
    }

    /// `None`: unqualified, local as is. Otherwise own domain or remote.
    async fn route(&self, what: &str, name: &str, domain: Option<String>) -> Result<Option<Target>, Status> {
        let Some(domain) = domain else { return Ok(None) };
        if self.own_domain.as_deref().is_some_and(|o| o.eq_ignore_ascii_case(&domain)) {
            return Ok(Some(Target { domain, remote: None }));
        }
        match self.remotes.resolver.registry_url(&domain).await {
            Some(url) => {
                let mut r = RemoteRegistry::new(url, self.remotes.pool.clone());
                if let Some(t) = &self.remotes.tokens {
                    r = r.with_tokens(t.clone());
                }
                Ok(Some(Target { domain, remote: Some(r) }))
            }
            None => {
                let own = match &self.own_domain {
                    Some(o) => format!("this registry's own domain (NSM_DOMAIN) is {o}"),
                    None => "this registry has no own domain (NSM_DOMAIN unset)".to_string(),
                };
                Err(Status::not_found(format!(
                    "{what} {name:?}: no registry known for domain {domain} (configure NSM_DOMAIN_REGISTRIES); {own}"
                )))
            }
        }
    }

    fn ns_reg<'a>(&'a self, t: &'a Target) -> &'a dyn NsRegistry {
        match &t.remote {
            Some(r) => r,
            None => &*self.local_ns,
        }
    }

    fn nse_reg<'a>(&'a self, t: &'a Target) -> &'a dyn NseRegistry {
        match &t.remote {
            Some(r) => r,
            None => &*self.local_nse,
        }
    }
}

fn ns_target(ns: Option<&NetworkService>) -> Result<Option<String>, Status> {
    match ns {
        Some(ns) => Ok(domain_of("network service name", &ns.name)?.map(str::to_string)),
        None => Ok(None),
    }
}

#[async_trait]
impl NsRegistry for Interdomain {
    async fn register(&self, ctx: &Context, mut ns: NetworkService) -> Result<NetworkService, Status> {
        let domain = ns_target(Some(&ns))?;
        let Some(t) = self.route("network service", &ns.name, domain).await? else {
            return self.local_ns.register(ctx, ns).await;
        };
        tracing::debug!(ns = %ns.name, domain = %t.domain, registry = ?t.url().map(Url::as_str), "interdomain NS register");
        strip(&mut ns.name);
        let mut out = self.ns_reg(&t).register(ctx, ns).await.map_err(|e| t.err(e))?;
        qualify(&mut out.name, &t.domain);
        Ok(out)
    }

    async fn find(&self, ctx: &Context, mut q: NetworkServiceQuery) -> Result<NsStream, Status> {
        let domain = ns_target(q.network_service.as_ref())?;
        let name = q.network_service.as_ref().map(|n| n.name.clone()).unwrap_or_default();
        let Some(t) = self.route("network service", &name, domain).await? else {
            return self.local_ns.find(ctx, q).await;
        };
        tracing::debug!(ns = %name, domain = %t.domain, watch = q.watch, registry = ?t.url().map(Url::as_str), "interdomain NS find");
        if let Some(ns) = q.network_service.as_mut() {
            strip(&mut ns.name);
        }
        let s = self.ns_reg(&t).find(ctx, q).await.map_err(|e| t.err(e))?;
        Ok(map_stream(s, t, |r, d| {
            if let Some(ns) = r.network_service.as_mut() {
                qualify(&mut ns.name, d);
            }
        }))
    }

    async fn unregister(&self, ctx: &Context, mut ns: NetworkService) -> Result<(), Status> {
        let domain = ns_target(Some(&ns))?;
        let Some(t) = self.route("network service", &ns.name, domain).await? else {
            return self.local_ns.unregister(ctx, ns).await;
        };
        tracing::debug!(ns = %ns.name, domain = %t.domain, registry = ?t.url().map(Url::as_str), "interdomain NS unregister");
        strip(&mut ns.name);
        self.ns_reg(&t).unregister(ctx, ns).await.map_err(|e| t.err(e))
    }
}

#[async_trait]
impl NseRegistry for Interdomain {
    async fn register(&self, ctx: &Context, mut nse: NetworkServiceEndpoint) -> Result<NetworkServiceEndpoint, Status> {
        let domain = nse_domain(&nse)?;
        let Some(t) = self.route("endpoint", &nse.name, domain).await? else {
            return self.local_nse.register(ctx, nse).await;
        };
        tracing::debug!(nse = %nse.name, domain = %t.domain, registry = ?t.url().map(Url::as_str), "interdomain NSE register");
        rename_nse(&mut nse, strip);
        let mut out = self.nse_reg(&t).register(ctx, nse).await.map_err(|e| t.err(e))?;
        rename_nse(&mut out, |n| qualify(n, &t.domain));
        Ok(out)
    }

    async fn find(&self, ctx: &Context, mut q: NetworkServiceEndpointQuery) -> Result<NseStream, Status> {
        let domain = match &q.network_service_endpoint {
            Some(nse) => nse_domain(nse)?,
            None => None,
        };
        let name = q.network_service_endpoint.as_ref().map(|n| n.name.clone()).unwrap_or_default();
        let Some(t) = self.route("endpoint query", &name, domain).await? else {
            return self.local_nse.find(ctx, q).await;
        };
        tracing::debug!(nse = %name, domain = %t.domain, watch = q.watch, registry = ?t.url().map(Url::as_str), "interdomain NSE find");
        if let Some(nse) = q.network_service_endpoint.as_mut() {
            rename_nse(nse, strip);
        }
        let s = self.nse_reg(&t).find(ctx, q).await.map_err(|e| t.err(e))?;
        Ok(map_stream(s, t, |r, d| {
            if let Some(nse) = r.network_service_endpoint.as_mut() {
                rename_nse(nse, |n| qualify(n, d));
            }
        }))
    }

    async fn unregister(&self, ctx: &Context, mut nse: NetworkServiceEndpoint) -> Result<(), Status> {
        let domain = nse_domain(&nse)?;
        let Some(t) = self.route("endpoint", &nse.name, domain).await? else {
            return self.local_nse.unregister(ctx, nse).await;
        };
        tracing::debug!(nse = %nse.name, domain = %t.domain, registry = ?t.url().map(Url::as_str), "interdomain NSE unregister");
        rename_nse(&mut nse, strip);
        self.nse_reg(&t).unregister(ctx, nse).await.map_err(|e| t.err(e))
    }
}

#[cfg(test)]
mod tests;
