//! The cross-platform WireGuard UAPI (<https://www.wireguard.com/xplatform/>)
//! on `/var/run/wireguard/<name>.sock`, so `wg show`, `wg showconf` and
//! `wg set` work on userspace devices as on kernel ones.
//!
//! # Guarantees
//! - `get=1` answers, in this order: `private_key` (hex), `listen_port`,
//!   `fwmark` (if set), then the single peer: `public_key`, `preshared_key`
//!   (if set), `protocol_version=1`, `endpoint` (if known),
//!   `last_handshake_time_sec` / `_nsec` (absolute Unix time, 0 when there
//!   was none), `tx_bytes`, `rx_bytes`, `persistent_keepalive_interval`,
//!   one `allowed_ip` per network; then `errno=0` and a blank line.
//! - `set=1` is parsed completely before anything is applied; any malformed
//!   line, unknown key or invalid value answers a non-zero `errno` (EINVAL,
//!   EPROTO) and changes nothing. What a single-peer device cannot do
//!   (a second peer, removing the peer, a different listen port) answers
//!   `errno=95` (EOPNOTSUPP) and changes nothing.
//! - The socket file is created with mode 0600 (it hands out the private
//!   key) in `/var/run/wireguard` (created 0755 if missing). A stale file
//!   (nobody accepts on it) is replaced; a live one is never touched:
//!   creating a second device of the same name fails instead.
//! - The file is removed when the device closes, but only if it still is
//!   the socket this device bound (same inode).
//! - A client gets at most [`CLIENT_TIMEOUT`] per read or write and
//!   [`MAX_REQUEST`] bytes per request, so no client can stall the server;
//!   closing the device does not wait for a connected client.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};

use nsm_sdk::tools::unixsock::is_served;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnetwork::IpNetwork;

use super::datapath::Shared;
use super::io::wait_readable;
use super::key::Key;

/// Where wireguard-tools look for userspace devices.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Per read / write of one client.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request accepted.
pub const MAX_REQUEST: usize = 256 * 1024;

pub const EINVAL: i32 = 22;
pub const EPROTO: i32 = 71;
pub const EOPNOTSUPP: i32 = 95;

/// `/var/run/wireguard/<name>.sock`.
pub fn socket_path(name: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{name}.sock"))
}

/// What `get=1` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub private_key: Key,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peer: PeerSnapshot,
}

/// The peer part of a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub keepalive: Option<u16>,
    pub allowed_ips: Vec<IpNetwork>,
}

/// Formats the answer to `get=1`, including `errno=0` and the blank line.
pub fn format_get(s: &Snapshot) -> String {
    let mut o = String::with_capacity(512);
    // Writing to a String cannot fail.
    let _ = writeln!(o, "private_key={}", s.private_key.to_hex());
    let _ = writeln!(o, "listen_port={}", s.listen_port);
    if s.fwmark != 0 {
        let _ = writeln!(o, "fwmark={}", s.fwmark);
    }
    let p = &s.peer;
    let _ = writeln!(o, "public_key={}", p.public_key.to_hex());
    if let Some(psk) = &p.preshared_key {
        let _ = writeln!(o, "preshared_key={}", psk.to_hex());
    }
    let _ = writeln!(o, "protocol_version=1");
    if let Some(ep) = p.endpoint {
        let _ = writeln!(o, "endpoint={ep}");
    }
    let hs = p.last_handshake.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
    let _ = writeln!(o, "last_handshake_time_sec={}", hs.as_secs());
    let _ = writeln!(o, "last_handshake_time_nsec={}", hs.subsec_nanos());
    let _ = writeln!(o, "tx_bytes={}", p.tx_bytes);
    let _ = writeln!(o, "rx_bytes={}", p.rx_bytes);
    let _ = writeln!(o, "persistent_keepalive_interval={}", p.keepalive.unwrap_or(0));
    for n in &p.allowed_ips {
        let _ = writeln!(o, "allowed_ip={n}");
    }
    o.push_str("errno=0\n\n");
    o
}

/// A parsed `set=1` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerSet>,
}

/// One `public_key=` section of a [`SetRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    pub public_key: Key,
    pub remove: bool,
    pub update_only: bool,
    /// `Some(zero key)` clears it.
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// `Some(0)` turns it off.
    pub keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNetwork>,
}

