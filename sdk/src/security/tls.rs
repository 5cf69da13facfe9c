//! Mutual TLS with SPIFFE X.509-SVIDs on every hop, unix sockets included.
//!
//! [`Tls`] holds a live [`spiffe::X509Source`] (the Workload API at
//! `SPIFFE_ENDPOINT_SOCKET`: SPIRE in Kubernetes, `nsm-spiffe-dev` in the
//! lab) and the rustls configurations built on it with `spiffe-rustls`.
//!
//! # Guarantees
//! - Both sides present their current SVID and require the peer's; a peer
//!   is accepted if its chain verifies against the bundle of its own trust
//!   domain, local or federated (any SPIFFE ID, like upstream's
//!   `AuthorizeAny`; who may do what is the policy's business). No SVID, an
//!   SVID from an untrusted CA, or an expired SVID fails the handshake.
//! - Rotation needs nothing: every new handshake uses the source's current
//!   SVID and bundles. Established connections keep working.
//! - Server names are not checked (SPIFFE identities are URIs, not DNS
//!   names), so unix sockets and IP addresses work.
//! - The peer's SPIFFE ID and leaf certificate reach the chain
//!   (`Context::peer`), and on the client side the server's
//!   ([`ServerPeer`] per dialed URL).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::{Svid, SvidSource};

/// Errors setting up TLS; they name the Workload API endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "no SVID from the Workload API at {endpoint} within {timeout:?}: {reason} \
         (is the SPIRE agent, or nsm-spiffe-dev, running there, and does it have an identity for this process?)"
    )]
    Source { endpoint: String, timeout: Duration, reason: String },
    #[error("building the TLS configuration: {0}")]
    Config(String),
}

/// The identity of the peer at the other end of a TLS connection.
#[derive(Clone, Debug, Default)]
pub struct PeerIdentity {
    pub spiffe_id: Option<String>,
    pub cert_der: Option<Arc<Vec<u8>>>,
    /// Half way through the peer certificate's validity (when SPIRE rotates
    /// it).
    pub half_life: Option<SystemTime>,
    /// The SVID this side presented on the connection.
    pub local: Option<Arc<Svid>>,
    /// The connection's fds (grpcfd) when it is a unix socket: what the
    /// server passed back, and the queue of those to send it.
    pub fds: Option<Arc<crate::tools::grpcfd::FdTransfer>>,
}

/// The server a client connection reached (for the client-side policy).
pub type ServerPeer = PeerIdentity;

/// The SPIFFE ID and leaf of a peer's certificate chain.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> PeerIdentity {
    let Some(leaf) = certs.and_then(|c| c.first()) else { return PeerIdentity::default() };
    PeerIdentity {
        spiffe_id: spiffe::cert::spiffe_id_from_der(leaf.as_ref()).ok().map(|i| i.to_string()),
        cert_der: Some(Arc::new(leaf.as_ref().to_vec())),
        half_life: half_life(leaf.as_ref()),
        local: None,
        fds: None,
    }
}

/// The middle of a DER certificate's validity period.
pub fn half_life(der: &[u8]) -> Option<SystemTime> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let from = c.validity().not_before.timestamp();
    let to = c.validity().not_after.timestamp();
    u64::try_from(from + (to - from) / 2).ok().map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

/// Expiry of a DER certificate.
pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = c.validity().not_after.timestamp();
    u64::try_from(secs).ok().map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

/// A live SVID source and the TLS configurations on it.
pub struct Tls {
    source: spiffe::X509Source,
    endpoint: String,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    /// spiffe-rustls refuses handshakes between a source update and its
    /// conversion (milliseconds); handshakes wait for it ([`Tls::ready`]).
    status: [spiffe_rustls::TlsStatus; 2],
    cache: Mutex<Option<Current>>,
}

/// The SVID the source holds now, converted once per rotation.
struct Current {
    /// Kept to compare by pointer (and so never reused while cached).
    src: Arc<spiffe::X509Svid>,
    svid: Arc<Svid>,
    key: Arc<CertifiedKey>,
}

