//! The patch works, not only exists: a pod created through the real API
//! server and the webhook is stored with an init container; that container
//! is run exactly as stored (its command, args, env and volume mounts, by
//! the kubelet stand-in of `nsm_k8s::testing::kubelet`, since no kubelet
//! can run here) in a pod network namespace on a lab node, whose host
//! paths `/run/spire/sockets` and `/var/lib/networkservicemesh` are the
//! lab's Workload API and nsmgr socket directories. It gets its interface
//! and reaches the endpoint. A pod asking for a service nobody provides is
//! admitted, and its init container fails naming the service.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nsm_k8s::testing::kubelet;
use nsm_k8s::testing::webhook::Webhook;
use nsm_k8s::testing::{ApiServer, ApiServerOpts};
use nsm_lab::mesh::{self, NodeOpts, links, ping};
use nsm_sdk::testing::{ok_output, output_text};
use serde_json::Value;

fn stored_pod(k: &ApiServer, name: &str, nsurls: &str) -> Value {
    k.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    \
         networkservicemesh.io: {nsurls}\nspec:\n  containers:\n  - name: app\n    image: alpine\n"
    ));
    serde_json::from_str(&ok_output(&k.kubectl(&["get", "pod", name, "-o", "json"], ""))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stored_init_container_connects_its_pod_on_a_lab_node() {
    let k = ApiServer::start_with(ApiServerOpts { crds: false, ..Default::default() }).await;
    k.create_namespace("nsm-system").await;
    let _w = Webhook::start(&k, "nsm-webhook", &[("NSM_ENVS", "NSM_LOG_LEVEL=DEBUG,NSM_REQUEST_TIMEOUT=5s")]).await;
    let (mut lab, node, nse) = mesh::single_node("whklab", &NodeOpts::default(), "172.16.11.0/31").await;
    let host_paths: BTreeMap<String, PathBuf> = [
        ("/run/spire/sockets".to_string(), lab.dir().join("spire/c1")),
        ("/var/lib/networkservicemesh".to_string(), lab.dir().join(&node.name)),
    ]
    .into();
    let bins = nsm_k8s::testing::workspace_bin("nsc");
    let path: Vec<&Path> = vec![bins.parent().unwrap()];
    let scratch = tempfile::tempdir().unwrap();

    let pod = stored_pod(&k, "client", mesh::ICMP);
    let netns = lab.add_netns("client").unwrap();
    let init = pod["spec"]["initContainers"][0]["name"].as_str().unwrap().to_string();
    let cmd = kubelet::command(&pod, &init, &netns, &host_paths, &path, scratch.path());
    let out = nsm_lab::env::output_with_timeout(cmd, Duration::from_secs(30)).unwrap();
    assert!(
        out.status.success(),
        "the stored init container failed:\n{}\n{}",
        output_text(&out),
        lab.log_tail("nsmgr-node1", 20)
    );
    assert_eq!(links(&lab, &netns).unwrap(), ["nsm-1"], "the interface its annotation asked for");
    let dst = mesh::ip_of("172.16.11.0/31");
    let (ok, text) = ping(&lab, &netns, "nsm-1", &dst, 1).unwrap();
    assert!(ok, "{text}");
    // The connection carries the pod's identity as the webhook wrote it.
    let conns = mesh::connections(&lab, &nse.url).await.unwrap();
    assert!(
        conns.iter().any(|c| c.labels.get("podName").map(String::as_str) == Some("client")),
        "podName label from the downward API: {conns:?}"
    );

    // A service nobody provides: admitted, and the client says why it fails.
    let pod = stored_pod(&k, "lonely", "kernel://no-such-service/nsm-1");
    assert!(pod["spec"]["initContainers"].is_array(), "admitted and injected");
    let netns = lab.add_netns("lonely").unwrap();
    let cmd = kubelet::command(&pod, &init, &netns, &host_paths, &path, scratch.path());
    let out = nsm_lab::env::output_with_timeout(cmd, Duration::from_secs(30)).unwrap();
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("no-such-service"), "{text}");
    assert!(links(&lab, &netns).unwrap().is_empty());
    lab.teardown();
}
