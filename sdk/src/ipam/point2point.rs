//! `point2pointipam`: gives every connection a pair of host addresses — the
//! first for the endpoint side (`dst_ip_addrs`), the second for the client
//! side (`src_ip_addrs`) — plus a host route to the other end on each side.
//!
//! E.g. CIDR `172.16.1.2/31` ⇒ endpoint `172.16.1.2/32`, client
//! `172.16.1.3/32`, `src_routes: [172.16.1.2/32]`, `dst_routes: [172.16.1.3/32]`.
//!
//! # Guarantees
//! - **Pairs.** One pair per address family present in the pool: a pool of
//!   IPv4 CIDRs gives one IPv4 pair, an IPv4 + IPv6 pool gives one pair of
//!   each (dual stack). Within a family the pair comes from the first CIDR
//!   (in configuration order) that has two free addresses, both from the
//!   same CIDR.
//! - **Usable addresses.** For IPv4 prefixes of /30 or shorter the network
//!   and broadcast addresses are never handed out (a /24 gives .1–.254);
//!   /31 uses both addresses (RFC 3021). IPv6 uses every address of the
//!   prefix, as upstream (`2001:db8::/116` ⇒ endpoint `2001:db8::`). A CIDR
//!   with fewer than two usable addresses, and overlapping CIDRs, are
//!   rejected at construction.
//! - **Exclusions.** No address inside one of the request's
//!   `ip_context.excluded_prefixes` is ever handed out; an existing lease
//!   that became excluded is replaced on refresh. Nothing left outside them
//!   ⇒ `ResourceExhausted` naming the pool. An excluded prefix that does not
//!   parse ⇒ `InvalidArgument` naming it.
//! - **Refresh / heal.** A connection id that already holds a lease keeps it
//!   (unless excluded). A new id whose request already carries addresses of
//!   this pool that are free (e.g. after an endpoint restart) gets exactly
//!   those back. Any other address of this pool found in the request is
//!   stale — it belongs to someone else — and is removed together with its
//!   host route, so a healed client never ends up with two addresses.
//! - **Idempotent output.** Addresses and routes are added only if not
//!   already present; a refresh does not duplicate them.
//! - **No leaks.** The lease is released on Close (after the rest of the
//!   chain ran, whatever its result) and when the *first* Request of an id
//!   fails downstream; a failed refresh keeps it.
//! - **Cost.** Allocation is next-fit from a per-CIDR cursor: released
//!   addresses are reused only after the cursor wrapped (fair), and a
//!   request does not rescan the allocated head of the pool. Excluded
//!   prefixes are skipped as whole intervals. Memory is proportional to the
//!   addresses in use, not to the pool size.
//!
//! # Chain placement
//! Server side, in an endpoint chain after `begin` (which serialises the
//! Requests/Closes of one id) — typically right after `metadata` — and
//! before the elements that apply the IP context. Leases are keyed by
//! `connection.id`, so chain several instances only with disjoint CIDRs.
//!
//! # Failure behaviour
//! Empty connection id ⇒ `InvalidArgument`; bad excluded prefix ⇒
//! `InvalidArgument`; pool exhausted ⇒ `ResourceExhausted`. In all three
//! cases nothing is allocated and the rest of the chain is not called.
//! Errors from the rest of the chain are returned unchanged.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ipnetwork::IpNetwork;
use nsm_api::connection::Connection;
use nsm_api::connectioncontext::{IpContext, Route};
use nsm_api::networkservice::NetworkServiceRequest;
use tonic::Status;

use super::{IpamError, parse_prefix};
use crate::networkservice::chain::{Context, Element, Next, conn_mut};

/// One allocated pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct P2pPair {
    /// Endpoint side (`dst_ip_addrs`).
    pub dst: IpAddr,
    /// Client side (`src_ip_addrs`).
    pub src: IpAddr,
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

impl P2pPair {
    /// `dst/32` (or `/128`).
    pub fn dst_host(&self) -> String {
        host(self.dst)
    }
    /// `src/32` (or `/128`).
    pub fn src_host(&self) -> String {
        host(self.src)
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v6: bool, v: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(v))
    } else {
        // Values of an IPv4 range always fit in 32 bits.
        IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(u32::MAX)))
    }
}

/// Inclusive `[start, end]` of a prefix, in the family's integer space.
fn bounds(net: &IpNetwork) -> (u128, u128) {
    let bits: u32 = if net.is_ipv4() { 32 } else { 128 };
    let host_bits = bits - u32::from(net.prefix());
    let hostmask: u128 = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
    let start = to_u128(net.ip()) & !hostmask;
    (start, start | hostmask)
}

