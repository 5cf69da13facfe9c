//! The kernel backend: a `wireguard` link created over rtnetlink and
//! configured over generic netlink (family `wireguard`), both through
//! synchronous netlink sockets opened on the calling thread, so no tokio
//! runtime is needed in the namespace thread that creates the device.
//!
//! Messages come from netlink-packet-route 0.34 / rtnetlink 0.24's
//! `LinkWireguard` builder and netlink-packet-wireguard 0.5 /
//! netlink-packet-generic 0.5 (all MIT, all on netlink-packet-core 0.9, the
//! same stack as the rest of the forwarder); the socket is netlink-sys 0.9.
//!
//! **Not exercised end to end on the development machine**: its kernel has
//! no WireGuard module, so only message building and parsing, the probe and
//! the "unsupported" path are tested there.
//!
//! # Guarantees
//! - [`kernel_available`] creates a throwaway `wireguard` link in the
//!   calling thread's namespace and deletes it again; nothing stays behind.
//! - `create` leaves nothing behind on failure: a link it created is
//!   deleted again (e.g. when the port is taken, which the kernel only
//!   reports when the port is set: [`WgError::PortInUse`]).
//! - The kernel WireGuard socket lives in the namespace that created the
//!   link, also after the link is moved. Generic-netlink requests, however,
//!   find a link only in the namespace it is in now: after moving it the
//!   caller must call [`WgDevice::relocated`]; until then requests go to the
//!   creating namespace by the creation name.
//! - `close` deletes the link (by name, in its current namespace) if it
//!   still is a WireGuard link; it is idempotent.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use ipnetwork::IpNetwork;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute, WireguardCmd,
    WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use netlink_sys::constants::{NETLINK_GENERIC, NETLINK_ROUTE};
use nsm_sdk::tools::netns::NetnsHandle;

use super::key::Key;
use super::{DeviceId, MAX_MTU, MIN_MTU, PeerUpdate, WgBackend, WgConfig, WgDevice, WgError, WgStats, validate_name};

const EEXIST: i32 = 17;
const ENODEV: i32 = 19;
const EADDRINUSE: i32 = 98;
const EOPNOTSUPP: i32 = 95;

/// A netlink failure: positive errno (if the kernel sent one) and text.
#[derive(Debug)]
pub(crate) struct NlError {
    pub errno: Option<i32>,
    pub reason: String,
}

impl NlError {
    fn io(e: &std::io::Error) -> NlError {
        NlError { errno: e.raw_os_error(), reason: e.to_string() }
    }
}

/// A synchronous netlink socket bound in the calling thread's namespace.
struct Nl {
    sock: netlink_sys::Socket,
    seq: u32,
}

impl Nl {
    fn open(protocol: isize) -> Result<Nl, NlError> {
        let mut sock = netlink_sys::Socket::new(protocol).map_err(|e| NlError::io(&e))?;
        sock.bind_auto().map_err(|e| NlError::io(&e))?;
        sock.connect(&netlink_sys::SocketAddr::new(0, 0)).map_err(|e| NlError::io(&e))?;
        Ok(Nl { sock, seq: 0 })
    }

    /// Sends `payload` and collects the answers: until the ACK (or NACK) for
    /// a plain request, until `NLMSG_DONE` for a dump.
    fn request<T>(&mut self, payload: T, flags: u16) -> Result<Vec<T>, NlError>
    where
        T: NetlinkSerializable + NetlinkDeserializable,
    {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        self.seq = self.seq.wrapping_add(1);
        header.sequence_number = self.seq;
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(|e| NlError::io(&e))?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().map_err(|e| NlError::io(&e))?;
            let mut off = 0;
            while off + 16 <= data.len() {
                let m = NetlinkMessage::<T>::deserialize(&data[off..])
                    .map_err(|e| NlError { errno: None, reason: format!("cannot decode the kernel's answer: {e}") })?;
                let len = m.header.length as usize;
                let seq = m.header.sequence_number;
                off += (len.max(16) + 3) & !3;
                if seq != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(i) => out.push(i),
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(c) => {
                            let errno = c.get().abs();
                            return Err(NlError {
                                errno: Some(errno),
                                reason: std::io::Error::from_raw_os_error(errno).to_string(),
                            });
                        }
                    },
                    _ => {}
                }
            }
        }
    }
}

