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
//! - [`resolve`] never returns a namespace it could not positively match:
//!   when the client sends `netnsInode`, the namespace returned has exactly
//!   that inode (re-checked with `fstat` on the opened descriptor), and a
//!   path whose inode does not match (a pid from another PID namespace, a
//!   reused pid) is not used.
//!
//! # Parameters understood by [`resolve`]
//! - `inodeURL`: `file:///proc/<pid>/ns/net`, `file:///proc/<pid>/task/<tid>/ns/net`,
//!   `file:///run/netns/<name>`, `file:///var/run/netns/<name>` (or the same
//!   as a bare absolute path), or the grpcfd in-transit form
//!   `inode://<dev>/<ino>`. `file:///proc/self/...` and
//!   `file:///proc/thread-self/...` only mean something to the sender; the
//!   inode is then required.
//! - `netnsInode`: the decimal inode of the namespace.
//!
//! Passing namespace file descriptors over the unix socket (grpcfd) is not
//! supported yet; clients advertise [`own_netns_params`] instead.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::sched::{CloneFlags, setns};

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
         also send the netnsInode parameter (passing the namespace fd is not supported yet)"
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
         unknown; the client must send netnsInode (and preferably inodeURL=file:///proc/<pid>/ns/net)"
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

/// An open network namespace.
///
/// Cloning is cheap (the file is shared). Equality is namespace identity
/// (the nsfs inode), not the path it was opened from.
#[derive(Clone)]
pub struct NetnsHandle {
    file: Arc<File>,
    inode: u64,
    desc: Arc<str>,
}

impl fmt::Debug for NetnsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("NetnsHandle").field(&self.desc).finish()
    }
}

impl fmt::Display for NetnsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl PartialEq for NetnsHandle {
    fn eq(&self, other: &Self) -> bool {
        self.inode == other.inode
    }
}

impl Eq for NetnsHandle {}

impl AsFd for NetnsHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

// === impl NetnsHandle ===

impl NetnsHandle {
    /// Opens `path` and checks that it is a network namespace.
    ///
    /// The file is opened `O_RDONLY|O_CLOEXEC|O_NONBLOCK` (non-blocking so a
    /// FIFO planted at a namespace path cannot hang the caller; it is then
    /// rejected as not a namespace).
    pub fn open(path: &Path) -> Result<NetnsHandle, NetnsError> {
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_NONBLOCK.bits() | OFlag::O_CLOEXEC.bits())
            .open(path)
            .map_err(|source| NetnsError::Open { path: shown.clone(), source })?;
        let inode = check_netns_file(&file, &shown)?;
        Ok(NetnsHandle { file: Arc::new(file), inode, desc: format!("{shown} (netns inode {inode})").into() })
    }

    /// The calling thread's network namespace (`/proc/thread-self/ns/net`).
    pub fn current() -> Result<NetnsHandle, NetnsError> {
        NetnsHandle::open(Path::new(THREAD_SELF_NETNS))
    }

    /// The namespace's inode number (what `netnsInode` carries).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The open namespace file.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// For messages: `"<path> (netns inode <n>)"`.
    pub fn describe(&self) -> &str {
        &self.desc
    }

    /// A netlink (rtnetlink) handle whose socket lives in this namespace.
    ///
    /// The socket is created on a short-lived OS thread that entered the
    /// namespace; its connection task runs on the current tokio runtime and
    /// ends (closing the socket) once every clone of the returned handle is
    /// dropped.
    pub async fn netlink(&self) -> Result<rtnetlink::Handle, NetnsError> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| NetnsError::NoRuntime { netns: self.desc.to_string() })?;
        let netns = self.desc.to_string();
        self.spawn_in(move || {
            let _guard = rt.enter();
            // The unsolicited-message receiver is dropped: this socket joins no
            // multicast group, and dropping it lets the connection end when the
            // last Handle goes away.
            let (conn, handle, _unsolicited) =
                rtnetlink::new_connection().map_err(|source| NetnsError::Netlink { netns, source })?;
            rt.spawn(conn);
            Ok(handle)
        })
        .await?
    }

    /// Runs `f` on a dedicated OS thread that has entered this namespace
    /// (for `/proc/sys/net/...` writes and other per-thread-namespace work).
    /// The thread exits afterwards; `f` must not rely on thread-locals.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        self.spawn_in(f).await
    }

    async fn spawn_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let file = self.file.clone();
        let netns = self.desc.to_string();
        let netns2 = netns.clone();
        std::thread::Builder::new()
            .name("netns-enter".into())
            .spawn(move || {
                let r = match setns(file.as_fd(), CloneFlags::CLONE_NEWNET) {
                    Ok(()) => Ok(f()),
                    Err(source) => Err(NetnsError::Setns { netns: netns2, source }),
                };
                let _ = tx.send(r);
            })
            .map_err(|source| NetnsError::Thread { netns: netns.clone(), source })?;
        rx.await.map_err(|_| NetnsError::Panicked { netns })?
    }
}

