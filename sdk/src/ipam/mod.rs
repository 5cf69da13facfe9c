//! IP address management for endpoints.
//!
//! - [`point2point`]: hands every connection a pair of host addresses
//!   (endpoint side and client side) from configured CIDRs (upstream
//!   `sdk:pkg/networkservice/ipam/point2pointipam`).
//!
//! # Guarantees
//! Prefix parsing here is strict: a value that is not `addr/len` or a bare
//! address is an error naming the value, never silently ignored (upstream
//! drops unparsable excluded prefixes, which can hand out an address the
//! client asked us to avoid).

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use tonic::Status;

pub mod point2point;

pub use point2point::{P2pPair, Point2PointAllocator, Point2PointIpam};

/// Why an IPAM operation failed. Every variant names the offending value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("{what} {value:?} is not an IP prefix (expected addr/len, e.g. 172.16.1.0/24)")]
    InvalidPrefix { what: &'static str, value: String },
    #[error("point-to-point IPAM needs at least one CIDR")]
    NoCidrs,
    #[error(
        "CIDR {cidr} has fewer than 2 usable addresses; a point-to-point pair needs 2 (use /31 or shorter, /127 for IPv6)"
    )]
    TooSmall { cidr: String },
    #[error("CIDRs {a} and {b} overlap")]
    Overlap { a: String, b: String },
    #[error(
        "IPAM pool {pool} has no free address pair outside the excluded prefixes [{excluded}] ({in_use} addresses in use)"
    )]
    Exhausted { pool: String, excluded: String, in_use: usize },
}

impl From<IpamError> for Status {
    fn from(e: IpamError) -> Status {
        match e {
            IpamError::Exhausted { .. } => Status::resource_exhausted(e.to_string()),
            IpamError::InvalidPrefix { .. } => Status::invalid_argument(e.to_string()),
            IpamError::NoCidrs | IpamError::TooSmall { .. } | IpamError::Overlap { .. } => {
                Status::failed_precondition(e.to_string())
            }
        }
    }
}

/// Parses `addr/len`, or a bare address as a host prefix (/32, /128).
/// Host bits are kept (`172.16.1.5/24` stays as written); callers mask as
/// needed. `what` names the value in the error (`"CIDR"`, `"excluded prefix"`).
pub fn parse_prefix(what: &'static str, s: &str) -> Result<IpNetwork, IpamError> {
    let bad = || IpamError::InvalidPrefix { what, value: s.to_string() };
    let t = s.trim();
    let (a, l) = match t.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (t, None),
    };
    let addr: IpAddr = a.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match l {
        Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => l.parse::<u8>().map_err(|_| bad())?,
        Some(_) => return Err(bad()),
        None => max,
    };
    IpNetwork::new(addr, len).map_err(|_| bad())
}

/// Parses a comma-separated CIDR list (e.g. `NSM_CIDR_PREFIX`); empty items
/// are ignored.
pub fn parse_cidr_list(s: &str) -> Result<Vec<IpNetwork>, IpamError> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty()).map(|i| parse_prefix("CIDR", i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_strictly() {
        assert_eq!(parse_prefix("CIDR", "10.0.0.0/8").unwrap().prefix(), 8);
        assert_eq!(parse_prefix("CIDR", "10.0.0.1").unwrap().prefix(), 32);
        assert_eq!(parse_prefix("CIDR", "2001:db8::/116").unwrap().prefix(), 116);
        assert_eq!(parse_prefix("CIDR", "::1").unwrap().prefix(), 128);
        for bad in ["", "10.0.0.0/33", "10.0.0.0/", "10.0.0/8", "x/8", "10.0.0.0/+8", "2001:db8::/129"] {
            let e = parse_prefix("excluded prefix", bad).unwrap_err();
            assert!(e.to_string().starts_with(&format!("excluded prefix {bad:?}")), "{e}");
        }
        assert_eq!(parse_cidr_list("10.0.0.0/24, ,fd00::/64,").unwrap().len(), 2);
        assert!(parse_cidr_list("10.0.0.0/24,nope").is_err());
    }

    #[test]
    fn status_codes() {
        let s: Status = IpamError::Exhausted { pool: "p".into(), excluded: String::new(), in_use: 2 }.into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        let s: Status = IpamError::InvalidPrefix { what: "excluded prefix", value: "x".into() }.into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
    }
}