/// Runs `f` on a scoped thread inside `netns` (`None`: the calling
/// thread's namespace, directly).
fn in_netns<T: Send>(netns: Option<&NetnsHandle>, f: impl FnOnce() -> Result<T, NlError> + Send) -> Result<T, NlError> {
    let Some(ns) = netns else { return f() };
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("wg-netns".into())
            .spawn_scoped(s, move || {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| NlError {
                    errno: Some(e as i32),
                    reason: format!("cannot enter {}: {e}", ns.describe()),
                })?;
                f()
            })
            .map_err(|e| NlError::io(&e))?;
        h.join().unwrap_or_else(|_| Err(NlError { errno: None, reason: "the netns helper thread panicked".into() }))
    })
}

// === rtnetlink ===

fn new_wireguard_link(name: &str, mtu: Option<u32>) -> LinkMessage {
    let mut b = rtnetlink::LinkWireguard::new(name);
    if let Some(m) = mtu {
        b = b.mtu(m);
    }
    b.build()
}

fn link_by_name(nl: &mut Nl, name: &str) -> Result<Option<LinkMessage>, NlError> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    match nl.request(RouteNetlinkMessage::GetLink(m), 0) {
        Ok(v) => Ok(v.into_iter().find_map(|r| match r {
            RouteNetlinkMessage::NewLink(l) => Some(l),
            _ => None,
        })),
        Err(e) if e.errno == Some(ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_wireguard(l: &LinkMessage) -> bool {
    l.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Wireguard))),
        _ => false,
    })
}

fn del_link(nl: &mut Nl, index: u32) -> Result<(), NlError> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    match nl.request(RouteNetlinkMessage::DelLink(m), 0) {
        Err(e) if e.errno != Some(ENODEV) => Err(e),
        _ => Ok(()),
    }
}

fn set_up(nl: &mut Nl, index: u32) -> Result<(), NlError> {
    let m = rtnetlink::LinkUnspec::new_with_index(index).up().build();
    nl.request(RouteNetlinkMessage::SetLink(m), 0).map(drop)
}

/// Whether the kernel can create a `wireguard` link in the calling thread's
/// namespace: creates a throwaway one and deletes it. `Err` says why not.
pub fn kernel_available() -> Result<(), String> {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!("nsmwgp{:x}", (std::process::id() << 4) ^ N.fetch_add(1, Ordering::Relaxed));
    let name: String = name.chars().take(15).collect();
    let mut nl = Nl::open(NETLINK_ROUTE).map_err(|e| format!("cannot open a netlink socket: {}", e.reason))?;
    match nl.request(RouteNetlinkMessage::NewLink(new_wireguard_link(&name, None)), NLM_F_CREATE | NLM_F_EXCL) {
        Ok(_) => {
            match link_by_name(&mut nl, &name) {
                Ok(Some(l)) => {
                    if let Err(e) = del_link(&mut nl, l.header.index) {
                        tracing::warn!(ifname = %name, reason = %e.reason, "cannot delete the WireGuard probe link");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(ifname = %name, reason = %e.reason, "cannot find the WireGuard probe link"),
            }
            Ok(())
        }
        Err(e) if e.errno == Some(EOPNOTSUPP) => {
            Err("the kernel does not support wireguard links (no wireguard module)".to_string())
        }
        Err(e) => Err(format!("creating a wireguard link failed: {}", e.reason)),
    }
}

// === generic netlink ===

fn family_id(nl: &mut Nl) -> Result<u16, NlError> {
    let msg = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".into())],
    });
    let answers = nl.request(msg, 0)?;
    answers
        .iter()
        .flat_map(|a| a.payload.nlas.iter())
        .find_map(|n| match n {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .ok_or_else(|| NlError { errno: None, reason: "the kernel has no generic netlink family wireguard".into() })
}

fn wg_request(nl: &mut Nl, msg: WireguardMessage, flags: u16) -> Result<Vec<WireguardMessage>, NlError> {
    let id = family_id(nl)?;
    let mut g = GenlMessage::from_payload(msg);
    g.set_resolved_family_id(id);
    Ok(nl.request(g, flags)?.into_iter().map(|g| g.payload).collect())
}

fn allowed_ip(n: &IpNetwork) -> WireguardAllowedIp {
    let family = if n.is_ipv4() { WireguardAddressFamily::Ipv4 } else { WireguardAddressFamily::Ipv6 };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(n.network()),
        WireguardAllowedIpAttr::Cidr(n.prefix()),
    ])
}

