//! Helper semantics that upstream keeps next to the generated types
//! (`connection_helpers.go`, `ipcontext_helpers.go`, path accessors). Pure
//! functions on the generated structs; no I/O.

use std::net::IpAddr;

use crate::connection::{Connection, MonitorScopeSelector, PathSegment};
use crate::connectioncontext::{IpContext, Route};

/// A parsed `addr/len` string. Hand-written (a dozen lines) to keep this crate
/// free of dependencies; the SDK uses `ipnetwork` for real prefix arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// Parses `addr/len`; a bare address gets the full length (/32 or /128).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.trim().parse::<u8>().ok().filter(|l| *l <= max)?,
            None => max,
        };
        Some(Cidr { addr, len })
    }

    /// True when `ip` is inside this prefix (same family only).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len)) };
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - u32::from(self.len)) };
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }

    /// The prefix with host bits cleared.
    pub fn network(&self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len)) };
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - u32::from(self.len)) };
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Cidr { addr, len: self.len }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn parse_all(v: &[String]) -> Vec<Cidr> {
    // Upstream silently drops entries that do not parse; so do we.
    v.iter().filter_map(|s| Cidr::parse(s)).collect()
}

/// A route with its gateway resolved, as a data plane installs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedRoute {
    pub prefix: Cidr,
    /// `None`: a link-scope route out of the interface.
    pub next_hop: Option<IpAddr>,
}

impl IpContext {
    /// Link routes for the endpoint side: one per source (client) address not
    /// already covered by a destination prefix (`GetSrcIPRoutes`).
    pub fn src_ip_routes(&self) -> Vec<ResolvedRoute> {
        ip_routes(&self.src_ip_addrs, &self.dst_ip_addrs)
    }

    /// Link routes for the client side: one per destination (endpoint) address
    /// not already covered by a source prefix (`GetDstIPRoutes`).
    pub fn dst_ip_routes(&self) -> Vec<ResolvedRoute> {
        ip_routes(&self.dst_ip_addrs, &self.src_ip_addrs)
    }

    /// `src_routes` (installed on the client side) with an empty `nextHop`
    /// filled with the first destination address of the same family, unless
    /// the route's own address lies inside a destination prefix
    /// (`GetSrcRoutesWithExplicitNextHop`).
    pub fn src_routes_with_explicit_next_hop(&self) -> Vec<ResolvedRoute> {
        routes_with_next_hop(&self.src_routes, &self.dst_ip_addrs)
    }

    /// `dst_routes` (installed on the endpoint side), symmetric to
    /// [`IpContext::src_routes_with_explicit_next_hop`].
    pub fn dst_routes_with_explicit_next_hop(&self) -> Vec<ResolvedRoute> {
        routes_with_next_hop(&self.dst_routes, &self.src_ip_addrs)
    }
}

fn ip_routes(addrs: &[String], other_side: &[String]) -> Vec<ResolvedRoute> {
    let other = parse_all(other_side);
    parse_all(addrs)
        .into_iter()
        .filter(|c| !other.iter().any(|o| o.contains(c.addr)))
        .map(|c| ResolvedRoute { prefix: c, next_hop: None })
        .collect()
}

fn routes_with_next_hop(routes: &[Route], gw_side: &[String]) -> Vec<ResolvedRoute> {
    let gws = parse_all(gw_side);
    routes
        .iter()
        .filter_map(|r| {
            let prefix = Cidr::parse(&r.prefix)?;
            let next_hop = if !r.next_hop.is_empty() {
                Some(r.next_hop.parse::<IpAddr>().ok()?)
            } else if gws.iter().any(|g| g.contains(prefix.addr)) {
                None
            } else {
                gws.iter().find(|g| g.addr.is_ipv4() == prefix.addr.is_ipv4()).map(|g| g.addr)
            };
            Some(ResolvedRoute { prefix, next_hop })
        })
        .collect()
}

impl Connection {
    /// `path.path_segments[path.index]`.
    pub fn current_path_segment(&self) -> Option<&PathSegment> {
        let p = self.path.as_ref()?;
        p.path_segments.get(p.index as usize)
    }

    /// `path.path_segments[path.index - 1]`.
    pub fn prev_path_segment(&self) -> Option<&PathSegment> {
        let p = self.path.as_ref()?;
        (p.index as usize).checked_sub(1).and_then(|i| p.path_segments.get(i))
    }

    /// `path.path_segments[path.index + 1]`.
    pub fn next_path_segment(&self) -> Option<&PathSegment> {
        let p = self.path.as_ref()?;
        p.path_segments.get(p.index as usize + 1)
    }

    /// The IP context, creating empty parents as needed.
    pub fn ip_context_mut(&mut self) -> &mut IpContext {
        self.context.get_or_insert_with(Default::default).ip_context.get_or_insert_with(Default::default)
    }

