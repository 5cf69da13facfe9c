#![allow(clippy::unwrap_used)]

use super::*;

fn inj() -> Injection {
    let (init_containers, containers) = container_specs(
        &["ghcr.io/nsm-rs/nsc:v1".into()],
        &["nsc".into()],
        &["init".into()],
        &["ghcr.io/nsm-rs/nsc:v1".into()],
        &["nsc".into()],
        &["run".into()],
    );
    Injection {
        annotation: "networkservicemesh.io".into(),
        nsurl_env: "NSM_NETWORK_SERVICES".into(),
        init_containers,
        containers,
        envs: vec![("NSM_LOG_LEVEL".into(), "DEBUG".into())],
        labels: [("spiffe.io/spiffe-id".to_string(), "true".to_string())].into(),
        resources: json!({"limits": {"cpu": "200m", "memory": "80Mi"}, "requests": {"cpu": "100m", "memory": "40Mi"}}),
    }
}

fn pod(annotation: Option<&str>) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "namespace": "default", "labels": {"app": "client"}},
        "spec": {"containers": [{"name": "app", "image": "alpine"}]}
    });
    if let Some(a) = annotation {
        p["metadata"]["annotations"] = json!({"networkservicemesh.io": a});
    }
    p
}

fn patched(kind: &str, obj: &Value, ns: &NamespaceInfo) -> Value {
    match decide(&inj(), kind, obj, ns) {
        Decision::Patch(p) => {
            let mut o = obj.clone();
            json_patch::patch(&mut o, &p).unwrap();
            o
        }
        other => panic!("expected a patch, got {other:?}"),
    }
}

fn env_names(c: &Value) -> Vec<String> {
    c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn image_names_are_basenames_without_tag_or_digest() {
    assert_eq!(image_name("ghcr.io/networkservicemesh/cmd-nsc-init:v1.14.0"), "cmd-nsc-init");
    assert_eq!(image_name("localhost:5000/nsc@sha256:abc"), "nsc");
    assert_eq!(image_name("nsc"), "nsc");
    let i = inj();
    assert_eq!(i.init_containers[0].name, "nsc-init", "renamed: a sidecar has the name");
    assert_eq!(i.containers[0].name, "nsc");
}

#[test]
fn an_annotated_pod_gets_containers_env_volumes_and_labels() {
    let p = patched("Pod", &pod(Some("kernel://icmp-responder/nsm-1")), &NamespaceInfo::default());
    let init = &p["spec"]["initContainers"][0];
    assert_eq!(init["name"], "nsc-init");
    assert_eq!(init["command"], json!(["nsc"]));
    assert_eq!(init["args"], json!(["init"]));
    assert_eq!(
        env_names(init),
        ["NSM_LOG_LEVEL", "SPIFFE_ENDPOINT_SOCKET", "NSM_CONNECT_TO", "POD_NAME", "NSM_NETWORK_SERVICES", "NSM_NAME"]
    );
    assert_eq!(init["env"][3]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(init["env"][4]["value"], "kernel://icmp-responder/nsm-1");
    let name = init["env"][5]["value"].as_str().unwrap();
    assert!(name.starts_with("$(POD_NAME)-") && name.len() > 20, "no generateName: a unique suffix: {name}");
    assert_eq!(init["resources"]["limits"]["memory"], "80Mi");
    let containers = p["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 2);
    assert_eq!(containers[0]["name"], "app", "the pod's own container stays first");
    assert_eq!(containers[1]["args"], json!(["run"]));
    assert_eq!(containers[1]["env"][5]["value"], name, "init container and sidecar share NSM_NAME");
    let vols = p["spec"]["volumes"].as_array().unwrap();
    assert_eq!(
        vols[0],
        json!({"name": "spire-agent-socket", "hostPath": {"path": "/run/spire/sockets", "type": "Directory"}})
    );
    assert_eq!(vols[1]["hostPath"]["path"], "/var/lib/networkservicemesh");
    assert_eq!(
        init["volumeMounts"][1],
        json!({"name": "nsm-socket", "mountPath": "/var/lib/networkservicemesh", "readOnly": true})
    );
    assert_eq!(p["metadata"]["labels"], json!({"app": "client", "spiffe.io/spiffe-id": "true"}));
    assert!(init.get("securityContext").is_none());
}

#[test]
fn unannotated_empty_and_already_patched_objects_are_left_alone() {
    let ns = NamespaceInfo::default();
    assert!(matches!(decide(&inj(), "Pod", &pod(None), &ns), Decision::Skip(_)));
    assert!(matches!(decide(&inj(), "Pod", &pod(Some("  ")), &ns), Decision::Skip(_)));
    let once = patched("Pod", &pod(Some("kernel://a/nsm-1")), &ns);
    assert!(matches!(decide(&inj(), "Pod", &once, &ns), Decision::Skip(s) if s.contains("already")));
    assert!(matches!(decide(&inj(), "ConfigMap", &pod(Some("kernel://a/nsm-1")), &ns), Decision::Skip(_)));
}

#[test]
fn a_pod_without_its_own_annotation_takes_its_namespaces() {
    let ns = NamespaceInfo {
        annotations: [("networkservicemesh.io".to_string(), "kernel://from-ns/nsm-1".to_string())].into(),
        ..Default::default()
    };
    let p = patched("Pod", &pod(None), &ns);
    assert_eq!(p["spec"]["initContainers"][0]["env"][4]["value"], "kernel://from-ns/nsm-1");
    let own = patched("Pod", &pod(Some("kernel://own/nsm-1")), &ns);
    assert_eq!(own["spec"]["initContainers"][0]["env"][4]["value"], "kernel://own/nsm-1", "its own wins");
    // Workloads do not take the namespace's: their pods will.
    let d =
        json!({"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": []}}}});
    assert!(matches!(decide(&inj(), "Deployment", &d, &ns), Decision::Skip(_)));
}

