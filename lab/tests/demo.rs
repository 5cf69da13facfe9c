//! The README's main command, `nsm-lab run`, as a test: two clusters with
//! their own trust domains, four wires (veth, VXLAN across nodes, WireGuard
//! and VXLAN across clusters), mTLS and tokens on every hop. Needs root.
#![allow(clippy::unwrap_used)]

use nsm_lab::demo::{self, DemoOpts};
use nsm_lab::identity::Provider;
use nsm_lab::{Lab, mesh};

/// Runs the demo with SVIDs from `identity`; checks whose token each hop
/// of the cross-cluster connection carried.
async fn demo_with(test: &str, identity: Provider) -> Lab {
    let mut lab = mesh::test_lab(test);
    demo::run(&mut lab, &DemoOpts { keep: false, log_level: "INFO".into(), identity }).await.unwrap();
    // The logs show who signed each hop's token, across both trust domains.
    let log = lab.log_tail("nsmgr-c2n2", 200);
    let ids = log.lines().find(|l| l.contains("request ok") && l.contains("secure-ip")).unwrap_or_default();
    assert!(
        ids.contains("ids=spiffe://nsm.cluster1/ns/default/sa/nsc -> spiffe://nsm.cluster1/ns/nsm-system/sa/nsmgr")
            && ids.contains("spiffe://nsm.cluster2/ns/nsm-system/sa/nsmgr"),
        "{log}"
    );
    assert!(ids.contains("peer=spiffe://nsm.cluster1/ns/nsm-system/sa/forwarder"), "{ids}");
    lab
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_with_identities_on_every_hop() {
    let lab = demo_with("demo", Provider::Dev).await;
    assert!(lab.daemons().contains(&"spiffe-dev-c1".to_string()), "{:?}", lab.daemons());
}

/// The same on real SPIRE: a server per trust domain (federated), an agent
/// per node, and no dev Workload API anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_on_real_spire() {
    let lab = demo_with("dspire", Provider::Spire).await;
    let d = lab.daemons();
    for want in ["spire-server-c1", "spire-server-c2", "spire-agent-lab", "spire-agent-c1n1", "spire-agent-c2n2"] {
        assert!(d.contains(&want.to_string()), "{want} missing in {d:?}");
    }
    assert!(!d.iter().any(|n| n.starts_with("spiffe-dev-")), "a dev Workload API ran: {d:?}");
}
