//! The forwarder's errors as gRPC statuses: one mapping for every path
//! (veth, VXLAN, WireGuard; client and endpoint side), so the same failure
//! always reaches the client with the same code.
//!
//! | failure | code | why |
//! |---|---|---|
//! | an interface name, address, route, alias, VNI or tunnel parameter the kernel refuses | `InvalidArgument` | the request is wrong |
//! | the interface name belongs to someone else | `AlreadyExists` | pick another name |
//! | the VNI is taken on this node | `Aborted` | the next attempt negotiates another |
//! | a UDP port is taken by something else | `Unavailable` | retryable; the next attempt picks another |
//! | a namespace that cannot be found | `FailedPrecondition` | the client or endpoint is gone |
//! | anything else (netlink, TUN, threads) | `Internal` | the message says what to check |

use nsm_sdk::tools::netns::NetnsError;
use tonic::Status;

use crate::kernel::KernelError;
use crate::wireguard::WgError;

impl From<KernelError> for Status {
    fn from(e: KernelError) -> Status {
        let m = e.to_string();
        match e {
            KernelError::InvalidName { .. }
            | KernelError::InvalidAlias { .. }
            | KernelError::InvalidAddress { .. }
            | KernelError::InvalidRoute { .. }
            | KernelError::InvalidVni { .. }
            | KernelError::InvalidTunnel { .. } => Status::invalid_argument(m),
            KernelError::NameTaken { .. } => Status::already_exists(m),
            KernelError::VniInUse { .. } => Status::aborted(m),
            KernelError::PortInUse { .. } => Status::unavailable(m),
            _ => Status::internal(m),
        }
    }
}

impl From<WgError> for Status {
    fn from(e: WgError) -> Status {
        let m = e.to_string();
        match e {
            WgError::InvalidName { .. } | WgError::InvalidConfig { .. } => Status::invalid_argument(m),
            WgError::NameTaken { .. } => Status::already_exists(m),
            WgError::PortInUse { .. } => Status::unavailable(format!("{m}; the next attempt picks another port")),
            _ => Status::internal(m),
        }
    }
}

/// A namespace of `who` ("client", "endpoint") that cannot be resolved.
pub fn netns(who: &str, e: NetnsError) -> Status {
    Status::failed_precondition(format!("cannot find the {who}'s network namespace: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let s: Status = KernelError::InvalidVni { vni: 0 }.into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s: Status =
            KernelError::NameTaken { netns: "n".into(), name: "nsm-1".into(), alias_found: "x".into() }.into();
        assert_eq!(s.code(), tonic::Code::AlreadyExists);
        assert!(s.message().contains("nsm-1"));
        let s: Status =
            KernelError::VniInUse { netns: "n".into(), name: "v".into(), vni: 7, port: 4789, family: "IPv4" }.into();
        assert_eq!(s.code(), tonic::Code::Aborted);
        let s: Status = WgError::PortInUse { name: "w".into(), port: 51820 }.into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("51820") && s.message().contains("next attempt"), "{}", s.message());
        let s: Status = WgError::Closed { name: "w".into() }.into();
        assert_eq!(s.code(), tonic::Code::Internal);
    }
}
