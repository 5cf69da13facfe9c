//! Mechanism-independent plumbing for tunnel devices (VXLAN, WireGuard TUN):
//! moving a device from the node's namespace into a pod's, static
//! neighbours, the underlay MTU and finding our devices by alias.
//!
//! # Guarantees
//! - [`move_and_rename`] sends **one** `RTM_SETLINK` carrying
//!   `IFLA_NET_NS_FD` and `IFLA_IFNAME` (what `ip link set X netns Y name Z`
//!   sends). The device keeps its sockets in the node namespace (for VXLAN
//!   `ip -d link` in the pod shows `link-netns <node>`).
//! - On error the device is either still in `from` under its old name
//!   (nothing moved, or the move was rolled back) or deleted (a failure after
//!   the move, or a failed roll-back); it is never left half-configured in
//!   `to`. So the caller's cleanup is always "delete `name` in `from`".
//! - Ownership by alias, as in the rest of [`kernel`](super): an interface
//!   whose alias is neither ours nor empty is never moved, renamed or
//!   deleted ([`KernelError::NameTaken`]).
//!
//! # Kernel behaviour (checked on Linux 6.18)
//! - Move and rename in one request are **not atomic**. The kernel moves the
//!   device under its current name and renames it afterwards; the new name
//!   is used for the move only when the current name is taken in the target.
//!   If `new_name` is taken in the target, the device therefore ends up in
//!   the target under its old name and the request fails with EEXIST. Hence
//!   [`move_and_rename`] checks `new_name` first, and on a failed request
//!   moves the device back (or deletes it).
//! - The alias (`IFLA_IFALIAS`) survives the move; it is set again anyway
//!   in the same request that brings the device up.
//! - The ifindex is kept when it is free in the target namespace and
//!   reassigned otherwise; the returned index is the one in `to`.
//! - A moved device is down in the target (the kernel closes it to move
//!   it). Bringing it up again re-binds a VXLAN device's UDP socket in its
//!   link-netns (the node), so a port taken meanwhile shows up here as
//!   [`KernelError::PortInUse`].

use std::net::IpAddr;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::NeighbourState;
use nsm_sdk::tools::netns::NetnsHandle;
use rtnetlink::LinkUnspec;

use super::vxlan::{EADDRINUSE, fmt_mac, vxlan_port};
use super::{
    EEXIST, KernelError, LinkInfo, del_index, errno_of, get_link, get_link_message, remove_after_failure,
    validate_alias, validate_ifname,
};

