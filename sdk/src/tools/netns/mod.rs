//! Network-namespace handles and the resolver for KERNEL mechanism parameters.
//!
//! # Guarantees
//! - A [`NetnsHandle`] always refers to a *network* namespace: [`NetnsHandle::open`]
//!   checks that the file lives on nsfs (same `st_dev` as `/proc/self/ns/net`)
//!   and that it is of type `net` (the fd's link text `net:[<inode>]`, or, for
//!   a bind-mounted file, `setns(CLONE_NEWNET)` accepting it on a throwaway
//!   thread); anything else (a regular file, a mount or PID namespace, a FIFO)
//!   is rejected. The handle keeps the
//!   namespace file open, so the namespace stays alive (and its inode stays
//!   valid) as long as any clone of the handle exists.
//! - No tokio worker thread ever changes its network namespace.
//!   [`NetnsHandle::netlink`] and [`NetnsHandle::run`] do their work on a
//!   short-lived, dedicated OS thread that calls `setns(CLONE_NEWNET)` and
//!   then exits. A netlink socket is bound to the namespace of the thread that
//!   *created* it, so the socket made on that thread keeps acting in the
//!   target namespace after the thread is gone.
//! - [`resolve()`] never returns a namespace it could not positively match:
//!   when the client sends `netnsInode`, the namespace returned has exactly
//!   that inode (re-checked with `fstat` on the opened descriptor), and a
//!   path whose inode does not match (a pid from another PID namespace, a
//!   reused pid) is not used.
//!
//! # Parameters understood by [`resolve()`]
//! - `inodeURL`: `file:///proc/<pid>/ns/net`, `file:///proc/<pid>/task/<tid>/ns/net`,
//!   `file:///run/netns/<name>`, `file:///var/run/netns/<name>` (or the same
//!   as a bare absolute path), or the grpcfd in-transit form
//!   `inode://<dev>/<ino>`. `file:///proc/self/...` and
//!   `file:///proc/thread-self/...` only mean something to the sender; the
//!   inode is then required.
//! - `netnsInode`: the decimal inode of the namespace.
//!
//! Clients advertise [`own_netns_params`] and, on a unix socket, also pass
//! the namespace's fd (grpcfd, `crate::tools::grpcfd`): the nsmgr then names
//! it `file:///proc/<nsmgr pid>/fd/<n>` for the forwarder.
//!
//! [`handle`] opens, checks and enters namespaces; [`resolve`](mod@resolve)
//! finds the one a mechanism names.

use std::io;

pub mod handle;
pub mod resolve;

pub use handle::{NetnsHandle, inode_of, nsfs_dev, own_netns_params};
pub use resolve::inode_named_by;
pub use resolve::{all_netns, resolve};

/// The calling thread's network namespace file.
pub const THREAD_SELF_NETNS: &str = "/proc/thread-self/ns/net";

/// Where `ip netns add` bind-mounts named namespaces.
pub const NETNS_RUN_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// Failures to open, identify or enter a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened or inspected.
    #[error(
        "cannot open network namespace file {path}: {source}; check that the process owning it is still running \
         (for /proc/<pid>/ns/net) or that the namespace is still mounted (for /run/netns/<name>)"
    )]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The file exists but is not a network namespace.
    #[error("{path} is not a network namespace file: {reason}")]
    NotNetns { path: String, reason: String },
    /// No namespace with the requested inode was found.
    #[error(
        "no network namespace with inode {inode} found in /run/netns, /var/run/netns or /proc/*/ns/net; check \
         that the client process is still running and is visible to the forwarder (same PID namespace, e.g. \
         hostPID) or that its namespace is bind-mounted under /run/netns"
    )]
    NotFound { inode: u64 },
    /// The URL is only meaningful inside the sender's process.
    #[error(
        "inodeURL {url:?} names the sender's own namespace and means nothing to another process; the client must \
         also send the netnsInode parameter or pass the namespace fd on a unix socket"
    )]
    SelfRelative { url: String },
    /// The URL is a well-formed path, but not one of the supported forms, and
    /// no inode was given to search by.
    #[error(
        "inodeURL {url:?} is not a supported network namespace path (use file:///proc/<pid>/ns/net, \
         file:///run/netns/<name> or file:///var/run/netns/<name>), and no netnsInode was given to search by"
    )]
    UnsupportedPath { url: String },
    /// Neither parameter was given.
    #[error(
        "the KERNEL mechanism carries neither inodeURL nor netnsInode, so the client's network namespace is \
         unknown; the client must send netnsInode (and preferably inodeURL=inode://<dev>/<ino>)"
    )]
    Missing,
    /// `netnsInode` is not a decimal number.
    #[error("netnsInode {value:?} is not a decimal inode number")]
    BadInode { value: String },
    /// `inodeURL` is malformed.
    #[error("inodeURL {value:?} is malformed: {reason}")]
    BadUrl { value: String, reason: String },
    /// `inodeURL` and `netnsInode` disagree.
    #[error(
        "inodeURL {url:?} designates inode {url_inode} but netnsInode says {inode}; refusing to guess which \
         namespace the client meant"
    )]
    Conflict { url: String, url_inode: u64, inode: u64 },
    /// `setns(CLONE_NEWNET)` failed.
    #[error(
        "cannot enter network namespace {netns}: {source}; the forwarder needs CAP_SYS_ADMIN (run privileged / as \
         root)"
    )]
    Setns {
        netns: String,
        #[source]
        source: nix::Error,
    },
    /// The netlink socket could not be created inside the namespace.
    #[error("cannot open a netlink socket in network namespace {netns}: {source}")]
    Netlink {
        netns: String,
        #[source]
        source: io::Error,
    },
    /// The helper thread could not be spawned.
    #[error("cannot spawn a thread to enter network namespace {netns}: {source}; check the process thread limit")]
    Thread {
        netns: String,
        #[source]
        source: io::Error,
    },
    /// The helper thread died before answering (the closure panicked).
    #[error("the task run inside network namespace {netns} panicked")]
    Panicked { netns: String },
    /// Called outside a tokio runtime.
    #[error("netlink access to network namespace {netns} needs a tokio runtime (call it from async code)")]
    NoRuntime { netns: String },
}
