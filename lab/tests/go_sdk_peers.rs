//! Interop with programs built on the upstream NSM Go sdk (v1.14.5, see
//! `peers/gosdk` and `scripts/peers.sh gosdk`): the sdk's client chain
//! (`nsm-go-nsc`) and endpoint chain with its registry clients
//! (`nsm-go-nse`) against our nsmgr, forwarder, nsc and nse, in real
//! namespaces, with mutual TLS on every hop and each side's token policies
//! checking the other's tokens (the Go peers run upstream's default OPA
//! policies). The SVIDs come from real SPIRE (servers per trust domain, an
//! agent per node)
//! in the tests of both directions, from `nsm-spiffe-dev` in the fd test. The Go peers pass their fds as
//! upstream does (grpcfd): the endpoint registers its socket as `inode://`,
//! the client its netns.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use nix::sys::signal::Signal;
use nsm_api::registry::NetworkServiceEndpoint;
use nsm_lab::gopeers::{self, SocketAt};
use nsm_lab::identity::{self, Provider};
use nsm_lab::mesh::{self, NodeOpts, connections, ip_of, links, nsc_init, ping};
use nsm_lab::{Lab, cluster};
use nsm_sdk::networkservice::chain::Context;
use nsm_sdk::registry::find_nses;
use serde_json::Value;