/// `WG_CMD_SET_DEVICE` for `ifname`: optionally the device part (private
/// key, port, replacing all peers), and the single peer (replacing its
/// allowed IPs).
fn set_device_msg(
    ifname: &str,
    device: Option<(&Key, u16)>,
    peer: &Key,
    endpoint: Option<SocketAddr>,
    allowed: &[IpNetwork],
    keepalive: Option<u16>,
) -> WireguardMessage {
    let mut attrs = vec![WireguardAttribute::IfName(ifname.to_string())];
    let mut flags = WireguardPeerFlags::ReplaceAllowedIps;
    if let Some((private, port)) = device {
        attrs.push(WireguardAttribute::PrivateKey(*private.as_bytes()));
        attrs.push(WireguardAttribute::ListenPort(port));
        attrs.push(WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers));
    } else {
        flags |= WireguardPeerFlags::UpdateOnly;
    }
    let mut p = vec![WireguardPeerAttribute::PublicKey(*peer.as_bytes()), WireguardPeerAttribute::Flags(flags)];
    if let Some(ep) = endpoint {
        p.push(WireguardPeerAttribute::Endpoint(ep));
    }
    p.push(WireguardPeerAttribute::PersistentKeepalive(keepalive.unwrap_or(0)));
    p.push(WireguardPeerAttribute::AllowedIps(allowed.iter().map(allowed_ip).collect()));
    attrs.push(WireguardAttribute::Peers(vec![WireguardPeer(p)]));
    WireguardMessage { cmd: WireguardCmd::SetDevice, attributes: attrs }
}

