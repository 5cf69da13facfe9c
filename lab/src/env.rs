//! The lab environment: named network namespaces and real processes running
//! in them, all recorded in a state directory so that a crash, Ctrl-C or a
//! kept lab can always be removed.
//!
//! # Guarantees
//! - Every namespace is named `<prefix>-<name>`; every daemon is started as
//!   `setpriv --pdeathsig KILL ip netns exec <ns> <binary>`, so if the lab
//!   process dies (even by SIGKILL) its daemons die with it — except in a
//!   kept lab ([`Lab::detach_daemons`]), whose daemons run under `setsid`
//!   and are removed by [`down`].
//! - `Lab::new` refuses to start while a lab with the same prefix still has
//!   running daemons, and otherwise removes whatever an earlier one left
//!   behind; [`down`] removes everything on demand (`nsm-lab down`).
//! - Dropping a [`Lab`] (unless kept) stops the daemons in reverse start
//!   order (SIGTERM, then SIGKILL after 3 s), deletes the namespaces and the
//!   state directory — also when a test panics.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// Root of all lab state directories.
pub const STATE_ROOT: &str = "/run/nsm-lab";

/// The `netns` of [`Lab::spawn`] that means "the lab's own namespace".
pub const HOST_NETNS: &str = "-";

/// A daemon started by the lab.
pub struct Proc {
    pub name: String,
    pub netns: String,
    pub child: Child,
    pub log: PathBuf,
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    pids: Vec<(String, u32)>,
    netns: Vec<String>,
    bin_dir: PathBuf,
    /// Directories of peer binaries the lab runs besides its own (SPIRE,
    /// the Go sdk peers), see [`Lab::add_peer_dir`].
    #[serde(default)]
    peer_dirs: Vec<PathBuf>,
}

impl State {
    /// True if recorded pid `pid` still runs one of the lab's programs.
    fn ours(&self, pid: u32) -> bool {
        std::iter::once(&self.bin_dir).chain(&self.peer_dirs).any(|d| runs_binary_from(pid, d))
    }
}

/// A lab: namespaces and processes under one prefix.
pub struct Lab {
    prefix: String,
    dir: PathBuf,
    bin_dir: PathBuf,
    netns: Vec<String>,
    procs: Vec<Proc>,
    peer_dirs: Vec<PathBuf>,
    keep: bool,
    detach: bool,
    torn_down: bool,
    /// The identity provider and the lab's own SVID (mTLS labs).
    pub(crate) identities: Option<crate::identity::Identities>,
}

/// Where the workspace binaries are: next to the running executable, or
/// (for test executables under `target/<profile>/deps`) one level up.
pub fn default_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for b in ["nsmgr", "forwarder", "nse-icmp-responder", "nsc", "nsm-registry", "nsm-spiffe-dev"] {
        if !dir.join(b).is_file() {
            bail!(
                "binary {b} not found in {} — build the workspace binaries first: cargo build --workspace --bins",
                dir.display()
            );
        }
    }
    Ok(dir)
}

fn check_tools() -> anyhow::Result<()> {
    for (tool, pkg) in [("ip", "iproute2"), ("setpriv", "util-linux"), ("ping", "iputils-ping")] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            bail!("`{tool}` is not installed (Debian package {pkg})");
        }
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the lab creates network namespaces and interfaces: run it as root");
    }
    Ok(())
}

