//! Every binary's command line, as an operator meets it: `--help` exits 0
//! and documents the upstream environment variables; an unknown flag exits
//! 64 (EX_USAGE) with clap's explanation naming it. The debug builds these
//! tests run also check each command definition (clap's debug asserts run
//! when the command line is parsed).
#![allow(clippy::unwrap_used)]

use std::process::Command;

/// `(binary, environment variables its --help must name)`.
const BINARIES: &[(&str, &[&str])] = &[
    ("nsmgr", &["NSM_NAME", "NSM_LISTEN_ON", "NSM_REGISTRY_URL", "NSM_MAX_TOKEN_LIFETIME", "SPIFFE_ENDPOINT_SOCKET"]),
    ("forwarder", &["NSM_CONNECT_TO", "NSM_TUNNEL_IP", "NSM_MECHANISM_PRIORITY", "NSM_WIREGUARD_BACKEND"]),
    ("nse-icmp-responder", &["NSM_SERVICE_NAMES", "NSM_CIDR_PREFIX", "NSM_PAYLOAD", "NSM_LABELS"]),
    ("nsc", &["NSM_NETWORK_SERVICES", "NSM_CONNECT_TO", "NSM_REQUEST_TIMEOUT"]),
    ("nsm-registry", &["NSM_LISTEN_ON", "NSM_EXPIRE_PERIOD", "NSM_DOMAIN_REGISTRIES"]),
    ("nsm-registry-k8s", &["NSM_LISTEN_ON", "NSM_NAMESPACE", "NSM_KUBECONFIG", "NSM_EXPIRE_PERIOD"]),
    (
        "nsm-admission-webhook",
        &[
            "NSM_ANNOTATION",
            "NSM_INIT_CONTAINER_IMAGES",
            "NSM_CONTAINER_IMAGES",
            "NSM_LABELS",
            "NSM_ENVS",
            "NSM_NAMESPACE",
        ],
    ),
    ("nsm-spiffe-dev", &["SPIFFE_DEV_LISTEN_ON"]),
    ("nsm-lab", &[]),
];

#[test]
fn every_binary_explains_itself_and_refuses_unknown_flags() {
    let dir = nsm_lab::default_bin_dir().unwrap();
    for (bin, envs) in BINARIES {
        let o = Command::new(dir.join(bin)).arg("--help").env_clear().output().unwrap();
        let help = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(0), "{bin} --help: {}", String::from_utf8_lossy(&o.stderr));
        assert!(help.contains("Usage:"), "{bin} --help:\n{help}");
        for e in *envs {
            assert!(help.contains(&format!("[env: {e}")), "{bin} --help does not document {e}:\n{help}");
        }
        let o = Command::new(dir.join(bin)).arg("--no-such-flag").env_clear().output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(64), "{bin} --no-such-flag: {err}");
        assert!(err.contains("--no-such-flag"), "{bin}: {err}");
    }
}