/// Moves `name` from `from` into `to`, renaming it `new_name` in the same
/// `RTM_SETLINK`, then sets `alias` and brings it up in `to`. Returns its
/// ifindex in `to`.
///
/// - `name` must carry `alias` or no alias at all (a device just created by
///   a library that cannot set aliases, e.g. a TUN); another alias ⇒
///   [`KernelError::NameTaken`] naming `from`.
/// - `new_name` taken in `to` by a link with another alias ⇒
///   [`KernelError::NameTaken`] naming `to`; the device stays in `from`.
/// - `new_name` already in `to` with our alias while `name` is still in
///   `from`: the one in `to` is a leftover of an earlier attempt and is
///   deleted, then the move proceeds.
/// - Idempotent: `name` absent from `from` and `new_name` in `to` with our
///   alias ⇒ it is brought up and its index returned.
/// - `name` absent from `from` and `new_name` absent from `to` ⇒
///   [`KernelError::LinkNotFound`] naming `from`.
pub async fn move_and_rename(
    from: &NetnsHandle,
    name: &str,
    to: &NetnsHandle,
    new_name: &str,
    alias: &str,
) -> Result<u32, KernelError> {
    validate_ifname(name)?;
    validate_ifname(new_name)?;
    validate_alias(new_name, alias)?;
    let same_ns = from == to;
    let nl_from = from.netlink().await?;
    let nl_to = if same_ns { nl_from.clone() } else { to.netlink().await? };

    let src = get_link(&nl_from, from, name).await?;
    let dst = if same_ns && name == new_name { src.clone() } else { get_link(&nl_to, to, new_name).await? };
    let taken = |ns: &NetnsHandle, n: &str, i: &LinkInfo| KernelError::NameTaken {
        netns: ns.describe().to_string(),
        name: n.to_string(),
        alias_found: i.alias.clone(),
    };

    let Some(src) = src else {
        return match dst {
            Some(d) if d.alias == alias => {
                bring_up(&nl_to, to, new_name, d.index, alias, from).await?;
                Ok(d.index)
            }
            Some(d) => Err(taken(to, new_name, &d)),
            None => Err(KernelError::LinkNotFound { netns: from.describe().to_string(), name: name.to_string() }),
        };
    };
    if !src.alias.is_empty() && src.alias != alias {
        return Err(taken(from, name, &src));
    }
    if same_ns && name == new_name {
        bring_up(&nl_to, to, new_name, src.index, alias, from).await?;
        return Ok(src.index);
    }
    match dst {
        Some(d) if d.alias == alias => {
            tracing::info!(
                netns = to.describe(),
                name = new_name,
                alias,
                "deleting our leftover interface before moving the new one in"
            );
            del_index(&nl_to, to, new_name, d.index).await?;
        }
        Some(d) => return Err(taken(to, new_name, &d)),
        None => {}
    }

    // One RTM_SETLINK: IFLA_NET_NS_FD + IFLA_IFNAME. `to` stays borrowed (so
    // its fd stays open) until the request is acknowledged.
    let mut msg = LinkUnspec::new_with_index(src.index).name(new_name.to_string());
    if !same_ns {
        msg = msg.setns_by_fd(to.as_fd().as_raw_fd());
    }
    if let Err(e) = nl_from.link().set(msg.build()).execute().await {
        let errno = errno_of(&e);
        if !same_ns {
            roll_back(&nl_from, from, &nl_to, to, name, &src).await;
        }
        if errno == Some(EEXIST)
            && let Some(d) = get_link(&nl_to, to, new_name).await?
        {
            return Err(taken(to, new_name, &d));
        }
        let op = format!("moving into {} as {new_name}", to.describe());
        return Err(KernelError::netlink(op, from, name, e));
    }

    let result = async {
        let moved = get_link(&nl_to, to, new_name).await?.ok_or_else(|| KernelError::LinkNotFound {
            netns: to.describe().to_string(),
            name: new_name.to_string(),
        })?;
        bring_up(&nl_to, to, new_name, moved.index, alias, from).await?;
        Ok::<u32, KernelError>(moved.index)
    }
    .await;
    if result.is_err() {
        // Ours now (it carries our alias or none): remove it rather than
        // leave a half-configured interface in the pod.
        remove_after_failure(&nl_to, to, new_name, |i| i.alias.is_empty() || i.alias == alias).await;
    }
    let index = result?;
    tracing::debug!(from = from.describe(), to = to.describe(), name, new_name, index, "moved and renamed interface");
    Ok(index)
}

/// After a failed move+rename request: if the device left `from`, it sits
/// in `to` under its old name (the kernel moved it, then failed to rename
/// it). Move it back, or delete it if that fails.
async fn roll_back(
    nl_from: &rtnetlink::Handle,
    from: &NetnsHandle,
    nl_to: &rtnetlink::Handle,
    to: &NetnsHandle,
    name: &str,
    src: &LinkInfo,
) {
    match get_link(nl_from, from, name).await {
        Ok(Some(_)) => return,
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell whether a failed move left the interface behind");
            return;
        }
    }
    let stray = match get_link(nl_to, to, name).await {
        Ok(Some(i)) if i.alias == src.alias && i.kind == src.kind => i,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for the interface a failed move left behind");
            return;
        }
    };
    let back =
        LinkUnspec::new_with_index(stray.index).name(name.to_string()).setns_by_fd(from.as_fd().as_raw_fd()).build();
    match nl_to.link().set(back).execute().await {
        Ok(()) => {
            tracing::info!(
                from = from.describe(),
                to = to.describe(),
                name,
                "moved the interface back after a failed rename"
            )
        }
        Err(e) => {
            tracing::warn!(
                error = %KernelError::netlink("moving back after a failed rename", to, name, e),
                "deleting the interface instead"
            );
            if let Err(de) = del_index(nl_to, to, name, stray.index).await {
                tracing::warn!(error = %de, "could not remove the interface left behind by a failed move");
            }
        }
    }
}

/// Sets `alias` and `IFF_UP` in one `RTM_SETLINK` in `ns`. EADDRINUSE on a
/// VXLAN device becomes [`KernelError::PortInUse`] naming `socket_ns`.
async fn bring_up(
    nl: &rtnetlink::Handle,
    ns: &NetnsHandle,
    name: &str,
    index: u32,
    alias: &str,
    socket_ns: &NetnsHandle,
) -> Result<(), KernelError> {
    let msg = LinkUnspec::new_with_index(index).alias(alias.to_string()).up().build();
    let Err(e) = nl.link().set(msg).execute().await else { return Ok(()) };
    if errno_of(&e) == Some(EADDRINUSE)
        && let Ok(Some(m)) = get_link_message(nl, ns, name).await
        && let Some(port) = vxlan_port(&m)
    {
        return Err(KernelError::PortInUse { netns: socket_ns.describe().to_string(), name: name.to_string(), port });
    }
    Err(KernelError::netlink("setting alias and up", ns, name, e))
}

