//! Registry client helpers: keeping an endpoint registered (upstream
//! `sdk:pkg/registry/common/refresh` + `retry` for the NSE client).
//!
//! # Guarantees
//! - [`register_nse_with_refresh`] registers once in the foreground and
//!   returns the registry's answer, or its error unchanged.
//! - It then re-registers in one background task, at 2/3 of the TTL left
//!   according to the `expiration_time` the registry returned (every
//!   `default_period` when it returned none). If the caller's endpoint asked
//!   for an expiration, every refresh asks for the same TTL again counted
//!   from the time of the refresh (re-sending the old timestamp would make
//!   a capping registry keep the old, nearly expired time); otherwise it
//!   asks for none and lets the registry decide. The name the registry
//!   assigned is kept.
//! - A failed refresh is retried every [`RETRY_INTERVAL`]; each distinct
//!   error is logged once at `warn` (repeats at `debug`), and recovery is
//!   logged at `info`.
//! - Dropping the [`RegistrationGuard`], or [`RegistrationGuard::stop`],
//!   ends the task and unregisters the endpoint (best effort, bounded by
//!   [`UNREGISTER_TIMEOUT`]); `stop` waits for that to finish. Nothing runs
//!   after that.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nsm_api::registry::NetworkServiceEndpoint;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::Status;

use super::NseRegistry;
use crate::networkservice::chain::Context;
use crate::networkservice::connect::DEFAULT_CALL_TIMEOUT;
use crate::tools::token;

/// Delay between attempts after a failed refresh.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Time budget of the Unregister sent when the guard goes away.
pub const UNREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest delay between two refreshes (guards against a registry that
/// hands out already-expired registrations).
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(20);

/// Keeps a registration alive; dropping it unregisters the endpoint.
#[derive(Debug)]
pub struct RegistrationGuard {
    name: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    current: watch::Receiver<NetworkServiceEndpoint>,
}

impl RegistrationGuard {
    /// Name of the registered endpoint (as the registry assigned it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The endpoint as the registry returned it on the last successful
    /// (re-)registration.
    pub fn current(&self) -> NetworkServiceEndpoint {
        self.current.borrow().clone()
    }

    /// Stops refreshing, unregisters, and waits until that is done.
    pub async fn stop(mut self) {
        self.stop.take();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for RegistrationGuard {
    fn drop(&mut self) {
        // Dropping the sender wakes the task, which unregisters and ends.
        self.stop.take();
    }
}

/// 2/3 of the TTL left in `nse.expiration_time`, or `default` if unset.
fn refresh_after(nse: &NetworkServiceEndpoint, default: Duration) -> Duration {
    match nse.expiration_time.as_ref().and_then(token::from_timestamp) {
        Some(exp) => {
            let left = exp.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
            (left * 2 / 3).max(MIN_REFRESH_INTERVAL)
        }
        None => default.max(MIN_REFRESH_INTERVAL),
    }
}

/// Registers `nse` through `reg` now, then keeps it registered in a
/// background task (see the module docs): re-registers at 2/3 of the
/// remaining TTL (every `default_period` if the registry set no
/// expiration), retries every second on failure, and unregisters when the
/// returned guard is dropped or stopped. Returns the registered object and
/// the guard.
pub async fn register_nse_with_refresh(
    reg: Arc<dyn NseRegistry>,
    nse: NetworkServiceEndpoint,
    default_period: Duration,
) -> Result<(NetworkServiceEndpoint, RegistrationGuard), Status> {
    let ttl = nse
        .expiration_time
        .as_ref()
        .and_then(token::from_timestamp)
        .and_then(|t| t.duration_since(SystemTime::now()).ok());
    let ctx = Context::with_timeout(DEFAULT_CALL_TIMEOUT);
    let registered = match tokio::time::timeout(DEFAULT_CALL_TIMEOUT, reg.register(&ctx, nse.clone())).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(Status::deadline_exceeded(format!(
                "registering endpoint {:?} took longer than {DEFAULT_CALL_TIMEOUT:?}",
                nse.name
            )));
        }
    };
    let mut template = nse;
    template.name = registered.name.clone();
    let (stop_tx, stop_rx) = oneshot::channel();
    let (cur_tx, cur_rx) = watch::channel(registered.clone());
    let task = tokio::spawn(refresh_loop(reg, template, ttl, registered.clone(), default_period, stop_rx, cur_tx));
    let guard =
        RegistrationGuard { name: registered.name.clone(), stop: Some(stop_tx), task: Some(task), current: cur_rx };
    Ok((registered, guard))
}

/// The registration of an endpoint called `name` serving at `url`, for the
/// network services `services`, each with the same `labels`.
pub fn endpoint_record(
    name: &str,
    services: &[String],
    labels: &std::collections::HashMap<String, String>,
    url: &url::Url,
) -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        name: name.to_string(),
        network_service_names: services.to_vec(),
        network_service_labels: services
            .iter()
            .map(|s| (s.clone(), nsm_api::registry::NetworkServiceLabels { labels: labels.clone() }))
            .collect(),
        url: url.to_string(),
        ..Default::default()
    }
}

