//! Per-hop tokens and their gRPC metadata (`nsm-client-token`,
//! `nsm-client-token-expires`).
//!
//! Every hop sends the next one a token with an expiry; the server records it
//! in the caller's path segment (`updatetoken`) and `timeout` closes a
//! connection whose caller stops refreshing before that expiry.
//!
//! Until SPIFFE identity is wired in, components run with [`ExpiryOnly`]:
//! the token string is empty and only the expiry travels. That keeps the
//! refresh/timeout machinery real and exercised; the signed ES256 JWT
//! generator plugs in behind the same [`TokenGenerator`] trait.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::metadata::{MetadataMap, MetadataValue};

use crate::networkservice::chain::Peer;

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

    #[test]
    fn missing_expiry_is_none() {
        let mut md = MetadataMap::new();
        md.insert(TOKEN_KEY, MetadataValue::from_static("x"));
        assert!(get(&md).is_none());
    }
}
