//! `nsm-admission-webhook` (the binary) registered with a real
//! kube-apiserver, which calls it when objects are created: the stored
//! objects carry the injected client, or nothing; a malformed annotation is
//! refused by name; the webhook's configuration is its own (taken over by a
//! newer instance, deleted when it stops); rotated certificates keep the
//! API server calling it. No kubelet runs here: pods are stored, not
//! started (`webhook_in_lab.rs` runs what is stored).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::Api;
use nsm_k8s::testing::webhook::{TEST_IMAGE, Webhook};
use nsm_k8s::testing::{ApiServer, ApiServerOpts, eventually_async};
use nsm_sdk::testing::{ok_output, output_text};
use serde_json::Value;

const NSURL: &str = "kernel://icmp-responder/nsm-1";

async fn api_server() -> ApiServer {
    let k = ApiServer::start_with(ApiServerOpts { crds: false, ..Default::default() }).await;
    for ns in ["nsm-system", "apps"] {
        k.create_namespace(ns).await;
    }
    k
}

fn pod_yaml(name: &str, namespace: &str, annotation: Option<&str>) -> String {
    let ann = annotation.map(|a| format!("  annotations:\n    networkservicemesh.io: \"{a}\"\n")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{app: {name}}}\n{ann}\
         spec:\n  containers:\n  - name: app\n    image: alpine\n"
    )
}

fn get(k: &ApiServer, what: &str, namespace: &str) -> Value {
    let out = ok_output(&k.kubectl(&["get", what, "-n", namespace, "-o", "json"], ""));
    serde_json::from_str(&out).unwrap()
}

fn names(list: &Value) -> Vec<String> {
    list.as_array().into_iter().flatten().map(|c| c["name"].as_str().unwrap().to_string()).collect()
}

