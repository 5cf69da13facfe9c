//! The server in-process on a socket in a TempDir, the official `spiffe`
//! crate as the client.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Parser;
use futures::StreamExt;
use nsm_sdk::tools::grpc::{Listeners, parse_url};
use nsm_spiffe_dev::{Authority, Ca, Config, mint_svid};
use spiffe::{TrustDomain, WorkloadApiClient, X509Source};
use x509_parser::prelude::*;

/// A server on `<dir>/agent.sock`, stopped on drop.
struct Server {
    dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
    auth: Option<Authority>,
}

impl Server {
    fn sock(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }
    fn endpoint(&self) -> String {
        format!("unix:{}", self.sock().display())
    }
    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }
    async fn client(&self) -> WorkloadApiClient {
        WorkloadApiClient::connect_to(self.endpoint()).await.unwrap()
    }
}

fn cfg(dir: &Path, yaml: &str, args: &[&str]) -> Config {
    std::fs::write(dir.join("config.yaml"), yaml).unwrap();
    let url = format!("unix://{}/agent.sock", dir.display());
    let conf = dir.join("config.yaml");
    let mut argv = vec!["nsm-spiffe-dev", "--listen-on", &url, "--config", conf.to_str().unwrap()];
    argv.extend_from_slice(args);
    Config::try_parse_from(argv).unwrap()
}

/// `run` with `yaml` as the config file.
async fn start(yaml: &str, args: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), yaml, args);
    let listeners = Listeners::bind(&c.listen_on.0).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(nsm_spiffe_dev::run(c, listeners, async move {
        let _ = stopped.await;
    }));
    Server { dir, _stop: stop, auth: None }
}

/// `serve` with an [`Authority`] the test keeps (to rotate CAs, count streams).
async fn start_with_authority(yaml: &str, args: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), yaml, args);
    let auth = Authority::new(c.authority_options().unwrap()).unwrap();
    let listeners = Listeners::bind(&c.listen_on.0).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(nsm_spiffe_dev::serve(auth.clone(), listeners, async move {
        let _ = stopped.await;
    }));
    Server { dir, _stop: stop, auth: Some(auth) }
}

/// Basename of this test binary (what the server sees as `exe`).
fn my_exe() -> String {
    std::env::current_exe().unwrap().file_name().unwrap().to_str().unwrap().to_string()
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, c) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    c
}

fn signed_by(leaf_der: &[u8], ca_der: &[u8]) -> bool {
    parse(leaf_der).verify_signature(Some(parse(ca_der).public_key())).is_ok()
}

fn not_after(der: &[u8]) -> i64 {
    parse(der).validity().not_after.timestamp()
}

fn serial(der: &[u8]) -> Vec<u8> {
    parse(der).raw_serial().to_vec()
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
}

