//! A real Kubernetes API server for tests: etcd and kube-apiserver, built
//! from their Go modules by `scripts/peers.sh kube` (pinned versions, cached
//! outside the repo), listening on loopback only, with their own CA,
//! serving certificate and an admin client certificate (`system:masters`).
//! Nothing else of Kubernetes runs (no controller manager, scheduler or
//! kubelet): objects are stored and validated, admission webhooks are
//! called, nothing reconciles them.
//!
//! The binaries come from `NSM_KUBE_BIN_DIR` when set (`scripts/test.sh`
//! sets it), else `scripts/peers.sh kube` is run (a cold build takes
//! minutes). Both processes run under `setpriv --pdeathsig KILL`, so they
//! die with the test; [`ApiServer`]'s Drop kills them and removes their
//! directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// How the API server is started.
#[derive(Clone, Debug)]
pub struct ApiServerOpts {
    /// `--watch-cache`: off, watches are served by etcd directly, so a
    /// watch from a compacted resourceVersion gets 410 Gone at once.
    pub watch_cache: bool,
    /// Install the NSM CRDs and wait until they are established.
    pub crds: bool,
}

impl Default for ApiServerOpts {
    fn default() -> Self {
        ApiServerOpts { watch_cache: true, crds: true }
    }
}

/// Certificates of one test API server (PEM).
struct Pki {
    ca_pem: String,
    admin_cert_pem: String,
    admin_key_pem: String,
}

/// A running etcd and kube-apiserver on loopback.
pub struct ApiServer {
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    etcd_url: String,
    port: u16,
    opts: ApiServerOpts,
    pki: Pki,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("url", &self.url()).field("dir", &self.dir.path()).finish()
    }
}

/// The directory holding `etcd`, `kube-apiserver` and `kubectl`
/// (`NSM_KUBE_BIN_DIR`, else built by `scripts/peers.sh kube`).
pub fn kube_bin_dir() -> PathBuf {
    nsm_sdk::testing::peers::dir("kube", "NSM_KUBE_BIN_DIR").unwrap_or_else(|e| panic!("{e:#}"))
}

pub mod kubelet;
pub mod webhook;

/// A workspace binary, next to the running test executable (one level up
/// from `target/<profile>/deps`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
        bin.display()
    );
    bin
}

/// A free loopback TCP port (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind a loopback port").port()
}

fn pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "nsm-rs test kubernetes CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |cn: &str, org: Option<&str>, sans: Vec<SanType>, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            p.distinguished_name.push(DnType::OrganizationName, o);
        }
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (serving_pem, serving_key) = leaf(
        "kube-apiserver",
        None,
        vec![
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::DnsName("kubernetes.default.svc".try_into().unwrap()),
        ],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (admin_cert_pem, admin_key_pem) =
        leaf("nsm-test-admin", Some("system:masters"), vec![], ExtendedKeyUsagePurpose::ClientAuth);
    let sa = KeyPair::generate().unwrap();
    let (sa_key, sa_pub) = (sa.serialize_pem(), sa.public_key_pem());
    let ca_pem = ca_cert.pem();
    for (name, text) in [
        ("ca.crt", &ca_pem),
        ("serving.crt", &serving_pem),
        ("serving.key", &serving_key),
        ("sa.key", &sa_key),
        ("sa.pub", &sa_pub),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    Pki { ca_pem, admin_cert_pem, admin_key_pem }
}

/// Runs `bin args` under `setpriv --pdeathsig KILL`, output to `log`.
fn spawn(bin: &Path, args: &[String], log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    Command::new("setpriv")
        .args(["--pdeathsig", "KILL"])
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()))
}