fn env_of(c: &Value, name: &str) -> Value {
    c["env"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned().unwrap_or(Value::Null)
}

/// What an injected pod spec must carry.
fn assert_injected(spec: &Value, nsurls: &str, what: &str) {
    assert_eq!(names(&spec["initContainers"]), ["nsc-init"], "{what}");
    assert_eq!(names(&spec["containers"]), ["app", "nsc"], "{what}");
    for c in [&spec["initContainers"][0], &spec["containers"][1]] {
        assert_eq!(c["image"], TEST_IMAGE, "{what}");
        assert_eq!(env_of(c, "NSM_NETWORK_SERVICES")["value"], nsurls, "{what}");
        assert_eq!(env_of(c, "SPIFFE_ENDPOINT_SOCKET")["value"], "unix:///run/spire/sockets/agent.sock", "{what}");
        assert_eq!(env_of(c, "NSM_CONNECT_TO")["value"], "unix:///var/lib/networkservicemesh/nsm.io.sock", "{what}");
        assert_eq!(env_of(c, "POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name", "{what}");
        assert!(env_of(c, "NSM_NAME")["value"].as_str().unwrap().starts_with("$(POD_NAME)"), "{what}");
        assert_eq!(names(&c["volumeMounts"]), ["spire-agent-socket", "nsm-socket"], "{what}");
    }
    assert_eq!(spec["initContainers"][0]["args"], serde_json::json!(["init"]), "{what}");
    assert_eq!(spec["containers"][1]["args"], serde_json::json!(["run"]), "{what}");
    assert_eq!(names(&spec["volumes"]), ["spire-agent-socket", "nsm-socket"], "{what}");
    assert_eq!(spec["volumes"][0]["hostPath"]["path"], "/run/spire/sockets", "{what}");
    assert_eq!(spec["volumes"][1]["hostPath"]["path"], "/var/lib/networkservicemesh", "{what}");
}

#[tokio::test]
async fn the_api_server_calls_the_webhook_and_stores_what_it_injected() {
    let k = api_server().await;
    k.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: annotated\n  annotations:\n    \
         networkservicemesh.io: kernel://from-namespace/nsm-1\n",
    );
    let w = Webhook::start(&k, "nsm-webhook", &[]).await;

    // The configuration it registered.
    let cfg: Api<MutatingWebhookConfiguration> = Api::all(k.client());
    let c = cfg.get("nsm-webhook").await.unwrap();
    let hook = &c.webhooks.as_ref().unwrap()[0];
    assert_eq!(hook.name, "nsm-webhook.networkservicemesh.io");
    assert_eq!(hook.client_config.url.as_deref(), Some(format!("https://127.0.0.1:{}/mutate", w.port).as_str()));
    assert!(String::from_utf8_lossy(&hook.client_config.ca_bundle.as_ref().unwrap().0).contains("BEGIN CERTIFICATE"));
    assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));

    // An annotated pod: stored with the client injected.
    k.apply(&pod_yaml("client", "apps", Some(NSURL)));
    let pod = get(&k, "pod/client", "apps");
    assert_injected(&pod["spec"], NSURL, "annotated pod");
    assert_eq!(pod["metadata"]["labels"]["spiffe.io/spiffe-id"], "true");
    assert_eq!(pod["metadata"]["labels"]["app"], "client");

    // Not annotated: stored as sent.
    k.apply(&pod_yaml("plain", "apps", None));
    let plain = get(&k, "pod/plain", "apps");
    assert_eq!(names(&plain["spec"]["containers"]), ["app"]);
    assert!(plain["spec"].get("initContainers").is_none());
    assert!(plain["metadata"]["labels"].get("spiffe.io/spiffe-id").is_none());

    // Not annotated itself, in an annotated namespace.
    k.apply(&pod_yaml("from-ns", "annotated", None));
    assert_injected(
        &get(&k, "pod/from-ns", "annotated")["spec"],
        "kernel://from-namespace/nsm-1",
        "namespace annotation",
    );

    // A Deployment: its pod template.
    k.apply(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: apps\n  annotations:\n    \
         networkservicemesh.io: kernel://a/nsm-1,kernel://b/nsm-2\nspec:\n  selector: {matchLabels: {app: web}}\n  \
         template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - {name: app, image: nginx}\n",
    );
    let d = get(&k, "deployment/web", "apps");
    assert_injected(&d["spec"]["template"]["spec"], "kernel://a/nsm-1,kernel://b/nsm-2", "deployment");
    assert_eq!(d["spec"]["template"]["metadata"]["labels"]["spiffe.io/spiffe-id"], "true");

    // The other workload kinds, through the real API server (dry run).
    for (kind, api, extra) in [
        ("StatefulSet", "apps/v1", "  serviceName: s\n  selector: {matchLabels: {app: w}}\n"),
        ("DaemonSet", "apps/v1", "  selector: {matchLabels: {app: w}}\n"),
        ("ReplicaSet", "apps/v1", "  selector: {matchLabels: {app: w}}\n"),
        ("Job", "batch/v1", ""),
    ] {
        let restart = if kind == "Job" { "      restartPolicy: Never\n" } else { "" };
        let y = format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: w\n  namespace: apps\n  annotations:\n    \
             networkservicemesh.io: {NSURL}\nspec:\n{extra}  template:\n    metadata: {{labels: {{app: w}}}}\n    \
             spec:\n{restart}      containers:\n      - {{name: app, image: nginx}}\n"
        );
        let out = ok_output(&k.kubectl(&["create", "--dry-run=server", "-o", "json", "-f", "-"], &y));
        let obj: Value = serde_json::from_str(&out).unwrap();
        assert_injected(&obj["spec"]["template"]["spec"], NSURL, kind);
    }

    // Sent again as it is stored: not injected twice.
    let mut again = pod.clone();
    again["metadata"] =
        serde_json::json!({"name": "client-copy", "namespace": "apps", "annotations": pod["metadata"]["annotations"]});
    let out = ok_output(&k.kubectl(&["create", "-o", "json", "-f", "-"], &again.to_string()));
    let copy: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(names(&copy["spec"]["initContainers"]), ["nsc-init"]);
    assert_eq!(names(&copy["spec"]["containers"]), ["app", "nsc"]);
    assert_eq!(names(&copy["spec"]["volumes"]), ["spire-agent-socket", "nsm-socket"]);

    // The webhook's own namespace is never sent to it.
    k.apply(&pod_yaml("own", "nsm-system", Some(NSURL)));
    assert!(get(&k, "pod/own", "nsm-system")["spec"].get("initContainers").is_none());
    assert!(w.log_tail().contains("injected the NSM client"), "{}", w.log_tail());
}