/// One CIDR of the pool.
#[derive(Debug)]
struct Range {
    /// As configured, host bits cleared.
    net: IpNetwork,
    v6: bool,
    /// First and last usable addresses (inclusive).
    first: u128,
    last: u128,
    /// Where the next search starts.
    cursor: u128,
    used: HashSet<u128>,
}

impl Range {
    fn new(cidr: IpNetwork) -> Result<Range, IpamError> {
        let (start, end) = bounds(&cidr);
        let v6 = cidr.is_ipv6();
        let net = IpNetwork::new(from_u128(v6, start), cidr.prefix())
            .map_err(|_| IpamError::InvalidPrefix { what: "CIDR", value: cidr.to_string() })?;
        let (first, last) = if !v6 && cidr.prefix() <= 30 { (start + 1, end - 1) } else { (start, end) };
        if last <= first {
            return Err(IpamError::TooSmall { cidr: net.to_string() });
        }
        Ok(Range { net, v6, first, last, cursor: first, used: HashSet::new() })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv6() == self.v6 && {
            let v = to_u128(ip);
            v >= self.first && v <= self.last
        }
    }

    /// First free, non-excluded address at or after the cursor, wrapping
    /// around once; `skip` is treated as taken.
    fn next_free(&self, ex: &Excluded, skip: Option<u128>) -> Option<u128> {
        self.scan(ex, skip, self.cursor, self.last)
            .or_else(|| if self.cursor > self.first { self.scan(ex, skip, self.first, self.cursor - 1) } else { None })
    }

    fn scan(&self, ex: &Excluded, skip: Option<u128>, mut lo: u128, hi: u128) -> Option<u128> {
        while lo <= hi {
            if let Some(end) = ex.covering_end(self.v6, lo) {
                lo = end.checked_add(1)?;
                continue;
            }
            if skip != Some(lo) && !self.used.contains(&lo) {
                return Some(lo);
            }
            lo = lo.checked_add(1)?;
        }
        None
    }

    fn advance_past(&mut self, v: u128) {
        self.cursor = if v >= self.last { self.first } else { v + 1 };
    }
}

/// Excluded intervals per family, sorted and merged.
#[derive(Debug, Default)]
struct Excluded {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
    text: Vec<String>,
}

