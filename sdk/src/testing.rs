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
use crate::networkservice::chain::{Context, Element, Next};

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
    fn name(&self) -> &'static str {
        "record"
    }
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> Result<Connection, Status> {
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
    fn name(&self) -> &'static str {
        "inject"
    }
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> Result<Connection, Status> {
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
    fn name(&self) -> &'static str {
        "onclose"
    }
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> Result<Connection, Status> {
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
    fn name(&self) -> &'static str {
        "slow"
    }
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> Result<Connection, Status> {
        let n = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
        next.request(ctx, req).await
    }
    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        next.close(ctx, conn).await
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
    fn name(&self) -> &'static str {
        "grabevents"
    }
    async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> Result<Connection, Status> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = ctx.events.clone();
        next.request(ctx, req).await
    }
    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        next.close(ctx, conn).await
    }
}

/// Installs a tracing subscriber for tests (once); honours `RUST_LOG`.
pub fn trace_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}
