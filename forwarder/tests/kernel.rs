//! Real-kernel tests of the KERNEL mechanism's netlink operations (run as
//! root). Every test makes its own namespaces ([`TestNetns`]), which are
//! deleted on drop, also when an assertion fails.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::LinkAttribute;
use nsm_api::connectioncontext::{IpContext, Route};
use nsm_api::ext::{Cidr, ResolvedRoute};
use nsm_forwarder::kernel::{
    KernelError, VethEnd, apply_addresses, apply_routes, delete_link, ensure_veth_pair, link_info,
    open_ping_group_range, validate_ifname,
};
use nsm_sdk::testing::netns::TestNetns;
use nsm_sdk::testing::ok_output;
use nsm_sdk::tools::netns::NetnsHandle;

const CLIENT_IF: &str = "nsm-1";
const ENDPOINT_IF: &str = "nse-xyz";

struct Pair {
    client: TestNetns,
    endpoint: TestNetns,
}

impl Pair {
    fn new() -> Pair {
        Pair { client: TestNetns::new("fwdk"), endpoint: TestNetns::new("fwdk") }
    }
    fn ends(&self, id: &str) -> (VethEnd, VethEnd) {
        (
            VethEnd {
                netns: self.client.handle().clone(),
                name: CLIENT_IF.into(),
                alias: format!("server-{id}"),
                mtu: Some(1446),
            },
            VethEnd {
                netns: self.endpoint.handle().clone(),
                name: ENDPOINT_IF.into(),
                alias: format!("client-{id}"),
                mtu: Some(1446),
            },
        )
    }
}

fn cidrs(v: &[String]) -> Vec<Cidr> {
    v.iter().map(|s| Cidr::parse(s).unwrap()).collect()
}

/// Applies the IP context the way the forwarder does: client (NSC) side gets
/// src addresses, dst link routes and src routes with explicit next hop; the
/// endpoint side the mirror image.
async fn apply_context(p: &Pair, ctx: &IpContext) {
    let c = p.client.handle();
    let e = p.endpoint.handle();
    apply_addresses(c, CLIENT_IF, &cidrs(&ctx.src_ip_addrs)).await.unwrap();
    let both = |a: Vec<ResolvedRoute>, b: Vec<ResolvedRoute>| a.into_iter().chain(b).collect::<Vec<_>>();
    apply_routes(c, CLIENT_IF, &both(ctx.dst_ip_routes(), ctx.src_routes_with_explicit_next_hop())).await.unwrap();
    apply_addresses(e, ENDPOINT_IF, &cidrs(&ctx.dst_ip_addrs)).await.unwrap();
    apply_routes(e, ENDPOINT_IF, &both(ctx.src_ip_routes(), ctx.dst_routes_with_explicit_next_hop())).await.unwrap();
}

fn ctx(src: &[&str], dst: &[&str], src_routes: &[&str], dst_routes: &[&str]) -> IpContext {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let r = |v: &[&str]| v.iter().map(|x| Route { prefix: x.to_string(), ..Default::default() }).collect::<Vec<_>>();
    IpContext {
        src_ip_addrs: s(src),
        dst_ip_addrs: s(dst),
        src_routes: r(src_routes),
        dst_routes: r(dst_routes),
        ..Default::default()
    }
}

/// A line of `text` starting with `start` and containing every `needles`.
fn has_line(text: &str, start: &str, needles: &[&str]) -> bool {
    text.lines().any(|l| l.starts_with(start) && needles.iter().all(|n| l.contains(n)))
}

