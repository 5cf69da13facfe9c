//! Building and removing one end of a tunnel: the record of what was built
//! (`Tunnel`), and the device steps both ends share (VXLAN in place,
//! WireGuard create-or-update, neighbour entries for IP payload over VXLAN,
//! teardown).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ipnetwork::IpNetwork;
use nsm_api::connection::Mechanism;
use nsm_api::ext::Cidr;
use nsm_sdk::tools::netns::NetnsHandle;
use tonic::Status;

use super::Remote;
use super::params::MechanismKind;
use crate::alloc::{PortLease, VniLease};
use crate::kernel::{self as k, KernelError, VxlanSpec};
use crate::local::NetnsKey;
use crate::wireguard::{BackendKind, Key, KeyPair, PeerUpdate, WgConfig, WgDevice};

/// Which end of the tunnel this forwarder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    /// The client's node: offers mechanisms, builds into the client's netns.
    Client,
    /// The endpoint's node: chooses, builds into the endpoint's netns.
    Server,
}

/// A WireGuard device owned by a connection; closed when the last clone
/// goes (Close, failure, or forwarder shutdown).
#[derive(Clone)]
pub(super) struct WgHandle(Arc<Mutex<Option<Box<dyn WgDevice>>>>);

impl WgHandle {
    fn new(d: Box<dyn WgDevice>) -> WgHandle {
        WgHandle(Arc::new(Mutex::new(Some(d))))
    }

    /// Stops the device: joins its threads, so this runs on a blocking
    /// thread, never on an async worker.
    pub(super) async fn close(&self) {
        let d = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(d) = d {
            let _ = tokio::task::spawn_blocking(move || d.close()).await;
        }
    }

    fn with<T>(&self, f: impl FnOnce(&dyn WgDevice) -> T) -> Option<T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).as_deref().map(f)
    }
}

/// What this forwarder built for one remote connection.
#[derive(Clone)]
pub(super) struct Tunnel {
    pub side: Side,
    pub kind: MechanismKind,
    pub pod_ns: NetnsHandle,
    pub pod_if: String,
    pub node_if: String,
    pub alias: String,
    /// Client side: the negotiated REMOTE mechanism (sent on refresh and
    /// Close). Server side: the completed incoming mechanism.
    pub remote_mech: Mechanism,
    /// Server side: the KERNEL mechanism the endpoint chose.
    pub nse_mech: Option<Mechanism>,
    /// Client side: the netns parameters the client sent.
    pub client_key: NetnsKey,
    pub keys: Option<Arc<KeyPair>>,
    pub port: Option<Arc<PortLease>>,
    pub vni: Option<Arc<VniLease>>,
    pub mac: Option<[u8; 6]>,
    pub wg: Option<WgHandle>,
}

impl Tunnel {
    /// True if this tunnel's device is the one a new build of `kind` into
    /// `ns`/`ifname` would make (so it is updated, not rebuilt).
    pub fn is_at(&self, ns: &NetnsHandle, ifname: &str, kind: MechanismKind) -> bool {
        self.pod_ns.inode() == ns.inode() && self.pod_if == ifname && self.kind == kind
    }
}

/// What a WireGuard end needs besides the device it may reuse.
pub(super) struct WgEnd<'a> {
    pub keys: &'a KeyPair,
    pub port: u16,
    pub peer: Key,
    pub endpoint: SocketAddr,
    pub allowed: Vec<IpNetwork>,
    pub mtu: u32,
    pub pod_ns: &'a NetnsHandle,
    pub pod_if: &'a str,
    pub node_if: &'a str,
    pub alias: &'a str,
}

impl Remote {
    /// Creates the VXLAN device in the pod (its UDP socket in the node
    /// netns) unless the pod already has it (refresh, or adoption after a
    /// restart): `create_vxlan_in` reuses a device of ours with the same
    /// VNI, remote and port (fixing MTU/MAC drift), and replaces one whose
    /// parameters changed.
    pub(super) async fn ensure_vxlan(&self, spec: &VxlanSpec, pod_ns: &NetnsHandle) -> Result<(), KernelError> {
        k::create_vxlan_in(&self.node, pod_ns, spec).await.map(|_| ())
    }

