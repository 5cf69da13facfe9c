//! The two data-path threads of a userspace device, joining the I/O layer
//! ([`super::io`]) to the Noise layer ([`super::noise`]).
//!
//! - **tx** (`wgtx-<name>`): TUN → [`Peer::encapsulate`] → UDP.
//! - **rx** (`wgrx-<name>`): UDP → [`Peer::decapsulate`] → TUN (or a
//!   handshake reply → UDP), and every [`TICK`] the protocol timers.
//!
//! # Guarantees
//! - The peer state lives behind one `Mutex`, taken once per batch (not
//!   per packet); no I/O happens while it is held.
//! - Buffers are allocated when a thread starts and reused: nothing is
//!   allocated per packet (boringtun itself copies a packet only while a
//!   handshake is pending).
//! - Both threads wait in `poll` on their descriptor plus the device's stop
//!   event, so [`Shared::stop`] wakes them at once; they return without
//!   touching the descriptors again, and the caller joins them.
//! - I/O errors never end a thread (a TUN whose netdev was deleted from
//!   outside keeps failing until the device is closed); they are logged at
//!   most once per [`ERROR_LOG_EVERY`] per thread.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::eventfd::EventFd;

use super::io::{BATCH, Batch, NetworkIo, TunnelIo, wait_readable};
use super::noise::{DATA_OVERHEAD, MIN_BUF, Out, Peer};

/// Timer period of the Noise core (handshake retries, keepalives).
pub const TICK: Duration = Duration::from_millis(100);
/// Minimum interval between two logged I/O errors of one thread.
pub const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);
/// Longest the tx thread sleeps without looking at the stop flag.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// State shared by the threads of one device and its handle.
pub struct Shared {
    pub name: String,
    pub peer: Mutex<Peer>,
    stop: AtomicBool,
    wake: EventFd,
}

impl Shared {
    pub fn new(name: &str, peer: Peer) -> io::Result<Shared> {
        Ok(Shared {
            name: name.to_string(),
            peer: Mutex::new(peer),
            stop: AtomicBool::new(false),
            wake: EventFd::new()?,
        })
    }

    /// The peer, also if a thread panicked while holding it.
    pub fn peer(&self) -> MutexGuard<'_, Peer> {
        self.peer.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Asks every thread to return, and wakes them.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        // The eventfd stays readable from now on: every poll returns.
        let _ = self.wake.write(1);
    }

    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }
}

