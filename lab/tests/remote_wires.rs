//! Cross-node and cross-cluster wires with the real binaries in real
//! namespaces (root): VXLAN with ETHERNET and IP payload, the embedded
//! userspace WireGuard, MTU (DF pings at the limit and one byte over),
//! teardown after Close and after `kill -9` of a forwarder, and bad REMOTE
//! input sent straight to a forwarder.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use nsm_api::connection::{Connection, Mechanism, Path, PathSegment};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_client::NetworkServiceClient;
use nsm_api::registry::NetworkServiceEndpoint;
use nsm_lab::cluster;
use nsm_lab::env::Lab;
use nsm_lab::mesh::{
    self, NodeOpts, NscSummary, connections, df_ping, ip_of, link_kind, links, nsc_init, ping, wait_until,
};
use nsm_sdk::networkservice::chain::{Context, Peer};
use nsm_sdk::registry::{NseRegistry, find_nses};
use nsm_sdk::tools::grpc::dial_with;
use nsm_sdk::tools::token;

fn summary(lab: &Lab, node: &mesh::Node, pod: &str, nsurl: &str, extra: &[(&str, String)]) -> NscSummary {
    let r = nsc_init(lab, node, pod, nsurl, extra).unwrap();
    assert!(r.ok, "nsc init {nsurl}: {}", r.stderr);
    r.summaries[0].clone()
}

/// Pings both ways, checks the interface kind and the MTU limit on both
/// sides; returns the endpoint-side interface name.
fn check_wire(lab: &Lab, client: &str, nse_ns: &str, s: &NscSummary, kind: &str, mtu: u32) -> String {
    let (k, m) = link_kind(lab, client, &s.interface).unwrap();
    assert_eq!((k.as_str(), m), (kind, mtu), "the client's interface is the {kind} tunnel device itself");
    let nse_if = links(lab, nse_ns).unwrap().remove(0);
    let (k, m) = link_kind(lab, nse_ns, &nse_if).unwrap();
    assert_eq!((k.as_str(), m), (kind, mtu), "endpoint side");
    let (dst, src) = (ip_of(&s.dst_ips[0]), ip_of(&s.src_ips[0]));
    let (ok, out) = ping(lab, client, &s.interface, &dst, 2).unwrap();
    assert!(ok, "client -> endpoint over {kind}: {out}");
    let (ok, out) = ping(lab, nse_ns, &nse_if, &src, 2).unwrap();
    assert!(ok, "endpoint -> client over {kind}: {out}");
    // ICMP + IPv4 headers are 28 bytes: a packet of exactly `mtu` passes
    // with DF set, one byte more does not.
    assert!(df_ping(lab, client, &s.interface, &dst, mtu - 28).unwrap(), "MTU-sized DF ping over {kind}");
    assert!(!df_ping(lab, client, &s.interface, &dst, mtu - 27).unwrap(), "MTU+1 must fail cleanly");
    nse_if
}

