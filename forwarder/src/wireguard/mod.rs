//! WireGuard devices for cross-node connections: one backend trait, two
//! implementations chosen once at start-up by [`probe`].
//!
//! - [`Kernel`]: the kernel's `wireguard` link, configured over generic
//!   netlink. Used when the kernel can create one.
//! - [`Userspace`]: an embedded userspace WireGuard on a TUN device that
//!   serves the standard cross-platform UAPI socket
//!   (`/var/run/wireguard/<name>.sock`), so `wg show <name>` works on it.
//!
//! # Design choices
//! - **Crate: boringtun 0.7.1, Noise core only** (`boringtun::noise::Tunn`,
//!   no `device` feature). It is sans-IO (bytes in, bytes out), BSD-3,
//!   small, uses ring's assembly ChaCha20-Poly1305, and its own device was
//!   the fastest of boringtun / gotatun / wireguard-go on this machine kind
//!   (447 vs 371 vs 289 Mbit/s, one TCP stream over a veth underlay on
//!   2 cores). Its `device` module is not used: it
//!   owns the TUN by name (breaks after a netns move), blocks SIGINT/SIGTERM
//!   on the creating thread, and reports no public key and a wrong (relative)
//!   handshake time over UAPI. gotatun needs a tokio runtime per netns and
//!   mixes its Noise core with its I/O; wireguard-go would be a separate
//!   process per device; wireguard-control is LGPL.
//! - **Layering.** `noise` (protocol state of the single peer: encrypt,
//!   decrypt, timers, roaming, cryptokey routing; no I/O), `io` (TUN and
//!   UDP behind the batch-shaped `TunnelIo` / `NetworkIo` seam, so a batched
//!   implementation with `recvmmsg`/`sendmmsg`, UDP GSO/GRO and TUN
//!   `IFF_VNET_HDR` offloads can replace it), `datapath` (the two
//!   threads joining them), `uapi` (the control socket).
//! - **Keys per connection.** Every connection has its own device anyway
//!   (own interface, own port); a key pair per connection keeps connections
//!   cryptographically isolated (a leaked key exposes one connection, and a
//!   peer can never be mistaken for another connection's peer) and needs no
//!   coordination across devices. The caller generates it
//!   ([`KeyPair::generate`]) and advertises the public half in the
//!   mechanism.
//! - **Names.** The UAPI socket path is global on the node (it is not
//!   per-netns), so device names must be unique per node, not per netns;
//!   a name whose socket is being served is refused.
//!
//! # Guarantees
//! - [`WgBackend::create`] binds the device's UDP socket in the calling
//!   thread's network namespace (it lives there for good). The netdev is
//!   created there too, or, for the userspace backend with
//!   [`WgConfig::tun_in`], directly in the given namespace under the given
//!   name (the forwarder's choice: no netdev move). A netdev created in the
//!   caller's namespace may be moved and renamed afterwards and keeps
//!   working (for the kernel backend, tell it with [`WgDevice::relocated`]
//!   so later configuration finds it).
//! - `create` either succeeds or leaves nothing behind (no interface, no
//!   socket file, no thread). A taken port is [`WgError::PortInUse`].
//! - [`WgDevice::close`] (also run on drop) removes the netdev wherever it
//!   is, the UAPI socket file and every thread of the device; it is
//!   idempotent.
//! - Errors name the device, port or peer and say what to check.

mod datapath;
mod io;
mod kernel;
mod key;
mod noise;
mod uapi;
mod userspace;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use ipnetwork::IpNetwork;
use nsm_sdk::tools::netns::NetnsHandle;

pub use kernel::{Kernel, kernel_available};
pub use key::{KEY_LEN, Key, KeyError, KeyPair};
pub use uapi::{SOCKET_DIR, socket_path};
pub use userspace::{Userspace, UserspaceDevice};

/// Linux `IFNAMSIZ - 1`.
pub const MAX_NAME_LEN: usize = 15;
/// Smallest tunnel MTU accepted.
pub const MIN_MTU: u32 = 576;
/// Largest tunnel MTU accepted (jumbo frames; buffers are sized from it).
pub const MAX_MTU: u32 = 9000;

/// Configuration of a single-peer device.
#[derive(Clone)]
pub struct WgConfig {
    pub private_key: Key,
    /// Must be free in the calling thread's namespace (0: any free port).
    pub listen_port: u16,
    pub peer_public_key: Key,
    /// `None`: wait until the peer contacts us (its source is then used).
    pub peer_endpoint: Option<SocketAddr>,
    /// Networks routed to / accepted from the peer (the IPContext's).
    pub allowed_ips: Vec<IpNetwork>,
    /// Seconds; `None` or 0 = off.
    pub persistent_keepalive: Option<u16>,
    /// Tunnel MTU, set at creation ([`MIN_MTU`]..=[`MAX_MTU`]).
    pub mtu: u32,
    /// Create the TUN netdev directly in this netns under this name (the
    /// pod's interface) instead of the caller's netns under the device name;
    /// the UDP socket and the UAPI socket stay with the caller. Saves a
    /// netdev move. `None`: the caller moves it if needed.
    pub tun_in: Option<(nsm_sdk::tools::netns::NetnsHandle, String)>,
}

