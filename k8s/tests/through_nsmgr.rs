//! The Kubernetes registry under a real mesh: `nsm-registry-k8s` (the
//! binary) on a real kube-apiserver serves a lab node's nsmgr. Forwarder and
//! endpoint register through the nsmgr and become NetworkServiceEndpoint
//! objects; a client finds the endpoint and pings it over its wire; a
//! NetworkService applied with kubectl selects the endpoint by labels; a
//! restarted registry loses nothing; an endpoint that stops is deleted.
//! Real binaries, namespaces (root) and mutual TLS.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use nsm_k8s::testing::{ApiServer, eventually_async};
use nsm_lab::mesh::{self, NodeOpts, RegistryAt, nsc_init, ping, start_node, start_nse};
use nsm_sdk::testing::output_text;

const NS: &str = "nsm-system";

fn nse_names(k: &ApiServer) -> Vec<String> {
    let out = output_text(&k.kubectl(&["get", "nse", "-n", NS, "-o", "jsonpath={.items[*].metadata.name}"], ""));
    let mut v: Vec<String> = out.split_whitespace().map(str::to_string).collect();
    v.sort();
    v
}

/// Connects until a client lands on `want` (the registry's watch needs a
/// moment to bring an edit), at most 5 tries; the last pick.
async fn eventually_pick(
    lab: &mut nsm_lab::Lab,
    connect: &mut impl FnMut(&mut nsm_lab::Lab) -> String,
    want: &str,
) -> String {
    let mut last = String::new();
    for _ in 0..5 {
        last = connect(lab);
        if last == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_registers_finds_and_connects_through_the_kubernetes_registry() {
    let k = ApiServer::start().await;
    k.create_namespace(NS).await;
    let registry = RegistryAt::Kubernetes { kubeconfig: k.kubeconfig(), namespace: NS.into() };
    let opts = NodeOpts { registry: Some(registry.clone()), ..NodeOpts::default() };
    let mut lab = mesh::test_lab("k8sreg");
    let node = start_node(&mut lab, "node1", &opts).await.unwrap();
    // Two endpoints of one service, told apart by labels; the service
    // itself is the cluster admin's (kubectl), not theirs.
    for (name, app, cidr) in [("nse1", "blue", "172.16.9.0/28"), ("nse2", "green", "172.16.9.16/28")] {
        let env = [("NSM_LABELS", format!("app:{app}")), ("NSM_REGISTER_SERVICE", "false".into())];
        start_nse(&mut lab, &node, name, "icmp-responder", cidr, &env).await.unwrap();
    }
    assert_eq!(nse_names(&k), ["forwarder-node1", "nse1", "nse2"]);
    // The forwarder labels itself from its downward-API env.
    let labels = output_text(&k.kubectl(
        &["get", "nse", "-n", NS, "forwarder-node1", "-o", "jsonpath={.spec.network_service_labels.forwarder.labels}"],
        "",
    ));
    let labels: serde_json::Value = serde_json::from_str(&labels).unwrap();
    assert_eq!((labels["nodeName"].as_str(), labels["podName"].as_str()), (Some("node1"), Some("forwarder-node1")));
    // The nsmgr registered the endpoints with its own URL, as upstream.
    let url = output_text(&k.kubectl(&["get", "nse", "-n", NS, "nse1", "-o", "jsonpath={.spec.url}"], ""));
    assert!(url.starts_with("tcp://127.0.0.1:5001"), "{url}");

    // The service applied with kubectl (upstream shape) selects green,
    // then, edited, blue: each client lands where the object says.
    let service = |app: &str| {
        format!(
            "apiVersion: networkservicemesh.io/v1\nkind: NetworkService\nmetadata: {{name: icmp-responder, namespace: default}}\n\
             spec:\n  payload: IP\n  matches:\n  - routes:\n    - destination_selector: {{app: {app}}}\n"
        )
    };
    let mut n = 0;
    let mut connect = |lab: &mut nsm_lab::Lab| {
        n += 1;
        let client = lab.add_netns(&format!("nsc{n}")).unwrap();
        let run = nsc_init(lab, &node, &client, mesh::ICMP, &[]).unwrap();
        assert!(run.ok, "{}\n{}", run.stderr, lab.log_tail("nsmgr-node1", 20));
        let s = &run.summaries[0];
        let dst = s.dst_ips[0].split('/').next().unwrap().to_string();
        let (ok, out) = ping(lab, &client, "nsm-1", &dst, 1).unwrap();
        assert!(ok, "{out}");
        s.nse.clone()
    };
    k.apply(&service("green"));
    for _ in 0..2 {
        assert_eq!(connect(&mut lab), "nse2");
    }
    k.apply(&service("blue"));
    let picked = eventually_pick(&mut lab, &mut connect, "nse1").await;
    assert_eq!(picked, "nse1", "the edited selector is followed");
    assert_eq!(connect(&mut lab), "nse1");

    // A selector no endpoint matches: the client is told why.
    k.apply(
        "apiVersion: networkservicemesh.io/v1\nkind: NetworkService\nmetadata: {name: nobody-home, namespace: default}\n\
         spec:\n  matches:\n  - routes:\n    - destination_selector: {app: nobody}\n",
    );
    let other = lab.add_netns("nobody").unwrap();
    let run =
        nsc_init(&lab, &node, &other, "kernel://nobody-home/nsm-1", &[("NSM_REQUEST_TIMEOUT", "3s".into())]).unwrap();
    assert!(!run.ok, "{}", run.stdout);
    assert!(run.stderr.contains("nobody-home"), "{}", run.stderr);

    // A restarted registry has everything: a new client still connects.
    lab.stop("registry-node1", Duration::from_secs(5)).unwrap();
    mesh::start_k8s_registry(&mut lab, &node, &k.kubeconfig(), NS, &opts).await.unwrap();
    assert_eq!(connect(&mut lab), "nse1", "after a registry restart");

    // An endpoint that stops unregisters: its object goes.
    lab.stop("nse1", Duration::from_secs(5)).unwrap();
    assert!(
        eventually_async(Duration::from_secs(10), || async { nse_names(&k) == ["forwarder-node1", "nse2"] }).await,
        "left: {:?}",
        nse_names(&k)
    );
    lab.teardown();
}
