//! Mutual TLS on NSM's gRPC sockets, end to end: `nsm-spiffe-dev` serves
//! the Workload API on a socket in a TempDir, a NetworkService chain is
//! served over a unix socket with `daemon::serve_with(tls)`, and clients
//! present SVIDs: the Workload API's, or ones minted here that the Workload
//! API would never hand out (expired, from a CA nobody trusts, from a domain
//! that does not federate).
//!
//! Every refusal is checked to be a refusal of the handshake (the call never
//! reaches the chain), and every acceptance to carry the client's SPIFFE ID
//! into the chain.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use clap::Parser;
use nsm_api::connection::Connection;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_client::NetworkServiceClient;
use nsm_sdk::networkservice::chain::{Chain, Context, Element, Next};
use nsm_sdk::networkservice::server::ChainServer;
use nsm_sdk::security::tls::Tls;
use nsm_sdk::tools::daemon;
use nsm_sdk::tools::grpc::{Listeners, dial_connector, dial_with, parse_url};
use nsm_spiffe_dev::{Authority, Ca, Config, MintedSvid, mint_svid};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tonic::Status;
use url::Url;

const CONFIG: &str = "trust_domains: [nsm.td1, nsm.td2, {name: nsm.lonely, federate: false}]\n\
rules:\n  - match: { uid: 0 }\n    spiffe_id: spiffe://nsm.td1/server\n";

/// Answers every Request with the caller's SPIFFE ID as the label `peer`,
/// and counts the calls that reached it.
struct Echo(Arc<AtomicUsize>);

#[async_trait]
impl Element for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, _next: Next) -> Result<Connection, Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        let mut c = req.connection.unwrap_or_default();
        c.labels.insert("peer".into(), ctx.peer.spiffe_id.clone().unwrap_or_else(|| "-".into()));
        Ok(c)
    }
    async fn close(&self, _ctx: &mut Context, _conn: Connection, _next: Next) -> Result<(), Status> {
        Ok(())
    }
}

/// The Workload API, and a NetworkService with mTLS on `<dir>/ns.sock`.
struct Fixture {
    dir: tempfile::TempDir,
    auth: Authority,
    tls: Arc<Tls>,
    calls: Arc<AtomicUsize>,
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.yaml"), CONFIG).unwrap();
        let api = format!("unix://{}/agent.sock", dir.path().display());
        let conf = dir.path().join("config.yaml");
        let c = Config::try_parse_from(["nsm-spiffe-dev", "--listen-on", &api, "--config", conf.to_str().unwrap()])
            .unwrap();
        let auth = Authority::new(c.authority_options().unwrap()).unwrap();
        let (stop_api, stopped) = tokio::sync::oneshot::channel::<()>();
        let listeners = Listeners::bind(&c.listen_on.0).await.unwrap();
        tokio::spawn(nsm_spiffe_dev::serve(auth.clone(), listeners, async move {
            let _ = stopped.await;
        }));
        let tls = Tls::from_workload_api(&api, Duration::from_secs(10)).await.unwrap();

        let calls = Arc::new(AtomicUsize::new(0));
        let chain = Chain::new(vec![Arc::new(Echo(calls.clone()))]);
        let router = tonic::transport::Server::builder().add_service(ChainServer::new(chain).into_service());
        let ns = parse_url(&format!("unix://{}/ns.sock", dir.path().display())).unwrap();
        let listeners = Listeners::bind(&[ns]).await.unwrap();
        let (stop_ns, stopped) = tokio::sync::oneshot::channel::<()>();
        let t = tls.clone();
        tokio::spawn(async move {
            daemon::serve_with(
                router,
                listeners,
                Some(t),
                async move {
                    let _ = stopped.await;
                },
                Duration::from_secs(1),
            )
            .await
        });
        Fixture { dir, auth, tls, calls, _stop: vec![stop_api, stop_ns] }
    }

    fn url(&self) -> Url {
        parse_url(&format!("unix://{}/ns.sock", self.dir.path().display())).unwrap()
    }

    /// One Request through a connector presenting `svid` (None: no client
    /// certificate at all). Ok(the peer the server saw) or the error text.
    async fn request_as(&self, svid: Option<&MintedSvid>) -> Result<String, String> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(svid)));
        let (ch, _) =
            dial_connector(&self.url(), Duration::from_secs(5), Some(connector)).await.map_err(|e| e.to_string())?;
        request(ch).await
    }
}

