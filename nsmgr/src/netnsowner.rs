//! `netnsowner`: ties a local KERNEL connection to the network namespace of
//! the client that asked for it.
//!
//! Without fd passing, a client names its netns by inode (`netnsInode`).
//! The forwarder will put an interface into whatever netns that names, so
//! the nsmgr — the only hop that sees the client's socket — checks the claim:
//!
//! # Guarantees
//! - Every KERNEL mechanism is checked, whatever its `cls` says.
//! - KERNEL requests must come over the unix socket: a TCP caller is on
//!   another node and cannot own a network namespace here
//!   (`PermissionDenied`).
//! - When the caller's pid is visible (same or host PID namespace), a
//!   claimed `netnsInode` (or `inode://dev/ino` `inodeURL`) must equal the
//!   inode of `/proc/<pid>/ns/net`; otherwise `PermissionDenied`. A request
//!   with no claim gets the caller's inode filled in.
//! - When the pid is not visible (the nsmgr runs in its own PID namespace),
//!   the claim cannot be checked: [`Verify::Strict`] (the default) refuses
//!   with a message saying how to fix the deployment (run the nsmgr with
//!   `hostPID`); [`Verify::Lenient`] accepts the claim and logs a warning.
//! - The first successful Request records the netns as the connection's
//!   owner; a later Request for the same connection from another netns is
//!   `PermissionDenied` naming both. (A sidecar taking over an init
//!   container's connection shares the pod netns, so it is allowed.)
//! - Requests without a local KERNEL mechanism (remote hops) pass through.
//!
//! Acting for another pod's netns needs fd passing (a client proves access
//! by sending the fd); until that exists it is refused.
//!
//! # Chain placement
//! After the endpoint prefix (it stores the owner in `metadata`), before
//! anything that selects or builds.

use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::connection::Mechanism;
use nsm_api::mechanisms::kernel;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_sdk::networkservice::chain::conn_mut;
use nsm_sdk::networkservice::{ConnResult, Context, Element, Next};
use tonic::Status;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner(u64);

/// What to do when the caller's pid is not visible to the nsmgr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Verify {
    /// Refuse: the netns claim cannot be checked.
    Strict,
    /// Accept the claim and log a warning.
    Lenient,
}

/// The `netnsowner` element.
pub struct NetnsOwner {
    verify: Verify,
}

impl NetnsOwner {
    /// A new element.
    pub fn new(verify: Verify) -> Arc<NetnsOwner> {
        Arc::new(NetnsOwner { verify })
    }
}

fn is_kernel(m: &Mechanism) -> bool {
    m.r#type == kernel::MECHANISM
}

/// The netns inode a KERNEL mechanism claims, if any.
pub fn claimed_inode(m: &Mechanism) -> Result<Option<u64>, Status> {
    if let Some(v) = m.parameters.get(kernel::NETNS_INODE).filter(|v| !v.is_empty()) {
        return v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| Status::invalid_argument(format!("mechanism parameter netnsInode={v:?} is not a number")));
    }
    if let Some(u) = m.parameters.get(kernel::INODE_URL).and_then(|u| u.strip_prefix("inode://")) {
        let ino = u.rsplit('/').next().unwrap_or_default();
        return ino.parse::<u64>().map(Some).map_err(|_| {
            Status::invalid_argument(format!("mechanism parameter inodeURL=inode://{u} has no inode number"))
        });
    }
    Ok(None)
}

fn caller_inode(ctx: &Context) -> Option<u64> {
    let pid = ctx.peer.pid.filter(|p| *p > 0)?;
    nsm_sdk::tools::netns::inode_of(std::path::Path::new(&format!("/proc/{pid}/ns/net"))).ok()
}

