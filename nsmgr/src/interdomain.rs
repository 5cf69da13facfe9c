//! `interdomain`: serves requests that name this cluster's services and
//! endpoints with this cluster's domain (`svc@my.cluster2`), as they arrive
//! from another cluster's forwarder after its registry resolved the domain
//! to us.
//!
//! # Guarantees
//! - On the way in, `@<own domain>` is stripped from `network_service` and
//!   `network_service_endpoint_name`, so the rest of the chain (and the
//!   endpoint) see local names; on the way back the caller's names are
//!   restored. Close is treated the same way.
//! - Names with another domain pass unchanged (this cluster's registry
//!   forwards them), and so does everything when no domain is configured.
//!
//! Upstream runs an nsmgr-proxy per cluster for this (and to rewrite
//! addresses across NAT); here clusters' node networks are routed, so the
//! remote forwarder dials this nsmgr directly and the nsmgr strips its own
//! domain.
//!
//! # Chain placement
//! The first of the nsmgr's own elements (after the endpoint prefix, see the
//! crate docs), before anything that looks names up. The prefix's `monitor`
//! therefore publishes connections with the names the caller used.

use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::connection::Connection;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_sdk::networkservice::chain::conn_mut;
use nsm_sdk::networkservice::{ConnResult, Context, Element, Next};
use tonic::Status;

/// The `interdomain` element.
pub struct Interdomain {
    suffix: Option<String>,
}

impl Interdomain {
    /// For a cluster whose domain is `domain` (empty: pass everything).
    pub fn new(domain: &str) -> Arc<Interdomain> {
        Arc::new(Interdomain { suffix: (!domain.is_empty()).then(|| format!("@{domain}")) })
    }

    /// Strips our suffix; returns the original names to restore.
    fn strip(&self, conn: &mut Connection) -> Option<(String, String)> {
        let suffix = self.suffix.as_ref()?;
        let ours = |n: &str| n.ends_with(suffix.as_str());
        if !ours(&conn.network_service) && !ours(&conn.network_service_endpoint_name) {
            return None;
        }
        let orig = (conn.network_service.clone(), conn.network_service_endpoint_name.clone());
        for n in [&mut conn.network_service, &mut conn.network_service_endpoint_name] {
            if let Some(s) = n.strip_suffix(suffix.as_str()) {
                *n = s.to_string();
            }
        }
        Some(orig)
    }
}

fn restore(conn: &mut Connection, orig: &(String, String)) {
    conn.network_service = orig.0.clone();
    if !orig.1.is_empty() || !conn.network_service_endpoint_name.is_empty() {
        // The endpoint name the caller knows is the qualified one.
        let suffix = orig.0.find('@').map(|i| &orig.0[i..]).unwrap_or_default();
        if orig.1.is_empty() {
            conn.network_service_endpoint_name = format!("{}{suffix}", conn.network_service_endpoint_name);
        } else {
            conn.network_service_endpoint_name = orig.1.clone();
        }
    }
}

#[async_trait]
impl Element for Interdomain {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let orig = self.strip(conn_mut(&mut req));
        let mut conn = next.request(ctx, req).await?;
        if let Some(o) = &orig {
            restore(&mut conn, o);
        }
        Ok(conn)
    }

    async fn close(&self, ctx: &mut Context, mut conn: Connection, next: Next) -> Result<(), Status> {
        self.strip(&mut conn);
        next.close(ctx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_sdk::networkservice::Chain;

    /// Records the names the rest of the chain sees.
    struct Seen(std::sync::Mutex<Vec<(String, String)>>);

    #[async_trait]
    impl Element for Seen {
        async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
            let c = req.connection.clone().unwrap_or_default();
            self.0.lock().unwrap().push((c.network_service, c.network_service_endpoint_name));
            next.request(ctx, req).await
        }
        async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
            self.0.lock().unwrap().push((conn.network_service.clone(), conn.network_service_endpoint_name.clone()));
            next.close(ctx, conn).await
        }
    }

    fn req(svc: &str, nse: &str) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                network_service: svc.into(),
                network_service_endpoint_name: nse.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn strips_own_domain_and_restores() {
        let seen = Arc::new(Seen(Default::default()));
        let chain = Chain::new(vec![Interdomain::new("my.cluster2"), seen.clone()]);
        let c = chain.request(&mut Context::default(), req("svc@my.cluster2", "nse1@my.cluster2")).await.unwrap();
        assert_eq!(seen.0.lock().unwrap()[0], ("svc".to_string(), "nse1".to_string()));
        assert_eq!(
            (c.network_service.as_str(), c.network_service_endpoint_name.as_str()),
            ("svc@my.cluster2", "nse1@my.cluster2")
        );
        chain.close(&mut Context::default(), c).await.unwrap();
        assert_eq!(seen.0.lock().unwrap()[1], ("svc".to_string(), "nse1".to_string()));
        // Foreign domains and local names pass unchanged.
        chain.request(&mut Context::default(), req("svc@my.cluster3", "")).await.unwrap();
        assert_eq!(seen.0.lock().unwrap()[2].0, "svc@my.cluster3");
        let c = chain.request(&mut Context::default(), req("svc", "nse1")).await.unwrap();
        assert_eq!(c.network_service, "svc");
        // No domain configured: nothing is touched.
        let chain = Chain::new(vec![Interdomain::new("")]);
        let c = chain.request(&mut Context::default(), req("svc@my.cluster2", "")).await.unwrap();
        assert_eq!(c.network_service, "svc@my.cluster2");
    }
}
