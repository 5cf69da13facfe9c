//! Kernel VXLAN devices for the remote VXLAN mechanism, and VNI choice.
//!
//! The forwarder runs in the node's namespace. [`create_vxlan_in`] creates
//! the VXLAN netdev directly in the pod from a netlink socket in the node
//! namespace: the kernel binds its UDP socket in the node namespace (the
//! device's link-netns), and the device is the pod's interface itself (`ip
//! -d link` in the pod shows `vxlan id <vni> ... link-netns <node>`). It
//! never appears in the node namespace, so no name there can collide.
//!
//! # Guarantees
//! - The device is created with a unicast `remote` (no multicast group, no
//!   `dev` binding: the underlay is chosen by routing in the node
//!   namespace), learning off, UDP checksums on for IPv4 and mandatory
//!   (no zero checksums, sent or accepted) for IPv6, and with the MTU and
//!   MAC of the [`VxlanSpec`] set in the creating request. Its alias (which
//!   marks it as ours; the kernel ignores `IFLA_IFALIAS` at creation) is set
//!   right after, together with `IFF_UP`.
//! - It is left up. The kernel binds the VXLAN UDP socket (in the node
//!   namespace) only when a device goes up, so this is what surfaces a port
//!   held by another socket ([`KernelError::PortInUse`], EADDRINUSE).
//! - Idempotent, judged in the pod: a device of that name with our alias
//!   and the same VNI,
//!   local, remote and port is reused (MTU, MAC and up state are fixed if
//!   they drifted). A device of that name with our alias but other
//!   parameters is deleted and recreated. A device of that name with another
//!   alias is left alone ([`KernelError::NameTaken`]).
//! - Anything created here is deleted again if a later step fails, so on
//!   error no device of that name is left in the pod (unless one that is not
//!   ours was already there).
//!
//! # What the kernel refuses (checked on Linux 6.18)
//! - **VNI** (`RTM_NEWLINK` fails with EEXIST, extack "A VXLAN device with the
//!   specified VNI already exists"): another VXLAN device whose socket lives
//!   in the same namespace has the same VNI, the same destination port and
//!   the same address family (and receive flags such as GBP). Remote, local
//!   address and `dev` binding do **not** matter: VNI 100 towards 10.0.0.2
//!   and VNI 100 towards 10.0.0.3 on port 4789 cannot coexist in one node
//!   namespace, also when they live in different pods: a device in a pod
//!   holds its VNI in the namespace of its socket. The same VNI on another port, or in the other
//!   address family, is accepted. Reported as [`KernelError::VniInUse`].
//!   Hence VNIs must be unique per (port, family) on the node, which is
//!   stricter than the upstream (src_ip, vni) rule of [`generate_vni`]: the
//!   caller retries with another VNI on `VniInUse`.
//! - **Port**: bringing the device up fails with EADDRINUSE when a non-VXLAN
//!   socket (or a VXLAN socket with incompatible receive flags) holds the
//!   port in that namespace, on the wildcard or on a specific address,
//!   IPv4 or dual-stack IPv6. VXLAN devices with the same flags share one
//!   socket per port. Reported as [`KernelError::PortInUse`].

use std::cmp::Ordering;
use std::net::IpAddr;

use netlink_packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage};
use nsm_sdk::tools::netns::NetnsHandle;
use rtnetlink::{LinkUnspec, LinkVxlan};

use super::{
    EEXIST, KernelError, LinkInfo, del_index, errno_of, get_link, get_link_message, remove_after_failure,
    validate_alias, validate_ifname,
};

/// The largest VNI (24 bits).
pub const VNI_MAX: u32 = 0x00FF_FFFF;
/// The IANA VXLAN port (the NSM default `src_port`/`dst_port`).
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

/// `EADDRINUSE`.
pub(crate) const EADDRINUSE: i32 = 98;

