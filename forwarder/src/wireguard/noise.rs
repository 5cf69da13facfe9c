//! The sans-IO protocol layer: one WireGuard peer on top of boringtun's
//! Noise core ([`boringtun::noise::Tunn`]).
//!
//! Nothing here touches a socket, a file descriptor or a clock other than
//! `Instant::now()`: every call takes the bytes that arrived and a buffer to
//! write into, and answers *what to send where* ([`Out`]). The I/O layer
//! ([`super::io`]) and the threads ([`super::datapath`]) move the bytes.
//!
//! # Guarantees
//! - Cryptokey routing for the single peer: a packet from the TUN whose
//!   destination is not inside the peer's allowed IPs is dropped
//!   ([`DropReason::NoRoute`]), and a decrypted packet whose source is not inside
//!   them is dropped ([`DropReason::SourceNotAllowed`]), as the kernel does.
//! - Roaming: the peer endpoint is updated from the source address of every
//!   *authenticated* incoming message (handshake initiation or response,
//!   data, keepalive); unauthenticated input (cookie replies sent while
//!   under load, garbage) never moves it.
//! - Persistent keepalive follows the kernel: a keepalive goes out after
//!   `interval` seconds without any authenticated packet in either direction,
//!   and one goes out immediately when the interval is first set (which also
//!   starts the handshake). It is kept here rather than in `Tunn`, so the
//!   interval can change without dropping the session.
//! - Output bytes always start at offset 0 of the caller's buffer; [`Out`]
//!   carries lengths, never references, so a batch of results can be kept
//!   side by side.
//! - Counters are bytes of UDP payload to / from the peer (all message
//!   types; received bytes only once authenticated).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use ipnetwork::IpNetwork;

use super::key::Key;

/// Smallest output buffer the Noise core accepts (a handshake initiation).
pub const MIN_BUF: usize = 148;
/// Bytes a data message adds to an IP packet (header 16 + tag 16).
pub const DATA_OVERHEAD: usize = 32;

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Outgoing packet to an address outside the peer's allowed IPs (or not
    /// IPv4/IPv6 at all).
    NoRoute,
    /// There is nowhere to send: no endpoint configured or learned yet.
    NoEndpoint,
    /// Decrypted packet from a source outside the peer's allowed IPs.
    SourceNotAllowed,
    /// The Noise core rejected the message (bad MAC, replay, wrong index, ...).
    Protocol,
}

/// What to do after a call: the bytes are in the caller's buffer at
/// `[..len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// Nothing to send (queued for a handshake, keepalive consumed, ...).
    Nothing,
    /// Send `len` bytes to `to` over UDP.
    Network { len: usize, to: SocketAddr },
    /// Write the `len`-byte IP packet to the TUN.
    Tunnel { len: usize },
    /// Dropped.
    Dropped(DropReason),
}

/// The peer and its session state.
pub struct Peer {
    tunn: Tunn,
    private: Key,
    public: Key,
    peer_public: Key,
    preshared: Option<Key>,
    endpoint: Option<SocketAddr>,
    allowed: Vec<IpNetwork>,
    keepalive: Option<u16>,
    /// Last authenticated packet sent or received (persistent keepalive).
    last_traversal: Instant,
    /// Send a keepalive at the next tick regardless of the interval.
    keepalive_now: bool,
    tx_bytes: u64,
    rx_bytes: u64,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("public", &self.public.to_base64())
            .field("peer_public", &self.peer_public.to_base64())
            .field("endpoint", &self.endpoint)
            .field("allowed", &self.allowed)
            .field("keepalive", &self.keepalive)
            .finish_non_exhaustive()
    }
}

fn new_tunn(private: &Key, peer_public: &Key, preshared: Option<&Key>) -> Tunn {
    // The session index is 24 bits (Tunn shifts it left by 8).
    let index = rand::random::<u32>() >> 8;
    Tunn::new(private.to_secret(), peer_public.to_public(), preshared.map(|k| *k.as_bytes()), None, index, None)
}