/// Presents one fixed certificate: each handshake gets a configuration
/// with the SVID read for it, so the side that mints tokens knows exactly
/// which certificate the peer saw (spiffe-rustls' own resolver follows the
/// source on its own schedule, a little behind or ahead of what we read).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl Tls {
    /// Connects to the Workload API at `endpoint` (`unix:///path` or
    /// `unix:/path`) and waits up to `timeout` for the first SVID.
    pub async fn from_workload_api(endpoint: &str, timeout: Duration) -> Result<Arc<Tls>, TlsError> {
        let err = |reason: String| TlsError::Source { endpoint: endpoint.to_string(), timeout, reason };
        // The source retries forever without saying why; ask directly first
        // so that the reason an SVID is not there yet is logged (once) and
        // becomes the error when `timeout` ends (an error that is not about
        // waiting, such as a malformed request, fails at once). A refusal is
        // waited through too:
        // SPIRE answers "no identity issued" until the agent has synced the
        // process's registration entry, which takes up to its sync interval
        // (5 s) when the entry is new, as go-spiffe's sources also wait.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last: Option<String> = None;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let r = tokio::time::timeout(left, async {
                let client =
                    spiffe::WorkloadApiClient::connect_to(endpoint).await.map_err(|e| (true, e.to_string()))?;
                client.fetch_x509_context().await.map_err(|e| {
                    let m = e.to_string();
                    let waiting = ["Unavailable", "transport error", "PermissionDenied", "no identity"];
                    (waiting.iter().any(|w| m.contains(w)), m)
                })
            })
            .await;
            match r {
                Ok(Ok(_)) => break,
                Ok(Err((true, m))) if tokio::time::Instant::now() + Duration::from_millis(200) < deadline => {
                    if last.is_none() {
                        tracing::warn!(endpoint, error = %m, ?timeout, "no SVID from the Workload API yet; retrying");
                    }
                    last = Some(m);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(Err((_, m))) => return Err(err(m)),
                Err(_) => return Err(err(last.unwrap_or_else(|| "no answer".into()))),
            }
        }
        let source = tokio::time::timeout(timeout, spiffe::X509Source::builder().endpoint(endpoint).build())
            .await
            .map_err(|_| err("the X.509 source did not sync".into()))?
            .map_err(|e| err(e.to_string()))?;
        let (mut server, server_status) = spiffe_rustls::mtls_server(source.clone())
            .with_alpn_protocols([b"h2".as_ref()])
            .build_with_status()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let (mut client, client_status) = spiffe_rustls::mtls_client(source.clone())
            .with_alpn_protocols([b"h2".as_ref()])
            .build_with_status()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        // No session resumption: a resumed session skips the certificates,
        // so the peer would be known by the certificate of an earlier
        // handshake, not the one whose key signs the tokens on this
        // connection (after a rotation they differ). Connections are
        // long-lived; a full handshake per connection costs nothing.
        client.resumption = rustls::client::Resumption::disabled();
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let tls = Tls {
            source,
            endpoint: endpoint.to_string(),
            server: Arc::new(server),
            client: Arc::new(client),
            status: [server_status, client_status],
            cache: Mutex::new(None),
        };
        if let Some(s) = tls.svid() {
            tracing::info!(spiffe_id = %s.spiffe_id, endpoint, "SVID from the Workload API");
        }
        Ok(Arc::new(tls))
    }

    /// Waits (up to 2 s) until the TLS configurations have caught up with
    /// the source: right after a rotation spiffe-rustls refuses handshakes
    /// until it has converted the new SVID and bundles.
    pub async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        for st in &self.status {
            let mut st = st.clone();
            while !st.current().available && tokio::time::Instant::now() < deadline {
                let _ = tokio::time::timeout(Duration::from_millis(20), st.changed()).await;
            }
        }
    }

    /// The server side of one handshake, presenting the current SVID, and
    /// that SVID.
    pub fn acceptor(&self) -> (tokio_rustls::TlsAcceptor, Option<Arc<Svid>>) {
        match self.current() {
            Some((svid, key)) => {
                let mut c = (*self.server).clone();
                c.cert_resolver = Arc::new(Fixed(key));
                (tokio_rustls::TlsAcceptor::from(Arc::new(c)), Some(svid))
            }
            None => (tokio_rustls::TlsAcceptor::from(self.server.clone()), None),
        }
    }

    /// The client side of one handshake, presenting the current SVID, and
    /// that SVID.
    pub fn connector(&self) -> (tokio_rustls::TlsConnector, Option<Arc<Svid>>) {
        match self.current() {
            Some((svid, key)) => {
                let mut c = (*self.client).clone();
                c.client_auth_cert_resolver = Arc::new(Fixed(key));
                (tokio_rustls::TlsConnector::from(Arc::new(c)), Some(svid))
            }
            None => (tokio_rustls::TlsConnector::from(self.client.clone()), None),
        }
    }

    /// The current SVID and its rustls form (converted once per rotation).
    fn current(&self) -> Option<(Arc<Svid>, Arc<CertifiedKey>)> {
        let x = self.source.svid().ok()?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref()
            && Arc::ptr_eq(&c.src, &x)
        {
            return Some((c.svid.clone(), c.key.clone()));
        }
        let chain: Vec<Vec<u8>> = x.cert_chain().iter().map(|c| c.as_bytes().to_vec()).collect();
        // The source updates on every Workload API message, also when only a
        // bundle changed and the SVID is the same: then nothing rotated (no
        // new key, no redials, tokens keep their signer).
        if let Some(c) = cache.as_mut()
            && chain == c.svid.cert_chain
            && x.private_key().as_ref() == c.svid.private_key_pkcs8.as_slice()
        {
            c.src = x;
            return Some((c.svid.clone(), c.key.clone()));
        }
        let svid = Arc::new(Svid {
            spiffe_id: x.spiffe_id().to_string(),
            not_after: chain.first().and_then(|c| not_after(c)).unwrap_or(SystemTime::UNIX_EPOCH),
            cert_chain: chain,
            private_key_pkcs8: x.private_key().as_ref().to_vec(),
        });
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.private_key_pkcs8.clone()));
        let signer = match rustls::crypto::ring::default_provider().key_provider.load_private_key(der) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(spiffe_id = %svid.spiffe_id, error = %e, "the SVID's private key is unusable");
                return None;
            }
        };
        let certs = svid.cert_chain.iter().map(|c| CertificateDer::from(c.clone())).collect();
        let key = Arc::new(CertifiedKey::new(certs, signer));
        if cache.is_some() {
            tracing::info!(
                spiffe_id = %svid.spiffe_id,
                not_after = %humantime::format_rfc3339_seconds(svid.not_after),
                "SVID rotated: new handshakes and tokens use the new one"
            );
        }
        *cache = Some(Current { src: x, svid: svid.clone(), key: key.clone() });
        Some((svid, key))
    }

    /// This workload's SPIFFE ID, if an SVID is available.
    pub fn spiffe_id(&self) -> Option<String> {
        self.svid().map(|s| s.spiffe_id.clone())
    }

    /// Stops the source's background task.
    pub async fn shutdown(&self) {
        self.source.shutdown().await;
    }
}

impl SvidSource for Tls {
    fn svid(&self) -> Option<Arc<Svid>> {
        self.current().map(|(s, _)| s)
    }
}
