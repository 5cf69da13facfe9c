//! The real peers the tests run beside ours (kube-apiserver and etcd, the
//! Go sdk peers, SPIRE), built from pinned Go modules by
//! `scripts/peers.sh <group>` into a cache outside the repo.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context as _, bail};

/// The directory holding the binaries of peer group `group`: the directory
/// named by environment variable `env_var` when it is set (`scripts/test.sh`
/// sets one per group), else the last line `scripts/peers.sh <group>` prints
/// (it builds the group on first use, which can take minutes, then answers
/// from its cache). Asked once per process and group.
pub fn dir(group: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    // Held across the build, so concurrent tests of one binary build once.
    let mut dirs = resolved();
    if let Some(d) = dirs.get(group) {
        return Ok(d.clone());
    }
    let d = resolve(group, std::env::var_os(env_var).map(PathBuf::from))?;
    dirs.insert(group.to_string(), d.clone());
    Ok(d)
}

fn resolved() -> std::sync::MutexGuard<'static, HashMap<String, PathBuf>> {
    static DIRS: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    DIRS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

/// The directory of `group` if it is known without building anything:
/// `env_var` is set, or [`dir`] found it before in this process.
pub fn known_dir(group: &str, env_var: &str) -> Option<PathBuf> {
    std::env::var_os(env_var).map(PathBuf::from).or_else(|| resolved().get(group).cloned())
}

/// The directory `given` (checked), or the one `scripts/peers.sh` builds.
fn resolve(group: &str, given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let d = match given {
        Some(d) => d,
        None => build(group)?,
    };
    if !d.is_dir() {
        bail!("{} (the {group} peers' directory) does not exist", d.display());
    }
    Ok(d)
}

/// Runs `scripts/peers.sh group`, its progress on our stderr.
fn build(group: &str) -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/peers.sh");
    let out = Command::new(&script)
        .arg(group)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("scripts/peers.sh {group} failed (it builds the peers with go from pinned modules; see its stderr)");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(text.lines().last().context("scripts/peers.sh printed no directory")?.trim()))
}

/// Binary `name` of peer group `group` (see [`dir`]).
pub fn bin(group: &str, env_var: &str, name: &str) -> anyhow::Result<PathBuf> {
    in_dir(group, &dir(group, env_var)?, name)
}

fn in_dir(group: &str, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        bail!("{} is missing (run scripts/peers.sh {group})", p.display());
    }
    Ok(p)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_given_directory_is_checked_and_so_are_its_binaries() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("tool"), "").unwrap();
        assert_eq!(resolve("test", Some(d.path().to_path_buf())).unwrap(), d.path());
        assert_eq!(in_dir("test", d.path(), "tool").unwrap(), d.path().join("tool"));
        let e = in_dir("test", d.path(), "other").unwrap_err().to_string();
        assert!(e.contains("other is missing (run scripts/peers.sh test)"), "{e}");
        let e = resolve("test", Some(d.path().join("nope"))).unwrap_err().to_string();
        assert!(e.contains("nope (the test peers' directory) does not exist"), "{e}");
    }
}
