//! Tests of [`super`] (authorize).

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
    let p =
        RegistryPath { index: 1, path_segments: vec![RegistryPathSegment { token: "a".into() }, Default::default()] };
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
    // What the Go sdk's registry clients send before any hop: a nil slice.
    md.insert(PATH_KEY, MetadataValue::from_static(r#"{"Index":0,"PathSegments":null}"#));
    assert_eq!(RegistryPath::from_metadata(&md).unwrap().unwrap(), RegistryPath::default());
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
    assert_eq!(out.path_ids, ["spiffe://test.local/nse", "spiffe://test.local/nsmgr", "spiffe://test.local/registry"]);
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
