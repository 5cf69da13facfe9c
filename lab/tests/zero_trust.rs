//! Zero trust with the real daemons: mutual TLS with SVIDs from the lab's
//! `nsm-spiffe-dev`, ES256 per-hop tokens, and the policies of every hop.
//! Needs root (CI runs as root); each test has its own lab, removed when it
//! ends, also on failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use nsm_api::connection::{Connection, Path, PathSegment};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_client::NetworkServiceClient;
use nsm_api::registry::NetworkServiceEndpoint;
use nsm_lab::Lab;
use nsm_lab::mesh::{self, ICMP, NodeOpts, connections, links, nsc_init, ping, wait_until};
use nsm_sdk::networkservice::chain::Context;
use nsm_sdk::registry::{NseRegistry, find_nses};
use nsm_sdk::security::SvidSource;
use nsm_sdk::security::jwt::{self, Claims};
use nsm_sdk::tools::grpc::dial_with;
use nsm_sdk::tools::token::{self, Token};

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn sign(pkcs8: &[u8], sub: &str, aud: &str, exp: i64) -> String {
    jwt::sign_es256(pkcs8, &Claims { sub: sub.into(), aud: vec![aud.into()], exp, iat: Some(now()) }).unwrap()
}

/// A Request straight to the nsmgr at `url` as the lab, carrying `tok` as
/// its per-RPC token.
async fn request_with(lab: &Lab, url: &url::Url, service: &str, tok: Option<String>) -> tonic::Status {
    let (ch, _) = dial_with(url, Duration::from_secs(2), lab.tls()).await.unwrap();
    let mut r = tonic::Request::new(NetworkServiceRequest {
        connection: Some(Connection {
            id: "forger-1".into(),
            network_service: service.into(),
            path: Some(Path {
                index: 0,
                path_segments: vec![PathSegment { name: "forger".into(), id: "forger-1".into(), ..Default::default() }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    if let Some(t) = tok {
        token::put(r.metadata_mut(), &Token { token: t, expires: SystemTime::now() + Duration::from_secs(60) });
    }
    NetworkServiceClient::new(ch).request(r).await.unwrap_err()
}

fn assert_refused_by(st: &tonic::Status, policy: &str) {
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    assert!(
        st.message().starts_with(&format!("no sufficient privileges: policy {policy} denied")),
        "expected a refusal by {policy}: {}",
        st.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_and_foreign_registrations_are_refused_by_the_right_policy() {
    let (lab, node, _nse) = mesh::single_node("forge", &NodeOpts::default(), "172.16.60.0/31").await;
    let me = lab.tls().unwrap().svid().unwrap();
    let nsmgr_id = "spiffe://nsm.cluster1/ns/nsm-system/sa/nsmgr";
    let key = &me.private_key_pkcs8;
    let url = &node.nsmgr_url;

    // The control: a good token passes the policies; the request then fails
    // for what it asks (an unknown service), not for who asks.
    let st = request_with(&lab, url, "no-such-service", Some(sign(key, &me.spiffe_id, nsmgr_id, now() + 60))).await;
    assert_eq!(st.code(), tonic::Code::NotFound, "{st:?}");

    let cases: Vec<(&str, Option<String>)> = vec![
        ("tokens_valid", None),
        ("tokens_valid", Some("not-a-jwt".into())),
        ("tokens_expired", Some(sign(key, &me.spiffe_id, nsmgr_id, now() - 5))),
        (
            "tokens_chained",
            Some(sign(key, &me.spiffe_id, "spiffe://nsm.cluster1/ns/default/sa/someone-else", now() + 60)),
        ),
        ("prev_token_signed", {
            // Tampered: the claims say another subject, the signature is ours
            // over the original claims.
            let t = sign(key, &me.spiffe_id, nsmgr_id, now() + 60);
            let mut parts: Vec<String> = t.split('.').map(String::from).collect();
            let forged = Claims {
                sub: "spiffe://nsm.cluster1/ns/default/sa/nsc".into(),
                aud: vec![nsmgr_id.into()],
                exp: now() + 60,
                iat: None,
            };
            parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
            Some(parts.join("."))
        }),
        // Signed with our own key, in another identity's name.
        ("prev_token_signed", Some(sign(key, "spiffe://nsm.cluster1/ns/default/sa/nsc", nsmgr_id, now() + 60))),
        ("prev_token_signed", {
            // Signed by someone else: a valid SVID for our very ID from the
            // right CA, but not the key of the certificate on this connection.
            let ca = nsm_spiffe_dev::Ca::load(&lab.dir().join("spire/ca"), "nsm.cluster1").unwrap().unwrap();
            let other = ca.mint(&me.spiffe_id, Duration::from_secs(600)).unwrap();
            Some(sign(&other.private_key_pkcs8, &me.spiffe_id, nsmgr_id, now() + 60))
        }),
    ];
    for (policy, tok) in cases {
        let st = request_with(&lab, url, "icmp-responder", tok.clone()).await;
        assert_refused_by(&st, policy);
    }
    assert!(connections(&lab, url).await.unwrap().is_empty(), "nothing was set up by refused requests");
    assert!(lab.log_tail(&node.nsmgr_name, 30).contains("request refused"), "the nsmgr logs refusals");

    // Registry: the name nse1 belongs to the endpoint that registered it.
    let reg = lab.registry(url, Duration::from_secs(2));
    let ctx = Context::with_timeout(Duration::from_secs(5));
    let hijack = mesh::nse_record("nse1", "icmp-responder", "tcp://10.99.0.1:5001");
    let st = NseRegistry::register(&reg, &ctx, hijack).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("policy client_allowed denied"), "{}", st.message());
    let found =
        find_nses(&reg, &ctx, NetworkServiceEndpoint { name: "nse1".into(), ..Default::default() }).await.unwrap();
    assert!(found.iter().all(|n| n.url != "tcp://10.99.0.1:5001"), "the registration was not replaced: {found:?}");
    // A name of our own is ours to register.
    let mine = NetworkServiceEndpoint {
        name: "lab-nse".into(),
        network_service_names: vec!["icmp-responder".into()],
        url: "tcp://10.99.0.1:5001".into(),
        ..Default::default()
    };
    NseRegistry::register(&reg, &ctx, mine.clone()).await.unwrap();
    NseRegistry::unregister(&reg, &ctx, mine).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_identity_cannot_close_or_refresh_a_connection_by_its_id() {
    let (mut lab, node, _nse) = mesh::single_node("hijack", &NodeOpts::default(), "172.16.63.0/31").await;
    let pod = lab.add_netns("pod").unwrap();
    let run = nsc_init(&lab, &node, &pod, ICMP, &[]).unwrap();
    assert!(run.ok, "{}", run.stderr);
    let url = &node.nsmgr_url;
    let victim = connections(&lab, url).await.unwrap().remove(0);
    let seg = victim.path.as_ref().unwrap().path_segments[1].clone();
    // The lab (a valid SVID, a valid token) names the nsmgr's segment of the
    // nsc's connection, as a refresh or Close by its owner would.
    let me = lab.tls().unwrap().svid().unwrap();
    let tok = sign(&me.private_key_pkcs8, &me.spiffe_id, "spiffe://nsm.cluster1/ns/nsm-system/sa/nsmgr", now() + 60);
    let forged = Connection {
        id: "forger-1".into(),
        network_service: "icmp-responder".into(),
        path: Some(Path {
            index: 0,
            path_segments: vec![
                PathSegment { name: "forger".into(), id: "forger-1".into(), ..Default::default() },
                PathSegment { name: seg.name.clone(), id: seg.id.clone(), ..Default::default() },
            ],
        }),
        ..Default::default()
    };
    let (ch, _) = dial_with(url, Duration::from_secs(2), lab.tls()).await.unwrap();
    let mut client = NetworkServiceClient::new(ch);
    fn with<T>(tok: &str, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        token::put(
            r.metadata_mut(),
            &Token { token: tok.into(), expires: SystemTime::now() + Duration::from_secs(60) },
        );
        r
    }
    let refused = [
        client.close(with(&tok, forged.clone())).await.unwrap_err(),
        client
            .request(with(&tok, NetworkServiceRequest { connection: Some(forged.clone()), ..Default::default() }))
            .await
            .unwrap_err(),
    ];
    for st in refused {
        assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
        assert!(st.message().contains("established by spiffe://nsm.cluster1/ns/default/sa/nsc"), "{}", st.message());
    }
    // Still there, still working.
    assert_eq!(connections(&lab, url).await.unwrap().len(), 1);
    let (ok, out) = ping(&lab, &pod, "nsm-1", "172.16.63.0", 1).unwrap();
    assert!(ok, "{out}");
    let log = lab.log_tail(&node.nsmgr_name, 60);
    assert!(log.contains("for another identity refused"), "{log}");
}

/// Tokens per path segment, as the endpoint sees its connection.
async fn segment_tokens(lab: &Lab, url: &url::Url) -> Vec<(String, Claims)> {
    let conns = connections(lab, url).await.unwrap();
    assert_eq!(conns.len(), 1, "one connection at {url}");
    conns[0]
        .path
        .as_ref()
        .unwrap()
        .path_segments
        .iter()
        .map(|s| (s.name.clone(), jwt::decode(&s.token).map(|(_, c)| c).unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_remints_the_token_of_every_hop() {
    let (mut lab, node, nse) = mesh::single_node("remint", &NodeOpts::default(), "172.16.61.0/31").await;
    let pod = lab.add_netns("pod").unwrap();
    let run = nsc_init(&lab, &node, &pod, ICMP, &[]).unwrap();
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(run.summaries[0].spiffe_ids.len(), 4);
    assert!(
        run.summaries[0].spiffe_ids.iter().all(|i| i.starts_with("spiffe://nsm.cluster1/")),
        "{:?}",
        run.summaries[0]
    );
    let before = segment_tokens(&lab, &nse.url).await;
    assert_eq!(
        before.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["nsc", "nsmgr-node1", "forwarder-node1", "nse1"]
    );
    // Whole seconds in `iat`: let the clock move on before the refresh.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The sidecar adopts the connection and refreshes it (tokens of 3 s:
    // every ~600 ms).
    mesh::spawn_nsc_sidecar(&mut lab, "sidecar", &node, &pod, ICMP, &[("NSM_MAX_TOKEN_LIFETIME", "3s".into())])
        .unwrap();
    let t0 = Instant::now();
    loop {
        let after = segment_tokens(&lab, &nse.url).await;
        let renewed = before.iter().zip(&after).all(|((_, b), (_, a))| a.iat > b.iat && a.sub == b.sub);
        if renewed {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "not every hop re-minted its token:\nbefore {before:?}\nafter {after:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, out) = ping(&lab, &pod, "nsm-1", "172.16.61.0", 1).unwrap();
    assert!(ok, "{out}");
    lab.stop("sidecar", Duration::from_secs(5)).unwrap();
    assert!(links(&lab, &pod).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_rotation_under_a_live_connection_keeps_refreshes_and_the_wire() {
    // SVIDs of 4 s, rotated every ~2 s; tokens end with the SVID, so the
    // sidecar refreshes about twice a second.
    let opts = NodeOpts { svid_ttl: "4s".into(), ..Default::default() };
    let (mut lab, node, nse) = mesh::single_node("rotate", &opts, "172.16.62.0/31").await;
    let pod = lab.add_netns("pod").unwrap();
    let run = nsc_init(&lab, &node, &pod, ICMP, &[]).unwrap();
    assert!(run.ok, "{}", run.stderr);
    let ifindex = |lab: &Lab| {
        let o = lab.exec(&pod, &["cat", "/sys/class/net/nsm-1/ifindex"], Duration::from_secs(5)).unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let before = ifindex(&lab);
    mesh::spawn_nsc_sidecar(&mut lab, "sidecar", &node, &pod, ICMP, &[]).unwrap();
    // Several rotations of every component.
    tokio::time::sleep(Duration::from_secs(9)).await;
    for d in [&node.nsmgr_name, &node.forwarder_name, &nse.name, &"sidecar".to_string()] {
        let log = lab.log_tail(d, 400);
        assert!(
            log.matches("SVID rotated").count() >= 2,
            "{d} did not rotate its SVID twice:\n{}",
            lab.log_tail(d, 20)
        );
        assert!(!log.contains("refused"), "{d} refused something after a rotation:\n{}", lab.log_tail(d, 30));
    }
    assert!(lab.running("sidecar"), "{}", lab.log_tail("sidecar", 20));
    assert!(!lab.log_tail("sidecar", 400).contains("refresh failed"), "{}", lab.log_tail("sidecar", 30));
    // Refreshed just now (not only before the rotations), wire untouched.
    let conns = connections(&lab, &nse.url).await.unwrap();
    let iat = conns[0].path.as_ref().unwrap().path_segments[0].token.clone();
    let iat = jwt::decode(&iat).unwrap().1.iat.unwrap();
    assert!(now() - iat <= 2, "the last refresh is {} s old", now() - iat);
    assert_eq!(ifindex(&lab), before, "the interface was rebuilt");
    let (ok, out) = ping(&lab, &pod, "nsm-1", "172.16.62.0", 2).unwrap();
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_policy_file_denying_a_label_is_honoured() {
    let policies = tempfile::tempdir().unwrap();
    let file = policies.path().join("no-red.rego");
    std::fs::write(
        &file,
        "package nsm\n\n# Operators: no red connections here.\ndefault valid := false\n\nvalid if not input.labels.color == \"red\"\n",
    )
    .unwrap();
    let opts = NodeOpts::with_nsmgr_env("NSM_POLICY_FILES", &file.display().to_string());
    let (mut lab, node, _nse) = mesh::single_node("rego", &opts, "172.16.63.0/30").await;
    assert!(lab.log_tail(&node.nsmgr_name, 40).contains("no-red.rego"), "the nsmgr names its policies at start");
    let red = lab.add_netns("red").unwrap();
    let r =
        nsc_init(&lab, &node, &red, "kernel://icmp-responder/nsm-1?color=red", &[("NSM_REQUEST_TIMEOUT", "3s".into())])
            .unwrap();
    assert!(!r.ok);
    assert!(
        r.stderr.contains("no sufficient privileges") && r.stderr.contains("no-red.rego"),
        "the refusal names the policy file: {}",
        r.stderr
    );
    assert!(links(&lab, &red).unwrap().is_empty(), "nothing built for the refused client");
    let blue = lab.add_netns("blue").unwrap();
    let b = nsc_init(&lab, &node, &blue, "kernel://icmp-responder/nsm-1?color=blue", &[]).unwrap();
    assert!(b.ok, "{}", b.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_cannot_reach_a_tls_nsmgr() {
    let (mut lab, node, _nse) = mesh::single_node("plain", &NodeOpts::default(), "172.16.64.0/31").await;
    let pod = lab.add_netns("pod").unwrap();
    let r = nsc_init(&lab, &node, &pod, ICMP, &[("NSM_INSECURE", "true".into()), ("NSM_REQUEST_TIMEOUT", "3s".into())])
        .unwrap();
    assert!(!r.ok, "{}", r.stdout);
    assert!(r.stderr.contains(node.nsmgr_url.as_str()), "the error names the nsmgr: {}", r.stderr);
    assert!(r.stderr.contains("does the server require mutual TLS?"), "the error says why: {}", r.stderr);
    assert!(links(&lab, &pod).unwrap().is_empty());
    assert!(lab.log_tail(&node.nsmgr_name, 30).contains("TLS handshake refused"), "the nsmgr says why");
}

/// Start-up errors name what is wrong and exit with distinct codes.
#[test]
fn daemons_explain_missing_identity_bad_policy_files_and_bad_urls() {
    let bin = nsm_lab::default_bin_dir().unwrap().join("nsmgr");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nsm.sock");
    let run = |env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(&bin);
        c.env_clear()
            .env("NSM_LISTEN_ON", format!("unix://{}", sock.display()))
            .env("NSM_LOG_LEVEL", "ERROR")
            .envs(env.iter().copied());
        nsm_lab::env::output_with_timeout(c, Duration::from_secs(20)).unwrap()
    };
    let missing = dir.path().join("no-agent.sock");
    let o = run(&[("SPIFFE_ENDPOINT_SOCKET", &format!("unix://{}", missing.display())), ("NSM_SVID_TIMEOUT", "1s")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.starts_with("nsmgr: no SVID from the Workload API at unix://"), "{err}");
    assert!(err.contains("NSM_INSECURE=true"), "{err}");

    let bad = dir.path().join("bad.rego");
    std::fs::write(&bad, "package nsm\nvalid if {").unwrap();
    let o = run(&[("NSM_POLICY_FILES", bad.to_str().unwrap()), ("NSM_INSECURE", "true")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(err.contains("NSM_POLICY_FILES") && err.contains("bad.rego"), "{err}");
    let o = run(&[("NSM_POLICY_FILES", "/nonexistent/x.rego"), ("NSM_INSECURE", "true")]);
    assert_eq!(o.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/x.rego"));
    // A registry URL nsmgr cannot use is bad configuration too.
    let o = run(&[("NSM_REGISTRY_URL", "http://registry:5002"), ("NSM_INSECURE", "true")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(err.contains("http://registry:5002") && err.contains("--registry-url"), "{err}");
    assert!(!sock.exists(), "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_monitor_scope_own_a_peer_sees_only_its_own_connections() {
    let opts = NodeOpts::with_nsmgr_env("NSM_MONITOR_SCOPE", "own");
    let (mut lab, node, _nse) = mesh::single_node("monown", &opts, "172.16.65.0/31").await;
    let pod = lab.add_netns("pod").unwrap();
    let run = nsc_init(&lab, &node, &pod, ICMP, &[]).unwrap();
    assert!(run.ok, "{}", run.stderr);
    // The lab is another identity: the nsmgr shows it nothing; the
    // forwarder (default scope `all`) shows it the connection.
    assert!(connections(&lab, &node.nsmgr_url).await.unwrap().is_empty());
    assert_eq!(connections(&lab, &node.forwarder_url).await.unwrap().len(), 1);
    // The client's sidecar (the init container's identity) finds and adopts it.
    mesh::spawn_nsc_sidecar(&mut lab, "sidecar", &node, &pod, ICMP, &[]).unwrap();
    let adopted = || lab.log_tail("sidecar", 50).contains("adopting");
    wait_until(Duration::from_secs(10), adopted, || format!("no adoption: {}", lab.log_tail("sidecar", 20))).await;
    lab.stop("sidecar", Duration::from_secs(5)).unwrap();
    assert!(links(&lab, &pod).unwrap().is_empty());
    assert!(connections(&lab, &node.forwarder_url).await.unwrap().is_empty());
}
