//! The embedded userspace backend: a TUN device, a UDP socket, boringtun's
//! Noise core and a UAPI socket, glued together per device.
//!
//! # Guarantees
//! - [`Userspace::create`] either returns a running device or leaves
//!   nothing behind: the UDP port is bound first (a taken port fails with
//!   [`WgError::PortInUse`] before any TUN exists), then the TUN, then the
//!   UAPI socket; each is released again if a later step fails.
//! - The TUN netdev, the UDP socket and the threads all belong to the
//!   calling thread's network namespace at creation. The TUN may then be
//!   moved to another namespace and renamed: the device keeps working,
//!   since it only ever uses its file descriptors, never the interface name
//!   (except for the ifindex lookup at creation).
//! - Three threads per device: `wgtx-<name>`, `wgrx-<name>`, `wgua-<name>`
//!   (thread names are cut to 15 bytes by Linux). [`WgDevice::close`] (or
//!   drop) stops and joins all three, closes the TUN (so the netdev
//!   disappears in whichever namespace it is) and the UDP socket, and
//!   removes the UAPI socket file; it is idempotent.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::datapath::{self, Shared};
use super::io::{NetworkIo, TunDevice, TunnelIo, UdpTransport};
use super::key::Key;
use super::noise::Peer;
use super::uapi::{self, EINVAL, EOPNOTSUPP, PeerSnapshot, Reject, SetRequest, Snapshot, SocketFile, UapiTarget};
use super::{DeviceId, MAX_MTU, MIN_MTU, PeerUpdate, WgBackend, WgConfig, WgDevice, WgError, WgStats, validate_name};

/// The embedded userspace WireGuard backend (boringtun's Noise core on a
/// TUN device, with the standard UAPI socket).
#[derive(Debug, Clone, Copy, Default)]
pub struct Userspace;

impl WgBackend for Userspace {
    fn kind(&self) -> super::BackendKind {
        super::BackendKind::Userspace
    }

    fn create(&self, name: &str, cfg: &WgConfig) -> Result<Box<dyn WgDevice>, WgError> {
        Ok(Box::new(UserspaceDevice::create(name, cfg)?))
    }
}

/// What only exists while the device runs.
struct Running {
    threads: Vec<JoinHandle<()>>,
    tun: Arc<dyn TunnelIo>,
    net: Arc<dyn NetworkIo>,
    socket: SocketFile,
}

/// One running userspace device.
pub struct UserspaceDevice {
    id: DeviceId,
    shared: Arc<Shared>,
    control: Arc<Control>,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for UserspaceDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserspaceDevice")
            .field("name", &self.id.name)
            .field("ifindex", &self.id.ifindex)
            .field("port", &self.id.port)
            .finish_non_exhaustive()
    }
}

fn check_config(name: &str, cfg: &WgConfig) -> Result<(), WgError> {
    let bad = |reason: String| Err(WgError::InvalidConfig { name: name.to_string(), reason });
    if !(MIN_MTU..=MAX_MTU).contains(&cfg.mtu) {
        return bad(format!("MTU {} is outside {MIN_MTU}..={MAX_MTU}", cfg.mtu));
    }
    if cfg.private_key.is_zero() {
        return bad("the private key is all zeros".into());
    }
    if cfg.peer_public_key.is_zero() {
        return bad("the peer public key is all zeros".into());
    }
    if cfg.peer_public_key == cfg.private_key.public_key() {
        return bad("the peer public key is this device's own public key".into());
    }
    Ok(())
}