async fn request(ch: tonic::transport::Channel) -> Result<String, String> {
    let mut c = NetworkServiceClient::new(ch);
    let r = c.request(NetworkServiceRequest::default()).await.map_err(|e| e.to_string())?;
    Ok(r.into_inner().labels.get("peer").cloned().unwrap_or_default())
}

/// Trusts any server: these tests are about what the *server* accepts.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(svid: Option<&MintedSvid>) -> rustls::ClientConfig {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider())));
    let mut c = match svid {
        None => b.with_no_client_auth(),
        Some(s) => b.with_client_auth_cert(chain(s), key(s)).unwrap(),
    };
    c.alpn_protocols = vec![b"h2".to_vec()];
    c
}

fn chain(s: &MintedSvid) -> Vec<CertificateDer<'static>> {
    s.cert_chain.iter().map(|c| CertificateDer::from(c.clone())).collect()
}

fn key(s: &MintedSvid) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(s.private_key_pkcs8.clone()))
}

fn hours(h: u64) -> Duration {
    Duration::from_secs(h * 3600)
}

#[tokio::test]
async fn workload_api_client_is_accepted_and_both_sides_see_spiffe_ids() {
    let f = Fixture::start().await;
    assert_eq!(f.tls.spiffe_id().as_deref(), Some("spiffe://nsm.td1/server"));
    let (ch, server) = dial_with(&f.url(), Duration::from_secs(5), Some(&f.tls)).await.unwrap();
    assert_eq!(request(ch).await.unwrap(), "spiffe://nsm.td1/server", "the chain sees the client's SPIFFE ID");
    let server = server.lock().unwrap().clone();
    assert_eq!(server.spiffe_id.as_deref(), Some("spiffe://nsm.td1/server"), "the client sees the server's");
    assert!(server.cert_der.is_some());
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn federated_domain_is_accepted() {
    let f = Fixture::start().await;
    let td2 = f.auth.ca("nsm.td2").unwrap().mint("spiffe://nsm.td2/ns/x/pod/nsc", hours(1)).unwrap();
    assert_eq!(f.request_as(Some(&td2)).await.unwrap(), "spiffe://nsm.td2/ns/x/pod/nsc");
}

#[tokio::test]
async fn plaintext_client_is_refused() {
    let f = Fixture::start().await;
    let ch = nsm_sdk::tools::grpc::dial(&f.url(), Duration::from_secs(3)).await;
    let r = match ch {
        Ok(ch) => request(ch).await,
        Err(e) => Err(e.to_string()),
    };
    assert!(r.is_err(), "a plaintext client got through: {r:?}");
    assert_eq!(f.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn client_without_svid_is_refused() {
    let f = Fixture::start().await;
    let r = f.request_as(None).await;
    assert!(r.is_err(), "a client without a certificate got through: {r:?}");
    assert_eq!(f.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn svid_from_untrusted_ca_is_refused() {
    let f = Fixture::start().await;
    // Same trust domain name, different CA: the name alone buys nothing.
    let rogue = Ca::generate("nsm.td1", hours(2)).unwrap();
    let svid = rogue.mint("spiffe://nsm.td1/server", hours(1)).unwrap();
    let r = f.request_as(Some(&svid)).await;
    assert!(r.is_err(), "an SVID from a rogue CA got through: {r:?}");
    assert_eq!(f.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn expired_svid_is_refused() {
    let f = Fixture::start().await;
    let ca = f.auth.ca("nsm.td1").unwrap();
    let now = SystemTime::now();
    let expired = mint_svid(&ca, "spiffe://nsm.td1/server", now - hours(2), now - hours(1)).unwrap();
    let r = f.request_as(Some(&expired)).await;
    assert!(r.is_err(), "an expired SVID got through: {r:?}");
    // The control: the same CA, in date, is accepted.
    let fresh = mint_svid(&ca, "spiffe://nsm.td1/server", now - hours(1), now + hours(1)).unwrap();
    assert_eq!(f.request_as(Some(&fresh)).await.unwrap(), "spiffe://nsm.td1/server");
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn domain_that_does_not_federate_is_refused() {
    let f = Fixture::start().await;
    let lonely = f.auth.ca("nsm.lonely").unwrap().mint("spiffe://nsm.lonely/x", hours(1)).unwrap();
    let r = f.request_as(Some(&lonely)).await;
    assert!(r.is_err(), "an SVID from a non-federated domain got through: {r:?}");
    assert_eq!(f.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn client_refuses_a_server_it_does_not_trust() {
    let f = Fixture::start().await;
    // A server presenting an SVID of a rogue CA for the right name.
    let rogue = Ca::generate("nsm.td1", hours(2)).unwrap().mint("spiffe://nsm.td1/server", hours(1)).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain(&rogue), key(&rogue))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let path = f.dir.path().join("rogue.sock");
    let ln = tokio::net::UnixListener::bind(&path).unwrap();
    let accepted = tokio::spawn(async move {
        let (s, _) = ln.accept().await.unwrap();
        acceptor.accept(s).await.is_ok()
    });
    let u = parse_url(&format!("unix://{}", path.display())).unwrap();
    let r = dial_with(&u, Duration::from_secs(5), Some(&f.tls)).await;
    let Err(err) = r else { panic!("dialed a server with a rogue SVID") };
    let err = err.to_string();
    assert!(err.contains(path.to_str().unwrap()), "the error names the URL: {err}");
    assert!(!accepted.await.unwrap(), "the rogue server completed a handshake");
}

/// Many clients, each with its own SVID (own key), through the real token
/// and policy elements on both sides: every token verifies against the
/// certificate of the connection it came on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_with_own_svids_pass_the_default_policies() {
    use nsm_sdk::networkservice::authorize::{AuthorizeClient, AuthorizeServer};
    use nsm_sdk::networkservice::connect::GrpcClient;
    use nsm_sdk::networkservice::updatepath::UpdatePath;
    use nsm_sdk::networkservice::updatetoken::UpdateToken;
    use nsm_sdk::security::policy::PolicySet;
    use nsm_sdk::tools::grpc::ChannelPool;
    use nsm_sdk::tools::token::JwtTokens;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), CONFIG).unwrap();
    let api = format!("unix://{}/agent.sock", dir.path().display());
    let conf = dir.path().join("config.yaml");
    let c =
        Config::try_parse_from(["nsm-spiffe-dev", "--listen-on", &api, "--config", conf.to_str().unwrap()]).unwrap();
    let auth = Authority::new(c.authority_options().unwrap()).unwrap();
    let listeners = Listeners::bind(&c.listen_on.0).await.unwrap();
    let (_stop_api, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(nsm_spiffe_dev::serve(auth, listeners, async move {
        let _ = stopped.await;
    }));
    let server_tls = Tls::from_workload_api(&api, Duration::from_secs(10)).await.unwrap();
    let life = Duration::from_secs(600);
    let chain = Chain::new(vec![
        UpdatePath::new("srv"),
        UpdateToken::new(JwtTokens::new(server_tls.clone(), life)),
        AuthorizeServer::new(PolicySet::server()),
        Arc::new(Echo(Arc::new(AtomicUsize::new(0)))),
    ]);
    let router = tonic::transport::Server::builder().add_service(ChainServer::new(chain).into_service());
    let url = parse_url(&format!("unix://{}/ns.sock", dir.path().display())).unwrap();
    let listeners = Listeners::bind(std::slice::from_ref(&url)).await.unwrap();
    let (_stop_ns, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(daemon::serve_with(
        router,
        listeners,
        Some(server_tls),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    let mut tasks = vec![];
    for i in 0..30 {
        let (api, url) = (api.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let tls = Tls::from_workload_api(&api, Duration::from_secs(10)).await.unwrap();
            let client = Chain::new(vec![
                UpdatePath::new(&format!("nsc{i}")),
                AuthorizeClient::new(PolicySet::client()),
                GrpcClient::new(
                    ChannelPool::with_tls(Duration::from_secs(5), Some(tls.clone())),
                    JwtTokens::new(tls, life),
                ),
            ]);
            let mut ctx = Context::with_timeout(Duration::from_secs(20));
            ctx.client_url = Some(url);
            client.request(&mut ctx, NetworkServiceRequest::default()).await.map_err(|e| e.message().to_string())
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert!(r.is_ok(), "client {i}: {r:?}");
    }
}