/// What [`create_vxlan_in`] builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Interface name in the pod (at most 15 bytes).
    pub name: String,
    /// 1..=16_777_215.
    pub vni: u32,
    /// This node's tunnel IP (source of the outer packets).
    pub local: IpAddr,
    /// The peer node's tunnel IP (unicast destination of the outer packets).
    pub remote: IpAddr,
    /// UDP destination port ([`DEFAULT_VXLAN_PORT`] normally).
    pub port: u16,
    /// MTU of the VXLAN device (underlay MTU minus 50 for IPv4, 70 for IPv6,
    /// or less).
    pub mtu: u32,
    /// Device MAC; `None` lets the kernel pick a random one.
    pub mac: Option<[u8; 6]>,
    /// Ownership mark (`nsm:<forwarder>@<netns inode>:<conn>`), at most 255
    /// bytes.
    pub alias: String,
}

/// Checks that `vni` fits VXLAN's 24 bits and is not 0.
pub fn validate_vni(vni: u32) -> Result<u32, KernelError> {
    if vni == 0 || vni > VNI_MAX {
        return Err(KernelError::InvalidVni { vni });
    }
    Ok(vni)
}

/// Compares two IPs byte-wise the way Go's `compareIps` does on `net.IP`
/// values from `net.ParseIP`, which are always 16 bytes long (IPv4 as
/// `::ffff:a.b.c.d`).
fn compare_ips(a: IpAddr, b: IpAddr) -> Ordering {
    let bytes = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    bytes(a).cmp(&bytes(b))
}

/// True if the side choosing a VNI for a tunnel from `src` to `dst` takes
/// even VNIs (upstream `EvenVNI`: `compare(src, dst) <= 0`); the other
/// direction of the same pair then takes odd ones, so the two never collide.
pub fn even_vni_side(src: IpAddr, dst: IpAddr) -> bool {
    compare_ips(src, dst) != Ordering::Greater
}

/// A random VNI by the upstream rule (nsm-spec §1.7): random `r`, then
/// `(2r) & 0xFFFFFF` on the even side ([`even_vni_side`]), else
/// `(2r+1) & 0xFFFFFF`. Never 0. Candidates for which `taken` returns true
/// are skipped (the caller tracks VNIs in use per `(src_ip, vni)`, or per
/// port as the kernel requires, see the module docs).
///
/// Always terminates: after 4096 random draws it walks every VNI of the
/// right parity from a random start. Only if `taken` refuses all of them
/// (8 million values) it returns a random VNI of the right parity without
/// asking `taken`; [`create_vxlan_in`] then reports it as
/// [`KernelError::VniInUse`] if the kernel has it.
pub fn generate_vni(src: IpAddr, dst: IpAddr, taken: impl Fn(u32) -> bool) -> u32 {
    let even = even_vni_side(src, dst);
    let pick = |r: u32| {
        let v = if even { r.wrapping_mul(2) } else { r.wrapping_mul(2).wrapping_add(1) };
        v & VNI_MAX
    };
    let random_nonzero = || loop {
        let v = pick(rand::random::<u32>());
        if v != 0 {
            return v;
        }
    };
    for _ in 0..4096 {
        let v = pick(rand::random::<u32>());
        if v != 0 && !taken(v) {
            return v;
        }
    }
    // 2^23 values per parity: r in 0..2^23 covers them all exactly once.
    let start = rand::random::<u32>() & (VNI_MAX >> 1);
    for i in 0..=(VNI_MAX >> 1) {
        let v = pick(start.wrapping_add(i) & (VNI_MAX >> 1));
        if v != 0 && !taken(v) {
            return v;
        }
    }
    random_nonzero()
}

/// The VXLAN parameters of an existing device.
#[derive(Debug, Default, PartialEq, Eq)]
struct Existing {
    vni: Option<u32>,
    local: Option<IpAddr>,
    remote: Option<IpAddr>,
    port: Option<u16>,
}