/// The names of the path segments of a connection the Go sdk printed.
fn path_names(conn: &Value) -> Vec<String> {
    conn["path"]["path_segments"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

fn ip_pair(conn: &Value) -> (String, String) {
    let ip = &conn["context"]["ip_context"];
    (ip_of(ip["src_ip_addrs"][0].as_str().unwrap()), ip_of(ip["dst_ip_addrs"][0].as_str().unwrap()))
}

/// Node options with SVIDs from real SPIRE. The Go peers are resolved
/// first: the agents' registration entries name their executables.
fn on_spire() -> NodeOpts {
    gopeers::bin("nsm-go-nse").unwrap();
    NodeOpts { identity: Provider::Spire, ..Default::default() }
}

/// The lab's SVIDs came from SPIRE only, and `nsmgr` saw `who` sign a
/// Request's first token (its log names every hop's signer).
fn assert_spire_identities(lab: &Lab, nsmgr: &str, who: &str) {
    assert_eq!(identity::provider(lab), Some(Provider::Spire));
    let d = lab.daemons();
    assert!(
        d.iter().any(|n| n.starts_with("spire-agent-")) && !d.iter().any(|n| n.starts_with("spiffe-dev-")),
        "{d:?}"
    );
    let log = lab.log_tail(nsmgr, 400);
    assert!(log.lines().any(|l| l.contains("request ok") && l.contains(&format!("ids={who}"))), "{who}: {log}");
}

fn by_name(name: &str) -> NetworkServiceEndpoint {
    NetworkServiceEndpoint { name: name.to_string(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_sdk_client_reaches_our_endpoint_and_a_go_sdk_endpoint_through_our_mesh() {
    let (mut lab, node, ours) = mesh::single_node("gonsc", &on_spire(), "172.16.30.0/31").await;
    let go = gopeers::start_go_nse(&mut lab, &node, "gonse", "go-responder", "172.16.31.0/31", SocketAt::Shared, &[])
        .await
        .unwrap();
    let pod = lab.add_netns("pod").unwrap();
    let conns = gopeers::start_go_nsc(
        &mut lab,
        "gonsc",
        &node,
        &pod,
        "nsc",
        "kernel://icmp-responder/nsm-1,kernel://go-responder/nsm-2",
    )
    .await
    .unwrap();
    assert_eq!(path_names(&conns[0]), ["nsc", "nsmgr-node1", "forwarder-node1", "nse1"]);
    assert_eq!(path_names(&conns[1]), ["nsc", "nsmgr-node1", "forwarder-node1", "gonse"]);
    assert_spire_identities(&lab, &node.nsmgr_name, "spiffe://nsm.cluster1/ns/default/sa/nsm-go-nsc");
    for c in &conns {
        // The client passed its netns fd as inode://; the nsmgr answered
        // with that URL, which the sdk's sendfd mapped back to its own file.
        assert_eq!(c["mechanism"]["parameters"]["inodeURL"], "file:///proc/thread-self/ns/net", "{c}");
    }
    let mut pod_links = links(&lab, &pod).unwrap();
    pod_links.sort();
    assert_eq!(pod_links, ["nsm-1", "nsm-2"], "the Go client's interfaces are in its pod");
    for (conn, ifname, nse_ns) in [(&conns[0], "nsm-1", &ours.netns), (&conns[1], "nsm-2", &go.netns)] {
        let (src, dst) = ip_pair(conn);
        let (ok, out) = ping(&lab, &pod, ifname, &dst, 2).unwrap();
        assert!(ok, "Go client -> {dst} over {ifname}: {out}");
        let nse_if = links(&lab, nse_ns).unwrap().remove(0);
        let (ok, out) = ping(&lab, nse_ns, &nse_if, &src, 2).unwrap();
        assert!(ok, "endpoint -> Go client {src}: {out}");
    }
    // SIGTERM: the Go client Closes both connections through our mesh.
    lab.signal("gonsc", Signal::SIGTERM).unwrap();
    gopeers::wait_line(&mut lab, "gonsc", "closed nsc-1", Duration::from_secs(20)).await.unwrap();
    mesh::assert_clean(&lab, &[&pod, &ours.netns, &go.netns], &[&node]).await;
    // And the Go endpoint unregisters through our nsmgr.
    lab.signal("gonse", Signal::SIGTERM).unwrap();
    gopeers::wait_line(&mut lab, "gonse", "unregistered gonse", Duration::from_secs(20)).await.unwrap();
    let reg = lab.registry(&node.nsmgr_url, Duration::from_secs(1));
    let left = find_nses(&reg, &Context::with_timeout(Duration::from_secs(2)), by_name("gonse")).await.unwrap();
    assert!(left.is_empty(), "the Go endpoint's registration is gone: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_reaches_a_go_sdk_endpoint_on_its_node_and_across_nodes() {
    let (mut lab, n1, n2) = cluster::two_nodes("gonse", &on_spire()).await;
    let eth = gopeers::start_go_nse(&mut lab, &n2, "go-eth", "go-eth", "172.16.32.0/29", SocketAt::Shared, &[])
        .await
        .unwrap();
    let ip = gopeers::start_go_nse(
        &mut lab,
        &n2,
        "go-ip",
        "go-ip",
        "172.16.33.0/31",
        SocketAt::Shared,
        &[("NSM_PAYLOAD", "IP".into())],
    )
    .await
    .unwrap();
    // Same node, and from the other node over VXLAN (ETHERNET payload) and
    // WireGuard (IP payload); `nsc run` keeps them until SIGTERM.
    let local = lab.add_netns("local").unwrap();
    let remote = lab.add_netns("remote").unwrap();
    let json = [("NSM_OUTPUT", "json".to_string())];
    mesh::spawn_nsc_sidecar(&mut lab, "nsc-local", &n2, &local, "kernel://go-eth/nsm-1", &json).unwrap();
    mesh::spawn_nsc_sidecar(&mut lab, "nsc-remote", &n1, &remote, "kernel://go-eth/nsm-1,kernel://go-ip/nsm-2", &json)
        .unwrap();
    // (interface kind, MTU) of each connection: a veth on the node, VXLAN
    // for ETHERNET and userspace WireGuard (TUN) for IP across nodes.
    let local_wires = vec![(&eth, ("veth", 1500))];
    let remote_wires = vec![(&eth, ("vxlan", 1450)), (&ip, ("tun", 1440))];
    for (daemon, pod, nses) in [("nsc-local", &local, local_wires), ("nsc-remote", &remote, remote_wires)] {
        gopeers::wait_line(&mut lab, daemon, "{", Duration::from_secs(30)).await.unwrap();
        // nsc prints one summary line per connection: wait for all of them.
        let log_path = lab.dir().join(format!("{daemon}.log"));
        let summaries = || -> Vec<String> {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            log.lines().filter(|l| l.starts_with('{')).map(str::to_string).collect()
        };
        mesh::wait_until(
            Duration::from_secs(10),
            || summaries().len() >= nses.len(),
            || format!("{daemon}: {:?}", summaries()),
        )
        .await;
        let lines = summaries();
        assert_eq!(lines.len(), nses.len(), "{daemon}: {lines:?}");
        for (line, (nse, (kind, mtu))) in lines.iter().zip(nses) {
            let s: mesh::NscSummary = serde_json::from_str(line).unwrap();
            assert_eq!(s.path.last(), Some(&nse.name), "{:?}", s.path);
            let (k, m) = mesh::link_kind(&lab, pod, &s.interface).unwrap();
            assert_eq!((k.as_str(), m), (kind, mtu), "{daemon} -> {}: the wire", nse.name);
            let (ok, out) = ping(&lab, pod, &s.interface, &ip_of(&s.dst_ips[0]), 2).unwrap();
            assert!(ok, "{daemon} -> Go endpoint {}: {out}", nse.name);
        }
    }
    assert_eq!(links(&lab, &eth.netns).unwrap().len(), 2, "two connections into the Go endpoint");
    assert_spire_identities(&lab, &n2.nsmgr_name, "spiffe://nsm.cluster1/ns/default/sa/nsc");
    // The sdk endpoint passed its netns fd with its answer (sendfd server):
    // the forwarder opened the namespace through it instead of searching.
    let fwd_pid = lab.pid(&n2.forwarder_name).unwrap();
    let log = std::fs::read_to_string(lab.dir().join(format!("{}.log", n2.forwarder_name))).unwrap();
    assert!(
        log.lines().any(|l| l.contains("end of the tunnel ready") && l.contains(&format!(" in /proc/{fwd_pid}/fd/"))),
        "{log}"
    );
    lab.stop("nsc-local", Duration::from_secs(10)).unwrap();
    lab.stop("nsc-remote", Duration::from_secs(10)).unwrap();
    mesh::assert_clean(&lab, &[&local, &remote, &eth.netns, &ip.netns], &[&n1, &n2]).await;
}

/// grpcfd: an sdk endpoint whose socket exists only in its own mount
/// namespace is reached through the fd it passed; our nsc passes its netns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_clients_pass_their_fds_as_upstream_does() {
    let mut lab = mesh::test_lab("gofd");
    let node = mesh::start_node(&mut lab, "node1", &NodeOpts::default()).await.unwrap();
    let go = gopeers::start_go_nse(&mut lab, &node, "gopriv", "private", "172.16.34.0/31", SocketAt::Private, &[])
        .await
        .unwrap();
    assert!(
        !std::path::Path::new(go.url.path()).exists(),
        "{} is visible outside the endpoint's mount namespace",
        go.url
    );
    // The nsmgr holds the passed socket and hands the forwarder its /proc path.
    let reg = lab.registry(&node.nsmgr_url, Duration::from_secs(1));
    let found = find_nses(&reg, &Context::with_timeout(Duration::from_secs(2)), by_name("gopriv")).await.unwrap();
    assert_eq!(found.len(), 1);
    let nsmgr_pid = lab.pid(&node.nsmgr_name).unwrap();
    assert!(found[0].url.starts_with(&format!("unix:///proc/{nsmgr_pid}/fd/")), "{}", found[0].url);
    let pod = lab.add_netns("pod").unwrap();
    let r = nsc_init(&lab, &node, &pod, "kernel://private/nsm-1", &[]).unwrap();
    assert!(r.ok, "{}", r.stderr);
    let s = &r.summaries[0];
    let (ok, out) = ping(&lab, &pod, &s.interface, &ip_of(&s.dst_ips[0]), 2).unwrap();
    assert!(ok, "{out}");
    // Our nsc passes its netns the same way: the forwarder was handed the
    // nsmgr's kept fd, not a namespace to search every process for.
    let at_fwd = connections(&lab, &node.forwarder_url).await.unwrap();
    let url = at_fwd[0].mechanism.as_ref().unwrap().parameters["inodeURL"].clone();
    assert!(url.starts_with(&format!("file:///proc/{nsmgr_pid}/fd/")), "the forwarder got {url}");
}
