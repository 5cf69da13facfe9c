//! Per-forwarder allocation of node-wide tunnel resources: WireGuard listen
//! ports (one UDP socket per userspace device) and VXLAN VNIs (unique on
//! this node's VXLAN socket).
//!
//! # Guarantees
//! - A port or VNI is handed to at most one connection at a
//!   time; it returns to the pool when the connection's lease is dropped.
//! - Allocation is O(1) amortised (a cursor walks the range) and fails with
//!   a message naming the exhausted range.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// WireGuard listen ports in an inclusive range.
#[derive(Debug)]
pub struct PortPool {
    lo: u16,
    hi: u16,
    state: Mutex<(HashSet<u16>, u16)>,
}

/// A port held by a connection; released on drop.
#[derive(Debug)]
pub struct PortLease {
    pool: Arc<PortPool>,
    port: u16,
}

impl PortLease {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.pool.state.lock().unwrap_or_else(|e| e.into_inner()).0.remove(&self.port);
    }
}

impl PortPool {
    /// Ports `lo..=hi`.
    pub fn new(lo: u16, hi: u16) -> Arc<PortPool> {
        Arc::new(PortPool { lo, hi, state: Mutex::new((HashSet::new(), lo)) })
    }

    /// Parses `lo-hi` (or a single port).
    pub fn parse(s: &str) -> Result<(u16, u16), String> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let lo: u16 = a.trim().parse().map_err(|_| format!("port range {s:?}: {a:?} is not a port"))?;
        let hi: u16 = b.trim().parse().map_err(|_| format!("port range {s:?}: {b:?} is not a port"))?;
        if lo == 0 || lo > hi {
            return Err(format!("port range {s:?} must be lo-hi with 0 < lo <= hi"));
        }
        Ok((lo, hi))
    }

    /// A free port, skipping `avoid` (ports found busy by the caller).
    pub fn allocate(self: &Arc<Self>, avoid: &HashSet<u16>) -> Result<PortLease, String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = u32::from(self.hi - self.lo) + 1;
        let mut p = st.1;
        for _ in 0..n {
            let cand = p;
            p = if p >= self.hi { self.lo } else { p + 1 };
            if !st.0.contains(&cand) && !avoid.contains(&cand) {
                st.0.insert(cand);
                st.1 = p;
                return Ok(PortLease { pool: self.clone(), port: cand });
            }
        }
        Err(format!("no free WireGuard port in {}-{} (NSM_WIREGUARD_PORTS)", self.lo, self.hi))
    }

    /// Ports currently leased (for leak checks).
    pub fn in_use(&self) -> usize {
        self.state.lock().map(|s| s.0.len()).unwrap_or(0)
    }
}

/// VNIs in use on this node. The kernel refuses a second VXLAN device with
/// the same VNI on the same UDP port and address family in one netns,
/// whatever its remote, so VNIs are unique node-wide (stricter than
/// upstream's per-(src_ip, vni) rule) and both ends of every tunnel claim
/// theirs here.
#[derive(Debug, Default)]
pub struct VniTable {
    used: Mutex<HashSet<u32>>,
}

/// A VNI held by a connection; released on drop.
#[derive(Debug)]
pub struct VniLease {
    table: Arc<VniTable>,
    vni: u32,
}

impl VniLease {
    /// The VNI.
    pub fn vni(&self) -> u32 {
        self.vni
    }
}

impl Drop for VniLease {
    fn drop(&mut self) {
        self.table.used.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.vni);
    }
}

impl VniTable {
    /// An empty table.
    pub fn new() -> Arc<VniTable> {
        Arc::new(VniTable::default())
    }

    /// True if a connection on this node uses `vni`.
    pub fn vni_in_use(&self, vni: u32) -> bool {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).contains(&vni)
    }

    /// Claims `vni`; `None` if taken.
    pub fn claim(self: &Arc<Self>, vni: u32) -> Option<VniLease> {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if !u.insert(vni) {
            return None;
        }
        Some(VniLease { table: self.clone(), vni })
    }

    /// VNIs in use (for leak checks).
    pub fn in_use(&self) -> usize {
        self.used.lock().map(|u| u.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_cycle_and_release() {
        let p = PortPool::new(51820, 51822);
        let a = p.allocate(&HashSet::new()).unwrap();
        let b = p.allocate(&HashSet::from([51822])).unwrap();
        assert_eq!((a.port(), b.port()), (51820, 51821));
        let e = p.allocate(&HashSet::from([51822])).unwrap_err();
        assert!(e.contains("51820-51822"), "{e}");
        drop(a);
        assert_eq!(p.allocate(&HashSet::new()).unwrap().port(), 51822);
        assert_eq!(p.in_use(), 1);
        assert_eq!(PortPool::parse("51820-51830").unwrap(), (51820, 51830));
        assert!(PortPool::parse("9-1").is_err());
        assert!(PortPool::parse("x").is_err());
    }

    #[test]
    fn vnis_are_node_wide() {
        let t = VniTable::new();
        let l = t.claim(42).unwrap();
        assert!(t.claim(42).is_none());
        assert!(t.vni_in_use(42));
        assert_eq!(t.in_use(), 1);
        drop(l);
        assert!(t.claim(42).is_some());
    }
}
