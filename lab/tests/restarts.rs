//! A forwarder killed with SIGKILL in the middle of a connection's life and
//! restarted: the wire survives (the kernel keeps it), the restarted
//! forwarder adopts it on the next refresh instead of rebuilding it, and a
//! Close that reaches a forwarder which never saw the connection still
//! removes both ends. Real binaries, real namespaces (root).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use nix::sys::signal::Signal;
use nsm_lab::Lab;
use nsm_lab::mesh::{self, ICMP, NodeOpts, connections, eventually, links, nsc_init, ping, wait_until};

fn ifindex(lab: &Lab, netns: &str, ifname: &str) -> String {
    let o = lab.exec(netns, &["cat", &format!("/sys/class/net/{ifname}/ifindex")], Duration::from_secs(5)).unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_forwarder_adopts_its_wire_after_restart() {
    let opts = NodeOpts::default();
    let (mut lab, node, nse) = mesh::single_node("fwdkil", &opts, "172.16.4.0/31").await;
    let client = lab.add_netns("nsc1").unwrap();
    mesh::spawn_nsc_sidecar(&mut lab, "sidecar", &node, &client, ICMP, &[("NSM_MAX_TOKEN_LIFETIME", "2s".into())])
        .unwrap();
    let up = || links(&lab, &client).unwrap() == ["nsm-1"];
    wait_until(Duration::from_secs(10), up, || format!("no wire: {}", lab.log_tail("sidecar", 20))).await;
    let before = ifindex(&lab, &client, "nsm-1");
    let nse_if = links(&lab, &nse.netns).unwrap().remove(0);

    lab.signal(&node.forwarder_name, Signal::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!lab.running(&node.forwarder_name));
    // The data path does not depend on the forwarder process.
    let (ok, out) = ping(&lab, &client, "nsm-1", "172.16.4.0", 1).unwrap();
    assert!(ok, "wire must survive the forwarder: {out}");

    mesh::start_forwarder(&mut lab, &node, &opts).await.unwrap();
    // Let the sidecar refresh through the new forwarder (every ~400 ms).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(lab.running("sidecar"), "{}", lab.log_tail("sidecar", 20));
    assert!(lab.log_tail(&node.forwarder_name, 20).contains("request ok"), "no refresh reached the new forwarder");
    assert_eq!(ifindex(&lab, &client, "nsm-1"), before, "the restarted forwarder must adopt, not rebuild");
    assert_eq!(links(&lab, &nse.netns).unwrap(), std::slice::from_ref(&nse_if));
    let (ok, out) = ping(&lab, &client, "nsm-1", "172.16.4.0", 1).unwrap();
    assert!(ok, "{out}");

    lab.stop("sidecar", Duration::from_secs(5)).unwrap();
    assert!(links(&lab, &client).unwrap().is_empty());
    assert!(links(&lab, &nse.netns).unwrap().is_empty());
    assert!(connections(&lab, &node.forwarder_url).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reaching_a_restarted_forwarder_removes_the_wire() {
    let opts = NodeOpts::default();
    let (mut lab, node, nse) = mesh::single_node("fwdcls", &opts, "172.16.4.0/31").await;
    let client = lab.add_netns("nsc1").unwrap();
    // An init-style client whose token lasts 3 s and is never refreshed.
    let run = nsc_init(&lab, &node, &client, ICMP, &[("NSM_MAX_TOKEN_LIFETIME", "3s".into())]).unwrap();
    assert!(run.ok, "{}", run.stderr);
    lab.signal(&node.forwarder_name, Signal::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    mesh::start_forwarder(&mut lab, &node, &opts).await.unwrap();
    // The nsmgr times the connection out and closes it through the new
    // forwarder, which never saw it: the wire must still go, on both sides.
    let gone = || links(&lab, &client).unwrap().is_empty() && links(&lab, &nse.netns).unwrap().is_empty();
    wait_until(Duration::from_secs(10), gone, || {
        format!(
            "wire not removed: client {:?}, endpoint {:?}\n{}",
            links(&lab, &client).unwrap(),
            links(&lab, &nse.netns).unwrap(),
            lab.log_tail(&node.forwarder_name, 20)
        )
    })
    .await;
    // The interfaces go first, then the Close travels on to the endpoint.
    let forgotten = || async {
        Ok(connections(&lab, &node.nsmgr_url).await?.is_empty() && connections(&lab, &nse.url).await?.is_empty())
    };
    eventually("the nsmgr and the endpoint forget the connection", Duration::from_secs(10), forgotten).await;
}
