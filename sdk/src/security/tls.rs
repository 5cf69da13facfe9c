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

use rustls::pki_types::CertificateDer;

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
}

/// The server a client connection reached (for the client-side policy).
pub type ServerPeer = PeerIdentity;

/// The SPIFFE ID and leaf of a peer's certificate chain.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> PeerIdentity {
    let Some(leaf) = certs.and_then(|c| c.first()) else { return PeerIdentity::default() };
    PeerIdentity {
        spiffe_id: spiffe::cert::spiffe_id_from_der(leaf.as_ref()).ok().map(|i| i.to_string()),
        cert_der: Some(Arc::new(leaf.as_ref().to_vec())),
    }
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
    cache: Mutex<Option<(usize, Arc<Svid>)>>,
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
        // The source retries forever; ask once directly first so a refusal
        // ("no identity for this process") is reported, not waited out.
        let client = tokio::time::timeout(timeout, spiffe::WorkloadApiClient::connect_to(endpoint))
            .await
            .map_err(|_| err("connecting timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        tokio::time::timeout(timeout, client.fetch_x509_context())
            .await
            .map_err(|_| err("fetching the SVID timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        let source = tokio::time::timeout(timeout, spiffe::X509Source::builder().endpoint(endpoint).build())
            .await
            .map_err(|_| err("the X.509 source did not sync".into()))?
            .map_err(|e| err(e.to_string()))?;
        let server = spiffe_rustls::mtls_server(source.clone())
            .with_alpn_protocols([b"h2".as_ref()])
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let client = spiffe_rustls::mtls_client(source.clone())
            .with_alpn_protocols([b"h2".as_ref()])
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let tls = Tls {
            source,
            endpoint: endpoint.to_string(),
            server: Arc::new(server),
            client: Arc::new(client),
            cache: Mutex::new(None),
        };
        if let Some(s) = tls.svid() {
            tracing::info!(spiffe_id = %s.spiffe_id, endpoint, "SVID from the Workload API");
        }
        Ok(Arc::new(tls))
    }

    /// The server side of a handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    /// The client side of a handshake.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client.clone())
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
        let x = self.source.svid().ok()?;
        // Re-derive only when the source rotated (pointer changed).
        let key = Arc::as_ptr(&x) as usize;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, s)) = cache.as_ref()
            && *k == key
        {
            return Some(s.clone());
        }
        let chain: Vec<Vec<u8>> = x.cert_chain().iter().map(|c| c.as_bytes().to_vec()).collect();
        let svid = Arc::new(Svid {
            spiffe_id: x.spiffe_id().to_string(),
            not_after: chain.first().and_then(|c| not_after(c)).unwrap_or(SystemTime::UNIX_EPOCH),
            cert_chain: chain,
            private_key_pkcs8: x.private_key().as_ref().to_vec(),
        });
        *cache = Some((key, svid.clone()));
        Some(svid)
    }
}
