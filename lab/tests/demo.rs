//! The README's main command, `nsm-lab run`, as a test: two clusters with
//! their own trust domains, four wires (veth, VXLAN across nodes, WireGuard
//! and VXLAN across clusters), mTLS and tokens on every hop. Needs root.
#![allow(clippy::unwrap_used)]

use nsm_lab::demo::{self, DemoOpts};
use nsm_lab::mesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_with_identities_on_every_hop() {
    let mut lab = mesh::test_lab("demo");
    demo::run(&mut lab, &DemoOpts { keep: false, log_level: "INFO".into() }).await.unwrap();
    // The logs show who signed each hop's token, across both trust domains.
    let log = lab.log_tail("nsmgr-c2n2", 200);
    let ids = log.lines().find(|l| l.contains("request ok") && l.contains("secure-ip")).unwrap_or_default();
    assert!(
        ids.contains("ids=spiffe://nsm.cluster1/ns/default/sa/nsc -> spiffe://nsm.cluster1/ns/nsm-system/sa/nsmgr")
            && ids.contains("spiffe://nsm.cluster2/ns/nsm-system/sa/nsmgr"),
        "{log}"
    );
    assert!(ids.contains("peer=spiffe://nsm.cluster1/ns/nsm-system/sa/forwarder"), "{ids}");
}
