//! Tests of [`super`] (authorize).

use std::time::{Duration, SystemTime};

use nsm_api::connection::{Path, PathSegment};

use std::sync::Mutex;

use super::*;
use crate::networkservice::begin::Begin;
use crate::networkservice::chain::Chain;
use crate::networkservice::metadata::Metadata;
use crate::networkservice::updatepath::UpdatePath;
use crate::networkservice::updatetoken::UpdateToken;
use crate::security::jwt::testpki::{TestPki, now, peer_of};
use crate::security::policy::tests::token;
use crate::security::{StaticSvid, Svid};
use crate::testing::{Inject, Record};
use crate::tools::token::{JwtTokens, Token};

/// An nsmgr server chain as upstream orders it, with `tail` after
/// `authorize`.
/// Returns the chain and its `begin` (the per-connection state).
fn server_chain(me: &Svid, policies: PolicySet, tail: Vec<Arc<dyn Element>>) -> (Chain, Arc<Begin>) {
    let auth = AuthorizeServer::new(policies);
    let begin = Begin::new();
    let tokgen = JwtTokens::new(Arc::new(StaticSvid(Arc::new(me.clone()))), Duration::from_secs(600));
    let mut elems: Vec<Arc<dyn Element>> =
        vec![UpdatePath::new("nsmgr"), begin.clone(), UpdateToken::new(tokgen), auth];
    elems.extend(tail);
    (Chain::new(elems), begin)
}