    /// IP payload over VXLAN: static neighbour entries for the peer's
    /// addresses (the peer's MAC came in the ethernet context), so the pod
    /// never ARPs across the tunnel.
    pub(super) async fn set_neighbours(
        pod_ns: &NetnsHandle,
        pod_if: &str,
        peer_addrs: &[Cidr],
        peer_mac: Option<[u8; 6]>,
    ) -> Result<(), Status> {
        if let Some(mac) = peer_mac {
            for c in peer_addrs {
                k::set_neighbor(pod_ns, pod_if, c.addr, mac).await?;
            }
        }
        Ok(())
    }

    /// The WireGuard end of a connection: `prev` (the device built before
    /// for this connection, if any) is updated in place when it still has
    /// our key and `peer_unchanged` (same peer key); otherwise it is closed
    /// and a new device is created.
    pub(super) async fn wireguard(
        &self,
        prev: Option<WgHandle>,
        peer_unchanged: bool,
        end: WgEnd<'_>,
    ) -> Result<WgHandle, Status> {
        let keepalive = Some(self.cfg.keepalive).filter(|k| *k > 0);
        let reusable = prev
            .as_ref()
            .is_some_and(|h| peer_unchanged && h.with(|d| d.public_key() == end.keys.public).unwrap_or(false));
        if let (true, Some(h)) = (reusable, &prev) {
            let u = PeerUpdate { endpoint: Some(end.endpoint), allowed_ips: end.allowed, keepalive };
            h.with(|d| d.update_peer(&u)).transpose()?;
            return Ok(h.clone());
        }
        if let Some(h) = prev {
            // The peer restarted with a new key (or ours changed): rebuild.
            h.close().await;
            let _ = k::delete_link(end.pod_ns, end.pod_if, Some(end.alias)).await;
        }
        let wg = self.wg.clone().ok_or_else(|| Status::internal("WireGuard chosen but no backend"))?;
        let cfg = WgConfig {
            private_key: end.keys.private.clone(),
            listen_port: end.port,
            peer_public_key: end.peer,
            peer_endpoint: Some(end.endpoint),
            allowed_ips: end.allowed,
            persistent_keepalive: keepalive,
            mtu: end.mtu,
            // The userspace TUN is born in the pod under its final name;
            // the UDP socket stays in this (the node's) netns.
            tun_in: (wg.kind() == BackendKind::Userspace).then(|| (end.pod_ns.clone(), end.pod_if.to_string())),
        };
        let in_place = cfg.tun_in.is_some();
        let name = end.node_if.to_string();
        // Creating the device opens the TUN, binds the UDP socket and starts
        // its threads: keep it off the async workers.
        let dev = tokio::task::spawn_blocking(move || wg.create(&name, &cfg))
            .await
            .map_err(|e| Status::internal(format!("WireGuard device task failed: {e}")))??;
        let h = WgHandle::new(dev);
        let placed = if in_place {
            k::set_alias(end.pod_ns, end.pod_if, end.alias).await
        } else {
            k::move_and_rename(&self.node, end.node_if, end.pod_ns, end.pod_if, end.alias).await.map(|_| ())
        };
        if let Err(e) = placed {
            h.close().await;
            return Err(e.into());
        }
        // The kernel backend configures the link where it now lives.
        h.with(|d| d.relocated(end.pod_ns, end.pod_if));
        Ok(h)
    }

    /// Removes what `t` built (best effort) and releases its leases (when
    /// the last clone of `t` is dropped).
    pub(super) async fn teardown(&self, t: &Tunnel) {
        if let Some(h) = &t.wg {
            h.close().await;
        }
        if let Err(e) = k::delete_link(&t.pod_ns, &t.pod_if, Some(&t.alias)).await {
            tracing::warn!(ifname = %t.pod_if, netns = %t.pod_ns.describe(), error = %e, "removing the tunnel interface failed");
        }
        let _ = k::delete_link(&self.node, &t.node_if, Some(&t.alias)).await;
    }
}