#[async_trait]
impl Element for NetnsOwner {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let caller = caller_inode(ctx);
        let mut owner: Option<u64> = None;
        let conn_id = conn_mut(&mut req).id.clone();
        let any_kernel = req
            .mechanism_preferences
            .iter()
            .chain(req.connection.as_ref().and_then(|c| c.mechanism.as_ref()))
            .any(is_kernel);
        if any_kernel {
            if let Some(addr) = ctx.peer.addr {
                return Err(Status::permission_denied(format!(
                    "KERNEL interfaces are only set up for clients on this node's unix socket; {addr} called over TCP"
                )));
            }
            if caller.is_none() {
                match self.verify {
                    Verify::Strict => {
                        return Err(Status::permission_denied(
                            "cannot verify the client's network namespace: the nsmgr does not see the caller's pid \
                             (run the nsmgr in the host PID namespace, hostPID: true, or set NSM_CLIENT_NETNS_CHECK=lenient)",
                        ));
                    }
                    Verify::Lenient => {
                        tracing::warn!(conn_id = %conn_id, "caller pid not visible: trusting the client's netns claim (NSM_CLIENT_NETNS_CHECK=lenient)");
                    }
                }
            }
        }
        let mechs = req
            .mechanism_preferences
            .iter_mut()
            .chain(req.connection.as_mut().and_then(|c| c.mechanism.as_mut()))
            .filter(|m| is_kernel(m));
        for m in mechs {
            let claimed = claimed_inode(m)?;
            match (claimed, caller) {
                (Some(c), Some(p)) if c != p => {
                    return Err(Status::permission_denied(format!(
                        "the request claims netns inode {c}, but the calling process runs in netns inode {p}; \
                         a client can only ask for interfaces in its own network namespace"
                    )));
                }
                (None, Some(p)) => {
                    m.parameters.insert(kernel::NETNS_INODE.to_string(), p.to_string());
                }
                _ => {}
            }
            owner = owner.or(claimed).or(caller);
        }
        let meta = ctx.meta.clone();
        if let (Some(o), Some(Owner(prev))) = (owner, meta.as_ref().and_then(|m| m.server_get::<Owner>()))
            && o != prev
        {
            return Err(Status::permission_denied(format!(
                "connection {conn_id} belongs to a client in netns inode {prev}; this request comes from netns inode {o}"
            )));
        }
        let conn = next.request(ctx, req).await?;
        if let (Some(o), Some(m)) = (owner, meta) {
            m.server_insert(Owner(o));
        }
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use nsm_api::connection::Connection;
    use nsm_sdk::networkservice::Chain;
    use nsm_sdk::networkservice::begin::Begin;
    use nsm_sdk::networkservice::metadata::Metadata;

    use super::*;

    fn req(id: &str, inode: Option<&str>) -> NetworkServiceRequest {
        let mut p = HashMap::from([(kernel::NAME.to_string(), "nsm-1".to_string())]);
        if let Some(i) = inode {
            p.insert(kernel::NETNS_INODE.into(), i.into());
        }
        NetworkServiceRequest {
            connection: Some(Connection { id: id.into(), ..Default::default() }),
            mechanism_preferences: vec![Mechanism { cls: "LOCAL".into(), r#type: "KERNEL".into(), parameters: p }],
        }
    }

    fn own_ctx() -> Context {
        let mut ctx = Context::default();
        ctx.peer.pid = Some(std::process::id() as i32);
        ctx
    }

    fn own_inode() -> u64 {
        nsm_sdk::tools::netns::inode_of(std::path::Path::new("/proc/self/ns/net")).unwrap()
    }

    /// Records the netnsInode parameter the next element receives.
    struct Seen(std::sync::Mutex<Option<String>>);

    #[async_trait]
    impl Element for Seen {
        async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
            *self.0.lock().unwrap() = req.mechanism_preferences[0].parameters.get(kernel::NETNS_INODE).cloned();
            next.request(ctx, req).await
        }
    }

    #[tokio::test]
    async fn fills_in_and_accepts_own_netns() {
        let seen = Arc::new(Seen(Default::default()));
        let chain = Chain::new(vec![Begin::new(), Metadata::new(), NetnsOwner::new(Verify::Strict), seen.clone()]);
        chain.request(&mut own_ctx(), req("a", None)).await.unwrap();
        assert_eq!(seen.0.lock().unwrap().clone(), Some(own_inode().to_string()));
        chain.request(&mut own_ctx(), req("b", Some(&own_inode().to_string()))).await.unwrap();
    }

    #[tokio::test]
    async fn spoofed_netns_is_refused() {
        let chain = Chain::new(vec![NetnsOwner::new(Verify::Strict)]);
        let e = chain.request(&mut own_ctx(), req("a", Some("12345"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("12345"), "{}", e.message());
        let e = chain.request(&mut own_ctx(), req("a", Some("abc"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn tcp_callers_and_invisible_pids_are_refused_when_strict() {
        let chain = Chain::new(vec![NetnsOwner::new(Verify::Strict)]);
        let mut tcp = Context::default();
        tcp.peer.addr = Some("10.0.0.9:40000".parse().unwrap());
        let e = chain.request(&mut tcp, req("a", Some("111"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("TCP"), "{}", e.message());
        let e = chain.request(&mut Context::default(), req("a", Some("111"))).await.unwrap_err();
        assert!(e.message().contains("hostPID"), "{}", e.message());
        // cls=REMOTE does not smuggle a KERNEL mechanism past the check.
        let mut r = req("a", Some("12345"));
        r.mechanism_preferences[0].cls = "REMOTE".into();
        let e = chain.request(&mut own_ctx(), r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }

    #[tokio::test]
    async fn another_netns_cannot_take_over_a_connection() {
        let chain = Chain::new(vec![Begin::new(), Metadata::new(), NetnsOwner::new(Verify::Lenient)]);
        // Lenient and no visible caller pid: the claim is trusted and recorded.
        chain.request(&mut Context::default(), req("a", Some("111"))).await.unwrap();
        chain.request(&mut Context::default(), req("a", Some("111"))).await.unwrap();
        let e = chain.request(&mut Context::default(), req("a", Some("222"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("111") && e.message().contains("222"));
    }
}