/// What the nsc sends: its segment, and its per-RPC token in metadata.
fn nsc_call(
    nsc: &Svid,
    to: &Svid,
    id: &str,
    tok: Option<String>,
    labels: &[(&str, &str)],
) -> (Context, NetworkServiceRequest) {
    let mut ctx = Context::default();
    ctx.peer = peer_of(nsc);
    let t = tok.unwrap_or_else(|| token(nsc, &to.spiffe_id, now() + 600));
    token::put(&mut ctx.incoming, &Token { token: t, expires: SystemTime::now() + Duration::from_secs(600) });
    let req = NetworkServiceRequest {
        connection: Some(Connection {
            id: id.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            path: Some(Path {
                index: 0,
                path_segments: vec![PathSegment { name: "nsc".into(), id: id.into(), ..Default::default() }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    (ctx, req)
}

struct Fixture {
    pki: TestPki,
    nsc: Svid,
    nsmgr: Svid,
}

fn fixture() -> Fixture {
    let pki = TestPki::new();
    let nsc = pki.svid("spiffe://test.local/nsc");
    let nsmgr = pki.svid("spiffe://test.local/nsmgr");
    Fixture { pki, nsc, nsmgr }
}

fn assert_denied(r: Result<Connection, Status>, policy: &str) {
    let e = r.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with(&format!("no sufficient privileges: policy {policy} denied")), "{}", e.message());
}

#[tokio::test]
async fn good_request_passes_and_bad_tokens_are_refused_by_the_right_policy() {
    let f = fixture();
    let log = Record::log();
    let (chain, begin) = server_chain(&f.nsmgr, PolicySet::server(), vec![Record::new("rest", &log)]);

    let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, "c1", None, &[]);
    let conn = chain.request(&mut ctx, req).await.unwrap();
    assert_eq!(begin.len(), 1);
    chain.close(&mut ctx, conn).await.unwrap();
    assert_eq!(begin.len(), 0);
    log.lock().unwrap().clear();

    let cases = [
        ("tokens_valid", "garbage".to_string()),
        ("tokens_expired", token(&f.nsc, &f.nsmgr.spiffe_id, now() - 5)),
        ("tokens_chained", token(&f.nsc, "spiffe://test.local/elsewhere", now() + 600)),
        ("prev_token_signed", token(&f.pki.svid("spiffe://test.local/nsc"), &f.nsmgr.spiffe_id, now() + 600)),
    ];
    for (policy, tok) in cases {
        let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, "c2", Some(tok), &[]);
        assert_denied(chain.request(&mut ctx, req).await, policy);
    }
    assert!(log.lock().unwrap().is_empty(), "nothing after authorize ran");
    assert_eq!(begin.len(), 0);
}

#[tokio::test]
async fn close_with_an_expired_token_passes_but_not_with_a_forged_one() {
    let f = fixture();
    let (chain, begin) = server_chain(&f.nsmgr, PolicySet::server(), vec![]);
    let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, "c1", None, &[]);
    let conn = chain.request(&mut ctx, req).await.unwrap();
    assert_eq!(begin.len(), 1);
    // The close that a timeout sends: the earlier token has expired.
    let close_with = |tok: String| {
        let mut ctx = Context::default();
        ctx.peer = peer_of(&f.nsc);
        token::put(&mut ctx.incoming, &Token { token: tok, expires: SystemTime::now() });
        ctx
    };
    let unchained = token(&f.nsc, "spiffe://test.local/elsewhere", now() + 600);
    let e = chain.close(&mut close_with(unchained), conn.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("policy tokens_chained denied the close"), "{}", e.message());
    let forged = token(&f.pki.svid("spiffe://test.local/nsc"), &f.nsmgr.spiffe_id, now() - 5);
    let e = chain.close(&mut close_with(forged), conn.clone()).await.unwrap_err();
    assert!(e.message().contains("policy prev_token_signed denied"), "{}", e.message());
    assert_eq!(begin.len(), 1, "a refused close keeps the connection");
    let expired = token(&f.nsc, &f.nsmgr.spiffe_id, now() - 5);
    chain.close(&mut close_with(expired), conn).await.unwrap();
    assert_eq!(begin.len(), 0);
}

/// The nsmgr's per-connection elements with the real default policies
/// and ES256 tokens: 10,000 Request/Close cycles end where they
/// started (policy records, begin, metadata, timers, monitor, tasks).
#[tokio::test]
async fn ten_thousand_cycles_with_real_policies_leave_no_state() {
    use crate::networkservice::monitor::MonitorServer;
    use crate::networkservice::timeout::Timeout;
    let f = fixture();
    let begin = Begin::new();
    let metadata = Metadata::new();
    let monitor = MonitorServer::new();
    let auth = AuthorizeServer::new(PolicySet::server());
    let tokgen = JwtTokens::new(Arc::new(StaticSvid(Arc::new(f.nsmgr.clone()))), Duration::from_secs(600));
    let chain = Chain::new(vec![
        UpdatePath::new("nsmgr"),
        begin.clone(),
        metadata.clone(),
        UpdateToken::new(tokgen),
        auth.clone(),
        Timeout::new(Duration::from_secs(600)),
        monitor.element(),
    ]);
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let start = (begin.len(), metadata.len(), monitor.connections().len(), tasks());
    let tok = token(&f.nsc, &f.nsmgr.spiffe_id, now() + 600);
    for i in 0..10_000 {
        let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, &format!("c{i}"), Some(tok.clone()), &[]);
        let conn = chain.request(&mut ctx, req).await.unwrap();
        if i == 0 {
            assert_eq!((begin.len(), metadata.len(), monitor.connections().len()), (1, 1, 1));
        }
        chain.close(&mut ctx, conn).await.unwrap();
    }
    // Aborted timer tasks are reaped on the next scheduler pass.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let end = (begin.len(), metadata.len(), monitor.connections().len(), tasks());
    assert_eq!(end, start, "(begin, metadata, monitor, tasks)");
}

#[tokio::test]
async fn plaintext_passes_through() {
    let f = fixture();
    let (chain, _) = server_chain(&f.nsmgr, PolicySet::server(), vec![]);
    let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, "c1", Some("garbage".into()), &[]);
    ctx.peer = Peer::default();
    let conn = chain.request(&mut ctx, req).await.expect("no TLS peer: no policy check");
    chain.close(&mut ctx, conn).await.unwrap();
}

#[tokio::test]
async fn custom_policy_denies_a_label() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("no_red.rego");
    std::fs::write(&file, "package nsm\n\ndefault valid := false\n\nvalid if input.labels.color != \"red\"\n").unwrap();
    let set = PolicySet::server().with_files(std::slice::from_ref(&file)).unwrap();
    let (chain, _) = server_chain(&f.nsmgr, set, vec![]);
    let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, "c1", None, &[("color", "blue")]);
    chain.request(&mut ctx, req).await.unwrap();
    let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, "c2", None, &[("color", "red")]);
    assert_denied(chain.request(&mut ctx, req).await, &file.display().to_string());
}

