//! ES256 JWTs: the per-hop tokens of NSM (`sdk:pkg/tools/spiffejwt`).
//!
//! A token is the JWS compact serialisation `b64url(header).b64url(claims).
//! b64url(signature)` with header `{"alg":"ES256","typ":"JWT"}`, signed with
//! the workload's X.509-SVID private key (EC P-256), the signature being the
//! 64-byte `R || S` of ECDSA P-256 / SHA-256 (RFC 7518 §3.4).
//!
//! # Why hand-written
//! `ring` is already linked for TLS (rustls' ring provider) and a JWT is three
//! base64url segments; a JWT crate would bring a second crypto stack (or
//! aws-lc) for one signature scheme. This module is ~the whole of it.
//!
//! # Guarantees
//! - [`sign_es256`] only emits ES256 tokens whose `aud` is a JSON array.
//! - [`verify_es256`] / [`verify_es256_pem`] accept a token only if it has
//!   exactly three segments, its header says `alg: ES256` (anything else —
//!   `none`, `HS256`, a missing `alg` — is refused *before* any key is
//!   used), the certificate's key is EC P-256, the signature verifies
//!   over the first two segments as sent, and — when the certificate has a
//!   SPIFFE ID — the token's `sub` is that ID. Claims are returned only then.
//!   (A signature alone would let a key holder sign a token in someone
//!   else's name; upstream's OPA check has that gap.)
//! - Expiry is **not** checked here: that is policy (`tokens_expired.rego`),
//!   so an operator can see and change it.
//! - [`decode`] parses without verifying; use it only for routing decisions
//!   (e.g. "who claims to be the sender"), never for authorisation.
//! - Errors never contain the token itself (it is a bearer credential); they
//!   name its claimed subject when it can be decoded.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The only algorithm we mint and accept.
pub const ALG_ES256: &str = "ES256";

/// Length of an ES256 signature (`R || S`).
pub const ES256_SIGNATURE_LEN: usize = 64;

/// What went wrong with a token, a key or a certificate.
#[derive(Debug, Error)]
pub enum JwtError {
    /// Not three base64url segments of JSON.
    #[error("token is not a well-formed JWT: {0}")]
    Malformed(String),
    /// The header names another algorithm (or none).
    #[error("token (sub {sub:?}) uses algorithm {alg:?}: only ES256 is accepted")]
    Algorithm { sub: String, alg: String },
    /// The signature does not verify against the certificate's key.
    #[error("token (sub {sub:?}) is not signed by the key of certificate {cert}")]
    BadSignature { sub: String, cert: String },
    /// Signed by the certificate's key, but in another identity's name.
    #[error("token claims sub {sub:?} but is signed by {cert}")]
    Subject { sub: String, cert: String },
    /// The signing key is not a PKCS#8 EC P-256 key.
    #[error("signing key is not a PKCS#8 EC P-256 key: {0}")]
    Key(String),
    /// The certificate cannot be parsed or has no usable EC P-256 key.
    #[error("certificate {cert}: {reason}")]
    Certificate { cert: String, reason: String },
    /// Serialising the claims failed (should not happen).
    #[error("encoding claims: {0}")]
    Encode(String),
    /// The crypto provider refused to sign.
    #[error("signing failed")]
    Sign,
}

/// The registered claims NSM uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// SPIFFE ID of the signer.
    #[serde(default)]
    pub sub: String,
    /// SPIFFE IDs of the intended receivers. Serialised as an array; a
    /// single string is accepted when parsing (RFC 7519 §4.1.3).
    #[serde(default, deserialize_with = "string_or_array")]
    pub aud: Vec<String>,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Issued at, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
}

impl Claims {
    /// `exp` as a `SystemTime` (the epoch for negative values).
    pub fn expires(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(self.exp).unwrap_or(0))
    }
}

fn string_or_array<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Aud>::deserialize(d)? {
        None => vec![],
        Some(Aud::One(s)) => vec![s],
        Some(Aud::Many(v)) => v,
    })
}