/// Adds (or replaces) a permanent neighbour entry `ip lladdr mac` on
/// `ifname` in `ns`: for IP payload over an L2 tunnel, so the peer's MAC
/// needs no ARP / neighbour discovery. Repeating it changes nothing.
pub async fn set_neighbor(ns: &NetnsHandle, ifname: &str, ip: IpAddr, mac: [u8; 6]) -> Result<(), KernelError> {
    validate_ifname(ifname)?;
    let nl = ns.netlink().await?;
    let link = get_link(&nl, ns, ifname)
        .await?
        .ok_or_else(|| KernelError::LinkNotFound { netns: ns.describe().to_string(), name: ifname.to_string() })?;
    nl.neighbours()
        .add(link.index, ip)
        .link_layer_address(&mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            KernelError::netlink(format!("adding permanent neighbour {ip} lladdr {}", fmt_mac(&mac)), ns, ifname, e)
        })
}

/// The MTU of the interface in `node` that has the address `ip` (the
/// underlay of a tunnel whose local IP is `ip`).
/// [`KernelError::UnderlayNotFound`] naming `ip` if no interface has it.
pub async fn underlay_mtu(node: &NetnsHandle, ip: IpAddr) -> Result<u32, KernelError> {
    let nl = node.netlink().await?;
    let dump = nl.address().get().execute();
    let addrs: Vec<AddressMessage> = dump
        .try_collect()
        .await
        .map_err(|e| KernelError::netlink(format!("listing addresses to find {ip}"), node, "(all)", e))?;
    let has_ip = |m: &AddressMessage| {
        m.attributes.iter().any(|a| match a {
            AddressAttribute::Local(x) | AddressAttribute::Address(x) => *x == ip,
            _ => false,
        })
    };
    let Some(index) = addrs.iter().find(|m| has_ip(m)).map(|m| m.header.index) else {
        return Err(KernelError::UnderlayNotFound { netns: node.describe().to_string(), ip });
    };
    let shown = format!("ifindex {index} (has {ip})");
    let m = nl
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(|e| KernelError::netlink("looking up", node, &shown, e))?
        .ok_or_else(|| KernelError::LinkNotFound { netns: node.describe().to_string(), name: shown.clone() })?;
    LinkInfo::from_message(&m)
        .mtu
        .ok_or_else(|| KernelError::LinkNotFound { netns: node.describe().to_string(), name: shown })
}

/// Links in `ns` whose alias starts with `alias_prefix`, as
/// `(name, alias, index, kind)`. Links without an alias are never listed
/// (an empty prefix lists every aliased link). For orphan sweeps.
pub async fn links_with_alias_prefix(
    ns: &NetnsHandle,
    alias_prefix: &str,
) -> Result<Vec<(String, String, u32, Option<String>)>, KernelError> {
    let nl = ns.netlink().await?;
    let dump = nl.link().get().execute();
    let links: Vec<LinkMessage> =
        dump.try_collect().await.map_err(|e| KernelError::netlink("listing links", ns, "(all)", e))?;
    Ok(links
        .iter()
        .filter_map(|m| {
            let info = LinkInfo::from_message(m);
            if info.alias.is_empty() || !info.alias.starts_with(alias_prefix) {
                return None;
            }
            let name = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })?;
            Some((name, info.alias, info.index, info.kind))
        })
        .collect())
}

/// Sets the alias of `ifname` in `ns` (the ownership mark of an interface
/// created in place, e.g. a TUN opened inside the pod).
pub async fn set_alias(ns: &NetnsHandle, ifname: &str, alias: &str) -> Result<(), KernelError> {
    validate_alias(ifname, alias)?;
    let nl = ns.netlink().await?;
    let info = get_link(&nl, ns, ifname)
        .await?
        .ok_or_else(|| KernelError::LinkNotFound { netns: ns.describe().to_string(), name: ifname.to_string() })?;
    let msg = rtnetlink::LinkUnspec::new_with_index(info.index).alias(alias.to_string()).build();
    nl.link().set(msg).execute().await.map_err(|e| KernelError::netlink("setting the alias", ns, ifname, e))
}
