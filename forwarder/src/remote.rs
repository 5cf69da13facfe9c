//! Remote wires: a VXLAN or WireGuard tunnel between two nodes, with the
//! tunnel device itself as the pod's interface.
//!
//! Two forwarders negotiate the mechanism as upstream does:
//! - the **client side** (the forwarder of the client's node) offers REMOTE
//!   preferences in `NSM_MECHANISM_PRIORITY` order, each with its `src_ip`
//!   (`NSM_TUNNEL_IP`), `src_port` and, for WireGuard, `src_public_key`;
//! - the **server side** (the endpoint's node) picks the first offer it
//!   supports, fills `dst_ip`, `dst_port`, the `vni` (VXLAN) or
//!   `dst_public_key` (WireGuard) and the `MTU`, builds its end into the
//!   endpoint's netns once the endpoint has answered, and returns the
//!   completed mechanism; the client side then builds its end into the
//!   client's netns.
//!
//! # Guarantees
//! - The tunnel's UDP socket lives in the node netns and its netdev in the
//!   pod, under the requested name; the pod sees one plain interface. The
//!   netdev is *created* there rather than moved: VXLAN by a netlink request
//!   from the node netns carrying the pod's netns fd (the kernel keeps the
//!   socket in the requesting netns), the userspace WireGuard TUN by opening
//!   `/dev/net/tun` on a thread inside the pod netns. Same layout as
//!   create-then-move, without the move's RCU waits (~25 ms per device here,
//!   serialised across connections). The kernel WireGuard backend still
//!   moves. MTU = underlay MTU minus the overhead (VXLAN 50/70, WireGuard
//!   60/80 for IPv4/IPv6 underlays).
//! - Bad input (unknown type, missing or malformed `src_ip`/`dst_ip`, ports,
//!   keys, a VNI out of range, a VXLAN port that differs from ours) is
//!   `InvalidArgument` naming the parameter, before anything is built.
//! - A first Request that fails half way removes every device, releases its
//!   port/VNI, closes the WireGuard device (TUN, threads, UAPI socket) and
//!   closes the far side: nothing is left behind.
//! - A refresh keeps the negotiated mechanism, the keys, the port and the
//!   VNI, and reuses the device; a forwarder that restarted adopts a VXLAN
//!   device still in the pod (same VNI, same alias) instead of rebuilding it.
//! - Keys are per connection (each connection has its own device anyway):
//!   a key never serves two connections, so one leaked key exposes one wire.
//! - Close removes the pod's interface and everything behind it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use ipnetwork::IpNetwork;
use nsm_api::connection::{Connection, Mechanism};
use nsm_api::connectioncontext::{ConnectionContext, EthernetContext};
use nsm_api::ext::Cidr;
use nsm_api::mechanisms::{cls, common, kernel, payload, types, vxlan, wireguard as wgm};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_sdk::networkservice::chain::conn_mut;
use nsm_sdk::networkservice::connect::DEFAULT_CALL_TIMEOUT;
use nsm_sdk::networkservice::{Context, Next};
use nsm_sdk::tools::netns::NetnsHandle;
use tonic::Status;

use crate::alloc::{PortLease, PortPool, VniLease, VniTable};
use crate::kernel::{self as k, KernelError, VxlanSpec};
use crate::local::{kernel_error, resolve_netns, stable_ifname};
use crate::wireguard::{Key, KeyPair, WgBackend, WgConfig, WgDevice};

/// Configuration of remote mechanisms.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// This node's tunnel endpoint (`NSM_TUNNEL_IP`).
    pub tunnel_ip: IpAddr,
    /// UDP port of VXLAN on every node (`NSM_VXLAN_PORT`).
    pub vxlan_port: u16,
    /// Mechanism types in preference order (`NSM_MECHANISM_PRIORITY`).
    pub priority: Vec<String>,
    /// WireGuard persistent keepalive (seconds).
    pub keepalive: u16,
    /// MTU of the underlay interface that carries `tunnel_ip`.
    pub underlay_mtu: u32,
}

/// Bytes a tunnel adds to every packet (upstream's MTU table).
pub fn overhead(kind: &str, v6: bool) -> u32 {
    match (kind, v6) {
        (types::VXLAN, false) => 50,
        (types::VXLAN, true) => 70,
        (_, false) => 60,
        (_, true) => 80,
    }
}

/// The remote-mechanism machinery of one forwarder.
pub struct Remote {
    cfg: RemoteConfig,
    node: NetnsHandle,
    wg: Option<Arc<dyn WgBackend>>,
    ports: Arc<PortPool>,
    vnis: Arc<VniTable>,
}

/// A WireGuard device owned by a connection; closed when the last clone
/// goes (Close, failure, or forwarder shutdown).
#[derive(Clone)]
struct WgHandle(Arc<Mutex<Option<Box<dyn WgDevice>>>>);

impl WgHandle {
    fn new(d: Box<dyn WgDevice>) -> WgHandle {
        WgHandle(Arc::new(Mutex::new(Some(d))))
    }
    /// Stops the device: joins its threads, so this runs on a blocking
    /// thread, never on an async worker.
    async fn close(&self) {
        let d = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(d) = d {
            let _ = tokio::task::spawn_blocking(move || d.close()).await;
        }
    }
    fn with<T>(&self, f: impl FnOnce(&dyn WgDevice) -> T) -> Option<T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).as_deref().map(f)
    }
}

/// The netns parameters a client sent (`inodeURL`, `netnsInode`).
pub type NetnsKey = (Option<String>, Option<String>);