/// Names of links created in the test process's own namespace while `f` ran,
/// seen through an RTNLGRP_LINK subscription.
async fn links_created_here_during<F: std::future::Future<Output = T>, T>(f: F) -> (T, Vec<String>) {
    let (conn, _h, mut msgs) =
        rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link]).expect("multicast netlink socket");
    let task = tokio::spawn(conn);
    let out = f.await;
    let mut names = Vec::new();
    while let Ok(Some((m, _))) = tokio::time::timeout(Duration::from_millis(50), msgs.next()).await {
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) = m.payload {
            for a in l.attributes {
                if let LinkAttribute::IfName(n) = a {
                    names.push(n);
                }
            }
        }
    }
    task.abort();
    (out, names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veth_pair_ipv4_ping_and_idempotence() {
    let p = Pair::new();
    let (a, b) = p.ends("conn-v4");
    let (pair, created_here) = links_created_here_during(ensure_veth_pair(&a, &b)).await;
    let pair = pair.unwrap();
    assert!(
        !created_here.iter().any(|n| n == CLIENT_IF || n == ENDPOINT_IF),
        "a veth end appeared in the forwarder's own netns: {created_here:?}"
    );
    let own = NetnsHandle::current().unwrap();
    assert!(link_info(&own, CLIENT_IF).await.unwrap().is_none());
    assert!(link_info(&own, ENDPOINT_IF).await.unwrap().is_none());

    let ia = link_info(p.client.handle(), CLIENT_IF).await.unwrap().expect("client end exists");
    let ib = link_info(p.endpoint.handle(), ENDPOINT_IF).await.unwrap().expect("endpoint end exists");
    assert_eq!((ia.index, ib.index), (pair.a_index, pair.b_index));
    assert_eq!(ia.alias, "server-conn-v4");
    assert_eq!(ib.alias, "client-conn-v4");
    assert_eq!((ia.mtu, ib.mtu), (Some(1446), Some(1446)));
    assert!(ia.admin_up && ib.admin_up);
    assert_eq!(ia.kind.as_deref(), Some("veth"));

    let c = ctx(&["172.16.1.3/32"], &["172.16.1.2/32"], &["10.10.0.0/16"], &["10.20.0.0/16"]);
    apply_context(&p, &c).await;
    open_ping_group_range(p.client.handle()).await.unwrap();

    let o = p.client.exec(&["ping", "-c", "1", "-W", "2", "-I", CLIENT_IF, "172.16.1.2"]);
    ok_output(&o);

    let routes = ok_output(&p.client.exec(&["ip", "route", "show", "dev", CLIENT_IF]));
    assert!(has_line(&routes, "172.16.1.2 ", &["scope link"]), "{routes}");
    assert!(has_line(&routes, "10.10.0.0/16 via 172.16.1.2 ", &["onlink"]), "{routes}");
    let routes = ok_output(&p.endpoint.exec(&["ip", "route", "show", "dev", ENDPOINT_IF]));
    assert!(has_line(&routes, "172.16.1.3 ", &["scope link"]), "{routes}");
    assert!(has_line(&routes, "10.20.0.0/16 via 172.16.1.3 ", &["onlink"]), "{routes}");
    let pgr = ok_output(&p.client.exec(&["cat", "/proc/sys/net/ipv4/ping_group_range"]));
    assert_eq!(pgr.split_whitespace().collect::<Vec<_>>(), ["0", "2147483647"]);

    // Second round: same ifindexes, no error, nothing duplicated.
    let again = ensure_veth_pair(&a, &b).await.unwrap();
    assert_eq!(again, pair);
    apply_context(&p, &c).await;
    let addrs = ok_output(&p.client.exec(&["ip", "-o", "addr", "show", "dev", CLIENT_IF, "scope", "global"]));
    assert_eq!(addrs.lines().count(), 1, "{addrs}");
    let routes2 = ok_output(&p.client.exec(&["ip", "route", "show", "dev", CLIENT_IF]));
    assert_eq!(routes2.lines().count(), 2, "{routes2}");

    // Converging to another route set (an endpoint changed its routes
    // between refreshes) removes the stale ones and keeps the kernel's.
    let r = |p: &str, via: Option<&str>| ResolvedRoute {
        prefix: Cidr::parse(p).unwrap(),
        next_hop: via.map(|v| v.parse().unwrap()),
    };
    let next = [r("172.16.1.2/32", None), r("10.30.0.0/16", Some("172.16.1.2"))];
    apply_routes(p.client.handle(), CLIENT_IF, &next).await.unwrap();
    let routes3 = ok_output(&p.client.exec(&["ip", "route", "show", "dev", CLIENT_IF]));
    assert!(has_line(&routes3, "10.30.0.0/16 via 172.16.1.2 ", &["onlink"]), "{routes3}");
    assert!(!routes3.contains("10.10.0.0/16"), "stale route left: {routes3}");
    assert_eq!(routes3.lines().count(), 2, "{routes3}");
    apply_routes(p.client.handle(), CLIENT_IF, &[]).await.unwrap();
    let routes4 = ok_output(&p.client.exec(&["ip", "route", "show", "dev", CLIENT_IF]));
    assert!(routes4.trim().is_empty(), "{routes4}");
    // A route someone else added out of the interface (a static one, as
    // `ip route add` and network managers make them) is not ours to remove.
    ok_output(&p.client.exec(&["ip", "route", "add", "10.40.0.0/16", "dev", CLIENT_IF, "proto", "static"]));
    apply_routes(p.client.handle(), CLIENT_IF, &next).await.unwrap();
    let routes5 = ok_output(&p.client.exec(&["ip", "route", "show", "dev", CLIENT_IF]));
    assert!(routes5.contains("10.40.0.0/16"), "{routes5}");

    // Converging to another address set replaces the old one.
    apply_addresses(p.client.handle(), CLIENT_IF, &[Cidr::parse("172.16.1.5/32").unwrap()]).await.unwrap();
    let addrs = ok_output(&p.client.exec(&["ip", "-o", "addr", "show", "dev", CLIENT_IF, "scope", "global"]));
    assert!(addrs.contains("172.16.1.5/32") && !addrs.contains("172.16.1.3"), "{addrs}");

    // Deleting one end removes both.
    assert!(delete_link(p.client.handle(), CLIENT_IF, Some("server-conn-v4")).await.unwrap());
    assert!(link_info(p.client.handle(), CLIENT_IF).await.unwrap().is_none());
    assert!(link_info(p.endpoint.handle(), ENDPOINT_IF).await.unwrap().is_none());
    assert!(!delete_link(p.client.handle(), CLIENT_IF, None).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veth_pair_ipv6_pings_immediately() {
    let p = Pair::new();
    let (a, b) = p.ends("conn-v6");
    ensure_veth_pair(&a, &b).await.unwrap();
    let c = ctx(&["fd00::3/128"], &["fd00::2/128"], &["fd10::/64"], &[]);
    apply_context(&p, &c).await;
    let addrs = ok_output(&p.client.exec(&["ip", "-6", "addr", "show", "dev", CLIENT_IF]));
    // The global address is usable at once (nodad); only the kernel's own
    // link-local address goes through DAD.
    let line = addrs.lines().find(|l| l.contains("fd00::3/128")).unwrap_or_else(|| panic!("{addrs}"));
    assert!(line.contains("nodad") && !line.contains("tentative"), "{addrs}");
    let o = p.client.exec(&["ping", "-6", "-c", "1", "-W", "2", "-I", CLIENT_IF, "fd00::2"]);
    ok_output(&o);
    let routes = ok_output(&p.client.exec(&["ip", "-6", "route", "show", "dev", CLIENT_IF]));
    assert!(has_line(&routes, "fd10::/64 via fd00::2 ", &["onlink"]), "{routes}");
    assert!(has_line(&routes, "fd00::2 ", &[]), "{routes}");
}

#[tokio::test]
async fn foreign_alias_is_name_taken_and_nothing_is_left() {
    let p = Pair::new();
    let (a, b) = p.ends("conn-x");
    ok_output(&p.client.exec(&["ip", "link", "add", CLIENT_IF, "type", "veth", "peer", "name", "other0"]));
    ok_output(&p.client.exec(&["ip", "link", "set", CLIENT_IF, "alias", "someone-else"]));

    let e = ensure_veth_pair(&a, &b).await.unwrap_err();
    match &e {
        KernelError::NameTaken { name, alias_found, netns } => {
            assert_eq!(name, CLIENT_IF);
            assert_eq!(alias_found, "someone-else");
            assert!(netns.contains(p.client.name()), "{netns}");
        }
        other => panic!("expected NameTaken, got {other}"),
    }
    // The foreign interface is untouched and nothing was created.
    let i = link_info(p.client.handle(), CLIENT_IF).await.unwrap().unwrap();
    assert_eq!(i.alias, "someone-else");
    assert!(link_info(p.client.handle(), "other0").await.unwrap().is_some());
    assert!(link_info(p.endpoint.handle(), ENDPOINT_IF).await.unwrap().is_none());
    // delete_link refuses to remove it under our alias.
    assert!(matches!(
        delete_link(p.client.handle(), CLIENT_IF, Some("server-conn-x")).await,
        Err(KernelError::NameTaken { .. })
    ));

    // Same on the endpoint side.
    let p2 = Pair::new();
    let (a, b) = p2.ends("conn-y");
    ok_output(&p2.endpoint.exec(&["ip", "link", "add", ENDPOINT_IF, "type", "veth", "peer", "name", "other0"]));
    let e = ensure_veth_pair(&a, &b).await.unwrap_err();
    assert!(matches!(&e, KernelError::NameTaken { alias_found, .. } if alias_found.is_empty()), "{e}");
    assert!(link_info(p2.client.handle(), CLIENT_IF).await.unwrap().is_none());
}

#[tokio::test]
async fn half_created_pair_is_recreated() {
    let p = Pair::new();
    let (a, b) = p.ends("conn-h");
    // Only the client end exists, with our alias (as after a crash), and its
    // peer is not the endpoint end.
    ok_output(&p.client.exec(&["ip", "link", "add", CLIENT_IF, "type", "veth", "peer", "name", "junk0"]));
    ok_output(&p.client.exec(&["ip", "link", "set", CLIENT_IF, "alias", "server-conn-h"]));
    let pair = ensure_veth_pair(&a, &b).await.unwrap();
    let ia = link_info(p.client.handle(), CLIENT_IF).await.unwrap().unwrap();
    assert_eq!(ia.kind.as_deref(), Some("veth"));
    assert_eq!(ia.index, pair.a_index);
    assert_eq!(ia.link, Some(pair.b_index));
    assert!(link_info(p.client.handle(), "junk0").await.unwrap().is_none(), "the stale end's peer went with it");
    let ib = link_info(p.endpoint.handle(), ENDPOINT_IF).await.unwrap().unwrap();
    assert_eq!(ib.alias, "client-conn-h");
}

#[tokio::test]
async fn overlong_names_are_rejected() {
    let long = "abcdefghijklmnop";
    assert_eq!(long.len(), 16);
    let e = validate_ifname(long).unwrap_err();
    assert!(e.to_string().contains(long), "{e}");

    let p = Pair::new();
    let (mut a, b) = p.ends("conn-l");
    a.name = long.into();
    let e = ensure_veth_pair(&a, &b).await.unwrap_err();
    assert!(matches!(&e, KernelError::InvalidName { name, .. } if name == long), "{e}");
    assert!(link_info(p.endpoint.handle(), ENDPOINT_IF).await.unwrap().is_none());
}

#[tokio::test]
async fn configuring_a_missing_interface_names_it() {
    let ns = TestNetns::new("fwdk");
    let e = apply_addresses(ns.handle(), "nsm-9", &[Cidr::parse("10.0.0.1/32").unwrap()]).await.unwrap_err();
    assert!(matches!(e, KernelError::LinkNotFound { .. }), "{e}");
    assert!(e.to_string().contains("nsm-9") && e.to_string().contains(ns.name()), "{e}");
    let r = ResolvedRoute { prefix: Cidr::parse("10.0.0.0/8").unwrap(), next_hop: Some(IpAddr::from([0u16; 8])) };
    let e = apply_routes(ns.handle(), "lo", &[r]).await.unwrap_err();
    assert!(matches!(e, KernelError::InvalidRoute { .. }), "{e}");
}
