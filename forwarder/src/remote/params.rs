//! Remote mechanism parameters: the kinds of tunnel, reading and checking
//! the parameters of an offer or an answer, and the values both ends derive
//! (MACs, device names, WireGuard allowed IPs).
//!
//! Every malformed parameter is `InvalidArgument` naming the mechanism
//! type, the parameter and its value, before anything is built.

use ipnetwork::IpNetwork;
use nsm_api::connection::Mechanism;
use nsm_api::connectioncontext::Route;
use nsm_api::ext::Cidr;
use nsm_api::mechanisms::{common, types, vxlan};
use tonic::Status;

use crate::kernel as k;
use crate::local::stable_ifname;
use crate::wireguard::Key;

/// The tunnels this forwarder builds between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MechanismKind {
    /// Kernel VXLAN: ETHERNET payload, or IP payload when asked.
    Vxlan,
    /// WireGuard (kernel or userspace backend): IP payload only.
    Wireguard,
}

impl MechanismKind {
    /// Every kind, in the default preference order of `NSM_MECHANISM_PRIORITY`.
    pub const ALL: [MechanismKind; 2] = [MechanismKind::Wireguard, MechanismKind::Vxlan];

    /// The kind named `s` (ASCII case-insensitive, as in
    /// `NSM_MECHANISM_PRIORITY`).
    pub fn parse(s: &str) -> Option<MechanismKind> {
        MechanismKind::ALL.into_iter().find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// The kind of a mechanism as it travels (exact type string).
    pub fn of(m: &Mechanism) -> Option<MechanismKind> {
        MechanismKind::ALL.into_iter().find(|k| k.as_str() == m.r#type)
    }

    /// The mechanism type on the wire (`VXLAN`, `WIREGUARD`).
    pub fn as_str(self) -> &'static str {
        match self {
            MechanismKind::Vxlan => types::VXLAN,
            MechanismKind::Wireguard => types::WIREGUARD,
        }
    }

    /// Bytes the tunnel adds to every packet (upstream's MTU table) over an
    /// IPv4 or IPv6 underlay.
    pub fn overhead(self, v6: bool) -> u32 {
        match (self, v6) {
            (MechanismKind::Vxlan, false) => 50,
            (MechanismKind::Vxlan, true) => 70,
            (MechanismKind::Wireguard, false) => 60,
            (MechanismKind::Wireguard, true) => 80,
        }
    }
}

impl std::fmt::Display for MechanismKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A non-empty parameter.
pub(crate) fn param<'a>(m: &'a Mechanism, k: &str) -> Option<&'a str> {
    m.parameters.get(k).map(String::as_str).filter(|v| !v.is_empty())
}

