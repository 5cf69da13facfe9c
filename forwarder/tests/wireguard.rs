//! Real-kernel tests of the embedded userspace WireGuard backend (run as
//! root; the kernel needs TUN, not WireGuard). Every test builds its own
//! "node" and "pod" namespaces ([`TestNetns`], deleted on drop), uses
//! device names made unique per process (the UAPI socket path is global),
//! and closes its devices on drop, so nothing is left behind, also when an
//! assertion fails.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use nsm_forwarder::wireguard::{
    Key, KeyPair, PeerUpdate, Userspace, WgBackend, WgConfig, WgDevice, WgError, cleanup_stale_sockets, socket_path,
};
use nsm_sdk::testing::netns::TestNetns;
use nsm_sdk::testing::{eventually, output_text};

const MTU: u32 = 1420;

/// `wt<pid % 100000><suffix>`: unique per test process and test.
fn dev_name(suffix: &str) -> String {
    format!("wt{}{suffix}", std::process::id() % 100_000)
}

/// Runs `args` inside `ns`; panics with the output if it fails.
fn ok(ns: &TestNetns, args: &[&str]) -> String {
    let o = ns.exec(args);
    assert!(o.status.success(), "`{}` in {} failed: {}", args.join(" "), ns.name(), output_text(&o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Two node namespaces joined by a veth pair, `10.<net>.0.1/24` and `.2`.
struct Underlay {
    a: TestNetns,
    b: TestNetns,
}

impl Underlay {
    fn new(net: u8) -> Underlay {
        let u = Underlay { a: TestNetns::new("fwdwg"), b: TestNetns::new("fwdwg") };
        ok(&u.a, &["ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1", "netns", u.b.name()]);
        ok(&u.a, &["ip", "addr", "add", &format!("10.{net}.0.1/24"), "dev", "ul0"]);
        ok(&u.b, &["ip", "addr", "add", &format!("10.{net}.0.2/24"), "dev", "ul1"]);
        ok(&u.a, &["ip", "link", "set", "ul0", "up"]);
        ok(&u.b, &["ip", "link", "set", "ul1", "up"]);
        u
    }
}

fn cfg(private: &Key, port: u16, peer: &Key, endpoint: Option<&str>, allowed: &[&str]) -> WgConfig {
    WgConfig {
        private_key: private.clone(),
        listen_port: port,
        peer_public_key: peer.clone(),
        peer_endpoint: endpoint.map(|e| e.parse::<SocketAddr>().unwrap()),
        allowed_ips: allowed.iter().map(|a| a.parse::<IpNetwork>().unwrap()).collect(),
        persistent_keepalive: None,
        mtu: MTU,
        tun_in: None,
    }
}

/// Creates a userspace device on a thread inside `ns` (the node netns).
async fn create_in(ns: &TestNetns, name: &str, c: WgConfig) -> Result<Box<dyn WgDevice>, WgError> {
    let name = name.to_string();
    ns.handle().run(move || Userspace.create(&name, &c)).await.unwrap()
}

/// Moves `dev` from `node` into `pod` as `nsm-1`, with `addr/32` and a
/// route to `peer/32`.
fn move_to_pod(node: &TestNetns, dev: &str, pod: &TestNetns, addr: &str, peer: &str) {
    ok(node, &["ip", "link", "set", dev, "netns", pod.name(), "name", "nsm-1"]);
    ok(pod, &["ip", "addr", "add", &format!("{addr}/32"), "dev", "nsm-1"]);
    ok(pod, &["ip", "link", "set", "nsm-1", "up"]);
    ok(pod, &["ip", "route", "add", &format!("{peer}/32"), "dev", "nsm-1"]);
}

/// Pings `to` from `ns` (3 probes); returns the average RTT in ms.
fn ping(ns: &TestNetns, to: &str) -> f64 {
    let out = ok(ns, &["ping", "-c", "3", "-i", "0.2", "-W", "3", to]);
    // rtt min/avg/max/mdev = 0.123/0.456/0.789/0.012 ms
    let stats = out.lines().find(|l| l.contains("min/avg/max")).unwrap_or_else(|| panic!("no rtt line: {out}"));
    let nums = stats.split('=').nth(1).unwrap().trim();
    nums.split('/').nth(1).unwrap().parse().unwrap()
}

/// Threads of this process whose name contains `needle`.
fn threads_named(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.contains(needle))
        .collect()
}

fn link_exists(ns: &TestNetns, name: &str) -> bool {
    ns.exec(&["ip", "link", "show", "dev", name]).status.success()
}

#[tokio::test]
async fn two_nodes_pods_ping_and_mtu() {
    let u = Underlay::new(71);
    let (pod_a, pod_b) = (TestNetns::new("fwdwg"), TestNetns::new("fwdwg"));
    let (ka, kb) = (KeyPair::generate(), KeyPair::generate());
    let (na, nb) = (dev_name("p1"), dev_name("p2"));
    let dev_a = create_in(&u.a, &na, cfg(&ka.private, 51820, &kb.public, Some("10.71.0.2:51820"), &["172.16.1.2/32"]))
        .await
        .unwrap();
    let dev_b = create_in(&u.b, &nb, cfg(&kb.private, 51820, &ka.public, Some("10.71.0.1:51820"), &["172.16.1.1/32"]))
        .await
        .unwrap();
    assert_eq!((dev_a.id().name.as_str(), dev_a.id().port), (na.as_str(), 51820));
    assert_eq!(dev_a.public_key(), ka.public);
    assert!(dev_a.id().ifindex > 0);
    // The TUN is in the node netns with the MTU asked for.
    let shown = ok(&u.a, &["ip", "-o", "link", "show", "dev", &na]);
    assert!(shown.contains(&format!("mtu {MTU}")) && shown.contains(&format!("{}:", dev_a.id().ifindex)), "{shown}");
    assert!(dev_a.stats().last_handshake.is_none());

    move_to_pod(&u.a, &na, &pod_a, "172.16.1.1", "172.16.1.2");
    move_to_pod(&u.b, &nb, &pod_b, "172.16.1.2", "172.16.1.1");
    assert!(!link_exists(&u.a, &na), "moved away from the node netns");

    let rtt_ab = ping(&pod_a, "172.16.1.2");
    let rtt_ba = ping(&pod_b, "172.16.1.1");
    println!("ping RTT pod A -> B avg {rtt_ab:.3} ms, B -> A avg {rtt_ba:.3} ms");

    // MTU-sized packet with DF passes, one byte more fails cleanly at the
    // sender (EMSGSIZE, "message too long"), not somewhere in the tunnel.
    let payload = (MTU - 28).to_string();
    ok(&pod_a, &["ping", "-M", "do", "-s", &payload, "-c", "2", "-i", "0.2", "-W", "3", "172.16.1.2"]);
    let too_big = (MTU - 27).to_string();
    let o = pod_a.exec(&["ping", "-M", "do", "-s", &too_big, "-c", "1", "-W", "2", "172.16.1.2"]);
    assert!(!o.status.success(), "{}", output_text(&o));
    let t = output_text(&o);
    assert!(t.contains("too long") && t.contains(&format!("mtu={MTU}")), "{t}");
    // The tunnel still works afterwards.
    ping(&pod_a, "172.16.1.2");

    let st = dev_a.stats();
    assert!(st.tx_bytes > 3000 && st.rx_bytes > 3000, "{st:?}");
    let age = st.last_handshake.unwrap().elapsed().unwrap();
    assert!(age < Duration::from_secs(30), "{age:?}");
    // wg show works on the node side (the socket path is global).
    let show = ok(&u.a, &["wg", "show", &na]);
    assert!(show.contains(&ka.public.to_base64()) && show.contains("latest handshake"), "{show}");
    assert!(show.contains("endpoint: 10.71.0.2:51820") && show.contains("allowed ips: 172.16.1.2/32"), "{show}");
    dev_a.close();
    dev_b.close();
    assert!(!link_exists(&pod_a, "nsm-1") && !link_exists(&pod_b, "nsm-1"));
}

/// The TUN created in place in the pod (`tun_in`): the pod gets `nsm-1`
/// directly, the UDP socket stays in the node netns, nothing is moved.
#[tokio::test]
async fn tun_created_in_place_in_the_pod() {
    let u = Underlay::new(72);
    let (pod_a, pod_b) = (TestNetns::new("fwdwg"), TestNetns::new("fwdwg"));
    let (ka, kb) = (KeyPair::generate(), KeyPair::generate());
    let (na, nb) = (dev_name("i1"), dev_name("i2"));
    let mut ca = cfg(&ka.private, 51820, &kb.public, Some("10.72.0.2:51820"), &["172.16.2.2/32"]);
    ca.tun_in = Some((pod_a.handle().clone(), "nsm-1".into()));
    let mut cb = cfg(&kb.private, 51820, &ka.public, Some("10.72.0.1:51820"), &["172.16.2.1/32"]);
    cb.tun_in = Some((pod_b.handle().clone(), "nsm-1".into()));
    let dev_a = create_in(&u.a, &na, ca).await.unwrap();
    let dev_b = create_in(&u.b, &nb, cb).await.unwrap();
    assert!(link_exists(&pod_a, "nsm-1") && !link_exists(&u.a, &na), "born in the pod, never in the node");
    assert!(ok(&u.a, &["ss", "-uln"]).contains(":51820"), "the UDP socket lives in the node netns");
    for (pod, me, peer) in [(&pod_a, "172.16.2.1", "172.16.2.2"), (&pod_b, "172.16.2.2", "172.16.2.1")] {
        ok(pod, &["ip", "addr", "add", &format!("{me}/32"), "dev", "nsm-1"]);
        ok(pod, &["ip", "route", "add", &format!("{peer}/32"), "dev", "nsm-1"]);
    }
    ping(&pod_a, "172.16.2.2");
    ping(&pod_b, "172.16.2.1");
    assert!(ok(&u.a, &["wg", "show", &na]).contains("latest handshake"));
    // A name taken in the pod is refused and leaves nothing behind.
    let kc = KeyPair::generate();
    let mut cc = cfg(&kc.private, 51821, &kb.public, None, &[]);
    cc.tun_in = Some((pod_a.handle().clone(), "nsm-1".into()));
    let nc = dev_name("i3");
    let e = create_in(&u.a, &nc, cc).await.err().unwrap();
    assert!(matches!(e, WgError::NameTaken { .. }), "{e}");
    assert!(!std::path::Path::new(&format!("/var/run/wireguard/{nc}.sock")).exists());
    dev_a.close();
    dev_b.close();
    assert!(!link_exists(&pod_a, "nsm-1") && !link_exists(&pod_b, "nsm-1"));
}

/// wireguard-go in a namespace; killed (and its socket removed) on drop.
struct WgGo {
    child: Child,
    name: String,
}

impl WgGo {
    fn start(ns: &TestNetns, name: &str) -> WgGo {
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "wireguard-go", "-f", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running wireguard-go (apt install wireguard-go)");
        let g = WgGo { child, name: name.to_string() };
        assert!(
            eventually(Duration::from_secs(10), || Path::new(&socket_path(name)).exists()),
            "wireguard-go did not create its socket"
        );
        g
    }
}

impl Drop for WgGo {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(socket_path(&self.name));
    }
}

#[tokio::test]
async fn interop_with_wireguard_go_and_wg_tools() {
    let u = Underlay::new(72);
    let ours = dev_name("i1");
    let theirs = dev_name("g1");
    let (k_ours, k_go) = (KeyPair::generate(), KeyPair::generate());
    let go = WgGo::start(&u.b, &theirs);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("go.key");
    std::fs::write(&key_file, format!("{}\n", k_go.private.to_base64())).unwrap();
    ok(
        &u.b,
        &[
            "wg",
            "set",
            &theirs,
            "private-key",
            key_file.to_str().unwrap(),
            "listen-port",
            "51821",
            "peer",
            &k_ours.public.to_base64(),
            "endpoint",
            "10.72.0.1:51820",
            "allowed-ips",
            "172.16.2.1/32",
        ],
    );
    ok(&u.b, &["ip", "addr", "add", "172.16.2.2/32", "dev", &theirs]);
    ok(&u.b, &["ip", "link", "set", &theirs, "up"]);
    ok(&u.b, &["ip", "route", "add", "172.16.2.1/32", "dev", &theirs]);

    let dev =
        create_in(&u.a, &ours, cfg(&k_ours.private, 51820, &k_go.public, Some("10.72.0.2:51821"), &["172.16.2.2/32"]))
            .await
            .unwrap();
    ok(&u.a, &["ip", "addr", "add", "172.16.2.1/32", "dev", &ours]);
    ok(&u.a, &["ip", "route", "add", "172.16.2.2/32", "dev", &ours]);

    let rtt_out = ping(&u.a, "172.16.2.2");
    let rtt_in = ping(&u.b, "172.16.2.1");
    println!("ping RTT ours -> wireguard-go avg {rtt_out:.3} ms, back {rtt_in:.3} ms");

    // wg show / showconf against our UAPI socket.
    let show = ok(&u.a, &["wg", "show", &ours]);
    assert!(show.contains(&format!("public key: {}", k_ours.public.to_base64())), "{show}");
    assert!(show.contains("listening port: 51820"), "{show}");
    assert!(show.contains(&format!("peer: {}", k_go.public.to_base64())), "{show}");
    let hs = show.lines().find(|l| l.contains("latest handshake")).unwrap_or_else(|| panic!("{show}"));
    // "Now" or "N seconds ago": absolute time done right (boringtun's own
    // device shows "56 years ago" here).
    assert!((hs.contains("second") || hs.contains("Now")) && !hs.contains("year") && !hs.contains("minute"), "{hs}");
    assert!(show.contains("transfer:"), "{show}");
    let conf = ok(&u.a, &["wg", "showconf", &ours]);
    for want in [
        format!("PrivateKey = {}", k_ours.private.to_base64()),
        "ListenPort = 51820".into(),
        format!("PublicKey = {}", k_go.public.to_base64()),
        "AllowedIPs = 172.16.2.2/32".into(),
        "Endpoint = 10.72.0.2:51821".into(),
    ] {
        assert!(conf.contains(&want), "{want:?} missing in\n{conf}");
    }
    // wireguard-go sees our handshake too.
    let theirs_show = ok(&u.b, &["wg", "show", &theirs, "latest-handshakes"]);
    assert!(!theirs_show.trim().ends_with("\t0"), "{theirs_show}");

    // wg set: keepalive and allowed IPs on the existing peer work; a second
    // peer and another listen port are refused with an errno.
    ok(
        &u.a,
        &[
            "wg",
            "set",
            &ours,
            "peer",
            &k_go.public.to_base64(),
            "persistent-keepalive",
            "7",
            "allowed-ips",
            "172.16.2.2/32,172.16.9.0/24",
        ],
    );
    let show = ok(&u.a, &["wg", "show", &ours]);
    assert!(show.contains("every 7 seconds") && show.contains("172.16.9.0/24"), "{show}");
    let other = KeyPair::generate().public.to_base64();
    let o = u.a.exec(&["wg", "set", &ours, "peer", &other, "allowed-ips", "10.9.9.9/32"]);
    assert!(!o.status.success(), "a second peer must be refused: {}", output_text(&o));
    let o = u.a.exec(&["wg", "set", &ours, "listen-port", "40000"]);
    assert!(!o.status.success(), "a port change must be refused: {}", output_text(&o));
    // The API refresh replaces the allowed IPs again.
    let update = PeerUpdate { endpoint: None, allowed_ips: vec!["172.16.2.2/32".parse().unwrap()], keepalive: Some(0) };
    dev.update_peer(&update).unwrap();
    let show = ok(&u.a, &["wg", "show", &ours]);
    assert!(!show.contains("172.16.9.0/24") && !show.contains("keepalive"), "{show}");
    ping(&u.a, "172.16.2.2");
    let st = dev.stats();
    assert!(st.last_handshake.is_some() && st.rx_bytes > 0 && st.tx_bytes > 0, "{st:?}");

    dev.close();
    drop(go);
    assert!(!socket_path(&ours).exists() && !socket_path(&theirs).exists());
}

#[tokio::test]
async fn close_port_in_use_names_and_stale_sockets() {
    let node = TestNetns::new("fwdwg");
    let pod = TestNetns::new("fwdwg");
    let (k, peer) = (KeyPair::generate(), KeyPair::generate());
    let name = dev_name("c1");
    let c = cfg(&k.private, 51830, &peer.public, Some("10.73.0.2:51830"), &["172.16.3.2/32"]);
    let dev = create_in(&node, &name, c.clone()).await.unwrap();
    // A new thread names itself once it runs.
    assert!(eventually(Duration::from_secs(5), || threads_named(&name).len() == 3), "{:?}", threads_named(&name));
    assert!(socket_path(&name).exists());
    move_to_pod(&node, &name, &pod, "172.16.3.1", "172.16.3.2");
    assert!(link_exists(&pod, "nsm-1"));

    // Same port, other name: PortInUse naming the port, nothing left behind.
    let name2 = dev_name("c2");
    let e = create_in(&node, &name2, c.clone()).await.err().unwrap();
    assert!(matches!(e, WgError::PortInUse { port: 51830, .. }), "{e}");
    assert!(e.to_string().contains("51830") && e.to_string().contains(&name2), "{e}");
    assert!(!link_exists(&node, &name2) && !socket_path(&name2).exists());
    assert!(threads_named(&name2).is_empty());
    // Same name, other port: the UAPI socket is served, so the name is taken.
    let mut c3 = c.clone();
    c3.listen_port = 51831;
    let e = create_in(&node, &name, c3).await.err().unwrap();
    assert!(matches!(e, WgError::NameTaken { .. }), "{e}");
    assert!(socket_path(&name).exists(), "the live socket is untouched");
    // Names the kernel would refuse.
    for bad in ["abcdefghijklmnop", "", "a/b"] {
        let e = create_in(&node, bad, c.clone()).await.err().unwrap();
        assert!(matches!(e, WgError::InvalidName { .. }), "{e}");
    }

    // A stale socket (nobody accepts on it) is swept; a live one is kept.
    let stale = socket_path(&dev_name("s1"));
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let removed = cleanup_stale_sockets(&dev_name(""));
    assert_eq!(removed, vec![stale.clone()]);
    assert!(!stale.exists() && socket_path(&name).exists());

    // close: TUN gone from the pod, socket file gone, threads gone; an idle
    // UAPI client does not hold it up.
    let idle_client = std::os::unix::net::UnixStream::connect(socket_path(&name)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    dev.close();
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1000), "close took {took:?}");
    drop(idle_client);
    assert!(!link_exists(&pod, "nsm-1"));
    assert!(!socket_path(&name).exists());
    assert!(threads_named(&name).is_empty(), "{:?}", threads_named(&name));
    // The port is free again.
    let again = create_in(&node, &name2, c).await.unwrap();
    assert_eq!(again.id().port, 51830);
    drop(again);
    assert!(!link_exists(&node, &name2) && !socket_path(&name2).exists() && threads_named(&name2).is_empty());
}

