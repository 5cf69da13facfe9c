//! Routes out of an interface, with replace semantics.
//!
//! Each route is sent as `RTM_NEWROUTE` with `NLM_F_CREATE|NLM_F_REPLACE`
//! in the main table, so repeating it changes nothing. Routes are not removed
//! here: deleting the interface removes its routes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::route::RouteScope;
use nsm_api::ext::ResolvedRoute;
use nsm_sdk::tools::netns::NetnsHandle;
use rtnetlink::RouteMessageBuilder;

use super::{EEXIST, KernelError, errno_of, get_link, validate_ifname};

/// Installs `routes` out of `ifname` in `ns`. The prefix is masked to its
/// network address. Without next hop: a link-scope route via the interface;
/// with one: a universe route via that gateway, flagged `onlink` (the
/// gateway need not be inside any prefix on the interface).
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
    if routes.is_empty() {
        return Ok(());
    }
    let nl = ns.netlink().await?;
    let link = get_link(&nl, ns, ifname)
        .await?
        .ok_or_else(|| KernelError::LinkNotFound { netns: ns.describe().to_string(), name: ifname.to_string() })?;
    for r in routes {
        let p = r.prefix.network();
        let msg = match (p.addr, r.next_hop) {
            (IpAddr::V4(dst), gw) => {
                let b =
                    RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, p.len).output_interface(link.index);
                match gw {
                    Some(IpAddr::V4(gw)) => b.gateway(gw).onlink().scope(RouteScope::Universe).build(),
                    _ => b.scope(RouteScope::Link).build(),
                }
            }
            (IpAddr::V6(dst), gw) => {
                let b =
                    RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(dst, p.len).output_interface(link.index);
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
    Ok(())
}