#[tokio::test]
async fn a_malformed_annotation_is_refused_naming_the_nsurl_and_nothing_is_stored() {
    let k = api_server().await;
    let _w = Webhook::start(&k, "nsm-webhook", &[]).await;
    for bad in ["kernel://icmp-responder/nsm-1,kernel:/oops", "vfio://x/nsm-1", "kernel://svc/this-name-is-too-long"] {
        let o = k.kubectl(&["apply", "-f", "-"], &pod_yaml("bad", "apps", Some(bad)));
        let text = output_text(&o);
        assert!(!o.status.success(), "{bad} admitted: {text}");
        let shown = bad.rsplit(',').next().unwrap();
        assert!(text.contains("admission webhook") && text.contains(shown), "{bad}: {text}");
    }
    let left = output_text(&k.kubectl(&["get", "pods", "-n", "apps", "-o", "name"], ""));
    assert_eq!(left.trim(), "");
}

#[tokio::test]
async fn the_configuration_belongs_to_the_newest_instance_and_goes_with_it() {
    let k = api_server().await;
    let cfg: Api<MutatingWebhookConfiguration> = Api::all(k.client());
    let mut old = Webhook::start(&k, "nsm-webhook", &[]).await;
    // A rolling update: the new instance takes over before the old stops.
    let mut new = Webhook::start(&k, "nsm-webhook", &[]).await;
    assert_eq!(old.stop(), Some(0), "{}", old.log_tail());
    assert!(old.log_tail().contains("left in place"), "{}", old.log_tail());
    assert!(cfg.get_opt("nsm-webhook").await.unwrap().is_some(), "the old instance must not delete the new one's");
    k.apply(&pod_yaml("after-update", "apps", Some(NSURL)));
    assert_injected(&get(&k, "pod/after-update", "apps")["spec"], NSURL, "served by the new instance");
    assert_eq!(new.stop(), Some(0), "{}", new.log_tail());
    assert!(cfg.get_opt("nsm-webhook").await.unwrap().is_none(), "the last instance removes its configuration");
    // Without it, pods are admitted unchanged again (nothing left behind).
    k.apply(&pod_yaml("after-stop", "apps", Some(NSURL)));
    assert!(get(&k, "pod/after-stop", "apps")["spec"].get("initContainers").is_none());
}

#[tokio::test]
async fn rotated_certificates_keep_the_api_server_calling_the_webhook() {
    let k = api_server().await;
    let lifetime = Duration::from_secs(8);
    let w = Webhook::start(&k, "nsm-webhook", &[("NSM_CERT_LIFETIME", "8s")]).await;
    let t0 = Instant::now();
    let cfg: Api<MutatingWebhookConfiguration> = Api::all(k.client());
    let bundle = || async {
        let c = cfg.get("nsm-webhook").await.unwrap();
        c.webhooks.unwrap()[0].client_config.ca_bundle.clone().unwrap().0
    };
    let first = bundle().await;
    assert!(
        eventually_async(lifetime, || async { bundle().await != first }).await,
        "the caBundle was not renewed within the lifetime:\n{}",
        w.log_tail()
    );
    // Create pods past the first certificate's expiry: every one is
    // admitted and injected (a failed call would refuse it: failurePolicy
    // Fail).
    let mut i = 0;
    while t0.elapsed() < lifetime + Duration::from_secs(3) {
        i += 1;
        let name = format!("p{i}");
        let o = k.kubectl(&["apply", "-f", "-"], &pod_yaml(&name, "apps", Some(NSURL)));
        assert!(o.status.success(), "pod {name} at {:?}: {}\n{}", t0.elapsed(), output_text(&o), w.log_tail());
        assert_injected(&get(&k, &format!("pod/{name}"), "apps")["spec"], NSURL, &name);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert!(w.log_tail().contains("webhook certificate renewed"), "{}", w.log_tail());
}
