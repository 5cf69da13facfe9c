//! Certificate authorities and X.509-SVIDs.
//!
//! One self-signed EC P-256 CA per trust domain (URI SAN `spiffe://<td>`,
//! basicConstraints CA:true, keyUsage keyCertSign+cRLSign). Leaf SVIDs are EC
//! P-256 with the SPIFFE ID as their only URI SAN, basicConstraints CA:false,
//! keyUsage digitalSignature, EKU serverAuth+clientAuth, a random serial and
//! a not-before slightly in the past (clock skew between processes).
//!
//! [`mint_svid`] issues an SVID for any ID and validity from any [`Ca`]; tests
//! use it for expired SVIDs and SVIDs from a CA nobody trusts.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::policy::{check_spiffe_id, check_trust_domain};

/// How far a leaf's not-before is put in the past.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Errors of certificate generation and of the CA directory.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    BadId { id: String, reason: String },
    #[error("invalid trust domain {td:?}: {reason}")]
    BadTrustDomain { td: String, reason: String },
    #[error("SPIFFE ID {id} is not in trust domain {td} of this CA")]
    WrongTrustDomain { id: String, td: String },
    #[error("invalid validity: not_after is not after not_before")]
    BadValidity,
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// A trust domain's certificate authority: a self-signed CA certificate and
/// its key.
pub struct Ca {
    trust_domain: String,
    cert_der: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &humantime::format_rfc3339_seconds(self.not_after))
            .finish_non_exhaustive()
    }
}

/// An X.509-SVID as the Workload API hands it out.
#[derive(Clone)]
pub struct MintedSvid {
    /// `spiffe://<trust domain>/<path>`.
    pub spiffe_id: String,
    /// DER certificates, leaf first (here: just the leaf, signed by the root).
    pub cert_chain: Vec<Vec<u8>>,
    /// PKCS#8 DER of the leaf's EC P-256 private key.
    pub private_key_pkcs8: Vec<u8>,
    /// Serial number (big-endian, positive).
    pub serial: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// DER of the issuing CA certificate (the trust anchor to verify with).
    pub ca_cert_der: Vec<u8>,
}

impl std::fmt::Debug for MintedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &hex(&self.serial))
            .field("not_after", &humantime::format_rfc3339_seconds(self.not_after))
            .finish_non_exhaustive()
    }
}

impl MintedSvid {
    /// The chain as the Workload API sends it: DER certificates concatenated.
    pub fn chain_der_concat(&self) -> Vec<u8> {
        self.cert_chain.concat()
    }

    /// Leaf certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_chain.iter().map(|c| pem_encode("CERTIFICATE", c)).collect()
    }

    /// Private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.private_key_pkcs8)
    }

    /// Serial number as lower-case hex.
    pub fn serial_hex(&self) -> String {
        hex(&self.serial)
    }
}

