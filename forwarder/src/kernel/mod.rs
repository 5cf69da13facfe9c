//! Netlink operations for the local KERNEL mechanism: veth pairs created in
//! place in the client's and endpoint's network namespaces, addresses,
//! routes and the sysctls the data path needs.
//!
//! # Guarantees
//! - Every function acts in the namespace given by its [`NetnsHandle`]
//!   argument, through a netlink socket created inside that namespace
//!   ([`NetnsHandle::netlink`]); no tokio worker thread changes namespace.
//! - Veth ends are created directly in their target namespaces with their
//!   final names ([`ensure_veth_pair`]); they never appear in the forwarder's
//!   own namespace, so no name there can collide and nothing is left behind
//!   there if the forwarder dies mid-way.
//! - Interfaces are owned through their alias (`IFLA_IFALIAS`): an interface
//!   whose alias is not ours is never modified or deleted
//!   ([`KernelError::NameTaken`]).
//! - All operations are idempotent: repeating them with the same inputs
//!   changes nothing and returns the same result.
//! - Errors name the namespace (path and inode), the interface and the
//!   kernel's errno text.

mod addr;
mod route;
pub mod tunnel;
mod veth;
pub mod vxlan;

use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage, State};
use nsm_sdk::tools::netns::{NetnsError, NetnsHandle};

pub use addr::{apply_addresses, open_ping_group_range};

/// Interface builds (the netlink work of one side of one connection) that
/// may run at once in this process. The kernel serialises most of that work
/// under RTNL anyway; letting hundreds of builds interleave only makes every
/// one of them finish late. A FIFO permit lets a burst of Requests complete
/// in arrival order instead (measured with `nsm-lab bench`).
pub static BUILD_PERMITS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
pub use route::apply_routes;
pub use tunnel::{links_with_alias_prefix, move_and_rename, set_alias, set_neighbor, underlay_mtu};
pub use veth::{VethEnd, VethPair, ensure_veth_pair};
pub use vxlan::{DEFAULT_VXLAN_PORT, VNI_MAX, VxlanSpec, create_vxlan_in, generate_vni, validate_vni};

/// Linux `IFNAMSIZ - 1`.
pub const IFNAMSIZ_MAX: usize = 15;
/// Linux `IFALIASZ - 1`.
pub const IFALIAS_MAX: usize = 255;

const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;
const ESRCH: i32 = 3;

/// Failures of kernel (netlink / sysctl) operations.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The interface name would be refused by the kernel.
    #[error("invalid interface name {name:?}: {rule}")]
    InvalidName { name: String, rule: &'static str },
    /// The alias is unusable for ownership tracking.
    #[error("invalid alias {alias:?} for interface {name}: {rule}")]
    InvalidAlias { name: String, alias: String, rule: &'static str },
    /// An address cannot be assigned as given.
    #[error("invalid address {addr} for interface {name} in {netns}: {reason}")]
    InvalidAddress { netns: String, name: String, addr: String, reason: &'static str },
    /// A route cannot be expressed (e.g. IPv4 prefix with IPv6 next hop).
    #[error("invalid route {route} out of interface {name} in {netns}: {reason}")]
    InvalidRoute { netns: String, name: String, route: String, reason: &'static str },
    /// The namespace could not be entered or a socket opened in it.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The name is in use by an interface that is not ours.
    #[error(
        "interface {name} already exists in {netns} with alias {alias_found:?}, so it belongs to someone else; \
         pick another interface name for the connection or remove the stale interface (ip link del {name})"
    )]
    NameTaken { netns: String, name: String, alias_found: String },
    /// The interface to configure does not exist.
    #[error("interface {name} not found in {netns}; check that it was created and was not deleted meanwhile")]
    LinkNotFound { netns: String, name: String },
    /// A netlink request failed.
    #[error("{op} on interface {name} in {netns} failed: {reason}")]
    Netlink {
        op: String,
        netns: String,
        name: String,
        /// Positive errno, when the kernel returned one.
        errno: Option<i32>,
        /// The errno text (or the decoding problem).
        reason: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// A VXLAN VNI outside `1..=16777215` (24 bits; 0 is reserved).
    #[error(
        "invalid VXLAN VNI {vni}: it must be in 1..=16777215 (24 bits, 0 is reserved); check the vni parameter of \
         the VXLAN mechanism"
    )]
    InvalidVni { vni: u32 },
    /// The kernel refused the VXLAN device because another VXLAN device of
    /// the same namespace already uses this VNI on this UDP port and address
    /// family (EEXIST), whatever its remote or local address, and also when
    /// that device has since been moved into another namespace.
    #[error(
        "VXLAN VNI {vni} on UDP port {port} ({family}) is already used by another VXLAN device whose socket lives \
         in {netns}, so interface {name} cannot be created; the kernel allows one device per VNI, port and address \
         family per namespace whatever its remote or local address (devices moved into pods still count); pick \
         another VNI, or find and remove the stale device (ip -d link show type vxlan, also in pod namespaces: look \
         for nsm: aliases)"
    )]
    VniInUse { netns: String, name: String, vni: u32, port: u16, family: &'static str },
    /// Bringing a tunnel up failed because its UDP port is bound by another
    /// socket (EADDRINUSE).
    #[error(
        "UDP port {port} of tunnel interface {name} is already bound by another socket in {netns} (the namespace \
         of the tunnel's UDP socket); check `ss -uanp 'sport = :{port}'` there, then free the port or configure \
         another one"
    )]
    PortInUse { netns: String, name: String, port: u16 },
    /// No interface carries the address the tunnel should use.
    #[error(
        "no interface in {netns} has the address {ip}; check the configured tunnel IP (NSM_TUNNEL_IP) and that the \
         forwarder runs in the node's network namespace (hostNetwork)"
    )]
    UnderlayNotFound { netns: String, ip: std::net::IpAddr },
    /// A tunnel parameter the kernel would refuse or misinterpret.
    #[error("invalid tunnel parameter for interface {name}: {what} {value}: {reason}")]
    InvalidTunnel { name: String, what: &'static str, value: String, reason: &'static str },
    /// Writing a `/proc/sys` file inside the namespace failed.
    #[error(
        "writing {value:?} to {path} in {netns} failed: {source}; check that the interface exists and the kernel \
         supports this setting (e.g. IPv6 not disabled on the kernel command line)"
    )]
    Sysctl {
        netns: String,
        path: String,
        value: String,
        #[source]
        source: std::io::Error,
    },
}