/// Reads the counters of `peer` from `WG_CMD_GET_DEVICE` answers.
fn stats_from(answers: &[WireguardMessage], peer: &Key) -> WgStats {
    let mut st = WgStats::default();
    for a in answers {
        for attr in &a.attributes {
            let WireguardAttribute::Peers(peers) = attr else { continue };
            for p in peers {
                if !p.iter().any(|x| matches!(x, WireguardPeerAttribute::PublicKey(k) if k == peer.as_bytes())) {
                    continue;
                }
                for x in p.iter() {
                    match x {
                        WireguardPeerAttribute::RxBytes(n) => st.rx_bytes = *n,
                        WireguardPeerAttribute::TxBytes(n) => st.tx_bytes = *n,
                        WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 => {
                            st.last_handshake = Some(
                                UNIX_EPOCH
                                    + Duration::new(
                                        u64::try_from(t.seconds).unwrap_or(0),
                                        u32::try_from(t.nano_seconds).unwrap_or(0),
                                    ),
                            )
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    st
}

// === backend and device ===

/// The kernel WireGuard backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kernel;

/// A kernel WireGuard link.
pub struct KernelDevice {
    id: DeviceId,
    public: Key,
    peer: Key,
    /// Where the link is now: `(namespace, name)`; the creating namespace
    /// (kept open) until [`WgDevice::relocated`].
    location: Mutex<(NetnsHandle, String)>,
    closed: AtomicBool,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDevice")
            .field("name", &self.id.name)
            .field("ifindex", &self.id.ifindex)
            .finish_non_exhaustive()
    }
}

impl WgBackend for Kernel {
    fn kind(&self) -> super::BackendKind {
        super::BackendKind::Kernel
    }

    fn create(&self, name: &str, cfg: &WgConfig) -> Result<Box<dyn WgDevice>, WgError> {
        validate_name(name)?;
        if !(MIN_MTU..=MAX_MTU).contains(&cfg.mtu) {
            return Err(WgError::InvalidConfig {
                name: name.to_string(),
                reason: format!("MTU {} is outside {MIN_MTU}..={MAX_MTU}", cfg.mtu),
            });
        }
        let nl_err = |op: &str, e: NlError| WgError::Netlink {
            name: name.to_string(),
            op: op.to_string(),
            errno: e.errno,
            reason: e.reason,
        };
        let here = NetnsHandle::current().map_err(|e| WgError::Netlink {
            name: name.to_string(),
            op: "opening the current network namespace".into(),
            errno: None,
            reason: e.to_string(),
        })?;
        let mut rt = Nl::open(NETLINK_ROUTE).map_err(|e| nl_err("opening rtnetlink", e))?;
        match rt
            .request(RouteNetlinkMessage::NewLink(new_wireguard_link(name, Some(cfg.mtu))), NLM_F_CREATE | NLM_F_EXCL)
        {
            Ok(_) => {}
            Err(e) if e.errno == Some(EOPNOTSUPP) => {
                return Err(WgError::KernelUnsupported { name: name.to_string(), reason: e.reason });
            }
            Err(e) if e.errno == Some(EEXIST) => {
                return Err(WgError::NameTaken {
                    name: name.to_string(),
                    what: "an interface of that name already exists in this network namespace".into(),
                });
            }
            Err(e) => return Err(nl_err("creating the wireguard link", e)),
        }
        let ifindex = match link_by_name(&mut rt, name) {
            Ok(Some(l)) => l.header.index,
            Ok(None) => {
                return Err(nl_err("looking up the new link", NlError { errno: Some(ENODEV), reason: "gone".into() }));
            }
            Err(e) => return Err(nl_err("looking up the new link", e)),
        };
        let mut configure = || -> Result<(), WgError> {
            let mut g = Nl::open(NETLINK_GENERIC).map_err(|e| nl_err("opening generic netlink", e))?;
            let msg = set_device_msg(
                name,
                Some((&cfg.private_key, cfg.listen_port)),
                &cfg.peer_public_key,
                cfg.peer_endpoint,
                &cfg.allowed_ips,
                cfg.persistent_keepalive,
            );
            match wg_request(&mut g, msg, 0) {
                Ok(_) => {}
                Err(e) if e.errno == Some(EADDRINUSE) => {
                    return Err(WgError::PortInUse { name: name.to_string(), port: cfg.listen_port });
                }
                Err(e) => return Err(nl_err("configuring keys, port and peer", e)),
            }
            set_up(&mut rt, ifindex).map_err(|e| nl_err("setting the link up", e))
        };
        if let Err(e) = configure() {
            if let Err(d) = del_link(&mut rt, ifindex) {
                tracing::warn!(ifname = name, reason = %d.reason, "cannot delete the half-configured WireGuard link");
            }
            return Err(e);
        }
        tracing::info!(device = name, ifindex, port = cfg.listen_port, "kernel WireGuard device up");
        Ok(Box::new(KernelDevice {
            id: DeviceId { name: name.to_string(), ifindex, port: cfg.listen_port },
            public: cfg.private_key.public_key(),
            peer: cfg.peer_public_key.clone(),
            location: Mutex::new((here, name.to_string())),
            closed: AtomicBool::new(false),
        }))
    }
}

impl KernelDevice {
    fn location(&self) -> (NetnsHandle, String) {
        self.location.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn delete(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (ns, ifname) = self.location();
        let r = in_netns(Some(&ns), || {
            let mut rt = Nl::open(NETLINK_ROUTE)?;
            match link_by_name(&mut rt, &ifname)? {
                Some(l) if is_wireguard(&l) => del_link(&mut rt, l.header.index),
                _ => Ok(()),
            }
        });
        match r {
            Ok(()) => tracing::info!(device = %self.id.name, ifname = %ifname, "kernel WireGuard device closed"),
            Err(e) => tracing::warn!(device = %self.id.name, ifname = %ifname, netns = %ns, reason = %e.reason,
                "cannot delete the WireGuard link"),
        }
    }
}

impl WgDevice for KernelDevice {
    fn id(&self) -> &DeviceId {
        &self.id
    }
    fn public_key(&self) -> Key {
        self.public.clone()
    }

    fn update_peer(&self, u: &PeerUpdate) -> Result<(), WgError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(WgError::Closed { name: self.id.name.clone() });
        }
        let (ns, ifname) = self.location();
        let msg = set_device_msg(&ifname, None, &self.peer, u.endpoint, &u.allowed_ips, u.keepalive);
        in_netns(Some(&ns), move || {
            let mut g = Nl::open(NETLINK_GENERIC)?;
            wg_request(&mut g, msg, 0).map(drop)
        })
        .map_err(|e| WgError::Netlink {
            name: self.id.name.clone(),
            op: format!("updating peer {} (interface {ifname} in {ns})", self.peer.to_base64()),
            errno: e.errno,
            reason: e.reason,
        })
    }

    fn stats(&self) -> WgStats {
        let (ns, ifname) = self.location();
        let msg = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(ifname.clone())],
        };
        let r = in_netns(Some(&ns), move || {
            let mut g = Nl::open(NETLINK_GENERIC)?;
            wg_request(&mut g, msg, NLM_F_DUMP)
        });
        match r {
            Ok(a) => stats_from(&a, &self.peer),
            Err(e) => {
                tracing::debug!(device = %self.id.name, reason = %e.reason, "reading WireGuard stats failed");
                WgStats::default()
            }
        }
    }

    fn relocated(&self, netns: &NetnsHandle, ifname: &str) {
        *self.location.lock().unwrap_or_else(|e| e.into_inner()) = (netns.clone(), ifname.to_string());
    }

    fn close(self: Box<Self>) {
        self.delete();
    }
}

impl Drop for KernelDevice {
    fn drop(&mut self) {
        self.delete();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, ParseableParametrized};
    use netlink_packet_generic::GenlHeader;

    #[test]
    fn set_device_message_round_trips() {
        let k = crate::wireguard::KeyPair::generate();
        let peer = crate::wireguard::KeyPair::generate().public;
        let allowed: Vec<IpNetwork> = vec!["172.16.0.2/32".parse().unwrap(), "fd00::/64".parse().unwrap()];
        let msg = set_device_msg(
            "nsmwg-1",
            Some((&k.private, 51820)),
            &peer,
            Some("10.0.0.2:51821".parse().unwrap()),
            &allowed,
            Some(25),
        );
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        let header = GenlHeader { cmd: WireguardCmd::SetDevice.into(), version: 1 };
        let back = WireguardMessage::parse_with_param(&buf[..], header).unwrap();
        assert_eq!(back, msg);
        let peers = back
            .attributes
            .iter()
            .find_map(|a| if let WireguardAttribute::Peers(p) = a { Some(p.clone()) } else { None })
            .unwrap();
        assert_eq!(peers.len(), 1);
        assert!(peers[0].contains(&WireguardPeerAttribute::PersistentKeepalive(25)));
        assert!(back.attributes.contains(&WireguardAttribute::ListenPort(51820)));
        // Update form: no device part, peer must already exist.
        let upd = set_device_msg("nsm-1", None, &peer, None, &allowed, None);
        assert!(!upd.attributes.iter().any(|a| matches!(a, WireguardAttribute::PrivateKey(_))));
        let WireguardAttribute::Peers(p) = &upd.attributes[1] else { panic!() };
        assert!(
            p[0].iter()
                .any(|a| matches!(a, WireguardPeerAttribute::Flags(f) if f.contains(WireguardPeerFlags::UpdateOnly)))
        );
    }

    #[test]
    fn stats_are_read_for_our_peer_only() {
        let peer = crate::wireguard::KeyPair::generate().public;
        let other = crate::wireguard::KeyPair::generate().public;
        let mk = |k: &Key, rx| {
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(*k.as_bytes()),
                WireguardPeerAttribute::RxBytes(rx),
                WireguardPeerAttribute::TxBytes(7),
                WireguardPeerAttribute::LastHandshake(netlink_packet_wireguard::WireguardTimeSpec {
                    seconds: 1_700_000_000,
                    nano_seconds: 5,
                }),
            ])
        };
        let a = vec![WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::Peers(vec![mk(&other, 1), mk(&peer, 42)])],
        }];
        let s = stats_from(&a, &peer);
        assert_eq!((s.rx_bytes, s.tx_bytes), (42, 7));
        assert_eq!(s.last_handshake, Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)));
    }

    #[test]
    fn probe_and_create_on_this_kernel() {
        // Runs in a throwaway namespace so nothing can leak into the host's.
        let ns = nsm_sdk::testing::netns::TestNetns::new("fwdwgk");
        let h = ns.handle().clone();
        let (avail, created) = std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(h.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let k = crate::wireguard::KeyPair::generate();
                let cfg = WgConfig {
                    private_key: k.private.clone(),
                    listen_port: 51820,
                    peer_public_key: crate::wireguard::KeyPair::generate().public,
                    peer_endpoint: None,
                    allowed_ips: vec![],
                    persistent_keepalive: None,
                    mtu: 1420,
                    tun_in: None,
                };
                (kernel_available(), Kernel.create("nsmwgk0", &cfg).map(|d| d.id().name.clone()))
            })
            .join()
            .unwrap()
        });
        let links = String::from_utf8_lossy(&ns.exec(&["ip", "-o", "link"]).stdout).to_string();
        assert!(!links.contains("nsmwg"), "the probe and create leave no link behind: {links}");
        match avail {
            // This kernel has WireGuard: the device must have worked.
            Ok(()) => assert_eq!(created.unwrap(), "nsmwgk0"),
            Err(reason) => {
                assert!(reason.contains("wireguard"), "{reason}");
                let e = created.err().unwrap();
                assert!(matches!(e, WgError::KernelUnsupported { .. }), "{e}");
                assert!(e.to_string().contains("nsmwgk0") && e.to_string().contains("modprobe wireguard"), "{e}");
            }
        }
    }
}