impl Ca {
    /// A new CA for `trust_domain`, valid from a minute ago for `ttl`.
    pub fn generate(trust_domain: &str, ttl: Duration) -> Result<Ca, CaError> {
        check_trust_domain(trust_domain)
            .map_err(|reason| CaError::BadTrustDomain { td: trust_domain.to_string(), reason })?;
        let now = SystemTime::now();
        let not_before = now - Duration::from_secs(60);
        let not_after = now + ttl;
        let serial = random_serial();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "nsm-spiffe-dev");
        // A unique name per CA generation, so an old and a new CA of one trust
        // domain (both in the bundle after a rotation) are told apart by name.
        dn.push(DnType::CommonName, format!("{trust_domain} CA {}", &hex(&serial)[..12]));
        params.distinguished_name = dn;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.subject_alt_names = vec![SanType::URI(ia5(&format!("spiffe://{trust_domain}"))?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().to_vec();
        Ca::from_parts(cert_der, key)
    }

    /// A CA from its certificate (DER) and PKCS#8 key (DER). The trust domain
    /// is the certificate's `spiffe://<td>` URI SAN.
    pub fn from_der(cert_der: &[u8], key_pkcs8_der: &[u8]) -> Result<Ca, CaError> {
        let bad = |reason: String| CaError::File { path: PathBuf::from("<CA certificate>"), reason };
        let key = KeyPair::try_from(key_pkcs8_der).map_err(|e| bad(format!("private key: {e}")))?;
        Ca::from_parts(cert_der.to_vec(), key)
    }

    fn from_parts(cert_der: Vec<u8>, key: KeyPair) -> Result<Ca, CaError> {
        let bad = |reason: String| CaError::File { path: PathBuf::from("<CA certificate>"), reason };
        let info = cert_info(&cert_der).map_err(bad)?;
        let td = match info.uris.as_slice() {
            [u] => u.strip_prefix("spiffe://").filter(|td| !td.contains('/')).map(str::to_string),
            _ => None,
        }
        .ok_or_else(|| bad(format!("CA certificate needs exactly one URI SAN spiffe://<td>, has {:?}", info.uris)))?;
        if !info.is_ca {
            return Err(bad("certificate is not a CA (basicConstraints CA:false or missing)".into()));
        }
        if info.spki != key.subject_public_key_info() {
            return Err(bad("private key does not belong to the CA certificate".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)?;
        Ok(Ca { trust_domain: td, cert_der, not_before: info.not_before, not_after: info.not_after, issuer })
    }

    /// Loads `<dir>/<td>.pem` (certificate) and `<dir>/<td>.key` (PKCS#8).
    /// `Ok(None)` when the certificate file does not exist.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Option<Ca>, CaError> {
        let (cert_path, key_path) = ca_paths(dir, trust_domain);
        let cert_pem = match std::fs::read_to_string(&cert_path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CaError::File { path: cert_path, reason: e.to_string() }),
        };
        let key_pem = std::fs::read_to_string(&key_path)
            .map_err(|e| CaError::File { path: key_path.clone(), reason: e.to_string() })?;
        let cert_der =
            pem_decode(&cert_pem, "CERTIFICATE").map_err(|reason| CaError::File { path: cert_path.clone(), reason })?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| CaError::File { path: key_path.clone(), reason: format!("private key: {e}") })?;
        let ca = Ca::from_parts(cert_der, key).map_err(|e| match e {
            CaError::File { reason, .. } => CaError::File { path: cert_path.clone(), reason },
            e => e,
        })?;
        if ca.trust_domain != trust_domain {
            return Err(CaError::File {
                path: cert_path,
                reason: format!("CA is for trust domain {}, not {trust_domain}", ca.trust_domain),
            });
        }
        Ok(Some(ca))
    }

    /// Writes `<dir>/<td>.pem` and `<dir>/<td>.key` (mode 0600), each
    /// replaced atomically.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        let ferr = |path: &Path, e: std::io::Error| CaError::File { path: path.to_path_buf(), reason: e.to_string() };
        std::fs::create_dir_all(dir).map_err(|e| ferr(dir, e))?;
        let (cert_path, key_path) = ca_paths(dir, &self.trust_domain);
        write_atomic(&key_path, self.key_pem().as_bytes(), 0o600).map_err(|e| ferr(&key_path, e))?;
        write_atomic(&cert_path, self.cert_pem().as_bytes(), 0o644).map_err(|e| ferr(&cert_path, e))?;
        Ok(())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// DER of the CA certificate (the trust anchor).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert_der)
    }

    /// The CA key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// An SVID for `spiffe_id` (which must be in this CA's trust domain),
    /// valid from [`BACKDATE`] ago for `ttl`, but never past the CA's own
    /// expiry.
    pub fn mint(&self, spiffe_id: &str, ttl: Duration) -> Result<MintedSvid, CaError> {
        let td_prefix = format!("spiffe://{}/", self.trust_domain);
        if !spiffe_id.starts_with(&td_prefix) {
            return Err(CaError::WrongTrustDomain { id: spiffe_id.to_string(), td: self.trust_domain.clone() });
        }
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.not_after);
        mint_svid(self, spiffe_id, now - BACKDATE, not_after)
    }
}

/// Mints an X.509-SVID for any `spiffe_id` with any validity, signed by
/// `ca`, without the checks [`Ca::mint`] makes beyond a well-formed ID: the
/// ID may be in another trust domain than the CA's, and the validity may lie
/// wholly in the past (expired SVIDs) or the future.
///
/// X.509 times have whole seconds: `not_before` is rounded down and
/// `not_after` up.
pub fn mint_svid(
    ca: &Ca,
    spiffe_id: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<MintedSvid, CaError> {
    check_spiffe_id(spiffe_id).map_err(|reason| CaError::BadId { id: spiffe_id.to_string(), reason })?;
    if not_after <= not_before {
        return Err(CaError::BadValidity);
    }
    let not_before = round_down_secs(not_before);
    let not_after = round_up_secs(not_after);
    let serial = random_serial();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "nsm-spiffe-dev");
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.subject_alt_names = vec![SanType::URI(ia5(spiffe_id)?)];
    // The spiffe crate rejects a leaf without basicConstraints
    // (MissingX509Extension 2.5.29.19), so CA:false is written explicitly.
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = OffsetDateTime::from(not_before);
    params.not_after = OffsetDateTime::from(not_after);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok(MintedSvid {
        spiffe_id: spiffe_id.to_string(),
        cert_chain: vec![cert.der().to_vec()],
        private_key_pkcs8: key.serialize_der(),
        serial: serial.to_vec(),
        not_before,
        not_after,
        ca_cert_der: ca.cert_der.clone(),
    })
}