#[tokio::test]
async fn ipv6_underlay() {
    let u = TestNetns::new("fwdwg");
    let v = TestNetns::new("fwdwg");
    ok(&u, &["ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1", "netns", v.name()]);
    ok(&u, &["ip", "addr", "add", "fd00:76::1/64", "dev", "ul0", "nodad"]);
    ok(&v, &["ip", "addr", "add", "fd00:76::2/64", "dev", "ul1", "nodad"]);
    ok(&u, &["ip", "link", "set", "ul0", "up"]);
    ok(&v, &["ip", "link", "set", "ul1", "up"]);
    let (ka, kb) = (KeyPair::generate(), KeyPair::generate());
    let (na, nb) = (dev_name("v1"), dev_name("v2"));
    let a = create_in(&u, &na, cfg(&ka.private, 51820, &kb.public, Some("[fd00:76::2]:51820"), &["fd00:1::2/128"]))
        .await
        .unwrap();
    // b learns a's endpoint from the handshake.
    let b = create_in(&v, &nb, cfg(&kb.private, 51820, &ka.public, None, &["fd00:1::1/128"])).await.unwrap();
    for (ns, name, mine, theirs) in [(&u, &na, "fd00:1::1", "fd00:1::2"), (&v, &nb, "fd00:1::2", "fd00:1::1")] {
        ok(ns, &["ip", "addr", "add", &format!("{mine}/128"), "dev", name, "nodad"]);
        ok(ns, &["ip", "link", "set", name, "up"]);
        ok(ns, &["ip", "route", "add", &format!("{theirs}/128"), "dev", name]);
    }
    ping(&u, "fd00:1::2");
    ping(&v, "fd00:1::1");
    let show = ok(&v, &["wg", "show", &nb, "endpoints"]);
    assert!(show.contains("[fd00:76::1]:51820"), "{show}");
    a.close();
    b.close();
}

