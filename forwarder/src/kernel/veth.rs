//! Veth pairs created in place.
//!
//! One `RTM_NEWLINK` is sent on a netlink socket in the forwarder's own
//! namespace. It carries `IFLA_NET_NS_FD` for end A on the link itself and
//! `IFLA_NET_NS_FD` for end B inside the veth peer info, so the kernel creates
//! each end directly in its target namespace under its final name (nothing
//! is created in the forwarder's namespace and then moved or renamed).
//!
//! The kernel ignores `IFLA_IFALIAS` at creation time, so the aliases (which
//! mark the interfaces as ours) are set right after, in each namespace,
//! together with `IFF_UP` for the peer (a peer marked up in the creation
//! request fails with ENOTCONN: it is opened before the two ends are linked). If
//! that or any later step fails, the pair is deleted before the error is
//! returned. A crash exactly between creation and aliasing leaves ends
//! without alias; a retry then reports [`KernelError::NameTaken`] with an
//! empty alias rather than guessing they are ours.

use std::os::fd::AsRawFd;

use netlink_packet_route::link::{InfoData, InfoVeth};
use nsm_sdk::tools::netns::NetnsHandle;
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};

use super::{EEXIST, KernelError, LinkInfo, del_index, errno_of, get_link, validate_alias, validate_ifname};

/// One end of a veth pair: where it lives, its name and the alias that
/// marks it as ours.
#[derive(Clone, Debug)]
pub struct VethEnd {
    pub netns: NetnsHandle,
    pub name: String,
    pub alias: String,
    pub mtu: Option<u32>,
}

/// The ifindexes of both ends, each in its own namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VethPair {
    pub a_index: u32,
    pub b_index: u32,
}

