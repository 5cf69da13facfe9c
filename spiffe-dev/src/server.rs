//! The `SpiffeWorkloadAPI` gRPC service.
//!
//! Every call must carry the metadata `workload.spiffe.io: true`
//! (InvalidArgument otherwise, as SPIRE). X.509 calls attest the caller by
//! its unix peer credentials; a caller no rule matches gets PermissionDenied.
//! Streams stay open: FetchX509SVID sends a new SVID at half the current
//! one's lifetime, and the SVID again with the new bundles whenever a bundle
//! changes; FetchX509Bundles sends the bundles again when they change. One
//! SVID per SPIFFE ID is shared by every stream while it is in the first
//! half of its life (the SPIRE agent caches one per entry). A stream ends when its client goes away
//! or the server stops. JWT-SVIDs are not implemented.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::authority::{Authority, Issued, Snapshot};
use crate::pb;
use crate::pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use crate::policy::Caller;

/// The security header every Workload API client sends.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

type ResultStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The service; `stop` turning true ends every open stream.
#[derive(Clone)]
pub struct WorkloadApi {
    auth: Authority,
    stop: watch::Receiver<bool>,
}

impl WorkloadApi {
    pub fn new(auth: Authority, stop: watch::Receiver<bool>) -> WorkloadApi {
        WorkloadApi { auth, stop }
    }

    /// The tonic service.
    pub fn into_service(self) -> SpiffeWorkloadApiServer<WorkloadApi> {
        SpiffeWorkloadApiServer::new(self)
    }

    /// Checks the header and attests the caller: its facts and SPIFFE ID.
    fn attest<T>(&self, req: &Request<T>) -> Result<(Caller, String), Status> {
        check_header(req)?;
        let (pid, uid) = peer_credentials(req)?;
        let (caller, id) = self.auth.identify(pid, uid);
        match id {
            Some(id) => Ok((caller, id)),
            None => {
                let msg = self.auth.policy().no_identity_message(&caller);
                tracing::warn!("{msg}");
                Err(Status::permission_denied(msg))
            }
        }
    }
}

/// InvalidArgument unless the request carries `workload.spiffe.io: true`.
pub fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(SECURITY_HEADER).and_then(|v| v.to_str().ok()) {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument("security header missing from request")),
    }
}

/// pid and uid of a unix-socket caller (from `nsm_sdk`'s listeners or plain
/// tonic unix listeners).
fn peer_credentials<T>(req: &Request<T>) -> Result<(i32, u32), Status> {
    let cred = if let Some(ci) = req.extensions().get::<nsm_sdk::tools::grpc::ConnInfo>() {
        ci.peer.pid.zip(ci.peer.uid)
    } else if let Some(ci) = req.extensions().get::<tonic::transport::server::UdsConnectInfo>() {
        ci.peer_cred.and_then(|c| c.pid().map(|p| (p, c.uid())))
    } else {
        None
    };
    cred.ok_or_else(|| {
        Status::permission_denied("cannot attest the caller: no unix peer credentials (connect over the unix socket)")
    })
}

fn svid_response(i: Issued) -> pb::X509svidResponse {
    pb::X509svidResponse {
        svids: vec![pb::X509svid {
            spiffe_id: i.svid.spiffe_id.clone(),
            x509_svid: i.svid.chain_der_concat(),
            x509_svid_key: i.svid.private_key_pkcs8.clone(),
            bundle: i.bundle,
            hint: String::new(),
        }],
        crl: vec![],
        federated_bundles: i.federated.into_iter().map(|(td, b)| (format!("spiffe://{td}"), b)).collect(),
    }
}

fn bundles_response(snap: &Snapshot, td: &str) -> pb::X509BundlesResponse {
    let mut bundles: std::collections::HashMap<String, Vec<u8>> =
        snap.federated_for(td).into_iter().map(|(name, b)| (format!("spiffe://{name}"), b)).collect();
    if let Some(d) = snap.domains.get(td) {
        bundles.insert(format!("spiffe://{td}"), d.bundle_der());
    }
    pb::X509BundlesResponse { crl: vec![], bundles }
}

fn issue_error(e: crate::ca::CaError) -> Status {
    tracing::error!("issuing an X509-SVID failed: {e}");
    Status::internal(format!("issuing an X509-SVID failed: {e}"))
}

/// When to send the next SVID: at half the remaining lifetime of `not_after`.
fn rotate_in(not_after: SystemTime) -> Duration {
    let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
    (left / 2).max(Duration::from_millis(500))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResultStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = ResultStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = ResultStream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let (caller, id) = self.attest(&req)?;
        let mut snaps = self.auth.subscribe();
        let snap = snaps.borrow_and_update().clone();
        let first = self.auth.issue(&snap, &caller, &id).map_err(issue_error)?;
        let mut next = rotate_in(first.svid.not_after);
        let (tx, rx) = mpsc::channel(2);
        let _ = tx.try_send(Ok(svid_response(first)));
        let (auth, mut stop) = (self.auth.clone(), self.stop.clone());
        tokio::spawn(async move {
            tracing::debug!(spiffe_id = %id, pid = caller.pid, "FetchX509SVID stream open");
            loop {
                let why = tokio::select! {
                    _ = tx.closed() => break,
                    _ = stop.wait_for(|s| *s) => break,
                    r = snaps.changed() => match r { Ok(()) => "bundle changed", Err(_) => break },
                    _ = tokio::time::sleep(next) => "rotation",
                };
                let snap: Arc<Snapshot> = snaps.borrow_and_update().clone();
                tracing::debug!(spiffe_id = %id, pid = caller.pid, "new X509-SVID: {why}");
                match auth.issue(&snap, &caller, &id) {
                    Ok(i) => {
                        next = rotate_in(i.svid.not_after);
                        if tx.send(Ok(svid_response(i))).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(issue_error(e))).await;
                        break;
                    }
                }
            }
            tracing::debug!(spiffe_id = %id, pid = caller.pid, "FetchX509SVID stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let (caller, id) = self.attest(&req)?;
        let td = crate::authority::trust_domain_of(&id).to_string();
        let mut snaps = self.auth.subscribe();
        let snap = snaps.borrow_and_update().clone();
        let (tx, rx) = mpsc::channel(2);
        let _ = tx.try_send(Ok(bundles_response(&snap, &td)));
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            tracing::debug!(trust_domain = %td, pid = caller.pid, "FetchX509Bundles stream open");
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = stop.wait_for(|s| *s) => break,
                    r = snaps.changed() => if r.is_err() { break },
                }
                let snap = snaps.borrow_and_update().clone();
                if tx.send(Ok(bundles_response(&snap, &td))).await.is_err() {
                    break;
                }
            }
            tracing::debug!(trust_domain = %td, pid = caller.pid, "FetchX509Bundles stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_jwtsvid(&self, req: Request<pb::JwtsvidRequest>) -> Result<Response<pb::JwtsvidResponse>, Status> {
        check_header(&req)?;
        Err(jwt_unimplemented())
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        Err(jwt_unimplemented())
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        Err(jwt_unimplemented())
    }
}

fn jwt_unimplemented() -> Status {
    Status::unimplemented("nsm-spiffe-dev issues X.509-SVIDs only; JWT-SVIDs are not implemented")
}