/// iperf3 over test setup 1 (ours) and the same topology with wireguard-go.
/// Informational: `cargo test -p nsm-forwarder --test wireguard -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn throughput_vs_wireguard_go() {
    fn iperf(client: &TestNetns, server: &TestNetns, to: &str) -> f64 {
        let mut s = Command::new("ip")
            .args(["netns", "exec", server.name(), "iperf3", "-s", "-1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let o = client.exec(&["iperf3", "-c", to, "-t", "5", "-f", "m"]);
        let _ = s.kill();
        let _ = s.wait();
        // "[  5]   0.00-5.00   sec   250 MBytes   419 Mbits/sec      receiver"
        let text = String::from_utf8_lossy(&o.stdout);
        let line = text.lines().find(|l| l.contains("receiver")).unwrap_or("");
        let words: Vec<&str> = line.split_whitespace().collect();
        words.iter().position(|w| *w == "Mbits/sec").and_then(|i| words[i - 1].parse().ok()).unwrap_or(0.0)
    }
    let rounds = std::env::var("WG_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);

    // Ours: node A/B with pods, as in two_nodes_pods_ping_and_mtu.
    let u = Underlay::new(74);
    let (pod_a, pod_b) = (TestNetns::new("fwdwg"), TestNetns::new("fwdwg"));
    let (ka, kb) = (KeyPair::generate(), KeyPair::generate());
    let (na, nb) = (dev_name("t1"), dev_name("t2"));
    let dev_a = create_in(&u.a, &na, cfg(&ka.private, 51820, &kb.public, Some("10.74.0.2:51820"), &["172.16.4.2/32"]))
        .await
        .unwrap();
    let dev_b = create_in(&u.b, &nb, cfg(&kb.private, 51820, &ka.public, Some("10.74.0.1:51820"), &["172.16.4.1/32"]))
        .await
        .unwrap();
    move_to_pod(&u.a, &na, &pod_a, "172.16.4.1", "172.16.4.2");
    move_to_pod(&u.b, &nb, &pod_b, "172.16.4.2", "172.16.4.1");
    ping(&pod_a, "172.16.4.2");

    // wireguard-go pair on its own underlay.
    let g = Underlay::new(75);
    let (ga, gb) = (dev_name("ga"), dev_name("gb"));
    let (go_a, go_b) = (WgGo::start(&g.a, &ga), WgGo::start(&g.b, &gb));
    let dir = tempfile::tempdir().unwrap();
    let (kga, kgb) = (KeyPair::generate(), KeyPair::generate());
    for (ns, name, k, peer, ep, mine, theirs) in [
        (&g.a, &ga, &kga, &kgb, "10.75.0.2:51820", "172.16.5.1", "172.16.5.2"),
        (&g.b, &gb, &kgb, &kga, "10.75.0.1:51820", "172.16.5.2", "172.16.5.1"),
    ] {
        let f = dir.path().join(name.as_str());
        std::fs::write(&f, k.private.to_base64()).unwrap();
        let pk = peer.public.to_base64();
        let allowed = format!("{theirs}/32");
        ok(
            ns,
            &[
                "wg",
                "set",
                name,
                "private-key",
                f.to_str().unwrap(),
                "listen-port",
                "51820",
                "peer",
                &pk,
                "endpoint",
                ep,
                "allowed-ips",
                &allowed,
            ],
        );
        ok(ns, &["ip", "link", "set", name, "mtu", &MTU.to_string()]);
        ok(ns, &["ip", "addr", "add", &format!("{mine}/32"), "dev", name]);
        ok(ns, &["ip", "link", "set", name, "up"]);
        ok(ns, &["ip", "route", "add", &allowed, "dev", name]);
    }
    ping(&g.a, "172.16.5.2");

    let (mut o, mut w) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        o.push(iperf(&pod_a, &pod_b, "172.16.4.2"));
        w.push(iperf(&g.a, &g.b, "172.16.5.2"));
    }
    println!("iperf3 single TCP stream, Mbit/s: ours {o:.0?}, wireguard-go {w:.0?}");
    let rtt = ping(&pod_a, "172.16.4.2");
    println!("idle ping RTT ours {rtt:.3} ms, wireguard-go {:.3} ms", ping(&g.a, "172.16.5.2"));
    drop((go_a, go_b));
    dev_a.close();
    dev_b.close();
}
