//! The client side of a remote wire: the forwarder of the client's node
//! offers REMOTE mechanisms to the far side (another node's nsmgr), then
//! builds its end of the tunnel the far side chose into the client's netns.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use nsm_api::connection::{Connection, Mechanism};
use nsm_api::connectioncontext::{ConnectionContext, EthernetContext};
use nsm_api::mechanisms::{cls, common, payload, wireguard as wgm};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_sdk::networkservice::chain::conn_mut;
use nsm_sdk::networkservice::metadata::ConnMetadata;
use nsm_sdk::networkservice::{Context, Next};
use nsm_sdk::tools::netns::NetnsHandle;
use tonic::Status;

use super::params::{
    MechanismKind, allowed_ips, fmt_mac, mtu_param, need_ip, need_key, need_port, node_ifname, param, parse_mac,
    same_vxlan_port, stable_mac, vni_param,
};
use super::tunnel::{Side, Tunnel, WgEnd};
use super::{Remote, built_failed};
use crate::alloc::PortLease;
use crate::ipcontext::{self, End};
use crate::kernel::{self as k, VxlanSpec};
use crate::local::NetnsKey;
use crate::wireguard::KeyPair;

/// The client's end as `xconnect` found it.
pub struct ClientEnd {
    /// The incoming KERNEL mechanism (returned to the client).
    pub incoming: Mechanism,
    /// The client's netns, positively resolved.
    pub pod_ns: NetnsHandle,
    /// The interface name the client asked for.
    pub pod_if: String,
    /// The interfaces' alias.
    pub alias: String,
    /// The netns parameters the client sent.
    pub key: NetnsKey,
}

/// What the client side keeps between offering and building.
struct Offer {
    kinds: Vec<MechanismKind>,
    payload: String,
    keys: Arc<KeyPair>,
    port: Option<Arc<PortLease>>,
    mac: [u8; 6],
}

