//! `interdomain`: routes registry calls for names in another domain
//! (`target@domain`, see [`split_interdomain`]) to that domain's registry —
//! a simplified, in-process registry-proxy (upstream
//! `sdk:pkg/registry/chains/proxydns` + `pkg/registry/common/dnsresolve`).
//!
//! [`Interdomain`] decorates the local NS and NSE registries. Which registry
//! serves a domain is asked of a [`DomainResolver`]; today that is the
//! static map [`StaticDomains`] (`NSM_DOMAIN_REGISTRIES`), DNS `SRV`
//! resolution as in upstream's registry-proxy-dns is meant to plug in as
//! another [`DomainResolver`].
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
//! - Registry path/tokens are not forwarded (`RemoteRegistry` sends none);
//!   cross-domain registry authorisation is not implemented yet.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use nsm_api::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery, NetworkServiceQuery};
use tonic::{Code, Status};
use url::Url;

use super::{NsRegistry, NsStream, NseRegistry, NseStream, RemoteRegistry};
use crate::networkservice::chain::Context;
use crate::tools::grpc::{self, ChannelPool, parse_url};
use crate::tools::nsurl::split_interdomain;
use crate::tools::token::SharedTokenGenerator;

/// The environment variable [`StaticDomains`] is configured from (named in
/// error messages so operators know what to fix).
pub const DOMAIN_REGISTRIES_ENV: &str = "NSM_DOMAIN_REGISTRIES";

/// Longest domain name accepted (DNS limit).
pub const MAX_DOMAIN_LEN: usize = 253;

// === domain → registry resolution ===

/// Finds the registry serving a domain.
///
/// The seam for DNS: upstream's registry-proxy-dns resolves `SRV` +
/// `A/AAAA` of `registry.nsm-system.<domain>`, which is asynchronous, hence
/// an async method. `domain` is passed as the caller wrote it;
/// implementations should treat it case-insensitively, as DNS does.
#[async_trait]
pub trait DomainResolver: Send + Sync {
    /// The registry URL for `domain`, or `None` if the domain is unknown.
    async fn registry_url(&self, domain: &str) -> Option<Url>;
}

/// A static domain → registry URL map, parsed from
/// `my.cluster2=tcp://10.2.0.1:5002,my.cluster3=registry.c3:5002`.
///
/// # Guarantees
/// - Parsing accepts an empty string (no domains), ignores whitespace around
///   entries and empty entries (`a=..,,b=..,`), and rejects, naming the
///   entry and what is wrong: an entry without `=`, an invalid domain name
///   (see [`check_domain`]), a URL that [`parse_url`] rejects (a bare
///   `host:port` means `tcp://host:port`), and a domain given twice.
/// - Domains are matched ASCII case-insensitively (stored lower-case).
/// - [`std::fmt::Display`] renders the map back in the input syntax, sorted
///   by domain, and parses to an equal map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StaticDomains(BTreeMap<String, Url>);

/// Why a domain name is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("domain name is empty")]
    Empty,
    #[error("domain name {domain:?} is {len} bytes long (at most 253)")]
    TooLong { domain: String, len: usize },
    #[error("character {ch:?} is not allowed in domain name {domain:?} (allowed: letters, digits, '-', '.', '_')")]
    BadChar { domain: String, ch: char },
}

/// Why a [`StaticDomains`] string was rejected. Every variant names the
/// offending entry.
#[derive(Debug, thiserror::Error)]
pub enum DomainsError {
    #[error(
        "invalid NSM_DOMAIN_REGISTRIES entry {entry:?}: expected <domain>=<registry URL>, e.g. my.cluster2=tcp://10.2.0.1:5002"
    )]
    Syntax { entry: String },
    #[error("invalid NSM_DOMAIN_REGISTRIES entry {entry:?}: {source}")]
    Domain { entry: String, source: DomainError },
    #[error("invalid NSM_DOMAIN_REGISTRIES entry {entry:?}: registry URL: {source}")]
    Url { entry: String, source: grpc::Error },
    #[error("NSM_DOMAIN_REGISTRIES lists domain {domain} twice ({first} and {second}); give each domain one registry")]
    Duplicate { domain: String, first: String, second: String },
}

