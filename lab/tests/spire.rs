//! The lab on real SPIRE (`NodeOpts::identity = Provider::Spire`, `nsm-lab
//! run --spire`), where it goes wrong: a program without a registration
//! entry gets no SVID (the unix workload attestor tells programs apart by
//! executable path), a lab keeps the provider it started with, and missing
//! SPIRE binaries are reported before anything is set up. The paths that
//! work are in `demo.rs` and `go_sdk_peers.rs`. Needs root.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use nsm_lab::identity::{self, Provider};
use nsm_lab::mesh::{self, NodeOpts, nsc_env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_without_an_entry_gets_no_svid_and_says_so() {
    let opts = NodeOpts { identity: Provider::Spire, ..Default::default() };
    let (mut lab, node, _nse) = mesh::single_node("spnoid", &opts, "172.16.40.0/31").await;
    let pod = lab.add_netns("pod").unwrap();
    // The same nsc, from a path no entry selects.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("nsc");
    std::fs::copy(lab.bin("nsc"), &copy).unwrap();
    let mut env = nsc_env(&lab, &node, mesh::ICMP);
    env.push(("NSM_SVID_TIMEOUT", "2s".into()));
    let out = lab.run_once(&pod, &copy.display().to_string(), &["init"], &env, Duration::from_secs(30)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unregistered program must not connect: {err}");
    assert!(err.contains("no identity issued") && err.contains("agent-node1/agent.sock"), "{err}");
    // The registered nsc at the workspace path does connect.
    let r = mesh::nsc_init(&lab, &node, &pod, mesh::ICMP, &[]).unwrap();
    assert!(r.ok, "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_keeps_the_identity_provider_it_started_with() {
    let mut lab = mesh::test_lab("spmix");
    identity::ensure(&mut lab, 1, Provider::Dev, "1h").await.unwrap();
    let e = identity::ensure(&mut lab, 1, Provider::Spire, "1h").await.unwrap_err().to_string();
    assert_eq!(e, "this lab's identities come from nsm-spiffe-dev, not SPIRE");
    assert!(!lab.daemons().iter().any(|d| d.starts_with("spire-server")), "{:?}", lab.daemons());
}

#[test]
fn the_demo_names_missing_spire_binaries_and_leaves_nothing() {
    let bin = nsm_lab::default_bin_dir().unwrap().join("nsm-lab");
    let prefix = format!("t{}spbin", std::process::id() % 100000);
    let out = Command::new(bin)
        .args(["run", "--spire", "--prefix", &prefix])
        .env("NSM_SPIRE_BIN_DIR", "/nonexistent/spire")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent/spire (the spire peers' directory) does not exist"), "{err}");
    // Refused in the first step, before a node or any SPIRE process started.
    assert!(said.contains("[1/8]") && !said.contains("up ("), "{said}");
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!left.iter().any(|n| n.starts_with(&format!("{prefix}-"))), "{left:?}");
    assert!(!std::path::Path::new("/run/nsm-lab").join(&prefix).exists(), "state directory left");
}