impl Excluded {
    fn new(prefixes: &[IpNetwork]) -> Excluded {
        let mut ex = Excluded { text: prefixes.iter().map(|p| p.to_string()).collect(), ..Default::default() };
        for p in prefixes {
            let b = bounds(p);
            if p.is_ipv6() { ex.v6.push(b) } else { ex.v4.push(b) }
        }
        for list in [&mut ex.v4, &mut ex.v6] {
            list.sort_unstable();
            let mut merged: Vec<(u128, u128)> = Vec::with_capacity(list.len());
            for &(s, e) in list.iter() {
                match merged.last_mut() {
                    Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            *list = merged;
        }
        ex
    }

    /// End of the excluded interval containing `v`, if any.
    fn covering_end(&self, v6: bool, v: u128) -> Option<u128> {
        let list = if v6 { &self.v6 } else { &self.v4 };
        let i = list.partition_point(|(s, _)| *s <= v);
        let (_, e) = *list.get(i.checked_sub(1)?)?;
        (e >= v).then_some(e)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.covering_end(ip.is_ipv6(), to_u128(ip)).is_some()
    }
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    range: usize,
    dst: u128,
    src: u128,
}

/// The pure allocator behind [`Point2PointIpam`]: CIDRs, per-CIDR cursors
/// and used sets, and the leases of every connection id.
#[derive(Debug)]
pub struct Point2PointAllocator {
    ranges: Vec<Range>,
    /// Families present, in configuration order (`false` = IPv4).
    families: Vec<bool>,
    leases: HashMap<String, Vec<Lease>>,
}

impl Point2PointAllocator {
    /// A pool over `cidrs` (host bits are ignored: `172.16.1.5/24` is
    /// `172.16.1.0/24`). Fails on an empty list, on a CIDR with fewer than
    /// two usable addresses, and on overlapping CIDRs.
    pub fn new(cidrs: &[IpNetwork]) -> Result<Point2PointAllocator, IpamError> {
        if cidrs.is_empty() {
            return Err(IpamError::NoCidrs);
        }
        let mut ranges: Vec<Range> = vec![];
        for c in cidrs {
            let r = Range::new(*c)?;
            let (s, e) = bounds(&r.net);
            if let Some(o) = ranges.iter().find(|o| {
                let (os, oe) = bounds(&o.net);
                o.v6 == r.v6 && s <= oe && os <= e
            }) {
                return Err(IpamError::Overlap { a: o.net.to_string(), b: r.net.to_string() });
            }
            ranges.push(r);
        }
        let mut families = vec![];
        for r in &ranges {
            if !families.contains(&r.v6) {
                families.push(r.v6);
            }
        }
        Ok(Point2PointAllocator { ranges, families, leases: HashMap::new() })
    }

    /// The configured CIDRs (host bits cleared).
    pub fn cidrs(&self) -> Vec<IpNetwork> {
        self.ranges.iter().map(|r| r.net).collect()
    }

    /// True when `ip` is a usable address of one of the CIDRs.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// Number of connection ids holding a lease.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True when no connection holds a lease.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Number of addresses in use.
    pub fn allocated_addresses(&self) -> usize {
        self.ranges.iter().map(|r| r.used.len()).sum()
    }

    /// True when `id` holds a lease.
    pub fn has_lease(&self, id: &str) -> bool {
        self.leases.contains_key(id)
    }

    /// The current pairs of `id`.
    pub fn lease(&self, id: &str) -> Option<Vec<P2pPair>> {
        self.leases.get(id).map(|ls| ls.iter().map(|l| self.pair(l)).collect())
    }

    fn pair(&self, l: &Lease) -> P2pPair {
        let v6 = self.ranges.get(l.range).is_some_and(|r| r.v6);
        P2pPair { dst: from_u128(v6, l.dst), src: from_u128(v6, l.src) }
    }

    /// Returns the pairs (one per family) of connection `id`:
    /// - its existing lease for a family, unless an address of it is inside
    ///   `excluded` (then it is replaced);
    /// - else the first `requested_src` / `requested_dst` addresses
    ///   (`addr/len` strings, as in an IP context) that are free,
    ///   not excluded and in the same CIDR of this pool (heal after restart);
    /// - else a fresh pair.
    ///
    /// All or nothing: on error the previous state is unchanged.
    pub fn allocate(
        &mut self,
        id: &str,
        excluded: &[IpNetwork],
        requested_src: &[String],
        requested_dst: &[String],
    ) -> Result<Vec<P2pPair>, IpamError> {
        let ex = Excluded::new(excluded);
        let old = self.leases.get(id).cloned().unwrap_or_default();
        let mut taken: Vec<(usize, u128)> = vec![]; // newly marked used (undo log)
        let mut freed: Vec<(usize, u128)> = vec![]; // released old addresses (undo log)
        let mut new_leases = vec![];
        let fams = self.families.clone();
        for v6 in fams {
            let res = self.allocate_family(v6, &old, &ex, requested_src, requested_dst, &mut taken, &mut freed);
            match res {
                Ok(l) => new_leases.push(l),
                Err(e) => {
                    for (r, a) in taken {
                        if let Some(r) = self.ranges.get_mut(r) {
                            r.used.remove(&a);
                        }
                    }
                    for (r, a) in freed {
                        if let Some(r) = self.ranges.get_mut(r) {
                            r.used.insert(a);
                        }
                    }
                    return Err(e);
                }
            }
        }
        let pairs = new_leases.iter().map(|l| self.pair(l)).collect();
        self.leases.insert(id.to_string(), new_leases);
        Ok(pairs)
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate_family(
        &mut self,
        v6: bool,
        old: &[Lease],
        ex: &Excluded,
        requested_src: &[String],
        requested_dst: &[String],
        taken: &mut Vec<(usize, u128)>,
        freed: &mut Vec<(usize, u128)>,
    ) -> Result<Lease, IpamError> {
        if let Some(l) = old.iter().find(|l| self.ranges.get(l.range).is_some_and(|r| r.v6 == v6)) {
            let p = self.pair(l);
            if !ex.contains(p.dst) && !ex.contains(p.src) {
                return Ok(*l);
            }
            if let Some(r) = self.ranges.get_mut(l.range) {
                for a in [l.dst, l.src] {
                    if r.used.remove(&a) {
                        freed.push((l.range, a));
                    }
                }
            }
        }
        let mut mark = |this: &mut Self, l: Lease| {
            if let Some(r) = this.ranges.get_mut(l.range) {
                for a in [l.dst, l.src] {
                    r.used.insert(a);
                    taken.push((l.range, a));
                }
            }
            l
        };
        if let Some(l) = self.recover(v6, ex, requested_src, requested_dst) {
            return Ok(mark(self, l));
        }
        let found = self.ranges.iter().enumerate().filter(|(_, r)| r.v6 == v6).find_map(|(i, r)| {
            let dst = r.next_free(ex, None)?;
            let src = r.next_free(ex, Some(dst))?;
            Some(Lease { range: i, dst, src })
        });
        if let Some(l) = found {
            if let Some(r) = self.ranges.get_mut(l.range) {
                r.advance_past(l.src);
            }
            return Ok(mark(self, l));
        }
        Err(IpamError::Exhausted {
            pool: self.ranges.iter().filter(|r| r.v6 == v6).map(|r| r.net.to_string()).collect::<Vec<_>>().join(","),
            excluded: ex.text.join(", "),
            in_use: self.ranges.iter().filter(|r| r.v6 == v6).map(|r| r.used.len()).sum(),
        })
    }

    fn recover(&self, v6: bool, ex: &Excluded, src: &[String], dst: &[String]) -> Option<Lease> {
        let parse = |s: &String| parse_prefix("address", s).ok().map(|n| n.ip());
        let usable = |r: &Range, ip: IpAddr| r.contains(ip) && !ex.contains(ip) && !r.used.contains(&to_u128(ip));
        for (i, r) in self.ranges.iter().enumerate().filter(|(_, r)| r.v6 == v6) {
            let Some(s) = src.iter().filter_map(parse).find(|ip| usable(r, *ip)) else { continue };
            let Some(d) = dst.iter().filter_map(parse).find(|ip| usable(r, *ip) && *ip != s) else { continue };
            return Some(Lease { range: i, dst: to_u128(d), src: to_u128(s) });
        }
        None
    }

    /// Releases the lease of `id`; returns whether there was one.
    pub fn release(&mut self, id: &str) -> bool {
        let Some(ls) = self.leases.remove(id) else { return false };
        for l in ls {
            if let Some(r) = self.ranges.get_mut(l.range) {
                r.used.remove(&l.dst);
                r.used.remove(&l.src);
            }
        }
        true
    }
}

/// The `point2pointipam` chain element.
#[derive(Debug)]
pub struct Point2PointIpam {
    alloc: Mutex<Point2PointAllocator>,
}

impl Point2PointIpam {
    /// An element allocating from `cidrs` (see [`Point2PointAllocator::new`]).
    pub fn new(cidrs: &[IpNetwork]) -> Result<Arc<Point2PointIpam>, IpamError> {
        Ok(Arc::new(Point2PointIpam { alloc: Mutex::new(Point2PointAllocator::new(cidrs)?) }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Point2PointAllocator> {
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of connections holding a lease (for leak tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no connection holds a lease.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of addresses in use.
    pub fn allocated_addresses(&self) -> usize {
        self.lock().allocated_addresses()
    }

    /// The current pairs of connection `id`.
    pub fn lease(&self, id: &str) -> Option<Vec<P2pPair>> {
        self.lock().lease(id)
    }
}

fn add_unique(list: &mut Vec<String>, v: String) {
    if !list.contains(&v) {
        list.push(v);
    }
}

fn add_route(routes: &mut Vec<Route>, prefix: String) {
    if !routes.iter().any(|r| r.prefix == prefix) {
        routes.push(Route { prefix, ..Default::default() });
    }
}

fn host_route_ip(r: &Route) -> Option<IpAddr> {
    let n = parse_prefix("route", &r.prefix).ok()?;
    let max = if n.is_ipv4() { 32 } else { 128 };
    (n.prefix() == max).then_some(n.ip())
}

/// Writes `pairs` into `ipc`, first dropping addresses of `pool` that are
/// not ours (and their host routes on the other side).
fn apply(ipc: &mut IpContext, pairs: &[P2pPair], pool: &Point2PointAllocator) {
    let ours_src: HashSet<String> = pairs.iter().map(P2pPair::src_host).collect();
    let ours_dst: HashSet<String> = pairs.iter().map(P2pPair::dst_host).collect();
    let stale = |list: &[String], ours: &HashSet<String>| -> Vec<IpAddr> {
        list.iter()
            .filter(|a| !ours.contains(*a))
            .filter_map(|a| parse_prefix("address", a).ok().map(|n| n.ip()))
            .filter(|ip| pool.contains(*ip))
            .collect()
    };
    let stale_src = stale(&ipc.src_ip_addrs, &ours_src);
    let stale_dst = stale(&ipc.dst_ip_addrs, &ours_dst);
    let in_pool_not_ours = |a: &String, ours: &HashSet<String>| {
        !ours.contains(a) && parse_prefix("address", a).ok().is_some_and(|n| pool.contains(n.ip()))
    };
    if !stale_src.is_empty() {
        ipc.src_ip_addrs.retain(|a| !in_pool_not_ours(a, &ours_src));
        ipc.dst_routes.retain(|r| host_route_ip(r).is_none_or(|ip| !stale_src.contains(&ip)));
    }
    if !stale_dst.is_empty() {
        ipc.dst_ip_addrs.retain(|a| !in_pool_not_ours(a, &ours_dst));
        ipc.src_routes.retain(|r| host_route_ip(r).is_none_or(|ip| !stale_dst.contains(&ip)));
    }
    for p in pairs {
        add_unique(&mut ipc.src_ip_addrs, p.src_host());
        add_route(&mut ipc.src_routes, p.dst_host());
        add_unique(&mut ipc.dst_ip_addrs, p.dst_host());
        add_route(&mut ipc.dst_routes, p.src_host());
    }
}

#[async_trait]
impl Element for Point2PointIpam {
    fn name(&self) -> &'static str {
        "point2pointipam"
    }

    async fn request(
        &self,
        ctx: &mut Context,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection, Status> {
        let conn = conn_mut(&mut req);
        if conn.id.is_empty() {
            return Err(Status::invalid_argument("point2pointipam: request has an empty connection id"));
        }
        let id = conn.id.clone();
        let ipc = conn.ip_context_mut();
        let excluded = ipc
            .excluded_prefixes
            .iter()
            .map(|p| parse_prefix("excluded prefix", p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(format!("connection {id}: {e}")))?;
        let first = {
            let mut a = self.lock();
            let first = !a.has_lease(&id);
            let pairs = a.allocate(&id, &excluded, &ipc.src_ip_addrs, &ipc.dst_ip_addrs).map_err(|e| {
                tracing::warn!(conn_id = %id, error = %e, "point-to-point IP allocation failed");
                Status::from(e)
            })?;
            apply(ipc, &pairs, &a);
            first
        };
        let res = next.request(ctx, req).await;
        if res.is_err() && first {
            self.lock().release(&id);
        }
        res
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        let id = conn.id.clone();
        let res = next.close(ctx, conn).await;
        self.lock().release(&id);
        res
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::networkservice::chain::Chain;
    use crate::testing::{Inject, request_with_id};

    fn cidrs(s: &[&str]) -> Vec<IpNetwork> {
        s.iter().map(|c| parse_prefix("CIDR", c).unwrap()).collect()
    }

    fn alloc(s: &[&str]) -> Point2PointAllocator {
        Point2PointAllocator::new(&cidrs(s)).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn documented_examples() {
        let mut a = alloc(&["172.16.1.2/31"]);
        let p = a.allocate("c1", &[], &[], &[]).unwrap();
        assert_eq!(p, vec![P2pPair { dst: ip("172.16.1.2"), src: ip("172.16.1.3") }]);
        assert_eq!(p[0].dst_host(), "172.16.1.2/32");
        assert!(matches!(a.allocate("c2", &[], &[], &[]), Err(IpamError::Exhausted { .. })));

        let mut a = alloc(&["172.16.1.100/31"]);
        let p = a.allocate("c1", &[], &[], &[]).unwrap();
        assert_eq!(p, vec![P2pPair { dst: ip("172.16.1.100"), src: ip("172.16.1.101") }]);
    }

    #[test]
    fn skips_network_and_broadcast_for_v4_up_to_slash_30() {
        let mut a = alloc(&["10.0.0.0/30"]);
        let p = a.allocate("c1", &[], &[], &[]).unwrap();
        assert_eq!(p, vec![P2pPair { dst: ip("10.0.0.1"), src: ip("10.0.0.2") }]);
        let err = a.allocate("c2", &[], &[], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IPAM pool 10.0.0.0/30 has no free address pair outside the excluded prefixes [] (2 addresses in use)"
        );
        let mut a = alloc(&["10.0.0.7/24"]);
        let p = a.allocate("c1", &[], &[], &[]).unwrap();
        assert_eq!(p[0].dst, ip("10.0.0.1"), "host bits of the configured CIDR are ignored");
    }

    #[test]
    fn construction_errors() {
        assert_eq!(Point2PointAllocator::new(&[]).unwrap_err(), IpamError::NoCidrs);
        assert!(matches!(Point2PointAllocator::new(&cidrs(&["10.0.0.1/32"])), Err(IpamError::TooSmall { .. })));
        assert!(matches!(Point2PointAllocator::new(&cidrs(&["::1/128"])), Err(IpamError::TooSmall { .. })));
        let e = Point2PointAllocator::new(&cidrs(&["10.0.0.0/24", "10.0.0.128/25"])).unwrap_err();
        assert_eq!(e.to_string(), "CIDRs 10.0.0.0/24 and 10.0.0.128/25 overlap");
        assert!(Point2PointAllocator::new(&cidrs(&["10.0.0.0/24", "fd00::/64", "10.0.1.0/24"])).is_ok());
    }

    #[test]
    fn ipv6_and_dual_stack() {
        let mut a = alloc(&["2001:db8::/116"]);
        let p = a.allocate("c1", &[], &[], &[]).unwrap();
        assert_eq!(p, vec![P2pPair { dst: ip("2001:db8::"), src: ip("2001:db8::1") }]);
        assert_eq!(p[0].src_host(), "2001:db8::1/128");

        let mut a = alloc(&["172.16.1.100/31", "2001:db8::/127"]);
        let p = a.allocate("c1", &[], &[], &[]).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].dst, ip("172.16.1.100"));
        assert_eq!(p[1].dst, ip("2001:db8::"));
        // All or nothing: v4 exhausted ⇒ v6 not consumed either.
        let mut a = alloc(&["172.16.1.100/31", "2001:db8::/120"]);
        a.allocate("c1", &[], &[], &[]).unwrap();
        let before = a.allocated_addresses();
        assert!(a.allocate("c2", &[], &[], &[]).is_err());
        assert_eq!(a.allocated_addresses(), before);
        assert!(!a.has_lease("c2"));
        // The whole ::/0 space works (no overflow at the top).
        let mut a = alloc(&["ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127"]);
        assert_eq!(a.allocate("c", &[], &[], &[]).unwrap()[0].src, ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
    }

    #[test]
    fn overflow_to_next_cidr_of_same_family() {
        let mut a = alloc(&["10.0.0.0/31", "10.1.0.0/31"]);
        assert_eq!(a.allocate("c1", &[], &[], &[]).unwrap()[0].dst, ip("10.0.0.0"));
        assert_eq!(a.allocate("c2", &[], &[], &[]).unwrap()[0].dst, ip("10.1.0.0"));
        assert!(a.allocate("c3", &[], &[], &[]).is_err());
        assert!(a.release("c1"));
        assert!(!a.release("c1"));
        assert_eq!(a.allocate("c3", &[], &[], &[]).unwrap()[0].dst, ip("10.0.0.0"));
    }

    #[test]
    fn excluded_prefixes_are_honoured() {
        let mut a = alloc(&["10.0.0.0/24"]);
        let ex = cidrs(&["10.0.0.0/28", "10.0.0.16/32", "10.0.0.18/31", "192.168.0.0/16"]);
        let p = a.allocate("c1", &ex, &[], &[]).unwrap();
        assert_eq!(p, vec![P2pPair { dst: ip("10.0.0.17"), src: ip("10.0.0.20") }]);
        // Everything excluded ⇒ exhausted, naming pool and exclusions.
        let err = a.allocate("c2", &cidrs(&["10.0.0.0/25", "10.0.0.128/25"]), &[], &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("10.0.0.0/24") && msg.contains("10.0.0.128/25"), "{msg}");
        assert_eq!(Status::from(err).code(), tonic::Code::ResourceExhausted);
        // A lease that becomes excluded is replaced on refresh.
        let p2 = a.allocate("c1", &cidrs(&["10.0.0.17/32"]), &[], &[]).unwrap();
        assert_ne!(p2[0].dst, ip("10.0.0.17"));
        assert_eq!(a.allocated_addresses(), 2, "the old pair was released");
        // Same exclusions again: lease kept.
        assert_eq!(a.allocate("c1", &cidrs(&["10.0.0.17/32"]), &[], &[]).unwrap(), p2);
    }

    #[test]
    fn refresh_keeps_and_recovery_reuses_free_addresses() {
        let mut a = alloc(&["10.0.0.0/24"]);
        let p = a.allocate("c1", &[], &[], &[]).unwrap();
        assert_eq!(a.allocate("c1", &[], &[], &[]).unwrap(), p, "refresh keeps the lease");
        // A restarted endpoint (new allocator) gets the request's addresses back.
        let mut b = alloc(&["10.0.0.0/24"]);
        let src = strs(&["10.0.0.2/32"]);
        let dst = strs(&["10.0.0.1/32"]);
        b.allocate("other", &[], &[], &[]).unwrap(); // takes dst .1, src .2
        let mut c = alloc(&["10.0.0.0/24"]);
        let got = c.allocate("c1", &[], &strs(&["10.0.0.77/32"]), &strs(&["10.0.0.66/32"])).unwrap();
        assert_eq!(got, vec![P2pPair { dst: ip("10.0.0.66"), src: ip("10.0.0.77") }]);
        // Addresses owned by another connection are not recovered.
        let got = b.allocate("c1", &[], &src, &dst).unwrap();
        assert_ne!(got[0].src, ip("10.0.0.2"));
        assert_ne!(got[0].dst, ip("10.0.0.1"));
        // Addresses outside the pool or excluded are not recovered.
        let mut d = alloc(&["10.0.0.0/24"]);
        let got =
            d.allocate("c1", &cidrs(&["10.0.0.77/32"]), &strs(&["10.0.0.77/32"]), &strs(&["10.0.0.66/32"])).unwrap();
        assert_ne!(got[0].src, ip("10.0.0.77"));
        let got = d.allocate("c2", &[], &strs(&["10.9.0.77/32"]), &strs(&["garbage"])).unwrap();
        assert!(d.contains(got[0].src) && d.contains(got[0].dst));
    }

    #[test]
    fn cursor_is_fair_and_big_pools_are_fast() {
        let mut a = alloc(&["10.0.0.0/29"]); // .1 - .6
        assert_eq!(a.allocate("c1", &[], &[], &[]).unwrap()[0].dst, ip("10.0.0.1"));
        a.release("c1");
        assert_eq!(a.allocate("c2", &[], &[], &[]).unwrap()[0].dst, ip("10.0.0.3"), "next-fit, not first-fit");
        assert_eq!(a.allocate("c3", &[], &[], &[]).unwrap()[0].dst, ip("10.0.0.5"));
        assert_eq!(a.allocate("c4", &[], &[], &[]).unwrap()[0].dst, ip("10.0.0.1"), "wraps around");

        // A /16: 65534 usable addresses = 32767 pairs, then exhaustion.
        let mut a = alloc(&["10.1.0.0/16"]);
        let t = Instant::now();
        for i in 0..32767 {
            a.allocate(&format!("c{i}"), &[], &[], &[]).unwrap();
        }
        assert!(a.allocate("one-too-many", &[], &[], &[]).is_err());
        assert_eq!(a.allocated_addresses(), 65534);
        // Free every other pair and allocate again: the wrap-around search
        // finds the holes.
        for i in (0..32767).step_by(2) {
            a.release(&format!("c{i}"));
        }
        for i in 0..16384 {
            a.allocate(&format!("again{i}"), &[], &[], &[]).unwrap();
        }
        assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
    }

    fn req(id: &str, f: impl FnOnce(&mut IpContext)) -> NetworkServiceRequest {
        let mut r = request_with_id(id);
        f(conn_mut(&mut r).ip_context_mut());
        r
    }

    fn ipc(c: &Connection) -> IpContext {
        c.context.clone().unwrap_or_default().ip_context.unwrap_or_default()
    }

    fn prefixes(r: &[Route]) -> Vec<&str> {
        r.iter().map(|r| r.prefix.as_str()).collect()
    }

    #[tokio::test]
    async fn element_sets_addresses_and_routes_without_duplicates() {
        let ipam = Point2PointIpam::new(&cidrs(&["172.16.1.2/31"])).unwrap();
        let chain = Chain::new(vec![ipam.clone()]);
        let conn = chain.request(&mut Context::default(), request_with_id("c1")).await.unwrap();
        let c = ipc(&conn);
        assert_eq!(c.src_ip_addrs, ["172.16.1.3/32"]);
        assert_eq!(c.dst_ip_addrs, ["172.16.1.2/32"]);
        assert_eq!(prefixes(&c.src_routes), ["172.16.1.2/32"]);
        assert_eq!(prefixes(&c.dst_routes), ["172.16.1.3/32"]);
        // Refresh with the returned connection: nothing duplicated.
        let again = chain
            .request(
                &mut Context::default(),
                NetworkServiceRequest { connection: Some(conn.clone()), ..Default::default() },
            )
            .await
            .unwrap();
        assert_eq!(ipc(&again), c);
        // Other routes the client asked for are kept.
        let conn3 = chain
            .request(
                &mut Context::default(),
                req("c1", |i| i.src_routes.push(Route { prefix: "10.0.0.0/8".into(), ..Default::default() })),
            )
            .await
            .unwrap();
        assert_eq!(prefixes(&ipc(&conn3).src_routes), ["10.0.0.0/8", "172.16.1.2/32"]);
        assert_eq!(ipam.len(), 1);
        chain.close(&mut Context::default(), conn).await.unwrap();
        assert_eq!(ipam.len(), 0);
        assert_eq!(ipam.allocated_addresses(), 0);
    }

    #[tokio::test]
    async fn element_heal_drops_stale_addresses_of_this_pool() {
        let ipam = Point2PointIpam::new(&cidrs(&["10.0.0.0/24"])).unwrap();
        let chain = Chain::new(vec![ipam.clone()]);
        let a = chain.request(&mut Context::default(), request_with_id("a")).await.unwrap();
        let ac = ipc(&a);
        // Another client arrives carrying a's addresses (e.g. healed from a
        // different endpoint that used the same CIDR) plus a foreign address.
        let r = req("b", |i| {
            i.src_ip_addrs = vec![ac.src_ip_addrs[0].clone(), "192.168.0.5/24".into()];
            i.dst_ip_addrs = ac.dst_ip_addrs.clone();
            i.src_routes = ac.src_routes.clone();
            i.dst_routes = ac.dst_routes.clone();
        });
        let b = chain.request(&mut Context::default(), r).await.unwrap();
        let bc = ipc(&b);
        let pb = &ipam.lease("b").unwrap()[0];
        assert_eq!(bc.src_ip_addrs, ["192.168.0.5/24".to_string(), pb.src_host()]);
        assert_eq!(bc.dst_ip_addrs, [pb.dst_host()]);
        assert_eq!(prefixes(&bc.src_routes), [pb.dst_host().as_str()]);
        assert_eq!(prefixes(&bc.dst_routes), [pb.src_host().as_str()]);
        assert_ne!(ipam.lease("a"), ipam.lease("b"));
    }

    #[tokio::test]
    async fn element_errors_and_failed_first_request() {
        let ipam = Point2PointIpam::new(&cidrs(&["10.0.0.0/24"])).unwrap();
        let chain = Chain::new(vec![ipam.clone(), Inject::error(tonic::Code::Unavailable, "down")]);
        assert!(chain.request(&mut Context::default(), request_with_id("a")).await.is_err());
        assert_eq!(ipam.len(), 0, "failed first request releases");
        assert_eq!(ipam.allocated_addresses(), 0);

        // A failed refresh keeps the lease.
        let ok = Chain::new(vec![ipam.clone()]);
        ok.request(&mut Context::default(), request_with_id("a")).await.unwrap();
        let lease = ipam.lease("a");
        assert!(chain.request(&mut Context::default(), request_with_id("a")).await.is_err());
        assert_eq!(ipam.lease("a"), lease);

        let e = ok
            .request(&mut Context::default(), req("b", |i| i.excluded_prefixes = vec!["10.0.0.300/32".into()]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("\"10.0.0.300/32\""), "{}", e.message());
        let e = ok
            .request(&mut Context::default(), req("b", |i| i.excluded_prefixes = vec!["10.0.0.0/16".into()]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("10.0.0.0/24"), "{}", e.message());
        assert!(ipam.lease("b").is_none());
        let e = ok.request(&mut Context::default(), request_with_id("")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        // Close releases even when the rest of the chain fails.
        assert!(
            chain.close(&mut Context::default(), Connection { id: "a".into(), ..Default::default() }).await.is_err()
        );
        assert_eq!(ipam.len(), 0);
    }

    #[tokio::test]
    async fn no_leak_over_10000_cycles() {
        let ipam = Point2PointIpam::new(&cidrs(&["10.0.0.0/30", "fd00::/126"])).unwrap();
        let chain = Chain::new(vec![ipam.clone()]);
        for i in 0..10_000 {
            let conn = chain.request(&mut Context::default(), request_with_id(&format!("c{i}"))).await.unwrap();
            chain.close(&mut Context::default(), conn).await.unwrap();
        }
        assert_eq!(ipam.len(), 0);
        assert_eq!(ipam.allocated_addresses(), 0);
    }
}
