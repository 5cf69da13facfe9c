//! [`NetnsHandle`]: an open network namespace, checked to be one, and the
//! only way this code enters a namespace (on a throwaway thread).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::sched::{CloneFlags, setns};

use super::{NetnsError, THREAD_SELF_NETNS};

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

/// The device number of nsfs (the same for every namespace file until
/// reboot: read once).
pub fn nsfs_dev() -> Result<u64, NetnsError> {
    static DEV: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(d) = DEV.get() {
        return Ok(*d);
    }
    let d = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.dev())
        .map_err(|source| NetnsError::Open { path: "/proc/self/ns/net".into(), source })?;
    Ok(*DEV.get_or_init(|| d))
}

/// The inode of the file at `path` (following symlinks, so
/// `/proc/<pid>/ns/net` gives the namespace inode).
pub fn inode_of(path: &Path) -> io::Result<u64> {
    std::fs::metadata(path).map(|m| m.ino())
}

/// `(inodeURL, netnsInode)` for the calling thread's namespace, to advertise
/// in a KERNEL mechanism: `inode://<nsfs dev>/<ino>` (upstream's form for a
/// namespace by identity; unlike `/proc/<pid>/ns/net` it means the same in
/// every PID namespace) and the decimal inode.
pub fn own_netns_params() -> Result<(String, String), NetnsError> {
    let m = std::fs::metadata(THREAD_SELF_NETNS)
        .map_err(|source| NetnsError::Open { path: THREAD_SELF_NETNS.into(), source })?;
    Ok((format!("inode://{}/{}", m.dev(), m.ino()), m.ino().to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::testing::netns::{TestNetns, own_inode};

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