/// What this crate reads back from a certificate.
struct CertInfo {
    uris: Vec<String>,
    is_ca: bool,
    spki: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
}

fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    use x509_parser::prelude::*;
    let (rest, x) = X509Certificate::from_der(der).map_err(|e| format!("not a DER certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing data after the certificate".into());
    }
    let mut uris = vec![];
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                uris.push(u.to_string());
            }
        }
    }
    let is_ca = matches!(x.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let to_sys = |t: ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
    Ok(CertInfo {
        uris,
        is_ca,
        spki: x.public_key().raw.to_vec(),
        not_before: to_sys(x.validity().not_before),
        not_after: to_sys(x.validity().not_after),
    })
}

fn ca_paths(dir: &Path, td: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{td}.pem")), dir.join(format!("{td}.key")))
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn ia5(s: &str) -> Result<Ia5String, CaError> {
    Ia5String::try_from(s).map_err(|e| CaError::BadId { id: s.to_string(), reason: e.to_string() })
}

/// 16 random bytes, positive as a DER INTEGER and without a leading zero.
fn random_serial() -> [u8; 16] {
    let mut s: [u8; 16] = rand::random();
    s[0] = (s[0] & 0x7f) | 0x01;
    s
}

fn round_down_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

fn round_up_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() > 0 => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs() + 1),
        _ => t,
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// PEM with 64-column base64 lines.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64_encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// The first PEM block labelled `label`, decoded.
pub fn pem_decode(pem: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin).ok_or_else(|| format!("no {begin} block"))? + begin.len();
    let stop = pem[start..].find(&end).ok_or_else(|| format!("no {end} line"))? + start;
    base64_decode(&pem[start..stop])
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' | b' ' | b'\t' => continue,
            _ => return Err(format!("invalid base64 character {:?}", c as char)),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for n in 0..20usize {
            let data: Vec<u8> = (0..n as u8).map(|x| x.wrapping_mul(37)).collect();
            assert_eq!(base64_decode(&base64_encode(&data)).unwrap(), data);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
    }

    #[test]
    fn ca_saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("nsm.cluster1", Duration::from_secs(3600)).unwrap();
        ca.save(dir.path()).unwrap();
        let back = Ca::load(dir.path(), "nsm.cluster1").unwrap().unwrap();
        assert_eq!(back.cert_der(), ca.cert_der());
        assert_eq!(back.trust_domain(), "nsm.cluster1");
        assert!(Ca::load(dir.path(), "nsm.cluster2").unwrap().is_none());
        // Files under another trust domain's name are refused.
        std::fs::copy(dir.path().join("nsm.cluster1.pem"), dir.path().join("nsm.cluster9.pem")).unwrap();
        std::fs::copy(dir.path().join("nsm.cluster1.key"), dir.path().join("nsm.cluster9.key")).unwrap();
        let e = Ca::load(dir.path(), "nsm.cluster9").unwrap_err().to_string();
        assert!(e.contains("not nsm.cluster9"), "{e}");
        // The loaded CA signs leaves the original's certificate verifies.
        let svid = back.mint("spiffe://nsm.cluster1/x", Duration::from_secs(60)).unwrap();
        assert_eq!(svid.ca_cert_der, ca.cert_der());
        let leaf = x509_parser::parse_x509_certificate(&svid.cert_chain[0]).unwrap().1;
        let root = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap().1;
        assert!(leaf.verify_signature(Some(root.public_key())).is_ok());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("nsm.cluster1.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn mint_rejects_bad_input() {
        let ca = Ca::generate("nsm.cluster1", Duration::from_secs(3600)).unwrap();
        assert!(matches!(
            ca.mint("spiffe://nsm.cluster2/x", Duration::from_secs(5)),
            Err(CaError::WrongTrustDomain { .. })
        ));
        assert!(matches!(ca.mint("spiffe://nsm.cluster1/", Duration::from_secs(5)), Err(CaError::BadId { .. })));
        let now = SystemTime::now();
        assert!(matches!(mint_svid(&ca, "spiffe://nsm.cluster1/x", now, now), Err(CaError::BadValidity)));
        assert!(Ca::generate("Bad_TD!", Duration::from_secs(5)).is_err());
    }
}