/// Checks that `file` is a network namespace; returns its inode.
fn check_netns_file(file: &File, shown: &str) -> Result<u64, NetnsError> {
    let meta = file.metadata().map_err(|source| NetnsError::Open { path: shown.to_string(), source })?;
    let nsfs = nsfs_dev()?;
    if meta.dev() != nsfs {
        return Err(NetnsError::NotNetns {
            path: shown.to_string(),
            reason: format!(
                "it is on device {} but namespace files live on nsfs (device {nsfs}); point inodeURL at \
                 /proc/<pid>/ns/net or a file bind-mounted by `ip netns add`",
                meta.dev()
            ),
        });
    }
    // nsfs also holds mnt/pid/uts/... namespaces. Opened through a
    // /proc/<pid>/ns link, the fd's link text names the type ("net:[<ino>]");
    // opened through a bind mount (ip netns), it is just the mount path, so
    // ask the kernel: setns(CLONE_NEWNET) on a throwaway thread accepts only a
    // network namespace.
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|source| NetnsError::Open { path: shown.to_string(), source })?;
    let link = link.to_string_lossy();
    if let Some((kind, _)) = link.split_once(":[") {
        if kind != "net" {
            return Err(NetnsError::NotNetns {
                path: shown.to_string(),
                reason: format!("it is the namespace {link}, not a network namespace"),
            });
        }
    } else {
        probe_setns(file, shown)?;
    }
    Ok(meta.ino())
}

/// Enters `file` with `CLONE_NEWNET` on a scoped thread that then exits.
fn probe_setns(file: &File, shown: &str) -> Result<(), NetnsError> {
    let r = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("netns-probe".into())
            .spawn_scoped(s, || setns(file.as_fd(), CloneFlags::CLONE_NEWNET))
            .map(|h| h.join())
    });
    match r {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(nix::errno::Errno::EINVAL))) => Err(NetnsError::NotNetns {
            path: shown.to_string(),
            reason: "the kernel refuses it as a network namespace (it is another kind of namespace)".into(),
        }),
        Ok(Ok(Err(source))) => Err(NetnsError::Setns { netns: shown.to_string(), source }),
        Ok(Err(_)) => Err(NetnsError::Panicked { netns: shown.to_string() }),
        Err(source) => Err(NetnsError::Thread { netns: shown.to_string(), source }),
    }
}

/// The device number of nsfs.
fn nsfs_dev() -> Result<u64, NetnsError> {
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.dev())
        .map_err(|source| NetnsError::Open { path: "/proc/self/ns/net".into(), source })
}

/// The inode of the file at `path` (following symlinks, so
/// `/proc/<pid>/ns/net` gives the namespace inode).
pub fn inode_of(path: &Path) -> io::Result<u64> {
    std::fs::metadata(path).map(|m| m.ino())
}

/// `(inodeURL, netnsInode)` for the calling thread's namespace, to advertise
/// in a KERNEL mechanism: `file:///proc/<own pid>/ns/net` and the decimal
/// inode of `/proc/thread-self/ns/net`.
pub fn own_netns_params() -> Result<(String, String), NetnsError> {
    let inode = inode_of(Path::new(THREAD_SELF_NETNS))
        .map_err(|source| NetnsError::Open { path: THREAD_SELF_NETNS.into(), source })?;
    Ok((format!("file:///proc/{}/ns/net", std::process::id()), inode.to_string()))
}

