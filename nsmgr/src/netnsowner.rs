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
//! - When the caller's pid is visible (same or host PID namespace), every
//!   namespace the mechanism names must be the caller's (the inode of
//!   `/proc/<pid>/ns/net`): `netnsInode`, an `inode://dev/ino` `inodeURL`,
//!   and a path `inodeURL` (`file:///var/run/netns/x`, `/proc/<pid>/ns/net`),
//!   which is opened to find out; otherwise `PermissionDenied` naming both.
//!   A path this nsmgr cannot open is refused too (nobody could check it).
//!   `/proc/self|thread-self/...` (upstream clients' form, meaningful only
//!   with a passed fd) names nothing here. A request without `netnsInode`
//!   gets the caller's filled in.
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
//! - A client may name another namespace than its own only by passing an fd
//!   of it (grpcfd: SCM_RIGHTS on the unix socket, the mechanism naming it
//!   `inode://<dev>/<ino>`, or a path whose namespace is that fd's): holding
//!   the fd proves access. Upstream clients always pass theirs.
//! - A passed netns fd is kept with the connection, and the mechanism the
//!   forwarder gets names it as `file:///proc/<nsmgr pid>/fd/<n>` (stable
//!   across refreshes), so the forwarder opens it instead of searching every
//!   process for the inode; the response carries the client's own URL back.
//!
//! # Chain placement
//! After the endpoint prefix (it stores the owner in `metadata`), before
//! anything that selects or builds.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::connection::{Connection, Mechanism};
use nsm_api::mechanisms::kernel;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_sdk::networkservice::chain::conn_mut;
use nsm_sdk::networkservice::{ConnResult, Context, Element, Next};
use nsm_sdk::tools::grpcfd::{self, FdTransfer};
use nsm_sdk::tools::netns::NetnsError;
use tonic::Status;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner(u64);

/// The netns fd a client passed for its connection, kept while the
/// connection lives here.
#[derive(Clone, Debug)]
struct KeptNetns {
    inode: u64,
    fd: Arc<OwnedFd>,
}

impl KeptNetns {
    /// The `inodeURL` the forwarder gets: the nsmgr's own path to the fd.
    fn url(&self) -> String {
        format!("file://{}", grpcfd::proc_path(&self.fd))
    }
}

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

/// One netns a KERNEL mechanism names: its inode and how it was named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub inode: u64,
    /// `netnsInode 4026532…` or `inodeURL file:///var/run/netns/x`.
    pub by: String,
}

