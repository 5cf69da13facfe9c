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
use crate::networkservice::chain::{ConnResult, Context, Element, Next, conn_mut};

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
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
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
mod tests;
