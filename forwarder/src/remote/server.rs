//! The server side of a remote wire: the forwarder of the endpoint's node
//! picks the first REMOTE offer it supports, completes it (`dst_ip`,
//! `dst_port`, the VNI or its WireGuard key, the MTU), asks the local
//! endpoint with a KERNEL mechanism of its own, and builds its end of the
//! tunnel into the endpoint's netns once the endpoint has answered.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use nsm_api::connection::{Connection, Mechanism};
use nsm_api::connectioncontext::{ConnectionContext, EthernetContext};
use nsm_api::mechanisms::{cls, common, kernel, payload, vxlan, wireguard as wgm};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_sdk::networkservice::chain::conn_mut;
use nsm_sdk::networkservice::metadata::ConnMetadata;
use nsm_sdk::networkservice::{Context, Next};
use tonic::Status;

use super::params::{
    MechanismKind, allowed_ips, fmt_mac, mtu_param, need_ip, need_key, need_port, node_ifname, param, parse_mac,
    same_vxlan_port, stable_mac, vni_param,
};
use super::tunnel::{Side, Tunnel, WgEnd};
use super::{Remote, built_failed};
use crate::alloc::VniLease;
use crate::ipcontext::{self, End};
use crate::kernel::{self as k, KernelError, VxlanSpec};
use crate::local::{endpoint_answer, endpoint_request, netns_key, resolve_endpoint_netns, stable_ifname};
use crate::wireguard::KeyPair;

impl Remote {
    /// Picks the REMOTE mechanism to serve: the one already negotiated, or
    /// the first offer this forwarder supports. WireGuard carries IP
    /// packets only: never for an ETHERNET service.
    pub fn choose(&self, req: &NetworkServiceRequest) -> Result<Mechanism, Status> {
        let ip_payload = req.connection.as_ref().is_some_and(|c| c.payload == payload::IP);
        let fits = |m: &Mechanism| {
            m.cls == cls::REMOTE
                && MechanismKind::of(m)
                    .is_some_and(|k| self.supports(k) && (k != MechanismKind::Wireguard || ip_payload))
        };
        if let Some(m) = req.connection.as_ref().and_then(|c| c.mechanism.as_ref())
            && fits(m)
        {
            return Ok(m.clone());
        }
        req.mechanism_preferences.iter().find(|m| fits(m)).cloned().ok_or_else(|| {
            let offered: Vec<_> = req.mechanism_preferences.iter().map(|m| format!("{} {}", m.cls, m.r#type)).collect();
            let supported: Vec<_> = self.supported().iter().map(|k| k.as_str()).collect();
            Status::invalid_argument(format!(
                "no supported REMOTE mechanism among [{}] for {} payload (this forwarder supports {}; WireGuard carries IP payload only)",
                offered.join(", "),
                if ip_payload { "IP" } else { "ETHERNET" },
                supported.join(", ")
            ))
        })
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

    /// The server side: the request came from another node's forwarder with
    /// REMOTE offers; the endpoint is local.
    pub async fn server_request(
        &self,
        ctx: &mut Context,
        mut req: NetworkServiceRequest,
        next: Next,
        meta: &ConnMetadata,
        alias: String,
    ) -> Result<Connection, Status> {
        let prev: Option<Tunnel> = meta.server_get::<Tunnel>().filter(|t| t.side == Side::Server);
        let chosen = self.choose(&req)?;
        let kind = MechanismKind::of(&chosen).ok_or_else(|| Status::internal("chose an unknown mechanism"))?;
        // Reuse what was negotiated before if the client still offers it.
        let mut incoming = match &prev {
            Some(p) if p.kind == kind => {
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
        let mtu = mtu_param(&chosen)?.unwrap_or(u32::MAX).min(self.mtu_for(kind));
        let mut keys = None;
        let mut port = None;
        let mut vni = None;
        let mac = prev.as_ref().and_then(|p| p.mac).unwrap_or_else(|| stable_mac(&format!("{alias}/server")));
        incoming.parameters.insert(common::DST_IP.into(), self.cfg.tunnel_ip.to_string());
        incoming.parameters.insert(common::MTU.into(), mtu.to_string());
        match kind {
            MechanismKind::Vxlan => {
                same_vxlan_port("src_port", src_port, self.cfg.vxlan_port)?;
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
            MechanismKind::Wireguard => {
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
        let out = endpoint_request(&req, prev.as_ref().and_then(|p| p.nse_mech.clone()), &nse_if);
        let mut res = next.clone().request(ctx, out).await?;

        let permit = k::BUILD_PERMITS.acquire().await.map_err(|_| Status::internal("build permits closed"))?;
        let built = async {
            let (nse_mech, nse_if) = endpoint_answer(&res, &nse_if)?;
            let nse_ns = match &prev {
                Some(p) if p.nse_mech.as_ref().map(netns_key) == Some(netns_key(&nse_mech)) => p.pod_ns.clone(),
                _ => resolve_endpoint_netns(&nse_mech, ctx).await?,
            };
            let ip = res.context.as_ref().and_then(|c| c.ip_context.clone()).unwrap_or_default();
            ipcontext::validate(&ip)?;
            let mut t = Tunnel {
                side: Side::Server,
                kind,
                pod_ns: nse_ns.clone(),
                pod_if: nse_if.clone(),
                node_if: node_ifname(kind, &conn_id),
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
                && !p.is_at(&nse_ns, &nse_if, kind)
            {
                self.teardown(p).await;
            }
            let same = prev.as_ref().filter(|p| p.is_at(&nse_ns, &nse_if, kind));
            let r = async {
                match kind {
                    MechanismKind::Vxlan => {
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
                                Err(e) => return Err(e.into()),
                            }
                        }
                        if pl == payload::IP {
                            let peer_mac = res
                                .context
                                .as_ref()
                                .and_then(|c| c.ethernet_context.as_ref())
                                .and_then(|e| parse_mac(&e.src_mac));
                            let peers = ipcontext::peer_addresses(&ip, End::Endpoint)?;
                            Remote::set_neighbours(&nse_ns, &nse_if, &peers, peer_mac).await?;
                        }
                    }
                    MechanismKind::Wireguard => {
                        let kp = keys.clone().ok_or_else(|| Status::internal("no WireGuard keys"))?;
                        let port = port.clone().ok_or_else(|| Status::internal("no WireGuard port"))?;
                        let peer_unchanged = same.is_some_and(|p| {
                            param(&p.remote_mech, wgm::SRC_PUBLIC_KEY) == param(&incoming, wgm::SRC_PUBLIC_KEY)
                        });
                        let wg_end = WgEnd {
                            keys: &kp,
                            port: port.port(),
                            peer: need_key(&incoming, wgm::SRC_PUBLIC_KEY)?,
                            endpoint: SocketAddr::new(src_ip, src_port),
                            allowed: allowed_ips(&ipcontext::peer_addresses(&ip, End::Endpoint)?, &ip.dst_routes),
                            mtu,
                            pod_ns: &nse_ns,
                            pod_if: &nse_if,
                            node_if: &t.node_if,
                            alias: &alias,
                        };
                        t.wg = Some(self.wireguard(same.and_then(|p| p.wg.clone()), peer_unchanged, wg_end).await?);
                    }
                }
                ipcontext::apply(&nse_ns, &nse_if, &ip, End::Endpoint).await
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
            Err(e) => Err(built_failed(ctx, next, res, prev.is_none(), "endpoint", e).await),
        }
    }
}