/// Logs an I/O error at most once per [`ERROR_LOG_EVERY`].
struct ErrorLog {
    what: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn new(what: &'static str) -> ErrorLog {
        ErrorLog { what, last: None, suppressed: 0 }
    }
    fn log(&mut self, dev: &str, e: &io::Error) {
        if self.last.is_some_and(|t| t.elapsed() < ERROR_LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            device = dev,
            error = %e,
            suppressed = self.suppressed,
            "WireGuard {}; if the interface was deleted from outside, close the device",
            self.what
        );
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// Sleeps a little after an error; the stop event still wakes us.
fn backoff(sh: &Shared) {
    let _ = wait_readable(sh.wake_fd().as_fd(), sh.wake_fd(), Duration::from_millis(100));
}

/// Slot sizes: IP packets up to `mtu`, datagrams up to `mtu + 32`.
pub fn slot_sizes(mtu: usize) -> (usize, usize) {
    let ip = mtu.max(MIN_BUF);
    (ip, (ip + DATA_OVERHEAD).max(MIN_BUF))
}

/// Starts the tx and rx threads.
pub fn spawn(
    shared: &Arc<Shared>,
    tun: &Arc<dyn TunnelIo>,
    net: &Arc<dyn NetworkIo>,
    mtu: usize,
) -> io::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    let (sh, t, n) = (shared.clone(), tun.clone(), net.clone());
    threads.push(
        std::thread::Builder::new()
            .name(format!("wgtx-{}", shared.name))
            .spawn(move || tx_loop(&sh, t.as_ref(), n.as_ref(), mtu))?,
    );
    let (sh, t, n) = (shared.clone(), tun.clone(), net.clone());
    match std::thread::Builder::new()
        .name(format!("wgrx-{}", shared.name))
        .spawn(move || rx_loop(&sh, t.as_ref(), n.as_ref(), mtu))
    {
        Ok(h) => threads.push(h),
        Err(e) => {
            shared.stop();
            for t in threads {
                let _ = t.join();
            }
            return Err(e);
        }
    }
    Ok(threads)
}

/// TUN → encrypt → UDP.
fn tx_loop(sh: &Shared, tun: &dyn TunnelIo, net: &dyn NetworkIo, mtu: usize) {
    let (ip_slot, net_slot) = slot_sizes(mtu);
    let mut inb = Batch::new(BATCH, ip_slot);
    let mut out = Batch::new(BATCH, net_slot);
    let mut tun_err = ErrorLog::new("TUN read failed");
    let mut net_err = ErrorLog::new("UDP send failed");
    while !sh.stopped() {
        inb.clear();
        match tun.recv_batch(&mut inb) {
            Ok(0) => {
                if let Err(e) = wait_readable(tun.poll_fd(), sh.wake_fd(), IDLE_WAIT) {
                    tun_err.log(&sh.name, &e);
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                tun_err.log(&sh.name, &e);
                backoff(sh);
                continue;
            }
        }
        out.clear();
        {
            let mut peer = sh.peer();
            for (pkt, _) in inb.iter() {
                let Some(dst) = out.next_slot() else { break };
                if let Out::Network { len, to } = peer.encapsulate(pkt, dst) {
                    out.commit(len, to);
                }
            }
        }
        if !out.is_empty()
            && let Err(e) = net.send_batch(&out)
        {
            net_err.log(&sh.name, &e);
        }
    }
}

/// UDP → decrypt → TUN, plus the timers.
fn rx_loop(sh: &Shared, tun: &dyn TunnelIo, net: &dyn NetworkIo, mtu: usize) {
    let (_, net_slot) = slot_sizes(mtu);
    let mut inb = Batch::new(BATCH, net_slot);
    let mut to_tun = Batch::new(BATCH, net_slot);
    let mut to_net = Batch::new(BATCH, net_slot);
    let mut net_err = ErrorLog::new("UDP receive/send failed");
    let mut tun_err = ErrorLog::new("TUN write failed");
    let mut next_tick = Instant::now();
    while !sh.stopped() {
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + TICK;
            to_net.clear();
            {
                let mut peer = sh.peer();
                if let Some(dst) = to_net.next_slot()
                    && let Out::Network { len, to } = peer.tick(dst)
                {
                    to_net.commit(len, to);
                }
            }
            if !to_net.is_empty()
                && let Err(e) = net.send_batch(&to_net)
            {
                net_err.log(&sh.name, &e);
            }
        }
        inb.clear();
        match net.recv_batch(&mut inb) {
            Ok(0) => {
                let wait = next_tick.saturating_duration_since(Instant::now());
                if let Err(e) = wait_readable(net.poll_fd(), sh.wake_fd(), wait) {
                    net_err.log(&sh.name, &e);
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                net_err.log(&sh.name, &e);
                backoff(sh);
                continue;
            }
        }
        to_tun.clear();
        to_net.clear();
        let mut drain = false;
        {
            let mut peer = sh.peer();
            for (d, src) in inb.iter() {
                let Some(dst) = to_tun.next_slot() else { break };
                match peer.decapsulate(src, d, dst) {
                    Out::Tunnel { len } => to_tun.commit(len, src),
                    Out::Network { len, to } => {
                        // Rare (handshake reply / cookie): copy it over so
                        // the slot can take the next packet.
                        let Some(reply) = to_net.next_slot() else { continue };
                        reply[..len].copy_from_slice(&dst[..len]);
                        to_net.commit(len, to);
                        drain = true;
                    }
                    Out::Nothing | Out::Dropped(_) => {}
                }
            }
        }
        if !to_tun.is_empty()
            && let Err(e) = tun.send_batch(&to_tun)
        {
            tun_err.log(&sh.name, &e);
        }
        if !to_net.is_empty()
            && let Err(e) = net.send_batch(&to_net)
        {
            net_err.log(&sh.name, &e);
        }
        // A completed handshake releases packets queued meanwhile.
        while drain {
            to_net.clear();
            {
                let mut peer = sh.peer();
                while let Some(dst) = to_net.next_slot() {
                    match peer.drain(dst) {
                        Out::Network { len, to } => to_net.commit(len, to),
                        Out::Dropped(_) => {}
                        _ => {
                            drain = false;
                            break;
                        }
                    }
                }
            }
            if to_net.is_empty() {
                break;
            }
            if let Err(e) = net.send_batch(&to_net) {
                net_err.log(&sh.name, &e);
            }
        }
    }
}