/// Every netns a KERNEL mechanism names (`netnsInode`, and `inodeURL`
/// unless it is the sender-relative `/proc/self|thread-self/...`). A path
/// URL is opened here, so one naming a namespace this nsmgr cannot open is
/// refused: nobody could check that it is the caller's.
pub fn claims(m: &Mechanism) -> Result<Vec<Claim>, Status> {
    let mut out = vec![];
    if let Some(v) = m.parameters.get(kernel::NETNS_INODE).filter(|v| !v.is_empty()) {
        let inode = v
            .parse::<u64>()
            .map_err(|_| Status::invalid_argument(format!("mechanism parameter netnsInode={v:?} is not a number")))?;
        out.push(Claim { inode, by: format!("netnsInode {inode}") });
    }
    if let Some(u) = m.parameters.get(kernel::INODE_URL).filter(|u| !u.trim().is_empty()) {
        match nsm_sdk::tools::netns::inode_named_by(u) {
            Ok(Some((inode, _))) => out.push(Claim { inode, by: format!("inodeURL {u} (netns inode {inode})") }),
            Ok(None) => {}
            Err(e @ (NetnsError::BadUrl { .. } | NetnsError::UnsupportedPath { .. })) => {
                return Err(Status::invalid_argument(format!("mechanism parameter inodeURL: {e}")));
            }
            Err(e) => {
                return Err(Status::permission_denied(format!(
                    "inodeURL {u} names a network namespace this nsmgr cannot check ({e}); a client can only ask for \
                     interfaces in its own network namespace (send inodeURL=inode://<dev>/<ino> or netnsInode)"
                )));
            }
        }
    }
    Ok(out)
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
        let meta = ctx.meta.clone();
        let fds = ctx.peer.fds.clone();
        let mut kept = meta.as_ref().and_then(|m| m.server_get::<KeptNetns>());
        // (the path handed on, the client's own URL) for the response.
        let mut swapped: Option<(String, String)> = None;
        let mechs = req
            .mechanism_preferences
            .iter_mut()
            .chain(req.connection.as_mut().and_then(|c| c.mechanism.as_mut()))
            .filter(|m| is_kernel(m));
        for m in mechs {
            let claims = claims(m)?;
            let passed = |inode: u64| passed_netns(fds.as_deref(), inode);
            if let Some(p) = caller {
                if let Some(c) = claims.iter().find(|c| c.inode != p && passed(c.inode).is_none()) {
                    return Err(Status::permission_denied(format!(
                        "the request names {}, but the calling process runs in netns inode {p} and passed no fd of \
                         that namespace; a client can only ask for interfaces in its own network namespace, or in one \
                         it proves access to by passing its fd",
                        c.by
                    )));
                }
                if !claims.iter().any(|c| c.by.starts_with("netnsInode")) {
                    let ino = claims.first().map(|c| c.inode).unwrap_or(p);
                    m.parameters.insert(kernel::NETNS_INODE.to_string(), ino.to_string());
                }
            } else if let [first, rest @ ..] = claims.as_slice()
                && let Some(c) = rest.iter().find(|c| c.inode != first.inode)
            {
                return Err(Status::invalid_argument(format!(
                    "the request names two network namespaces: {} and {}",
                    first.by, c.by
                )));
            }
            // A passed fd of the named namespace: the forwarder opens ours.
            if let Some(c) = claims.first() {
                if kept.as_ref().is_none_or(|k| k.inode != c.inode)
                    && let Some(fd) = passed(c.inode)
                {
                    kept = Some(KeptNetns { inode: c.inode, fd });
                }
                if let Some(k) = kept.as_ref().filter(|k| k.inode == c.inode) {
                    let ours = k.url();
                    if let Some(theirs) = m.parameters.insert(kernel::INODE_URL.to_string(), ours.clone()) {
                        swapped = Some((ours, theirs));
                    }
                }
            }
            owner = owner.or(claims.first().map(|c| c.inode)).or(caller);
        }
        if let (Some(o), Some(Owner(prev))) = (owner, meta.as_ref().and_then(|m| m.server_get::<Owner>()))
            && o != prev
        {
            return Err(Status::permission_denied(format!(
                "connection {conn_id} belongs to a client in netns inode {prev}; this request comes from netns inode {o}"
            )));
        }
        let mut conn = next.request(ctx, req).await?;
        // The client gets its own URL back (upstream's sendfd maps it back
        // to the file it passed).
        if let (Some((ours, theirs)), Some(m)) = (swapped, conn.mechanism.as_mut())
            && m.parameters.get(kernel::INODE_URL) == Some(&ours)
        {
            m.parameters.insert(kernel::INODE_URL.to_string(), theirs);
        }
        if let (Some(o), Some(m)) = (owner, meta) {
            m.server_insert(Owner(o));
            if let Some(k) = kept.filter(|k| k.inode == o) {
                m.server_insert(k);
            }
        }
        Ok(conn)
    }

    /// The Close carries the client's URL; downstream saw the kept fd's
    /// path on Request, so it sees that on Close too.
    async fn close(&self, ctx: &mut Context, mut conn: Connection, next: Next) -> Result<(), Status> {
        let kept = ctx.meta.as_ref().and_then(|m| m.server_get::<KeptNetns>());
        if let (Some(k), Some(m)) = (kept, conn.mechanism.as_mut())
            && is_kernel(m)
        {
            m.parameters.insert(kernel::INODE_URL.to_string(), k.url());
        }
        next.close(ctx, conn).await
    }
}