const TWO_CLUSTERS: &str = "trust_domains: [nsm.cluster1, nsm.cluster2]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_for_the_matching_rule_with_chain_key_and_federated_bundle() {
    let yaml = format!(
        "{TWO_CLUSTERS}rules:\n  - match: {{ exe: no-such-exe }}\n    spiffe_id: spiffe://nsm.cluster1/wrong\n  \
         - match: {{ exe: {exe} }}\n    spiffe_id: \"spiffe://nsm.cluster2/test/{{exe}}/{{uid}}\"\n  \
         - match: {{ uid: 0 }}\n    spiffe_id: spiffe://nsm.cluster1/root\n",
        exe = my_exe()
    );
    let s = start(&yaml, &["--svid-ttl", "10m"]).await;
    let ctx = s.client().await.fetch_x509_context().await.unwrap();
    let svid = ctx.default_svid().unwrap();
    let uid = nix::unistd::getuid().as_raw();
    assert_eq!(svid.spiffe_id().to_string(), format!("spiffe://nsm.cluster2/test/{}/{uid}", my_exe()));
    assert_eq!(svid.spiffe_id().trust_domain().to_string(), "nsm.cluster2");

    // Chain: the leaf alone, signed by the own bundle's single CA.
    assert_eq!(svid.cert_chain().len(), 1);
    let leaf_der = svid.leaf().as_bytes();
    let own = ctx.bundle_set().get(&td("nsm.cluster2")).unwrap();
    assert_eq!(own.authorities().len(), 1);
    let ca_der = own.authorities()[0].as_bytes();
    assert!(signed_by(leaf_der, ca_der));

    // The leaf: EC P-256, CA:false, digitalSignature, server+client auth, SPIFFE ID as URI SAN, ~10m.
    let leaf = parse(leaf_der);
    assert_eq!(leaf.public_key().algorithm.algorithm, x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY);
    let curve = leaf.public_key().algorithm.parameters.as_ref().unwrap().as_oid().unwrap();
    assert_eq!(curve, x509_parser::oid_registry::OID_EC_P256);
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names, vec![GeneralName::URI(&svid.spiffe_id().to_string())]);
    let (nb, na) = (leaf.validity().not_before.timestamp(), leaf.validity().not_after.timestamp());
    assert!(nb < now_unix() && nb > now_unix() - 60, "not_before slightly in the past");
    assert!((na - now_unix() - 600).abs() <= 2, "ttl 10m");

    // The private key is P-256 PKCS#8 and belongs to the leaf.
    let key = rcgen::KeyPair::try_from(svid.private_key().as_bytes()).unwrap();
    assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    assert_eq!(rcgen::PublicKeyData::subject_public_key_info(&key), leaf.public_key().raw);

    // The CA: CA:true, keyCertSign, URI SAN spiffe://nsm.cluster2.
    let ca = parse(ca_der);
    assert!(ca.basic_constraints().unwrap().unwrap().value.ca);
    assert!(ca.key_usage().unwrap().unwrap().value.key_cert_sign());
    let san = ca.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names, vec![GeneralName::URI("spiffe://nsm.cluster2")]);

    // Federation: the other cluster's bundle comes along, and it is another CA.
    let fed = ctx.bundle_set().get(&td("nsm.cluster1")).expect("federated bundle of nsm.cluster1");
    assert_eq!(fed.authorities().len(), 1);
    assert_ne!(fed.authorities()[0].as_bytes(), ca_der);
    assert!(!signed_by(leaf_der, fed.authorities()[0].as_bytes()));

    // FetchX509Bundles: the same two bundles.
    let set = s.client().await.fetch_x509_bundles().await.unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(set.get(&td("nsm.cluster2")).unwrap().authorities()[0].as_bytes(), ca_der);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_source_sees_a_rotated_svid_at_half_its_lifetime() {
    let yaml =
        format!("{TWO_CLUSTERS}rules: [{{ match: {{ exe: {} }}, spiffe_id: spiffe://nsm.cluster1/rot }}]\n", my_exe());
    let s = start(&yaml, &["--svid-ttl", "4s"]).await;
    // Prove the server answers first: X509Source::build retries forever on errors.
    s.client().await.fetch_x509_svid().await.unwrap();
    let src = tokio::time::timeout(Duration::from_secs(5), X509Source::builder().endpoint(s.endpoint()).build())
        .await
        .expect("X509Source::build timed out")
        .unwrap();
    let first = src.svid().unwrap();
    assert_eq!(first.spiffe_id().to_string(), "spiffe://nsm.cluster1/rot");
    let t0 = std::time::Instant::now();
    let mut updates = src.updated();
    // X509Source opens a second stream right after its initial sync, so an
    // SVID issued within a second of the first arrives at once; the rotated
    // one (issued ~2s later) expires at least 2s later than the first.
    let rotated = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            updates.changed().await.unwrap();
            let cur = src.svid().unwrap();
            if not_after(cur.leaf().as_bytes()) >= not_after(first.leaf().as_bytes()) + 2 {
                return cur;
            }
        }
    })
    .await
    .expect("no rotated SVID within 6s");
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(1200) && waited <= Duration::from_secs(4), "rotated after {waited:?}");
    assert_ne!(serial(rotated.leaf().as_bytes()), serial(first.leaf().as_bytes()));
    assert_eq!(rotated.spiffe_id(), first.spiffe_id());
    src.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_matching_no_rule_is_denied_with_a_clear_message() {
    let yaml = format!(
        "{TWO_CLUSTERS}rules: [{{ match: {{ exe: not-{} }}, spiffe_id: spiffe://nsm.cluster1/x }}]\n",
        my_exe()
    );
    let s = start(&yaml, &[]).await;
    let e = s.client().await.fetch_x509_context().await.unwrap_err();
    let msg = e.to_string();
    let want = format!(
        "permission denied: no identity for pid {} (exe {}, netns -, uid {}): add a rule to {}",
        std::process::id(),
        my_exe(),
        nix::unistd::getuid(),
        s.config_path().display()
    );
    assert_eq!(msg, want);
    let e = s.client().await.fetch_x509_bundles().await.unwrap_err().to_string();
    assert!(e.contains("no identity for pid"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_security_header_are_refused_and_jwt_is_unimplemented() {
    use nsm_spiffe_dev::pb::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use nsm_spiffe_dev::pb::{JwtsvidRequest, X509svidRequest};
    let s = start(&format!("{TWO_CLUSTERS}rules: [{{ spiffe_id: spiffe://nsm.cluster1/any }}]\n"), &[]).await;
    let url = parse_url(&format!("unix://{}", s.sock().display())).unwrap();
    let ch = nsm_sdk::tools::grpc::dial(&url, Duration::from_secs(2)).await.unwrap();
    let mut c = SpiffeWorkloadApiClient::new(ch);
    let e = c.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(e.message(), "security header missing from request");
    let mut wrong = tonic::Request::new(X509svidRequest {});
    wrong.metadata_mut().insert("workload.spiffe.io", "yes".parse().unwrap());
    assert_eq!(c.fetch_x509svid(wrong).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    // With the header our own generated client gets the same as the spiffe crate.
    let mut ok = tonic::Request::new(X509svidRequest {});
    ok.metadata_mut().insert("workload.spiffe.io", "true".parse().unwrap());
    let first = c.fetch_x509svid(ok).await.unwrap().into_inner().next().await.unwrap().unwrap();
    assert_eq!(first.svids[0].spiffe_id, "spiffe://nsm.cluster1/any");
    assert_eq!(first.federated_bundles.keys().collect::<Vec<_>>(), vec!["spiffe://nsm.cluster2"]);

    let mut jwt = tonic::Request::new(JwtsvidRequest { audience: vec!["x".into()], spiffe_id: String::new() });
    jwt.metadata_mut().insert("workload.spiffe.io", "true".parse().unwrap());
    let e = c.fetch_jwtsvid(jwt).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    assert!(e.message().contains("JWT-SVIDs are not implemented"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_rules_match_the_callers_named_network_namespace() {
    // A netns directory where our own network namespace has a lab-style name.
    let nsdir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(format!("/proc/{}/ns/net", std::process::id()), nsdir.path().join("nsmlab-c1n2"))
        .unwrap();
    let yaml = format!(
        "{TWO_CLUSTERS}rules:\n  - match: {{ netns: nsmlab-c1n1 }}\n    spiffe_id: spiffe://nsm.cluster1/other\n  \
         - match: {{ netns_prefix: nsmlab-c1, exe: {} }}\n    spiffe_id: \"spiffe://nsm.cluster1/ns/default/pod/{{netns}}/{{exe}}\"\n",
        my_exe()
    );
    let s = start(&yaml, &["--netns-dir", nsdir.path().to_str().unwrap()]).await;
    let svid = s.client().await.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), format!("spiffe://nsm.cluster1/ns/default/pod/nsmlab-c1n2/{}", my_exe()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_pushes_new_svid_and_bundle_and_streams_end_with_their_client() {
    let yaml =
        format!("{TWO_CLUSTERS}rules: [{{ match: {{ exe: {} }}, spiffe_id: spiffe://nsm.cluster2/w }}]\n", my_exe());
    let s = start_with_authority(&yaml, &[]).await;
    let auth = s.auth.clone().unwrap();
    let client = s.client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(auth.snapshot_watchers(), 1, "one open stream");
    let old_ca = auth.ca("nsm.cluster2").unwrap();

    // Rotating cluster1's CA changes a federated bundle: a new context arrives.
    auth.rotate_ca("nsm.cluster1").unwrap();
    let second = tokio::time::timeout(Duration::from_secs(2), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.bundle_set().get(&td("nsm.cluster1")).unwrap().authorities().len(), 2);
    // Only a bundle changed: the SVID is the same one (as SPIRE's agent).
    assert_eq!(
        serial(second.default_svid().unwrap().leaf().as_bytes()),
        serial(first.default_svid().unwrap().leaf().as_bytes())
    );

    // Rotating the own CA: the new SVID is signed by the new CA; both CAs are trusted.
    auth.rotate_ca("nsm.cluster2").unwrap();
    let third = tokio::time::timeout(Duration::from_secs(2), stream.next()).await.unwrap().unwrap().unwrap();
    let new_ca = auth.ca("nsm.cluster2").unwrap();
    assert_ne!(new_ca.cert_der(), old_ca.cert_der());
    let leaf = third.default_svid().unwrap().leaf().as_bytes().to_vec();
    assert!(signed_by(&leaf, new_ca.cert_der()) && !signed_by(&leaf, old_ca.cert_der()));
    let own: Vec<Vec<u8>> = third
        .bundle_set()
        .get(&td("nsm.cluster2"))
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert!(own.contains(&new_ca.cert_der().to_vec()) && own.contains(&old_ca.cert_der().to_vec()));
    // The first SVID (old CA) still verifies against the new bundle.
    let first_leaf = first.default_svid().unwrap().leaf().as_bytes().to_vec();
    assert!(own.iter().any(|a| signed_by(&first_leaf, a)));

    // The client goes away: the server's stream task ends.
    drop(stream);
    drop(client);
    tokio::time::timeout(Duration::from_secs(3), async {
        while auth.snapshot_watchers() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("stream task still running after the client left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_update_or_a_second_stream_is_no_rotation() {
    let yaml =
        format!("{TWO_CLUSTERS}rules: [{{ match: {{ exe: {} }}, spiffe_id: spiffe://nsm.cluster1/w }}]\n", my_exe());
    let s = start_with_authority(&yaml, &[]).await;
    let auth = s.auth.clone().unwrap();
    // Two streams (the sdk's first fetch and its X509Source's) get one SVID.
    let tls = nsm_sdk::security::tls::Tls::from_workload_api(&s.endpoint(), Duration::from_secs(5)).await.unwrap();
    let before = nsm_sdk::security::SvidSource::svid(&*tls).unwrap();
    let other = s.client().await.fetch_x509_svid().await.unwrap();
    assert_eq!(serial(other.leaf().as_bytes()), serial(&before.cert_chain[0]), "a second stream got another SVID");

    // A federated CA rotates: every stream gets the new bundle and the same
    // SVID, which the sdk must not take for a rotation of its own.
    let mut watch = s.client().await.stream_x509_contexts().await.unwrap();
    watch.next().await.unwrap().unwrap();
    auth.rotate_ca("nsm.cluster2").unwrap();
    let ctx = tokio::time::timeout(Duration::from_secs(2), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(ctx.bundle_set().get(&td("nsm.cluster2")).unwrap().authorities().len(), 2, "the update went out");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = nsm_sdk::security::SvidSource::svid(&*tls).unwrap();
    assert!(std::sync::Arc::ptr_eq(&before, &after), "a bundle update was taken for an SVID rotation");
    tls.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams() {
    let yaml = format!("{TWO_CLUSTERS}rules: [{{ spiffe_id: spiffe://nsm.cluster1/any }}]\n");
    let s = start_with_authority(&yaml, &[]).await;
    let mut stream = s.client().await.stream_x509_contexts().await.unwrap();
    stream.next().await.unwrap().unwrap();
    let Server { dir, _stop, auth } = s;
    drop(_stop);
    let end =
        tokio::time::timeout(Duration::from_secs(2), stream.next()).await.expect("stream still open after shutdown");
    assert!(end.is_none() || end.unwrap().is_err());
    assert_eq!(auth.unwrap().snapshot_watchers(), 0);
    // The socket file is gone.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!dir.path().join("agent.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfederated_domain_gets_and_gives_no_federated_bundles() {
    let yaml = format!(
        "trust_domains: [nsm.cluster1, nsm.cluster2, {{ name: nsm.lonely, federate: false }}]\n\
         rules: [{{ match: {{ exe: {} }}, spiffe_id: spiffe://nsm.lonely/me }}]\n",
        my_exe()
    );
    let s = start_with_authority(&yaml, &[]).await;
    let ctx = s.client().await.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.default_svid().unwrap().spiffe_id().to_string(), "spiffe://nsm.lonely/me");
    assert_eq!(ctx.bundle_set().len(), 1, "only its own bundle");
    let snap = s.auth.as_ref().unwrap().snapshot();
    assert_eq!(snap.federated_for("nsm.cluster1").keys().collect::<Vec<_>>(), vec!["nsm.cluster2"]);
    assert!(snap.federated_for("nsm.lonely").is_empty());
}

#[test]
fn mint_makes_expired_and_foreign_ca_svids() {
    let ca = Ca::generate("nsm.cluster1", Duration::from_secs(3600)).unwrap();
    let id = "spiffe://nsm.cluster1/ns/default/pod/nsc";
    let now = SystemTime::now();

    // Expired an hour ago; still a well-formed SVID from the trusted CA.
    let expired = mint_svid(&ca, id, now - Duration::from_secs(7200), now - Duration::from_secs(3600)).unwrap();
    let parsed = spiffe::X509Svid::parse_from_der(&expired.chain_der_concat(), &expired.private_key_pkcs8).unwrap();
    assert_eq!(parsed.spiffe_id().to_string(), id);
    assert!(signed_by(&expired.cert_chain[0], ca.cert_der()));
    let leaf = parse(&expired.cert_chain[0]);
    assert!(!leaf.validity().is_valid(), "expired");
    assert!(leaf.validity().not_after.timestamp() <= now_unix() - 3599);

    // Same trust domain, another CA: does not verify against the real one.
    let foreign_ca = Ca::generate("nsm.cluster1", Duration::from_secs(3600)).unwrap();
    let foreign = foreign_ca.mint(id, Duration::from_secs(60)).unwrap();
    spiffe::X509Svid::parse_from_der(&foreign.chain_der_concat(), &foreign.private_key_pkcs8).unwrap();
    assert!(!signed_by(&foreign.cert_chain[0], ca.cert_der()));
    assert!(signed_by(&foreign.cert_chain[0], foreign_ca.cert_der()));
    assert_eq!(foreign.ca_cert_der, foreign_ca.cert_der());
    assert!(parse(&foreign.cert_chain[0]).validity().is_valid());

    // An ID in another trust domain can be minted on purpose too.
    let cross = mint_svid(&ca, "spiffe://nsm.cluster2/x", now, now + Duration::from_secs(60)).unwrap();
    assert_eq!(cross.spiffe_id, "spiffe://nsm.cluster2/x");
    assert!(cross.cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
    assert!(cross.key_pem().starts_with("-----BEGIN PRIVATE KEY-----\n"));
}

#[test]
fn ca_directory_keeps_trust_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let cadir = dir.path().join("ca");
    let c = cfg(dir.path(), TWO_CLUSTERS, &["--ca-dir", cadir.to_str().unwrap()]);
    let a1 = Authority::new(c.authority_options().unwrap()).unwrap();
    let a2 = Authority::new(c.authority_options().unwrap()).unwrap();
    for td in ["nsm.cluster1", "nsm.cluster2"] {
        assert_eq!(a1.bundle(td).unwrap(), a2.bundle(td).unwrap(), "{td}");
        assert!(cadir.join(format!("{td}.pem")).exists() && cadir.join(format!("{td}.key")).exists());
    }
    // A rotation through the directory is adopted by the other server.
    a1.rotate_ca("nsm.cluster1").unwrap();
    a2.rotate_ca("nsm.cluster1").unwrap();
    assert_eq!(a1.ca("nsm.cluster1").unwrap().cert_der(), a2.ca("nsm.cluster1").unwrap().cert_der());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_logs_each_issued_svid_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("c.yaml");
    std::fs::write(
        &conf,
        format!("{TWO_CLUSTERS}rules: [{{ match: {{ exe: {} }}, spiffe_id: spiffe://nsm.cluster1/bin }}]\n", my_exe()),
    )
    .unwrap();
    // A parent directory that does not exist yet, like /run/nsm-lab/<p>/spire/.
    let sock = dir.path().join("lab/spire/agent.sock");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_nsm-spiffe-dev"))
        .env_clear()
        .env("SPIFFE_DEV_LISTEN_ON", format!("unix://{}", sock.display()))
        .env("SPIFFE_DEV_CONFIG", &conf)
        .env("SPIFFE_DEV_SVID_TTL", "90s")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ep = format!("unix:{}", sock.display());
    let svid = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(c) = WorkloadApiClient::connect_to(&ep).await
                && let Ok(s) = c.fetch_x509_svid().await
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("binary did not serve within 5s");
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://nsm.cluster1/bin");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o777, "any local user may connect");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id().unwrap() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output()).await.unwrap().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {log}", out.status);
    let line =
        log.lines().find(|l| l.contains("X509-SVID issued")).unwrap_or_else(|| panic!("no issue line in: {log}"));
    assert!(
        line.contains("spiffe_id=\"spiffe://nsm.cluster1/bin\"")
            || line.contains("spiffe_id=spiffe://nsm.cluster1/bin"),
        "{line}"
    );
    assert!(line.contains(&format!("pid={}", std::process::id())), "{line}");
    assert!(line.contains("expires="), "{line}");
    assert!(!sock.exists(), "socket removed at exit");
}
