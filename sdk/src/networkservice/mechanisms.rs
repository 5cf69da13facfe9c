//! `mechanisms` (server): dispatches to the handler of the mechanism type.
//!
//! # Guarantees
//! - If the connection already carries a mechanism (refresh, or a hop that
//!   chose one), its type's handler runs; an unsupported type is
//!   `InvalidArgument` naming the type and the supported ones.
//! - Otherwise the `mechanism_preferences` are tried in order: the first
//!   preference with a handler is copied into `connection.mechanism` and its
//!   handler runs; if it fails, the next supported preference is tried. No
//!   supported preference ⇒ `InvalidArgument`.
//! - Close dispatches on the connection's mechanism; without a handler it
//!   just continues (so cleanup downstream still happens).
//! - The chosen interface is recorded in this hop's path segment metrics
//!   (`server_interface = "<TYPE>/<name>"`), as upstream.
//!
//! # Chain placement
//! Near the end of a server chain, before `connect` in a passthrough.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::connection::Connection;
use nsm_api::mechanisms::common;
use nsm_api::networkservice::NetworkServiceRequest;
use tonic::Status;

use super::chain::{ConnResult, Context, Element, Next, conn_mut};

/// The `mechanisms` element.
pub struct Mechanisms {
    handlers: BTreeMap<String, Arc<dyn Element>>,
}

impl Mechanisms {
    /// Handlers by mechanism type (`KERNEL`, ...).
    pub fn new(handlers: Vec<(&str, Arc<dyn Element>)>) -> Arc<Mechanisms> {
        Arc::new(Mechanisms { handlers: handlers.into_iter().map(|(k, v)| (k.to_string(), v)).collect() })
    }

    fn supported(&self) -> String {
        self.handlers.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn record_metric(conn: &mut Connection) {
    let (ty, name) = match &conn.mechanism {
        Some(m) => (m.r#type.clone(), m.parameters.get(common::NAME).cloned().unwrap_or_else(|| "unknown".into())),
        None => return,
    };
    if let Some(p) = conn.path.as_mut()
        && let Some(seg) = p.path_segments.get_mut(p.index as usize)
    {
        seg.metrics.insert("server_interface".into(), format!("{ty}/{name}"));
    }
}

#[async_trait]
impl Element for Mechanisms {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        if let Some(m) = &conn_mut(&mut req).mechanism {
            let Some(h) = self.handlers.get(&m.r#type) else {
                return Err(Status::invalid_argument(format!(
                    "mechanism {} is not supported here (supported: {})",
                    m.r#type,
                    self.supported()
                )));
            };
            let mut c = h.request(ctx, req, next).await?;
            record_metric(&mut c);
            return Ok(c);
        }
        let prefs = std::mem::take(&mut req.mechanism_preferences);
        let mut errors = vec![];
        for pref in &prefs {
            let Some(h) = self.handlers.get(&pref.r#type) else { continue };
            let mut r = req.clone();
            r.mechanism_preferences = prefs.clone();
            conn_mut(&mut r).mechanism = Some(pref.clone());
            match h.request(ctx, r, next.clone()).await {
                Ok(mut c) => {
                    record_metric(&mut c);
                    return Ok(c);
                }
                Err(e) => errors.push(e),
            }
        }
        match errors.len() {
            0 => {
                let offered: Vec<_> = prefs.iter().map(|p| p.r#type.as_str()).collect();
                Err(Status::invalid_argument(format!(
                    "no supported mechanism among the preferences [{}] (supported: {})",
                    offered.join(", "),
                    self.supported()
                )))
            }
            1 => Err(errors.remove(0)),
            _ => {
                let code = errors[0].code();
                let msgs: Vec<_> = errors.iter().map(|e| e.message().to_string()).collect();
                Err(Status::new(code, format!("every supported mechanism failed: {}", msgs.join("; "))))
            }
        }
    }

    async fn close(&self, ctx: &mut Context, conn: Connection, next: Next) -> Result<(), Status> {
        match conn.mechanism.as_ref().and_then(|m| self.handlers.get(&m.r#type)) {
            Some(h) => h.close(ctx, conn, next).await,
            None => next.close(ctx, conn).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use nsm_api::connection::Mechanism;

    use super::*;
    use crate::networkservice::chain::Chain;
    use crate::testing::{Inject, Record};

    fn pref(t: &str) -> Mechanism {
        Mechanism { cls: "LOCAL".into(), r#type: t.into(), ..Default::default() }
    }

    #[tokio::test]
    async fn picks_first_supported_and_falls_back() {
        let log = Record::log();
        let m = Mechanisms::new(vec![
            ("KERNEL", Inject::error(tonic::Code::Internal, "kernel broke") as Arc<dyn Element>),
            ("MEMIF", Record::new("memif", &log)),
        ]);
        let chain = Chain::new(vec![m]);
        let req = NetworkServiceRequest {
            connection: Some(Connection::default()),
            mechanism_preferences: vec![pref("VFIO"), pref("KERNEL"), pref("MEMIF")],
        };
        let c = chain.request(&mut Context::default(), req).await.unwrap();
        assert_eq!(c.mechanism.unwrap().r#type, "MEMIF");
        assert_eq!(*log.lock().unwrap(), ["memif>", "<memif"]);
    }

    #[tokio::test]
    async fn unsupported_is_a_clear_error() {
        let log = Record::log();
        let chain = Chain::new(vec![Mechanisms::new(vec![("KERNEL", Record::new("k", &log) as Arc<dyn Element>)])]);
        let req = NetworkServiceRequest {
            connection: Some(Connection::default()),
            mechanism_preferences: vec![pref("MEMIF")],
        };
        let e = chain.request(&mut Context::default(), req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("[MEMIF]") && e.message().contains("KERNEL"), "{}", e.message());
        let req = NetworkServiceRequest {
            connection: Some(Connection { mechanism: Some(pref("VXLAN")), ..Default::default() }),
            ..Default::default()
        };
        let e = chain.request(&mut Context::default(), req).await.unwrap_err();
        assert!(e.message().contains("VXLAN"));
    }
}