/// What a daemon keeps registered while it serves
/// ([`crate::tools::daemon::serve_registered`]).
pub struct Registration {
    /// Where to register (the nsmgr's registry service).
    pub registry: Arc<dyn NseRegistry>,
    /// The record ([`endpoint_record`]).
    pub endpoint: NetworkServiceEndpoint,
    /// Refresh period when the registry sets no expiration.
    pub refresh: Duration,
    /// What a failed first attempt does.
    pub first: FirstRegistration,
}

/// What [`register_served`] does when the first registration fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstRegistration {
    /// Return the error (an endpoint: its operator should see it at once).
    Fail,
    /// Try again every [`FIRST_RETRY_INTERVAL`] while the server runs (a
    /// forwarder: its nsmgr may start after it), logging every 50th failure.
    Retry,
}

/// Delay between first-registration attempts with [`FirstRegistration::Retry`].
pub const FIRST_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Registers `nse`, the endpoint a daemon serves, with
/// [`register_nse_with_refresh`]; with [`FirstRegistration::Retry`] a failed
/// first attempt is repeated until it succeeds or `server` (the daemon's
/// serving task) ends, whose end is then reported instead.
pub async fn register_served<T>(
    reg: Arc<dyn NseRegistry>,
    nse: NetworkServiceEndpoint,
    default_period: Duration,
    first: FirstRegistration,
    server: &JoinHandle<T>,
) -> Result<(NetworkServiceEndpoint, RegistrationGuard), Status> {
    let mut attempts = 0u32;
    loop {
        match register_nse_with_refresh(reg.clone(), nse.clone(), default_period).await {
            Ok(r) => return Ok(r),
            Err(e) if first == FirstRegistration::Fail => return Err(e),
            Err(e) if server.is_finished() => {
                return Err(Status::cancelled(format!(
                    "the server stopped before endpoint {:?} was registered: {}",
                    nse.name,
                    e.message()
                )));
            }
            Err(e) => {
                if attempts.is_multiple_of(50) {
                    tracing::warn!(nse = %nse.name, error = %e.message(), "cannot register yet; retrying");
                }
                attempts += 1;
                tokio::time::sleep(FIRST_RETRY_INTERVAL).await;
            }
        }
    }
}