/// A parsed signing key; parse once and reuse (parsing checks the key pair,
/// which costs a scalar multiplication).
pub struct SigningKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Parses a PKCS#8 DER EC P-256 private key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, JwtError> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
            .map_err(|e| JwtError::Key(e.to_string()))?;
        Ok(SigningKey { pair, rng })
    }

    /// The uncompressed public point (65 bytes).
    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// Signs `claims` as an ES256 JWT.
    pub fn sign(&self, claims: &Claims) -> Result<String, JwtError> {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
        let payload = serde_json::to_vec(claims).map_err(|e| JwtError::Encode(e.to_string()))?;
        let mut out = String::with_capacity(header.len() + payload.len() * 4 / 3 + 100);
        out.push_str(&header);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
        let sig = self.pair.sign(&self.rng, out.as_bytes()).map_err(|_| JwtError::Sign)?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut out);
        Ok(out)
    }
}

/// Signs `claims` with a PKCS#8 DER EC P-256 key (see [`SigningKey`] to
/// sign repeatedly with the same key).
pub fn sign_es256(pkcs8_key: &[u8], claims: &Claims) -> Result<String, JwtError> {
    SigningKey::from_pkcs8(pkcs8_key)?.sign(claims)
}

/// The three segments of a token, decoded but not verified.
#[derive(Clone, Debug)]
pub struct Parts {
    /// Header JSON.
    pub header: serde_json::Value,
    /// Claims JSON, as sent (all claims, not only [`Claims`]).
    pub payload: serde_json::Value,
    /// Raw signature bytes.
    pub signature: Vec<u8>,
    /// Length of `header.payload` in the token: the signed input.
    signed_len: usize,
}

impl Parts {
    /// `sub`, or `""` (for error messages).
    fn sub(&self) -> String {
        self.payload.get("sub").and_then(|s| s.as_str()).unwrap_or_default().to_string()
    }
}

/// Splits and decodes a token without verifying it.
pub fn decode_parts(token: &str) -> Result<Parts, JwtError> {
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(JwtError::Malformed("expected three '.'-separated segments".into()));
    };
    let seg = |name: &str, s: &str| {
        URL_SAFE_NO_PAD.decode(s).map_err(|e| JwtError::Malformed(format!("{name} is not base64url: {e}")))
    };
    let json = |name: &str, b: Vec<u8>| {
        let v: serde_json::Value =
            serde_json::from_slice(&b).map_err(|e| JwtError::Malformed(format!("{name} is not JSON: {e}")))?;
        if !v.is_object() {
            return Err(JwtError::Malformed(format!("{name} is not a JSON object")));
        }
        Ok(v)
    };
    let header = json("header", seg("header", h)?)?;
    let payload = json("payload", seg("payload", p)?)?;
    let signature = seg("signature", s)?;
    Ok(Parts { header, payload, signature, signed_len: h.len() + 1 + p.len() })
}

/// Decodes a token without verifying it: its header and claims.
pub fn decode(token: &str) -> Result<(serde_json::Value, Claims), JwtError> {
    let parts = decode_parts(token)?;
    let claims = serde_json::from_value(parts.payload).map_err(|e| JwtError::Malformed(format!("claims: {e}")))?;
    Ok((parts.header, claims))
}

/// Verifies an ES256 token against the EC P-256 key of an X.509 certificate
/// (DER) and returns its claims. Expiry is not checked.
pub fn verify_es256(token: &str, cert_der: &[u8]) -> Result<Claims, JwtError> {
    let parts = decode_parts(token)?;
    check_alg(&parts)?;
    let (cert_name, point) = cert_public_key(cert_der)?;
    let claims = verify_parts(token, &parts, &point, &cert_name)?;
    if cert_name.starts_with("spiffe://") && claims.sub != cert_name {
        return Err(JwtError::Subject { sub: claims.sub, cert: cert_name });
    }
    Ok(claims)
}

/// [`verify_es256`] with the certificate as PEM (what policies get in
/// `input.auth_info.certificate`). The first `CERTIFICATE` block is used.
pub fn verify_es256_pem(token: &str, cert_pem: &str) -> Result<Claims, JwtError> {
    let der = pem_to_der(cert_pem)?;
    verify_es256(token, &der)
}

/// Verifies against a raw uncompressed P-256 point (65 bytes).
pub fn verify_es256_with_key(token: &str, public_point: &[u8]) -> Result<Claims, JwtError> {
    let parts = decode_parts(token)?;
    check_alg(&parts)?;
    verify_parts(token, &parts, public_point, "(raw key)")
}

