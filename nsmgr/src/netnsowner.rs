//! `netnsowner`: ties a local KERNEL connection to the network namespace of
//! the client that asked for it.
//!
//! Without fd passing, a client names its netns by inode (`netnsInode`).
//! The forwarder will put an interface into whatever netns that names, so
//! the nsmgr — the only hop that sees the client's socket — checks the claim:
//!
//! # Guarantees
//! - When the caller's pid is visible (unix socket, same or host PID
//!   namespace), a claimed `netnsInode` (or `inode://dev/ino` `inodeURL`)
//!   must equal the inode of `/proc/<pid>/ns/net`; otherwise
//!   `PermissionDenied`. A request with no claim gets the caller's inode
//!   filled in.
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
//! After `metadata`, before anything that selects or builds.

use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::connection::{Connection, Mechanism};
use nsm_api::mechanisms::{cls, kernel};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_sdk::networkservice::chain::conn_mut;
use nsm_sdk::networkservice::{Context, Element, Next};
use tonic::Status;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner(u64);

/// The `netnsowner` element.
pub struct NetnsOwner;

impl NetnsOwner {
    /// A new element.
    pub fn new() -> Arc<NetnsOwner> {
        Arc::new(NetnsOwner)
    }
}

fn is_local_kernel(m: &Mechanism) -> bool {
    m.r#type == kernel::MECHANISM && (m.cls.is_empty() || m.cls == cls::LOCAL)
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
    fn name(&self) -> &'static str {
        "netnsowner"
    }

    async fn request(
        &self,
        ctx: &mut Context,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection, Status> {
        let caller = caller_inode(ctx);
        let mut owner: Option<u64> = None;
        let conn_id = conn_mut(&mut req).id.clone();
        let mechs = req
            .mechanism_preferences
            .iter_mut()
            .chain(req.connection.as_mut().and_then(|c| c.mechanism.as_mut()))
            .filter(|m| is_local_kernel(m));
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

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        next.close(ctx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

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
        fn name(&self) -> &'static str {
            "seen"
        }
        async fn request(
            &self,
            ctx: &mut Context,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection, Status> {
            *self.0.lock().unwrap() = req.mechanism_preferences[0].parameters.get(kernel::NETNS_INODE).cloned();
            next.request(ctx, req).await
        }
        async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
            next.close(ctx, conn).await
        }
    }

    #[tokio::test]
    async fn fills_in_and_accepts_own_netns() {
        let seen = Arc::new(Seen(Default::default()));
        let chain = Chain::new(vec![Begin::new(), Metadata::new(), NetnsOwner::new(), seen.clone()]);
        chain.request(&mut own_ctx(), req("a", None)).await.unwrap();
        assert_eq!(seen.0.lock().unwrap().clone(), Some(own_inode().to_string()));
        chain.request(&mut own_ctx(), req("b", Some(&own_inode().to_string()))).await.unwrap();
    }

    #[tokio::test]
    async fn spoofed_netns_is_refused() {
        let chain = Chain::new(vec![NetnsOwner::new()]);
        let e = chain.request(&mut own_ctx(), req("a", Some("12345"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("12345"), "{}", e.message());
        let e = chain.request(&mut own_ctx(), req("a", Some("abc"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn another_netns_cannot_take_over_a_connection() {
        let chain = Chain::new(vec![Begin::new(), Metadata::new(), NetnsOwner::new()]);
        // No visible caller pid (e.g. TCP): the claim is trusted and recorded.
        chain.request(&mut Context::default(), req("a", Some("111"))).await.unwrap();
        chain.request(&mut Context::default(), req("a", Some("111"))).await.unwrap();
        let e = chain.request(&mut Context::default(), req("a", Some("222"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("111") && e.message().contains("222"));
    }
}
