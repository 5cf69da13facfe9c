//! Remote wires: a VXLAN or WireGuard tunnel between two nodes, with the
//! tunnel device itself as the pod's interface.
//!
//! Two forwarders negotiate the mechanism as upstream does:
//! - the **client side** ([`client`]: the forwarder of the client's node)
//!   offers REMOTE preferences in `NSM_MECHANISM_PRIORITY` order, each with
//!   its `src_ip` (`NSM_TUNNEL_IP`), `src_port` and, for WireGuard,
//!   `src_public_key`;
//! - the **server side** ([`server`]: the endpoint's node) picks the first
//!   offer it supports, fills `dst_ip`, `dst_port`, the `vni` (VXLAN) or
//!   `dst_public_key` (WireGuard) and the `MTU`, builds its end into the
//!   endpoint's netns once the endpoint has answered, and returns the
//!   completed mechanism; the client side then builds its end into the
//!   client's netns.
//!
//! [`params`] reads and checks the parameters; [`tunnel`] holds the device
//! steps both sides share; the IP context is applied by
//! [`crate::ipcontext`] as on a veth wire.
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
//!   keys, a VNI out of range, a VXLAN port that differs from ours, a
//!   malformed address in the IP context) is `InvalidArgument` naming the
//!   parameter, before anything is built.
//! - A first Request that fails half way removes every device, releases its
//!   port/VNI, closes the WireGuard device (TUN, threads, UAPI socket) and
//!   closes the far side: nothing is left behind.
//! - A refresh keeps the negotiated mechanism, the keys, the port and the
//!   VNI, and reuses the device; a forwarder that restarted adopts a VXLAN
//!   device still in the pod (same VNI, same alias) instead of rebuilding it.
//! - Keys are per connection (each connection has its own device anyway):
//!   a key never serves two connections, so one leaked key exposes one wire.
//! - Close removes the pod's interface and everything behind it.

pub mod client;
pub mod params;
pub mod server;
pub mod tunnel;

use std::net::IpAddr;
use std::sync::Arc;

use nsm_api::connection::{Connection, Mechanism};
use nsm_sdk::networkservice::metadata::ConnMetadata;
use nsm_sdk::networkservice::{Context, Next};
use nsm_sdk::tools::netns::NetnsHandle;
use tonic::Status;

pub use crate::local::NetnsKey;
pub use client::ClientEnd;
pub use params::{MechanismKind, node_ifname};
use tunnel::{Side, Tunnel};

use crate::alloc::{PortPool, VniTable};
use crate::wireguard::WgBackend;

/// A failed build of this forwarder's (`end`: "client" or "endpoint") end
/// of the tunnel: logged, and after a first Request the far side is closed
/// again, so nothing stays behind there (a failed refresh keeps what was
/// negotiated). Returns `e` for the caller.
async fn built_failed(ctx: &Context, next: Next, res: Connection, first: bool, end: &str, e: Status) -> Status {
    tracing::warn!(conn_id = %res.id, error = %e.message(), "building the {end} end of the tunnel failed");
    if first {
        next.undo(ctx, res).await;
    }
    e
}

/// Configuration of remote mechanisms.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// This node's tunnel endpoint (`NSM_TUNNEL_IP`).
    pub tunnel_ip: IpAddr,
    /// UDP port of VXLAN on every node (`NSM_VXLAN_PORT`).
    pub vxlan_port: u16,
    /// Mechanism kinds in preference order (`NSM_MECHANISM_PRIORITY`).
    pub priority: Vec<MechanismKind>,
    /// WireGuard persistent keepalive (seconds).
    pub keepalive: u16,
    /// MTU of the underlay interface that carries `tunnel_ip`.
    pub underlay_mtu: u32,
}

/// The remote-mechanism machinery of one forwarder.
pub struct Remote {
    cfg: RemoteConfig,
    node: NetnsHandle,
    wg: Option<Arc<dyn WgBackend>>,
    ports: Arc<PortPool>,
    vnis: Arc<VniTable>,
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

    fn mtu_for(&self, kind: MechanismKind) -> u32 {
        self.cfg.underlay_mtu.saturating_sub(kind.overhead(self.cfg.tunnel_ip.is_ipv6()))
    }

    fn supported(&self) -> Vec<MechanismKind> {
        let mut v = vec![MechanismKind::Vxlan];
        if self.wg.is_some() {
            v.push(MechanismKind::Wireguard);
        }
        v
    }

    /// True if this forwarder can serve `kind` as the server side.
    pub fn supports(&self, kind: MechanismKind) -> bool {
        self.supported().contains(&kind)
    }

    /// Close of a connection with a remote wire. Returns the mechanism the
    /// next hop should see (the negotiated REMOTE one on the client side,
    /// the endpoint's KERNEL one on the server side), or `None` if this
    /// process has no record of the connection.
    pub async fn close(&self, meta: Option<&ConnMetadata>) -> Option<Mechanism> {
        let t = meta.and_then(|m| m.server_remove::<Tunnel>())?;
        self.teardown(&t).await;
        match t.side {
            Side::Client => Some(t.remote_mech.clone()),
            Side::Server => t.nse_mech.clone(),
        }
    }

    /// Tears down and forgets the remote wire recorded in `meta` (the
    /// connection's endpoint moved to this node).
    pub async fn drop_tunnel(&self, meta: &ConnMetadata) {
        if let Some(t) = meta.server_remove::<Tunnel>() {
            self.teardown(&t).await;
        }
    }

    /// True if `meta` holds a remote wire.
    pub fn has_tunnel(meta: &ConnMetadata) -> bool {
        meta.server_get::<Tunnel>().is_some()
    }

    /// The client netns (and the parameters that named it) recorded for a
    /// client-side wire.
    pub fn client_pod(meta: &ConnMetadata) -> Option<(NetnsKey, NetnsHandle)> {
        meta.server_get::<Tunnel>().filter(|t| t.side == Side::Client).map(|t| (t.client_key, t.pod_ns))
    }
}