impl UserspaceDevice {
    fn create(name: &str, cfg: &WgConfig) -> Result<UserspaceDevice, WgError> {
        validate_name(name)?;
        check_config(name, cfg)?;
        if let Some((_, tun_name)) = &cfg.tun_in {
            validate_name(tun_name)?;
        }
        if cfg.tun_in.is_none() && nix::net::if_::if_nametoindex(name).is_ok() {
            return Err(WgError::NameTaken {
                name: name.to_string(),
                what: "an interface of that name already exists in this network namespace".into(),
            });
        }
        let sock_path = uapi::socket_path(name);
        if nsm_sdk::tools::unixsock::is_served(&sock_path) {
            return Err(WgError::NameTaken {
                name: name.to_string(),
                what: format!("{} is served by another running WireGuard device on this node", sock_path.display()),
            });
        }
        let port = cfg.listen_port;
        let need_v6 = cfg.peer_endpoint.is_some_and(|e| e.is_ipv6());
        let net = UdpTransport::bind(port, need_v6).map_err(|source| match source.kind() {
            std::io::ErrorKind::AddrInUse => WgError::PortInUse { name: name.to_string(), port },
            _ => WgError::Bind { name: name.to_string(), port, source },
        })?;
        let port = net.local_port();
        let net: Arc<dyn NetworkIo> = Arc::new(net);
        let mtu = u16::try_from(cfg.mtu).unwrap_or(u16::MAX);
        let (tun, ifindex) = match &cfg.tun_in {
            None => TunDevice::create(name, mtu),
            Some((ns, tun_name)) => TunDevice::create_in(ns, tun_name, mtu),
        }
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => {
                WgError::NameTaken { name: name.to_string(), what: source.to_string() }
            }
            _ => WgError::Tun { name: name.to_string(), source },
        })?;
        let tun: Arc<dyn TunnelIo> = Arc::new(tun);
        let (listener, socket) = uapi::bind(name).map_err(|source| match source.kind() {
            std::io::ErrorKind::AddrInUse => WgError::NameTaken { name: name.to_string(), what: source.to_string() },
            _ => WgError::Uapi { name: name.to_string(), path: sock_path.clone(), source },
        })?;
        let peer = Peer::new(
            cfg.private_key.clone(),
            cfg.peer_public_key.clone(),
            cfg.peer_endpoint,
            cfg.allowed_ips.clone(),
            cfg.persistent_keepalive,
        );
        let shared = Arc::new(Shared::new(name, peer).map_err(|source| WgError::Thread {
            name: name.to_string(),
            what: "eventfd",
            source,
        })?);
        let control = Arc::new(Control { shared: shared.clone(), net: net.clone(), port, fwmark: AtomicU32::new(0) });
        let mut threads = datapath::spawn(&shared, &tun, &net, usize::from(mtu)).map_err(|source| WgError::Thread {
            name: name.to_string(),
            what: "data path",
            source,
        })?;
        let (sh, target) = (shared.clone(), control.clone() as Arc<dyn UapiTarget>);
        match std::thread::Builder::new().name(format!("wgua-{name}")).spawn(move || uapi::serve(listener, sh, target))
        {
            Ok(h) => threads.push(h),
            Err(source) => {
                shared.stop();
                for t in threads {
                    let _ = t.join();
                }
                return Err(WgError::Thread { name: name.to_string(), what: "UAPI", source });
            }
        }
        tracing::info!(
            device = name,
            ifindex,
            port,
            mtu,
            peer = %cfg.peer_public_key.to_base64(),
            endpoint = ?cfg.peer_endpoint,
            uapi = %socket.path().display(),
            "userspace WireGuard device up"
        );
        Ok(UserspaceDevice {
            id: DeviceId { name: name.to_string(), ifindex, port },
            shared,
            control,
            running: Mutex::new(Some(Running { threads, tun, net, socket })),
        })
    }

    fn shutdown(&self) {
        let Some(r) = self.running.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        self.shared.stop();
        for t in r.threads {
            if t.join().is_err() {
                tracing::error!(device = %self.id.name, "a WireGuard device thread panicked");
            }
        }
        // The threads are gone: these were the last references, so the TUN
        // and the UDP socket close here, and the socket file goes.
        drop(r.tun);
        drop(r.net);
        drop(r.socket);
        tracing::info!(device = %self.id.name, "userspace WireGuard device closed");
    }
}

impl WgDevice for UserspaceDevice {
    fn id(&self) -> &DeviceId {
        &self.id
    }

    fn public_key(&self) -> Key {
        self.shared.peer().public_key().clone()
    }

    fn update_peer(&self, u: &PeerUpdate) -> Result<(), WgError> {
        let endpoint = u.endpoint;
        if self.shared.stopped() {
            return Err(WgError::Closed { name: self.id.name.clone() });
        }
        if let Some(ep) = endpoint
            && !self.control.net.can_reach(&ep)
        {
            return Err(WgError::InvalidConfig {
                name: self.id.name.clone(),
                reason: format!(
                    "endpoint {ep} is IPv6 but the device's UDP socket is IPv4-only (IPv6 unavailable in the node \
                     namespace at creation)"
                ),
            });
        }
        let mut p = self.shared.peer();
        if endpoint.is_some() {
            p.set_endpoint(endpoint);
        }
        p.set_allowed_ips(u.allowed_ips.clone());
        p.set_keepalive(u.keepalive);
        Ok(())
    }