/// Checks that `domain` is a plausible domain name: 1..=253 bytes of ASCII
/// letters, digits, `-`, `.` and `_` (the alphabet NSURLs accept).
pub fn check_domain(domain: &str) -> Result<(), DomainError> {
    if domain.is_empty() {
        return Err(DomainError::Empty);
    }
    if domain.len() > MAX_DOMAIN_LEN {
        return Err(DomainError::TooLong { domain: domain.to_string(), len: domain.len() });
    }
    if let Some(ch) = domain.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))) {
        return Err(DomainError::BadChar { domain: domain.to_string(), ch });
    }
    Ok(())
}

impl StaticDomains {
    /// An empty map.
    pub fn new() -> StaticDomains {
        StaticDomains::default()
    }

    /// Adds `domain → url`; the domain must be valid and not yet present.
    pub fn insert(&mut self, domain: &str, url: Url) -> Result<(), DomainsError> {
        let entry = || format!("{domain}={url}");
        check_domain(domain).map_err(|source| DomainsError::Domain { entry: entry(), source })?;
        let key = domain.to_ascii_lowercase();
        if let Some(first) = self.0.get(&key) {
            return Err(DomainsError::Duplicate { domain: key, first: first.to_string(), second: url.to_string() });
        }
        self.0.insert(key, url);
        Ok(())
    }

    /// The registry of `domain` (case-insensitive).
    pub fn get(&self, domain: &str) -> Option<&Url> {
        self.0.get(&domain.to_ascii_lowercase())
    }

    /// Known domains, lower-case, sorted.
    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Number of domains.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No domain configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::str::FromStr for StaticDomains {
    type Err = DomainsError;

    fn from_str(s: &str) -> Result<StaticDomains, DomainsError> {
        let mut out = StaticDomains::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((domain, url)) = entry.split_once('=') else {
                return Err(DomainsError::Syntax { entry: entry.to_string() });
            };
            let (domain, url) = (domain.trim(), url.trim());
            check_domain(domain).map_err(|source| DomainsError::Domain { entry: entry.to_string(), source })?;
            let url = parse_url(url).map_err(|source| DomainsError::Url { entry: entry.to_string(), source })?;
            out.insert(domain, url)?;
        }
        Ok(out)
    }
}

impl std::fmt::Display for StaticDomains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (d, u)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}={u}")?;
        }
        Ok(())
    }
}

#[async_trait]
impl DomainResolver for StaticDomains {
    async fn registry_url(&self, domain: &str) -> Option<Url> {
        self.get(domain).cloned()
    }
}

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

/// The interdomain decorator over a local NS and NSE registry; see the
/// module docs for the routing rules.
pub struct Interdomain {
    local_ns: Arc<dyn NsRegistry>,
    local_nse: Arc<dyn NseRegistry>,
    own_domain: Option<String>,
    resolver: Arc<dyn DomainResolver>,
    pool: ChannelPool,
    /// This registry's per-RPC tokens for the registries it forwards to
    /// (their `authorize` needs the forwarding hop's token).
    tokens: Option<SharedTokenGenerator>,
}

impl std::fmt::Debug for Interdomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interdomain").field("own_domain", &self.own_domain).finish_non_exhaustive()
    }
}