impl PeerSet {
    fn new(public_key: Key) -> PeerSet {
        PeerSet {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// A rejected request: the errno to answer and why (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub errno: i32,
    pub reason: String,
}

impl Reject {
    pub fn new(errno: i32, reason: impl Into<String>) -> Reject {
        Reject { errno, reason: reason.into() }
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, Reject> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Reject::new(EINVAL, format!("{key}={v:?}: expected true or false"))),
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, Reject> {
    v.parse().map_err(|_| Reject::new(EINVAL, format!("{key}={v:?}: not a valid number")))
}

fn parse_key(key: &str, v: &str) -> Result<Key, Reject> {
    Key::from_hex(v).map_err(|e| Reject::new(EINVAL, format!("{key}: {e}")))
}

/// Parses the lines of a `set=1` request (without the `set=1` line and the
/// terminating blank line).
pub fn parse_set(body: &str) -> Result<SetRequest, Reject> {
    let mut req = SetRequest::default();
    let mut peer: Option<PeerSet> = None;
    for line in body.lines() {
        if line.is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(Reject::new(EPROTO, format!("line {line:?} is not key=value")));
        };
        match (k, peer.as_mut()) {
            ("public_key", _) => {
                if let Some(p) = peer.take() {
                    req.peers.push(p);
                }
                peer = Some(PeerSet::new(parse_key(k, v)?));
            }
            ("private_key", None) => req.private_key = Some(parse_key(k, v)?),
            ("listen_port", None) => req.listen_port = Some(parse_num(k, v)?),
            ("fwmark", None) => req.fwmark = Some(if v.is_empty() { 0 } else { parse_num(k, v)? }),
            ("replace_peers", None) => req.replace_peers = parse_bool(k, v)?,
            ("remove", Some(p)) => p.remove = parse_bool(k, v)?,
            ("update_only", Some(p)) => p.update_only = parse_bool(k, v)?,
            ("preshared_key", Some(p)) => p.preshared_key = Some(parse_key(k, v)?),
            ("endpoint", Some(p)) => {
                p.endpoint =
                    Some(v.parse().map_err(|_| {
                        Reject::new(EINVAL, format!("endpoint={v:?}: expected IPv4:port or [IPv6]:port"))
                    })?)
            }
            ("persistent_keepalive_interval", Some(p)) => p.keepalive = Some(parse_num(k, v)?),
            ("replace_allowed_ips", Some(p)) => p.replace_allowed_ips = parse_bool(k, v)?,
            ("allowed_ip", Some(p)) => p
                .allowed_ips
                .push(v.parse().map_err(|_| Reject::new(EINVAL, format!("allowed_ip={v:?}: expected an IP network")))?),
            ("protocol_version", Some(_)) => {
                if v != "1" {
                    return Err(Reject::new(EINVAL, format!("protocol_version={v}: only 1 is supported")));
                }
            }
            (k, None) if is_peer_key(k) => {
                return Err(Reject::new(EPROTO, format!("{k} before any public_key")));
            }
            (k, _) => return Err(Reject::new(EINVAL, format!("unknown or misplaced key {k:?}"))),
        }
    }
    if let Some(p) = peer {
        req.peers.push(p);
    }
    Ok(req)
}

fn is_peer_key(k: &str) -> bool {
    matches!(
        k,
        "remove"
            | "update_only"
            | "preshared_key"
            | "endpoint"
            | "persistent_keepalive_interval"
            | "replace_allowed_ips"
            | "allowed_ip"
            | "protocol_version"
    )
}

/// What the server configures.
pub trait UapiTarget: Send + Sync {
    fn get(&self) -> Snapshot;
    /// Applies a parsed request atomically (all or nothing).
    fn set(&self, req: SetRequest) -> Result<(), Reject>;
}

/// Answers one request (`get=1` / `set=1` plus its lines, without the
/// blank line).
pub fn handle(target: &dyn UapiTarget, device: &str, request: &str) -> String {
    let (op, body) = request.split_once('\n').unwrap_or((request, ""));
    match op {
        "get=1" => format_get(&target.get()),
        "set=1" => match parse_set(body).and_then(|r| target.set(r)) {
            Ok(()) => "errno=0\n\n".to_string(),
            Err(r) => {
                tracing::info!(device, errno = r.errno, reason = %r.reason, "UAPI set rejected");
                format!("errno={}\n\n", r.errno)
            }
        },
        other => {
            tracing::info!(device, op = other, "unknown UAPI operation");
            format!("errno={EINVAL}\n\n")
        }
    }
}

// === the socket ===

/// The bound socket file; removed on drop if it is still ours.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove UAPI socket");
                }
            }
            _ => {}
        }
    }
}

