//! Routes out of an interface, converged to a wanted set.
//!
//! Each route is sent as `RTM_NEWROUTE` with `NLM_F_CREATE|NLM_F_REPLACE`
//! in the main table, tagged with our own route protocol [`RTPROT_NSM`]
//! (`ip route show proto 110`), so repeating it changes nothing. Our routes
//! out of the interface that are no longer wanted (an endpoint changed its
//! routes between refreshes) are deleted; routes of any other protocol (the
//! kernel's for addresses, an application's or a network manager's static
//! ones) are left alone. Deleting the interface removes all of its routes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope};
use nsm_api::ext::ResolvedRoute;
use nsm_sdk::tools::netns::NetnsHandle;
use rtnetlink::RouteMessageBuilder;

use super::{EEXIST, ESRCH, KernelError, errno_of, get_link, validate_ifname};

/// The main routing table.
const RT_TABLE_MAIN: u8 = 254;

/// The route protocol NSM's routes carry (unassigned in iproute2's
/// `rt_protos`), which tells them apart from everyone else's.
pub const RTPROT_NSM: u8 = 110;

/// Makes NSM's routes out of `ifname` in `ns` exactly `routes`: missing
/// ones are added, stale ones deleted. The prefix is masked to its network
/// address. Without next hop: a link-scope route via the interface; with
/// one: a universe route via that gateway, flagged `onlink` (the gateway
/// need not be inside any prefix on the interface).
pub async fn apply_routes(ns: &NetnsHandle, ifname: &str, routes: &[ResolvedRoute]) -> Result<(), KernelError> {
    validate_ifname(ifname)?;
    let invalid = |r: &ResolvedRoute, reason| KernelError::InvalidRoute {
        netns: ns.describe().to_string(),
        name: ifname.to_string(),
        route: match r.next_hop {
            Some(gw) => format!("{} via {gw}", r.prefix),
            None => r.prefix.to_string(),
        },
        reason,
    };
    for r in routes {
        let max = if r.prefix.addr.is_ipv4() { 32 } else { 128 };
        if r.prefix.len > max {
            return Err(invalid(r, "the prefix length is longer than the address"));
        }
        if r.next_hop.is_some_and(|g| g.is_ipv4() != r.prefix.addr.is_ipv4()) {
            return Err(invalid(r, "the next hop is not of the prefix's address family"));
        }
    }
    let nl = ns.netlink().await?;
    let link = get_link(&nl, ns, ifname)
        .await?
        .ok_or_else(|| KernelError::LinkNotFound { netns: ns.describe().to_string(), name: ifname.to_string() })?;
    for r in routes {
        let p = r.prefix.network();
        let msg = match (p.addr, r.next_hop) {
            (IpAddr::V4(dst), gw) => {
                let b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(dst, p.len)
                    .output_interface(link.index)
                    .protocol(RouteProtocol::Other(RTPROT_NSM));
                match gw {
                    Some(IpAddr::V4(gw)) => b.gateway(gw).onlink().scope(RouteScope::Universe).build(),
                    _ => b.scope(RouteScope::Link).build(),
                }
            }
            (IpAddr::V6(dst), gw) => {
                let b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(dst, p.len)
                    .output_interface(link.index)
                    .protocol(RouteProtocol::Other(RTPROT_NSM));
                match gw {
                    Some(IpAddr::V6(gw)) => b.gateway(gw).onlink().scope(RouteScope::Universe).build(),
                    // IPv6 has no route scopes; the kernel reports universe.
                    _ => b.build(),
                }
            }
        };
        match nl.route().add(msg).replace().execute().await {
            Ok(()) => {}
            Err(e) if errno_of(&e) == Some(EEXIST) => {}
            Err(e) => {
                let what = match r.next_hop {
                    Some(gw) => format!("adding route {} via {gw} onlink", p),
                    None => format!("adding link route {}", p),
                };
                return Err(KernelError::netlink(what, ns, ifname, e));
            }
        }
    }
    let wanted: Vec<RouteKey> = routes.iter().map(|r| (r.prefix.network().addr, r.prefix.len, r.next_hop)).collect();
    let ours: Vec<RouteMessage> = nl
        .route()
        .get(RouteMessageBuilder::<IpAddr>::new().build())
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| KernelError::netlink("listing routes", ns, ifname, e))?
        .into_iter()
        .filter(|m| {
            m.header.protocol == RouteProtocol::Other(RTPROT_NSM)
                && table_of(m) == u32::from(RT_TABLE_MAIN)
                && m.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == link.index))
        })
        .collect();
    for m in ours {
        let Some(key) = key_of(&m) else { continue };
        if wanted.contains(&key) {
            continue;
        }
        match nl.route().del(m).execute().await {
            Ok(()) => {}
            Err(e) if errno_of(&e) == Some(ESRCH) => {}
            Err(e) => {
                return Err(KernelError::netlink(format!("deleting stale route {}/{}", key.0, key.1), ns, ifname, e));
            }
        }
        tracing::debug!(netns = ns.describe(), ifname, dst = %key.0, len = key.1, via = ?key.2, "deleted stale route");
    }
    Ok(())
}

/// `(destination, prefix length, gateway)`.
type RouteKey = (IpAddr, u8, Option<IpAddr>);

fn inet(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn key_of(m: &RouteMessage) -> Option<RouteKey> {
    let mut dst = None;
    let mut gw = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = inet(d),
            RouteAttribute::Gateway(g) => gw = inet(g),
            _ => {}
        }
    }
    let dst = dst.unwrap_or(match m.header.address_family {
        netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    Some((dst, m.header.destination_prefix_length, gw))
}

/// The table of a route (`RTA_TABLE` when present, else the header's).
fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(u32::from(m.header.table))
}
