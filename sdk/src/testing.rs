//! Test fixtures: chain elements that record, inject errors or mutate, in the
//! spirit of Go's `utils/checks` and `utils/inject`. Also used by the other
//! crates' tests (feature `testing`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nsm_api::connection::Connection;
use nsm_api::networkservice::NetworkServiceRequest;
use tonic::Status;

use crate::networkservice::begin::EventFactory;
use crate::networkservice::chain::{ConnResult, Context, Element, Next};

/// A request whose connection has the given id.
pub fn request_with_id(id: &str) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection { id: id.to_string(), ..Default::default() }),
        ..Default::default()
    }
}

/// Shared log of what [`Record`] elements saw.
pub type Log = Arc<Mutex<Vec<String>>>;

/// Logs `name>` on the way out, `<name` on the way back, `close name` on Close.
pub struct Record {
    name: String,
    log: Log,
}

impl Record {
    /// A new shared log.
    pub fn log() -> Log {
        Arc::default()
    }
    /// A recording element.
    pub fn new(name: &str, log: &Log) -> Arc<Record> {
        Arc::new(Record { name: name.to_string(), log: log.clone() })
    }
}

#[async_trait]
impl Element for Record {
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{}>", self.name));
        let r = next.request(ctx, req).await;
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(format!("<{}", self.name));
        r
    }
    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(format!("close {}", self.name));
        next.close(ctx, conn).await
    }
}

/// Counts calls in the server metadata of a connection.
#[derive(Clone, Debug, Default)]
pub struct Counter(pub u32);

/// Mutating / failing elements.
pub enum Inject {
    /// Fails every Request (and Close) with this status.
    Error(tonic::Code, String),
    /// Sets `network_service_endpoint_name` on the returned connection.
    NseName(String),
    /// Increments a [`Counter`] in the connection's server metadata.
    StoreMarker,
}

impl Inject {
    /// Fails with `code` and `msg`.
    pub fn error(code: tonic::Code, msg: &str) -> Arc<Inject> {
        Arc::new(Inject::Error(code, msg.to_string()))
    }
    /// Sets the endpoint name on the way back.
    pub fn set_nse_name(name: &str) -> Arc<Inject> {
        Arc::new(Inject::NseName(name.to_string()))
    }
    /// Bumps a counter in `ctx.meta`.
    pub fn store_marker() -> Arc<Inject> {
        Arc::new(Inject::StoreMarker)
    }
}

#[async_trait]
impl Element for Inject {
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
        match self {
            Inject::Error(code, msg) => Err(Status::new(*code, msg.clone())),
            Inject::NseName(n) => {
                let mut c = next.request(ctx, req).await?;
                c.network_service_endpoint_name = n.clone();
                Ok(c)
            }
            Inject::StoreMarker => {
                if let Some(m) = &ctx.meta {
                    let c = m.server_get::<Counter>().unwrap_or_default();
                    m.server_insert(Counter(c.0 + 1));
                }
                next.request(ctx, req).await
            }
        }
    }
    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        match self {
            Inject::Error(code, msg) => Err(Status::new(*code, msg.clone())),
            _ => next.close(ctx, conn).await,
        }
    }
}

/// Calls a closure with the connection of every Close.
pub struct OnClose<F>(F);

impl<F: Fn(&Connection) + Send + Sync + 'static> OnClose<F> {
    /// A new element.
    pub fn new(f: F) -> Arc<OnClose<F>> {
        Arc::new(OnClose(f))
    }
}

#[async_trait]
impl<F: Fn(&Connection) + Send + Sync + 'static> Element for OnClose<F> {
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
        next.request(ctx, req).await
    }
    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        (self.0)(&conn);
        next.close(ctx, conn).await
    }
}

/// Sleeps 20 ms per Request while tracking how many run at once.
pub struct Slow {
    active: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
}

impl Slow {
    /// A new element sharing the two counters.
    pub fn new(active: Arc<AtomicUsize>, max: Arc<AtomicUsize>) -> Arc<Slow> {
        Arc::new(Slow { active, max })
    }
}

#[async_trait]
impl Element for Slow {
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
        let n = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
        next.request(ctx, req).await
    }
}

/// Captures the [`EventFactory`] that `begin` installed.
#[derive(Clone, Default)]
pub struct GrabEvents(Arc<Mutex<Option<EventFactory>>>);

impl GrabEvents {
    /// The captured factory.
    pub fn get(&self) -> Option<EventFactory> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[async_trait]
impl Element for GrabEvents {
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = ctx.events.clone();
        next.request(ctx, req).await
    }
}

/// An endpoint registration named `name` for `services` at `url`.
pub fn nse(name: &str, services: &[&str], url: &str) -> nsm_api::registry::NetworkServiceEndpoint {
    nsm_api::registry::NetworkServiceEndpoint {
        name: name.into(),
        network_service_names: services.iter().map(|s| s.to_string()).collect(),
        url: url.into(),
        ..Default::default()
    }
}

