//! What every daemon's `main` does: wait for SIGTERM/SIGINT, serve a tonic
//! router on bound listeners with grpc health, and parse durations.

use std::time::Duration;

use tonic::transport::server::Router;

use super::grpc::Listeners;

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM received, shutting down"),
                _ = i.recv() => tracing::info!("SIGINT received, shutting down"),
            }
        }
        _ => {
            // No signal handling possible: never resolve (the process can still be killed).
            std::future::pending::<()>().await
        }
    }
}

/// grpc.health.v1 reporting SERVING for `services` (full gRPC names) and for
/// the empty name (whole server).
pub async fn health_service(
    services: &[&str],
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, svc) = tonic_health::server::health_reporter();
    for s in services {
        reporter.set_service_status(*s, tonic_health::ServingStatus::Serving).await;
    }
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    svc
}

/// Serves `router` on `listeners` until `shutdown` resolves, then stops
/// accepting, lets in-flight calls finish (bounded by `drain`), and removes
/// unix socket files.
pub async fn serve(
    router: Router,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> Result<(), tonic::transport::Error> {
    serve_with(router, listeners, None, shutdown, drain).await
}

/// [`serve`] with mutual TLS on every connection when `tls` is given.
pub async fn serve_with(
    router: Router,
    listeners: Listeners,
    tls: Option<std::sync::Arc<crate::security::tls::Tls>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> Result<(), tonic::transport::Error> {
    let (incoming, guard) = listeners.into_incoming_with(tls);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        shutdown.await;
        let _ = tx.send(());
    });
    tokio::pin!(server);
    let res = tokio::select! {
        r = &mut server => r,
        _ = rx => {
            // Shutdown started: give in-flight calls `drain` to finish.
            match tokio::time::timeout(drain, &mut server).await {
                Ok(r) => r,
                Err(_) => { tracing::warn!(?drain, "in-flight calls did not finish in time; exiting anyway"); Ok(()) }
            }
        }
    };
    drop(guard);
    res
}

/// Parses a Go-style duration (`750ms`, `15s`, `1m`, `1h30m`) for clap.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e} (examples: 750ms, 15s, 1m)"))
}

/// Flags every daemon shares.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Log level: TRACE, DEBUG, INFO, WARN or ERROR (`RUST_LOG` overrides).
    #[arg(long, env = "NSM_LOG_LEVEL", default_value = "INFO")]
    pub log_level: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "NSM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Serve and dial plaintext gRPC. TLS with SPIFFE identities is not
    /// implemented yet, so this is the only mode for now and defaults to
    /// true; it will default to false once identity lands.
    #[arg(long, env = "NSM_INSECURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub insecure: bool,
}

impl CommonArgs {
    /// Initialises logging and checks the transport mode; on error prints
    /// `<prog>: <reason>` and exits 64 (usage error), as `main` would.
    pub fn init_or_exit(&self, prog: &str) {
        if let Err(e) = super::log::init(&self.log_level, self.log_format == "json") {
            eprintln!("{prog}: {e}");
            std::process::exit(64);
        }
        if !self.insecure {
            eprintln!(
                "{prog}: TLS with SPIFFE identities is not implemented yet; run with NSM_INSECURE=true (the default)"
            );
            std::process::exit(64);
        }
        tracing::warn!("plaintext gRPC (NSM_INSECURE=true): no TLS, no SPIFFE identities on this component's hops");
    }
}

/// Prints `<prog>: <error>` and exits 1: the one-line failure every binary
/// reports for runtime errors.
pub fn exit_with(prog: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("{prog}: {e}");
    std::process::exit(1)
}

/// Parses the command line (and `NSM_*` environment); `--help`/`--version`
/// print and exit 0, anything invalid prints clap's explanation and exits 64
/// (EX_USAGE), so scripts can tell bad configuration from runtime failure.
pub fn parse_or_exit<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            std::process::exit(code)
        }
    }
}

/// The first IPv4 address of this netns that is neither loopback nor
/// link-local (the default for public URLs and tunnel endpoints).
pub fn first_global_ipv4() -> Option<std::net::IpAddr> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs {
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            let ip = sin.ip();
            if !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified() {
                return Some(std::net::IpAddr::V4(ip));
            }
        }
    }
    None
}