impl Remote {
    /// The REMOTE preferences this side offers, in `NSM_MECHANISM_PRIORITY`
    /// order: VXLAN always, WireGuard when there is a backend, the payload
    /// is IP and a port could be had.
    fn offers(&self, pl: &str, keys: &KeyPair, port: Option<&PortLease>) -> Vec<Mechanism> {
        let mut offers = vec![];
        for kind in &self.cfg.priority {
            let mut p = HashMap::from([(common::SRC_IP.to_string(), self.cfg.tunnel_ip.to_string())]);
            match kind {
                MechanismKind::Vxlan => {
                    p.insert(common::SRC_PORT.into(), self.cfg.vxlan_port.to_string());
                }
                MechanismKind::Wireguard => {
                    let (Some(_), Some(port), true) = (&self.wg, port, pl == payload::IP) else { continue };
                    p.insert(common::SRC_PORT.into(), port.port().to_string());
                    p.insert(wgm::SRC_PUBLIC_KEY.into(), keys.public.to_base64());
                }
            }
            p.insert(common::MTU.into(), self.mtu_for(*kind).to_string());
            offers.push(Mechanism { cls: cls::REMOTE.into(), r#type: kind.as_str().into(), parameters: p });
        }
        offers
    }

    /// The client side: the client is local (incoming KERNEL, resolved to
    /// `end.pod_ns`), the endpoint is behind another node's nsmgr.
    pub async fn client_request(
        &self,
        ctx: &mut Context,
        mut req: NetworkServiceRequest,
        next: Next,
        meta: &ConnMetadata,
        end: ClientEnd,
    ) -> Result<Connection, Status> {
        let prev: Option<Tunnel> = meta.server_get::<Tunnel>().filter(|t| t.side == Side::Client);
        let conn = conn_mut(&mut req);
        let conn_id = conn.id.clone();
        let pl = if conn.payload.is_empty() { payload::ETHERNET.to_string() } else { conn.payload.clone() };
        let keys = prev.as_ref().and_then(|p| p.keys.clone()).unwrap_or_else(|| Arc::new(KeyPair::generate()));
        let wg_offered =
            self.wg.is_some() && pl == payload::IP && self.cfg.priority.contains(&MechanismKind::Wireguard);
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
        let mac = prev.as_ref().and_then(|p| p.mac).unwrap_or_else(|| stable_mac(&format!("{}/client", end.alias)));
        let offers = self.offers(&pl, &keys, port.as_deref());
        if offers.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no remote mechanism for payload {pl} (NSM_MECHANISM_PRIORITY={})",
                self.cfg.priority.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(",")
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
        let kinds = offers.iter().filter_map(MechanismKind::of).collect();
        out.mechanism_preferences = offers;

        let mut res = next.clone().request(ctx, out).await?;

        // The far side now answers with another mechanism type (or the
        // client's netns changed): the old tunnel goes before the new one is
        // built under the same name.
        let answered = res.mechanism.as_ref().and_then(MechanismKind::of);
        let prev = match prev {
            Some(p) if answered.is_some_and(|k| k != p.kind) || p.pod_ns.inode() != end.pod_ns.inode() => {
                tracing::info!(conn_id = %conn_id, old = %p.kind, "the wire changes: removing the old tunnel");
                self.teardown(&p).await;
                meta.server_remove::<Tunnel>();
                None
            }
            other => other,
        };
        let offer = Offer { kinds, payload: pl, keys, port, mac };
        let permit = k::BUILD_PERMITS.acquire().await.map_err(|_| Status::internal("build permits closed"))?;
        let built = self.client_build(&res, &offer, prev.as_ref(), &end, &conn_id).await;
        drop(permit);
        match built {
            Ok(t) => {
                let mtu = param(&t.remote_mech, common::MTU).and_then(|v| v.parse::<u32>().ok());
                meta.server_insert(t);
                res.mechanism = Some(end.incoming);
                if let Some(m) = mtu {
                    res.context.get_or_insert_with(ConnectionContext::default).mtu = m;
                }
                Ok(res)
            }
            Err(e) => Err(built_failed(ctx, next, res, prev.is_none(), "client", e).await),
        }
    }

    /// Builds the client end of the tunnel the far side answered with
    /// (`res`), reusing `prev` where it is the same device.
    async fn client_build(
        &self,
        res: &Connection,
        offer: &Offer,
        prev: Option<&Tunnel>,
        end: &ClientEnd,
        conn_id: &str,
    ) -> Result<Tunnel, Status> {
        let m = res.mechanism.clone().ok_or_else(|| Status::internal("the far side answered without a mechanism"))?;
        let kind =
            MechanismKind::of(&m).filter(|k| m.cls == cls::REMOTE && offer.kinds.contains(k)).ok_or_else(|| {
                let offered: Vec<_> = offer.kinds.iter().map(|k| k.as_str()).collect();
                Status::internal(format!(
                    "the far side chose {} {}, which was not offered ({})",
                    m.cls,
                    m.r#type,
                    offered.join(", ")
                ))
            })?;
        let dst_ip = need_ip(&m, common::DST_IP)?;
        let dst_port = need_port(&m, common::DST_PORT)?;
        let mtu = mtu_param(&m)?.unwrap_or_else(|| self.mtu_for(kind)).min(self.mtu_for(kind));
        let ip = res.context.as_ref().and_then(|c| c.ip_context.clone()).unwrap_or_default();
        ipcontext::validate(&ip)?;
        let (pod_ns, pod_if) = (&end.pod_ns, end.pod_if.as_str());
        let mut t = Tunnel {
            side: Side::Client,
            kind,
            pod_ns: pod_ns.clone(),
            pod_if: pod_if.to_string(),
            node_if: node_ifname(kind, conn_id),
            alias: end.alias.clone(),
            remote_mech: m.clone(),
            nse_mech: None,
            client_key: end.key.clone(),
            keys: None,
            port: None,
            vni: None,
            mac: None,
            wg: None,
        };
        let reuse = prev.filter(|p| p.is_at(pod_ns, pod_if, kind));
        let built = async {
            match kind {
                MechanismKind::Vxlan => {
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
                    same_vxlan_port("dst_port", dst_port, self.cfg.vxlan_port)?;
                    t.mac = Some(offer.mac);
                    let spec = VxlanSpec {
                        name: pod_if.to_string(),
                        vni,
                        local: self.cfg.tunnel_ip,
                        remote: dst_ip,
                        port: dst_port,
                        mtu,
                        mac: Some(offer.mac),
                        alias: end.alias.clone(),
                    };
                    self.ensure_vxlan(&spec, pod_ns).await?;
                    if offer.payload == payload::IP {
                        let peer_mac = res
                            .context
                            .as_ref()
                            .and_then(|c| c.ethernet_context.as_ref())
                            .and_then(|e| parse_mac(&e.dst_mac));
                        let peers = ipcontext::peer_addresses(&ip, End::Client)?;
                        Remote::set_neighbours(pod_ns, pod_if, &peers, peer_mac).await?;
                    }
                }
                MechanismKind::Wireguard => {
                    let port = offer.port.clone().ok_or_else(|| Status::internal("no WireGuard port allocated"))?;
                    let peer_unchanged = reuse
                        .is_some_and(|p| param(&p.remote_mech, wgm::DST_PUBLIC_KEY) == param(&m, wgm::DST_PUBLIC_KEY));
                    let wg_end = WgEnd {
                        keys: &offer.keys,
                        port: port.port(),
                        peer: need_key(&m, wgm::DST_PUBLIC_KEY)?,
                        endpoint: SocketAddr::new(dst_ip, dst_port),
                        allowed: allowed_ips(&ipcontext::peer_addresses(&ip, End::Client)?, &ip.src_routes),
                        mtu,
                        pod_ns,
                        pod_if,
                        node_if: &t.node_if,
                        alias: &end.alias,
                    };
                    let handle = self.wireguard(reuse.and_then(|p| p.wg.clone()), peer_unchanged, wg_end).await?;
                    t.wg = Some(handle);
                    t.keys = Some(offer.keys.clone());
                    t.port = Some(port);
                }
            }
            ipcontext::apply(pod_ns, pod_if, &ip, End::Client).await
        }
        .await;
        match built {
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
}