/// The per-connection state authorize's verdicts lead to (begin's
/// entries, which also hold each connection's owner) ends where it
/// started after many cycles, failed first Requests and denials.
#[tokio::test]
async fn no_connection_state_stays_behind_with_policies() {
    let f = fixture();
    let allow = PolicySet::empty().with_source("allow.rego", "package nsm\n\nvalid := true\n").unwrap();
    let (chain, begin) = server_chain(&f.nsmgr, allow.clone(), vec![]);
    let start = begin.len();
    for i in 0..10_000 {
        let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, &format!("c{i}"), Some(String::new()), &[]);
        let conn = chain.request(&mut ctx, req).await.unwrap();
        chain.close(&mut ctx, conn).await.unwrap();
    }
    assert_eq!(begin.len(), start);
    // Failed first Requests (downstream error, or denied) leave nothing.
    let (failing, begin) = server_chain(&f.nsmgr, allow, vec![Inject::error(tonic::Code::Unavailable, "no endpoint")]);
    for i in 0..100 {
        let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, &format!("f{i}"), Some(String::new()), &[]);
        assert!(failing.request(&mut ctx, req).await.is_err());
    }
    assert_eq!(begin.len(), 0);
    let (denying, begin) = server_chain(&f.nsmgr, PolicySet::server(), vec![]);
    let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, "d", Some("garbage".into()), &[]);
    assert!(denying.request(&mut ctx, req).await.is_err());
    assert_eq!(begin.len(), 0);
}

#[tokio::test]
async fn monitor_sees_only_own_connections() {
    let f = fixture();
    let other = f.pki.svid("spiffe://test.local/other-nsc");
    let (chain, _) = server_chain(&f.nsmgr, PolicySet::server(), vec![]);
    let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, "mine", None, &[]);
    let returned = chain.request(&mut ctx, req).await.unwrap();
    // As the nsmgr's monitor publishes it: at the nsmgr's index.
    let mut conn = returned.clone();
    conn.path.as_mut().unwrap().index = 1;
    let mon = AuthorizeMonitor::own();
    assert!(mon.allows(&peer_of(&f.nsc), &conn), "the client is on it");
    assert!(!mon.allows(&peer_of(&other), &conn));
    assert!(!mon.allows(&peer_of(&f.nsmgr), &conn), "this hop's own segment does not count");
    assert!(mon.allows(&Peer::default(), &conn), "plaintext subscriber");
    assert!(AuthorizeMonitor::allow_all().allows(&peer_of(&other), &conn));
    chain.close(&mut ctx, returned).await.unwrap();
}

/// Through the gRPC monitor: an owner sees its connection come and go,
/// even when it reads the events late; another identity sees nothing.
#[tokio::test]
async fn monitor_server_streams_own_connections_including_their_deletion() {
    use futures::StreamExt;
    use nsm_api::connection::monitor_connection_server::MonitorConnection;
    use nsm_api::connection::{ConnectionEventType, MonitorScopeSelector};

    use crate::networkservice::monitor::MonitorServer;
    use crate::tools::grpc::ConnInfo;
    let f = fixture();
    let other = f.pki.svid("spiffe://test.local/other-nsc");
    let auth = AuthorizeServer::new(PolicySet::server());
    let monitor = MonitorServer::with_authorize(AuthorizeMonitor::own());
    let tokgen = JwtTokens::new(Arc::new(StaticSvid(Arc::new(f.nsmgr.clone()))), Duration::from_secs(600));
    let chain = Chain::new(vec![
        UpdatePath::new("nsmgr"),
        Begin::new(),
        UpdateToken::new(tokgen),
        auth.clone(),
        monitor.element(),
    ]);
    let subscribe = |who: &Svid| {
        let mut r = tonic::Request::new(MonitorScopeSelector::default());
        r.extensions_mut().insert(ConnInfo { peer: peer_of(who) });
        let m = monitor.clone();
        async move { m.monitor_connections(r).await.unwrap().into_inner() }
    };
    let mut mine = subscribe(&f.nsc).await;
    let mut theirs = subscribe(&other).await;
    assert!(mine.next().await.unwrap().unwrap().connections.is_empty(), "initial state");
    assert!(theirs.next().await.unwrap().unwrap().connections.is_empty());
    let (mut ctx, req) = nsc_call(&f.nsc, &f.nsmgr, "c1", None, &[]);
    let conn = chain.request(&mut ctx, req).await.unwrap();
    chain.close(&mut ctx, conn).await.unwrap();
    let up = tokio::time::timeout(Duration::from_secs(2), mine.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(up.r#type, ConnectionEventType::Update as i32);
    let del = tokio::time::timeout(Duration::from_secs(2), mine.next())
        .await
        .expect("the deletion reaches the owner")
        .unwrap()
        .unwrap();
    assert_eq!(del.r#type, ConnectionEventType::Delete as i32);
    assert_eq!(del.connections.keys().collect::<Vec<_>>(), up.connections.keys().collect::<Vec<_>>());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), theirs.next()).await.is_err(),
        "another identity sees nothing"
    );
}