/// `None` if `m` is not a VXLAN device.
fn vxlan_params(m: &LinkMessage) -> Option<Existing> {
    let mut is_vxlan = false;
    let mut e = Existing::default();
    for a in &m.attributes {
        let LinkAttribute::LinkInfo(infos) = a else { continue };
        for i in infos {
            match i {
                NlLinkInfo::Kind(k) => is_vxlan = k.to_string() == "vxlan",
                NlLinkInfo::Data(InfoData::Vxlan(attrs)) => {
                    for x in attrs {
                        match x {
                            InfoVxlan::Id(v) => e.vni = Some(*v),
                            InfoVxlan::Group(ip) => e.remote = Some(IpAddr::V4(*ip)),
                            InfoVxlan::Group6(ip) => e.remote = Some(IpAddr::V6(*ip)),
                            InfoVxlan::Local(ip) => e.local = Some(IpAddr::V4(*ip)),
                            InfoVxlan::Local6(ip) => e.local = Some(IpAddr::V6(*ip)),
                            InfoVxlan::Port(p) => e.port = Some(*p),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    is_vxlan.then_some(e)
}

/// The UDP destination port of `m`, if it is a VXLAN device.
pub(crate) fn vxlan_port(m: &LinkMessage) -> Option<u16> {
    vxlan_params(m).and_then(|e| e.port)
}

/// The MAC (`IFLA_ADDRESS`) of `m`.
fn mac_of(m: &LinkMessage) -> Option<&[u8]> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => Some(b.as_slice()),
        _ => None,
    })
}

pub(crate) fn fmt_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Checks everything that can be checked without the kernel.
fn validate_spec(spec: &VxlanSpec) -> Result<(), KernelError> {
    validate_ifname(&spec.name)?;
    validate_alias(&spec.name, &spec.alias)?;
    validate_vni(spec.vni)?;
    let invalid =
        |what, value: String, reason| KernelError::InvalidTunnel { name: spec.name.clone(), what, value, reason };
    if spec.local.is_ipv4() != spec.remote.is_ipv4() {
        return Err(invalid(
            "local/remote",
            format!("{} / {}", spec.local, spec.remote),
            "the local and remote tunnel IPs must be of the same address family; check the src_ip/dst_ip \
             mechanism parameters against this node's tunnel IP",
        ));
    }
    if spec.local.is_unspecified() || spec.local.is_multicast() {
        return Err(invalid(
            "local",
            spec.local.to_string(),
            "the local tunnel IP must be a unicast address of this node; check the configured tunnel IP",
        ));
    }
    if spec.remote.is_unspecified() || spec.remote.is_multicast() {
        return Err(invalid(
            "remote",
            spec.remote.to_string(),
            "the remote tunnel IP must be the peer node's unicast address (multicast groups are not supported); \
             check the mechanism's src_ip/dst_ip",
        ));
    }
    if spec.port == 0 {
        return Err(invalid(
            "UDP port",
            "0".into(),
            "port 0 would make the kernel use its compiled-in default (8472); pass the port explicitly (4789)",
        ));
    }
    if !(68..=65_535).contains(&spec.mtu) {
        return Err(invalid("MTU", spec.mtu.to_string(), "it must be between 68 and 65535"));
    }
    if let Some(mac) = spec.mac
        && (mac == [0; 6] || mac[0] & 1 == 1)
    {
        return Err(invalid(
            "MAC",
            fmt_mac(&mac),
            "a device MAC must be unicast and not all zeros (clear the lowest bit of the first byte)",
        ));
    }
    Ok(())
}

/// Creates the VXLAN netdev `spec.name` directly in `pod`, from a netlink
/// socket in `node`: the kernel keeps the device's UDP socket and underlay
/// lookups in `node` (the request's netns; `ip -d link` shows `link-netns`),
/// exactly the layout of create-in-node-then-move, without the move. A
/// netdev move waits for RCU grace periods in the kernel (about 25 ms per
/// device on this machine kind, serialised under RTNL), creation in place
/// about 1 ms. `NameTaken` and idempotence are judged in `pod`; anything
/// created is removed if a later step fails. Returns the ifindex in `pod`.
/// See the module docs for the exact guarantees and what the kernel
/// refuses.
///
/// Errors: [`KernelError::InvalidVni`], [`KernelError::InvalidTunnel`],
/// [`KernelError::NameTaken`] (the name has another alias in `pod`),
/// [`KernelError::VniInUse`] (EEXIST on the VNI in `node`),
/// [`KernelError::PortInUse`] (EADDRINUSE when going up), or a netlink error
/// naming the namespace and interface.
pub async fn create_vxlan_in(node: &NetnsHandle, pod: &NetnsHandle, spec: &VxlanSpec) -> Result<u32, KernelError> {
    validate_spec(spec)?;
    let nl_pod = pod.netlink().await?;
    if let Some(index) = reuse_existing(&nl_pod, pod, spec).await? {
        return Ok(index);
    }
    let nl_node = node.netlink().await?;
    let mut b = LinkVxlan::new(&spec.name, spec.vni).port(spec.port).learning(false);
    b = match (spec.local, spec.remote) {
        (IpAddr::V4(l), IpAddr::V4(r)) => b.local(l).remote(r).udp_csum(true),
        (IpAddr::V6(l), IpAddr::V6(r)) => b.local6(l).remote6(r).udp_zero_csum6_tx(false).udp_zero_csum6_rx(false),
        _ => b,
    };
    b = b.mtu(spec.mtu);
    if let Some(mac) = spec.mac {
        b = b.address(mac.to_vec());
    }
    let mut msg = b.build();
    // Keep the File alive (borrowed from `pod`) until the request is done.
    msg.attributes.push(LinkAttribute::NetNsFd(std::os::fd::AsRawFd::as_raw_fd(&pod.as_fd())));
    if let Err(e) = nl_node.link().add(msg).execute().await {
        if errno_of(&e) == Some(EEXIST) {
            match get_link(&nl_pod, pod, &spec.name).await? {
                None => {
                    return Err(KernelError::VniInUse {
                        netns: node.describe().to_string(),
                        name: spec.name.clone(),
                        vni: spec.vni,
                        port: spec.port,
                        family: family(spec.local),
                    });
                }
                Some(_) => {
                    if let Some(index) = reuse_existing(&nl_pod, pod, spec).await? {
                        return Ok(index);
                    }
                }
            }
        }
        let op = format!(
            "creating VXLAN device (VNI {}, port {}, remote {}) in {} from {}",
            spec.vni,
            spec.port,
            spec.remote,
            pod.describe(),
            node.describe()
        );
        return Err(KernelError::netlink(op, pod, &spec.name, e));
    }
    let result = async {
        let info = get_link(&nl_pod, pod, &spec.name)
            .await?
            .ok_or_else(|| KernelError::LinkNotFound { netns: pod.describe().to_string(), name: spec.name.clone() })?;
        // Up binds the UDP socket (in `node`): a port in use fails here.
        set_alias_up(&nl_pod, pod, spec, info.index).await?;
        Ok::<u32, KernelError>(info.index)
    }
    .await;
    if result.is_err() {
        remove_after_failure(&nl_pod, pod, &spec.name, |_| true).await;
    }
    let index = result?;
    tracing::debug!(
        pod = pod.describe(),
        node = node.describe(),
        name = spec.name,
        vni = spec.vni,
        remote = %spec.remote,
        index,
        "created VXLAN device in place"
    );
    Ok(index)
}

/// If `spec.name` exists: `NameTaken` when not ours, its index when ours
/// with the same VXLAN parameters (after fixing MTU, MAC, up), and `None`
/// after deleting it when ours with other parameters. `None` when absent.
async fn reuse_existing(
    nl: &rtnetlink::Handle,
    node: &NetnsHandle,
    spec: &VxlanSpec,
) -> Result<Option<u32>, KernelError> {
    let Some(m) = get_link_message(nl, node, &spec.name).await? else { return Ok(None) };
    let info = LinkInfo::from_message(&m);
    if info.alias != spec.alias {
        return Err(KernelError::NameTaken {
            netns: node.describe().to_string(),
            name: spec.name.clone(),
            alias_found: info.alias,
        });
    }
    let want =
        Existing { vni: Some(spec.vni), local: Some(spec.local), remote: Some(spec.remote), port: Some(spec.port) };
    match vxlan_params(&m) {
        Some(found) if found == want => {}
        found => {
            tracing::info!(
                netns = node.describe(),
                name = spec.name,
                ?found,
                wanted = ?want,
                "deleting our stale device with other VXLAN parameters"
            );
            del_index(nl, node, &spec.name, info.index).await?;
            return Ok(None);
        }
    }
    let mac_drift = spec.mac.filter(|mac| mac_of(&m) != Some(mac.as_slice()));
    if info.admin_up && info.mtu == Some(spec.mtu) && mac_drift.is_none() {
        return Ok(Some(info.index));
    }
    let mut msg = LinkUnspec::new_with_index(info.index).mtu(spec.mtu);
    if let Some(mac) = mac_drift {
        msg = msg.address(mac.to_vec());
    }
    nl.link()
        .set(msg.build())
        .execute()
        .await
        .map_err(|e| KernelError::netlink("setting MTU / MAC of the existing VXLAN device", node, &spec.name, e))?;
    set_alias_up(nl, node, spec, info.index).await?;
    Ok(Some(info.index))
}

/// Sets the alias and `IFF_UP` in one `RTM_SETLINK`; EADDRINUSE (the UDP
/// socket cannot be bound) becomes [`KernelError::PortInUse`].
async fn set_alias_up(
    nl: &rtnetlink::Handle,
    node: &NetnsHandle,
    spec: &VxlanSpec,
    index: u32,
) -> Result<(), KernelError> {
    let msg = LinkUnspec::new_with_index(index).alias(spec.alias.clone()).up().build();
    match nl.link().set(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno_of(&e) == Some(EADDRINUSE) => {
            Err(KernelError::PortInUse { netns: node.describe().to_string(), name: spec.name.clone(), port: spec.port })
        }
        Err(e) => Err(KernelError::netlink("setting alias and up", node, &spec.name, e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn compares_like_go_net_ip() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(compare_ips(ip("10.0.0.1"), ip("10.0.0.2")), Ordering::Less);
        assert_eq!(compare_ips(ip("10.0.0.2"), ip("10.0.0.1")), Ordering::Greater);
        assert_eq!(compare_ips(ip("10.0.0.1"), ip("10.0.0.1")), Ordering::Equal);
        // IPv4 is ::ffff:a.b.c.d in Go's 16-byte form: above ::1, below fd00::.
        assert_eq!(compare_ips(ip("10.0.0.1"), ip("::1")), Ordering::Greater);
        assert_eq!(compare_ips(ip("10.0.0.1"), ip("fd00::1")), Ordering::Less);
        assert!(even_vni_side(ip("10.0.0.1"), ip("10.0.0.1")));
    }

    #[test]
    fn vni_range() {
        assert!(matches!(validate_vni(0), Err(KernelError::InvalidVni { vni: 0 })));
        assert!(matches!(validate_vni(VNI_MAX + 1), Err(KernelError::InvalidVni { .. })));
        assert_eq!(validate_vni(1).unwrap(), 1);
        assert_eq!(validate_vni(VNI_MAX).unwrap(), VNI_MAX);
        let e = validate_vni(1 << 24).unwrap_err().to_string();
        assert!(e.contains("16777216") && e.contains("1..=16777215"), "{e}");
    }

    #[test]
    fn spec_checks_name_the_problem() {
        let ok = VxlanSpec {
            name: "vx-1".into(),
            vni: 10,
            local: "10.0.0.1".parse().unwrap(),
            remote: "10.0.0.2".parse().unwrap(),
            port: 4789,
            mtu: 1450,
            mac: None,
            alias: "nsm-x".into(),
        };
        validate_spec(&ok).unwrap();
        let bad = |f: &dyn Fn(&mut VxlanSpec), needle: &str| {
            let mut s = ok.clone();
            f(&mut s);
            let e = validate_spec(&s).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        };
        bad(&|s: &mut VxlanSpec| s.remote = "fd00::2".parse().unwrap(), "same address family");
        bad(&|s: &mut VxlanSpec| s.remote = "239.1.1.1".parse().unwrap(), "239.1.1.1");
        bad(&|s: &mut VxlanSpec| s.local = "0.0.0.0".parse().unwrap(), "local");
        bad(&|s: &mut VxlanSpec| s.port = 0, "8472");
        bad(&|s: &mut VxlanSpec| s.mtu = 10, "MTU 10");
        bad(&|s: &mut VxlanSpec| s.mac = Some([1, 0, 0, 0, 0, 1]), "01:00:00:00:00:01");
        bad(&|s: &mut VxlanSpec| s.vni = 0, "VNI 0");
        bad(&|s: &mut VxlanSpec| s.name = "a-very-long-interface".into(), "15 bytes");
        bad(&|s: &mut VxlanSpec| s.alias = String::new(), "empty alias");
    }
}
