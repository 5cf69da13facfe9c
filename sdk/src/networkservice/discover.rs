//! `discover` + `roundrobin`: endpoint selection in the forwarder.
//!
//! # Guarantees
//! - `discover`: if a client URL is already chosen, passes through. If the
//!   connection names its endpoint (refresh, heal without reselect, the far
//!   side of a remote hop), that endpoint is looked up by exact name
//!   (`NotFound` if it is gone). Otherwise the network service is looked up
//!   (`NotFound` if unregistered), its endpoints found, expired ones dropped,
//!   and `matches` applied to the connection labels; the connection's
//!   `payload` is set from the service. No candidate ⇒ `NotFound` saying
//!   whether the service has no endpoints at all or none matching the labels.
//! - `roundrobin`: tries the candidates once each, starting at a
//!   per-service counter, setting the client URL and
//!   `network_service_endpoint_name` for each attempt; the first success
//!   wins. One candidate ⇒ its error unchanged; several ⇒ one error listing
//!   every failure (code of the first).
//! - Close: resolves the endpoint by name if possible; otherwise falls
//!   through so local cleanup still happens (the gRPC tail remembers where
//!   the connection went).
//!
//! # Chain placement
//! `discover` then `roundrobin`, before the mechanism elements and `connect`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use nsm_api::connection::Connection;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::registry::{NetworkService, NetworkServiceEndpoint};
use tonic::Status;

use super::chain::{ConnResult, Context, Element, Next, conn_mut};
use crate::registry::{NsRegistry, NseRegistry, find_ns, find_nses};
use crate::tools::grpc::parse_url;
use crate::tools::matchutils::match_endpoint;
use crate::tools::token;

#[derive(Clone)]
struct Candidates(Vec<NetworkServiceEndpoint>);

/// The `discover` element.
pub struct Discover {
    ns: Arc<dyn NsRegistry>,
    nse: Arc<dyn NseRegistry>,
}

impl Discover {
    /// Looks services up in `ns` and endpoints in `nse`.
    pub fn new(ns: Arc<dyn NsRegistry>, nse: Arc<dyn NseRegistry>) -> Arc<Discover> {
        Arc::new(Discover { ns, nse })
    }

    async fn by_name(&self, ctx: &Context, name: &str) -> Result<Option<NetworkServiceEndpoint>, Status> {
        let q = NetworkServiceEndpoint { name: name.to_string(), ..Default::default() };
        Ok(find_nses(self.nse.as_ref(), ctx, q).await?.into_iter().find(|n| n.name == name))
    }

    async fn service(&self, ctx: &Context, name: &str) -> Result<NetworkService, Status> {
        let q = NetworkService { name: name.to_string(), ..Default::default() };
        find_ns(self.ns.as_ref(), ctx, q)
            .await?
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| Status::not_found(format!("network service {name:?} is not registered")))
    }
}

fn expired(nse: &NetworkServiceEndpoint) -> bool {
    nse.expiration_time.as_ref().and_then(token::from_timestamp).is_some_and(|t| t < SystemTime::now())
}

#[async_trait]
impl Element for Discover {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        if ctx.client_url.is_some() {
            return next.request(ctx, req).await;
        }
        let conn = conn_mut(&mut req);
        if !conn.network_service_endpoint_name.is_empty() {
            let name = conn.network_service_endpoint_name.clone();
            let nse = self.by_name(ctx, &name).await?.ok_or_else(|| {
                Status::not_found(format!("network service endpoint {name:?} is not registered (any more)"))
            })?;
            if conn.payload.is_empty()
                && let Ok(ns) = self.service(ctx, &conn.network_service).await
            {
                conn.payload = ns.payload;
            }
            ctx.ext.insert(Candidates(vec![nse]));
            return next.request(ctx, req).await;
        }
        let ns = self.service(ctx, &conn.network_service).await?;
        let q = NetworkServiceEndpoint { network_service_names: vec![ns.name.clone()], ..Default::default() };
        let all: Vec<_> = find_nses(self.nse.as_ref(), ctx, q).await?.into_iter().filter(|n| !expired(n)).collect();
        let labels: HashMap<String, String> = conn.labels.clone().into_iter().collect();
        let cands = match_endpoint(&labels, &ns, &all);
        conn.payload = ns.payload.clone();
        if cands.is_empty() {
            return Err(if all.is_empty() {
                Status::not_found(format!("network service {:?} has no registered endpoints", ns.name))
            } else {
                let mut l: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                l.sort();
                Status::not_found(format!(
                    "none of the {} endpoints of network service {:?} matches the request labels {{{}}}",
                    all.len(),
                    ns.name,
                    l.join(", ")
                ))
            });
        }
        ctx.ext.insert(Candidates(cands));
        next.request(ctx, req).await
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        if ctx.client_url.is_none()
            && !conn.network_service_endpoint_name.is_empty()
            && let Ok(Some(nse)) = self.by_name(ctx, &conn.network_service_endpoint_name).await
            && let Ok(u) = parse_url(&nse.url)
        {
            ctx.client_url = Some(u);
        }
        next.close(ctx, conn).await
    }
}