impl fmt::Debug for WgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WgConfig")
            .field("private_key", &"<redacted>")
            .field("listen_port", &self.listen_port)
            .field("peer_public_key", &self.peer_public_key.to_base64())
            .field("peer_endpoint", &self.peer_endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("mtu", &self.mtu)
            .field("tun_in", &self.tun_in.as_ref().map(|(ns, n)| format!("{n} in {}", ns.describe())))
            .finish()
    }
}

/// Traffic counters of the device's peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WgStats {
    /// Bytes received from the peer (UDP payload).
    pub rx_bytes: u64,
    /// Bytes sent to the peer (UDP payload).
    pub tx_bytes: u64,
    /// Absolute time of the last completed handshake.
    pub last_handshake: Option<SystemTime>,
}

/// Failures of WireGuard devices.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// The name cannot be an interface name.
    #[error("invalid WireGuard device name {name:?}: {rule}")]
    InvalidName { name: String, rule: &'static str },
    /// The configuration cannot work.
    #[error("invalid configuration for WireGuard device {name}: {reason}")]
    InvalidConfig { name: String, reason: String },
    /// The listen port is taken in this namespace.
    #[error(
        "UDP port {port} for WireGuard device {name} is already in use in this network namespace; pick another \
         listen port (`ss -uanp sport = :{port}` in the node namespace shows who holds it)"
    )]
    PortInUse { name: String, port: u16 },
    /// Binding the UDP socket failed for another reason.
    #[error(
        "cannot bind UDP port {port} for WireGuard device {name}: {source}; check that the node namespace has \
         the address family of the peer endpoint"
    )]
    Bind {
        name: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    /// The name is taken (interface in this namespace, or UAPI socket).
    #[error("WireGuard device name {name} is taken: {what}; use a name unique on this node")]
    NameTaken { name: String, what: String },
    /// The TUN device could not be created.
    #[error(
        "cannot create TUN device {name}: {source}; check that /dev/net/tun exists (modprobe tun) and that the \
         forwarder has CAP_NET_ADMIN"
    )]
    Tun {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// The UAPI socket could not be served.
    #[error(
        "cannot serve the WireGuard UAPI socket {path} for device {name}: {source}; check that {SOCKET_DIR} is \
         writable by the forwarder",
        path = path.display()
    )]
    Uapi {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A thread (or its wake-up event) could not be created.
    #[error("cannot start the {what} thread of WireGuard device {name}: {source}; check the process thread limit")]
    Thread {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The device was closed.
    #[error("WireGuard device {name} is closed")]
    Closed { name: String },
    /// A netlink request of the kernel backend failed.
    #[error("kernel WireGuard: {op} for device {name} failed: {reason}")]
    Netlink {
        name: String,
        op: String,
        /// Positive errno, when the kernel returned one.
        errno: Option<i32>,
        reason: String,
    },
    /// The kernel cannot create WireGuard links.
    #[error(
        "the kernel cannot create WireGuard device {name}: {reason}; load the wireguard module (modprobe \
         wireguard) or use the userspace backend"
    )]
    KernelUnsupported { name: String, reason: String },
}

/// Which implementation a backend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// The kernel's `wireguard` link.
    Kernel,
    /// The embedded userspace implementation on a TUN device.
    Userspace,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
        })
    }
}

/// A way to create WireGuard devices; chosen once at forwarder start.
pub trait WgBackend: Send + Sync {
    /// Which implementation this is.
    fn kind(&self) -> BackendKind;
    /// Creates device `name` (at most 15 bytes, unique per node) in the
    /// calling thread's network namespace (the node netns: the UDP socket
    /// lives there). Blocking; call it from a plain thread (e.g. inside
    /// `NetnsHandle::run` or `spawn_blocking`). The caller may then move the
    /// netdev into a pod netns and rename it; the device keeps working.
    fn create(&self, name: &str, cfg: &WgConfig) -> Result<Box<dyn WgDevice>, WgError>;
}

/// A refresh of a device's peer ([`WgDevice::update_peer`]).
#[derive(Clone, Debug, Default)]
pub struct PeerUpdate {
    /// `None` keeps the current (configured or learned) endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Replaces the allowed IPs.
    pub allowed_ips: Vec<IpNetwork>,
    /// Persistent keepalive, seconds; `None`/0 = off.
    pub keepalive: Option<u16>,
}

