//! Per-hop tokens and their gRPC metadata (`nsm-client-token`,
//! `nsm-client-token-expires`).
//!
//! Every hop sends the next one a token with an expiry; the server records it
//! in the caller's path segment (`updatetoken`) and `timeout` closes a
//! connection whose caller stops refreshing before that expiry.
//!
//! Two generators implement [`TokenGenerator`]:
//! - [`ExpiryOnly`] (plaintext mode): the token string is empty and only the
//!   expiry travels. That keeps the refresh/timeout machinery real and
//!   exercised without identities.
//! - [`JwtTokens`] (SPIFFE mode): an ES256 JWT signed with the workload's
//!   X.509-SVID key (nsm-spec §2.7): `sub` = own SPIFFE ID, `aud` = [peer
//!   SPIFFE ID], `exp` = min(now + max lifetime, own SVID `notAfter`, peer
//!   certificate `notAfter`). The expiry sent next to it is exactly `exp`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::metadata::{MetadataMap, MetadataValue};

use crate::networkservice::chain::Peer;
use crate::security::jwt::{self, Claims, SigningKey};
use crate::security::{Svid, SvidSource};

/// gRPC metadata key of the per-RPC token.
pub const TOKEN_KEY: &str = "nsm-client-token";
/// gRPC metadata key of the token expiry (RFC 3339 with nanoseconds).
pub const TOKEN_EXPIRES_KEY: &str = "nsm-client-token-expires";

/// Default `NSM_MAX_TOKEN_LIFETIME`.
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

/// A token and when it expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub token: String,
    pub expires: SystemTime,
}

/// Mints the token a hop sends to (or records for) `peer`.
pub trait TokenGenerator: Send + Sync + 'static {
    /// A token for `peer`.
    fn generate(&self, peer: &Peer) -> Result<Token, tonic::Status>;
}

/// Shared generator.
pub type SharedTokenGenerator = Arc<dyn TokenGenerator>;

/// Plaintext mode: no signed token, only an expiry `lifetime` from now.
#[derive(Clone, Debug)]
pub struct ExpiryOnly {
    lifetime: Duration,
}

impl ExpiryOnly {
    /// Tokens that expire `lifetime` after they are minted.
    pub fn new(lifetime: Duration) -> Arc<ExpiryOnly> {
        Arc::new(ExpiryOnly { lifetime })
    }
}

impl TokenGenerator for ExpiryOnly {
    fn generate(&self, _peer: &Peer) -> Result<Token, tonic::Status> {
        Ok(Token { token: String::new(), expires: SystemTime::now() + self.lifetime })
    }
}

/// SPIFFE mode: ES256 JWTs signed with the current SVID's key.
///
/// # Guarantees
/// - `sub` is the SPIFFE ID of the SVID the source returns *now* (rotation
///   is picked up on the next token); `aud` is `[peer.spiffe_id]`, or the
///   URI SAN of `peer.cert_der` when only the certificate is known, or `[]`
///   when the peer is unknown.
/// - `exp` (whole seconds) = min(now + max lifetime, own SVID `notAfter`,
///   peer certificate `notAfter`); [`Token::expires`] equals `exp`.
/// - No SVID yet ⇒ `Unavailable` ("no SVID from the Workload API yet"); an
///   expired own SVID ⇒ `Unavailable`; an unparsable peer certificate ⇒
///   `Internal` naming the peer. No token is minted in these cases.
/// - The parsed signing key is cached per SVID (re-parsed after rotation).
pub struct JwtTokens {
    svids: Arc<dyn SvidSource>,
    max_lifetime: Duration,
    key: Mutex<Option<(Arc<Svid>, Arc<SigningKey>)>>,
}

impl std::fmt::Debug for JwtTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtTokens").field("max_lifetime", &self.max_lifetime).finish_non_exhaustive()
    }
}

impl JwtTokens {
    /// Tokens signed with the SVIDs of `svids`, living at most `max_lifetime`
    /// (`NSM_MAX_TOKEN_LIFETIME`, default [`DEFAULT_MAX_TOKEN_LIFETIME`]).
    pub fn new(svids: Arc<dyn SvidSource>, max_lifetime: Duration) -> Arc<JwtTokens> {
        Arc::new(JwtTokens { svids, max_lifetime, key: Mutex::new(None) })
    }

    fn signing_key(&self, svid: &Arc<Svid>) -> Result<Arc<SigningKey>, tonic::Status> {
        let mut cache = self.key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, k)) = cache.as_ref()
            && Arc::ptr_eq(s, svid)
        {
            return Ok(k.clone());
        }
        let k = Arc::new(SigningKey::from_pkcs8(&svid.private_key_pkcs8).map_err(|e| {
            tonic::Status::internal(format!("cannot sign tokens with the SVID of {}: {e}", svid.spiffe_id))
        })?);
        *cache = Some((svid.clone(), k.clone()));
        Ok(k)
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