#[test]
fn workloads_get_their_pod_template_patched() {
    for kind in ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"] {
        let w = json!({
            "kind": kind,
            "metadata": {"name": "w", "annotations": {"networkservicemesh.io": "kernel://a/nsm-1,kernel://b/nsm-2"}},
            "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "x"}]}}}
        });
        let p = patched(kind, &w, &NamespaceInfo::default());
        let t = &p["spec"]["template"];
        assert_eq!(
            t["spec"]["initContainers"][0]["env"][5]["value"], "$(POD_NAME)",
            "{kind}: pods have generated names"
        );
        assert_eq!(t["spec"]["initContainers"][0]["env"][4]["value"], "kernel://a/nsm-1,kernel://b/nsm-2");
        assert_eq!(t["spec"]["containers"].as_array().unwrap().len(), 2, "{kind}");
        assert_eq!(t["metadata"]["labels"]["spiffe.io/spiffe-id"], "true", "{kind}: template metadata created");
        assert!(p["metadata"].get("labels").is_none(), "{kind}: the workload's own labels untouched");
    }
    let owned = json!({
        "kind": "ReplicaSet",
        "metadata": {"name": "rs", "annotations": {"networkservicemesh.io": "kernel://a/nsm-1"},
                     "ownerReferences": [{"kind": "Deployment", "name": "d", "apiVersion": "apps/v1", "uid": "u"}]},
        "spec": {"template": {"spec": {"containers": []}}}
    });
    assert!(matches!(decide(&inj(), "ReplicaSet", &owned, &NamespaceInfo::default()), Decision::Skip(_)));
}

#[test]
fn a_malformed_nsurl_is_denied_by_name() {
    let ns = NamespaceInfo::default();
    match decide(&inj(), "Pod", &pod(Some("kernel://good/nsm-1,kernel:/bad")), &ns) {
        Decision::Deny(m) => assert!(m.contains("kernel:/bad") && m.contains("networkservicemesh.io"), "{m}"),
        other => panic!("{other:?}"),
    }
    let bad_ns = NamespaceInfo {
        annotations: [("networkservicemesh.io".to_string(), "vfio://x/nsm-1".to_string())].into(),
        ..Default::default()
    };
    match decide(&inj(), "Pod", &pod(None), &bad_ns) {
        Decision::Deny(m) => assert!(m.contains("namespace") && m.contains("vfio://x/nsm-1"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pod_security_levels_switch_to_csi_volumes_and_locked_down_containers() {
    let restricted = NamespaceInfo { enforce: "restricted".into(), ..Default::default() };
    let p = patched("Pod", &pod(Some("kernel://a/nsm-1")), &restricted);
    assert_eq!(
        p["spec"]["volumes"][0],
        json!({"name": "spire-agent-socket", "csi": {"driver": "csi.spiffe.io", "readOnly": true}})
    );
    assert_eq!(p["spec"]["volumes"][1]["csi"]["driver"], "csi.networkservicemesh.io");
    let sc = &p["spec"]["initContainers"][0]["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    let baseline = NamespaceInfo { enforce: "baseline".into(), ..Default::default() };
    let p = patched("Pod", &pod(Some("kernel://a/nsm-1")), &baseline);
    assert!(p["spec"]["volumes"][0].get("csi").is_some());
    assert!(p["spec"]["initContainers"][0].get("securityContext").is_none());
}

#[test]
fn sriov_tokens_become_resource_limits_of_the_init_container() {
    let a = "kernel://a/nsm-1?sriovToken=worker.domain/10G,kernel://b/nsm-2?sriovToken=worker.domain/10G";
    let p = patched("Pod", &pod(Some(a)), &NamespaceInfo::default());
    assert_eq!(p["spec"]["initContainers"][0]["resources"]["limits"]["worker.domain/10G"], "2");
    assert!(p["spec"]["containers"][1]["resources"]["limits"].get("worker.domain/10G").is_none());
}

#[test]
fn existing_volumes_and_user_env_are_kept() {
    let mut p = pod(Some("kernel://a/nsm-1"));
    p["spec"]["volumes"] = json!([{"name": "nsm-socket", "emptyDir": {}}]);
    let mut i = inj();
    i.envs.push(("NSM_CONNECT_TO".into(), "tcp://10.0.0.1:5001".into()));
    let Decision::Patch(patch) = decide(&i, "Pod", &p, &NamespaceInfo::default()) else { panic!() };
    json_patch::patch(&mut p, &patch).unwrap();
    let vols = p["spec"]["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2);
    assert_eq!(vols[0], json!({"name": "nsm-socket", "emptyDir": {}}));
    let env = &p["spec"]["initContainers"][0]["env"];
    let connect: Vec<&Value> = env.as_array().unwrap().iter().filter(|e| e["name"] == "NSM_CONNECT_TO").collect();
    assert_eq!(connect.len(), 1);
    assert_eq!(connect[0]["value"], "tcp://10.0.0.1:5001");
}