/// Creates (or finds) the veth pair `a`–`b`, each end directly in its
/// namespace, with its alias, MTU (if given) and up.
///
/// - Both ends already present with our aliases and peered with each other:
///   returned unchanged apart from making sure they are up and have the MTU.
/// - Either name present with another alias: [`KernelError::NameTaken`],
///   nothing touched.
/// - Only one end present with our alias (an earlier attempt half done), or
///   both ours but not each other's peer: deleted and recreated.
pub async fn ensure_veth_pair(a: &VethEnd, b: &VethEnd) -> Result<VethPair, KernelError> {
    validate_ifname(&a.name)?;
    validate_ifname(&b.name)?;
    validate_alias(&a.name, &a.alias)?;
    validate_alias(&b.name, &b.alias)?;
    if a.netns == b.netns && a.name == b.name {
        return Err(KernelError::InvalidName {
            name: a.name.clone(),
            rule: "both veth ends would have this name in the same namespace",
        });
    }
    let nla = a.netns.netlink().await?;
    let nlb = b.netns.netlink().await?;

    let ia = owned(&nla, a).await?;
    let ib = owned(&nlb, b).await?;
    match (ia, ib) {
        (Some(ia), Some(ib)) if are_peers(&ia, &ib) => {
            return finish(&nla, &nlb, a, b, &ia, &ib).await;
        }
        (ia, ib) => {
            // Leftovers of an earlier attempt, all carrying our aliases.
            if let Some(ia) = ia {
                tracing::info!(netns = a.netns.describe(), name = a.name, "deleting half-created veth end");
                del_index(&nla, &a.netns, &a.name, ia.index).await?;
            }
            if let Some(ib) = ib {
                tracing::info!(netns = b.netns.describe(), name = b.name, "deleting half-created veth end");
                del_index(&nlb, &b.netns, &b.name, ib.index).await?;
            }
        }
    }

    let own = NetnsHandle::current()?;
    let nl_own = own.netlink().await?;
    let mut peer =
        LinkMessageBuilder::<LinkUnspec>::new().name(b.name.clone()).setns_by_fd(b.netns.as_fd().as_raw_fd());
    if let Some(m) = b.mtu {
        peer = peer.mtu(m);
    }
    // Not `up` here: the kernel configures the peer before linking the two
    // ends, and opening a veth without its peer fails with ENOTCONN. The peer
    // is set up together with its alias below.
    let peer = peer.build();
    let mut msg = LinkVeth::new(&a.name, &b.name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .setns_by_fd(a.netns.as_fd().as_raw_fd());
    if let Some(m) = a.mtu {
        msg = msg.mtu(m);
    }
    let msg = msg.up().build();
    // The namespace files stay open (borrowed from `a` and `b`) until the
    // request is acknowledged, so the fds in the message stay valid.
    if let Err(e) = nl_own.link().add(msg).execute().await {
        if errno_of(&e) == Some(EEXIST) {
            // Someone created one of the names since we looked.
            let ia = owned(&nla, a).await?;
            let ib = owned(&nlb, b).await?;
            if let (Some(ia), Some(ib)) = (ia, ib)
                && are_peers(&ia, &ib)
            {
                return finish(&nla, &nlb, a, b, &ia, &ib).await;
            }
        }
        let op = format!("creating veth pair with peer {} in {}", b.name, b.netns.describe());
        return Err(KernelError::netlink(op, &a.netns, &a.name, e));
    }

    let result = async {
        let ia = get_link(&nla, &a.netns, &a.name)
            .await?
            .ok_or_else(|| KernelError::LinkNotFound { netns: a.netns.describe().to_string(), name: a.name.clone() })?;
        let ib = get_link(&nlb, &b.netns, &b.name)
            .await?
            .ok_or_else(|| KernelError::LinkNotFound { netns: b.netns.describe().to_string(), name: b.name.clone() })?;
        set_alias_up(&nla, &a.netns, &a.name, ia.index, &a.alias).await?;
        set_alias_up(&nlb, &b.netns, &b.name, ib.index, &b.alias).await?;
        Ok::<_, KernelError>(VethPair { a_index: ia.index, b_index: ib.index })
    }
    .await;
    match result {
        Ok(p) => {
            tracing::debug!(
                a = a.name,
                a_netns = a.netns.describe(),
                b = b.name,
                b_netns = b.netns.describe(),
                "created veth pair in place"
            );
            Ok(p)
        }
        Err(e) => {
            // Deleting end A removes the pair.
            match get_link(&nla, &a.netns, &a.name).await {
                Ok(Some(i)) => {
                    if let Err(de) = del_index(&nla, &a.netns, &a.name, i.index).await {
                        tracing::warn!(error = %de, "could not remove veth pair after a failed setup");
                    }
                }
                Ok(None) => {}
                Err(de) => tracing::warn!(error = %de, "could not remove veth pair after a failed setup"),
            }
            Err(e)
        }
    }
}

/// The link named `end.name`, if it carries our alias; `NameTaken` if it
/// carries another one.
async fn owned(nl: &rtnetlink::Handle, end: &VethEnd) -> Result<Option<LinkInfo>, KernelError> {
    match get_link(nl, &end.netns, &end.name).await? {
        Some(i) if i.alias == end.alias => Ok(Some(i)),
        Some(i) => Err(KernelError::NameTaken {
            netns: end.netns.describe().to_string(),
            name: end.name.clone(),
            alias_found: i.alias,
        }),
        None => Ok(None),
    }
}

/// Both are veth and each one's `IFLA_LINK` is the other's index.
fn are_peers(a: &LinkInfo, b: &LinkInfo) -> bool {
    a.kind.as_deref() == Some("veth")
        && b.kind.as_deref() == Some("veth")
        && a.link == Some(b.index)
        && b.link == Some(a.index)
}

/// Makes existing ends up and sets the requested MTU where it differs.
async fn finish(
    nla: &rtnetlink::Handle,
    nlb: &rtnetlink::Handle,
    a: &VethEnd,
    b: &VethEnd,
    ia: &LinkInfo,
    ib: &LinkInfo,
) -> Result<VethPair, KernelError> {
    for (nl, end, info) in [(nla, a, ia), (nlb, b, ib)] {
        let index = info.index;
        let mtu = end.mtu.filter(|m| info.mtu != Some(*m));
        if info.admin_up && mtu.is_none() {
            continue;
        }
        let mut msg = LinkUnspec::new_with_index(index).up();
        if let Some(m) = mtu {
            msg = msg.mtu(m);
        }
        nl.link()
            .set(msg.build())
            .execute()
            .await
            .map_err(|e| KernelError::netlink("setting up / MTU", &end.netns, &end.name, e))?;
    }
    Ok(VethPair { a_index: ia.index, b_index: ib.index })
}

/// Sets the alias and `IFF_UP` in one `RTM_SETLINK`.
async fn set_alias_up(
    nl: &rtnetlink::Handle,
    ns: &NetnsHandle,
    name: &str,
    index: u32,
    alias: &str,
) -> Result<(), KernelError> {
    let msg = LinkUnspec::new_with_index(index).alias(alias).up().build();
    nl.link().set(msg).execute().await.map_err(|e| KernelError::netlink("setting alias and up", ns, name, e))
}
