//! The connection's IP context applied to one end of a wire, the same way
//! for every kind of wire (veth, VXLAN, WireGuard): the end's addresses, the
//! routes towards the other end, and on the client end the ping group range.
//!
//! # Guarantees
//! - A malformed address in `src_ip_addrs`/`dst_ip_addrs` is
//!   `InvalidArgument` naming the field and the value, on every path,
//!   before anything is applied ([`addresses`]).
//! - The client end gets `src_ip_addrs`, link routes to the endpoint's
//!   addresses and `src_routes` (next hop: the endpoint's address); the
//!   endpoint end the mirror image (`dst_ip_addrs`, `dst_routes`).
//! - Applying is idempotent: addresses and NSM's routes are converged to
//!   exactly the wanted set (see [`crate::kernel`]).

use nsm_api::connectioncontext::IpContext;
use nsm_api::ext::Cidr;
use nsm_sdk::tools::netns::NetnsHandle;
use tonic::Status;

use crate::kernel as k;

/// Which end of a wire an interface is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// In the client's netns.
    Client,
    /// In the endpoint's netns.
    Endpoint,
}

/// The addresses of `end` itself.
pub fn addresses(ip: &IpContext, end: End) -> Result<Vec<Cidr>, Status> {
    match end {
        End::Client => parse_addrs(&ip.src_ip_addrs, "src_ip_addrs"),
        End::Endpoint => parse_addrs(&ip.dst_ip_addrs, "dst_ip_addrs"),
    }
}

/// The addresses of the end opposite `end`.
pub fn peer_addresses(ip: &IpContext, end: End) -> Result<Vec<Cidr>, Status> {
    addresses(ip, if end == End::Client { End::Endpoint } else { End::Client })
}

/// Checks both address lists of `ip` (call before building anything).
pub fn validate(ip: &IpContext) -> Result<(), Status> {
    addresses(ip, End::Client)?;
    addresses(ip, End::Endpoint)?;
    Ok(())
}

fn parse_addrs(v: &[String], field: &str) -> Result<Vec<Cidr>, Status> {
    v.iter()
        .map(|s| {
            Cidr::parse(s).ok_or_else(|| {
                Status::invalid_argument(format!("IP context: {field} entry {s:?} is not <address>/<prefix length>"))
            })
        })
        .collect()
}

/// Applies `ip` to interface `ifname` in `ns`, which is the `end` of the
/// wire (see the module docs).
pub async fn apply(ns: &NetnsHandle, ifname: &str, ip: &IpContext, end: End) -> Result<(), Status> {
    let own = addresses(ip, end)?;
    k::apply_addresses(ns, ifname, &own).await?;
    let mut routes = match end {
        End::Client => ip.dst_ip_routes(),
        End::Endpoint => ip.src_ip_routes(),
    };
    routes.extend(match end {
        End::Client => ip.src_routes_with_explicit_next_hop(),
        End::Endpoint => ip.dst_routes_with_explicit_next_hop(),
    });
    k::apply_routes(ns, ifname, &routes).await?;
    if end == End::Client {
        k::open_ping_group_range(ns).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_addresses_are_named() {
        let ip = IpContext {
            src_ip_addrs: vec!["10.0.0.2/32".into()],
            dst_ip_addrs: vec!["10.0.0.256/32".into()],
            ..Default::default()
        };
        assert_eq!(addresses(&ip, End::Client).unwrap().len(), 1);
        let e = validate(&ip).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("dst_ip_addrs entry \"10.0.0.256/32\""), "{}", e.message());
        assert_eq!(peer_addresses(&ip, End::Endpoint).unwrap()[0].to_string(), "10.0.0.2/32");
    }
}