/// Which end of the tunnel this forwarder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// What this forwarder built for one remote connection.
#[derive(Clone)]
struct Tunnel {
    side: Side,
    kind: String,
    pod_ns: NetnsHandle,
    pod_if: String,
    node_if: String,
    alias: String,
    /// Client side: the negotiated REMOTE mechanism (sent on refresh and
    /// Close). Server side: the completed incoming mechanism.
    remote_mech: Mechanism,
    /// Server side: the KERNEL mechanism the endpoint chose.
    nse_mech: Option<Mechanism>,
    /// Client side: the netns parameters the client sent.
    client_key: (Option<String>, Option<String>),
    keys: Option<Arc<KeyPair>>,
    port: Option<Arc<PortLease>>,
    vni: Option<Arc<VniLease>>,
    mac: Option<[u8; 6]>,
    wg: Option<WgHandle>,
}

fn param<'a>(m: &'a Mechanism, k: &str) -> Option<&'a str> {
    m.parameters.get(k).map(String::as_str).filter(|v| !v.is_empty())
}

fn need_ip(m: &Mechanism, k: &str) -> Result<IpAddr, Status> {
    let v = param(m, k).ok_or_else(|| Status::invalid_argument(format!("{} mechanism has no {k}", m.r#type)))?;
    v.parse().map_err(|_| Status::invalid_argument(format!("{} mechanism: {k}={v:?} is not an IP address", m.r#type)))
}

fn need_port(m: &Mechanism, k: &str) -> Result<u16, Status> {
    let v = param(m, k).ok_or_else(|| Status::invalid_argument(format!("{} mechanism has no {k}", m.r#type)))?;
    match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Status::invalid_argument(format!("{} mechanism: {k}={v:?} is not a UDP port", m.r#type))),
    }
}

fn need_key(m: &Mechanism, k: &str) -> Result<Key, Status> {
    let v = param(m, k).ok_or_else(|| Status::invalid_argument(format!("{} mechanism has no {k}", m.r#type)))?;
    Key::from_base64(v).map_err(|_| {
        Status::invalid_argument(format!("{} mechanism: {k} is not a base64 WireGuard public key (32 bytes)", m.r#type))
    })
}

fn vni_param(m: &Mechanism) -> Result<Option<u32>, Status> {
    match param(m, vxlan::VNI) {
        None => Ok(None),
        Some(v) => {
            let n: u32 = v
                .parse()
                .map_err(|_| Status::invalid_argument(format!("VXLAN mechanism: vni={v:?} is not a number")))?;
            k::validate_vni(n).map(Some).map_err(|e| Status::invalid_argument(e.to_string()))
        }
    }
}

/// The `MTU` parameter: `None` if absent, `InvalidArgument` if it is not a
/// number or below the IPv4 minimum of 576 (both ends must agree on one
/// value, so a bad one is refused rather than ignored).
fn mtu_param(m: &Mechanism) -> Result<Option<u32>, Status> {
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

/// A unicast, locally administered MAC derived from `seed` (the alias and
/// side): stable for a connection, so a restarted forwarder that adopts its
/// device answers with the MAC the device and the peer's neighbour entry
/// already have.
fn stable_mac(seed: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let b = h.to_be_bytes();
    [(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().ok()?;
    v.try_into().ok()
}

/// The node-netns name of a connection's tunnel device (also the UAPI
/// socket name of a WireGuard device): stable per connection id, unique per
/// node, at most 15 bytes.
pub fn node_ifname(kind: &str, conn_id: &str) -> String {
    let tag = if kind == types::VXLAN { "nsmvx" } else { "nsmwg" };
    let s = stable_ifname(tag, conn_id);
    // stable_ifname gives `<tag>-<4>`; widen to 8 for fewer collisions.
    let extra = stable_ifname("x", &format!("{conn_id}/2"));
    format!("{s}{}", &extra[2..])
}

fn cidrs(v: &[String]) -> Vec<Cidr> {
    v.iter().filter_map(|s| Cidr::parse(s)).collect()
}

fn to_ipnet(c: &Cidr) -> Option<IpNetwork> {
    IpNetwork::new(c.addr, c.len).ok().map(|n| IpNetwork::new(n.network(), c.len).unwrap_or(n))
}

/// The peer's addresses and the prefixes routed towards it: what the
/// WireGuard peer may send us / we send it.
fn allowed_ips(peer_addrs: &[String], routes_to_peer: &[nsm_api::connectioncontext::Route]) -> Vec<IpNetwork> {
    let mut out: Vec<IpNetwork> = vec![];
    for c in cidrs(peer_addrs)
        .iter()
        .chain(routes_to_peer.iter().filter_map(|r| Cidr::parse(&r.prefix)).collect::<Vec<_>>().iter())
    {
        if let Some(n) = to_ipnet(c)
            && !out.contains(&n)
        {
            out.push(n);
        }
    }
    out
}

impl Remote {
    /// Remote mechanisms for a forwarder whose own netns is `node`.
    pub fn new(
        cfg: RemoteConfig,
        node: NetnsHandle,
        wg: Option<Arc<dyn WgBackend>>,
        ports: Arc<PortPool>,
    ) -> Arc<Remote> {
        Arc::new(Remote { cfg, node, wg, ports, vnis: VniTable::new() })
    }

    /// Ports and VNIs currently held (for leak checks).
    pub fn leases(&self) -> (usize, usize) {
        (self.ports.in_use(), self.vnis.in_use())
    }

    fn mtu_for(&self, kind: &str) -> u32 {
        self.cfg.underlay_mtu.saturating_sub(overhead(kind, self.cfg.tunnel_ip.is_ipv6()))
    }

    fn supported(&self) -> Vec<&'static str> {
        let mut v = vec![types::VXLAN];
        if self.wg.is_some() {
            v.push(types::WIREGUARD);
        }
        v
    }

    /// True if this forwarder can serve `t` as the server side.
    pub fn supports(&self, t: &str) -> bool {
        self.supported().contains(&t)
    }

    // === client side ===

    /// The client side: the client is local (incoming KERNEL, resolved to
    /// `pod_ns`), the endpoint is behind another node's nsmgr.
    #[allow(clippy::too_many_arguments)]
    pub async fn client_request(
        &self,
        ctx: &mut Context,
        mut req: NetworkServiceRequest,
        next: Next,
        meta: &nsm_sdk::networkservice::metadata::ConnMetadata,
        incoming: Mechanism,
        pod_ns: NetnsHandle,
        pod_if: String,
        alias: String,
        client_key: (Option<String>, Option<String>),
    ) -> Result<Connection, Status> {
        let prev: Option<Tunnel> = meta.server_get::<Tunnel>().filter(|t| t.side == Side::Client);
        let conn = conn_mut(&mut req);
        let conn_id = conn.id.clone();
        let pl = if conn.payload.is_empty() { payload::ETHERNET.to_string() } else { conn.payload.clone() };

        let keys = prev.as_ref().and_then(|p| p.keys.clone()).unwrap_or_else(|| Arc::new(KeyPair::generate()));
        let wg_offered =
            self.wg.is_some() && pl == payload::IP && self.cfg.priority.iter().any(|t| t == types::WIREGUARD);
        let port = match prev.as_ref().and_then(|p| p.port.clone()) {
            Some(p) => Some(p),
            None if wg_offered => match self.ports.allocate(&HashSet::new()) {
                Ok(l) => Some(Arc::new(l)),
                Err(e) => {
                    // Not fatal: the other mechanisms are still offered.
                    tracing::warn!(error = %e, "not offering WireGuard");
                    None
                }
            },
            None => None,
        };
        let mac = prev.as_ref().and_then(|p| p.mac).unwrap_or_else(|| stable_mac(&format!("{alias}/client")));
        let mut offers = vec![];
        for t in &self.cfg.priority {
            let mut p = HashMap::from([(common::SRC_IP.to_string(), self.cfg.tunnel_ip.to_string())]);
            match t.as_str() {
                types::VXLAN => {
                    p.insert(common::SRC_PORT.into(), self.cfg.vxlan_port.to_string());
                    p.insert(common::MTU.into(), self.mtu_for(types::VXLAN).to_string());
                }
                types::WIREGUARD if pl == payload::IP => {
                    let (Some(_), Some(port)) = (&self.wg, &port) else { continue };
                    p.insert(common::SRC_PORT.into(), port.port().to_string());
                    p.insert(wgm::SRC_PUBLIC_KEY.into(), keys.public.to_base64());
                    p.insert(common::MTU.into(), self.mtu_for(types::WIREGUARD).to_string());
                }
                _ => continue,
            }
            offers.push(Mechanism { cls: cls::REMOTE.into(), r#type: t.clone(), parameters: p });
        }
        if offers.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no remote mechanism for payload {pl} (NSM_MECHANISM_PRIORITY={})",
                self.cfg.priority.join(",")
            )));
        }
        let mut out = req.clone();
        let oc = conn_mut(&mut out);
        oc.mechanism = prev.as_ref().map(|p| p.remote_mech.clone());
        let ectx = oc
            .context
            .get_or_insert_with(ConnectionContext::default)
            .ethernet_context
            .get_or_insert_with(EthernetContext::default);
        ectx.src_mac = fmt_mac(&mac);
        let offered: Vec<String> = offers.iter().map(|m| m.r#type.clone()).collect();
        out.mechanism_preferences = offers;

        let mut res = next.clone().request(ctx, out).await?;

        // The far side now answers with another mechanism type (or the
        // client's netns changed): the old tunnel goes before the new one is
        // built under the same name.
        let prev = match prev {
            Some(p)
                if res.mechanism.as_ref().is_some_and(|m| m.r#type != p.kind) || p.pod_ns.inode() != pod_ns.inode() =>
            {
                tracing::info!(conn_id = %conn_id, old = %p.kind, "the wire changes: removing the old tunnel");
                self.teardown(&p).await;
                meta.server_remove::<Tunnel>();
                None
            }
            other => other,
        };
        let permit = k::BUILD_PERMITS.acquire().await.map_err(|_| Status::internal("build permits closed"))?;
        let built = self
            .client_build(
                &res,
                &offered,
                &pl,
                prev.as_ref(),
                &pod_ns,
                &pod_if,
                &alias,
                &conn_id,
                keys,
                port,
                mac,
                client_key,
            )
            .await;
        drop(permit);
        match built {
            Ok(t) => {
                let mtu = param(&t.remote_mech, common::MTU).and_then(|v| v.parse::<u32>().ok());
                meta.server_insert(t);
                res.mechanism = Some(incoming);
                if let Some(m) = mtu {
                    res.context.get_or_insert_with(ConnectionContext::default).mtu = m;
                }
                Ok(res)
            }
            Err(e) => {
                tracing::warn!(conn_id = %conn_id, error = %e.message(), "building the client end of the tunnel failed");
                if prev.is_none() {
                    let mut cctx = ctx.detached(DEFAULT_CALL_TIMEOUT);
                    cctx.meta = ctx.meta.clone();
                    if let Err(ce) = next.close(&mut cctx, res).await {
                        tracing::warn!(error = %ce.message(), "closing the far side after the failure also failed");
                    }
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn client_build(
        &self,
        res: &Connection,
        offered: &[String],
        pl: &str,
        prev: Option<&Tunnel>,
        pod_ns: &NetnsHandle,
        pod_if: &str,
        alias: &str,
        conn_id: &str,
        keys: Arc<KeyPair>,
        port: Option<Arc<PortLease>>,
        mac: [u8; 6],
        client_key: (Option<String>, Option<String>),
    ) -> Result<Tunnel, Status> {
        let m = res.mechanism.clone().ok_or_else(|| Status::internal("the far side answered without a mechanism"))?;
        if m.cls != cls::REMOTE || !offered.contains(&m.r#type) {
            return Err(Status::internal(format!(
                "the far side chose {} {}, which was not offered ({})",
                m.cls,
                m.r#type,
                offered.join(", ")
            )));
        }
        let dst_ip = need_ip(&m, common::DST_IP)?;
        let dst_port = need_port(&m, common::DST_PORT)?;
        let mtu = mtu_param(&m)?.unwrap_or_else(|| self.mtu_for(&m.r#type)).min(self.mtu_for(&m.r#type));
        let ip = res.context.as_ref().and_then(|c| c.ip_context.clone()).unwrap_or_default();
        let node_if = node_ifname(&m.r#type, conn_id);
        let mut t = Tunnel {
            side: Side::Client,
            kind: m.r#type.clone(),
            pod_ns: pod_ns.clone(),
            pod_if: pod_if.to_string(),
            node_if: node_if.clone(),
            alias: alias.to_string(),
            remote_mech: m.clone(),
            nse_mech: None,
            client_key,
            keys: None,
            port: None,
            vni: None,
            mac: None,
            wg: None,
        };
        // A changed pod netns (a different client) means a new device.
        if let Some(p) = prev
            && p.pod_ns.inode() != pod_ns.inode()
        {
            self.teardown(p).await;
        }
        let reuse = prev.filter(|p| p.pod_ns.inode() == pod_ns.inode() && p.kind == m.r#type);
        let res_build = async {
            match m.r#type.as_str() {
                types::VXLAN => {
                    let vni = vni_param(&m)?.ok_or_else(|| Status::invalid_argument("VXLAN mechanism has no vni"))?;
                    // The far side chose the VNI; it must be free on this node too.
                    let lease = match reuse.and_then(|p| p.vni.clone()).filter(|l| l.vni() == vni) {
                        Some(l) => l,
                        None => Arc::new(self.vnis.claim(vni).ok_or_else(|| {
                            Status::aborted(format!(
                                "VNI {vni} chosen by the far side is already used on this node; retry for another"
                            ))
                        })?),
                    };
                    t.vni = Some(lease);
                    if dst_port != self.cfg.vxlan_port {
                        return Err(Status::invalid_argument(format!(
                            "VXLAN dst_port {dst_port} differs from this node's VXLAN port {}; every node must use the same NSM_VXLAN_PORT",
                            self.cfg.vxlan_port
                        )));
                    }
                    t.mac = Some(mac);
                    let spec = VxlanSpec {
                        name: pod_if.to_string(),
                        vni,
                        local: self.cfg.tunnel_ip,
                        remote: dst_ip,
                        port: dst_port,
                        mtu,
                        mac: Some(mac),
                        alias: alias.to_string(),
                    };
                    self.ensure_vxlan(&spec, pod_ns).await.map_err(vxlan_error)?;
                    if pl == payload::IP
                        && let Some(peer_mac) = res
                            .context
                            .as_ref()
                            .and_then(|c| c.ethernet_context.as_ref())
                            .and_then(|e| parse_mac(&e.dst_mac))
                    {
                        for c in cidrs(&ip.dst_ip_addrs) {
                            k::set_neighbor(pod_ns, pod_if, c.addr, peer_mac).await.map_err(kernel_error)?;
                        }
                    }
                }
                _ => {
                    let wg = self.wg.clone().ok_or_else(|| Status::internal("WireGuard chosen but no backend"))?;
                    let peer = need_key(&m, wgm::DST_PUBLIC_KEY)?;
                    let port = port.clone().ok_or_else(|| Status::internal("no WireGuard port allocated"))?;
                    let allowed = allowed_ips(&ip.dst_ip_addrs, &ip.src_routes);
                    let endpoint = SocketAddr::new(dst_ip, dst_port);
                    let keepalive = Some(self.cfg.keepalive).filter(|k| *k > 0);
                    let existing = reuse.and_then(|p| p.wg.clone()).filter(|h| {
                        h.with(|d| d.public_key() == keys.public).unwrap_or(false)
                    });
                    let handle = match existing {
                        Some(h) if reuse.is_some_and(|p| param(&p.remote_mech, wgm::DST_PUBLIC_KEY) == param(&m, wgm::DST_PUBLIC_KEY)) => {
                            h.with(|d| d.update_peer(Some(endpoint), &allowed, keepalive))
                                .transpose()
                                .map_err(|e| Status::internal(e.to_string()))?;
                            h
                        }
                        other => {
                            if let Some(h) = other {
                                h.close().await;
                            }
                            let cfg = WgConfig {
                                private_key: keys.private.clone(),
                                listen_port: port.port(),
                                peer_public_key: peer,
                                peer_endpoint: Some(endpoint),
                                allowed_ips: allowed,
                                persistent_keepalive: keepalive,
                                mtu,
                                tun_in: None,
                            };
                            self.create_wg(wg, &node_if, cfg, pod_ns, pod_if, alias).await?
                        }
                    };
                    t.wg = Some(handle);
                    t.keys = Some(keys.clone());
                    t.port = Some(port);
                }
            }
            let src = cidrs(&ip.src_ip_addrs);
            k::apply_addresses(pod_ns, pod_if, &src).await.map_err(kernel_error)?;
            let mut routes = ip.dst_ip_routes();
            routes.extend(ip.src_routes_with_explicit_next_hop());
            k::apply_routes(pod_ns, pod_if, &routes).await.map_err(kernel_error)?;
            k::open_ping_group_range(pod_ns).await.map_err(kernel_error)?;
            Ok(())
        }
        .await;
        match res_build {
            Ok(()) => {
                tracing::info!(
                    kind = %t.kind,
                    pod_if = %format!("{} in {}", pod_if, pod_ns.describe()),
                    node_if = %t.node_if,
                    peer = %dst_ip,
                    mtu,
                    "client end of the tunnel ready"
                );
                Ok(t)
            }
            Err(e) => {
                if reuse.is_none() {
                    self.teardown(&t).await;
                }
                Err(e)
            }
        }
    }

    // === server side ===

    /// Picks the REMOTE mechanism to serve: the one already negotiated, or
    /// the first offer this forwarder supports.
    pub fn choose(&self, req: &NetworkServiceRequest) -> Result<Mechanism, Status> {
        let ip_payload = req.connection.as_ref().is_some_and(|c| c.payload == payload::IP);
        // WireGuard carries IP packets only: never for an ETHERNET service.
        let fits = |m: &Mechanism| {
            m.cls == cls::REMOTE && self.supports(&m.r#type) && (m.r#type != types::WIREGUARD || ip_payload)
        };
        if let Some(m) = req.connection.as_ref().and_then(|c| c.mechanism.as_ref())
            && fits(m)
        {
            return Ok(m.clone());
        }
        req.mechanism_preferences.iter().find(|m| fits(m)).cloned().ok_or_else(|| {
            let offered: Vec<_> = req.mechanism_preferences.iter().map(|m| format!("{} {}", m.cls, m.r#type)).collect();
            Status::invalid_argument(format!(
                "no supported REMOTE mechanism among [{}] for {} payload (this forwarder supports {}; WireGuard carries IP payload only)",
                offered.join(", "),
                if ip_payload { "IP" } else { "ETHERNET" },
                self.supported().join(", ")
            ))
        })
    }

    /// The server side: the request came from another node's forwarder with
    /// REMOTE offers; the endpoint is local.
    pub async fn server_request(
        &self,
        ctx: &mut Context,
        mut req: NetworkServiceRequest,
        next: Next,
        meta: &nsm_sdk::networkservice::metadata::ConnMetadata,
        alias: String,
    ) -> Result<Connection, Status> {
        let prev: Option<Tunnel> = meta.server_get::<Tunnel>().filter(|t| t.side == Side::Server);
        let chosen = self.choose(&req)?;
        // Reuse what was negotiated before if the client still offers it.
        let mut incoming = match &prev {
            Some(p) if p.kind == chosen.r#type => {
                let mut m = p.remote_mech.clone();
                for k in [common::SRC_IP, common::SRC_PORT, wgm::SRC_PUBLIC_KEY] {
                    if let Some(v) = param(&chosen, k) {
                        m.parameters.insert(k.to_string(), v.to_string());
                    }
                }
                m
            }
            _ => chosen.clone(),
        };
        let src_ip = need_ip(&incoming, common::SRC_IP)?;
        let src_port = need_port(&incoming, common::SRC_PORT)?;
        let conn = conn_mut(&mut req);
        let conn_id = conn.id.clone();
        let pl = if conn.payload.is_empty() { payload::ETHERNET.to_string() } else { conn.payload.clone() };
        let mtu = mtu_param(&chosen)?.unwrap_or(u32::MAX).min(self.mtu_for(&incoming.r#type));
        let mut keys = None;
        let mut port = None;
        let mut vni = None;
        let mac = prev.as_ref().and_then(|p| p.mac).unwrap_or_else(|| stable_mac(&format!("{alias}/server")));
        incoming.parameters.insert(common::DST_IP.into(), self.cfg.tunnel_ip.to_string());
        incoming.parameters.insert(common::MTU.into(), mtu.to_string());
        match incoming.r#type.as_str() {
            types::VXLAN => {
                if src_port != self.cfg.vxlan_port {
                    return Err(Status::invalid_argument(format!(
                        "VXLAN src_port {src_port} differs from this node's VXLAN port {}; every node must use the same NSM_VXLAN_PORT",
                        self.cfg.vxlan_port
                    )));
                }
                // A VNI negotiated before (a refresh, or we restarted) is
                // kept, so the device in the pod is reused or adopted; a new
                // tunnel gets one by upstream's even/odd rule (replaced below
                // if the kernel refuses it).
                let lease = match prev.as_ref().and_then(|p| p.vni.clone()) {
                    Some(l) => l,
                    None => Arc::new(self.claim_vni(src_ip, vni_param(&chosen)?)?),
                };
                incoming.parameters.insert(common::DST_PORT.into(), self.cfg.vxlan_port.to_string());
                incoming.parameters.insert(vxlan::VNI.into(), lease.vni().to_string());
                vni = Some(lease);
                let e = conn
                    .context
                    .get_or_insert_with(ConnectionContext::default)
                    .ethernet_context
                    .get_or_insert_with(EthernetContext::default);
                e.dst_mac = fmt_mac(&mac);
            }
            _ => {
                need_key(&chosen, wgm::SRC_PUBLIC_KEY)?;
                let kp = prev.as_ref().and_then(|p| p.keys.clone()).unwrap_or_else(|| Arc::new(KeyPair::generate()));
                let lease = match prev.as_ref().and_then(|p| p.port.clone()) {
                    Some(l) => l,
                    None => Arc::new(self.ports.allocate(&HashSet::new()).map_err(Status::resource_exhausted)?),
                };
                incoming.parameters.insert(common::DST_PORT.into(), lease.port().to_string());
                incoming.parameters.insert(wgm::DST_PUBLIC_KEY.into(), kp.public.to_base64());
                keys = Some(kp);
                port = Some(lease);
            }
        }
        let conn = conn_mut(&mut req);
        conn.mechanism = Some(incoming.clone());

        // Ask the local endpoint with a KERNEL mechanism of our own.
        let nse_if = prev
            .as_ref()
            .and_then(|p| p.nse_mech.as_ref())
            .and_then(|m| param(m, kernel::NAME).map(str::to_string))
            .unwrap_or_else(|| stable_ifname(&conn.network_service, &conn_id));
        let mut out = req.clone();
        let oc = conn_mut(&mut out);
        oc.mechanism = prev.as_ref().and_then(|p| p.nse_mech.clone());
        out.mechanism_preferences = vec![Mechanism {
            cls: cls::LOCAL.into(),
            r#type: kernel::MECHANISM.into(),
            parameters: HashMap::from([(kernel::NAME.to_string(), nse_if.clone())]),
        }];
        let mut res = next.clone().request(ctx, out).await?;

        let permit = k::BUILD_PERMITS.acquire().await.map_err(|_| Status::internal("build permits closed"))?;
        let built = async {
            let nse_mech = res
                .mechanism
                .clone()
                .filter(|m| m.r#type == kernel::MECHANISM)
                .ok_or_else(|| Status::internal("the endpoint answered without a KERNEL mechanism"))?;
            let nse_if = param(&nse_mech, kernel::NAME).map(str::to_string).unwrap_or(nse_if.clone());
            k::validate_ifname(&nse_if).map_err(kernel_error)?;
            let nse_ns = match &prev {
                Some(p)
                    if p.nse_mech.as_ref().map(crate::local::netns_key) == Some(crate::local::netns_key(&nse_mech)) =>
                {
                    p.pod_ns.clone()
                }
                _ => resolve_netns(&nse_mech, "endpoint").await?,
            };
            let mut t = Tunnel {
                side: Side::Server,
                kind: incoming.r#type.clone(),
                pod_ns: nse_ns.clone(),
                pod_if: nse_if.clone(),
                node_if: node_ifname(&incoming.r#type, &conn_id),
                alias: alias.clone(),
                remote_mech: incoming.clone(),
                nse_mech: Some(nse_mech),
                client_key: (None, None),
                keys: keys.clone(),
                port: port.clone(),
                vni: vni.clone(),
                mac: None,
                wg: None,
            };
            if let Some(p) = &prev
                && (p.pod_ns.inode() != nse_ns.inode() || p.pod_if != nse_if || p.kind != t.kind)
            {
                self.teardown(p).await;
            }
            let same =
                prev.as_ref().filter(|p| p.pod_ns.inode() == nse_ns.inode() && p.pod_if == nse_if && p.kind == t.kind);
            let ip = res.context.as_ref().and_then(|c| c.ip_context.clone()).unwrap_or_default();
            let r = async {
                match t.kind.as_str() {
                    types::VXLAN => {
                        t.mac = Some(mac);
                        let mut spec = VxlanSpec {
                            name: nse_if.clone(),
                            vni: vni.as_ref().map(|v| v.vni()).unwrap_or_default(),
                            local: self.cfg.tunnel_ip,
                            remote: src_ip,
                            port: self.cfg.vxlan_port,
                            mtu,
                            mac: Some(mac),
                            alias: alias.clone(),
                        };
                        // A VNI the kernel refuses (a device this table does
                        // not know, e.g. another forwarder's) is replaced,
                        // unless it was negotiated before.
                        let negotiated = prev.is_some() || vni_param(&chosen)?.is_some();
                        let mut attempts = 0;
                        loop {
                            match self.ensure_vxlan(&spec, &nse_ns).await {
                                Ok(()) => break,
                                Err(KernelError::VniInUse { .. }) if !negotiated && attempts < 8 => {
                                    attempts += 1;
                                    let l = Arc::new(self.claim_vni(src_ip, None)?);
                                    spec.vni = l.vni();
                                    t.remote_mech.parameters.insert(vxlan::VNI.into(), l.vni().to_string());
                                    t.vni = Some(l);
                                }
                                Err(e) => return Err(vxlan_error(e)),
                            }
                        }
                        if pl == payload::IP
                            && let Some(peer_mac) = res
                                .context
                                .as_ref()
                                .and_then(|c| c.ethernet_context.as_ref())
                                .and_then(|e| parse_mac(&e.src_mac))
                        {
                            for c in cidrs(&ip.src_ip_addrs) {
                                k::set_neighbor(&nse_ns, &nse_if, c.addr, peer_mac).await.map_err(kernel_error)?;
                            }
                        }
                    }
                    _ => {
                        let wg = self.wg.clone().ok_or_else(|| Status::internal("WireGuard chosen but no backend"))?;
                        let peer = need_key(&incoming, wgm::SRC_PUBLIC_KEY)?;
                        let allowed = allowed_ips(&ip.src_ip_addrs, &ip.dst_routes);
                        let endpoint = SocketAddr::new(src_ip, src_port);
                        let keepalive = Some(self.cfg.keepalive).filter(|k| *k > 0);
                        let kp = keys.clone().ok_or_else(|| Status::internal("no WireGuard keys"))?;
                        let port = port.clone().ok_or_else(|| Status::internal("no WireGuard port"))?;
                        let existing = same.and_then(|p| p.wg.clone()).filter(|h| {
                            same.is_some_and(|p| {
                                param(&p.remote_mech, wgm::SRC_PUBLIC_KEY) == param(&incoming, wgm::SRC_PUBLIC_KEY)
                            }) && h.with(|_| true).unwrap_or(false)
                        });
                        let handle = match existing {
                            Some(h) => {
                                h.with(|d| d.update_peer(Some(endpoint), &allowed, keepalive))
                                    .transpose()
                                    .map_err(|e| Status::internal(e.to_string()))?;
                                h
                            }
                            None => {
                                if let Some(h) = same.and_then(|p| p.wg.clone()) {
                                    // The client's key changed (it restarted): rebuild.
                                    h.close().await;
                                    let _ = k::delete_link(&nse_ns, &nse_if, Some(&alias)).await;
                                }
                                let cfg = WgConfig {
                                    private_key: kp.private.clone(),
                                    listen_port: port.port(),
                                    peer_public_key: peer,
                                    peer_endpoint: Some(endpoint),
                                    allowed_ips: allowed,
                                    persistent_keepalive: keepalive,
                                    mtu,
                                    tun_in: None,
                                };
                                self.create_wg(wg, &t.node_if, cfg, &nse_ns, &nse_if, &alias).await?
                            }
                        };
                        t.wg = Some(handle);
                    }
                }
                let dst = cidrs(&ip.dst_ip_addrs);
                k::apply_addresses(&nse_ns, &nse_if, &dst).await.map_err(kernel_error)?;
                let mut routes = ip.src_ip_routes();
                routes.extend(ip.dst_routes_with_explicit_next_hop());
                k::apply_routes(&nse_ns, &nse_if, &routes).await.map_err(kernel_error)?;
                Ok::<(), Status>(())
            }
            .await;
            match r {
                Ok(()) => Ok(t),
                Err(e) => {
                    if same.is_none() {
                        self.teardown(&t).await;
                    }
                    Err(e)
                }
            }
        }
        .await;
        drop(permit);
        match built {
            Ok(t) => {
                tracing::info!(
                    kind = %t.kind,
                    pod_if = %format!("{} in {}", t.pod_if, t.pod_ns.describe()),
                    node_if = %t.node_if,
                    peer = %src_ip,
                    mtu,
                    "endpoint end of the tunnel ready"
                );
                // The mechanism as built (the VNI may have been replaced).
                let m = t.remote_mech.clone();
                meta.server_insert(t);
                res.mechanism = Some(m);
                res.context.get_or_insert_with(ConnectionContext::default).mtu = mtu;
                Ok(res)
            }
            Err(e) => {
                tracing::warn!(conn_id = %conn_id, error = %e.message(), "building the endpoint end of the tunnel failed");
                if prev.is_none() {
                    let mut cctx = ctx.detached(DEFAULT_CALL_TIMEOUT);
                    cctx.meta = ctx.meta.clone();
                    let _ = next.close(&mut cctx, res).await;
                }
                Err(e)
            }
        }
    }

    fn claim_vni(&self, peer: IpAddr, asked: Option<u32>) -> Result<VniLease, Status> {
        if let Some(v) = asked {
            return self.vnis.claim(v).ok_or_else(|| {
                Status::already_exists(format!("VNI {v} (towards {peer}) is already in use on this node"))
            });
        }
        for _ in 0..64 {
            let v = k::generate_vni(peer, self.cfg.tunnel_ip, |v| self.vnis.vni_in_use(v));
            if let Some(l) = self.vnis.claim(v) {
                return Ok(l);
            }
        }
        Err(Status::resource_exhausted(format!("could not find a free VNI towards {peer}")))
    }

    // === devices ===

    /// Creates the VXLAN device in the pod (its UDP socket in the node
    /// netns) unless the pod already has it (refresh, or adoption after a
    /// restart).
    async fn ensure_vxlan(&self, spec: &VxlanSpec, pod_ns: &NetnsHandle) -> Result<(), KernelError> {
        // `create_vxlan_in` reuses a device of ours with the same VNI,
        // remote and port (fixing MTU/MAC drift), and replaces one whose
        // parameters changed.
        k::create_vxlan_in(&self.node, pod_ns, spec).await.map(|_| ())
    }

    async fn create_wg(
        &self,
        wg: Arc<dyn WgBackend>,
        node_if: &str,
        cfg: WgConfig,
        pod_ns: &NetnsHandle,
        pod_if: &str,
        alias: &str,
    ) -> Result<WgHandle, Status> {
        let name = node_if.to_string();
        let port = cfg.listen_port;
        let in_place = wg.kind() == "userspace";
        let mut cfg = cfg;
        if in_place {
            // The TUN is born in the pod under its final name; the UDP
            // socket stays in this (the node's) netns.
            cfg.tun_in = Some((pod_ns.clone(), pod_if.to_string()));
        }
        // Creating the device opens the TUN and binds the UDP socket and
        // starts its threads: keep it off the async workers.
        let dev = tokio::task::spawn_blocking(move || wg.create(&name, &cfg))
            .await
            .map_err(|e| Status::internal(format!("WireGuard device task failed: {e}")))?
            .map_err(|e| match e {
                crate::wireguard::WgError::PortInUse { .. } => Status::unavailable(format!(
                    "WireGuard port {port} is in use on this node by something else; the next attempt picks another: {e}"
                )),
                e @ crate::wireguard::WgError::NameTaken { .. } => Status::already_exists(e.to_string()),
                other => Status::internal(other.to_string()),
            })?;
        let h = WgHandle::new(dev);
        let placed = if in_place {
            k::set_alias(pod_ns, pod_if, alias).await
        } else {
            k::move_and_rename(&self.node, node_if, pod_ns, pod_if, alias).await.map(|_| ())
        };
        if let Err(e) = placed {
            h.close().await;
            return Err(kernel_error(e));
        }
        // The kernel backend configures the link where it now lives.
        h.with(|d| d.relocated(pod_ns, pod_if));
        Ok(h)
    }

    /// Removes what `t` built (best effort) and releases its leases (when
    /// the last clone of `t` is dropped).
    async fn teardown(&self, t: &Tunnel) {
        if let Some(h) = &t.wg {
            h.close().await;
        }
        if let Err(e) = k::delete_link(&t.pod_ns, &t.pod_if, Some(&t.alias)).await {
            tracing::warn!(ifname = %t.pod_if, netns = %t.pod_ns.describe(), error = %e, "removing the tunnel interface failed");
        }
        let _ = k::delete_link(&self.node, &t.node_if, Some(&t.alias)).await;
    }

    /// Close of a connection with a remote wire. Returns the mechanism the
    /// next hop should see (the negotiated REMOTE one on the client side,
    /// the endpoint's KERNEL one on the server side), or `None` if this
    /// process has no record of the connection.
    pub async fn close(&self, meta: Option<&nsm_sdk::networkservice::metadata::ConnMetadata>) -> Option<Mechanism> {
        let t = meta.and_then(|m| m.server_remove::<Tunnel>())?;
        self.teardown(&t).await;
        match t.side {
            Side::Client => Some(t.remote_mech.clone()),
            Side::Server => t.nse_mech.clone(),
        }
    }

    /// Tears down and forgets the remote wire recorded in `meta` (the
    /// connection's endpoint moved to this node).
    pub async fn drop_tunnel(&self, meta: &nsm_sdk::networkservice::metadata::ConnMetadata) {
        if let Some(t) = meta.server_remove::<Tunnel>() {
            self.teardown(&t).await;
        }
    }

    /// True if `meta` holds a remote wire.
    pub fn has_tunnel(meta: &nsm_sdk::networkservice::metadata::ConnMetadata) -> bool {
        meta.server_get::<Tunnel>().is_some()
    }

    /// The client netns (and the parameters that named it) recorded for a
    /// client-side wire.
    pub fn client_pod(meta: &nsm_sdk::networkservice::metadata::ConnMetadata) -> Option<(NetnsKey, NetnsHandle)> {
        meta.server_get::<Tunnel>().filter(|t| t.side == Side::Client).map(|t| (t.client_key, t.pod_ns))
    }
}

fn vxlan_error(e: KernelError) -> Status {
    match &e {
        // Retryable: the next attempt negotiates another VNI.
        KernelError::VniInUse { .. } => Status::aborted(e.to_string()),
        KernelError::PortInUse { .. } => Status::unavailable(e.to_string()),
        KernelError::InvalidVni { .. } => Status::invalid_argument(e.to_string()),
        _ => kernel_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overheads_and_names() {
        assert_eq!(overhead(types::VXLAN, false), 50);
        assert_eq!(overhead(types::VXLAN, true), 70);
        assert_eq!(overhead(types::WIREGUARD, false), 60);
        assert_eq!(overhead(types::WIREGUARD, true), 80);
        let n = node_ifname(types::WIREGUARD, "a-conn-id");
        assert!(n.starts_with("nsmwg-") && n.len() <= 15, "{n}");
        assert_eq!(n, node_ifname(types::WIREGUARD, "a-conn-id"));
        assert_ne!(n, node_ifname(types::WIREGUARD, "b-conn-id"));
        assert!(node_ifname(types::VXLAN, "x").starts_with("nsmvx-"));
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
            ]),
        };
        assert_eq!(need_ip(&m, "src_ip").unwrap().to_string(), "10.0.0.1");
        assert!(need_ip(&m, "dst_ip").unwrap_err().message().contains("no dst_ip"));
        assert!(need_port(&m, "src_port").unwrap_err().message().contains("src_port=\"0\""));
        assert!(need_key(&m, "src_public_key").unwrap_err().message().contains("base64"));
        assert_eq!(vni_param(&m).unwrap_err().code(), tonic::Code::InvalidArgument);
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
            &["172.16.1.2/32".into()],
            &[nsm_api::connectioncontext::Route { prefix: "10.9.0.7/16".into(), next_hop: String::new() }],
        );
        assert_eq!(a.iter().map(|n| n.to_string()).collect::<Vec<_>>(), ["172.16.1.2/32", "10.9.0.0/16"]);
    }
}
