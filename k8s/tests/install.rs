//! Installing: the committed CRD manifests are what `nsm-registry-k8s
//! --print-crds` prints and install with the real kubectl; a registry
//! pointed at a kubeconfig it cannot use exits with a one-line reason and
//! leaves no socket behind.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use nsm_k8s::crd::CRD_DIR;
use nsm_k8s::testing::{ApiServer, ApiServerOpts};
use nsm_sdk::testing::{ok_output, output_text};

fn bin(name: &str) -> std::path::PathBuf {
    nsm_lab::default_bin_dir().unwrap().join(name)
}

#[tokio::test]
async fn the_committed_crds_are_printed_by_the_registry_and_install_with_kubectl() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(CRD_DIR);
    let printed = ok_output(&Command::new(bin("nsm-registry-k8s")).arg("--print-crds").output().unwrap());
    let committed: Vec<String> = ["networkservices.yaml", "networkserviceendpoints.yaml"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .collect();
    assert_eq!(printed, committed.join("---\n"));

    let k = ApiServer::start_with(ApiServerOpts { crds: false, ..Default::default() }).await;
    let out = ok_output(&k.kubectl(&["apply", "-f", dir.to_str().unwrap()], ""));
    assert!(out.contains("networkservices.networkservicemesh.io created"), "{out}");
    assert!(out.contains("networkserviceendpoints.networkservicemesh.io created"), "{out}");
    ok_output(&k.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/networkservices.networkservicemesh.io",
            "crd/networkserviceendpoints.networkservicemesh.io",
        ],
        "",
    ));
    let out = k.apply(
        "apiVersion: networkservicemesh.io/v1\nkind: NetworkService\nmetadata: {name: a}\nspec: {payload: IP}\n",
    );
    assert!(out.contains("created"), "{out}");
    // Applying the same manifests again changes nothing.
    let out = ok_output(&k.kubectl(&["apply", "-f", dir.to_str().unwrap()], ""));
    assert!(out.contains("unchanged"), "{out}");
}

#[test]
fn a_kubeconfig_that_cannot_be_read_is_named_and_no_socket_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("registry.sock");
    let o = Command::new(bin("nsm-registry-k8s"))
        .env_clear()
        .env("NSM_INSECURE", "true")
        .env("NSM_LISTEN_ON", format!("unix://{}", sock.display()))
        .env("NSM_KUBECONFIG", dir.path().join("missing-kubeconfig"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = output_text(&o);
    assert!(err.contains("cannot read the kubeconfig") && err.contains("missing-kubeconfig"), "{err}");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn the_webhook_refuses_a_configuration_it_cannot_use_naming_the_setting() {
    let run = |env: &[(&str, &str)]| {
        let mut c = Command::new(bin("nsm-admission-webhook"));
        c.env_clear().env("NSM_LISTEN_ON", "tcp://127.0.0.1:0");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        (o.status.code(), output_text(&o))
    };
    let image = ("NSM_CONTAINER_IMAGES", "ghcr.io/nsm-rs/nsc:v1");
    for (env, says) in [
        (vec![], "NSM_INIT_CONTAINER_IMAGES"),
        (vec![image, ("NSM_WEBHOOK_MODE", "spire")], "NSM_WEBHOOK_MODE=spire"),
        (vec![image, ("NSM_SIDECAR_LIMITS_CPU", "lots")], "NSM_SIDECAR_LIMITS_CPU"),
        (vec![image, ("NSM_WEBHOOK_URL", "http://127.0.0.1:9443/mutate")], "https only"),
        (vec![image, ("NSM_ENVS", "NSM_LOG_LEVEL")], "NAME=value"),
        (vec![image, ("NSM_LABELS", "novalue")], "novalue"),
    ] {
        let (code, text) = run(&env);
        assert_eq!(code, Some(64), "{env:?}: {text}");
        assert!(text.contains(says), "{env:?} should name {says}: {text}");
    }
}