fn need<'a>(m: &'a Mechanism, k: &str) -> Result<&'a str, Status> {
    param(m, k).ok_or_else(|| Status::invalid_argument(format!("{} mechanism has no {k}", m.r#type)))
}

pub(crate) fn need_ip(m: &Mechanism, k: &str) -> Result<std::net::IpAddr, Status> {
    let v = need(m, k)?;
    v.parse().map_err(|_| Status::invalid_argument(format!("{} mechanism: {k}={v:?} is not an IP address", m.r#type)))
}

pub(crate) fn need_port(m: &Mechanism, k: &str) -> Result<u16, Status> {
    let v = need(m, k)?;
    match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Status::invalid_argument(format!("{} mechanism: {k}={v:?} is not a UDP port", m.r#type))),
    }
}

pub(crate) fn need_key(m: &Mechanism, k: &str) -> Result<Key, Status> {
    let v = need(m, k)?;
    Key::from_base64(v).map_err(|_| {
        Status::invalid_argument(format!("{} mechanism: {k} is not a base64 WireGuard public key (32 bytes)", m.r#type))
    })
}

/// The `vni` parameter: `None` if absent.
pub(crate) fn vni_param(m: &Mechanism) -> Result<Option<u32>, Status> {
    match param(m, vxlan::VNI) {
        None => Ok(None),
        Some(v) => {
            let n: u32 = v
                .parse()
                .map_err(|_| Status::invalid_argument(format!("VXLAN mechanism: vni={v:?} is not a number")))?;
            Ok(Some(k::validate_vni(n)?))
        }
    }
}

/// The `MTU` parameter: `None` if absent, `InvalidArgument` if it is not a
/// number or below the IPv4 minimum of 576 (both ends must agree on one
/// value, so a bad one is refused rather than ignored).
pub(crate) fn mtu_param(m: &Mechanism) -> Result<Option<u32>, Status> {
    match param(m, common::MTU) {
        None => Ok(None),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n >= 576 => Ok(Some(n)),
            _ => Err(Status::invalid_argument(format!(
                "{} mechanism: MTU={v:?} is not a usable MTU (576 or more)",
                m.r#type
            ))),
        },
    }
}

/// Refuses a VXLAN port other than ours: the kernel receives VXLAN on one
/// port per node, so every node must use the same one.
pub(crate) fn same_vxlan_port(what: &str, theirs: u16, ours: u16) -> Result<(), Status> {
    if theirs == ours {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "VXLAN {what} {theirs} differs from this node's VXLAN port {ours}; every node must use the same NSM_VXLAN_PORT"
    )))
}

/// A unicast, locally administered MAC derived from `seed` (the alias and
/// side): stable for a connection, so a restarted forwarder that adopts its
/// device answers with the MAC the device and the peer's neighbour entry
/// already have.
pub(crate) fn stable_mac(seed: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let b = h.to_be_bytes();
    [(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

pub(crate) fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().ok()?;
    v.try_into().ok()
}

/// The node-netns name of a connection's tunnel device (also the UAPI
/// socket name of a WireGuard device): stable per connection id, unique per
/// node, at most 15 bytes.
pub fn node_ifname(kind: MechanismKind, conn_id: &str) -> String {
    let tag = match kind {
        MechanismKind::Vxlan => "nsmvx",
        MechanismKind::Wireguard => "nsmwg",
    };
    let s = stable_ifname(tag, conn_id);
    // stable_ifname gives `<tag>-<4>`; widen to 8 for fewer collisions.
    let extra = stable_ifname("x", &format!("{conn_id}/2"));
    format!("{s}{}", &extra[2..])
}

/// The peer's addresses and the prefixes routed towards it: what the
/// WireGuard peer may send us / we send it.
pub(crate) fn allowed_ips(peer_addrs: &[Cidr], routes_to_peer: &[Route]) -> Vec<IpNetwork> {
    let mut out: Vec<IpNetwork> = vec![];
    let routed: Vec<Cidr> = routes_to_peer.iter().filter_map(|r| Cidr::parse(&r.prefix)).collect();
    for c in peer_addrs.iter().chain(routed.iter()) {
        if let Ok(n) = IpNetwork::new(c.addr, c.len)
            && let Ok(n) = IpNetwork::new(n.network(), c.len)
            && !out.contains(&n)
        {
            out.push(n);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn kinds_overheads_and_names() {
        assert_eq!(MechanismKind::parse(" vxlan "), Some(MechanismKind::Vxlan));
        assert_eq!(MechanismKind::parse("IPSEC"), None);
        assert_eq!(MechanismKind::Vxlan.overhead(false), 50);
        assert_eq!(MechanismKind::Vxlan.overhead(true), 70);
        assert_eq!(MechanismKind::Wireguard.overhead(false), 60);
        assert_eq!(MechanismKind::Wireguard.overhead(true), 80);
        let n = node_ifname(MechanismKind::Wireguard, "a-conn-id");
        assert!(n.starts_with("nsmwg-") && n.len() <= 15, "{n}");
        assert_eq!(n, node_ifname(MechanismKind::Wireguard, "a-conn-id"));
        assert_ne!(n, node_ifname(MechanismKind::Wireguard, "b-conn-id"));
        assert!(node_ifname(MechanismKind::Vxlan, "x").starts_with("nsmvx-"));
    }

    #[test]
    fn params_are_validated_with_names() {
        let m = Mechanism {
            cls: "REMOTE".into(),
            r#type: "WIREGUARD".into(),
            parameters: HashMap::from([
                ("src_ip".into(), "10.0.0.1".into()),
                ("src_port".into(), "0".into()),
                ("src_public_key".into(), "not-base64!".into()),
                ("vni".into(), "16777216".into()),
                ("MTU".into(), "575".into()),
            ]),
        };
        assert_eq!(MechanismKind::of(&m), Some(MechanismKind::Wireguard));
        assert_eq!(need_ip(&m, "src_ip").unwrap().to_string(), "10.0.0.1");
        assert!(need_ip(&m, "dst_ip").unwrap_err().message().contains("no dst_ip"));
        assert!(need_port(&m, "src_port").unwrap_err().message().contains("src_port=\"0\""));
        assert!(need_key(&m, "src_public_key").unwrap_err().message().contains("base64"));
        assert_eq!(vni_param(&m).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(mtu_param(&m).unwrap_err().message().contains("MTU=\"575\""));
        let e = same_vxlan_port("dst_port", 4790, 4789).unwrap_err();
        assert!(e.message().contains("4790") && e.message().contains("NSM_VXLAN_PORT"), "{}", e.message());
    }

    #[test]
    fn macs_and_allowed_ips() {
        let m = stable_mac("nsm:f@1:c/client");
        assert_eq!(m, stable_mac("nsm:f@1:c/client"), "stable");
        assert_ne!(m, stable_mac("nsm:f@1:c/server"));
        assert_eq!(m[0] & 0x01, 0, "unicast");
        assert_eq!(m[0] & 0x02, 0x02, "locally administered");
        assert_eq!(parse_mac(&fmt_mac(&m)), Some(m));
        let a = allowed_ips(
            &[Cidr::parse("172.16.1.2/32").unwrap()],
            &[Route { prefix: "10.9.0.7/16".into(), next_hop: String::new() }],
        );
        assert_eq!(a.iter().map(|n| n.to_string()).collect::<Vec<_>>(), ["172.16.1.2/32", "10.9.0.0/16"]);
    }
}
