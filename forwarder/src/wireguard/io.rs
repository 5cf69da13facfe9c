//! The I/O layer: where packets enter and leave a userspace WireGuard
//! device, behind a narrow, batch-shaped seam.
//!
//! The data path ([`super::datapath`]) only sees two traits:
//! - [`TunnelIo`]: IP packets from / to the TUN device;
//! - [`NetworkIo`]: WireGuard datagrams from / to the UDP socket.
//!
//! Both move [`Batch`]es: a fixed number of packet slots in one buffer that
//! is allocated once per thread and reused, so the steady state allocates
//! nothing per packet.
//!
//! # The implementations here, and what can replace them
//! [`TunDevice`] (tun-rs, `IFF_TUN | IFF_NO_PI`, no offloads) and
//! [`UdpTransport`] (one `std::net::UdpSocket`) fill a batch with one
//! non-blocking `read`/`recvfrom` per packet until the kernel has nothing
//! more, and send one `write`/`sendto` per packet. On a 2-core machine that
//! per-packet syscall path (plus the kernel TCP work it triggers) is the
//! ceiling for every userspace WireGuard measured; a faster implementation
//! can be dropped in behind the same traits without touching the Noise
//! layer or the threads:
//! - UDP: `recvmmsg`/`sendmmsg`, `UDP_GRO` on receive (split the coalesced
//!   buffer into slots) and `UDP_SEGMENT` (GSO) on send for runs of
//!   equal-sized datagrams to one endpoint;
//! - TUN: `IFF_VNET_HDR` + `TUNSETOFFLOAD` (TSO/USO): one read yields a
//!   64 KiB super-packet plus a virtio header, to be split into MTU-sized
//!   packets in the batch, and received packets of one flow are coalesced
//!   (GRO) before one write (tun-rs has `offload`, `recv_multiple` and
//!   `send_multiple` for this);
//! - multi-queue TUN with one tx thread per queue.
//!
//! # Guarantees
//! - Every call is non-blocking. `recv_batch` returns `Ok(0)` when nothing
//!   is ready; the caller waits with [`wait_readable`], which also wakes on
//!   the device's stop event.
//! - [`UdpTransport`] binds the wildcard address of the calling thread's
//!   network namespace: a dual-stack `[::]:port` socket when IPv6 is usable,
//!   else `0.0.0.0:port`. Addresses it reports are never IPv4-mapped IPv6
//!   (they are turned back into IPv4), and IPv4 destinations are mapped as
//!   needed, so callers only ever see plain IPv4/IPv6 addresses.
//! - A port that is taken fails with `AddrInUse` at bind time, before
//!   anything else of the device exists.
//! - Packets longer than a slot are truncated by the kernel read and then
//!   fail authentication / IP length checks, i.e. they are dropped; slots are
//!   sized from the MTU given at creation.

use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn6, bind, setsockopt, socket, sockopt};

/// Packets per batch.
pub const BATCH: usize = 32;

/// A batch of packets stored side by side in one buffer of fixed-size slots.
pub struct Batch {
    data: Vec<u8>,
    slot: usize,
    lens: Vec<usize>,
    addrs: Vec<SocketAddr>,
}

const UNSPECIFIED: SocketAddr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0));

