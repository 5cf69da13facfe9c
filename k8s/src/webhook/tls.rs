//! The webhook's own certificates (upstream's `selfregister` mode): a
//! self-signed CA and a serving certificate it signs, for the names the API
//! server dials, both EC P-256, re-issued before they expire.
//!
//! # Rotation
//! At half of the lifetime a new CA and serving certificate are issued. The
//! API server must trust the new CA before the new certificate is served,
//! so the caller first publishes both CAs (new and current) as the
//! `caBundle`, waits a moment for the API server to take the change in, and
//! only then [`Resolver::set`]s the new certificate. Connections already
//! open keep their handshake; new ones get the new certificate.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

/// How far not-before is put in the past (clock skew).
const BACKDATE: Duration = Duration::from_secs(60);

/// One issued CA and serving certificate.
#[derive(Clone)]
pub struct Issued {
    /// The CA certificate (PEM), for the `caBundle`.
    pub ca_pem: String,
    /// The serving certificate's DER (tests compare serials through it).
    pub cert_der: Vec<u8>,
    /// When the serving certificate was issued and when it expires.
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    key: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("not_after", &humantime::format_rfc3339_seconds(self.not_after)).finish()
    }
}

impl Issued {
    /// When this certificate should be replaced: half of its lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life / 2
    }
}

/// Issues a CA and a serving certificate for `names` (DNS names or IP
/// addresses) valid for `lifetime`.
pub fn issue(names: &[String], lifetime: Duration) -> Result<Issued, rcgen::Error> {
    let now = SystemTime::now();
    let not_before = now - BACKDATE;
    let not_after = now + lifetime;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "nsm-admission-webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before.into();
    ca.not_after = not_after.into();
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CommonName, names.first().map(String::as_str).unwrap_or("webhook"));
    leaf.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.as_str().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = not_before.into();
    leaf.not_after = not_after.into();
    let cert = leaf.signed_by(&key, &issuer)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&der).map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    Ok(Issued {
        ca_pem: ca_cert.pem(),
        cert_der: cert.der().to_vec(),
        not_before,
        not_after,
        key: Arc::new(CertifiedKey::new(chain, signer)),
    })
}

/// Serves whichever certificate was set last.
#[derive(Debug)]
pub struct Resolver(RwLock<Arc<CertifiedKey>>);

impl Resolver {
    pub fn new(first: &Issued) -> Arc<Resolver> {
        Arc::new(Resolver(RwLock::new(first.key.clone())))
    }

    /// Serves `next` from the next handshake on.
    pub fn set(&self, next: &Issued) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = next.key.clone();
    }
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// A TLS acceptor serving `resolver`'s certificate (TLS 1.2 and 1.3, as the
/// API server's webhook client speaks either).
pub fn acceptor(resolver: Arc<Resolver>) -> tokio_rustls::TlsAcceptor {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_no_client_auth().with_cert_resolver(resolver.clone()))
        .unwrap_or_else(|_| rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(resolver));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}