async fn refresh_loop(
    reg: Arc<dyn NseRegistry>,
    template: NetworkServiceEndpoint,
    ttl: Option<Duration>,
    mut current: NetworkServiceEndpoint,
    default_period: Duration,
    mut stop: oneshot::Receiver<()>,
    cur_tx: watch::Sender<NetworkServiceEndpoint>,
) {
    let name = template.name.clone();
    let mut wait = refresh_after(&current, default_period);
    let mut last_err: Option<String> = None;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let mut req = template.clone();
        req.expiration_time = ttl.map(|t| token::to_timestamp(SystemTime::now() + t));
        let ctx = Context::with_timeout(DEFAULT_CALL_TIMEOUT);
        let res = tokio::select! {
            _ = &mut stop => break,
            r = tokio::time::timeout(DEFAULT_CALL_TIMEOUT, reg.register(&ctx, req)) => r,
        };
        let res = match res {
            Ok(r) => r.map_err(|e| format!("{:?}: {}", e.code(), e.message())),
            Err(_) => Err(format!("no answer within {DEFAULT_CALL_TIMEOUT:?}")),
        };
        match res {
            Ok(r) => {
                if last_err.take().is_some() {
                    tracing::info!(nse = %name, "endpoint registration refreshed again");
                } else {
                    tracing::trace!(nse = %name, "endpoint registration refreshed");
                }
                wait = refresh_after(&r, default_period);
                current = r;
                cur_tx.send_replace(current.clone());
            }
            Err(msg) => {
                if last_err.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(nse = %name, error = %msg, "refreshing endpoint registration failed; retrying every {RETRY_INTERVAL:?}");
                } else {
                    tracing::debug!(nse = %name, error = %msg, "refreshing endpoint registration failed again");
                }
                last_err = Some(msg);
                wait = RETRY_INTERVAL;
            }
        }
    }
    let ctx = Context::with_timeout(UNREGISTER_TIMEOUT);
    match tokio::time::timeout(UNREGISTER_TIMEOUT, reg.unregister(&ctx, current)).await {
        Ok(Ok(())) => tracing::debug!(nse = %name, "endpoint unregistered"),
        Ok(Err(e)) => tracing::warn!(nse = %name, error = %e.message(), "unregistering endpoint failed"),
        Err(_) => tracing::warn!(nse = %name, "unregistering endpoint timed out after {UNREGISTER_TIMEOUT:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use async_trait::async_trait;
    use nsm_api::registry::NetworkServiceEndpointQuery;

    use super::*;
    use crate::registry::memory::MemoryRegistry;
    use crate::registry::{NseStream, find_nses};

    fn expiring(name: &str, ttl: Duration) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec!["s".into()],
            url: "tcp://127.0.0.1:1".into(),
            expiration_time: Some(token::to_timestamp(SystemTime::now() + ttl)),
            ..Default::default()
        }
    }

    async fn found(reg: &MemoryRegistry, name: &str) -> bool {
        let q = NetworkServiceEndpoint { name: name.into(), ..Default::default() };
        !find_nses(reg, &Context::default(), q).await.unwrap().is_empty()
    }

    #[tokio::test]
    async fn stays_registered_and_goes_away_with_the_guard() {
        let mem = MemoryRegistry::new();
        let reg: Arc<dyn NseRegistry> = Arc::new(mem.clone());
        let (nse, guard) =
            register_nse_with_refresh(reg, expiring("e", Duration::from_millis(300)), Duration::from_secs(10))
                .await
                .unwrap();
        assert_eq!(nse.name, "e");
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            assert!(found(&mem, "e").await, "expired after {:?}", t0.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_ne!(guard.current().expiration_time, nse.expiration_time, "refreshes ask for a new expiration");
        drop(guard);
        let t0 = std::time::Instant::now();
        while found(&mem, "e").await {
            assert!(t0.elapsed() < Duration::from_millis(250), "still registered after the guard was dropped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(mem.nse_len(), 0);
        assert_eq!(mem.timer_count(), 0);
    }

    #[tokio::test]
    async fn stop_unregisters_and_keeps_generated_name() {
        let mem = MemoryRegistry::new();
        let reg: Arc<dyn NseRegistry> = Arc::new(mem.clone());
        let (nse, guard) =
            register_nse_with_refresh(reg, NetworkServiceEndpoint::default(), Duration::from_millis(50)).await.unwrap();
        assert!(nse.name.starts_with("nse-"));
        assert_eq!(guard.name(), nse.name);
        tokio::time::sleep(Duration::from_millis(200)).await; // a few refreshes
        assert_eq!(mem.nse_len(), 1, "refresh reuses the generated name");
        assert!(found(&mem, &nse.name).await);
        guard.stop().await;
        assert_eq!(mem.nse_len(), 0);
    }

    /// Counts calls and fails Register while `fail` is set.
    struct Flaky {
        inner: MemoryRegistry,
        fail: AtomicBool,
        registers: AtomicUsize,
    }

    #[async_trait]
    impl NseRegistry for Flaky {
        async fn register(&self, ctx: &Context, nse: NetworkServiceEndpoint) -> Result<NetworkServiceEndpoint, Status> {
            self.registers.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(Status::unavailable("registry down"));
            }
            self.inner.register(ctx, nse).await
        }
        async fn find(&self, ctx: &Context, q: NetworkServiceEndpointQuery) -> Result<NseStream, Status> {
            NseRegistry::find(&self.inner, ctx, q).await
        }
        async fn unregister(&self, ctx: &Context, nse: NetworkServiceEndpoint) -> Result<(), Status> {
            NseRegistry::unregister(&self.inner, ctx, nse).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_every_second_after_failures() {
        let flaky = Arc::new(Flaky {
            inner: MemoryRegistry::new(),
            fail: AtomicBool::new(false),
            registers: AtomicUsize::new(0),
        });
        // 30 s TTL ⇒ refresh every 20 s.
        let (_, guard) =
            register_nse_with_refresh(flaky.clone(), expiring("e", Duration::from_secs(30)), Duration::from_secs(60))
                .await
                .unwrap();
        assert_eq!(flaky.registers.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(19_900)).await;
        assert_eq!(flaky.registers.load(Ordering::SeqCst), 1);
        flaky.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await; // refresh at 20 s fails
        assert_eq!(flaky.registers.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(3_000)).await; // retries at 21, 22, 23 s
        assert_eq!(flaky.registers.load(Ordering::SeqCst), 5);
        flaky.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1_000)).await; // 24 s: succeeds
        assert_eq!(flaky.registers.load(Ordering::SeqCst), 6);
        tokio::time::sleep(Duration::from_millis(10_000)).await; // next refresh only at 44 s
        assert_eq!(flaky.registers.load(Ordering::SeqCst), 6);
        guard.stop().await;
        assert_eq!(flaky.inner.nse_len(), 0);
    }

    #[tokio::test]
    async fn initial_failure_is_returned() {
        let flaky = Arc::new(Flaky {
            inner: MemoryRegistry::new(),
            fail: AtomicBool::new(true),
            registers: AtomicUsize::new(0),
        });
        let err = register_nse_with_refresh(flaky, expiring("e", Duration::from_secs(1)), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }
}