/// A command's stdout and stderr, as text.
pub fn output_text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// [`output_text`] of a command that must have succeeded (panics with its
/// status and output otherwise).
pub fn ok_output(o: &std::process::Output) -> String {
    let t = output_text(o);
    assert!(o.status.success(), "command failed ({}): {t}", o.status);
    t
}

/// Polls `f` every 50 ms until it holds or `timeout` passed; the last
/// answer. For conditions that settle on their own (a link goes away, a
/// socket appears).
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Installs a tracing subscriber for tests (once); honours `RUST_LOG`.
pub fn trace_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

pub mod peers;

/// Throwaway network namespaces for tests that need a real kernel (root).
pub mod netns {
    use std::path::PathBuf;
    use std::process::{Command, Output};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::tools::netns::NetnsHandle;

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// A namespace made with `ip netns add <prefix>-<pid>-<n>`, with `lo` up.
    /// Dropping it runs `ip netns del` (errors ignored, never panics), so it
    /// is cleaned up even when an assertion fails. The kernel frees the
    /// namespace (and the interfaces in it) once the last open handle or
    /// socket in it is gone too.
    pub struct TestNetns {
        name: String,
        handle: NetnsHandle,
    }

    impl std::fmt::Debug for TestNetns {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_tuple("TestNetns").field(&self.name).finish()
        }
    }

    impl TestNetns {
        /// Creates the namespace; panics (this is a test fixture) when `ip`
        /// fails, e.g. when not run as root. Also sweeps leftovers of killed
        /// runs with the same prefix.
        pub fn new(prefix: &str) -> TestNetns {
            sweep_stale(prefix);
            let n = COUNTER.fetch_add(1, Ordering::SeqCst);
            let name = format!("{prefix}-{}-{n}", std::process::id());
            run_ip(&["netns", "add", &name]);
            // From here on the guard owns the name, so a failure below still cleans up.
            let mut guard = Cleanup(Some(name.clone()));
            run_ip(&["-n", &name, "link", "set", "lo", "up"]);
            let handle = NetnsHandle::open(&PathBuf::from(format!("/run/netns/{name}")))
                .unwrap_or_else(|e| panic!("opening test netns {name}: {e}"));
            guard.0 = None;
            TestNetns { name, handle }
        }

        /// The `ip netns` name.
        pub fn name(&self) -> &str {
            &self.name
        }

        /// An open handle on the namespace.
        pub fn handle(&self) -> &NetnsHandle {
            &self.handle
        }

        /// `/run/netns/<name>`.
        pub fn path(&self) -> PathBuf {
            PathBuf::from(format!("/run/netns/{}", self.name))
        }

        /// Runs `ip netns exec <name> args...` and returns its output.
        pub fn exec(&self, args: &[&str]) -> Output {
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("running `ip netns exec {} {}`: {e}", self.name, args.join(" ")))
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            delete(&self.name);
        }
    }

    struct Cleanup(Option<String>);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(n) = self.0.take() {
                delete(&n);
            }
        }
    }

    fn delete(name: &str) {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }

    fn run_ip(args: &[&str]) {
        match Command::new("ip").args(args).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "`ip {}` failed ({}): {} (tests that create namespaces must run as root)",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("cannot run `ip {}`: {e} (is iproute2 installed?)", args.join(" ")),
        }
    }

    /// The inode of the calling thread's network namespace.
    pub fn own_inode() -> u64 {
        crate::tools::netns::inode_of(std::path::Path::new(crate::tools::netns::THREAD_SELF_NETNS))
            .unwrap_or_else(|e| panic!("reading {}: {e}", crate::tools::netns::THREAD_SELF_NETNS))
    }

    /// Deletes namespaces named `<prefix>-<pid>-<n>` whose pid is no longer
    /// running: leftovers of a test run that was killed before its Drop ran.
    pub fn sweep_stale(prefix: &str) {
        let Ok(rd) = std::fs::read_dir("/run/netns") else { return };
        let lead = format!("{prefix}-");
        for e in rd.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else { continue };
            let Some(rest) = name.strip_prefix(&lead) else { continue };
            let Some((pid, n)) = rest.split_once('-') else { continue };
            let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u64>()) else { continue };
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                delete(&name);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn sweep_removes_only_dead_owners() {
            // pid_max is at most 2^22, so this pid is never alive.
            let stale = "sdksweep-99999999-0";
            run_ip(&["netns", "add", stale]);
            let _cleanup = Cleanup(Some(stale.to_string()));
            let live = TestNetns::new("sdksweep");
            sweep_stale("sdksweep");
            let names: Vec<String> = std::fs::read_dir("/run/netns")
                .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str().map(str::to_string)).collect())
                .unwrap_or_default();
            assert!(!names.iter().any(|n| n == stale), "{names:?}");
            assert!(names.iter().any(|n| n == live.name()), "{names:?}");
            let o = live.exec(&["ip", "-o", "link", "show", "lo"]);
            assert!(String::from_utf8_lossy(&o.stdout).contains("UP"), "lo is up");
        }
    }
}