impl Batch {
    /// `cap` slots of `slot` bytes each (allocated now, once).
    pub fn new(cap: usize, slot: usize) -> Batch {
        Batch { data: vec![0u8; cap * slot], slot, lens: Vec::with_capacity(cap), addrs: Vec::with_capacity(cap) }
    }
    pub fn clear(&mut self) {
        self.lens.clear();
        self.addrs.clear();
    }
    pub fn len(&self) -> usize {
        self.lens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }
    pub fn capacity(&self) -> usize {
        self.data.len() / self.slot.max(1)
    }
    pub fn is_full(&self) -> bool {
        self.len() >= self.capacity()
    }
    /// The next free slot (whole slot), or `None` when full. Fill it, then
    /// [`Batch::commit`].
    pub fn next_slot(&mut self) -> Option<&mut [u8]> {
        let i = self.len();
        if i >= self.capacity() {
            return None;
        }
        Some(&mut self.data[i * self.slot..(i + 1) * self.slot])
    }
    /// Records the packet written into the slot [`Batch::next_slot`] gave.
    pub fn commit(&mut self, len: usize, addr: SocketAddr) {
        if !self.is_full() {
            self.lens.push(len.min(self.slot));
            self.addrs.push(addr);
        }
    }
    /// Copies `packet` into the next slot; `false` when full or too long.
    #[cfg(test)]
    pub fn push(&mut self, packet: &[u8], addr: SocketAddr) -> bool {
        let n = packet.len();
        match self.next_slot() {
            Some(s) if n <= s.len() => {
                s[..n].copy_from_slice(packet);
                self.commit(n, addr);
                true
            }
            _ => false,
        }
    }
    /// Packet `i` and its address (source when received, destination when
    /// sent; unspecified for TUN packets).
    pub fn get(&self, i: usize) -> (&[u8], SocketAddr) {
        let start = i * self.slot;
        (&self.data[start..start + self.lens[i]], self.addrs[i])
    }
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// The tunnel side: IP packets from / to the host stack.
pub trait TunnelIo: Send + Sync {
    /// Reads ready packets into `batch` (appending, up to its capacity)
    /// without blocking; `Ok(0)` when none is ready.
    fn recv_batch(&self, batch: &mut Batch) -> io::Result<usize>;
    /// Writes every packet of `batch`; returns how many were accepted.
    fn send_batch(&self, batch: &Batch) -> io::Result<usize>;
    /// Descriptor to poll for readability.
    fn poll_fd(&self) -> BorrowedFd<'_>;
}

/// The network side: WireGuard datagrams from / to peers.
pub trait NetworkIo: Send + Sync {
    /// Reads ready datagrams and their sources into `batch` without
    /// blocking; `Ok(0)` when none is ready.
    fn recv_batch(&self, batch: &mut Batch) -> io::Result<usize>;
    /// Sends every datagram of `batch` to its address; returns how many
    /// were sent.
    fn send_batch(&self, batch: &Batch) -> io::Result<usize>;
    /// Descriptor to poll for readability.
    fn poll_fd(&self) -> BorrowedFd<'_>;
    /// The bound UDP port.
    fn local_port(&self) -> u16;
    /// Whether `to` can be reached from this socket (IPv6 needs a dual-stack
    /// socket).
    fn can_reach(&self, to: &SocketAddr) -> bool;
    /// Sets `SO_MARK` on outgoing datagrams (0 clears it).
    fn set_fwmark(&self, mark: u32) -> io::Result<()>;
}

/// Waits until `fd` is readable or `wake` is signalled, at most `timeout`.
/// Returns `true` when `fd` is readable.
pub fn wait_readable(fd: BorrowedFd<'_>, wake: &EventFd, timeout: Duration) -> io::Result<bool> {
    wait(fd, PollFlags::POLLIN, wake, timeout)
}

fn wait(fd: BorrowedFd<'_>, events: PollFlags, wake: &EventFd, timeout: Duration) -> io::Result<bool> {
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd, events), PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) => Ok(fds[0].any().unwrap_or(false)),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Retries a send that hit a full buffer: waits (briefly) for room.
fn wait_room(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    matches!(poll(&mut fds, PollTimeout::from(50u16)), Ok(n) if n > 0)
}

/// Sends every packet of `batch` with `send` (one syscall each), retrying
/// an interrupted send, and a full buffer once after waiting up to 50 ms
/// for room on `fd`. A packet that still fails is dropped (as a full queue
/// would); the first error is returned only if nothing was sent.
fn send_each(
    batch: &Batch,
    fd: BorrowedFd<'_>,
    send: impl Fn(&[u8], SocketAddr) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut sent = 0;
    let mut last_err = None;
    for (p, to) in batch.iter() {
        let mut retried = false;
        loop {
            match send(p, to) {
                Ok(_) => {
                    sent += 1;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !retried => {
                    retried = true;
                    wait_room(fd);
                }
                Err(e) => {
                    last_err = Some(e);
                    break;
                }
            }
        }
    }
    match last_err {
        Some(e) if sent == 0 => Err(e),
        _ => Ok(sent),
    }
}

// === TUN ===

/// A layer-3 TUN device (no packet-information header, no offloads) whose
/// descriptor is non-blocking.
pub struct TunDevice {
    dev: tun_rs::SyncDevice,
}

impl TunDevice {
    /// Creates TUN `name` in the calling thread's network namespace with
    /// `mtu`, brought up; returns it and its ifindex. The netdev disappears
    /// when this value is dropped (the last descriptor closes), in whatever
    /// namespace it is by then.
    pub fn create(name: &str, mtu: u16) -> io::Result<(TunDevice, u32)> {
        let dev = tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .with(|b| {
                b.packet_information(false).multi_queue(false).offload(false);
            })
            .enable(true)
            .build_sync()?;
        dev.set_nonblocking(true)?;
        let ifindex = dev.if_index()?;
        Ok((TunDevice { dev }, ifindex))
    }
}

impl TunDevice {
    /// [`TunDevice::create`] inside `netns`, on a short-lived thread that
    /// enters it (a TUN netdev is born in the netns of the thread that opens
    /// `/dev/net/tun`); the descriptor works from any thread afterwards.
    /// Creating the pod's interface in place avoids a netdev move (RCU
    /// waits in the kernel). `AlreadyExists` if `name` is taken there.
    pub fn create_in(netns: &nsm_sdk::tools::netns::NetnsHandle, name: &str, mtu: u16) -> io::Result<(TunDevice, u32)> {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| io::Error::other(format!("entering {}: {e}", netns.describe())))?;
                if nix::net::if_::if_nametoindex(name).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("an interface named {name} already exists in {}", netns.describe()),
                    ));
                }
                TunDevice::create(name, mtu)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the TUN creation thread panicked")))
        })
    }
}