/// What an `inodeURL` designates.
#[derive(Debug, PartialEq, Eq)]
enum UrlTarget {
    /// A path that can be opened from this process.
    Path(PathBuf),
    /// A well-formed absolute path of an unsupported form.
    OtherPath,
    /// `/proc/self/...` or `/proc/thread-self/...`: meaningless here.
    SelfRelative,
    /// `inode://<dev>/<ino>`.
    Inode { dev: u64, ino: u64 },
}

fn parse_inode_url(url: &str) -> Result<UrlTarget, NetnsError> {
    let bad = |reason: &str| NetnsError::BadUrl { value: url.to_string(), reason: reason.to_string() };
    if let Some(rest) = url.strip_prefix("inode://") {
        let (dev, ino) = rest.split_once('/').ok_or_else(|| bad("expected inode://<dev>/<ino>"))?;
        let dev = dev.parse::<u64>().map_err(|_| bad("the device in inode://<dev>/<ino> is not a decimal number"))?;
        let ino = ino.parse::<u64>().map_err(|_| bad("the inode in inode://<dev>/<ino> is not a decimal number"))?;
        return Ok(UrlTarget::Inode { dev, ino });
    }
    let path = if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(bad("a file URL needs an absolute path (file:///...)"));
        }
        rest
    } else if url.starts_with('/') {
        url
    } else if url.contains("://") {
        return Err(bad("unsupported scheme (expected file:// or inode://)"));
    } else {
        return Err(bad("not a URL or absolute path"));
    };
    if path.contains(['?', '#', '%']) {
        return Err(bad("query strings, fragments and percent-escapes are not supported"));
    }
    let p = Path::new(path);
    let parts: Vec<&str> = p
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str().ok_or_else(|| bad("the path is not UTF-8")),
            Component::RootDir => Ok(""),
            _ => Err(bad("the path must not contain '.' or '..' components")),
        })
        .collect::<Result<_, _>>()?;
    let is_num = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    Ok(match parts.as_slice() {
        ["", "proc", "self" | "thread-self", ..] => UrlTarget::SelfRelative,
        ["", "proc", pid, "ns", "net"] if is_num(pid) => UrlTarget::Path(p.to_path_buf()),
        ["", "proc", pid, "task", tid, "ns", "net"] if is_num(pid) && is_num(tid) => UrlTarget::Path(p.to_path_buf()),
        ["", "run", "netns", _] | ["", "var", "run", "netns", _] => UrlTarget::Path(p.to_path_buf()),
        _ => UrlTarget::OtherPath,
    })
}

fn parse_inode(value: &str) -> Result<u64, NetnsError> {
    let t = value.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NetnsError::BadInode { value: value.to_string() });
    }
    t.parse::<u64>().map_err(|_| NetnsError::BadInode { value: value.to_string() })
}

/// Resolves the namespace designated by the KERNEL mechanism parameters
/// `inodeURL` and `netnsInode` (empty strings count as absent).
///
/// 1. A supported path URL is opened; if `netns_inode` is also given and
///    differs from the opened namespace's inode, the path is ignored and the
///    search of step 2 runs instead.
/// 2. With an inode (from `netns_inode` or `inode://<dev>/<ino>`), the named
///    namespaces under /run/netns and /var/run/netns and then every
///    /proc/<pid>/ns/net are searched; the first match is opened and its
///    inode re-checked on the open descriptor.
/// 3. `/proc/self/...` or `/proc/thread-self/...` alone is an error: the
///    client must send `netnsInode`.
///
/// Blocking (reads /proc); call it from `spawn_blocking` if the scan may be
/// long.
pub fn resolve(inode_url: Option<&str>, netns_inode: Option<&str>) -> Result<NetnsHandle, NetnsError> {
    let inode_url = inode_url.map(str::trim).filter(|s| !s.is_empty());
    let mut want = netns_inode.filter(|s| !s.trim().is_empty()).map(parse_inode).transpose()?;
    if let Some(url) = inode_url {
        match parse_inode_url(url)? {
            UrlTarget::Path(path) => match (NetnsHandle::open(&path), want) {
                (Ok(h), None) => return Ok(h),
                (Ok(h), Some(ino)) if h.inode() == ino => return Ok(h),
                (Ok(h), Some(ino)) => {
                    tracing::debug!(
                        url,
                        found = h.inode(),
                        wanted = ino,
                        "netns path has another inode; searching by inode"
                    )
                }
                (Err(e), None) => return Err(e),
                (Err(e), Some(ino)) => {
                    tracing::debug!(url, wanted = ino, error = %e, "netns path unusable; searching by inode")
                }
            },
            UrlTarget::OtherPath => {
                if want.is_none() {
                    return Err(NetnsError::UnsupportedPath { url: url.to_string() });
                }
            }
            UrlTarget::SelfRelative => {
                if want.is_none() {
                    return Err(NetnsError::SelfRelative { url: url.to_string() });
                }
            }
            UrlTarget::Inode { dev, ino } => {
                let nsfs = nsfs_dev()?;
                if dev != nsfs {
                    return Err(NetnsError::BadUrl {
                        value: url.to_string(),
                        reason: format!("device {dev} is not nsfs (device {nsfs}), so this is not a namespace file"),
                    });
                }
                match want {
                    Some(inode) if inode != ino => {
                        return Err(NetnsError::Conflict { url: url.to_string(), url_inode: ino, inode });
                    }
                    _ => want = Some(ino),
                }
            }
        }
    }
    match want {
        Some(ino) => find_by_inode(ino),
        None => Err(NetnsError::Missing),
    }
}

