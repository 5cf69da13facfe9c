//! `clientinfo`: adds `nodeName`, `podName`, `clusterName` labels to the
//! connection (from `NODE_NAME`, `POD_NAME`, `CLUSTER_NAME` of the component
//! that runs it), never overwriting a label the request already has.
//!
//! # Chain placement
//! Anywhere before endpoint/forwarder selection (labels feed `matches`).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::mechanisms::labels;
use nsm_api::networkservice::NetworkServiceRequest;

use super::chain::{ConnResult, Context, Element, Next, conn_mut};

/// The `clientinfo` element.
pub struct ClientInfo {
    labels: BTreeMap<String, String>,
}

impl ClientInfo {
    /// From explicit values (empty ones are skipped).
    pub fn new(node: &str, pod: &str, cluster: &str) -> Arc<ClientInfo> {
        Arc::new(ClientInfo { labels: info_labels(node, pod, cluster) })
    }
}

/// The label map `clientinfo` adds.
pub fn info_labels(node: &str, pod: &str, cluster: &str) -> BTreeMap<String, String> {
    [(labels::NODE_NAME, node), (labels::POD_NAME, pod), (labels::CLUSTER_NAME, cluster)]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[async_trait]
impl Element for ClientInfo {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let conn = conn_mut(&mut req);
        for (k, v) in &self.labels {
            conn.labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        next.request(ctx, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networkservice::chain::Chain;

    #[tokio::test]
    async fn adds_without_overwriting() {
        let chain = Chain::new(vec![ClientInfo::new("node-1", "", "c1")]);
        let mut req = NetworkServiceRequest::default();
        conn_mut(&mut req).labels.insert("nodeName".into(), "mine".into());
        let c = chain.request(&mut Context::default(), req).await.unwrap();
        assert_eq!(c.labels["nodeName"], "mine");
        assert_eq!(c.labels["clusterName"], "c1");
        assert!(!c.labels.contains_key("podName"));
    }
}