    fn stats(&self) -> WgStats {
        let p = self.shared.peer();
        let (tx_bytes, rx_bytes) = p.counters();
        WgStats { rx_bytes, tx_bytes, last_handshake: p.last_handshake() }
    }

    fn close(self: Box<Self>) {
        self.shutdown();
    }
}

impl Drop for UserspaceDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The UAPI's view of a device.
struct Control {
    shared: Arc<Shared>,
    net: Arc<dyn NetworkIo>,
    port: u16,
    fwmark: AtomicU32,
}

impl UapiTarget for Control {
    fn get(&self) -> Snapshot {
        let p = self.shared.peer();
        let (tx_bytes, rx_bytes) = p.counters();
        Snapshot {
            private_key: p.private_key().clone(),
            listen_port: self.port,
            fwmark: self.fwmark.load(Ordering::Relaxed),
            peer: PeerSnapshot {
                public_key: p.peer_public_key().clone(),
                preshared_key: p.preshared_key().cloned(),
                endpoint: p.endpoint(),
                last_handshake: p.last_handshake(),
                tx_bytes,
                rx_bytes,
                keepalive: p.keepalive(),
                allowed_ips: p.allowed_ips().to_vec(),
            },
        }
    }

    fn set(&self, req: SetRequest) -> Result<(), Reject> {
        // Validate everything first: a rejected request changes nothing.
        if let Some(port) = req.listen_port
            && port != self.port
        {
            return Err(Reject::new(
                EOPNOTSUPP,
                format!("listen port {} cannot change to {port}; recreate the device instead", self.port),
            ));
        }
        if req.private_key.as_ref().is_some_and(Key::is_zero) {
            return Err(Reject::new(EINVAL, "an all-zero private key would disable the device"));
        }
        let current = self.shared.peer().peer_public_key().clone();
        if req.peers.len() > 1 {
            return Err(Reject::new(EOPNOTSUPP, "this device has exactly one peer"));
        }
        if let Some(ps) = req.peers.first() {
            if ps.remove {
                return Err(Reject::new(EOPNOTSUPP, "the only peer cannot be removed; close the device instead"));
            }
            if ps.public_key != current && !req.replace_peers {
                return Err(Reject::new(
                    EOPNOTSUPP,
                    "this device has exactly one peer; replace it with replace_peers=true",
                ));
            }
            if let Some(ep) = ps.endpoint
                && !self.net.can_reach(&ep)
            {
                return Err(Reject::new(EINVAL, format!("endpoint {ep} needs IPv6, the socket is IPv4-only")));
            }
        } else if req.replace_peers {
            return Err(Reject::new(EOPNOTSUPP, "the only peer cannot be removed; close the device instead"));
        }
        if let Some(mark) = req.fwmark {
            self.net.set_fwmark(mark).map_err(|e| Reject::new(e.raw_os_error().unwrap_or(EINVAL), e.to_string()))?;
            self.fwmark.store(mark, Ordering::Relaxed);
        }
        let mut p = self.shared.peer();
        if let Some(k) = req.private_key {
            p.set_private_key(k);
        }
        if let Some(ps) = req.peers.into_iter().next() {
            if ps.public_key != *p.peer_public_key() {
                // update_only: nothing to update when the peer is new.
                if ps.update_only {
                    return Ok(());
                }
                p.replace_peer(ps.public_key.clone());
            }
            if let Some(psk) = ps.preshared_key {
                p.set_preshared_key(Some(psk));
            }
            if ps.endpoint.is_some() {
                p.set_endpoint(ps.endpoint);
            }
            if let Some(k) = ps.keepalive {
                p.set_keepalive(Some(k));
            }
            if ps.replace_allowed_ips {
                p.set_allowed_ips(ps.allowed_ips);
            } else {
                p.add_allowed_ips(&ps.allowed_ips);
            }
        }
        Ok(())
    }
}