impl Interdomain {
    /// Routes calls between `local_ns`/`local_nse` and the registries of
    /// other domains (found by `resolver`, dialed through `pool`, sending
    /// `tokens` as per-RPC tokens: the other registries' `authorize` needs
    /// them under mutual TLS). `own_domain` (empty = none) is handled locally.
    pub fn new(
        local_ns: Arc<dyn NsRegistry>,
        local_nse: Arc<dyn NseRegistry>,
        own_domain: Option<String>,
        resolver: Arc<dyn DomainResolver>,
        pool: ChannelPool,
        tokens: Option<SharedTokenGenerator>,
    ) -> Arc<Interdomain> {
        let own_domain = own_domain.filter(|d| !d.is_empty());
        Arc::new(Interdomain { local_ns, local_nse, own_domain, resolver, pool, tokens })
    }

    /// This registry's own domain, if configured.
    pub fn own_domain(&self) -> Option<&str> {
        self.own_domain.as_deref()
    }

    /// `None`: unqualified, local as is. Otherwise own domain or remote.
    async fn route(&self, what: &str, name: &str, domain: Option<String>) -> Result<Option<Target>, Status> {
        let Some(domain) = domain else { return Ok(None) };
        if self.own_domain.as_deref().is_some_and(|o| o.eq_ignore_ascii_case(&domain)) {
            return Ok(Some(Target { domain, remote: None }));
        }
        match self.resolver.registry_url(&domain).await {
            Some(url) => {
                let mut r = RemoteRegistry::new(url, self.pool.clone());
                if let Some(t) = &self.tokens {
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
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use nsm_api::registry::{NetworkServiceEndpointResponse, NetworkServiceLabels};
    use tempfile::TempDir;

    use super::*;
    use crate::registry::memory::MemoryRegistry;
    use crate::registry::{NsRegistryServer, NseRegistryServer, find_ns, find_nses};
    use crate::tools::grpc::Listeners;

    /// A memory registry that counts every call reaching it.
    #[derive(Clone)]
    struct Counting {
        inner: MemoryRegistry,
        calls: Arc<AtomicUsize>,
    }

    impl Counting {
        fn hit(&self) {
            self.calls.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl NsRegistry for Counting {
        async fn register(&self, ctx: &Context, ns: NetworkService) -> Result<NetworkService, Status> {
            self.hit();
            NsRegistry::register(&self.inner, ctx, ns).await
        }
        async fn find(&self, ctx: &Context, q: NetworkServiceQuery) -> Result<NsStream, Status> {
            self.hit();
            NsRegistry::find(&self.inner, ctx, q).await
        }
        async fn unregister(&self, ctx: &Context, ns: NetworkService) -> Result<(), Status> {
            self.hit();
            NsRegistry::unregister(&self.inner, ctx, ns).await
        }
    }

    #[async_trait]
    impl NseRegistry for Counting {
        async fn register(&self, ctx: &Context, nse: NetworkServiceEndpoint) -> Result<NetworkServiceEndpoint, Status> {
            self.hit();
            NseRegistry::register(&self.inner, ctx, nse).await
        }
        async fn find(&self, ctx: &Context, q: NetworkServiceEndpointQuery) -> Result<NseStream, Status> {
            self.hit();
            NseRegistry::find(&self.inner, ctx, q).await
        }
        async fn unregister(&self, ctx: &Context, nse: NetworkServiceEndpoint) -> Result<(), Status> {
            self.hit();
            NseRegistry::unregister(&self.inner, ctx, nse).await
        }
    }

    /// Another cluster's registry, served over real gRPC on a unix socket.
    /// Dropping it stops the server.
    struct Cluster {
        store: MemoryRegistry,
        calls: Arc<AtomicUsize>,
        url: Url,
        dir: TempDir,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    impl Cluster {
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    async fn serve_cluster() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let url = parse_url(&format!("unix://{}/registry.sock", dir.path().display())).unwrap();
        let store = MemoryRegistry::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let reg = Counting { inner: store.clone(), calls: calls.clone() };
        let listeners = Listeners::bind(std::slice::from_ref(&url)).await.unwrap();
        let router = tonic::transport::Server::builder()
            .add_service(NsRegistryServer(Arc::new(reg.clone())).into_service())
            .add_service(NseRegistryServer(Arc::new(reg)).into_service());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(crate::tools::daemon::serve(
            router,
            listeners,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));
        Cluster { store, calls, url, dir, _stop: stop }
    }

    /// Counts resolver lookups.
    struct CountingResolver {
        inner: StaticDomains,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl DomainResolver for CountingResolver {
        async fn registry_url(&self, domain: &str) -> Option<Url> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.inner.registry_url(domain).await
        }
    }

    /// Cluster `c1` (local memory store, own domain `c1`) knowing `c2`
    /// (served over gRPC) and `c3` (a socket nobody listens on).
    struct Setup {
        local: MemoryRegistry,
        c2: Cluster,
        c3_url: Url,
        resolver: Arc<CountingResolver>,
        id: Arc<Interdomain>,
    }

    impl Setup {
        fn resolver_calls(&self) -> usize {
            self.resolver.calls.load(Ordering::SeqCst)
        }
    }

    async fn setup() -> Setup {
        let c2 = serve_cluster().await;
        let c3_url = parse_url(&format!("unix://{}/nobody-listens.sock", c2.dir.path().display())).unwrap();
        let domains: StaticDomains = format!("c2={},c3={}", c2.url, c3_url).parse().unwrap();
        let resolver = Arc::new(CountingResolver { inner: domains, calls: AtomicUsize::new(0) });
        let local = MemoryRegistry::new();
        let id = Interdomain::new(
            Arc::new(local.clone()),
            Arc::new(local.clone()),
            Some("c1".into()),
            resolver.clone(),
            ChannelPool::new(Duration::from_secs(1)),
            None,
        );
        Setup { local, c2, c3_url, resolver, id }
    }

    fn ctx() -> Context {
        Context::with_timeout(Duration::from_secs(5))
    }

    fn ns(name: &str) -> NetworkService {
        NetworkService { name: name.into(), ..Default::default() }
    }

    fn labels(pairs: &[(&str, &[(&str, &str)])]) -> HashMap<String, NetworkServiceLabels> {
        pairs
            .iter()
            .map(|(svc, kv)| {
                let labels = kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                (svc.to_string(), NetworkServiceLabels { labels })
            })
            .collect()
    }

    fn nse(name: &str, services: &[&str], url: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: services.iter().map(|s| s.to_string()).collect(),
            url: url.into(),
            ..Default::default()
        }
    }

    async fn next_nse<S>(s: &mut S) -> NetworkServiceEndpointResponse
    where
        S: Stream<Item = Result<NetworkServiceEndpointResponse, Status>> + Unpin,
    {
        tokio::time::timeout(Duration::from_secs(5), s.next()).await.unwrap().unwrap().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ns_ops_on_another_domain_are_forwarded_with_the_domain_stripped_and_restored() {
        let s = setup().await;
        let remote = NetworkService { name: "svc".into(), payload: "ETHERNET".into(), ..Default::default() };
        NsRegistry::register(&s.c2.store, &ctx(), remote).await.unwrap();

        let found = find_ns(&*s.id, &ctx(), ns("svc@c2")).await.unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].name, "svc@c2");
        assert_eq!(found[0].payload, "ETHERNET", "the remote cluster's object");
        // The domain comes back as the caller spelled it; lookup is case-insensitive.
        let found = find_ns(&*s.id, &ctx(), ns("svc@C2")).await.unwrap();
        assert_eq!(found.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["svc@C2"]);
        assert!(find_ns(&*s.id, &ctx(), ns("other@c2")).await.unwrap().is_empty());

        let reg = NsRegistry::register(&*s.id, &ctx(), ns("svc2@c2")).await.unwrap();
        assert_eq!((reg.name.as_str(), reg.payload.as_str()), ("svc2@c2", "IP"), "remote defaults, name restored");
        assert_eq!(s.c2.store.ns_len(), 2, "stored in c2 under the bare name");
        assert_eq!(find_ns(&s.c2.store, &ctx(), ns("svc2")).await.unwrap().len(), 1);
        assert_eq!(s.local.ns_len(), 0, "nothing stored locally");

        NsRegistry::unregister(&*s.id, &ctx(), ns("svc2@c2")).await.unwrap();
        assert_eq!(s.c2.store.ns_len(), 1);

        // The remote's own errors keep their code and name the domain.
        let e = NsRegistry::register(&*s.id, &ctx(), ns("@c2")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("domain c2") && e.message().contains(s.c2.url.as_str()), "{e:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nse_ops_on_another_domain_qualify_names_services_and_label_keys() {
        let s = setup().await;
        let mut remote = nse("nse1", &["svc"], "tcp://10.2.0.5:5001");
        remote.network_service_labels = labels(&[("svc", &[("app", "web")])]);
        NseRegistry::register(&s.c2.store, &ctx(), remote).await.unwrap();

        let mut q = nse("", &["svc@c2"], "");
        q.network_service_labels = labels(&[("svc@c2", &[("app", "web")])]);
        let found = find_nses(&*s.id, &ctx(), q).await.unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        let got = &found[0];
        assert_eq!(got.name, "nse1@c2");
        assert_eq!(got.network_service_names, ["svc@c2"]);
        assert_eq!(got.network_service_labels, labels(&[("svc@c2", &[("app", "web")])]));
        assert_eq!(got.url, "tcp://10.2.0.5:5001", "URL kept as the remote registry returned it");
        assert!(got.initial_registration_time.is_some(), "the remote's object");

        // By NSE name alone; and a label mismatch finds nothing.
        let by_name = find_nses(&*s.id, &ctx(), nse("nse1@c2", &[], "")).await.unwrap();
        assert_eq!(by_name.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["nse1@c2"]);
        let mut q = nse("", &["svc@c2"], "");
        q.network_service_labels = labels(&[("svc@c2", &[("app", "db")])]);
        assert!(find_nses(&*s.id, &ctx(), q).await.unwrap().is_empty());

        // Register (floating style): name generated remotely, everything qualified on the way back.
        let mut reg = nse("", &["svc@c2"], "tcp://10.1.0.7:5001");
        reg.network_service_labels = labels(&[("svc@c2", &[("app", "api")])]);
        let out = NseRegistry::register(&*s.id, &ctx(), reg).await.unwrap();
        assert!(out.name.starts_with("nse-") && out.name.ends_with("@c2"), "{out:?}");
        assert_eq!(out.network_service_names, ["svc@c2"]);
        assert_eq!(out.network_service_labels, labels(&[("svc@c2", &[("app", "api")])]));
        assert_eq!(out.url, "tcp://10.1.0.7:5001");
        assert_eq!(s.c2.store.nse_len(), 2);
        assert_eq!(s.local.nse_len(), 0);
        let bare = out.name.trim_end_matches("@c2");
        let stored = find_nses(&s.c2.store, &ctx(), nse(bare, &[], "")).await.unwrap();
        assert_eq!(stored[0].network_service_names, ["svc"], "stored in c2 without the domain");
        assert_eq!(stored[0].network_service_labels, labels(&[("svc", &[("app", "api")])]));

        NseRegistry::unregister(&*s.id, &ctx(), out).await.unwrap();
        assert_eq!(s.c2.store.nse_len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn own_domain_is_stripped_and_handled_locally() {
        let s = setup().await;
        let out = NsRegistry::register(&*s.id, &ctx(), ns("svc@c1")).await.unwrap();
        assert_eq!(out.name, "svc@c1");
        assert_eq!(find_ns(&s.local, &ctx(), ns("svc")).await.unwrap().len(), 1, "stored under the bare name");
        let names = |v: Vec<NetworkService>| v.into_iter().map(|n| n.name).collect::<Vec<_>>();
        assert_eq!(names(find_ns(&*s.id, &ctx(), ns("svc@C1")).await.unwrap()), ["svc@C1"]);
        assert_eq!(names(find_ns(&*s.id, &ctx(), ns("svc")).await.unwrap()), ["svc"]);

        let mut reg = nse("nse-a@c1", &["svc@c1"], "tcp://10.1.0.3:5001");
        reg.network_service_labels = labels(&[("svc@c1", &[("app", "web")])]);
        let out = NseRegistry::register(&*s.id, &ctx(), reg).await.unwrap();
        assert_eq!(out.name, "nse-a@c1");
        assert_eq!(out.network_service_names, ["svc@c1"]);
        let stored = find_nses(&s.local, &ctx(), nse("nse-a", &[], "")).await.unwrap();
        assert_eq!(stored[0].network_service_names, ["svc"]);
        assert_eq!(stored[0].network_service_labels, labels(&[("svc", &[("app", "web")])]));
        let found = find_nses(&*s.id, &ctx(), nse("", &["svc@c1"], "")).await.unwrap();
        assert_eq!(found.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["nse-a@c1"]);
        NseRegistry::unregister(&*s.id, &ctx(), nse("nse-a@c1", &[], "")).await.unwrap();
        assert_eq!(s.local.nse_len(), 0);

        assert_eq!(s.c2.calls(), 0, "c2 never contacted");
        assert_eq!(s.resolver_calls(), 0, "own domain needs no resolution");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_on_another_domain_streams_later_changes() {
        let s = setup().await;
        let q = NetworkServiceEndpointQuery { network_service_endpoint: Some(nse("", &["svc@c2"], "")), watch: true };
        let mut stream = NseRegistry::find(&*s.id, &ctx(), q).await.unwrap();
        let remote = nse("nse2", &["svc"], "tcp://10.2.0.9:5001");
        NseRegistry::register(&s.c2.store, &ctx(), remote.clone()).await.unwrap();
        let r = next_nse(&mut stream).await;
        let got = r.network_service_endpoint.unwrap();
        assert_eq!((got.name.as_str(), r.deleted), ("nse2@c2", false));
        assert_eq!(got.network_service_names, ["svc@c2"]);
        assert_eq!(got.url, "tcp://10.2.0.9:5001");
        // Unrelated services are filtered remotely; removal arrives qualified.
        NseRegistry::register(&s.c2.store, &ctx(), nse("other", &["svc-x"], "tcp://10.2.0.10:5001")).await.unwrap();
        NseRegistry::unregister(&s.c2.store, &ctx(), remote).await.unwrap();
        let r = next_nse(&mut stream).await;
        assert_eq!((r.network_service_endpoint.unwrap().name.as_str(), r.deleted), ("nse2@c2", true));

        // NS watch too.
        let q = NetworkServiceQuery { network_service: Some(ns("late@c2")), watch: true };
        let mut stream = NsRegistry::find(&*s.id, &ctx(), q).await.unwrap();
        NsRegistry::register(&s.c2.store, &ctx(), ns("late")).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(r.network_service.unwrap().name, "late@c2");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_domain_is_not_found() {
        let s = setup().await;
        let e = find_ns(&*s.id, &ctx(), ns("svc@c9")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(
            e.message().contains("no registry known for domain c9 (configure NSM_DOMAIN_REGISTRIES)")
                && e.message().contains("svc@c9")
                && e.message().contains("own domain (NSM_DOMAIN) is c1"),
            "{e:?}"
        );
        let e = NseRegistry::register(&*s.id, &ctx(), nse("nse@c9", &[], "tcp://1.2.3.4:5")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let e = find_nses(&*s.id, &ctx(), nse("", &["svc@c9"], "")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("domain c9"), "{e:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_domain_is_unavailable_naming_domain_and_url() {
        let s = setup().await;
        let check = |e: Status| {
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            assert!(e.message().contains("domain c3") && e.message().contains(s.c3_url.as_str()), "{e:?}");
            assert!(e.message().contains("check that the registry of domain c3 is running"), "{e:?}");
        };
        check(find_ns(&*s.id, &ctx(), ns("svc@c3")).await.unwrap_err());
        check(NsRegistry::register(&*s.id, &ctx(), ns("svc@c3")).await.unwrap_err());
        check(NseRegistry::unregister(&*s.id, &ctx(), nse("x@c3", &[], "")).await.unwrap_err());
        let q = NetworkServiceEndpointQuery { network_service_endpoint: Some(nse("", &["svc@c3"], "")), watch: true };
        check(NseRegistry::find(&*s.id, &ctx(), q).await.err().unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_only_queries_never_contact_a_remote() {
        let s = setup().await;
        NsRegistry::register(&*s.id, &ctx(), ns("svc")).await.unwrap();
        NseRegistry::register(&*s.id, &ctx(), nse("nse-l", &["svc"], "tcp://10.1.0.2:5001")).await.unwrap();
        assert_eq!((s.local.ns_len(), s.local.nse_len()), (1, 1));

        // Find everything: no query object, and an empty example.
        let all = NetworkServiceQuery { network_service: None, watch: false };
        assert_eq!(NsRegistry::find(&*s.id, &ctx(), all).await.unwrap().collect::<Vec<_>>().await.len(), 1);
        assert_eq!(find_ns(&*s.id, &ctx(), NetworkService::default()).await.unwrap().len(), 1);
        let q = NetworkServiceEndpointQuery { network_service_endpoint: None, watch: false };
        assert_eq!(NseRegistry::find(&*s.id, &ctx(), q).await.unwrap().collect::<Vec<_>>().await.len(), 1);
        assert_eq!(find_nses(&*s.id, &ctx(), NetworkServiceEndpoint::default()).await.unwrap().len(), 1);
        // Unqualified names.
        let found = find_nses(&*s.id, &ctx(), nse("", &["svc"], "")).await.unwrap();
        assert_eq!(found.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["nse-l"], "returned unqualified");
        assert_eq!(find_ns(&*s.id, &ctx(), ns("svc")).await.unwrap()[0].name, "svc");
        // Labels keyed by a qualified name alone do not make a query remote.
        let q = NetworkServiceEndpoint { network_service_labels: labels(&[("svc@c2", &[])]), ..Default::default() };
        assert!(find_nses(&*s.id, &ctx(), q).await.unwrap().is_empty());
        NseRegistry::unregister(&*s.id, &ctx(), nse("nse-l", &[], "")).await.unwrap();
        NsRegistry::unregister(&*s.id, &ctx(), ns("svc")).await.unwrap();
        assert_eq!((s.local.ns_len(), s.local.nse_len()), (0, 0));

        assert_eq!(s.c2.calls(), 0, "c2 never contacted");
        assert_eq!(s.resolver_calls(), 0, "no domain resolved");
        // Sanity: a qualified query does reach c2.
        find_ns(&*s.id, &ctx(), ns("svc@c2")).await.unwrap();
        assert_eq!(s.c2.calls(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_interdomain_names_are_invalid_argument() {
        let s = setup().await;
        let e = find_ns(&*s.id, &ctx(), ns("svc@")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("\"svc@\"") && e.message().contains("empty domain"), "{e:?}");
        let e = NseRegistry::register(&*s.id, &ctx(), nse("nse@c2", &["svc@c3"], "tcp://1.2.3.4:5")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("c2") && e.message().contains("c3"), "{e:?}");
        let mut q = nse("", &["svc@c2"], "");
        q.network_service_labels = labels(&[("svc@c3", &[])]);
        assert_eq!(find_nses(&*s.id, &ctx(), q).await.unwrap_err().code(), Code::InvalidArgument);
        // The same domain in different case is one domain.
        assert!(find_nses(&*s.id, &ctx(), nse("nse@c2", &["svc@C2"], "")).await.unwrap().is_empty());
        assert_eq!(s.c2.calls(), 1, "only the consistent query went out");
    }

    #[test]
    fn nse_domain_prefers_the_nse_name_then_the_first_qualified_service() {
        assert_eq!(nse_domain(&nse("a@d1", &["s", "t@d1"], "")).unwrap().as_deref(), Some("d1"));
        assert_eq!(nse_domain(&nse("a", &["s", "t@d2", "u@D2"], "")).unwrap().as_deref(), Some("d2"));
        assert_eq!(nse_domain(&nse("a", &["s"], "")).unwrap(), None);
        let mut n = nse("a", &[], "");
        rename_nse(&mut n, |x| qualify(x, "d"));
        assert_eq!(n.name, "a@d");
        let mut n = nse("", &["x@other"], "");
        rename_nse(&mut n, |x| qualify(x, "d"));
        assert_eq!((n.name.as_str(), n.network_service_names[0].as_str()), ("", "x@other"), "empty/qualified kept");
    }

    #[test]
    fn static_domains_parse_and_render() {
        let d: StaticDomains = " my.cluster2=tcp://10.2.0.1:5002 , My.Cluster3=registry.c3:5002,,".parse().unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.get("MY.cluster2").unwrap().as_str(), "tcp://10.2.0.1:5002");
        assert_eq!(d.get("my.cluster3").unwrap().as_str(), "tcp://registry.c3:5002", "bare host:port is tcp");
        assert_eq!(d.get("my.cluster4"), None);
        assert_eq!(d.domains().collect::<Vec<_>>(), ["my.cluster2", "my.cluster3"]);
        let s = d.to_string();
        assert_eq!(s, "my.cluster2=tcp://10.2.0.1:5002,my.cluster3=tcp://registry.c3:5002");
        assert_eq!(s.parse::<StaticDomains>().unwrap(), d);
        assert!("".parse::<StaticDomains>().unwrap().is_empty());
        assert!(" , ".parse::<StaticDomains>().unwrap().is_empty());
        let u: StaticDomains = "c=unix:///run/r.sock".parse().unwrap();
        assert_eq!(u.get("c").unwrap().as_str(), "unix:///run/r.sock");

        let err = |s: &str| s.parse::<StaticDomains>().unwrap_err().to_string();
        let e = err("my.cluster2");
        assert!(e.contains("\"my.cluster2\"") && e.contains("expected <domain>=<registry URL>"), "{e}");
        let e = err("=tcp://1.2.3.4:5");
        assert!(e.contains("domain name is empty"), "{e}");
        let e = err("my cluster=tcp://1.2.3.4:5");
        assert!(e.contains("' '") && e.contains("my cluster"), "{e}");
        let e = err("a@b=tcp://1.2.3.4:5");
        assert!(e.contains("'@'"), "{e}");
        let e = err("c2=http://1.2.3.4:5");
        assert!(e.contains("c2=http://1.2.3.4:5") && e.contains("unsupported scheme"), "{e}");
        let e = err("c2=tcp://host");
        assert!(e.contains("needs a port"), "{e}");
        let e = err("c2=");
        assert!(e.contains("\"c2=\"") && e.contains("empty"), "{e}");
        let e = err("c2=tcp://1.2.3.4:5,C2=tcp://5.6.7.8:5");
        assert!(e.contains("twice") && e.contains("1.2.3.4") && e.contains("5.6.7.8"), "{e}");
        assert!(err(&format!("{}=tcp://1.2.3.4:5", "a".repeat(254))).contains("254 bytes"));
    }

    #[test]
    fn check_domain_accepts_dns_like_names() {
        assert!(check_domain("my.cluster2").is_ok());
        assert!(check_domain("Cluster_3-x").is_ok());
        assert_eq!(check_domain(""), Err(DomainError::Empty));
        assert!(matches!(check_domain("a/b"), Err(DomainError::BadChar { ch: '/', .. })));
    }
}
