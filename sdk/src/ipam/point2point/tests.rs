//! Tests of [`super`] (point2point).

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
    let got = d.allocate("c1", &cidrs(&["10.0.0.77/32"]), &strs(&["10.0.0.77/32"]), &strs(&["10.0.0.66/32"])).unwrap();
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
    assert!(chain.close(&mut Context::default(), Connection { id: "a".into(), ..Default::default() }).await.is_err());
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
