//! Workload attestation from unix peer credentials: the caller's pid and uid
//! come from `SO_PEERCRED` on the connection; `/proc/<pid>` gives its
//! executable and network namespace. The server must see the caller's pid
//! namespace (true in the lab, where nodes are network namespaces only) and
//! be allowed to read `/proc/<pid>/{exe,ns/net}` (root).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::policy::Caller;

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Everything the rules can match on for the process `pid` (uid from the
/// peer credentials). Missing facts stay `None`: a process that exited, or
/// whose netns has no name under `netns_dir`.
pub fn inspect(pid: i32, uid: u32, netns_dir: &Path) -> Caller {
    Caller { pid, uid, exe: exe_name(pid), netns: netns_name(pid, netns_dir) }
}

/// Basename of `/proc/<pid>/exe` (without the ` (deleted)` the kernel adds
/// for a replaced binary).
pub fn exe_name(pid: i32) -> Option<String> {
    let target = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let name = target.file_name()?.to_string_lossy().into_owned();
    Some(name.strip_suffix(" (deleted)").map(str::to_string).unwrap_or(name))
}

/// The name under `netns_dir` whose namespace is the one of `pid`
/// (same device and inode as `/proc/<pid>/ns/net`).
pub fn netns_name(pid: i32, netns_dir: &Path) -> Option<String> {
    let ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    let key = (ns.dev(), ns.ino());
    let mut names: Vec<String> = std::fs::read_dir(netns_dir)
        .ok()?
        .flatten()
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| (m.dev(), m.ino()) == key))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Several names for one namespace: pick deterministically.
    names.sort();
    names.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspects_this_process() {
        let me = std::process::id() as i32;
        let exe = std::env::current_exe().unwrap();
        let c = inspect(me, 0, Path::new("/nonexistent"));
        assert_eq!(c.exe.as_deref(), exe.file_name().and_then(|n| n.to_str()));
        assert_eq!(c.netns, None);
        // A directory with a name for our own netns finds it.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(format!("/proc/{me}/ns/net"), dir.path().join("mine")).unwrap();
        assert_eq!(netns_name(me, dir.path()).as_deref(), Some("mine"));
        // A process that does not exist has no facts.
        assert_eq!(inspect(i32::MAX, 0, dir.path()), Caller { pid: i32::MAX, uid: 0, exe: None, netns: None });
    }
}