/// Searches the named namespaces and every process for namespace `ino`.
fn find_by_inode(ino: u64) -> Result<NetnsHandle, NetnsError> {
    let nsfs = nsfs_dev()?;
    let mut candidates: Vec<PathBuf> = Vec::new();
    let mut seen_dirs: Vec<PathBuf> = Vec::new();
    for dir in NETNS_RUN_DIRS {
        // /var/run is usually a symlink to /run: scan each real directory once.
        let real = std::fs::canonicalize(dir).unwrap_or_else(|_| PathBuf::from(dir));
        if seen_dirs.contains(&real) {
            continue;
        }
        seen_dirs.push(real);
        if let Ok(rd) = std::fs::read_dir(dir) {
            candidates.extend(rd.flatten().map(|e| e.path()));
        }
    }
    let named = candidates.len();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_str().is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                candidates.push(e.path().join("ns/net"));
            }
        }
    }
    for (i, path) in candidates.iter().enumerate() {
        // stat first (cheap, no open of foreign files), then open and re-check
        // on the descriptor: the entry may have been replaced in between.
        let Ok(meta) = std::fs::metadata(path) else { continue };
        if meta.ino() != ino || meta.dev() != nsfs {
            continue;
        }
        match NetnsHandle::open(path) {
            Ok(h) if h.inode() == ino => {
                tracing::debug!(inode = ino, path = %path.display(), named = i < named, "found netns by inode");
                return Ok(h);
            }
            _ => continue,
        }
    }
    Err(NetnsError::NotFound { inode: ino })
}

