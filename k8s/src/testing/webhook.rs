//! The `nsm-admission-webhook` binary under test, serving a test
//! [`ApiServer`] on a loopback port (the API server calls it by URL).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::Api;

use super::{ApiServer, eventually_async, free_port, tail, workspace_bin};

/// A running webhook; SIGTERM on drop (it then deletes its configuration
/// if it still owns it), SIGKILL if it does not stop in 5 s.
pub struct Webhook {
    child: Option<Child>,
    pub name: String,
    pub port: u16,
    pub log: PathBuf,
}

/// The image names tests configure (never pulled: the kubelet stand-in
/// runs the workspace's `nsc`).
pub const TEST_IMAGE: &str = "ghcr.io/nsm-rs/nsc:test";

impl Webhook {
    /// Starts the webhook for `k` with the test defaults (images
    /// [`TEST_IMAGE`], own namespace `nsm-system`, label
    /// `spiffe.io/spiffe-id:true`) overridden by `env`; returns once the API
    /// server calls it (a server-side dry run of an annotated pod comes back
    /// patched).
    pub async fn start(k: &ApiServer, name: &str, env: &[(&str, &str)]) -> Webhook {
        let port = free_port();
        let log = k.dir().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("webhook log");
        let err = out.try_clone().expect("webhook log");
        let bin = workspace_bin("nsm-admission-webhook");
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL"])
            .arg(bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NSM_NAME", name)
            .env("NSM_NAMESPACE", "nsm-system")
            .env("NSM_LISTEN_ON", format!("tcp://127.0.0.1:{port}"))
            .env("NSM_WEBHOOK_URL", format!("https://127.0.0.1:{port}/mutate"))
            .env("NSM_KUBECONFIG", k.kubeconfig())
            .env("NSM_INIT_CONTAINER_IMAGES", TEST_IMAGE)
            .env("NSM_CONTAINER_IMAGES", TEST_IMAGE)
            .env("NSM_LABELS", "spiffe.io/spiffe-id:true")
            .env("NSM_LOG_LEVEL", "DEBUG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start nsm-admission-webhook");
        let api: Api<MutatingWebhookConfiguration> = Api::all(k.client());
        let registered = eventually_async(Duration::from_secs(20), || {
            let api = api.clone();
            async move { api.get_opt(name).await.ok().flatten().is_some() }
        })
        .await;
        if let Ok(Some(st)) = child.try_wait() {
            panic!("nsm-admission-webhook exited ({st}):\n{}", tail(&log));
        }
        assert!(registered, "the webhook did not register in 20 s:\n{}", tail(&log));
        let w = Webhook { child: Some(child), name: name.to_string(), port, log };
        // The API server takes new configurations in asynchronously.
        let probe = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: probe\n  namespace: default\n  annotations:\n    \
                     networkservicemesh.io: kernel://probe/nsm-1\nspec:\n  containers:\n  - {name: app, image: alpine}\n";
        let called = eventually_async(Duration::from_secs(20), || async {
            let o = k.kubectl(&["create", "--dry-run=server", "-o", "json", "-f", "-"], probe);
            String::from_utf8_lossy(&o.stdout).contains("initContainers")
        })
        .await;
        assert!(called, "the API server does not call the webhook:\n{}", tail(&w.log));
        w
    }

    /// The webhook's log so far.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// Stops it with SIGTERM and waits (5 s, then SIGKILL); the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or_default());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop();
    }
}