/// The fd of network namespace `inode` the caller passed on this
/// connection, if it did.
fn passed_netns(fds: Option<&FdTransfer>, inode: u64) -> Option<Arc<OwnedFd>> {
    let nsfs = nsm_sdk::tools::netns::nsfs_dev().ok()?;
    fds?.get((nsfs, inode))
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

    fn with_url(id: &str, url: &str) -> NetworkServiceRequest {
        let mut r = req(id, None);
        r.mechanism_preferences[0].parameters.insert(kernel::INODE_URL.into(), url.into());
        r
    }

    /// An inodeURL path naming another netns used to be replaced silently
    /// by the caller's own; it is refused, naming both (needs root: a real
    /// namespace).
    #[tokio::test]
    async fn a_path_to_another_netns_is_refused_naming_both() {
        let other = nsm_sdk::testing::netns::TestNetns::new("nsmgr-owner");
        let seen = Arc::new(Seen(Default::default()));
        let chain = Chain::new(vec![NetnsOwner::new(Verify::Strict), seen.clone()]);
        let url = format!("file:///var/run/netns/{}", other.name());
        let e = chain.request(&mut own_ctx(), with_url("a", &url)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let m = e.message();
        assert!(m.contains(&url) && m.contains(&other.handle().inode().to_string()), "{m}");
        assert!(m.contains(&format!("netns inode {}", own_inode())), "{m}");
        assert!(seen.0.lock().unwrap().is_none(), "nothing passed on");
        // Also when a matching netnsInode comes with it.
        let mut r = with_url("a", &url);
        r.mechanism_preferences[0].parameters.insert(kernel::NETNS_INODE.into(), own_inode().to_string());
        assert_eq!(chain.request(&mut own_ctx(), r).await.unwrap_err().code(), tonic::Code::PermissionDenied);
        // A path nobody here can open cannot be checked: refused.
        let e = chain.request(&mut own_ctx(), with_url("a", "file:///run/netns/no-such-netns")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("no-such-netns"), "{}", e.message());
    }

    #[tokio::test]
    async fn urls_naming_the_callers_own_netns_pass() {
        let seen = Arc::new(Seen(Default::default()));
        let chain = Chain::new(vec![NetnsOwner::new(Verify::Strict), seen.clone()]);
        let (own_url, _) = nsm_sdk::tools::netns::own_netns_params().unwrap();
        for url in [
            own_url.as_str(),
            &format!("file:///proc/{}/ns/net", std::process::id()),
            "file:///proc/thread-self/ns/net",
        ] {
            *seen.0.lock().unwrap() = None;
            chain.request(&mut own_ctx(), with_url("a", url)).await.unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(seen.0.lock().unwrap().clone(), Some(own_inode().to_string()), "{url}");
        }
        let e = chain.request(&mut own_ctx(), with_url("a", "ftp://x")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
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

    /// Records the inodeURL the next element receives.
    struct SeenUrl(std::sync::Mutex<Option<String>>);

    #[async_trait]
    impl Element for SeenUrl {
        async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
            *self.0.lock().unwrap() = req.mechanism_preferences[0].parameters.get(kernel::INODE_URL).cloned();
            next.request(ctx, req).await
        }
    }

    /// A client that passes the fd of a namespace proves access to it
    /// (upstream's grpcfd): the request names it by `inode://`, and the
    /// forwarder is handed the nsmgr's kept fd by path, the same one on every
    /// refresh (needs root: a real namespace).
    #[tokio::test]
    async fn a_passed_netns_fd_proves_access_and_is_handed_on_by_path() {
        let other = nsm_sdk::testing::netns::TestNetns::new("nsmgr-fd");
        let ino = other.handle().inode();
        let nsfs = nsm_sdk::tools::netns::nsfs_dev().unwrap();
        let url = grpcfd::inode_url((nsfs, ino));
        let seen = Arc::new(Seen(Default::default()));
        let seen_url = Arc::new(SeenUrl(Default::default()));
        let chain = Chain::new(vec![
            Begin::new(),
            Metadata::new(),
            NetnsOwner::new(Verify::Strict),
            seen.clone(),
            seen_url.clone(),
        ]);
        // Without the fd: not the caller's netns, refused naming both.
        let e = chain.request(&mut own_ctx(), with_url("a", &url)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains(&url) && e.message().contains("passed no fd"), "{}", e.message());
        // With it: accepted for that namespace.
        let with_fd = || {
            let fds = Arc::new(FdTransfer::default());
            fds.accept(std::fs::File::open(other.path()).unwrap().into());
            let mut ctx = own_ctx();
            ctx.peer.fds = Some(fds);
            ctx
        };
        chain.request(&mut with_fd(), with_url("a", &url)).await.unwrap();
        assert_eq!(seen.0.lock().unwrap().clone(), Some(ino.to_string()), "netnsInode is the passed namespace's");
        let handed = seen_url.0.lock().unwrap().clone().unwrap();
        let path = handed.strip_prefix("file://").unwrap();
        assert!(path.starts_with(&format!("/proc/{}/fd/", std::process::id())), "{handed}");
        assert_eq!(nsm_sdk::tools::netns::inode_of(std::path::Path::new(path)).unwrap(), ino);
        // A refresh passes a new fd: the forwarder still gets the same path.
        chain.request(&mut with_fd(), with_url("a", &url)).await.unwrap();
        assert_eq!(seen_url.0.lock().unwrap().clone().unwrap(), handed);
        // A path naming that namespace, with its fd: accepted too.
        let p = format!("file:///var/run/netns/{}", other.name());
        chain.request(&mut with_fd(), with_url("b", &p)).await.unwrap();
    }
}