impl Lab {
    /// A new lab under `prefix`, removing leftovers of an earlier one.
    pub fn new(prefix: &str, bin_dir: PathBuf) -> anyhow::Result<Lab> {
        check_tools()?;
        if prefix.is_empty() || prefix.len() > 16 || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("lab prefix {prefix:?} must be 1-16 characters of [A-Za-z0-9-]");
        }
        let running = running_daemons(prefix);
        if !running.is_empty() {
            bail!(
                "a lab with prefix {prefix:?} is running ({}); remove it with `nsm-lab down{}` or pick another --prefix",
                running.join(", "),
                if prefix == "nsmlab" { String::new() } else { format!(" --prefix {prefix}") }
            );
        }
        down(prefix)?;
        let dir = Path::new(STATE_ROOT).join(prefix);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lab = Lab {
            prefix: prefix.to_string(),
            dir,
            bin_dir,
            netns: vec![],
            procs: vec![],
            peer_dirs: vec![],
            keep: false,
            detach: false,
            torn_down: false,
            identities: None,
        };
        lab.save()?;
        Ok(lab)
    }

    /// The lab's own SVID source (None until [`crate::identity::ensure`] ran,
    /// or in a plaintext lab).
    pub fn tls(&self) -> Option<&std::sync::Arc<nsm_sdk::security::tls::Tls>> {
        self.identities.as_ref().map(|s| &s.tls)
    }

    /// A channel pool for the lab's own gRPC clients (mTLS when the lab has
    /// identities).
    pub fn pool(&self, dial_timeout: Duration) -> nsm_sdk::tools::grpc::ChannelPool {
        nsm_sdk::tools::grpc::ChannelPool::with_tls(dial_timeout, self.tls().cloned())
    }

    /// The lab's token generator: ES256 tokens signed with its SVID, or
    /// expiry-only tokens in a plaintext lab.
    pub fn tokens(&self) -> nsm_sdk::tools::token::SharedTokenGenerator {
        let life = Duration::from_secs(600);
        match self.tls() {
            Some(t) => nsm_sdk::tools::token::JwtTokens::new(t.clone(), life),
            None => nsm_sdk::tools::token::ExpiryOnly::new(life),
        }
    }

    /// A registry client acting as the lab (its pool and tokens).
    pub fn registry(&self, url: &url::Url, dial_timeout: Duration) -> nsm_sdk::registry::RemoteRegistry {
        nsm_sdk::registry::RemoteRegistry::new(url.clone(), self.pool(dial_timeout)).with_tokens(self.tokens())
    }

    /// Dials `url` as the lab (mTLS when the lab has identities).
    pub async fn dial(&self, url: &url::Url) -> anyhow::Result<tonic::transport::Channel> {
        Ok(nsm_sdk::tools::grpc::dial_with(url, Duration::from_secs(2), self.tls()).await?.0)
    }

    /// The state directory (logs, sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The prefix of every namespace name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Keep everything running when this value is dropped (`nsm-lab run
    /// --keep`).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Start daemons detached (own session, no parent-death signal) so they
    /// outlive the lab process; call before spawning anything that should
    /// stay up. Until [`Lab::keep`] is called, dropping the lab still stops
    /// them through their recorded pids.
    pub fn detach_daemons(&mut self) {
        self.detach = true;
    }

    fn save(&self) -> anyhow::Result<()> {
        let st = State {
            pids: self.procs.iter().map(|p| (p.name.clone(), p.child.id())).collect(),
            netns: self.netns.clone(),
            bin_dir: self.bin_dir.clone(),
            peer_dirs: self.peer_dirs.clone(),
        };
        let p = self.dir.join("state.json");
        fs::write(&p, serde_json::to_vec_pretty(&st)?).with_context(|| format!("writing {}", p.display()))
    }

    /// Creates namespace `<prefix>-<name>` with `lo` up; returns its name.
    pub fn add_netns(&mut self, name: &str) -> anyhow::Result<String> {
        let full = format!("{}-{name}", self.prefix);
        run_ok(Command::new("ip").args(["netns", "add", &full]))?;
        self.netns.push(full.clone());
        self.save()?;
        run_ok(Command::new("ip").args(["-n", &full, "link", "set", "lo", "up"]))?;
        Ok(full)
    }

    /// Declares `dir` a directory of peer programs the lab runs (it holds
    /// nothing else): `nsm-lab down` then also stops recorded daemons
    /// running a program from there.
    pub fn add_peer_dir(&mut self, dir: &Path) -> anyhow::Result<()> {
        if !self.peer_dirs.iter().any(|d| d == dir) {
            self.peer_dirs.push(dir.to_path_buf());
            self.save()?;
        }
        Ok(())
    }

    /// Path of a workspace binary.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Starts a daemon in `netns` with exactly `env` (plus PATH); its output
    /// goes to `<dir>/<name>.log`. [`HOST_NETNS`] runs it in the lab's own
    /// network namespace (for daemons that talk to servers on the host's
    /// loopback, such as a test's Kubernetes API server; they serve the lab
    /// on unix sockets, which every namespace reaches).
    pub fn spawn(&mut self, name: &str, netns: &str, bin: &str, env: &[(&str, String)]) -> anyhow::Result<()> {
        self.spawn_args(name, netns, bin, &[], env)
    }

    /// [`Lab::spawn`] with command-line arguments.
    pub fn spawn_args(
        &mut self,
        name: &str,
        netns: &str,
        bin: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        // A restart: forget the exited process of the same name.
        if let Some(i) = self.procs.iter().position(|p| p.name == name) {
            if matches!(self.procs[i].child.try_wait(), Ok(None)) {
                bail!("daemon {name} is already running");
            }
            self.procs.remove(i);
        }
        let log = self.dir.join(format!("{name}.log"));
        // Append, so a restarted daemon's log keeps what its predecessor said.
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        // `ip netns exec` execs the binary (no fork), so the pid we record
        // is the daemon's. Attached daemons die with the lab (pdeathsig);
        // detached ones get their own session and outlive it.
        let mut cmd = if self.detach {
            Command::new("setsid")
        } else {
            let mut c = Command::new("setpriv");
            c.args(["--pdeathsig", "KILL"]);
            c
        };
        if netns != HOST_NETNS {
            cmd.args(["ip", "netns", "exec", netns]);
        }
        cmd.arg(self.bin(bin))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(v) = std::env::var_os("RUST_LOG") {
            cmd.env("RUST_LOG", v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {bin} in {netns}"))?;
        self.procs.push(Proc { name: name.to_string(), netns: netns.to_string(), child, log });
        self.save()
    }

    /// The pid of daemon `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.iter().find(|p| p.name == name).map(|p| p.child.id())
    }

    /// The daemon called `name`.
    pub fn proc(&mut self, name: &str) -> Option<&mut Proc> {
        self.procs.iter_mut().find(|p| p.name == name)
    }

    /// Sends `sig` to daemon `name` (tests: kill -9 mid-request).
    pub fn signal(&mut self, name: &str, sig: Signal) -> anyhow::Result<()> {
        let p = self.proc(name).with_context(|| format!("no daemon {name}"))?;
        kill(Pid::from_raw(p.child.id() as i32), sig).with_context(|| format!("signalling {name}"))?;
        Ok(())
    }

    /// Stops daemon `name` gracefully (SIGTERM, SIGKILL after `grace`) and
    /// forgets it.
    pub fn stop(&mut self, name: &str, grace: Duration) -> anyhow::Result<()> {
        let i = self.procs.iter().position(|p| p.name == name).with_context(|| format!("no daemon {name}"))?;
        let mut p = self.procs.remove(i);
        let clean = stop_child(&mut p.child, grace);
        self.save()?;
        if !clean {
            bail!("{name} did not stop within {grace:?} of SIGTERM and was killed");
        }
        Ok(())
    }

    /// True if daemon `name` is still running.
    pub fn running(&mut self, name: &str) -> bool {
        self.proc(name).is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// Waits until daemon `name` has created `path` (its socket), failing
    /// early with its log if it exits, or after `timeout`.
    pub async fn wait_for_file(&mut self, name: &str, path: &Path, timeout: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        while !path.exists() {
            if !self.running(name) {
                bail!("{name} exited during start-up:\n{}", self.log_tail(name, 15));
            }
            if t0.elapsed() > timeout {
                bail!("{name} did not create {} within {timeout:?}:\n{}", path.display(), self.log_tail(name, 15));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The last `n` lines of daemon `name`'s log.
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        let p = self.dir.join(format!("{name}.log"));
        let mut s = String::new();
        if let Ok(mut f) = File::open(&p) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<_> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Names of the running daemons, in start order.
    pub fn daemons(&self) -> Vec<String> {
        self.procs.iter().map(|p| p.name.clone()).collect()
    }

    /// Runs `bin` once in `netns` (e.g. `nsc init`) with `env`, up to
    /// `timeout`; the process is killed if it takes longer.
    pub fn run_once(
        &self,
        netns: &str,
        bin: &str,
        args: &[&str],
        env: &[(&str, String)],
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "ip", "netns", "exec", netns])
            .arg(self.bin(bin))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NSM_LOG_LEVEL", "WARN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        output_with_timeout(cmd, timeout)
    }

    /// Runs `args` in `netns` via `ip netns exec` (ping, ip, ...).
    pub fn exec(&self, netns: &str, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]).args(args);
        output_with_timeout(cmd, timeout)
    }

    /// [`Lab::teardown`] for async callers: waits without blocking the
    /// runtime, so the lab's own gRPC connections can answer the daemons'
    /// graceful-shutdown handshake (a blocked client makes an HTTP/2 server
    /// wait for its ping acknowledgement).
    pub async fn shutdown(&mut self) {
        while let Some(mut p) = self.procs.pop() {
            let pid = Pid::from_raw(p.child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            let t0 = Instant::now();
            let mut clean = false;
            while t0.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = p.child.try_wait() {
                    clean = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !clean {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = p.child.wait();
                eprintln!("nsm-lab: {} did not stop within 3 s of SIGTERM and was killed", p.name);
            }
        }
        self.teardown();
    }

    /// Stops every daemon (reverse order) and deletes every namespace.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        while let Some(mut p) = self.procs.pop() {
            if !stop_child(&mut p.child, Duration::from_secs(3)) {
                eprintln!("nsm-lab: {} did not stop within 3 s of SIGTERM and was killed", p.name);
            }
        }
        for ns in self.netns.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        }
        // A forwarder that had to be killed leaves its UAPI sockets.
        sweep_uapi_sockets();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.torn_down {
            // A failing test: show what the daemons said before their logs go.
            for p in &self.procs {
                eprintln!("----- {} (in {}), last lines of {} -----", p.name, p.netns, p.log.display());
                eprintln!("{}", self.log_tail(&p.name, 30));
            }
        }
        if !self.keep {
            self.teardown();
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`; true if it stopped by itself.
fn stop_child(child: &mut Child, grace: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = kill(pid, Signal::SIGKILL);
    let _ = child.wait();
    false
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `cmd` collecting output, killing it after `timeout`.
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    let dir = std::env::temp_dir();
    let tag = format!("nsm-lab-{}-{}", std::process::id(), rand_suffix());
    let (op, ep) = (dir.join(format!("{tag}.out")), dir.join(format!("{tag}.err")));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&op)?)
        .stderr(File::create(&ep)?)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut child = child;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let _ = (fs::remove_file(&op), fs::remove_file(&ep));
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = Output { status, stdout: fs::read(&op).unwrap_or_default(), stderr: fs::read(&ep).unwrap_or_default() };
    let _ = (fs::remove_file(&op), fs::remove_file(&ep));
    Ok(out)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// True if process `pid` is alive (not a zombie) and runs a program from
/// `bin_dir`: one of its command-line words is a path directly inside
/// `bin_dir` (the daemon itself, or the `setpriv`/`ip netns exec` wrapper
/// that is about to exec it). The only check before the lab signals a
/// recorded pid: a pid reused by an unrelated process, or a state file
/// without a binary directory (empty or relative), never matches.
pub fn runs_binary_from(pid: u32, bin_dir: &Path) -> bool {
    if !bin_dir.is_absolute() || bin_dir.parent().is_none() {
        return false;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.rsplit(") ").next().is_some_and(|r| r.starts_with('Z'));
    if stat.is_empty() || zombie {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline
        .split(|b| *b == 0)
        .filter_map(|w| std::str::from_utf8(w).ok())
        .any(|w| Path::new(w).parent() == Some(bin_dir))
}

/// The recorded state of lab `prefix`, if any.
fn read_state(prefix: &str) -> Option<State> {
    let b = fs::read(Path::new(STATE_ROOT).join(prefix).join("state.json")).ok()?;
    serde_json::from_slice::<State>(&b).ok()
}

/// Daemons of lab `prefix` that are still running (by their recorded pid
/// and binary directory).
fn running_daemons(prefix: &str) -> Vec<String> {
    let Some(st) = read_state(prefix) else { return vec![] };
    st.pids.iter().filter(|(_, pid)| st.ours(*pid)).map(|(n, p)| format!("{n} pid {p}")).collect()
}

/// What [`down`] removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub killed: Vec<String>,
    pub netns: Vec<String>,
    /// Stale WireGuard UAPI sockets.
    pub sockets: Vec<PathBuf>,
}

/// Removes the UAPI sockets of the lab's WireGuard devices (`nsmwg-*` in
/// `/var/run/wireguard`) that no process serves any more; live ones (a
/// running forwarder's, also another lab's) are kept.
fn sweep_uapi_sockets() -> Vec<PathBuf> {
    nsm_sdk::tools::unixsock::remove_unserved(Path::new("/var/run/wireguard"), "nsmwg-", ".sock")
}

/// True while `pid` exists and is neither a zombie nor dead, i.e. may still
/// hold open files.
fn holds_files(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the parenthesised command name.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Removes everything a lab with `prefix` left: its recorded daemons (only
/// if the pid still runs a binary from the recorded directory, so a reused
/// pid is never killed: [`runs_binary_from`]), every namespace named
/// `<prefix>-*`, WireGuard UAPI sockets nobody serves any more (a forwarder
/// killed with -9 leaves them), and the state directory.
pub fn down(prefix: &str) -> anyhow::Result<DownReport> {
    let mut rep = DownReport::default();
    let dir = Path::new(STATE_ROOT).join(prefix);
    if let Some(st) = read_state(prefix) {
        let ours: Vec<(u32, String)> =
            st.pids.iter().rev().filter(|(_, pid)| st.ours(*pid)).map(|(n, p)| (*p, n.clone())).collect();
        for (pid, name) in &ours {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
            rep.killed.push(name.clone());
        }
        // Give them a moment to close connections, then make sure.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) && ours.iter().any(|(p, _)| st.ours(*p)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for (pid, _) in &ours {
            if st.ours(*pid) {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
        }
        // A dying process stops showing its executable before it closes its
        // files: wait until every recorded one has released its sockets
        // (gone or a zombie), or the sweep below sees a dying forwarder's
        // UAPI socket as served.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) && st.pids.iter().any(|(_, p)| holds_files(*p)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    rep.sockets = sweep_uapi_sockets();
    let want = format!("{prefix}-");
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with(&want) {
                let _ = Command::new("ip").args(["netns", "del", &n]).stderr(Stdio::null()).status();
                rep.netns.push(n);
            }
        }
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(rep)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_a_live_process_of_the_recorded_binaries_counts_as_ours() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let sleepy = bin.join("sleepy");
        fs::copy("/bin/sleep", &sleepy).unwrap();
        let mut ours = Command::new(&sleepy).arg("30").spawn().unwrap();
        let mut theirs = Command::new("sleep").arg("30").spawn().unwrap();
        let (o, t) = (ours.id(), theirs.id());
        assert!(runs_binary_from(o, &bin));
        assert!(!runs_binary_from(t, &bin), "an unrelated process (a reused pid) is not ours");
        // A state file without a usable binary directory matches nothing,
        // in particular not every process.
        for bad in ["", "bin", "/"] {
            assert!(!runs_binary_from(o, Path::new(bad)), "{bad:?}");
            assert!(!runs_binary_from(t, Path::new(bad)), "{bad:?}");
        }
        assert!(!runs_binary_from(o, dir.path()), "only binaries directly in the directory");
        // A zombie (killed, not yet reaped) and a gone pid are not ours.
        kill(Pid::from_raw(o as i32), Signal::SIGKILL).unwrap();
        let t0 = Instant::now();
        while runs_binary_from(o, &bin) {
            assert!(t0.elapsed() < Duration::from_secs(5), "a zombie still counts");
            std::thread::sleep(Duration::from_millis(10));
        }
        ours.wait().unwrap();
        assert!(!runs_binary_from(o, &bin));
        theirs.kill().unwrap();
        theirs.wait().unwrap();
    }
}