impl TunnelIo for TunDevice {
    fn recv_batch(&self, batch: &mut Batch) -> io::Result<usize> {
        let mut n = 0;
        while let Some(slot) = batch.next_slot() {
            match self.dev.recv(slot) {
                Ok(len) => {
                    batch.commit(len, UNSPECIFIED);
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if n > 0 => {
                    tracing::debug!(error = %e, "TUN read failed after a partial batch");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    fn send_batch(&self, batch: &Batch) -> io::Result<usize> {
        send_each(batch, self.dev.as_fd(), |p, _| self.dev.send(p))
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }
}

// === UDP ===

/// One UDP socket bound to the wildcard address.
pub struct UdpTransport {
    sock: UdpSocket,
    dual_stack: bool,
    port: u16,
}

fn dual_stack_socket(port: u16) -> io::Result<UdpSocket> {
    let fd: OwnedFd =
        socket(AddressFamily::Inet6, SockType::Datagram, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    bind(fd.as_raw_fd(), &SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)))?;
    Ok(UdpSocket::from(fd))
}

impl UdpTransport {
    /// Binds `port` (0 = any) on the wildcard address: dual-stack when IPv6
    /// works in this namespace, else IPv4 only; `require_v6` turns the
    /// IPv4 fallback into an error.
    pub fn bind(port: u16, require_v6: bool) -> io::Result<UdpTransport> {
        let (sock, dual_stack) = match dual_stack_socket(port) {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(e) if require_v6 => return Err(e),
            Err(e) => {
                tracing::debug!(port, error = %e, "no IPv6 UDP socket; using IPv4 only");
                let s = UdpSocket::bind(("0.0.0.0", port))?;
                s.set_nonblocking(true)?;
                (s, false)
            }
        };
        let port = sock.local_addr()?.port();
        Ok(UdpTransport { sock, dual_stack, port })
    }

    fn dest(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        }
    }
}

/// `::ffff:a.b.c.d` → `a.b.c.d`.
pub fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

impl NetworkIo for UdpTransport {
    fn recv_batch(&self, batch: &mut Batch) -> io::Result<usize> {
        let mut n = 0;
        while let Some(slot) = batch.next_slot() {
            match self.sock.recv_from(slot) {
                Ok((len, from)) => {
                    batch.commit(len, unmap(from));
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors for earlier sends surface here (e.g.
                // ECONNREFUSED); they say nothing about this read.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) if n > 0 => {
                    tracing::debug!(error = %e, "UDP receive failed after a partial batch");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    fn send_batch(&self, batch: &Batch) -> io::Result<usize> {
        send_each(batch, self.sock.as_fd(), |p, to| self.sock.send_to(p, self.dest(to)))
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    fn local_port(&self) -> u16 {
        self.port
    }

    fn can_reach(&self, to: &SocketAddr) -> bool {
        to.is_ipv4() || self.dual_stack
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        setsockopt(&self.sock, sockopt::Mark, &mark).map_err(io::Error::from)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn batch_slots_and_bounds() {
        let mut b = Batch::new(2, 8);
        let a: SocketAddr = "10.0.0.1:5".parse().unwrap();
        assert!(b.push(b"abc", a));
        assert!(!b.push(b"too long for a slot", a));
        let s = b.next_slot().unwrap();
        s[..2].copy_from_slice(b"xy");
        b.commit(2, UNSPECIFIED);
        assert!(b.is_full() && b.next_slot().is_none());
        assert!(!b.push(b"z", a));
        let v: Vec<_> = b.iter().map(|(p, s)| (p.to_vec(), s)).collect();
        assert_eq!(v, vec![(b"abc".to_vec(), a), (b"xy".to_vec(), UNSPECIFIED)]);
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn udp_loopback_batch_and_mapped_addresses() {
        let a = UdpTransport::bind(0, false).unwrap();
        let b = UdpTransport::bind(0, false).unwrap();
        assert_ne!(a.local_port(), 0);
        let to: SocketAddr = format!("127.0.0.1:{}", b.local_port()).parse().unwrap();
        let mut out = Batch::new(4, 64);
        for i in 0..3u8 {
            out.push(&[i; 10], to);
        }
        assert_eq!(a.send_batch(&out).unwrap(), 3);
        let wake = EventFd::new().unwrap();
        assert!(wait_readable(b.poll_fd(), &wake, Duration::from_secs(2)).unwrap());
        std::thread::sleep(Duration::from_millis(20));
        let mut inb = Batch::new(8, 64);
        assert_eq!(b.recv_batch(&mut inb).unwrap(), 3);
        for (i, (p, from)) in inb.iter().enumerate() {
            assert_eq!(p, &[i as u8; 10]);
            // Plain IPv4, not ::ffff:127.0.0.1.
            assert_eq!(from, format!("127.0.0.1:{}", a.local_port()).parse::<SocketAddr>().unwrap());
        }
        inb.clear();
        assert_eq!(b.recv_batch(&mut inb).unwrap(), 0, "non-blocking when empty");
        // The same port again is refused.
        let e = UdpTransport::bind(a.local_port(), false).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        // The stop event wakes a waiter.
        wake.write(1).unwrap();
        assert!(!wait_readable(b.poll_fd(), &wake, Duration::from_secs(5)).unwrap());
    }
}
