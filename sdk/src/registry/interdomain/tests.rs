//! Tests of the interdomain decorator against real registries on loopback.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nsm_api::registry::{NetworkServiceEndpointResponse, NetworkServiceLabels};
use tempfile::TempDir;

use super::*;
use crate::registry::memory::MemoryRegistry;
use crate::registry::{NsRegistryServer, NseRegistryServer, find_ns, find_nses};
use crate::testing::nse;
use crate::tools::grpc::{Listeners, parse_url};

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

macro_rules! counting_for {
    ($reg:ident, $rec:ty, $query:ty, $stream:ty) => {
        #[async_trait]
        impl $reg for Counting {
            async fn register(&self, ctx: &Context, rec: $rec) -> Result<$rec, Status> {
                self.hit();
                $reg::register(&self.inner, ctx, rec).await
            }
            async fn find(&self, ctx: &Context, q: $query) -> Result<$stream, Status> {
                self.hit();
                $reg::find(&self.inner, ctx, q).await
            }
            async fn unregister(&self, ctx: &Context, rec: $rec) -> Result<(), Status> {
                self.hit();
                $reg::unregister(&self.inner, ctx, rec).await
            }
        }
    };
}

counting_for!(NsRegistry, NetworkService, NetworkServiceQuery, NsStream);
counting_for!(NseRegistry, NetworkServiceEndpoint, NetworkServiceEndpointQuery, NseStream);

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
    let remotes = Remotes { resolver: resolver.clone(), pool: ChannelPool::new(Duration::from_secs(1)), tokens: None };
    let id = Interdomain::new(Arc::new(local.clone()), Arc::new(local.clone()), Some("c1".into()), remotes);
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

    let long = format!("{}=tcp://1.2.3.4:5", "a".repeat(254));
    let cases: &[(&str, &[&str])] = &[
        ("my.cluster2", &["\"my.cluster2\"", "expected <domain>=<registry URL>"]),
        ("=tcp://1.2.3.4:5", &["domain name is empty"]),
        ("my cluster=tcp://1.2.3.4:5", &["' '", "my cluster"]),
        ("a@b=tcp://1.2.3.4:5", &["'@'"]),
        ("c2=http://1.2.3.4:5", &["c2=http://1.2.3.4:5", "unsupported scheme"]),
        ("c2=tcp://host", &["needs a port"]),
        ("c2=", &["\"c2=\"", "empty"]),
        ("c2=tcp://1.2.3.4:5,C2=tcp://5.6.7.8:5", &["twice", "1.2.3.4", "5.6.7.8"]),
        (&long, &["254 bytes"]),
    ];
    for (input, needles) in cases {
        let e = input.parse::<StaticDomains>().unwrap_err().to_string();
        assert!(needles.iter().all(|n| e.contains(n)), "{input:?}: {e}");
    }
}

#[test]
fn check_domain_accepts_dns_like_names() {
    assert!(check_domain("my.cluster2").is_ok());
    assert!(check_domain("Cluster_3-x").is_ok());
    assert_eq!(check_domain(""), Err(DomainError::Empty));
    assert!(matches!(check_domain("a/b"), Err(DomainError::BadChar { ch: '/', .. })));
}
