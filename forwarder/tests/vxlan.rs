//! Real-kernel tests of the remote VXLAN plumbing (run as root): VXLAN
//! devices created in place in a "pod" namespace with their UDP socket in
//! a "node" namespace (`create_vxlan_in`, what the forwarder does), two
//! nodes joined by a veth underlay; and `move_and_rename`, which the kernel
//! WireGuard backend uses. Every namespace is a [`TestNetns`], deleted on
//! drop (also when an assertion fails); deleting a node namespace also
//! deletes every VXLAN device whose socket lives there, even those in pods.
//! Nothing runs in the test process's own namespace.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, UdpSocket};

use nsm_api::ext::{Cidr, ResolvedRoute};
use nsm_forwarder::kernel::{
    KernelError, VNI_MAX, VethEnd, VxlanSpec, apply_addresses, apply_routes, create_vxlan_in, delete_link,
    ensure_veth_pair, generate_vni, link_info, links_with_alias_prefix, move_and_rename, set_neighbor, underlay_mtu,
    validate_vni,
};
use nsm_sdk::testing::netns::TestNetns;
use nsm_sdk::testing::{ok_output, output_text};
use nsm_sdk::tools::netns::{NetnsHandle, all_netns};

const POD_IF: &str = "nsm-1";
const NODE1_IP: &str = "10.77.0.1";
const NODE2_IP: &str = "10.77.0.2";
const POD1_IP: &str = "172.16.7.1";
const POD2_IP: &str = "172.16.7.2";
const MAC1: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x07, 0x01];
const MAC2: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x07, 0x02];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Two node namespaces joined by a veth underlay (10.77.0.1/24 and
/// 10.77.0.2/24, MTU 1500) and one pod namespace per node.
struct Topo {
    n1: TestNetns,
    n2: TestNetns,
    p1: TestNetns,
    p2: TestNetns,
}

impl Topo {
    async fn new() -> Topo {
        let t = Topo {
            n1: TestNetns::new("fwvx"),
            n2: TestNetns::new("fwvx"),
            p1: TestNetns::new("fwvx"),
            p2: TestNetns::new("fwvx"),
        };
        let end = |ns: &TestNetns| VethEnd {
            netns: ns.handle().clone(),
            name: "ul0".into(),
            alias: "test-underlay".into(),
            mtu: Some(1500),
        };
        ensure_veth_pair(&end(&t.n1), &end(&t.n2)).await.unwrap();
        apply_addresses(t.n1.handle(), "ul0", &[Cidr::parse("10.77.0.1/24").unwrap()]).await.unwrap();
        apply_addresses(t.n2.handle(), "ul0", &[Cidr::parse("10.77.0.2/24").unwrap()]).await.unwrap();
        t
    }
}

fn spec(name: &str, vni: u32, local: &str, remote: &str, alias: &str, mac: Option<[u8; 6]>) -> VxlanSpec {
    VxlanSpec {
        name: name.into(),
        vni,
        local: ip(local),
        remote: ip(remote),
        port: 4789,
        mtu: 1450,
        mac,
        alias: alias.into(),
    }
}

/// Creates `s` in `pod` (socket in `node`) → address and a link route to
/// the peer; returns the ifindex in the pod.
async fn build(node: &TestNetns, pod: &TestNetns, s: &VxlanSpec, addr: &str, peer: &str) -> u32 {
    let idx = create_vxlan_in(node.handle(), pod.handle(), s).await.unwrap();
    apply_addresses(pod.handle(), POD_IF, &[Cidr::parse(&format!("{addr}/32")).unwrap()]).await.unwrap();
    let route = ResolvedRoute { prefix: Cidr::parse(&format!("{peer}/32")).unwrap(), next_hop: None };
    apply_routes(pod.handle(), POD_IF, &[route]).await.unwrap();
    idx
}

/// The standard two-pod tunnel with VNI `vni`.
async fn tunnel_pair(t: &Topo, vni: u32, macs: Option<([u8; 6], [u8; 6])>) -> (VxlanSpec, VxlanSpec) {
    let s1 = spec(POD_IF, vni, NODE1_IP, NODE2_IP, "nsm-vxtest-1", macs.map(|m| m.0));
    let s2 = spec(POD_IF, vni, NODE2_IP, NODE1_IP, "nsm-vxtest-2", macs.map(|m| m.1));
    build(&t.n1, &t.p1, &s1, POD1_IP, POD2_IP).await;
    build(&t.n2, &t.p2, &s2, POD2_IP, POD1_IP).await;
    (s1, s2)
}

fn ping(from: &TestNetns, to: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["ping", "-c", "1", "-W", "2"];
    args.extend_from_slice(extra);
    args.push(to);
    from.exec(&args)
}

/// VXLAN devices in `ns`, from `ip -d link show type vxlan`.
fn vxlan_devices(ns: &TestNetns) -> String {
    ok_output(&ns.exec(&["ip", "-o", "-d", "link", "show", "type", "vxlan"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_between_two_nodes_pings_both_ways() {
    let t = Topo::new().await;
    tunnel_pair(&t, 4242, None).await;

    // Nothing in the node but the underlay; the pod's interface is the
    // tunnel device itself, with our alias, MTU and up, its socket in the
    // node (link-netns).
    assert!(vxlan_devices(&t.n1).trim().is_empty());
    let l = link_info(t.p1.handle(), POD_IF).await.unwrap().expect("nsm-1 in pod 1");
    assert_eq!(l.kind.as_deref(), Some("vxlan"));
    assert_eq!(l.alias, "nsm-vxtest-1");
    assert_eq!(l.mtu, Some(1450));
    assert!(l.admin_up);

    ok_output(&ping(&t.p1, POD2_IP, &[]));
    ok_output(&ping(&t.p2, POD1_IP, &[]));

    let d = ok_output(&t.p1.exec(&["ip", "-d", "link", "show", POD_IF]));
    for needle in [
        "vxlan id 4242",
        "remote 10.77.0.2",
        "local 10.77.0.1",
        "dstport 4789",
        "nolearning",
        &format!("link-netns {}", t.n1.name()),
    ] {
        assert!(d.contains(needle), "{needle:?} missing in:\n{d}");
    }

    assert_eq!(underlay_mtu(t.n1.handle(), ip(NODE1_IP)).await.unwrap(), 1500);
    let e = underlay_mtu(t.n1.handle(), ip("10.77.0.9")).await.unwrap_err();
    assert!(matches!(e, KernelError::UnderlayNotFound { .. }), "{e}");
    assert!(e.to_string().contains("10.77.0.9") && e.to_string().contains(t.n1.name()), "{e}");

    let found = links_with_alias_prefix(t.p1.handle(), "nsm-vxtest").await.unwrap();
    assert_eq!(found, vec![(POD_IF.to_string(), "nsm-vxtest-1".to_string(), l.index, Some("vxlan".to_string()))]);
    assert!(links_with_alias_prefix(t.p1.handle(), "nsm-other").await.unwrap().is_empty());
    // The underlay is found by its own alias; links without alias never are.
    let ul = links_with_alias_prefix(t.n1.handle(), "").await.unwrap();
    assert_eq!(ul.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(), vec!["ul0"], "{ul:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_mtu_with_dont_fragment() {
    let t = Topo::new().await;
    tunnel_pair(&t, 77, None).await;
    // 1450 - 20 (IPv4) - 8 (ICMP) = 1422 bytes of payload fit exactly.
    ok_output(&ping(&t.p1, POD2_IP, &["-M", "do", "-s", "1422"]));
    ok_output(&ping(&t.p2, POD1_IP, &["-M", "do", "-s", "1422"]));
    let o = ping(&t.p1, POD2_IP, &["-M", "do", "-s", "1423"]);
    let out = output_text(&o);
    assert!(!o.status.success(), "a 1451-byte packet with DF must not pass: {out}");
    assert!(!out.contains("bytes from"), "no reply expected: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_ip_payload_with_permanent_neighbours() {
    let t = Topo::new().await;
    tunnel_pair(&t, 1001, Some((MAC1, MAC2))).await;
    for (pod, mac) in [(&t.p1, "02:00:00:00:07:01"), (&t.p2, "02:00:00:00:07:02")] {
        let l = ok_output(&pod.exec(&["ip", "-o", "link", "show", POD_IF]));
        assert!(l.contains(&format!("link/ether {mac}")), "{l}");
        // No ARP at all on the tunnel: only the permanent entries can resolve.
        ok_output(&pod.exec(&["ip", "link", "set", POD_IF, "arp", "off"]));
    }
    // A wrong entry first, then the right one: replace semantics.
    set_neighbor(t.p1.handle(), POD_IF, ip(POD2_IP), MAC1).await.unwrap();
    set_neighbor(t.p1.handle(), POD_IF, ip(POD2_IP), MAC2).await.unwrap();
    set_neighbor(t.p1.handle(), POD_IF, ip(POD2_IP), MAC2).await.unwrap();
    set_neighbor(t.p2.handle(), POD_IF, ip(POD1_IP), MAC1).await.unwrap();

    ok_output(&ping(&t.p1, POD2_IP, &[]));
    ok_output(&ping(&t.p2, POD1_IP, &[]));

    let l = ok_output(&t.p1.exec(&["ip", "-o", "link", "show", POD_IF]));
    assert!(l.contains("NOARP"), "{l}");
    let n = ok_output(&t.p1.exec(&["ip", "neigh", "show", "dev", POD_IF]));
    assert!(n.lines().any(|l| l.starts_with("172.16.7.2 lladdr 02:00:00:00:07:02 PERMANENT")), "{n}");
    assert_eq!(n.lines().filter(|l| !l.trim().is_empty()).count(), 1, "only the static entry: {n}");
    let n = ok_output(&t.p2.exec(&["ip", "neigh", "show", "dev", POD_IF]));
    assert!(n.lines().any(|l| l.starts_with("172.16.7.1 lladdr 02:00:00:00:07:01 PERMANENT")), "{n}");

    let e = set_neighbor(t.p1.handle(), "nope0", ip(POD2_IP), MAC2).await.unwrap_err();
    assert!(matches!(e, KernelError::LinkNotFound { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_created_in_place_is_idempotent_and_repaired() {
    let t = Topo::new().await;
    let s = spec(POD_IF, 300, NODE1_IP, NODE2_IP, "nsm-vxtest-idem", Some(MAC1));
    let a = create_vxlan_in(t.n1.handle(), t.p1.handle(), &s).await.unwrap();
    let b = create_vxlan_in(t.n1.handle(), t.p1.handle(), &s).await.unwrap();
    assert_eq!(a, b);

    // Drift (MTU, down) is repaired without recreating.
    ok_output(&t.p1.exec(&["ip", "link", "set", POD_IF, "down", "mtu", "1400"]));
    assert_eq!(create_vxlan_in(t.n1.handle(), t.p1.handle(), &s).await.unwrap(), a);
    let l = link_info(t.p1.handle(), POD_IF).await.unwrap().unwrap();
    assert_eq!((l.mtu, l.admin_up, l.index, l.alias.as_str()), (Some(1450), true, a, "nsm-vxtest-idem"));

    // Ours with other parameters: replaced.
    let other = VxlanSpec { remote: ip("10.77.0.3"), ..s.clone() };
    create_vxlan_in(t.n1.handle(), t.p1.handle(), &other).await.unwrap();
    let d = vxlan_devices(&t.p1);
    assert!(d.contains("remote 10.77.0.3") && !d.contains("remote 10.77.0.2"), "{d}");
    create_vxlan_in(t.n1.handle(), t.p1.handle(), &s).await.unwrap();
    assert!(vxlan_devices(&t.p1).contains("remote 10.77.0.2"));
    assert!(vxlan_devices(&t.n1).trim().is_empty(), "nothing ever lands in the node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_and_rename_is_idempotent_and_reassigns_a_taken_ifindex() {
    let t = Topo::new().await;
    ok_output(&t.n1.exec(&["ip", "link", "add", "mv-a", "type", "veth", "peer", "name", "mv-b"]));
    ok_output(&t.n1.exec(&["ip", "link", "set", "mv-a", "alias", "nsm-vxtest-mv"]));
    let a = link_info(t.n1.handle(), "mv-a").await.unwrap().unwrap().index;
    let i1 = move_and_rename(t.n1.handle(), "mv-a", t.p1.handle(), POD_IF, "nsm-vxtest-mv").await.unwrap();
    let i2 = move_and_rename(t.n1.handle(), "mv-a", t.p1.handle(), POD_IF, "nsm-vxtest-mv").await.unwrap();
    assert_eq!(i1, i2);
    // The ifindex was free in the pod, so the kernel kept it.
    assert_eq!(i1, a);
    let l = link_info(t.p1.handle(), POD_IF).await.unwrap().unwrap();
    assert_eq!((l.index, l.alias.as_str(), l.admin_up), (i1, "nsm-vxtest-mv", true));
    assert!(link_info(t.n1.handle(), "mv-a").await.unwrap().is_none());

    // Nothing to move and nothing in the pod: the source is named.
    let e = move_and_rename(t.n1.handle(), "mv-none", t.p1.handle(), "nsm-9", "nsm-vxtest-mv").await.unwrap_err();
    assert!(matches!(&e, KernelError::LinkNotFound { name, .. } if name == "mv-none"), "{e}");

    // An ifindex taken in the target is reassigned.
    ok_output(&t.n1.exec(&["ip", "link", "add", "mv-c", "type", "veth", "peer", "name", "mv-d"]));
    let c = link_info(t.n1.handle(), "mv-c").await.unwrap().unwrap().index;
    let idx = c.to_string();
    ok_output(&t.p2.exec(&[
        "ip",
        "link",
        "add",
        "blocker",
        "index",
        &idx,
        "type",
        "veth",
        "peer",
        "name",
        "blocker-p",
    ]));
    let b = move_and_rename(t.n1.handle(), "mv-c", t.p2.handle(), POD_IF, "nsm-vxtest-mv2").await.unwrap();
    assert_ne!(c, b, "the pod already uses ifindex {c}");
    let l = link_info(t.p2.handle(), POD_IF).await.unwrap().unwrap();
    assert_eq!((l.index, l.alias.as_str()), (b, "nsm-vxtest-mv2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_name_collisions_leave_nothing_behind() {
    let t = Topo::new().await;
    let s = spec(POD_IF, 400, NODE1_IP, NODE2_IP, "nsm-vxtest-col", None);

    // nsm-1 already in the pod, not ours (no alias).
    ok_output(&t.p1.exec(&["ip", "link", "add", POD_IF, "type", "veth", "peer", "name", "nsm-1p"]));
    let e = create_vxlan_in(t.n1.handle(), t.p1.handle(), &s).await.unwrap_err();
    match &e {
        KernelError::NameTaken { netns, name, alias_found } => {
            assert_eq!(name, POD_IF);
            assert!(netns.contains(t.p1.name()), "{netns}");
            assert!(alias_found.is_empty());
        }
        other => panic!("expected NameTaken, got {other}"),
    }
    // The pod's nsm-1 is untouched; no VXLAN device anywhere.
    assert_eq!(link_info(t.p1.handle(), POD_IF).await.unwrap().unwrap().kind.as_deref(), Some("veth"));
    assert!(vxlan_devices(&t.p1).trim().is_empty());
    assert!(vxlan_devices(&t.n1).trim().is_empty());

    // A device of that name in the *node* is no collision: nothing is ever
    // named there.
    ok_output(&t.n1.exec(&["ip", "link", "add", POD_IF, "type", "veth", "peer", "name", "nsm-1q"]));
    ok_output(&t.n1.exec(&["ip", "link", "set", POD_IF, "alias", "someone-else"]));
    create_vxlan_in(t.n1.handle(), t.p2.handle(), &s).await.unwrap();
    assert_eq!(link_info(t.p2.handle(), POD_IF).await.unwrap().unwrap().kind.as_deref(), Some("vxlan"));
    assert_eq!(link_info(t.n1.handle(), POD_IF).await.unwrap().unwrap().alias, "someone-else");

    // A move onto a name with a foreign alias is refused, and the device stays.
    ok_output(&t.n1.exec(&["ip", "link", "add", "mv-x", "type", "veth", "peer", "name", "mv-y"]));
    ok_output(&t.n1.exec(&["ip", "link", "set", "mv-x", "alias", "someone-else"]));
    let e = move_and_rename(t.n1.handle(), "mv-x", t.p2.handle(), "nsm-2", &s.alias).await.unwrap_err();
    assert!(matches!(&e, KernelError::NameTaken { netns, .. } if netns.contains(t.n1.name())), "{e}");
    assert!(link_info(t.n1.handle(), "mv-x").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_invalid_vni_is_refused_before_the_kernel() {
    let t = Topo::new().await;
    for vni in [0, 1 << 24] {
        let s = spec(POD_IF, vni, NODE1_IP, NODE2_IP, "nsm-vxtest-bad", None);
        let e = create_vxlan_in(t.n1.handle(), t.p1.handle(), &s).await.unwrap_err();
        assert!(matches!(e, KernelError::InvalidVni { vni: v } if v == vni), "{e}");
        assert!(e.to_string().contains(&vni.to_string()), "{e}");
    }
    assert!(vxlan_devices(&t.p1).trim().is_empty());
    assert_eq!(validate_vni(VNI_MAX).unwrap(), VNI_MAX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_duplicate_vni_on_the_same_port_is_refused() {
    let t = Topo::new().await;
    let a = spec(POD_IF, 5000, NODE1_IP, NODE2_IP, "nsm-vxtest-a", None);
    create_vxlan_in(t.n1.handle(), t.p1.handle(), &a).await.unwrap();

    // Same VNI and port towards another remote, from the same node (socket
    // namespace), into another pod: the kernel says EEXIST.
    let b = spec(POD_IF, 5000, NODE1_IP, "10.77.0.3", "nsm-vxtest-b", None);
    let e = create_vxlan_in(t.n1.handle(), t.p2.handle(), &b).await.unwrap_err();
    match &e {
        KernelError::VniInUse { vni, port, netns, name, .. } => {
            assert_eq!((*vni, *port, name.as_str()), (5000, 4789, POD_IF));
            assert!(netns.contains(t.n1.name()), "the socket's namespace is named: {netns}");
        }
        other => panic!("expected VniInUse, got {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("5000") && msg.contains("4789"), "{msg}");
    assert!(link_info(t.p2.handle(), POD_IF).await.unwrap().is_none());

    // Another local address does not help either.
    let c = VxlanSpec { local: ip("10.77.0.5"), ..b.clone() };
    assert!(matches!(create_vxlan_in(t.n1.handle(), t.p2.handle(), &c).await, Err(KernelError::VniInUse { .. })));

    // Same VNI on another port, or in the other family: accepted.
    let d = VxlanSpec { name: "nsm-2".into(), port: 4790, ..b.clone() };
    create_vxlan_in(t.n1.handle(), t.p2.handle(), &d).await.unwrap();
    let v6 = VxlanSpec { name: "nsm-3".into(), local: ip("fd00:77::1"), remote: ip("fd00:77::2"), ..b.clone() };
    create_vxlan_in(t.n1.handle(), t.p2.handle(), &v6).await.unwrap();
    let v6d = ok_output(&t.p2.exec(&["ip", "-d", "link", "show", "nsm-3"]));
    assert!(v6d.contains("noudp6zerocsumtx") && v6d.contains("noudp6zerocsumrx"), "{v6d}");

    // The VNI is free again once the first device is deleted.
    assert!(delete_link(t.p1.handle(), POD_IF, Some(&a.alias)).await.unwrap());
    create_vxlan_in(t.n1.handle(), t.p2.handle(), &b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_port_in_use_is_reported_and_cleaned_up() {
    let t = Topo::new().await;
    let s = spec(POD_IF, 600, NODE1_IP, NODE2_IP, "nsm-vxtest-port", None);
    let sock = t.n1.handle().run(|| UdpSocket::bind("10.77.0.1:4789")).await.unwrap().unwrap();

    let e = create_vxlan_in(t.n1.handle(), t.p1.handle(), &s).await.unwrap_err();
    match &e {
        KernelError::PortInUse { port, name, .. } => assert_eq!((*port, name.as_str()), (4789, POD_IF)),
        other => panic!("expected PortInUse, got {other}"),
    }
    assert!(e.to_string().contains("4789"), "{e}");
    assert!(link_info(t.p1.handle(), POD_IF).await.unwrap().is_none(), "the half-built device is removed");
    assert!(vxlan_devices(&t.n1).trim().is_empty());

    drop(sock);
    create_vxlan_in(t.n1.handle(), t.p1.handle(), &s).await.unwrap();
}

#[test]
fn generate_vni_parity_range_and_taken() {
    let lo = ip("10.0.0.1");
    let hi = ip("10.0.0.2");
    for _ in 0..2000 {
        let v = generate_vni(lo, hi, |_| false);
        assert!(v != 0 && v <= VNI_MAX && v % 2 == 0, "{v}");
        let v = generate_vni(hi, lo, |_| false);
        assert!(v != 0 && v <= VNI_MAX && v % 2 == 1, "{v}");
    }
    // Equal IPs: compare == 0 ⇒ even. Go compares 16-byte forms, so IPv4
    // (::ffff:a.b.c.d) sorts above ::1 and below fd00::.
    assert_eq!(generate_vni(lo, lo, |_| false) % 2, 0);
    assert_eq!(generate_vni(lo, ip("fd00::1"), |_| false) % 2, 0);
    assert_eq!(generate_vni(ip("fd00::1"), lo, |_| false) % 2, 1);
    assert_eq!(generate_vni(ip("::1"), lo, |_| false) % 2, 0);

    // `taken` is respected: every value but one of the parity refused.
    assert_eq!(generate_vni(lo, hi, |v| v != 42), 42);
    assert_eq!(generate_vni(hi, lo, |v| v != VNI_MAX), VNI_MAX);
    for _ in 0..200 {
        let v = generate_vni(lo, hi, |v| v % 4 == 0);
        assert_eq!(v % 4, 2);
    }
    // Everything refused: still terminates, never 0, right parity.
    let v = generate_vni(lo, hi, |_| true);
    assert!(v != 0 && v % 2 == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_netns_finds_test_namespace_by_inode() {
    let ns = TestNetns::new("fwvxall");
    let want = ns.handle().inode();
    let own = NetnsHandle::current().unwrap().inode();
    let found = tokio::task::spawn_blocking(all_netns).await.unwrap();
    assert!(found.iter().any(|h| h.inode() == want), "test netns {} not found", ns.name());
    assert!(found.iter().any(|h| h.inode() == own), "own netns not found");
    let mut inodes: Vec<u64> = found.iter().map(|h| h.inode()).collect();
    inodes.sort_unstable();
    let n = inodes.len();
    inodes.dedup();
    assert_eq!(n, inodes.len(), "duplicates in all_netns()");
    // The named namespace is found through its bind mount.
    let named = found.iter().find(|h| h.inode() == want).unwrap();
    assert!(named.describe().contains(ns.name()), "{}", named.describe());
}

/// Documents what the kernel does with one request carrying both
/// `IFLA_NET_NS_FD` and `IFLA_IFNAME` (`ip link set X netns Y name Z` sends
/// exactly that), which is why `move_and_rename` checks the new name first
/// and rolls back on failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_move_rename_is_not_atomic_and_keeps_the_alias() {
    let t = Topo::new().await;
    let veth = |name: &str, alias: &str| {
        ok_output(&t.n1.exec(&["ip", "link", "add", name, "type", "veth", "peer", "name", &format!("{name}p")]));
        ok_output(&t.n1.exec(&["ip", "link", "set", name, "alias", alias]));
    };
    veth("vxt-k1", "nsm-vxtest-k1");
    ok_output(&t.n1.exec(&["ip", "link", "set", "vxt-k1", "netns", t.p1.name(), "name", "nsm-k1"]));
    // Moved and renamed; the alias survived the move.
    let l = link_info(t.p1.handle(), "nsm-k1").await.unwrap().unwrap();
    assert_eq!(l.alias, "nsm-vxtest-k1");
    assert!(!l.admin_up, "a moved device is down until set up again");

    // New name taken in the target: the request fails with EEXIST, but the
    // device has been moved anyway, under its old name.
    veth("vxt-k2", "nsm-vxtest-k2");
    ok_output(&t.p1.exec(&["ip", "link", "add", "nsm-k2", "type", "veth", "peer", "name", "nsm-k2p"]));
    let o = t.n1.exec(&["ip", "link", "set", "vxt-k2", "netns", t.p1.name(), "name", "nsm-k2"]);
    assert!(!o.status.success() && output_text(&o).contains("File exists"), "{}", output_text(&o));
    assert!(link_info(t.n1.handle(), "vxt-k2").await.unwrap().is_none());
    let stray = link_info(t.p1.handle(), "vxt-k2").await.unwrap().expect("moved under the old name");
    assert_eq!(stray.kind.as_deref(), Some("veth"));
}

/// A device without alias (e.g. a TUN made by a library) can be moved and
/// gets our alias; one with a foreign alias cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_adopts_an_aliasless_device() {
    let t = Topo::new().await;
    ok_output(&t.n1.exec(&["ip", "link", "add", "tmp-a", "type", "veth", "peer", "name", "tmp-b"]));
    let i = move_and_rename(t.n1.handle(), "tmp-a", t.p1.handle(), "nsm-7", "nsm-vxtest-adopt").await.unwrap();
    let l = link_info(t.p1.handle(), "nsm-7").await.unwrap().unwrap();
    assert_eq!((l.index, l.alias.as_str(), l.admin_up), (i, "nsm-vxtest-adopt", true));
    assert!(link_info(t.n1.handle(), "tmp-a").await.unwrap().is_none());
    // Same namespace: a plain rename.
    let j = move_and_rename(t.p1.handle(), "nsm-7", t.p1.handle(), "nsm-8", "nsm-vxtest-adopt").await.unwrap();
    assert_eq!(j, i);
    assert!(link_info(t.p1.handle(), "nsm-8").await.unwrap().is_some());
}