/// The last 30 lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl ApiServer {
    /// Starts etcd and the API server with the NSM CRDs installed.
    pub async fn start() -> ApiServer {
        ApiServer::start_with(ApiServerOpts::default()).await
    }

    /// Starts etcd and the API server as `opts` says; panics with the tail
    /// of their logs if they do not come up.
    pub async fn start_with(opts: ApiServerOpts) -> ApiServer {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bin_dir = kube_bin_dir();
        let dir = tempfile::Builder::new().prefix("nsm-kube-").tempdir().unwrap();
        let pki = pki(dir.path());
        let (client_port, peer_port) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args: Vec<String> = [
            "--name=default".to_string(),
            format!("--data-dir={}", dir.path().join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync=true".to_string(),
            "--log-level=warn".to_string(),
        ]
        .into();
        let etcd = spawn(&bin_dir.join("etcd"), &etcd_args, &dir.path().join("etcd.log"));
        let mut s =
            ApiServer { dir, bin_dir, etcd: Some(etcd), apiserver: None, etcd_url, port: free_port(), opts, pki };
        s.start_apiserver().await;
        if s.opts.crds {
            s.install_crds().await;
        }
        s
    }

    /// (Re)starts the API server (after [`ApiServer::stop_apiserver`]) on
    /// the same port and etcd; returns when it is ready.
    pub async fn start_apiserver(&mut self) {
        let d = self.dir.path();
        let p = |f: &str| d.join(f).display().to_string();
        let args: Vec<String> = vec![
            format!("--etcd-servers={}", self.etcd_url),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.port),
            format!("--cert-dir={}", p("certs")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--tls-cert-file={}", p("serving.crt")),
            format!("--tls-private-key-file={}", p("serving.key")),
            format!("--service-account-issuer=https://127.0.0.1:{}", self.port),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--authorization-mode=RBAC".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--allow-privileged=true".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--watch-cache={}", self.opts.watch_cache),
        ];
        let log = d.join("kube-apiserver.log");
        self.apiserver = Some(spawn(&self.bin_dir.join("kube-apiserver"), &args, &log));
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
            if matches!(client.request_text(req).await, Ok(t) if t.trim() == "ok") {
                return;
            }
            if let Some(Ok(Some(st))) = self.apiserver.as_mut().map(|c| c.try_wait()) {
                panic!("kube-apiserver exited ({st}):\n{}\netcd:\n{}", tail(&log), tail(&d.join("etcd.log")));
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready in 60 s:\n{}\netcd:\n{}",
                tail(&log),
                tail(&d.join("etcd.log"))
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills the API server (etcd keeps the data).
    pub fn stop_apiserver(&mut self) {
        kill(&mut self.apiserver);
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA that signed the API server's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// A client authenticated as a cluster admin (`system:masters`).
    pub fn client(&self) -> Client {
        let mut cfg = kube::Config::new(self.url().parse().unwrap());
        let ca_der = rustls_pemfile_der(&self.pki.ca_pem);
        cfg.root_cert = Some(vec![ca_der]);
        cfg.auth_info.client_certificate_data = Some(B64.encode(&self.pki.admin_cert_pem));
        cfg.auth_info.client_key_data = Some(B64.encode(&self.pki.admin_key_pem).into());
        cfg.connect_timeout = Some(Duration::from_secs(5));
        Client::try_from(cfg).expect("kube client for the test API server")
    }

    /// A kubeconfig file for the admin (for kubectl and for daemons under
    /// test).
    pub fn kubeconfig(&self) -> PathBuf {
        let path = self.dir.path().join("kubeconfig");
        if !path.exists() {
            let yaml = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
                 certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    \
                 client-key-data: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n\
                 current-context: test\n",
                self.url(),
                B64.encode(&self.pki.ca_pem),
                B64.encode(&self.pki.admin_cert_pem),
                B64.encode(&self.pki.admin_key_pem),
            );
            std::fs::write(&path, yaml).unwrap();
        }
        path
    }

    /// The directory of this server's files (certificates, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the real kubectl (same version as the API server) against this
    /// server, `stdin` piped in.
    pub fn kubectl(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(self.bin_dir.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    /// `kubectl apply -f -` with `yaml`; panics with kubectl's output if it
    /// fails.
    pub fn apply(&self, yaml: &str) -> String {
        nsm_sdk::testing::ok_output(&self.kubectl(&["apply", "-f", "-"], yaml))
    }

    /// Creates the NSM CRDs and waits until the API server serves them.
    pub async fn install_crds(&self) {
        let api: Api<CustomResourceDefinition> = Api::all(self.client());
        for (_, crd) in crate::crd::crd_objects() {
            let name = crd.metadata.name.clone().unwrap();
            match api.create(&PostParams::default(), &crd).await {
                Ok(_) => {}
                Err(e) if crate::client::is_already_exists(&e) => {}
                Err(e) => panic!("create CRD {name}: {e}"),
            }
            let established = eventually_async(Duration::from_secs(30), || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    api.get(&name)
                        .await
                        .ok()
                        .and_then(|c| c.status)
                        .and_then(|s| s.conditions)
                        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
                }
            })
            .await;
            assert!(established, "CRD {name} not established in 30 s");
        }
    }

    /// Creates namespace `name` (the API server makes only `default` and
    /// the `kube-*` ones itself).
    pub async fn create_namespace(&self, name: &str) {
        let api: Api<Namespace> = Api::all(self.client());
        let ns = Namespace {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            ..Default::default()
        };
        api.create(&PostParams::default(), &ns).await.unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    }

    /// Compacts etcd's history up to its current revision, so every
    /// watch from an older resourceVersion is answered 410 Gone (with the
    /// watch cache off).
    pub async fn compact_etcd(&self) {
        let rev = self.etcd_post("/v3/kv/range", r#"{"key":"AA=="}"#).await["header"]["revision"]
            .as_str()
            .expect("etcd revision")
            .to_string();
        self.etcd_post("/v3/kv/compaction", &format!(r#"{{"revision":"{rev}","physical":true}}"#)).await;
    }

    /// One POST to etcd's JSON gateway.
    async fn etcd_post(&self, path: &str, body: &str) -> serde_json::Value {
        use http_body_util::{BodyExt, Full};
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Full<bytes::Bytes>>();
        let req = http::Request::post(format!("{}{path}", self.etcd_url))
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body.to_string())))
            .unwrap();
        let resp = client.request(req).await.unwrap_or_else(|e| panic!("etcd {path}: {e}"));
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(status.is_success(), "etcd {path}: {status}: {}", String::from_utf8_lossy(&bytes));
        serde_json::from_slice(&bytes).unwrap()
    }
}

/// Polls `f` every 100 ms until it holds or `timeout` passed; the last
/// answer.
pub async fn eventually_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f().await
}

/// The DER of the first certificate in `pem`.
fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate").to_vec()
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        kill(&mut self.apiserver);
        kill(&mut self.etcd);
    }
}