fn wg_socket(forwarder_conn_id: &str) -> std::path::PathBuf {
    let name = nsm_forwarder::remote::node_ifname(nsm_forwarder::MechanismKind::Wireguard, forwarder_conn_id);
    std::path::PathBuf::from(format!("/var/run/wireguard/{name}.sock"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_vxlan_ethernet_and_ip_payload() {
    // IP payload over VXLAN too: VXLAN first.
    let opts = NodeOpts::with_forwarder_env("NSM_MECHANISM_PRIORITY", "VXLAN,WIREGUARD");
    let (mut lab, n1, n2) = cluster::two_nodes("xvx", &opts).await;
    let l2 = mesh::start_nse(&mut lab, &n2, "nse-l2", "l2", "172.16.20.0/31", &[("NSM_PAYLOAD", "ETHERNET".into())])
        .await
        .unwrap();
    let l3 = mesh::start_nse(&mut lab, &n2, "nse-l3", "l3", "172.16.21.0/31", &[("NSM_PAYLOAD", "IP".into())])
        .await
        .unwrap();
    let c1 = lab.add_netns("pod1").unwrap();
    let c2 = lab.add_netns("pod2").unwrap();

    let s = summary(&lab, &n1, &c1, "kernel://l2/nsm-1", &[]);
    assert_eq!(s.path, ["nsc", "nsmgr-c1n1", "forwarder-c1n1", "nsmgr-c1n2", "forwarder-c1n2", "nse-l2"], "six hops");
    check_wire(&lab, &c1, &l2.netns, &s, "vxlan", 1450);
    // L2: the peers resolve each other with ARP.
    let n = lab.exec(&c1, &["ip", "neigh", "show", "dev", "nsm-1"], Duration::from_secs(5)).unwrap();
    assert!(!String::from_utf8_lossy(&n.stdout).contains("PERMANENT"), "ETHERNET payload uses ARP");

    let s = summary(&lab, &n1, &c2, "kernel://l3/nsm-1", &[]);
    check_wire(&lab, &c2, &l3.netns, &s, "vxlan", 1450);
    // L3: the peer's address is a permanent neighbour (no ARP needed).
    let n = lab.exec(&c2, &["ip", "neigh", "show", "dev", "nsm-1"], Duration::from_secs(5)).unwrap();
    let n = String::from_utf8_lossy(&n.stdout);
    assert!(n.contains(&ip_of(&s.dst_ips[0])) && n.contains("PERMANENT"), "{n}");
    // The VNIs of the two tunnels differ (unique per node).
    let vni = |pod: &str| {
        let o = lab.exec(pod, &["ip", "-d", "-o", "link", "show", "nsm-1"], Duration::from_secs(5)).unwrap();
        let s = String::from_utf8_lossy(&o.stdout).to_string();
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        s.split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .unwrap_or_else(|| panic!("no VNI in `ip -d link` of {pod} ({:?}): {s:?} {e:?}", o.status))
            .to_string()
    };
    assert_ne!(vni(&c1), vni(&c2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_cluster_wireguard_and_vxlan_then_close() {
    let mut lab = mesh::test_lab("xcl");
    let topo = cluster::build(&mut lab, 2, 1, &NodeOpts::default()).await.unwrap();
    let (a, b) = (topo.node(1, 1).clone(), topo.node(2, 1).clone());
    let ipn = mesh::start_nse(&mut lab, &b, "nse-ip", "secure", "172.16.30.0/31", &[("NSM_PAYLOAD", "IP".into())])
        .await
        .unwrap();
    let eth =
        mesh::start_nse(&mut lab, &b, "nse-eth", "bridge", "172.16.31.0/31", &[("NSM_PAYLOAD", "ETHERNET".into())])
            .await
            .unwrap();
    let pod = lab.add_netns("pod").unwrap();
    let nsurls = "kernel://secure@my.cluster2/nsm-1,kernel://bridge@my.cluster2/nsm-2";
    mesh::spawn_nsc_sidecar(&mut lab, "client", &a, &pod, nsurls, &[]).unwrap();
    let up = || links(&lab, &pod).unwrap().len() == 2;
    wait_until(Duration::from_secs(15), up, || format!("wires not up: {}", lab.log_tail("client", 20))).await;
    let by_iface = |iface: &str, svc: &str, nse: &str| NscSummary {
        id: String::new(),
        network_service: svc.into(),
        interface: iface.into(),
        src_ips: vec![],
        dst_ips: vec![],
        nse: nse.into(),
        path: vec![],
        spiffe_ids: vec![],
        setup_ms: 0.0,
        adopted: false,
    };
    // Addresses as the endpoints' IPAM hands them out (.0 endpoint, .1 client).
    let mut wg = by_iface("nsm-1", "secure@my.cluster2", "nse-ip");
    wg.src_ips = vec!["172.16.30.1/32".into()];
    wg.dst_ips = vec!["172.16.30.0/32".into()];
    check_wire(&lab, &pod, &ipn.netns, &wg, "tun", 1440);
    let mut vx = by_iface("nsm-2", "bridge@my.cluster2", "nse-eth");
    vx.src_ips = vec!["172.16.31.1/32".into()];
    vx.dst_ips = vec!["172.16.31.0/32".into()];
    check_wire(&lab, &pod, &eth.netns, &vx, "vxlan", 1450);

    // `wg show` reads both userspace devices through their UAPI sockets.
    let mut wg_ids = mesh::forwarder_conn_ids(&lab, &[&a], "secure@my.cluster2").await.unwrap();
    wg_ids.extend(mesh::forwarder_conn_ids(&lab, &[&b], "secure").await.unwrap());
    assert_eq!(wg_ids.len(), 2, "one WireGuard connection on each forwarder");
    for id in &wg_ids {
        let sock = wg_socket(id);
        assert!(sock.exists(), "{} missing", sock.display());
        let name = sock.file_stem().unwrap().to_string_lossy().to_string();
        let o = lab.exec(&a.netns, &["wg", "show", &name], Duration::from_secs(5)).unwrap();
        let show = String::from_utf8_lossy(&o.stdout);
        assert!(show.contains("latest handshake") && show.contains("public key"), "wg show {name}:\n{show}");
    }

    // A registration for the other domain travels nsmgr -> registry of
    // cluster 1 -> registry of cluster 2, each hop with mutual TLS and its
    // own token (the last registry authorizes the whole path).
    let ctx = Context::with_timeout(Duration::from_secs(5));
    let float = mesh::nse_record("lab-float@my.cluster2", "secure", "tcp://10.1.0.1:5999");
    NseRegistry::register(&lab.registry(&a.nsmgr_url, Duration::from_secs(2)), &ctx, float.clone()).await.unwrap();
    let q = NetworkServiceEndpoint { name: "lab-float".into(), ..Default::default() };
    let there = lab.registry(&b.nsmgr_url, Duration::from_secs(2));
    assert_eq!(find_nses(&there, &ctx, q.clone()).await.unwrap().len(), 1, "registered in cluster 2");
    NseRegistry::unregister(&lab.registry(&a.nsmgr_url, Duration::from_secs(2)), &ctx, float).await.unwrap();
    assert!(find_nses(&there, &ctx, q).await.unwrap().is_empty(), "unregistered in cluster 2");

    // Close (SIGTERM to the client): nothing is left anywhere.
    lab.stop("client", Duration::from_secs(5)).unwrap();
    mesh::assert_clean(&lab, &[&pod, &ipn.netns, &eth.netns], &[&a, &b]).await;
    for id in &wg_ids {
        assert!(!wg_socket(id).exists(), "UAPI socket {} left behind", wg_socket(id).display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_forwarders_leave_no_orphans() {
    let opts = NodeOpts::with_forwarder_env("NSM_ORPHAN_GRACE", "2s");
    let (mut lab, n1, n2) = cluster::two_nodes("orph", &opts).await;
    let vx = mesh::start_nse(&mut lab, &n2, "nse-vx", "vx", "172.16.40.0/31", &[("NSM_PAYLOAD", "ETHERNET".into())])
        .await
        .unwrap();
    let wgn = mesh::start_nse(&mut lab, &n2, "nse-wg", "wg", "172.16.41.0/31", &[("NSM_PAYLOAD", "IP".into())])
        .await
        .unwrap();
    let pod = lab.add_netns("pod").unwrap();
    let r = nsc_init(&lab, &n1, &pod, "kernel://vx/nsm-1,kernel://wg/nsm-2", &[]).unwrap();
    assert!(r.ok, "{}", r.stderr);
    let wg_ids = mesh::forwarder_conn_ids(&lab, &[&n1, &n2], "wg").await.unwrap();
    assert_eq!(links(&lab, &pod).unwrap().len(), 2);

    // kill -9 both forwarders mid-connection (nobody closes), restart them.
    lab.signal(&n1.forwarder_name, Signal::SIGKILL).unwrap();
    lab.signal(&n2.forwarder_name, Signal::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The userspace WireGuard TUNs die with their process; the VXLAN
    // devices are kernel objects and stay.
    assert_eq!(links(&lab, &pod).unwrap(), ["nsm-1"]);
    mesh::start_forwarder(&mut lab, &n1, &opts).await.unwrap();
    mesh::start_forwarder(&mut lab, &n2, &opts).await.unwrap();
    for id in &wg_ids {
        let sock = wg_socket(id);
        if sock.exists() {
            let ss = std::process::Command::new("ss").args(["-xlp"]).output().unwrap();
            let who: Vec<String> = String::from_utf8_lossy(&ss.stdout)
                .lines()
                .filter(|l| l.contains(&*sock.to_string_lossy()))
                .map(str::to_string)
                .collect();
            panic!("stale UAPI socket {} not removed at start; listeners: {who:?}; ids {wg_ids:?}", sock.display());
        }
    }
    // Nobody refreshes these connections: after NSM_ORPHAN_GRACE the
    // restarted forwarders remove what the killed ones built.
    let gone = || links(&lab, &pod).unwrap().is_empty() && links(&lab, &vx.netns).unwrap().is_empty();
    wait_until(Duration::from_secs(10), gone, || {
        format!("orphans left: pod {:?}, endpoint {:?}", links(&lab, &pod).unwrap(), links(&lab, &vx.netns).unwrap())
    })
    .await;
    assert!(links(&lab, &wgn.netns).unwrap().is_empty());
    assert_eq!(links(&lab, &n1.netns).unwrap(), ["eth0"]);
    assert_eq!(links(&lab, &n2.netns).unwrap(), ["eth0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_down_after_a_forwarder_was_killed_leaves_no_uapi_socket() {
    let (mut lab, n1, n2) = cluster::two_nodes("wgdown", &NodeOpts::default()).await;
    mesh::start_nse(&mut lab, &n2, "nse-wg", "wg", "172.16.42.0/31", &[("NSM_PAYLOAD", "IP".into())]).await.unwrap();
    let pod = lab.add_netns("pod").unwrap();
    let r = nsc_init(&lab, &n1, &pod, "kernel://wg/nsm-1", &[]).unwrap();
    assert!(r.ok, "{}", r.stderr);
    let wg_ids = mesh::forwarder_conn_ids(&lab, &[&n1, &n2], "wg").await.unwrap();
    assert_eq!(wg_ids.len(), 2);
    for id in &wg_ids {
        assert!(wg_socket(id).exists(), "{} missing", wg_socket(id).display());
    }
    // kill -9 (nothing closes its devices), then `nsm-lab down`.
    lab.signal(&n1.forwarder_name, Signal::SIGKILL).unwrap();
    lab.signal(&n2.forwarder_name, Signal::SIGKILL).unwrap();
    // (A forwarder starting in a concurrent test also removes unserved UAPI
    // sockets, so which of the two removed them is not checked.)
    nsm_lab::down(lab.prefix()).unwrap();
    for id in &wg_ids {
        assert!(!wg_socket(id).exists(), "UAPI socket {} left after nsm-lab down", wg_socket(id).display());
    }
}

/// Sends a request with the given REMOTE preference straight to the
/// forwarder of `node`, as another node's forwarder would via the nsmgr.
async fn remote_request(lab: &Lab, node: &mesh::Node, service: &str, nse: &str, m: Mechanism) -> tonic::Status {
    let (ch, server) = dial_with(&node.forwarder_url, Duration::from_secs(2), lab.tls()).await.unwrap();
    let server = server.lock().unwrap().clone();
    let peer = Peer { spiffe_id: server.spiffe_id, cert_der: server.cert_der, ..Default::default() };
    let token = lab.tokens().generate(&peer).unwrap();
    let req = NetworkServiceRequest {
        connection: Some(Connection {
            id: "peer-1".into(),
            network_service: service.into(),
            network_service_endpoint_name: nse.into(),
            path: Some(Path {
                index: 0,
                path_segments: vec![PathSegment {
                    name: "nsmgr-far".into(),
                    id: "peer-1".into(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        mechanism_preferences: vec![m],
    };
    // Signed by the lab for the forwarder, as the far nsmgr would: the
    // forwarder's policies pass, and its answer is about the mechanism.
    let mut req = tonic::Request::new(req);
    token::put(req.metadata_mut(), &token);
    NetworkServiceClient::new(ch).request(req).await.unwrap_err()
}

fn remote(t: &str, params: &[(&str, &str)]) -> Mechanism {
    Mechanism {
        cls: "REMOTE".into(),
        r#type: t.into(),
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_remote_input_is_refused_and_nothing_is_built() {
    // One WireGuard port only, so we can occupy it.
    let opts = NodeOpts::with_forwarder_env("NSM_WIREGUARD_PORTS", "51999-51999");
    let (mut lab, n1, n2) = cluster::two_nodes("bad", &opts).await;
    let e =
        mesh::start_nse(&mut lab, &n2, "nse1", "svc", "172.16.50.0/31", &[("NSM_PAYLOAD", "IP".into())]).await.unwrap();
    let key = "K9JdWl8DdvNAAt1BVhsbb7lw+ytPQhJAHu2u/IGyp2E=";
    let cases = [
        (
            remote("WIREGUARD", &[("src_ip", "10.1.0.1"), ("src_port", "51820"), ("src_public_key", "bm90LWEta2V5")]),
            "src_public_key",
        ),
        (remote("WIREGUARD", &[("src_port", "51820"), ("src_public_key", key)]), "no src_ip"),
        (remote("WIREGUARD", &[("src_ip", "10.1.0.999"), ("src_port", "51820"), ("src_public_key", key)]), "src_ip"),
        (remote("VXLAN", &[("src_ip", "10.1.0.1"), ("src_port", "4789"), ("vni", "16777216")]), "vni"),
        (remote("VXLAN", &[("src_ip", "10.1.0.1"), ("src_port", "4789"), ("vni", "0")]), "vni"),
        (remote("VXLAN", &[("src_ip", "10.1.0.1"), ("src_port", "8472")]), "NSM_VXLAN_PORT"),
        (remote("VXLAN", &[("src_ip", "10.1.0.1"), ("src_port", "4789"), ("MTU", "100")]), "MTU"),
        (remote("GRE", &[("src_ip", "10.1.0.1")]), "no supported REMOTE mechanism"),
    ];
    for (m, what) in cases {
        let st = remote_request(&lab, &n2, "svc", "nse1", m.clone()).await;
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{m:?}: {st:?}");
        assert!(st.message().contains(what), "{what:?} not named in {:?}", st.message());
    }
    assert!(links(&lab, &e.netns).unwrap().is_empty(), "nothing reached the endpoint pod");
    assert_eq!(links(&lab, &n2.netns).unwrap(), ["eth0"]);
    assert!(connections(&lab, &n2.forwarder_url).await.unwrap().is_empty());
    assert!(connections(&lab, &e.url).await.unwrap().is_empty(), "the endpoint was never asked");

    // Ports in use on the endpoint's node: WireGuard's only port, and VXLAN's.
    let hold = |port: u16| {
        let ns = n2.netns.clone();
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &ns, "python3", "-c"]).arg(format!(
            "import socket,time; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(('::', {port})); print('ok', flush=True); time.sleep(60)"
        ));
        c.stdout(std::process::Stdio::piped()).spawn().unwrap()
    };
    let mut holder = hold(51999);
    std::thread::sleep(Duration::from_millis(300));
    let pod = lab.add_netns("pod").unwrap();
    let r = nsc_init(&lab, &n1, &pod, "kernel://svc/nsm-1", &[("NSM_REQUEST_TIMEOUT", "3s".into())]).unwrap();
    assert!(!r.ok);
    assert!(r.stderr.contains("51999") && r.stderr.contains("in use"), "{}", r.stderr);
    holder.kill().unwrap();
    holder.wait().unwrap();
    let e2 = mesh::start_nse(&mut lab, &n2, "nse2", "l2", "172.16.51.0/31", &[("NSM_PAYLOAD", "ETHERNET".into())])
        .await
        .unwrap();
    // WireGuard carries IP packets only: refused for an ETHERNET service.
    let wg_for_l2 = remote("WIREGUARD", &[("src_ip", "10.1.0.1"), ("src_port", "51820"), ("src_public_key", key)]);
    let st = remote_request(&lab, &n2, "l2", "nse2", wg_for_l2).await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("IP payload only"), "{}", st.message());
    assert!(links(&lab, &e2.netns).unwrap().is_empty());
    let mut holder = hold(4789);
    std::thread::sleep(Duration::from_millis(300));
    let r = nsc_init(
        &lab,
        &n1,
        &pod,
        "kernel://l2/nsm-2",
        &[("NSM_NAME", "nsc2".into()), ("NSM_REQUEST_TIMEOUT", "3s".into())],
    )
    .unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(!r.ok);
    assert!(r.stderr.contains("4789"), "{}", r.stderr);
    mesh::assert_clean(&lab, &[&pod, &e.netns, &e2.netns], &[&n1, &n2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_forwarder_adopts_an_ip_vxlan_wire() {
    let opts = NodeOpts::with_forwarder_env("NSM_MECHANISM_PRIORITY", "VXLAN");
    let (mut lab, n1, n2) = cluster::two_nodes("adopt", &opts).await;
    mesh::start_nse(&mut lab, &n2, "nse1", "l3", "172.16.60.0/31", &[("NSM_PAYLOAD", "IP".into())]).await.unwrap();
    let pod = lab.add_netns("pod").unwrap();
    mesh::spawn_nsc_sidecar(
        &mut lab,
        "client",
        &n1,
        &pod,
        "kernel://l3/nsm-1",
        &[("NSM_MAX_TOKEN_LIFETIME", "2s".into())],
    )
    .unwrap();
    let up = || links(&lab, &pod).unwrap() == ["nsm-1"];
    wait_until(Duration::from_secs(10), up, || lab.log_tail("client", 20)).await;
    let ifindex = |lab: &Lab| {
        let o = lab.exec(&pod, &["cat", "/sys/class/net/nsm-1/ifindex"], Duration::from_secs(5)).unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let before = ifindex(&lab);
    let (ok, out) = ping(&lab, &pod, "nsm-1", "172.16.60.0", 1).unwrap();
    assert!(ok, "{out}");
    // kill -9 the client side's forwarder; the kernel keeps the VXLAN device.
    lab.signal(&n1.forwarder_name, Signal::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    mesh::start_forwarder(&mut lab, &n1, &opts).await.unwrap();
    // The sidecar refreshes (every ~400 ms) through the new forwarder, which
    // adopts the device: same ifindex, same MAC on both ends, so the
    // endpoint's permanent neighbour entry still matches and pings pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(lab.log_tail(&n1.forwarder_name, 30).contains("request ok"), "no refresh through the new forwarder");
    assert_eq!(ifindex(&lab), before, "adopted, not rebuilt");
    let (ok, out) = ping(&lab, &pod, "nsm-1", "172.16.60.0", 2).unwrap();
    assert!(ok, "after adoption: {out}");
    lab.stop("client", Duration::from_secs(5)).unwrap();
    mesh::assert_clean(&lab, &[&pod], &[&n1, &n2]).await;
}