/// Message type of a WireGuard datagram (first byte; 0 if empty).
fn msg_type(datagram: &[u8]) -> u8 {
    datagram.first().copied().unwrap_or(0)
}

impl Peer {
    /// A peer with no session yet.
    pub fn new(
        private: Key,
        peer_public: Key,
        endpoint: Option<SocketAddr>,
        allowed: Vec<IpNetwork>,
        keepalive: Option<u16>,
    ) -> Peer {
        let keepalive = keepalive.filter(|k| *k > 0);
        Peer {
            tunn: new_tunn(&private, &peer_public, None),
            public: private.public_key(),
            private,
            peer_public,
            preshared: None,
            endpoint,
            allowed,
            keepalive,
            last_traversal: Instant::now(),
            keepalive_now: keepalive.is_some(),
            tx_bytes: 0,
            rx_bytes: 0,
        }
    }

    pub fn private_key(&self) -> &Key {
        &self.private
    }
    pub fn public_key(&self) -> &Key {
        &self.public
    }
    pub fn peer_public_key(&self) -> &Key {
        &self.peer_public
    }
    pub fn preshared_key(&self) -> Option<&Key> {
        self.preshared.as_ref()
    }
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }
    pub fn allowed_ips(&self) -> &[IpNetwork] {
        &self.allowed
    }
    pub fn keepalive(&self) -> Option<u16> {
        self.keepalive
    }
    /// `(tx_bytes, rx_bytes)` on the wire.
    pub fn counters(&self) -> (u64, u64) {
        (self.tx_bytes, self.rx_bytes)
    }

    /// Absolute time of the last completed handshake of the current session.
    pub fn last_handshake(&self) -> Option<SystemTime> {
        let (since, ..) = self.tunn.stats();
        since.and_then(|d| SystemTime::now().checked_sub(d))
    }

    /// Sets the endpoint (`None` forgets it until the peer contacts us).
    pub fn set_endpoint(&mut self, endpoint: Option<SocketAddr>) {
        self.endpoint = endpoint;
    }

    /// Replaces the allowed IPs.
    pub fn set_allowed_ips(&mut self, allowed: Vec<IpNetwork>) {
        self.allowed = allowed;
    }

    /// Adds allowed IPs (duplicates are ignored).
    pub fn add_allowed_ips(&mut self, more: &[IpNetwork]) {
        for n in more {
            if !self.allowed.contains(n) {
                self.allowed.push(*n);
            }
        }
    }

    /// Sets the persistent keepalive interval (seconds; `None`/0 = off). A
    /// newly enabled or changed interval sends a keepalive at the next tick.
    pub fn set_keepalive(&mut self, keepalive: Option<u16>) {
        let k = keepalive.filter(|k| *k > 0);
        if k.is_some() && k != self.keepalive {
            self.keepalive_now = true;
        }
        self.keepalive = k;
    }

    /// New private key: sessions are dropped (a new handshake follows).
    pub fn set_private_key(&mut self, private: Key) {
        if private == self.private {
            return;
        }
        let public = private.public_key();
        self.tunn.set_static_private(private.to_secret(), public.to_public(), None);
        self.private = private;
        self.public = public;
    }

    /// New pre-shared key (`None` or all zeros = none): the session is
    /// rebuilt.
    pub fn set_preshared_key(&mut self, psk: Option<Key>) {
        let psk = psk.filter(|k| !k.is_zero());
        if psk == self.preshared {
            return;
        }
        self.preshared = psk;
        self.tunn = new_tunn(&self.private, &self.peer_public, self.preshared.as_ref());
    }

    /// A different peer (single-peer device): new session, endpoint and
    /// allowed IPs cleared, counters reset.
    pub fn replace_peer(&mut self, peer_public: Key) {
        self.peer_public = peer_public;
        self.preshared = None;
        self.tunn = new_tunn(&self.private, &self.peer_public, None);
        self.endpoint = None;
        self.allowed.clear();
        self.tx_bytes = 0;
        self.rx_bytes = 0;
    }

    fn allowed_contains(&self, ip: IpAddr) -> bool {
        self.allowed.iter().any(|n| n.contains(ip))
    }

    fn sent(&mut self, len: usize) {
        self.tx_bytes += len as u64;
        self.last_traversal = Instant::now();
    }

    /// Converts a Noise result for the network into [`Out`], moving the
    /// bytes to the start of `dst`.
    fn network_out(&mut self, r: TunnResult<'_>, dst_start: usize, to: Option<SocketAddr>) -> (Out, Option<usize>) {
        match r {
            TunnResult::WriteToNetwork(b) => {
                let (off, len) = ((b.as_ptr() as usize).wrapping_sub(dst_start), b.len());
                match to {
                    Some(to) => (Out::Network { len, to }, Some(off)),
                    None => (Out::Dropped(DropReason::NoEndpoint), None),
                }
            }
            TunnResult::Done => (Out::Nothing, None),
            TunnResult::Err(e) => {
                tracing::trace!(error = ?e, "WireGuard message dropped");
                (Out::Dropped(DropReason::Protocol), None)
            }
            // Only decapsulate produces these.
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                (Out::Dropped(DropReason::Protocol), None)
            }
        }
    }

    fn finish(&mut self, dst: &mut [u8], out: (Out, Option<usize>)) -> Out {
        if let (Out::Network { len, .. }, Some(off)) = out {
            // boringtun always writes into `dst`; anything else is a bug
            // there, and the packet is dropped rather than trusted.
            if off.checked_add(len).is_none_or(|end| end > dst.len()) {
                return Out::Dropped(DropReason::Protocol);
            }
            if off != 0 {
                dst.copy_within(off..off + len, 0);
            }
            self.sent(len);
        }
        out.0
    }

    /// Encrypts one IP packet read from the TUN into `dst` (at least
    /// `packet.len() + 32` and [`MIN_BUF`] bytes). Without a session the
    /// packet is queued and a handshake initiation is returned instead.
    pub fn encapsulate(&mut self, packet: &[u8], dst: &mut [u8]) -> Out {
        match Tunn::dst_address(packet) {
            Some(ip) if self.allowed_contains(ip) => {}
            _ => return Out::Dropped(DropReason::NoRoute),
        }
        let start = dst.as_ptr() as usize;
        let to = self.endpoint;
        let r = self.tunn.encapsulate(packet, dst);
        let out = self.network_out(r, start, to);
        self.finish(dst, out)
    }

    /// Handles one datagram received from `src`. A [`Out::Network`] result
    /// (handshake response, cookie) goes back to `src`; after one, call
    /// [`Peer::drain`] until it returns [`Out::Nothing`] to flush packets
    /// queued while the handshake was in progress.
    pub fn decapsulate(&mut self, src: SocketAddr, datagram: &[u8], dst: &mut [u8]) -> Out {
        let ty = msg_type(datagram);
        let start = dst.as_ptr() as usize;
        let r = self.tunn.decapsulate(Some(src.ip()), datagram, dst);
        // Authenticated input moves the endpoint (roaming). A handshake
        // initiation answered by a 92-byte response is authenticated; a
        // 64-byte answer is a cookie reply from the rate limiter.
        let authenticated = match (&r, ty) {
            (TunnResult::WriteToNetwork(b), 1) => b.len() == 92,
            (TunnResult::WriteToNetwork(_), 2) => true,
            (TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..), 4) => true,
            (TunnResult::Done, 4) => true,
            _ => false,
        };
        if authenticated {
            self.rx_bytes += datagram.len() as u64;
            self.last_traversal = Instant::now();
            self.endpoint = Some(src);
        }
        let tunnel = match &r {
            TunnResult::WriteToTunnelV4(b, ip) => {
                Some(((b.as_ptr() as usize).wrapping_sub(start), b.len(), IpAddr::V4(*ip)))
            }
            TunnResult::WriteToTunnelV6(b, ip) => {
                Some(((b.as_ptr() as usize).wrapping_sub(start), b.len(), IpAddr::V6(*ip)))
            }
            _ => None,
        };
        if let Some((off, len, src_ip)) = tunnel {
            // Cryptokey routing on the decrypted packet's source.
            if !self.allowed_contains(src_ip) {
                return Out::Dropped(DropReason::SourceNotAllowed);
            }
            if off.checked_add(len).is_none_or(|end| end > dst.len()) {
                return Out::Dropped(DropReason::Protocol);
            }
            if off != 0 {
                dst.copy_within(off..off + len, 0);
            }
            return Out::Tunnel { len };
        }
        let out = self.network_out(r, start, Some(src));
        self.finish(dst, out)
    }

    /// Flushes one packet queued during a handshake (to the endpoint).
    pub fn drain(&mut self, dst: &mut [u8]) -> Out {
        let start = dst.as_ptr() as usize;
        let to = self.endpoint;
        let r = self.tunn.decapsulate(None, &[], dst);
        let out = self.network_out(r, start, to);
        self.finish(dst, out)
    }

    /// Runs the protocol timers (call every 100–250 ms): handshake retries
    /// and rekeying, passive keepalive, persistent keepalive. Returns at most
    /// one message; the next tick sends the next.
    pub fn tick(&mut self, dst: &mut [u8]) -> Out {
        let start = dst.as_ptr() as usize;
        let to = self.endpoint;
        let r = self.tunn.update_timers(dst);
        let out = match r {
            // "Connection expired" only says there is no session; not news.
            TunnResult::Err(WireGuardError::ConnectionExpired) => (Out::Nothing, None),
            r => self.network_out(r, start, to),
        };
        let out = self.finish(dst, out);
        if out != Out::Nothing {
            return out;
        }
        let due = match self.keepalive {
            Some(k) => self.keepalive_now || self.last_traversal.elapsed() >= Duration::from_secs(u64::from(k)),
            None => false,
        };
        if !due || self.endpoint.is_none() {
            return Out::Nothing;
        }
        self.keepalive_now = false;
        // An empty packet is a keepalive; without a session it is queued
        // and a handshake initiation goes out.
        let start = dst.as_ptr() as usize;
        let r = self.tunn.encapsulate(&[], dst);
        let out = self.network_out(r, start, to);
        // Even if nothing went out (handshake already in progress), restart
        // the interval.
        self.last_traversal = Instant::now();
        self.finish(dst, out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wireguard::key::KeyPair;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A minimal IPv4 packet (header only + payload) from `src` to `dst`.
    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let total = 20 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..].copy_from_slice(payload);
        p
    }

    struct Pair {
        a: Peer,
        b: Peer,
        a_addr: SocketAddr,
        b_addr: SocketAddr,
    }

    fn pair() -> Pair {
        let ka = KeyPair::generate();
        let kb = KeyPair::generate();
        let a_addr = addr("10.0.0.1:51820");
        let b_addr = addr("10.0.0.2:51821");
        Pair {
            a: Peer::new(
                ka.private.clone(),
                kb.public.clone(),
                Some(b_addr),
                vec!["172.16.0.2/32".parse().unwrap()],
                None,
            ),
            // b does not know a's endpoint: it learns it from the handshake.
            b: Peer::new(kb.private.clone(), ka.public.clone(), None, vec!["172.16.0.1/32".parse().unwrap()], None),
            a_addr,
            b_addr,
        }
    }

    /// Moves `a`'s output to `b` and back until both are quiet; returns
    /// the packets each side wrote to its TUN.
    fn pump(p: &mut Pair, first: Vec<u8>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut to_b = vec![first];
        let mut to_a: Vec<Vec<u8>> = Vec::new();
        let (mut tun_a, mut tun_b) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; 2048];
        for _ in 0..20 {
            for d in std::mem::take(&mut to_b) {
                let mut out = p.b.decapsulate(p.a_addr, &d, &mut buf);
                loop {
                    match out {
                        Out::Network { len, to } => {
                            assert_eq!(to, p.a_addr);
                            to_a.push(buf[..len].to_vec());
                            out = p.b.drain(&mut buf);
                        }
                        Out::Tunnel { len } => {
                            tun_b.push(buf[..len].to_vec());
                            break;
                        }
                        _ => break,
                    }
                }
            }
            for d in std::mem::take(&mut to_a) {
                let mut out = p.a.decapsulate(p.b_addr, &d, &mut buf);
                loop {
                    match out {
                        Out::Network { len, to } => {
                            assert_eq!(to, p.b_addr);
                            to_b.push(buf[..len].to_vec());
                            out = p.a.drain(&mut buf);
                        }
                        Out::Tunnel { len } => {
                            tun_a.push(buf[..len].to_vec());
                            break;
                        }
                        _ => break,
                    }
                }
            }
            if to_a.is_empty() && to_b.is_empty() {
                break;
            }
        }
        (tun_a, tun_b)
    }

    #[test]
    fn handshake_queued_packet_and_roaming() {
        let mut p = pair();
        let mut buf = vec![0u8; 2048];
        let pkt = ipv4([172, 16, 0, 1], [172, 16, 0, 2], b"hello");
        // No session: the packet is queued and a handshake initiation goes
        // to the configured endpoint.
        let Out::Network { len, to } = p.a.encapsulate(&pkt, &mut buf) else { panic!("expected initiation") };
        assert_eq!((len, to), (148, p.b_addr));
        assert_eq!(buf[0], 1);
        assert_eq!(p.b.endpoint(), None);
        let (tun_a, tun_b) = pump(&mut p, buf[..len].to_vec());
        assert!(tun_a.is_empty());
        assert_eq!(tun_b, vec![pkt.clone()], "the queued packet arrives after the handshake");
        // b learned a's endpoint from the authenticated initiation.
        assert_eq!(p.b.endpoint(), Some(p.a_addr));
        assert!(p.a.last_handshake().is_some() && p.b.last_handshake().is_some());
        let hs = p.a.last_handshake().unwrap();
        let age = SystemTime::now().duration_since(hs).unwrap();
        assert!(age < Duration::from_secs(5), "absolute handshake time, {age:?} ago");

        // Data the other way round, from a new source address: b's answer
        // now goes there and a roams to it.
        let back = ipv4([172, 16, 0, 2], [172, 16, 0, 1], b"world");
        let Out::Network { len, to } = p.b.encapsulate(&back, &mut buf) else { panic!("expected data") };
        assert_eq!(to, p.a_addr);
        let new_b = addr("10.0.9.9:4000");
        let mut out = vec![0u8; 2048];
        assert_eq!(p.a.decapsulate(new_b, &buf[..len], &mut out), Out::Tunnel { len: back.len() });
        assert_eq!(&out[..back.len()], &back[..]);
        assert_eq!(p.a.endpoint(), Some(new_b));
        let (tx, rx) = p.a.counters();
        assert!(tx > 0 && rx > 0);
    }

    #[test]
    fn cryptokey_routing_and_unauthenticated_input() {
        let mut p = pair();
        let mut buf = vec![0u8; 2048];
        // Destination outside the allowed IPs.
        let stray = ipv4([172, 16, 0, 1], [8, 8, 8, 8], b"x");
        assert_eq!(p.a.encapsulate(&stray, &mut buf), Out::Dropped(DropReason::NoRoute));
        assert_eq!(p.a.encapsulate(b"\x00garbage", &mut buf), Out::Dropped(DropReason::NoRoute));
        // Complete a handshake.
        let pkt = ipv4([172, 16, 0, 1], [172, 16, 0, 2], b"hi");
        let Out::Network { len, .. } = p.a.encapsulate(&pkt, &mut buf) else { panic!() };
        pump(&mut p, buf[..len].to_vec());
        // b sends a packet with a spoofed source inside the tunnel: a drops it.
        let spoofed = ipv4([10, 1, 1, 1], [172, 16, 0, 1], b"evil");
        p.b.add_allowed_ips(&["0.0.0.0/0".parse().unwrap()]);
        let Out::Network { len, .. } = p.b.encapsulate(&spoofed, &mut buf) else { panic!() };
        let mut out = vec![0u8; 2048];
        assert_eq!(p.a.decapsulate(p.b_addr, &buf[..len], &mut out), Out::Dropped(DropReason::SourceNotAllowed));
        // Garbage from elsewhere does not move the endpoint.
        let before = p.a.endpoint();
        assert_eq!(
            p.a.decapsulate(addr("192.0.2.1:1"), b"\x04\0\0\0garbagegarbagegarbagegarbagegarbage", &mut out),
            Out::Dropped(DropReason::Protocol)
        );
        assert_eq!(p.a.endpoint(), before);
    }

    #[test]
    fn no_endpoint_drops_and_keepalive_starts_handshake() {
        let ka = KeyPair::generate();
        let kb = KeyPair::generate();
        let mut a =
            Peer::new(ka.private.clone(), kb.public.clone(), None, vec!["172.16.0.2/32".parse().unwrap()], Some(25));
        let mut buf = vec![0u8; 2048];
        let pkt = ipv4([172, 16, 0, 1], [172, 16, 0, 2], b"x");
        assert_eq!(a.encapsulate(&pkt, &mut buf), Out::Dropped(DropReason::NoEndpoint));
        // No endpoint: the keepalive waits.
        assert_eq!(a.tick(&mut buf), Out::Nothing);
        a.set_endpoint(Some(addr("10.0.0.2:1")));
        // The handshake from the packet above is already in progress, so the
        // keepalive is only queued; a fresh peer starts the handshake with it.
        let mut b = Peer::new(kb.private.clone(), ka.public.clone(), Some(addr("10.0.0.1:1")), vec![], None);
        assert_eq!(b.tick(&mut buf), Out::Nothing, "no keepalive configured");
        b.set_keepalive(Some(10));
        let Out::Network { len, .. } = b.tick(&mut buf) else { panic!("keepalive must start a handshake") };
        assert_eq!(len, 148);
        assert_eq!(b.keepalive(), Some(10));
        b.set_keepalive(Some(0));
        assert_eq!(b.keepalive(), None);
    }

    #[test]
    fn private_key_and_peer_changes() {
        let mut p = pair();
        let mut buf = vec![0u8; 2048];
        let kc = KeyPair::generate();
        p.a.set_private_key(kc.private.clone());
        assert_eq!(p.a.public_key(), &kc.public);
        // b still expects a's old key: the handshake fails, nothing reaches b's TUN.
        let pkt = ipv4([172, 16, 0, 1], [172, 16, 0, 2], b"hi");
        let Out::Network { len, .. } = p.a.encapsulate(&pkt, &mut buf) else { panic!() };
        let (_, tun_b) = pump(&mut p, buf[..len].to_vec());
        assert!(tun_b.is_empty());
        let kd = KeyPair::generate();
        p.a.replace_peer(kd.public.clone());
        assert_eq!(p.a.peer_public_key(), &kd.public);
        assert!(p.a.allowed_ips().is_empty() && p.a.endpoint().is_none());
        p.a.set_preshared_key(Some(Key::from_bytes([7; 32])));
        assert!(p.a.preshared_key().is_some());
        p.a.set_preshared_key(Some(Key::from_bytes([0; 32])));
        assert!(p.a.preshared_key().is_none());
    }
}