/// Binds the UAPI socket of `name` (see the module guarantees). `Err` with
/// `AddrInUse` if a live server holds it.
pub fn bind(name: &str) -> io::Result<(UnixListener, SocketFile)> {
    let dir = Path::new(SOCKET_DIR);
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let path = socket_path(name);
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        if m.file_type().is_socket() && is_served(&path) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by a running WireGuard device", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    let guard = SocketFile { ino: std::fs::symlink_metadata(&path)?.ino(), path };
    std::fs::set_permissions(&guard.path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok((listener, guard))
}

/// Serves `listener` until `shared` is stopped (run on its own thread).
pub fn serve(listener: UnixListener, shared: Arc<Shared>, target: Arc<dyn UapiTarget>) {
    while !shared.stopped() {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve_client(stream, &shared, target.as_ref()) {
                    tracing::debug!(device = %shared.name, error = %e, "UAPI client failed");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = wait_readable(listener.as_fd(), shared.wake_fd(), Duration::from_secs(1));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(device = %shared.name, error = %e, "UAPI accept failed");
                let _ = wait_readable(shared.wake_fd().as_fd(), shared.wake_fd(), Duration::from_millis(200));
            }
        }
    }
}

fn serve_client(stream: UnixStream, shared: &Shared, target: &dyn UapiTarget) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64));
    let mut request = String::new();
    let mut line = String::new();
    loop {
        // Wait for input without blocking close(): the stop event wakes us.
        if reader.buffer().is_empty() && !wait_readable(writer.as_fd(), shared.wake_fd(), CLIENT_TIMEOUT)? {
            if shared.stopped() {
                return Ok(());
            }
            return Err(io::Error::new(io::ErrorKind::TimedOut, "client sent nothing"));
        }
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            // EOF (a partial request without its blank line is ignored).
            return Ok(());
        }
        if !line.ends_with('\n') {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request too long or truncated"));
        }
        if line == "\n" {
            if request.is_empty() {
                continue;
            }
            let answer = handle(target, &shared.name, request.trim_end_matches('\n'));
            writer.write_all(answer.as_bytes())?;
            request.clear();
            // Each request may use the whole budget again.
            reader.get_mut().set_limit(MAX_REQUEST as u64);
            continue;
        }
        request.push_str(&line);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PRIV: &str = "007d05b8c51628ef6c6e90f023599671f06eea4abc170fd3da72fb2439c15142";
    const PUB: &str = "8532af4fa49e124991b50e6cc17f9f9bcb698330806bf2ce156b3ae60c1c9f20";

    fn snapshot() -> Snapshot {
        Snapshot {
            private_key: Key::from_hex(PRIV).unwrap(),
            listen_port: 51820,
            fwmark: 0,
            peer: PeerSnapshot {
                public_key: Key::from_hex(PUB).unwrap(),
                preshared_key: None,
                endpoint: Some("[fd00::2]:51821".parse().unwrap()),
                last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)),
                tx_bytes: 1000,
                rx_bytes: 2000,
                keepalive: Some(25),
                allowed_ips: vec!["172.16.0.2/32".parse().unwrap(), "fd00:1::/64".parse().unwrap()],
            },
        }
    }

    #[test]
    fn get_is_formatted_like_wireguard_go() {
        let want = format!(
            "private_key={PRIV}\nlisten_port=51820\npublic_key={PUB}\nprotocol_version=1\nendpoint=[fd00::2]:51821\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=123456789\ntx_bytes=1000\nrx_bytes=2000\n\
             persistent_keepalive_interval=25\nallowed_ip=172.16.0.2/32\nallowed_ip=fd00:1::/64\nerrno=0\n\n"
        );
        assert_eq!(format_get(&snapshot()), want);
        // No handshake, no endpoint, fwmark and psk shown when set.
        let mut s = snapshot();
        s.fwmark = 7;
        s.peer.preshared_key = Some(Key::from_bytes([1; 32]));
        s.peer.endpoint = None;
        s.peer.last_handshake = None;
        s.peer.keepalive = None;
        let g = format_get(&s);
        assert!(g.contains("fwmark=7\n") && g.contains(&format!("preshared_key={}\n", "01".repeat(32))), "{g}");
        assert!(!g.contains("endpoint="), "{g}");
        assert!(g.contains("last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"), "{g}");
        assert!(g.contains("persistent_keepalive_interval=0\n"), "{g}");
    }

    #[test]
    fn set_parses_what_wg_sends() {
        // `wg set X private-key F listen-port 51820 fwmark 0x10 peer P endpoint E
        //  persistent-keepalive 25 allowed-ips a,b`, plus `wg setconf` flags.
        let body = format!(
            "private_key={PRIV}\nlisten_port=51820\nfwmark=16\nreplace_peers=true\npublic_key={PUB}\n\
             preshared_key={}\nendpoint=10.0.0.2:51821\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=172.16.0.2/32\nallowed_ip=fd00::/64\nprotocol_version=1\nupdate_only=false\n",
            "00".repeat(32)
        );
        let r = parse_set(&body).unwrap();
        assert_eq!(r.private_key.unwrap().to_hex(), PRIV);
        assert_eq!((r.listen_port, r.fwmark, r.replace_peers), (Some(51820), Some(16), true));
        assert_eq!(r.peers.len(), 1);
        let p = &r.peers[0];
        assert_eq!(p.public_key.to_hex(), PUB);
        assert!(p.preshared_key.as_ref().unwrap().is_zero());
        assert_eq!(p.endpoint, Some("10.0.0.2:51821".parse().unwrap()));
        assert_eq!(p.keepalive, Some(25));
        assert!(p.replace_allowed_ips && !p.remove && !p.update_only);
        assert_eq!(p.allowed_ips.len(), 2);
        // IPv6 endpoint, two peers, remove.
        let r =
            parse_set(&format!("public_key={PUB}\nendpoint=[fd00::1]:1\npublic_key={PRIV}\nremove=true\n")).unwrap();
        assert_eq!(r.peers.len(), 2);
        assert_eq!(r.peers[0].endpoint, Some("[fd00::1]:1".parse().unwrap()));
        assert!(r.peers[1].remove);
        // Empty set is fine.
        assert_eq!(parse_set("").unwrap(), SetRequest::default());
    }

    #[test]
    fn set_rejects_garbage_with_errno() {
        for (body, errno) in [
            ("listen_port=70000\n", EINVAL),
            ("listen_port=abc\n", EINVAL),
            ("private_key=1234\n", EINVAL),
            ("nonsense\n", EPROTO),
            ("endpoint=1.2.3.4:5\n", EPROTO),
            ("bogus_key=1\n", EINVAL),
            (&format!("public_key={PUB}\nendpoint=host.example:51820\n"), EINVAL),
            (&format!("public_key={PUB}\nallowed_ip=300.1.1.1/32\n"), EINVAL),
            (&format!("public_key={PUB}\nremove=yes\n"), EINVAL),
            (&format!("public_key={PUB}\nprotocol_version=2\n"), EINVAL),
            (&format!("public_key={PUB}\nlisten_port=1\n"), EINVAL),
        ] {
            let e = parse_set(body).unwrap_err();
            assert_eq!(e.errno, errno, "{body:?}: {e:?}");
        }
    }

    struct Fixed;
    impl UapiTarget for Fixed {
        fn get(&self) -> Snapshot {
            snapshot()
        }
        fn set(&self, req: SetRequest) -> Result<(), Reject> {
            if req.listen_port == Some(1) { Err(Reject::new(EOPNOTSUPP, "no")) } else { Ok(()) }
        }
    }

    #[test]
    fn handle_dispatches_operations() {
        assert!(handle(&Fixed, "t", "get=1").starts_with(&format!("private_key={PRIV}\n")));
        assert_eq!(handle(&Fixed, "t", "set=1\nlisten_port=2"), "errno=0\n\n");
        assert_eq!(handle(&Fixed, "t", "set=1\nlisten_port=1"), "errno=95\n\n");
        assert_eq!(handle(&Fixed, "t", "set=1\nwhat"), "errno=71\n\n");
        assert_eq!(handle(&Fixed, "t", "frob=1"), "errno=22\n\n");
    }
}
