//! `discoverforwarder`: picks the forwarder on this node that will build the
//! wire, and checks that the requested network service exists.
//!
//! # Guarantees
//! - The network service must be registered: otherwise `NotFound` naming it
//!   (this is the first hop that looks it up, so the client learns early).
//! - Candidates are forwarders registered through *this* nsmgr as endpoints
//!   of the forwarder service, filtered by the service's `matches`
//!   (metadata labels, default `p2p: true`).
//! - A connection sticks to the forwarder that served it (remembered per
//!   connection); `RESELECT_REQUESTED` forgets it. Without a remembered one,
//!   the forwarder named in the next path segment (used before an nsmgr
//!   restart) is preferred.
//! - Candidates are tried in order until one succeeds; with several, the
//!   error lists each failure.
//!
//! # Chain placement
//! In the nsmgr chain after `clientinfo`, before `connect`.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::connection::{Connection, State};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::registry::{NetworkService, NetworkServiceEndpoint};
use nsm_sdk::networkservice::chain::conn_mut;
use nsm_sdk::networkservice::{ConnResult, Context, Element, Next};
use nsm_sdk::registry::{NsRegistry, find_ns, find_nses};

use crate::registry::NseRelay;
use nsm_sdk::tools::grpc::parse_url;
use nsm_sdk::tools::matchutils::match_forwarders;
use tonic::Status;

#[derive(Clone)]
struct ChosenForwarder(String);

/// The `discoverforwarder` element.
pub struct DiscoverForwarder {
    ns: Arc<dyn NsRegistry>,
    nse: Arc<NseRelay>,
    service: String,
    public_url: String,
}

impl DiscoverForwarder {
    /// Looks services up in `ns`, forwarders (endpoints of `service`
    /// registered with `public_url`) in `nse`.
    pub fn new(ns: Arc<dyn NsRegistry>, nse: Arc<NseRelay>, service: &str, public_url: &str) -> Arc<Self> {
        Arc::new(DiscoverForwarder { ns, nse, service: service.to_string(), public_url: public_url.to_string() })
    }
}

/// Looks up a network service by exact name; `NotFound` if absent.
pub async fn lookup_service(reg: &dyn NsRegistry, ctx: &Context, name: &str) -> Result<NetworkService, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("request names no network service"));
    }
    let found = find_ns(reg, ctx, NetworkService { name: name.to_string(), ..Default::default() }).await?;
    found.into_iter().find(|n| n.name == name).ok_or_else(|| {
        Status::not_found(format!(
            "network service {name:?} is not registered (is an endpoint for it running, and does it register the service?)"
        ))
    })
}

#[async_trait]
impl Element for DiscoverForwarder {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let conn = conn_mut(&mut req).clone();
        let ns = lookup_service(self.ns.as_ref(), ctx, &conn.network_service).await?;
        let meta = ctx.meta.clone();
        let reselect = conn.state == State::ReselectRequested as i32;
        let remembered = if reselect { None } else { meta.as_ref().and_then(|m| m.server_get::<ChosenForwarder>()) };
        let query = NetworkServiceEndpoint {
            network_service_names: vec![self.service.clone()],
            url: self.public_url.clone(),
            name: remembered.as_ref().map(|r| r.0.clone()).unwrap_or_default(),
            ..Default::default()
        };
        // The query's URL is a substring match; keep exactly the forwarders
        // registered through this nsmgr.
        let all: Vec<_> = find_nses(self.nse.as_ref(), ctx, query)
            .await?
            .into_iter()
            .filter(|f| self.nse.is_local(&f.name))
            .collect();
        let labels: HashMap<String, String> = conn.labels.clone().into_iter().collect();
        let mut cands = match_forwarders(&labels, &ns, &self.service, &all);
        if cands.is_empty() {
            return Err(match &remembered {
                Some(r) => Status::unavailable(format!("forwarder {} is not available", r.0)),
                None if all.is_empty() => Status::unavailable(format!(
                    "no forwarder is registered on this node (endpoints of service {:?} via {}); is the forwarder running?",
                    self.service, self.public_url
                )),
                None => Status::unavailable(format!(
                    "none of the {} forwarders on this node matches the requirements of network service {:?}",
                    all.len(),
                    ns.name
                )),
            });
        }
        if remembered.is_none()
            && !reselect
            && let Some(prev) = conn.next_path_segment().map(|s| s.name.clone())
            && let Some(i) = cands.iter().position(|f| f.name == prev)
        {
            let f = cands.remove(i);
            cands.insert(0, f);
        }
        let mut errors: Vec<Status> = vec![];
        for fwd in &cands {
            let url = match parse_url(&fwd.url) {
                Ok(u) => u,
                Err(e) => {
                    errors.push(Status::unavailable(format!("forwarder {}: {e}", fwd.name)));
                    continue;
                }
            };
            ctx.client_url = Some(url);
            match next.clone().request(ctx, req.clone()).await {
                Ok(c) => {
                    if let Some(m) = &meta {
                        m.server_insert(ChosenForwarder(fwd.name.clone()));
                    }
                    return Ok(c);
                }
                Err(e) => {
                    tracing::debug!(forwarder = %fwd.name, error = %e.message(), "forwarder attempt failed");
                    errors.push(e);
                }
            }
        }
        if errors.len() == 1 {
            return Err(errors.remove(0));
        }
        let code = errors.first().map(|e| e.code()).unwrap_or(tonic::Code::Unavailable);
        let msgs: Vec<_> = errors.iter().map(|e| e.message().to_string()).collect();
        Err(Status::new(code, format!("all {} forwarders failed: {}", msgs.len(), msgs.join("; "))))
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        // The client chain closes at the forwarder this connection used
        // (remembered by the gRPC tail), even if it is gone from the registry.
        next.close(ctx, conn).await
    }
}
