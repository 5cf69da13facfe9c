//! Unix socket files: is anyone serving this one, and removing those nobody
//! serves (left behind by a process that was killed).

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// True if a process accepts connections on the unix socket at `path` (a
/// connect succeeds; it is closed at once).
pub fn is_served(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Removes the sockets in `dir` named `<prefix>*<suffix>` that nobody
/// serves; returns what it removed. Live sockets (of any process), files
/// that are not sockets and names that do not match are left alone.
pub fn remove_unserved(dir: &Path, prefix: &str, suffix: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return removed };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(prefix) || !name.ends_with(suffix) {
            continue;
        }
        let path = e.path();
        let is_socket = std::fs::symlink_metadata(&path).map(|m| m.file_type().is_socket()).unwrap_or(false);
        if !is_socket || is_served(&path) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale unix socket"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn only_unserved_matching_sockets_go() {
        let dir = tempfile::tempdir().unwrap();
        let live = UnixListener::bind(dir.path().join("x-live.sock")).unwrap();
        drop(UnixListener::bind(dir.path().join("x-dead.sock")).unwrap());
        drop(UnixListener::bind(dir.path().join("y-dead.sock")).unwrap());
        std::fs::write(dir.path().join("x-file.sock"), b"").unwrap();
        assert!(is_served(&dir.path().join("x-live.sock")));
        assert!(!is_served(&dir.path().join("x-dead.sock")));
        let removed = remove_unserved(dir.path(), "x-", ".sock");
        assert_eq!(removed, [dir.path().join("x-dead.sock")]);
        for kept in ["x-live.sock", "y-dead.sock", "x-file.sock"] {
            assert!(dir.path().join(kept).exists(), "{kept}");
        }
        drop(live);
    }
}