fn check_alg(parts: &Parts) -> Result<(), JwtError> {
    match parts.header.get("alg").and_then(|a| a.as_str()) {
        Some(ALG_ES256) => Ok(()),
        other => Err(JwtError::Algorithm { sub: parts.sub(), alg: other.unwrap_or("<missing>").to_string() }),
    }
}

fn verify_parts(token: &str, parts: &Parts, point: &[u8], cert_name: &str) -> Result<Claims, JwtError> {
    let signed = token.as_bytes().get(..parts.signed_len).unwrap_or_default();
    let bad = || JwtError::BadSignature { sub: parts.sub(), cert: cert_name.to_string() };
    if parts.signature.len() != ES256_SIGNATURE_LEN {
        return Err(bad());
    }
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(signed, &parts.signature)
        .map_err(|_| bad())?;
    serde_json::from_value(parts.payload.clone()).map_err(|e| JwtError::Malformed(format!("claims: {e}")))
}

fn parse_cert(cert_der: &[u8]) -> Result<X509Certificate<'_>, JwtError> {
    X509Certificate::from_der(cert_der)
        .map(|(_, c)| c)
        .map_err(|e| JwtError::Certificate { cert: "<unparsable>".into(), reason: e.to_string() })
}

/// A name for a certificate in messages: its first URI SAN (the SPIFFE ID),
/// else its subject.
fn cert_name(cert: &X509Certificate<'_>) -> String {
    spiffe_id_of(cert).unwrap_or_else(|| cert.subject().to_string())
}

fn spiffe_id_of(cert: &X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|g| match g {
        GeneralName::URI(u) => Some((*u).to_string()),
        _ => None,
    })
}

/// The certificate's name for messages and its uncompressed P-256 point.
fn cert_public_key(cert_der: &[u8]) -> Result<(String, Vec<u8>), JwtError> {
    let cert = parse_cert(cert_der)?;
    let name = cert_name(&cert);
    let spki = cert.public_key();
    let fail = |reason: &str| JwtError::Certificate { cert: name.clone(), reason: reason.to_string() };
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(fail("key is not an EC key"));
    }
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if curve.as_ref() != Some(&OID_EC_P256) {
        return Err(fail("EC key is not on P-256"));
    }
    let point = spki.subject_public_key.data.to_vec();
    if point.len() != 65 || point.first() != Some(&0x04) {
        return Err(fail("EC key is not an uncompressed P-256 point"));
    }
    Ok((name, point))
}

/// The first URI SAN of a certificate (its SPIFFE ID), if any.
pub fn cert_spiffe_id(cert_der: &[u8]) -> Result<Option<String>, JwtError> {
    Ok(spiffe_id_of(&parse_cert(cert_der)?))
}

/// `notAfter` of a certificate.
pub fn cert_not_after(cert_der: &[u8]) -> Result<SystemTime, JwtError> {
    let cert = parse_cert(cert_der)?;
    let t = cert.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0)))
}