/// A fake next hop for the client chain: returns the path extended with
/// a server segment carrying `server_token`, and records closes.
struct FakeServer {
    server_token: Mutex<String>,
    peer: ServerPeer,
    closes: Mutex<u32>,
}

#[async_trait]
impl Element for FakeServer {
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, _n: Next) -> ConnResult {
        ctx.ext.insert(self.peer.clone());
        let mut conn = req.connection.unwrap_or_default();
        let p = conn.path.get_or_insert_with(Default::default);
        p.path_segments.truncate(p.index as usize + 1);
        p.path_segments.push(PathSegment {
            name: "nse".into(),
            id: "nse-id".into(),
            token: self.server_token.lock().unwrap().clone(),
            ..Default::default()
        });
        Ok(conn)
    }
    async fn close(&self, _ctx: &mut Context, _c: Connection, _n: Next) -> Result<(), Status> {
        *self.closes.lock().unwrap() += 1;
        Ok(())
    }
}

#[tokio::test]
async fn client_checks_the_returned_path() {
    let f = fixture();
    let nse = f.pki.svid("spiffe://test.local/nse");
    let good = token(&nse, &f.nsc.spiffe_id, now() + 600);
    let server = Arc::new(FakeServer {
        server_token: Mutex::new(good.clone()),
        peer: ServerPeer {
            spiffe_id: Some(nse.spiffe_id.clone()),
            cert_der: Some(Arc::new(nse.cert_chain[0].clone())),
            ..Default::default()
        },
        closes: Mutex::new(0),
    });
    let chain = Chain::new(vec![
        UpdatePath::new("nsc"),
        Begin::new(),
        Metadata::new(),
        AuthorizeClient::new(PolicySet::client()),
        server.clone(),
    ]);
    let req = |id: &str| {
        let seg0 = PathSegment {
            name: "nsc".into(),
            id: id.into(),
            token: token(&f.nsc, &nse.spiffe_id, now() + 600),
            ..Default::default()
        };
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                path: Some(Path { index: 0, path_segments: vec![seg0] }),
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    let conn = chain.request(&mut Context::default(), req("a")).await.unwrap();
    assert_eq!(*server.closes.lock().unwrap(), 0);

    // A refresh whose server token is forged: refused, not closed.
    *server.server_token.lock().unwrap() = token(&f.pki.svid("spiffe://test.local/nse"), &f.nsc.spiffe_id, now() + 600);
    let mut refresh = req("a");
    refresh.connection = Some(conn.clone());
    assert_denied(chain.request(&mut Context::default(), refresh).await, "next_token_signed");
    assert_eq!(*server.closes.lock().unwrap(), 0, "an authorized connection is not torn down on refresh");

    // A first request with a forged server token: refused and closed.
    assert_denied(chain.request(&mut Context::default(), req("b")).await, "next_token_signed");
    assert_eq!(*server.closes.lock().unwrap(), 1);

    // A client without per-connection state (nsc) refreshing with the
    // established connection: refused, not closed.
    let bare = Chain::new(vec![UpdatePath::new("nsc"), AuthorizeClient::new(PolicySet::client()), server.clone()]);
    let mut refresh = req("a");
    refresh.connection = Some(conn.clone());
    assert_denied(bare.request(&mut Context::default(), refresh).await, "next_token_signed");
    assert_eq!(*server.closes.lock().unwrap(), 1, "the refresh of an established connection tore it down");
    // A reselect builds a new connection downstream: refused, it is closed.
    let mut reselect = req("a");
    reselect.connection = Some(Connection { state: State::ReselectRequested as i32, ..conn.clone() });
    assert_denied(bare.request(&mut Context::default(), reselect).await, "next_token_signed");
    assert_eq!(*server.closes.lock().unwrap(), 2, "a refused reselect left its new connection up");

    // Without a ServerPeer (plaintext) nothing is checked.
    let plain = Arc::new(FakeServer {
        server_token: Mutex::new("garbage".into()),
        peer: server.peer.clone(),
        closes: Mutex::new(0),
    });
    struct DropPeer;
    #[async_trait]
    impl Element for DropPeer {
        async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
            let r = next.request(ctx, req).await;
            ctx.ext.remove::<ServerPeer>();
            r
        }
    }
    let chain = Chain::new(vec![AuthorizeClient::new(PolicySet::client()), Arc::new(DropPeer), plain]);
    chain.request(&mut Context::default(), req("c")).await.unwrap();
}