impl KernelError {
    /// The kernel errno of a netlink failure, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Netlink { errno, .. } => *errno,
            _ => None,
        }
    }

    pub(crate) fn netlink(
        op: impl Into<String>,
        ns: &NetnsHandle,
        name: &str,
        source: rtnetlink::Error,
    ) -> KernelError {
        let errno = errno_of(&source);
        let reason = match &source {
            rtnetlink::Error::NetlinkError(m) => {
                let hint = match errno {
                    Some(1) => " (the forwarder needs CAP_NET_ADMIN in that namespace)",
                    Some(ENODEV) => " (the interface vanished meanwhile)",
                    _ => "",
                };
                format!("{m}{hint}")
            }
            other => other.to_string(),
        };
        KernelError::Netlink {
            op: op.into(),
            netns: ns.describe().to_string(),
            name: name.to_string(),
            errno,
            reason,
            source: Box::new(source),
        }
    }
}

/// Positive errno of a netlink error reply.
pub(crate) fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// What [`link_info`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    /// `IFLA_IFALIAS`; empty when unset.
    pub alias: String,
    pub mtu: Option<u32>,
    /// `IFF_UP` (administratively up).
    pub admin_up: bool,
    /// Operational state is `UP` (for veth: both ends up).
    pub oper_up: bool,
    /// Link kind (`"veth"`, `"dummy"`, ...), when the kernel reports one.
    pub kind: Option<String>,
    /// `IFLA_LINK`: for veth, the peer's ifindex (in the peer's namespace).
    pub link: Option<u32>,
}