impl TokenGenerator for JwtTokens {
    fn generate(&self, peer: &Peer) -> Result<Token, tonic::Status> {
        let now = SystemTime::now();
        // Sign with the SVID the peer saw on this connection while it is
        // valid (the peer verifies against that certificate); else the
        // current one.
        let svid = match peer.local_svid.clone().filter(|s| s.not_after > now) {
            Some(s) => s,
            None => self
                .svids
                .svid()
                .ok_or_else(|| tonic::Status::unavailable("no SVID from the Workload API yet: cannot mint a token"))?,
        };
        if svid.not_after <= now {
            return Err(tonic::Status::unavailable(format!(
                "own SVID {} expired at {}: cannot mint a token",
                svid.spiffe_id,
                humantime::format_rfc3339_seconds(svid.not_after)
            )));
        }
        let mut exp = (now + self.max_lifetime).min(svid.not_after);
        let mut aud = peer.spiffe_id.clone();
        if let Some(der) = &peer.cert_der {
            let who = peer.spiffe_id.as_deref().unwrap_or("<unknown SPIFFE ID>");
            let bad = |e: jwt::JwtError| tonic::Status::internal(format!("certificate of peer {who}: {e}"));
            exp = exp.min(jwt::cert_not_after(der).map_err(bad)?);
            if aud.is_none() {
                aud = jwt::cert_spiffe_id(der).map_err(bad)?;
            }
        }
        let claims = Claims {
            sub: svid.spiffe_id.clone(),
            aud: aud.into_iter().collect(),
            exp: unix_secs(exp),
            iat: Some(unix_secs(now)),
        };
        let token = self
            .signing_key(&svid)?
            .sign(&claims)
            .map_err(|e| tonic::Status::internal(format!("signing a token as {}: {e}", svid.spiffe_id)))?;
        Ok(Token { token, expires: claims.expires() })
    }
}

/// Writes a token into outgoing metadata.
pub fn put(md: &mut MetadataMap, t: &Token) {
    if !t.token.is_empty()
        && let Ok(v) = MetadataValue::try_from(t.token.as_str())
    {
        md.insert(TOKEN_KEY, v);
    }
    if let Ok(v) = MetadataValue::try_from(humantime::format_rfc3339_nanos(t.expires).to_string().as_str()) {
        md.insert(TOKEN_EXPIRES_KEY, v);
    }
}

/// Reads the caller's token from incoming metadata. The expiry is required;
/// the token string may be empty (plaintext mode).
pub fn get(md: &MetadataMap) -> Option<Token> {
    let expires = md.get(TOKEN_EXPIRES_KEY)?.to_str().ok()?;
    let expires = parse_rfc3339(expires)?;
    let token = md.get(TOKEN_KEY).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    Some(Token { token, expires })
}

/// Parses RFC 3339 as Go's `time.RFC3339Nano` writes it (UTC `Z` or a
/// numeric offset).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    // humantime only understands `Z` (and silently ignores a numeric
    // offset), so split a trailing `+hh:mm` / `-hh:mm` off ourselves.
    let b = s.as_bytes();
    let n = b.len();
    let has_offset = n > 6 && (b[n - 6] == b'+' || b[n - 6] == b'-') && b[n - 3] == b':';
    if !has_offset {
        return humantime::parse_rfc3339_weak(s).ok();
    }
    let (base, off) = s.split_at(n - 6);
    let secs = off[1..3].parse::<u64>().ok()? * 3600 + off[4..6].parse::<u64>().ok()? * 60;
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    let d = Duration::from_secs(secs);
    // Local time = UTC + offset, so UTC = local - offset.
    if off.starts_with('+') { t.checked_sub(d) } else { t.checked_add(d) }
}