/// What identifies a created device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceId {
    /// The name it was created with (= the UAPI socket name).
    pub name: String,
    /// Its ifindex in the namespace it was created in.
    pub ifindex: u32,
    /// Its UDP listen port.
    pub port: u16,
}

/// A running single-peer device.
pub trait WgDevice: Send + Sync {
    /// Name, ifindex and listen port.
    fn id(&self) -> &DeviceId;
    fn public_key(&self) -> Key;
    /// Refreshes the peer as `u` says.
    fn update_peer(&self, u: &PeerUpdate) -> Result<(), WgError>;
    fn stats(&self) -> WgStats;
    /// Tells the device that its netdev now lives in `netns` as `ifname`
    /// (after the caller moved / renamed it). The userspace backend ignores
    /// it (it only uses its descriptors); the kernel backend needs it to
    /// configure and delete the link later.
    fn relocated(&self, netns: &NetnsHandle, ifname: &str) {
        let _ = (netns, ifname);
    }
    /// Stops the threads, removes the netdev (wherever it was moved) and
    /// the UAPI socket file. Idempotent; also done on drop.
    fn close(self: Box<Self>);
}

/// Validates a device name as the kernel does (`dev_valid_name`, see
/// [`crate::kernel::validate_ifname`]), which also keeps the UAPI socket
/// path a plain file name (no `/`, no `.`/`..`).
pub fn validate_name(name: &str) -> Result<(), WgError> {
    crate::kernel::validate_ifname(name).map_err(|e| match e {
        crate::kernel::KernelError::InvalidName { name, rule } => WgError::InvalidName { name, rule },
        other => WgError::InvalidConfig { name: name.to_string(), reason: other.to_string() },
    })
}

/// The kernel backend if the kernel can create WireGuard links in the
/// calling thread's namespace (see [`kernel_available`]), else `None`.
pub fn kernel_backend() -> Option<Arc<dyn WgBackend>> {
    match kernel_available() {
        Ok(()) => Some(Arc::new(Kernel)),
        Err(reason) => {
            tracing::debug!(%reason, "kernel WireGuard unavailable");
            None
        }
    }
}

/// Picks the backend: kernel if the kernel can create a `wireguard` link in
/// the calling thread's namespace (a throwaway link is created and deleted),
/// else userspace. Logs the choice at info.
pub fn probe() -> Arc<dyn WgBackend> {
    match kernel_available() {
        Ok(()) => {
            tracing::info!("WireGuard backend: kernel (the kernel creates wireguard links)");
            Arc::new(Kernel)
        }
        Err(reason) => {
            tracing::info!(%reason, "WireGuard backend: userspace (boringtun on TUN, UAPI in {SOCKET_DIR})");
            Arc::new(Userspace)
        }
    }
}

/// Removes `/var/run/wireguard/<prefix>*.sock` files that nobody serves
/// (left by a forwarder that crashed); returns what it removed. Sockets
/// that accept connections (live devices, also of other processes) are
/// kept.
pub fn cleanup_stale_sockets(prefix: &str) -> Vec<PathBuf> {
    nsm_sdk::tools::unixsock::remove_unserved(std::path::Path::new(SOCKET_DIR), prefix, ".sock")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kernel_rules() {
        for ok in ["nsmwg-1", "a", "abcdefghijklmno"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "abcdefghijklmnop", ".", "..", "a/b", "a b", "a:b", "a\nb"] {
            let e = validate_name(bad).unwrap_err();
            assert!(matches!(e, WgError::InvalidName { .. }));
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn config_debug_redacts_the_private_key() {
        let k = KeyPair::generate();
        let cfg = WgConfig {
            private_key: k.private.clone(),
            listen_port: 1,
            peer_public_key: k.public.clone(),
            peer_endpoint: None,
            allowed_ips: vec![],
            persistent_keepalive: None,
            mtu: 1420,
            tun_in: None,
        };
        let d = format!("{cfg:?}");
        assert!(!d.contains(&k.private.to_base64()) && d.contains(&k.public.to_base64()), "{d}");
    }

    #[test]
    fn error_messages_name_what_to_check() {
        let e = WgError::PortInUse { name: "nsmwg-1".into(), port: 51820 };
        assert!(e.to_string().contains("51820") && e.to_string().contains("nsmwg-1"), "{e}");
        let e = WgError::Uapi { name: "x".into(), path: socket_path("x"), source: std::io::Error::other("boom") };
        assert!(e.to_string().contains("/var/run/wireguard/x.sock"), "{e}");
    }
}