impl LinkInfo {
    fn from_message(m: &LinkMessage) -> LinkInfo {
        let mut info = LinkInfo {
            index: m.header.index,
            alias: String::new(),
            mtu: None,
            admin_up: m.header.flags.contains(LinkFlags::Up),
            oper_up: false,
            kind: None,
            link: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfAlias(s) => info.alias = s.clone(),
                LinkAttribute::Mtu(v) => info.mtu = Some(*v),
                LinkAttribute::OperState(s) => info.oper_up = *s == State::Up,
                LinkAttribute::Link(i) => info.link = Some(*i),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let NlLinkInfo::Kind(k) = i {
                            info.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        info
    }
}

/// Validates a Linux interface name as the kernel does (`dev_valid_name`).
pub fn validate_ifname(name: &str) -> Result<(), KernelError> {
    let err = |rule| Err(KernelError::InvalidName { name: name.to_string(), rule });
    if name.is_empty() {
        return err("it must not be empty");
    }
    if name.len() > IFNAMSIZ_MAX {
        return err("it must be at most 15 bytes long (Linux IFNAMSIZ)");
    }
    if name == "." || name == ".." {
        return err("it must not be \".\" or \"..\"");
    }
    if name.contains('/') {
        return err("it must not contain '/'");
    }
    if name.contains(':') {
        return err("it must not contain ':' (reserved for legacy IP aliases)");
    }
    if name.chars().any(|c| c.is_whitespace() || c == '\0') {
        return err("it must not contain whitespace or NUL");
    }
    Ok(())
}

pub(crate) fn validate_alias(name: &str, alias: &str) -> Result<(), KernelError> {
    let err = |rule| Err(KernelError::InvalidAlias { name: name.to_string(), alias: alias.to_string(), rule });
    if alias.is_empty() {
        return err("an empty alias cannot mark ownership");
    }
    if alias.len() > IFALIAS_MAX {
        return err("it must be at most 255 bytes long (Linux IFALIASZ)");
    }
    if alias.contains('\0') {
        return err("it must not contain NUL");
    }
    Ok(())
}

/// Looks up `name` with an existing handle and returns the whole message
/// (`None` when absent).
pub(crate) async fn get_link_message(
    nl: &rtnetlink::Handle,
    ns: &NetnsHandle,
    name: &str,
) -> Result<Option<LinkMessage>, KernelError> {
    let mut s = nl.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m),
        Err(e) if errno_of(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(KernelError::netlink("looking up", ns, name, e)),
    }
}

/// Looks up `name` with an existing handle.
pub(crate) async fn get_link(
    nl: &rtnetlink::Handle,
    ns: &NetnsHandle,
    name: &str,
) -> Result<Option<LinkInfo>, KernelError> {
    Ok(get_link_message(nl, ns, name).await?.as_ref().map(LinkInfo::from_message))
}

/// Looks up `name` in `ns`: `None` when absent.
pub async fn link_info(ns: &NetnsHandle, name: &str) -> Result<Option<LinkInfo>, KernelError> {
    validate_ifname(name)?;
    let nl = ns.netlink().await?;
    get_link(&nl, ns, name).await
}

/// Deletes by index with an existing handle; `Ok(false)` if already gone.
pub(crate) async fn del_index(
    nl: &rtnetlink::Handle,
    ns: &NetnsHandle,
    name: &str,
    index: u32,
) -> Result<bool, KernelError> {
    match nl.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno_of(&e) == Some(ENODEV) => Ok(false),
        Err(e) => Err(KernelError::netlink("deleting", ns, name, e)),
    }
}

/// Deletes `name` in `ns` if present. With `expected_alias`, an interface
/// carrying another alias is left alone and reported as
/// [`KernelError::NameTaken`]. `Ok(false)` when there was nothing to delete.
/// Deleting one end of a veth pair removes both ends (and their routes).
pub async fn delete_link(ns: &NetnsHandle, name: &str, expected_alias: Option<&str>) -> Result<bool, KernelError> {
    validate_ifname(name)?;
    let nl = ns.netlink().await?;
    let Some(info) = get_link(&nl, ns, name).await? else { return Ok(false) };
    if let Some(want) = expected_alias
        && info.alias != want
    {
        return Err(KernelError::NameTaken {
            netns: ns.describe().to_string(),
            name: name.to_string(),
            alias_found: info.alias,
        });
    }
    del_index(&nl, ns, name, info.index).await
}

/// Removes `name` from `ns` after a later step of creating or moving it
/// failed, if `ours` says it is the one we made (best effort: a failure is
/// logged), so no half-configured interface stays behind.
pub(crate) async fn remove_after_failure(
    nl: &rtnetlink::Handle,
    ns: &NetnsHandle,
    name: &str,
    ours: impl Fn(&LinkInfo) -> bool,
) {
    let res = match get_link(nl, ns, name).await {
        Ok(Some(i)) if ours(&i) => del_index(nl, ns, name, i.index).await.map(|_| ()),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = res {
        tracing::warn!(netns = ns.describe(), name, error = %e, "could not remove the interface after a failed setup");
    }
}

/// Sets `index` administratively up.
pub(crate) async fn set_up(
    nl: &rtnetlink::Handle,
    ns: &NetnsHandle,
    name: &str,
    index: u32,
) -> Result<(), KernelError> {
    let msg = rtnetlink::LinkUnspec::new_with_index(index).up().build();
    nl.link().set(msg).execute().await.map_err(|e| KernelError::netlink("setting up", ns, name, e))
}

/// Writes a `/proc/sys` file from a thread inside `ns`.
pub(crate) async fn write_sysctl(ns: &NetnsHandle, path: String, value: &'static str) -> Result<(), KernelError> {
    let p = path.clone();
    ns.run(move || std::fs::write(&p, value)).await?.map_err(|source| KernelError::Sysctl {
        netns: ns.describe().to_string(),
        path,
        value: value.to_string(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ifname_rules() {
        for ok in ["nsm-1", "a", "eth0.100", "abcdefghijklmno"] {
            validate_ifname(ok).unwrap();
        }
        for (bad, needle) in [
            ("", "empty"),
            ("abcdefghijklmnop", "15 bytes"),
            (".", "\".\""),
            ("..", "\".\""),
            ("a/b", "'/'"),
            ("a b", "whitespace"),
            ("a\tb", "whitespace"),
            ("eth0:1", "':'"),
        ] {
            let e = validate_ifname(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")) && e.contains(needle), "{bad:?}: {e}");
        }
    }
}
