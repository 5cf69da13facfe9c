//! [`resolve`]: the namespace a KERNEL mechanism's `inodeURL` and
//! `netnsInode` designate, positively matched; [`all_netns`] for sweeps.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::handle::nsfs_dev;
use super::{NETNS_RUN_DIRS, NetnsError, NetnsHandle};

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
        // A namespace fd a process keeps open: the nsmgr hands the forwarder
        // the fds clients passed it (grpcfd) this way.
        ["", "proc", pid, "fd", n] if is_num(pid) && is_num(n) => UrlTarget::Path(p.to_path_buf()),
        _ => UrlTarget::OtherPath,
    })
}

/// What an `inodeURL` says about the namespace it names, as seen from this
/// process: `Ok(None)` for `/proc/self/...`/`/proc/thread-self/...` (the
/// sender's own, meaningless here), `Ok(Some((inode, path)))` for
/// `inode://<dev>/<ino>` (path empty) and for a supported path (opened now,
/// so a path this process cannot open is an error).
pub fn inode_named_by(url: &str) -> Result<Option<(u64, String)>, NetnsError> {
    match parse_inode_url(url.trim())? {
        UrlTarget::SelfRelative => Ok(None),
        UrlTarget::Inode { dev, ino } => {
            let nsfs = nsfs_dev()?;
            if dev != nsfs {
                return Err(NetnsError::BadUrl {
                    value: url.to_string(),
                    reason: format!("device {dev} is not nsfs (device {nsfs}), so this is not a namespace file"),
                });
            }
            Ok(Some((ino, String::new())))
        }
        UrlTarget::Path(p) => {
            let h = NetnsHandle::open(&p)?;
            Ok(Some((h.inode(), p.display().to_string())))
        }
        UrlTarget::OtherPath => Err(NetnsError::UnsupportedPath { url: url.to_string() }),
    }
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
///    `/proc/<pid>/ns/net` are searched; the first match is opened and its
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

/// Every file that may be a network namespace: the entries of the named
/// namespace directories (each real directory once: /var/run is usually a
/// symlink to /run), then `/proc/<pid>/ns/net` of every process. The count
/// of named ones comes first in the pair.
fn candidates() -> (usize, Vec<PathBuf>) {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen_dirs: Vec<PathBuf> = Vec::new();
    for dir in NETNS_RUN_DIRS {
        let real = std::fs::canonicalize(dir).unwrap_or_else(|_| PathBuf::from(dir));
        if seen_dirs.contains(&real) {
            continue;
        }
        seen_dirs.push(real);
        if let Ok(rd) = std::fs::read_dir(dir) {
            out.extend(rd.flatten().map(|e| e.path()));
        }
    }
    let named = out.len();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_str().is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                out.push(e.path().join("ns/net"));
            }
        }
    }
    (named, out)
}

/// Searches the named namespaces and every process for namespace `ino`.
fn find_by_inode(ino: u64) -> Result<NetnsHandle, NetnsError> {
    let nsfs = nsfs_dev()?;
    let (named, candidates) = candidates();
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
    let (_, candidates) = candidates();
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
    use crate::testing::netns::{TestNetns, own_inode};
    use crate::tools::netns::{THREAD_SELF_NETNS, own_netns_params};

    #[test]
    fn resolves_own_netns_by_path_and_inode() {
        let (own_url, ino) = own_netns_params().unwrap();
        let dev = std::fs::metadata(THREAD_SELF_NETNS).unwrap().dev();
        assert_eq!(own_url, format!("inode://{dev}/{ino}"), "the same in every PID namespace");
        assert_eq!(ino, own_inode().to_string());
        assert_eq!(inode_named_by(&own_url).unwrap(), Some((own_inode(), String::new())));

        let url = format!("file:///proc/{}/ns/net", std::process::id());
        let by_path = resolve(Some(&url), None).unwrap();
        assert_eq!(by_path.inode(), own_inode());
        let both = resolve(Some(&url), Some(&ino)).unwrap();
        assert_eq!(both.inode(), own_inode());
        let by_inode = resolve(None, Some(&ino)).unwrap();
        assert_eq!(by_inode.inode(), own_inode());
        // Bare absolute path form, and inode://<dev>/<ino>.
        let bare = resolve(Some(&format!("/proc/{}/ns/net", std::process::id())), None).unwrap();
        assert_eq!(bare, by_path);
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
}