/// `SystemTime` to protobuf `Timestamp`.
pub fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// Protobuf `Timestamp` to `SystemTime` (`None` if out of range).
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(*ts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trip() {
        let t =
            Token { token: "abc".into(), expires: SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_789) };
        let mut md = MetadataMap::new();
        put(&mut md, &t);
        assert_eq!(md.get(TOKEN_EXPIRES_KEY).unwrap().to_str().unwrap(), "2027-01-15T08:00:00.123456789Z");
        assert_eq!(get(&md).unwrap(), t);
    }

    #[test]
    fn go_offsets_parse() {
        let z = parse_rfc3339("2026-01-01T10:00:00.5Z").unwrap();
        assert_eq!(parse_rfc3339("2026-01-01T12:00:00.5+02:00").unwrap(), z);
        assert_eq!(parse_rfc3339("2026-01-01T05:30:00.5-04:30").unwrap(), z);
        assert!(parse_rfc3339("tomorrow").is_none());
    }

    mod jwt_tokens {
        use super::super::*;
        use crate::security::jwt::testpki::{TestPki, peer_of};
        use crate::security::{StaticSvid, SvidSource};

        struct NoSvid;
        impl SvidSource for NoSvid {
            fn svid(&self) -> Option<Arc<Svid>> {
                None
            }
        }

        #[test]
        fn claims_and_expiry() {
            let pki = TestPki::new();
            let me = pki.svid("spiffe://test.local/me");
            let you = pki.svid("spiffe://test.local/you");
            let tokgen = JwtTokens::new(Arc::new(StaticSvid(Arc::new(me.clone()))), Duration::from_secs(600));
            let t = tokgen.generate(&peer_of(&you)).unwrap();
            let c = jwt::verify_es256(&t.token, &me.cert_chain[0]).unwrap();
            assert_eq!(c.sub, "spiffe://test.local/me");
            assert_eq!(c.aud, vec!["spiffe://test.local/you".to_string()]);
            assert_eq!(c.expires(), t.expires, "metadata expiry is the JWT exp");
            let life = t.expires.duration_since(SystemTime::now()).unwrap();
            assert!(life > Duration::from_secs(590) && life <= Duration::from_secs(600), "{life:?}");
            // Unknown peer: empty audience.
            let t = tokgen.generate(&Peer::default()).unwrap();
            assert!(jwt::decode(&t.token).unwrap().1.aud.is_empty());
            // Only the certificate known: aud from its URI SAN.
            let p = Peer { cert_der: Some(Arc::new(you.cert_chain[0].clone())), ..Default::default() };
            let c = jwt::decode(&tokgen.generate(&p).unwrap().token).unwrap().1;
            assert_eq!(c.aud, vec!["spiffe://test.local/you".to_string()]);
        }

        #[test]
        fn expiry_is_capped_by_both_certificates() {
            let pki = TestPki::new();
            let soon = SystemTime::now() + Duration::from_secs(120);
            let later = SystemTime::now() + Duration::from_secs(300);
            let me_short = pki.svid_until("spiffe://test.local/me", soon);
            let you = pki.svid("spiffe://test.local/you");
            let tokgen = JwtTokens::new(Arc::new(StaticSvid(Arc::new(me_short.clone()))), Duration::from_secs(600));
            assert_eq!(tokgen.generate(&peer_of(&you)).unwrap().expires, me_short.not_after);
            let me = pki.svid("spiffe://test.local/me");
            let you_short = pki.svid_until("spiffe://test.local/you", later);
            let tokgen = JwtTokens::new(Arc::new(StaticSvid(Arc::new(me))), Duration::from_secs(600));
            assert_eq!(tokgen.generate(&peer_of(&you_short)).unwrap().expires, you_short.not_after);
        }

        #[test]
        fn no_svid_is_unavailable() {
            let tokgen = JwtTokens::new(Arc::new(NoSvid), Duration::from_secs(600));
            let e = tokgen.generate(&Peer::default()).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unavailable);
            assert!(e.message().contains("no SVID from the Workload API yet"), "{}", e.message());
            let pki = TestPki::new();
            let me = pki.svid("spiffe://test.local/me");
            let tokgen = JwtTokens::new(Arc::new(StaticSvid(Arc::new(me))), Duration::from_secs(600));
            let bad = Peer { cert_der: Some(Arc::new(b"junk".to_vec())), ..Default::default() };
            assert_eq!(tokgen.generate(&bad).unwrap_err().code(), tonic::Code::Internal);
        }

        #[test]
        fn key_is_cached_per_svid() {
            let pki = TestPki::new();
            let src = Arc::new(StaticSvid(Arc::new(pki.svid("spiffe://test.local/me"))));
            let tokgen = JwtTokens::new(src.clone(), Duration::from_secs(60));
            tokgen.generate(&Peer::default()).unwrap();
            let k1 = tokgen.key.lock().unwrap().as_ref().unwrap().1.clone();
            tokgen.generate(&Peer::default()).unwrap();
            let k2 = tokgen.key.lock().unwrap().as_ref().unwrap().1.clone();
            assert!(Arc::ptr_eq(&k1, &k2));
            let _ = src.svid();
        }
    }

    #[test]
    fn missing_expiry_is_none() {
        let mut md = MetadataMap::new();
        md.insert(TOKEN_KEY, MetadataValue::from_static("x"));
        assert!(get(&md).is_none());
    }
}