/// Every distinct network namespace on the node that this process can
/// open: the bind-mounted ones under /run/netns and /var/run/netns, then
/// those of every process in /proc (`/proc/<pid>/ns/net`; namespaces held
/// only by a thread, not a process, are not found). For orphan sweeps
/// after a restart.
///
/// - Deduplicated by namespace inode; the first path found wins (named
///   namespaces before process ones), and each handle is checked to be a
///   network namespace ([`NetnsHandle::open`]).
/// - Entries that vanish while scanning (exited processes, deleted
///   namespaces) or cannot be opened (permissions) are skipped silently:
///   the result is a best-effort snapshot, never an error.
/// - Every returned handle keeps its namespace alive until dropped.
///
/// Blocking (reads /proc and may enter bind-mounted namespaces on a
/// throwaway thread to identify them); call it from `spawn_blocking`.
pub fn all_netns() -> Vec<NetnsHandle> {
    let Ok(nsfs) = nsfs_dev() else { return Vec::new() };
    let mut candidates: Vec<PathBuf> = Vec::new();
    let mut seen_dirs: Vec<PathBuf> = Vec::new();
    for dir in NETNS_RUN_DIRS {
        // /var/run is usually a symlink to /run: scan each real directory once.
        let real = std::fs::canonicalize(dir).unwrap_or_else(|_| PathBuf::from(dir));
        if seen_dirs.contains(&real) {
            continue;
        }
        seen_dirs.push(real);
        if let Ok(rd) = std::fs::read_dir(dir) {
            candidates.extend(rd.flatten().map(|e| e.path()));
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_str().is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                candidates.push(e.path().join("ns/net"));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for path in &candidates {
        // stat first: cheap, skips files that are not namespaces (an
        // unmounted /run/netns entry lives on tmpfs) and known inodes.
        let Ok(meta) = std::fs::metadata(path) else { continue };
        if meta.dev() != nsfs || seen.contains(&meta.ino()) {
            continue;
        }
        if let Ok(h) = NetnsHandle::open(path)
            && seen.insert(h.inode())
        {
            out.push(h);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::netns::TestNetns;

    fn own_inode() -> u64 {
        inode_of(Path::new(THREAD_SELF_NETNS)).unwrap()
    }

    #[test]
    fn resolves_own_netns_by_path_and_inode() {
        let (url, ino) = own_netns_params().unwrap();
        assert_eq!(url, format!("file:///proc/{}/ns/net", std::process::id()));
        assert_eq!(ino, own_inode().to_string());

        let by_path = resolve(Some(&url), None).unwrap();
        assert_eq!(by_path.inode(), own_inode());
        let both = resolve(Some(&url), Some(&ino)).unwrap();
        assert_eq!(both.inode(), own_inode());
        let by_inode = resolve(None, Some(&ino)).unwrap();
        assert_eq!(by_inode.inode(), own_inode());
        // Bare absolute path form, and inode://<dev>/<ino>.
        let bare = resolve(Some(&format!("/proc/{}/ns/net", std::process::id())), None).unwrap();
        assert_eq!(bare, by_path);
        let dev = std::fs::metadata(THREAD_SELF_NETNS).unwrap().dev();
        let transit = resolve(Some(&format!("inode://{dev}/{ino}")), None).unwrap();
        assert_eq!(transit.inode(), own_inode());
        // Self-relative URL plus inode is fine: the inode decides.
        let selfrel = resolve(Some("file:///proc/thread-self/ns/net"), Some(&ino)).unwrap();
        assert_eq!(selfrel.inode(), own_inode());

        let cur = NetnsHandle::current().unwrap();
        assert_eq!(cur.inode(), own_inode());
        assert!(cur.describe().contains(&format!("netns inode {}", own_inode())), "{}", cur.describe());
    }

    #[test]
    fn mismatching_inode_falls_through_to_scan() {
        let ns = TestNetns::new("sdkres");
        let other = ns.handle().inode();
        assert_ne!(other, own_inode());
        // The path names our own namespace, the inode the test namespace: the
        // inode wins, found by scanning /run/netns.
        let url = format!("file:///proc/{}/ns/net", std::process::id());
        let h = resolve(Some(&url), Some(&other.to_string())).unwrap();
        assert_eq!(h.inode(), other);
        assert_eq!(&h, ns.handle());
        // A named-netns path works directly too.
        let h = resolve(Some(&format!("file://{}", ns.path().display())), None).unwrap();
        assert_eq!(h.inode(), other);
        // A vanished path with a valid inode is still found by inode.
        let h = resolve(Some("file:///proc/999999999/ns/net"), Some(&other.to_string())).unwrap();
        assert_eq!(h.inode(), other);
    }

    #[test]
    fn unknown_inode_is_not_found() {
        // Inode 1 is never a namespace inode.
        let e = resolve(None, Some("1")).unwrap_err();
        assert!(matches!(e, NetnsError::NotFound { inode: 1 }), "{e}");
        assert!(e.to_string().contains("inode 1"), "{e}");
    }

    #[test]
    fn garbage_inputs_name_the_input() {
        let cases: &[(Option<&str>, Option<&str>, &str)] = &[
            (None, Some("12ab"), "12ab"),
            (None, Some("-5"), "-5"),
            (Some("http://example.com/ns"), None, "http://example.com/ns"),
            (Some("file://relative/ns"), None, "file://relative/ns"),
            (Some("inode://x/12"), None, "inode://x/12"),
            (Some("inode://12"), None, "inode://12"),
            (Some("netns-of-my-pod"), None, "netns-of-my-pod"),
            (Some("file:///proc/1/../self/ns/net"), None, "file:///proc/1/../self/ns/net"),
            (Some("file:///proc/thread-self/ns/net"), None, "file:///proc/thread-self/ns/net"),
            (Some("file:///proc/self/ns/net"), None, "file:///proc/self/ns/net"),
            (Some("file:///etc/passwd"), None, "file:///etc/passwd"),
            (Some("file:///run/netns/does-not-exist-xyz"), None, "/run/netns/does-not-exist-xyz"),
        ];
        for (url, ino, needle) in cases {
            let e = resolve(*url, *ino).expect_err(needle);
            assert!(e.to_string().contains(needle), "error for {needle:?} does not name it: {e}");
        }
        let e = resolve(Some("file:///proc/self/ns/net"), None).unwrap_err();
        assert!(e.to_string().contains("netnsInode"), "{e}");
        assert!(matches!(resolve(None, None), Err(NetnsError::Missing)));
        assert!(matches!(resolve(Some(""), Some(" ")), Err(NetnsError::Missing)));
        // inode:// on a device other than nsfs is refused.
        let e = resolve(Some("inode://1/4026531840"), None).unwrap_err();
        assert!(e.to_string().contains("nsfs"), "{e}");
        // inode:// and netnsInode disagreeing is refused.
        let dev = std::fs::metadata(THREAD_SELF_NETNS).unwrap().dev();
        let e = resolve(Some(&format!("inode://{dev}/5")), Some("6")).unwrap_err();
        assert!(matches!(e, NetnsError::Conflict { .. }), "{e}");
    }

    #[test]
    fn rejects_files_that_are_not_network_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("plain");
        std::fs::write(&f, b"x").unwrap();
        let e = NetnsHandle::open(&f).unwrap_err();
        assert!(matches!(e, NetnsError::NotNetns { .. }), "{e}");
        assert!(e.to_string().contains(&f.display().to_string()), "{e}");
        // Right filesystem, wrong namespace type.
        let e = NetnsHandle::open(Path::new("/proc/self/ns/mnt")).unwrap_err();
        assert!(e.to_string().contains("mnt:["), "{e}");
        // A bind-mounted namespace of another type (the fd link text is then
        // the mount path, so the kernel is asked).
        let target = dir.path().join("uts");
        std::fs::write(&target, b"").unwrap();
        let st =
            std::process::Command::new("mount").arg("--bind").arg("/proc/self/ns/uts").arg(&target).status().unwrap();
        assert!(st.success());
        struct Umount(PathBuf);
        impl Drop for Umount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _umount = Umount(target.clone());
        let e = NetnsHandle::open(&target).unwrap_err();
        assert!(matches!(e, NetnsError::NotNetns { .. }), "{e}");
        // A path that does not exist.
        let e = NetnsHandle::open(Path::new("/run/netns/nope-nope")).unwrap_err();
        assert!(matches!(e, NetnsError::Open { .. }), "{e}");
    }

    /// User (pid != 0) NETLINK_ROUTE sockets in `ns`, from /proc/thread-self/net/netlink.
    async fn route_sockets(ns: &NetnsHandle) -> usize {
        let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/netlink").unwrap()).await.unwrap();
        text.lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 2 && f[1] == "0" && f[2] != "0"
            })
            .count()
    }

    #[tokio::test]
    async fn netlink_and_run_act_inside_the_namespace() {
        let ns = TestNetns::new("sdknl");
        let h = ns.handle().clone();
        let inside = h.run(|| inode_of(Path::new(THREAD_SELF_NETNS)).unwrap()).await.unwrap();
        assert_eq!(inside, h.inode());
        // The caller's thread did not move.
        assert_eq!(inode_of(Path::new(THREAD_SELF_NETNS)).unwrap(), own_inode());

        use futures::TryStreamExt;
        let nl = h.netlink().await.unwrap();
        let links: Vec<_> = nl.link().get().execute().try_collect().await.unwrap();
        // A fresh namespace has only `lo`.
        assert_eq!(links.len(), 1, "{links:?}");
        // The socket lives in the namespace, and dropping the last Handle
        // ends the connection task, which closes it.
        assert_eq!(route_sockets(&h).await, 1);
        let nl2 = nl.clone();
        drop(nl);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(route_sockets(&h).await, 1, "a clone keeps the connection");
        drop(nl2);
        let mut n = 1;
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            n = route_sockets(&h).await;
            if n == 0 {
                break;
            }
        }
        assert_eq!(n, 0, "the netlink socket must close once every Handle is dropped");

        let r = h.run(|| panic!("boom")).await;
        assert!(matches!(r, Err(NetnsError::Panicked { .. })));
    }
}