    /// True when this connection is in the scope of `sel` (upstream
    /// `MonitorScopeSelector` matching): the service list is empty or contains
    /// `network_service`, and the selector's segments appear as a contiguous
    /// run of the path where each non-empty `name`/`id`/`token` is equal.
    pub fn matches_selector(&self, sel: &MonitorScopeSelector) -> bool {
        if !sel.network_services.is_empty() && !sel.network_services.iter().any(|s| *s == self.network_service) {
            return false;
        }
        if sel.path_segments.is_empty() {
            return true;
        }
        let segs = self.path.as_ref().map(|p| p.path_segments.as_slice()).unwrap_or_default();
        if sel.path_segments.len() > segs.len() {
            return false;
        }
        segs.windows(sel.path_segments.len()).any(|w| {
            w.iter().zip(&sel.path_segments).all(|(seg, s)| {
                (s.name.is_empty() || s.name == seg.name)
                    && (s.id.is_empty() || s.id == seg.id)
                    && (s.token.is_empty() || s.token == seg.token)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::Path;

    fn ctx(src: &[&str], dst: &[&str]) -> IpContext {
        IpContext {
            src_ip_addrs: src.iter().map(|s| s.to_string()).collect(),
            dst_ip_addrs: dst.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c = Cidr::parse("10.0.0.5/24").unwrap();
        assert!(c.contains("10.0.0.200".parse().unwrap()));
        assert!(!c.contains("10.0.1.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        assert_eq!(c.network().to_string(), "10.0.0.0/24");
        assert_eq!(Cidr::parse("fd00::1").unwrap().len, 128);
        assert!(Cidr::parse("10.0.0.1/33").is_none());
        assert!(Cidr::parse("nonsense").is_none());
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn p2p_link_routes() {
        let c = ctx(&["172.16.1.3/32"], &["172.16.1.2/32"]);
        assert_eq!(
            c.src_ip_routes(),
            vec![ResolvedRoute { prefix: Cidr::parse("172.16.1.3/32").unwrap(), next_hop: None }]
        );
        assert_eq!(c.dst_ip_routes()[0].prefix.to_string(), "172.16.1.2/32");
        // A shared subnet needs no extra link route.
        let c = ctx(&["10.0.0.2/24"], &["10.0.0.1/24"]);
        assert!(c.src_ip_routes().is_empty());
        assert!(c.dst_ip_routes().is_empty());
    }

    #[test]
    fn explicit_next_hop() {
        let mut c = ctx(&["172.16.1.3/32", "fd00::3/128"], &["172.16.1.2/32", "fd00::2/128"]);
        c.src_routes = vec![
            Route { prefix: "10.10.0.0/16".into(), next_hop: String::new() },
            Route { prefix: "172.16.1.2/32".into(), next_hop: String::new() },
            Route { prefix: "fd10::/64".into(), next_hop: String::new() },
            Route { prefix: "10.20.0.0/16".into(), next_hop: "172.16.1.9".into() },
        ];
        let r = c.src_routes_with_explicit_next_hop();
        assert_eq!(r[0].next_hop, Some("172.16.1.2".parse().unwrap()));
        assert_eq!(r[1].next_hop, None, "route to the peer itself stays link-scope");
        assert_eq!(r[2].next_hop, Some("fd00::2".parse().unwrap()));
        assert_eq!(r[3].next_hop, Some("172.16.1.9".parse().unwrap()));
    }

    fn seg(name: &str, id: &str) -> PathSegment {
        PathSegment { name: name.into(), id: id.into(), ..Default::default() }
    }

    #[test]
    fn selector_matching() {
        let conn = Connection {
            network_service: "svc".into(),
            path: Some(Path { index: 1, path_segments: vec![seg("nsc", "a"), seg("nsmgr", "b"), seg("fwd", "c")] }),
            ..Default::default()
        };
        assert!(conn.matches_selector(&MonitorScopeSelector::default()));
        let s = |segs: Vec<PathSegment>, svcs: &[&str]| MonitorScopeSelector {
            path_segments: segs,
            network_services: svcs.iter().map(|s| s.to_string()).collect(),
        };
        assert!(conn.matches_selector(&s(vec![seg("", "b")], &[])));
        assert!(conn.matches_selector(&s(vec![seg("nsmgr", ""), seg("fwd", "c")], &["svc"])));
        assert!(!conn.matches_selector(&s(vec![seg("nsc", ""), seg("fwd", "")], &[])), "must be contiguous");
        assert!(!conn.matches_selector(&s(vec![seg("", "b")], &["other"])));
        assert!(!conn.matches_selector(&s(vec![seg("", "zzz")], &[])));
        assert_eq!(conn.prev_path_segment().unwrap().name, "nsc");
        assert_eq!(conn.next_path_segment().unwrap().name, "fwd");
    }
}