/// PEM (`-----BEGIN CERTIFICATE-----`, 64-column base64) of a DER certificate,
/// as Go's `pem.EncodeToMemory` writes it.
pub fn cert_to_pem(cert_der: &[u8]) -> String {
    let b64 = STANDARD.encode(cert_der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// DER of the first `CERTIFICATE` block of a PEM string.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, JwtError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let fail = |reason: &str| JwtError::Certificate { cert: "<PEM>".into(), reason: reason.to_string() };
    let start = pem.find(BEGIN).ok_or_else(|| fail("no BEGIN CERTIFICATE line"))? + BEGIN.len();
    let len = pem[start..].find(END).ok_or_else(|| fail("no END CERTIFICATE line"))?;
    let b64: String = pem[start..start + len].chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD.decode(b64).map_err(|e| fail(&format!("bad base64: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::security::jwt::testpki::TestPki;

    fn claims(sub: &str, aud: &[&str]) -> Claims {
        Claims {
            sub: sub.into(),
            aud: aud.iter().map(|s| s.to_string()).collect(),
            exp: 2_000_000_000,
            iat: Some(1_700_000_000),
        }
    }

    fn tamper_segment(token: &str, i: usize, f: impl Fn(&mut Vec<u8>)) -> String {
        let mut segs: Vec<String> = token.split('.').map(str::to_string).collect();
        let mut raw = URL_SAFE_NO_PAD.decode(&segs[i]).unwrap();
        f(&mut raw);
        segs[i] = URL_SAFE_NO_PAD.encode(raw);
        segs.join(".")
    }

    #[test]
    fn round_trip_and_structure() {
        let pki = TestPki::new();
        let a = pki.svid("spiffe://test.local/a");
        let c = claims("spiffe://test.local/a", &["spiffe://test.local/b"]);
        let t = sign_es256(&a.private_key_pkcs8, &c).unwrap();
        assert_eq!(verify_es256(&t, &a.cert_chain[0]).unwrap(), c);
        assert_eq!(verify_es256_pem(&t, &cert_to_pem(&a.cert_chain[0])).unwrap(), c);
        // Structure: three segments, header fields, 64-byte R||S.
        let parts = decode_parts(&t).unwrap();
        assert_eq!(t.split('.').count(), 3);
        assert_eq!(parts.header, serde_json::json!({"alg": "ES256", "typ": "JWT"}));
        assert_eq!(parts.signature.len(), ES256_SIGNATURE_LEN);
        assert!(parts.payload["aud"].is_array(), "aud is an array on the wire");
        assert!(!t.contains('='), "no base64 padding");
        let (h, c2) = decode(&t).unwrap();
        assert_eq!(h["alg"], "ES256");
        assert_eq!(c2, c);
    }

    #[test]
    fn aud_string_is_accepted() {
        let c: Claims = serde_json::from_str(r#"{"sub":"x","aud":"y","exp":5}"#).unwrap();
        assert_eq!(c.aud, vec!["y".to_string()]);
        let c: Claims = serde_json::from_str(r#"{"sub":"x","exp":5}"#).unwrap();
        assert!(c.aud.is_empty());
        assert!(c.iat.is_none());
    }

    #[test]
    fn tampering_fails() {
        let pki = TestPki::new();
        let a = pki.svid("spiffe://test.local/a");
        let t = sign_es256(&a.private_key_pkcs8, &claims("spiffe://test.local/a", &["b"])).unwrap();
        let payload = tamper_segment(&t, 1, |p| {
            let s = String::from_utf8(p.clone()).unwrap().replace("test.local/a", "test.local/z");
            *p = s.into_bytes();
        });
        let e = verify_es256(&payload, &a.cert_chain[0]).unwrap_err();
        assert!(matches!(e, JwtError::BadSignature { ref sub, .. } if sub == "spiffe://test.local/z"), "{e}");
        let sig = tamper_segment(&t, 2, |s| s[10] ^= 1);
        assert!(matches!(verify_es256(&sig, &a.cert_chain[0]), Err(JwtError::BadSignature { .. })));
        let short = tamper_segment(&t, 2, |s| s.truncate(63));
        assert!(matches!(verify_es256(&short, &a.cert_chain[0]), Err(JwtError::BadSignature { .. })));
        assert!(matches!(verify_es256("a.b", &a.cert_chain[0]), Err(JwtError::Malformed(_))));
        assert!(matches!(verify_es256(&format!("{t}.x"), &a.cert_chain[0]), Err(JwtError::Malformed(_))));
    }

    #[test]
    fn wrong_key_or_cert_fails() {
        let pki = TestPki::new();
        let a = pki.svid("spiffe://test.local/a");
        let b = pki.svid("spiffe://test.local/b");
        let t = sign_es256(&a.private_key_pkcs8, &claims("spiffe://test.local/a", &[])).unwrap();
        let e = verify_es256(&t, &b.cert_chain[0]).unwrap_err();
        assert!(e.to_string().contains("spiffe://test.local/b"), "names the certificate: {e}");
        // Same SPIFFE ID, different key (another CA, another cert).
        let other = TestPki::new().svid("spiffe://test.local/a");
        assert!(matches!(verify_es256(&t, &other.cert_chain[0]), Err(JwtError::BadSignature { .. })));
        let k = SigningKey::from_pkcs8(&a.private_key_pkcs8).unwrap();
        assert!(verify_es256_with_key(&t, k.public_key()).is_ok());
    }

    #[test]
    fn a_token_in_another_identitys_name_is_refused() {
        let pki = TestPki::new();
        let a = pki.svid("spiffe://test.local/a");
        // Signed with a's own key, but claiming to be v.
        let t = sign_es256(&a.private_key_pkcs8, &claims("spiffe://test.local/v", &[])).unwrap();
        let e = verify_es256(&t, &a.cert_chain[0]).unwrap_err();
        assert!(matches!(e, JwtError::Subject { .. }), "{e}");
        assert!(
            e.to_string().contains("spiffe://test.local/v") && e.to_string().contains("spiffe://test.local/a"),
            "{e}"
        );
    }

    #[test]
    fn alg_none_and_others_are_refused() {
        let pki = TestPki::new();
        let a = pki.svid("spiffe://test.local/a");
        let t = sign_es256(&a.private_key_pkcs8, &claims("spiffe://test.local/a", &[])).unwrap();
        for alg in [r#"{"alg":"none"}"#, r#"{"alg":"HS256","typ":"JWT"}"#, r#"{"typ":"JWT"}"#] {
            let mut segs: Vec<&str> = t.split('.').collect();
            let h = URL_SAFE_NO_PAD.encode(alg);
            segs[0] = &h;
            let forged = segs.join(".");
            let e = verify_es256(&forged, &a.cert_chain[0]).unwrap_err();
            assert!(matches!(e, JwtError::Algorithm { .. }), "{alg}: {e}");
            let unsigned = format!("{}.{}.", h, t.split('.').nth(1).unwrap());
            assert!(verify_es256(&unsigned, &a.cert_chain[0]).is_err());
        }
    }

    #[test]
    fn certificate_helpers() {
        let pki = TestPki::new();
        let a = pki.svid("spiffe://test.local/a");
        let der = &a.cert_chain[0];
        assert_eq!(pem_to_der(&cert_to_pem(der)).unwrap(), *der);
        assert_eq!(cert_spiffe_id(der).unwrap().as_deref(), Some("spiffe://test.local/a"));
        let na = cert_not_after(der).unwrap();
        let want = a.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(na.duration_since(UNIX_EPOCH).unwrap().as_secs(), want);
        assert!(matches!(verify_es256("x.y.z", b"not a cert"), Err(JwtError::Malformed(_))));
        let t = sign_es256(&a.private_key_pkcs8, &claims("s", &[])).unwrap();
        assert!(matches!(verify_es256(&t, b"not a cert"), Err(JwtError::Certificate { .. })));
        assert!(matches!(SigningKey::from_pkcs8(b"junk"), Err(JwtError::Key(_))));
    }
}

/// Test PKI: a CA and CA-signed P-256 leaves with a SPIFFE ID URI SAN.
#[cfg(test)]
pub(crate) mod testpki {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

    use crate::security::Svid;

    /// A throwaway CA.
    pub(crate) struct TestPki {
        issuer: Issuer<'static, KeyPair>,
    }

    fn odt(t: SystemTime) -> time::OffsetDateTime {
        let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap()
    }

    impl TestPki {
        pub(crate) fn new() -> TestPki {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = odt(SystemTime::now() - Duration::from_secs(3600));
            params.not_after = odt(SystemTime::now() + Duration::from_secs(86400));
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            TestPki { issuer: Issuer::new(params, key) }
        }

        /// A leaf for `spiffe_id`, valid for an hour.
        pub(crate) fn svid(&self, spiffe_id: &str) -> Svid {
            self.svid_until(spiffe_id, SystemTime::now() + Duration::from_secs(3600))
        }

        /// A leaf for `spiffe_id` expiring at `not_after` (whole seconds).
        pub(crate) fn svid_until(&self, spiffe_id: &str, not_after: SystemTime) -> Svid {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.not_before = odt(SystemTime::now() - Duration::from_secs(60));
            let na = odt(not_after);
            params.not_after = na;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            Svid {
                spiffe_id: spiffe_id.to_string(),
                cert_chain: vec![cert.der().to_vec()],
                private_key_pkcs8: key.serialize_der(),
                not_after: UNIX_EPOCH + Duration::from_secs(na.unix_timestamp() as u64),
            }
        }
    }

    /// The peer a TLS handshake with the holder of `s` yields.
    pub(crate) fn peer_of(s: &Svid) -> crate::networkservice::chain::Peer {
        crate::networkservice::chain::Peer {
            spiffe_id: Some(s.spiffe_id.clone()),
            cert_der: Some(std::sync::Arc::new(s.cert_chain[0].clone())),
            ..Default::default()
        }
    }

    /// Now in Unix seconds, as JWT claims carry it.
    pub(crate) fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }
}