/// The `roundrobin` element.
#[derive(Default)]
pub struct RoundRobin {
    counters: Mutex<HashMap<String, usize>>,
}

impl RoundRobin {
    /// A new element.
    pub fn new() -> Arc<RoundRobin> {
        Arc::new(RoundRobin::default())
    }
}

#[async_trait]
impl Element for RoundRobin {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let Some(Candidates(cands)) = ctx.ext.remove::<Candidates>() else {
            // The URL was chosen before us.
            return next.request(ctx, req).await;
        };
        let svc = conn_mut(&mut req).network_service.clone();
        let start = {
            let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            let e = c.entry(svc.clone()).or_insert(0);
            let s = *e;
            *e = e.wrapping_add(1);
            s
        };
        let n = cands.len();
        let mut errors = vec![];
        for i in 0..n {
            let nse = &cands[(start + i) % n];
            let url = match parse_url(&nse.url) {
                Ok(u) => u,
                Err(e) => {
                    errors.push(Status::unavailable(format!("endpoint {}: {e}", nse.name)));
                    continue;
                }
            };
            let mut r = req.clone();
            conn_mut(&mut r).network_service_endpoint_name = nse.name.clone();
            ctx.client_url = Some(url);
            match next.clone().request(ctx, r).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::info!(nse = %nse.name, error = %e.message(), "endpoint attempt failed");
                    errors.push(Status::new(e.code(), format!("endpoint {}: {}", nse.name, e.message())));
                }
            }
        }
        ctx.client_url = None;
        if errors.len() == 1 {
            return Err(errors.remove(0));
        }
        let code = errors.first().map(|e| e.code()).unwrap_or(tonic::Code::Unavailable);
        let msgs: Vec<_> = errors.iter().map(|e| e.message().to_string()).collect();
        Err(Status::new(code, format!("all {n} endpoints of {svc:?} failed: {}", msgs.join("; "))))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap as Map;

    use nsm_api::registry::{Destination, Match, NetworkServiceLabels};

    use super::*;
    use crate::networkservice::chain::Chain;
    use crate::registry::memory::MemoryRegistry;
    use crate::testing::Inject;

    /// Records the URL and endpoint each attempt was sent to; fails for
    /// URLs containing "dead".
    struct Target(Mutex<Vec<(String, String)>>);

    #[async_trait]
    impl Element for Target {
        async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, next: Next) -> ConnResult {
            let url = ctx.client_url.as_ref().map(|u| u.to_string()).unwrap_or_default();
            let nse = req.connection.as_ref().map(|c| c.network_service_endpoint_name.clone()).unwrap_or_default();
            self.0.lock().unwrap().push((url.clone(), nse));
            if url.contains("dead") {
                return Err(Status::unavailable("connection refused"));
            }
            next.request(ctx, req).await
        }
    }

    type Nse<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

    async fn registry(nses: &[Nse<'_>], ns: NetworkService) -> MemoryRegistry {
        let r = MemoryRegistry::new();
        let ctx = Context::default();
        NsRegistry::register(&r, &ctx, ns.clone()).await.unwrap();
        for (name, url, labels) in nses {
            let labels: Map<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let nse = NetworkServiceEndpoint {
                name: name.to_string(),
                url: url.to_string(),
                network_service_names: vec![ns.name.clone()],
                network_service_labels: Map::from([(ns.name.clone(), NetworkServiceLabels { labels })]),
                ..Default::default()
            };
            NseRegistry::register(&r, &ctx, nse).await.unwrap();
        }
        r
    }

    fn req(svc: &str, nse: &str, labels: &[(&str, &str)]) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: "c".into(),
                network_service: svc.into(),
                network_service_endpoint_name: nse.into(),
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn chain(r: &MemoryRegistry, target: &Arc<Target>) -> Chain {
        Chain::new(vec![Discover::new(Arc::new(r.clone()), Arc::new(r.clone())), RoundRobin::new(), target.clone()])
    }

    fn svc(name: &str, payload: &str) -> NetworkService {
        NetworkService { name: name.into(), payload: payload.into(), ..Default::default() }
    }

    #[tokio::test]
    async fn round_robin_spreads_and_skips_dead_endpoints() {
        let r = registry(
            &[("a", "unix:///a.sock", &[]), ("b", "unix:///dead.sock", &[]), ("c", "unix:///c.sock", &[])],
            svc("s", "IP"),
        )
        .await;
        let t = Arc::new(Target(Mutex::default()));
        let ch = chain(&r, &t);
        let mut chosen = vec![];
        for _ in 0..3 {
            let c = ch.request(&mut Context::default(), req("s", "", &[])).await.unwrap();
            assert_eq!(c.payload, "IP", "payload comes from the service");
            chosen.push(c.network_service_endpoint_name);
        }
        chosen.sort();
        assert!(chosen.contains(&"a".to_string()) && chosen.contains(&"c".to_string()), "{chosen:?}");
        assert!(!chosen.contains(&"b".to_string()));
    }

    #[tokio::test]
    async fn all_failing_lists_every_endpoint() {
        let r = registry(&[("x", "unix:///dead1.sock", &[]), ("y", "unix:///dead2.sock", &[])], svc("s", "IP")).await;
        let t = Arc::new(Target(Mutex::default()));
        let e = chain(&r, &t).request(&mut Context::default(), req("s", "", &[])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("endpoint x") && e.message().contains("endpoint y"), "{}", e.message());
    }

    #[tokio::test]
    async fn unknown_service_no_endpoints_and_no_match_are_distinct_errors() {
        let picky = NetworkService {
            name: "picky".into(),
            matches: vec![Match {
                routes: vec![Destination {
                    destination_selector: Map::from([("color".into(), "red".into())]),
                    weight: 0,
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let r = registry(&[("blue", "unix:///b.sock", &[("color", "blue")])], picky).await;
        NsRegistry::register(&r, &Context::default(), svc("empty", "")).await.unwrap();
        let t = Arc::new(Target(Mutex::default()));
        let ch = chain(&r, &t);
        let e = ch.request(&mut Context::default(), req("nope", "", &[])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("\"nope\" is not registered"), "{}", e.message());
        let e = ch.request(&mut Context::default(), req("empty", "", &[])).await.unwrap_err();
        assert!(e.message().contains("has no registered endpoints"), "{}", e.message());
        let e = ch.request(&mut Context::default(), req("picky", "", &[("app", "x")])).await.unwrap_err();
        assert!(e.message().contains("none of the 1 endpoints") && e.message().contains("app=x"), "{}", e.message());
        assert!(t.0.lock().unwrap().is_empty(), "nothing was dialled");
    }

    #[tokio::test]
    async fn named_endpoint_is_looked_up_by_name() {
        let r = registry(&[("a", "unix:///a.sock", &[]), ("b", "unix:///b.sock", &[])], svc("s", "IP")).await;
        let t = Arc::new(Target(Mutex::default()));
        let ch = chain(&r, &t);
        for _ in 0..3 {
            let c = ch.request(&mut Context::default(), req("s", "b", &[])).await.unwrap();
            assert_eq!(c.network_service_endpoint_name, "b");
        }
        assert!(t.0.lock().unwrap().iter().all(|(u, _)| u == "unix:///b.sock"));
        let e = ch.request(&mut Context::default(), req("s", "gone", &[])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("gone"));
    }

    #[tokio::test]
    async fn failure_after_selection_is_returned_unchanged_for_one_candidate() {
        let r = registry(&[("a", "unix:///a.sock", &[])], svc("s", "IP")).await;
        let ch = Chain::new(vec![
            Discover::new(Arc::new(r.clone()), Arc::new(r.clone())),
            RoundRobin::new(),
            Inject::error(tonic::Code::AlreadyExists, "interface taken"),
        ]);
        let e = ch.request(&mut Context::default(), req("s", "", &[])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        assert!(e.message().contains("interface taken"));
    }
}
