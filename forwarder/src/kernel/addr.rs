//! Interface addresses and address-related sysctls.
//!
//! [`apply_addresses`] converges the universe-scope addresses of an
//! interface to an exact set (link-local and host-scope addresses are left
//! alone). IPv6 addresses are added with `IFA_F_NODAD`, so they are usable
//! at once (no tentative period), and `IFA_F_PERMANENT`.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope};
use nsm_api::ext::Cidr;
use nsm_sdk::tools::netns::NetnsHandle;

use super::{EADDRNOTAVAIL, EEXIST, KernelError, errno_of, get_link, set_up, validate_ifname, write_sysctl};

/// `net.ipv4.ping_group_range` value that lets every group use ICMP sockets.
pub const PING_GROUP_RANGE_ALL: &str = "0 2147483647";

/// Makes the universe-scope addresses of `ifname` in `ns` exactly `addrs`:
/// stale ones are deleted, missing ones added; the link is set up first. For
/// IPv6, `disable_ipv6` of the interface is set to 0 inside the namespace.
pub async fn apply_addresses(ns: &NetnsHandle, ifname: &str, addrs: &[Cidr]) -> Result<(), KernelError> {
    validate_ifname(ifname)?;
    for c in addrs {
        let max = if c.addr.is_ipv4() { 32 } else { 128 };
        if c.len > max {
            return Err(KernelError::InvalidAddress {
                netns: ns.describe().to_string(),
                name: ifname.to_string(),
                addr: c.to_string(),
                reason: "the prefix length is longer than the address",
            });
        }
    }
    let mut want: Vec<(IpAddr, u8)> = Vec::new();
    for c in addrs {
        if !want.contains(&(c.addr, c.len)) {
            want.push((c.addr, c.len));
        }
    }
    let nl = ns.netlink().await?;
    let link = get_link(&nl, ns, ifname)
        .await?
        .ok_or_else(|| KernelError::LinkNotFound { netns: ns.describe().to_string(), name: ifname.to_string() })?;
    set_up(&nl, ns, ifname, link.index).await?;
    if want.iter().any(|(a, _)| a.is_ipv6()) {
        write_sysctl(ns, format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"), "0").await?;
    }

    let mut deleted = false;
    for m in current(&nl, ns, ifname, link.index).await? {
        let Some(key) = key_of(&m) else { continue };
        if want.contains(&key) {
            continue;
        }
        match nl.address().del(m).execute().await {
            Ok(()) => deleted = true,
            Err(e) if errno_of(&e) == Some(EADDRNOTAVAIL) => {}
            Err(e) => return Err(KernelError::netlink("deleting a stale address", ns, ifname, e)),
        }
        tracing::debug!(netns = ns.describe(), ifname, addr = %key.0, len = key.1, "deleted stale address");
    }
    // Deleting a primary IPv4 address also deletes its secondaries (unless
    // promote_secondaries is set), so look again before adding.
    let present: Vec<(IpAddr, u8)> = if deleted || !want.is_empty() {
        current(&nl, ns, ifname, link.index).await?.iter().filter_map(key_of).collect()
    } else {
        Vec::new()
    };
    for &(addr, len) in want.iter().filter(|k| !present.contains(k)) {
        let mut req = nl.address().add(link.index, addr, len).replace();
        let msg = req.message_mut();
        let mut flags = AddressFlags::Permanent;
        let mut hflags = AddressHeaderFlags::Permanent;
        if addr.is_ipv6() {
            flags |= AddressFlags::Nodad;
            hflags |= AddressHeaderFlags::Nodad;
        }
        msg.header.flags = hflags;
        msg.attributes.push(AddressAttribute::Flags(flags));
        match req.execute().await {
            Ok(()) => {}
            Err(e) if errno_of(&e) == Some(EEXIST) => {}
            Err(e) => return Err(KernelError::netlink("adding an address", ns, ifname, e)),
        }
    }
    Ok(())
}

/// Universe-scope addresses on `index`.
async fn current(
    nl: &rtnetlink::Handle,
    ns: &NetnsHandle,
    ifname: &str,
    index: u32,
) -> Result<Vec<AddressMessage>, KernelError> {
    let all: Vec<AddressMessage> = nl
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| KernelError::netlink("listing addresses", ns, ifname, e))?;
    Ok(all.into_iter().filter(|m| m.header.scope == AddressScope::Universe).collect())
}

/// `(address, prefix length)`; for IPv4 the local address (`IFA_LOCAL`).
fn key_of(m: &AddressMessage) -> Option<(IpAddr, u8)> {
    let mut address = None;
    let mut local = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Address(x) => address = Some(*x),
            AddressAttribute::Local(x) => local = Some(*x),
            _ => {}
        }
    }
    local.or(address).map(|a| (a, m.header.prefix_len))
}

/// Writes `0 2147483647` to `net.ipv4.ping_group_range` in `ns`, so
/// unprivileged processes there can use ICMP echo sockets (`ping`).
pub async fn open_ping_group_range(ns: &NetnsHandle) -> Result<(), KernelError> {
    write_sysctl(ns, "/proc/sys/net/ipv4/ping_group_range".to_string(), PING_GROUP_RANGE_ALL).await
}
