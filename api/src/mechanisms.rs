//! Mechanism classes, types, payloads and parameter keys, with the same
//! strings as upstream `api/pkg/api/networkservice/mechanisms/*`.

/// Mechanism classes (`Mechanism.cls`).
pub mod cls {
    pub const LOCAL: &str = "LOCAL";
    pub const REMOTE: &str = "REMOTE";
}

/// Payload types (`Connection.payload`, `NetworkService.payload`).
pub mod payload {
    pub const ETHERNET: &str = "ETHERNET";
    pub const IP: &str = "IP";
}

/// Mechanism types (`Mechanism.type`).
pub mod types {
    pub const KERNEL: &str = "KERNEL";
    pub const MEMIF: &str = "MEMIF";
    pub const VXLAN: &str = "VXLAN";
    pub const WIREGUARD: &str = "WIREGUARD";
    pub const IPSEC: &str = "IPSEC";
    pub const VLAN: &str = "VLAN";
    pub const VFIO: &str = "VFIO";
    pub const NOOP: &str = "NOOP";
    pub const SRV6: &str = "SRV6";
}

/// Parameter keys shared by several mechanisms (`common/constants.go`).
pub mod common {
    pub const SRC_IP: &str = "src_ip";
    pub const DST_IP: &str = "dst_ip";
    pub const SRC_PORT: &str = "src_port";
    pub const DST_PORT: &str = "dst_port";
    pub const ORIG_SRC_IP: &str = "orig_src_ip";
    pub const ORIG_DST_IP: &str = "orig_dst_ip";
    /// Inode number (decimal) of the network namespace the interface goes into.
    pub const NETNS_INODE: &str = "netnsInode";
    /// Linux interface name.
    pub const NAME: &str = "name";
    /// URL of a file (netns or socket): `file:///proc/<pid>/ns/net`,
    /// `inode://<dev>/<ino>` in transit.
    pub const INODE_URL: &str = "inodeURL";
    pub const PCI_ADDRESS: &str = "pciAddress";
    pub const TOKEN_ID: &str = "tokenID";
    /// Upper-case on purpose, as upstream.
    pub const MTU: &str = "MTU";
}

/// KERNEL mechanism.
pub mod kernel {
    pub use super::common::{INODE_URL, NAME, NETNS_INODE, PCI_ADDRESS, TOKEN_ID};
    pub const MECHANISM: &str = super::types::KERNEL;
    pub const SUPPORTS_VLAN: &str = "supportsVlan";
    pub const VLAN: &str = "vlan";
    pub const ROUTE_LOCAL_NET: &str = "routeLocalNet";
    pub const IPTABLES4_NAT_TEMPLATE: &str = "IPTables4NatTemplate";
    /// `kernel.LinuxIfMaxLength`: IFNAMSIZ - 1.
    pub const LINUX_IF_MAX_LENGTH: usize = 15;
    /// Scheme of netns URLs (`file://...`).
    pub const NETNS_URL_SCHEME: &str = "file";
}

/// VXLAN mechanism.
pub mod vxlan {
    pub use super::common::{DST_IP, DST_PORT, MTU, SRC_IP, SRC_PORT};
    pub const MECHANISM: &str = super::types::VXLAN;
    pub const VNI: &str = "vni";
    pub const DEFAULT_PORT: u16 = 4789;
}

/// WIREGUARD mechanism.
pub mod wireguard {
    pub use super::common::{DST_IP, DST_PORT, MTU, SRC_IP, SRC_PORT};
    pub const MECHANISM: &str = super::types::WIREGUARD;
    pub const SRC_PUBLIC_KEY: &str = "src_public_key";
    pub const DST_PUBLIC_KEY: &str = "dst_public_key";
    pub const DEFAULT_PORT: u16 = 51820;
}

/// MEMIF mechanism.
pub mod memif {
    pub const MECHANISM: &str = super::types::MEMIF;
    pub const SOCKET_FILE: &str = "socketfile";
    pub use super::common::INODE_URL;
}

/// Label keys used by the mesh itself.
pub mod labels {
    pub const NODE_NAME: &str = "nodeName";
    pub const POD_NAME: &str = "podName";
    pub const CLUSTER_NAME: &str = "clusterName";
}
